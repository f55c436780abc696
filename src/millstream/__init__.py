"""Millstream: batch and streaming data processing on Arrow, embedded or on Ray.

    import millstream as ms
    counts = (ms.read_text("logs/*.txt")
              .select(ms.col("text").str.split().alias("word"))
              .explode("word")
              .group_by("word").agg(ms.count().alias("n")))
    counts.show()
"""

import copyreg as _copyreg
import sys as _sys
import types as _types

import millstream.runners  # noqa: E402,F401,I001 - registers the local and Ray runners
from millstream.api.changelog import file_sink, kafka_sink, postgres_sink
from millstream.api.dataset import Dataset, GroupedDataset
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
    read_postgres,
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
from millstream.core import lazy_pandas as _lazy_pandas
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
from millstream.ui import ui_url  # registers the dashboard with the session

_lazy_pandas.defer()  # small jobs run without pandas until someone imports it

__version__ = "0.1.0"


#: names whose modules load on first use, so that ``import millstream`` stays fast (the SQL
#: front end imports sqlglot; MapReduce its own operators and file sinks)
_LAZY = {
    "sql": "millstream.sql", "register": "millstream.sql",
    "register_function": "millstream.sql", "unregister": "millstream.sql",
    "unregister_function": "millstream.sql",
    "MapReduceJob": "millstream.api.mapreduce", "MRStep": "millstream.api.mapreduce",
    "mapreduce": "millstream.api.mapreduce",
}


def __getattr__(name: str):
    """Load a lazy name (``ms.sql``, ``ms.MapReduceJob``, ...) or ``ms.testing`` on first use."""
    import importlib

    if name == "testing":
        return importlib.import_module("millstream.testing")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'millstream' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


class _Package(_types.ModuleType):
    """The ``millstream`` module: importing the ``millstream.sql`` subpackage must not rebind
    ``ms.sql`` from the function to the subpackage (the import system sets the attribute)."""

    def __setattr__(self, name: str, value: object) -> None:
        if name == "sql" and isinstance(value, _types.ModuleType):
            return
        super().__setattr__(name, value)


def _import_millstream() -> _types.ModuleType:
    import importlib

    return importlib.import_module("millstream")


_sys.modules[__name__].__class__ = _Package
# pickled by reference, as any module (cloudpickle ships functions that use ``ms``)
_copyreg.pickle(_Package, lambda module: (_import_millstream, ()))


def __dir__() -> list[str]:
    return sorted(n for n in set(globals()) | set(_LAZY) | {"testing"} if not n.startswith("_"))


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
    "from_pandas", "from_polars", "global_window", "init", "kafka_sink", "last", "last_job_stats", "lit", "mapreduce", "max", "mean", "median", "min", "postgres_sink", "processing_time_trigger", "quantile", "range",
    "read_csv", "read_json", "read_kafka", "read_parquet", "read_postgres", "read_text", "session", "shutdown", "sink", "sliding", "std", "stddev", "sum", "tumbling", "ui_url", "var", "variance", "when",
    # analytic window functions (expr.analytic)
    "cume_dist", "dense_rank", "first_value", "lag", "last_value", "lead", "nth_value", "ntile",
    "percent_rank", "range_between", "rank", "row_number", "rows",
    # SQL (millstream.sql)
    "SQLError", "register", "register_function", "sql", "unregister", "unregister_function",
]
