"""Millstream: batch and streaming data processing on Arrow, embedded or on Ray.

    import millstream as ms
    counts = (ms.read_text("logs/*.txt")
              .select(ms.col("text").str.split().alias("word"))
              .explode("word")
              .group_by("word").agg(ms.count().alias("n")))
    counts.show()
"""

import millstream.runners  # noqa: E402,F401,I001 - registers the local and Ray runners
from millstream.api.changelog import file_sink
from millstream.api.dataset import Dataset, GroupedDataset
from millstream.api.mapreduce import MapReduceJob, MRStep, mapreduce
from millstream.api.readers import (
    dead_letter,
    from_arrow,
    from_generator,
    from_items,
    from_pandas,
    from_polars,
    range,
    read_csv,
    read_json,
    read_kafka,
    read_parquet,
    read_text,
)
from millstream.api.stream import (
    count_trigger,
    event_time_trigger,
    global_window,
    processing_time_trigger,
    session,
    sliding,
    tumbling,
)
from millstream.api.stream_join import console, sink
from millstream.errors import (
    BadRecordError,
    MillstreamError,
    OutputExistsError,
    PlanError,
    SchemaError,
    SQLError,
    StorageError,
    TaskError,
    UserFunctionError,
)
from millstream.expr.agg_functions import (
    any_value,
    approx_count_distinct,
    approx_quantile,
    avg,
    collect_list,
    count,
    count_distinct,
    first,
    last,
    max,
    mean,
    median,
    min,
    quantile,
    std,
    stddev,
    sum,
    var,
    variance,
)
from millstream.expr.analytic import (
    cume_dist,
    dense_rank,
    first_value,
    lag,
    last_value,
    lead,
    nth_value,
    ntile,
    percent_rank,
    range_between,
    rank,
    row_number,
    rows,
)
from millstream.expr.conditional import when
from millstream.expr.nodes import AggExpr, Expr, col, lit
from millstream.runtime.session import init, shutdown
from millstream.sql import register, register_function, sql, unregister, unregister_function
from millstream.ui import ui_url  # registers the dashboard with the session

__version__ = "0.1.0"


def __getattr__(name: str):
    """``ms.testing`` without importing the streaming test kit on every ``import millstream``."""
    if name == "testing":
        import millstream.testing as testing

        return testing
    raise AttributeError(f"module 'millstream' has no attribute {name!r}")


def last_job_stats():
    """Statistics of the last finished job: stages, rows, bytes, seconds and counters."""
    from millstream.runtime.session import get_session

    return get_session().last_job_stats


__all__ = [
    "AggExpr", "BadRecordError", "Dataset", "Expr", "GroupedDataset", "MRStep", "MapReduceJob",
    "MillstreamError",
    "OutputExistsError", "PlanError", "SchemaError", "StorageError", "TaskError", "UserFunctionError",
    "any_value", "approx_count_distinct", "approx_quantile",
    "avg", "col", "collect_list", "console", "count", "count_distinct", "count_trigger", "dead_letter", "event_time_trigger", "file_sink", "first", "from_arrow", "from_generator", "from_items",
    "from_pandas", "from_polars", "global_window", "init", "last", "last_job_stats", "lit", "mapreduce", "max", "mean", "median", "min", "processing_time_trigger", "quantile", "range",
    "read_csv", "read_json", "read_kafka", "read_parquet", "read_text", "session", "shutdown", "sink", "sliding", "std", "stddev", "sum", "tumbling", "ui_url", "var", "variance", "when",
    # analytic window functions (expr.analytic)
    "cume_dist", "dense_rank", "first_value", "lag", "last_value", "lead", "nth_value", "ntile",
    "percent_rank", "range_between", "rank", "row_number", "rows",
    # SQL (millstream.sql)
    "SQLError", "register", "register_function", "sql", "unregister", "unregister_function",
]
