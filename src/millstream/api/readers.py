"""Entry points that create Datasets from files, object stores and in-memory data."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pyarrow as pa

from millstream.api.dataset import Dataset
from millstream.core.arrow import rows_to_batch
from millstream.errors import PlanError
from millstream.io.memory import RangeSource, TableSource
from millstream.plan.logical import Scan


def _watch(fmt: str, uri: Any, options: dict[str, Any]) -> Dataset:
    """An unbounded Dataset of the new files of directory ``uri`` (``watch=True``)."""
    from millstream.io.files.watch import WatchSource

    poll_interval = options.pop("poll_interval", "1s")
    return Dataset(Scan(WatchSource(fmt, uri, options, poll_interval)))


def dead_letter(uri: Any, **storage_options: Any) -> Any:
    """``on_bad_records=ms.dead_letter("bad")``: write each malformed record, with the reason,
    as a JSON line to files in directory ``uri`` (any path or URI; a string containing "/"
    such as ``"./bad"`` or ``"s3://bucket/bad/"`` means the same)."""
    from millstream.io.files.dead_letters import dead_letter as make

    return make(uri, **storage_options)


def read_text(uri: str | list[str], **options: Any) -> Dataset:
    """One row per line (column ``text``); big files are split at line boundaries and read in
    parallel. ``encoding="utf-8"``, ``encoding_errors="strict"`` (an undecodable line raises
    ``BadRecordError`` naming the file, line and byte offset) | ``"replace"`` | ``"ignore"``.

    A directory or glob is read whole, except files whose extension names a binary format
    (``.parquet``, ...): those are an error naming them (see :func:`read_csv`)."""
    from millstream.io.files.text import TextSource

    if options.pop("watch", False):
        return _watch("text", uri, options)
    return Dataset(Scan(TextSource(uri, **options)))


def read_csv(uri: str | list[str], **options: Any) -> Dataset:
    """CSV files: a file, a directory (recursively; ``_``/``.`` names skipped) or a glob.

    Options: ``header``, ``delimiter``, ``schema``, ``columns``, ``multiline``,
    ``encoding="utf-8"`` and ``encoding_errors="strict"`` | ``"replace"`` | ``"ignore"``
    (a line that does not decode is a bad record, never a ``binary`` column),
    ``on_bad_records="error"`` | ``"skip"`` | a dead-letter directory (a path or URI with
    a "/", or ``ms.dead_letter("dir")``), ``union_by_name=False``.

    The files of a directory must have the same header (columns are read by position): a
    file whose header differs is a ``SchemaError`` naming it, unless ``union_by_name=True``
    (columns matched by name; a column missing from a file is null there; types unified).
    A reader reads one format: a directory or glob holding files whose extension names
    another one (``b.parquet``, ``c.json``) is a ``PlanError`` naming them; select the
    CSV files with a glob (``dir/*.csv``). Files named explicitly, and names without a
    known extension, are read as CSV."""
    from millstream.io.files.csv import CsvSource

    if options.pop("watch", False):
        return _watch("csv", uri, options)
    return Dataset(Scan(CsvSource(uri, **options)))


def read_json(uri: str | list[str], **options: Any) -> Dataset:
    """JSON-lines files: a file, a directory or a glob.

    Options: ``schema``, ``columns``, ``encoding``/``encoding_errors`` and
    ``on_bad_records`` as for :func:`read_csv`; ``union_by_name=True`` infers the schema
    from the start of every file (not only the first) and unifies it by field name (a
    type conflict that cannot be widened is a ``SchemaError`` naming the files). Files of
    another format in a directory are an error, as for :func:`read_csv`.

    ``watch=True`` (also for read_csv/read_text/read_parquet; ``poll_interval="1s"``): an
    unbounded source of the new files of a directory, see :mod:`millstream.io.files.watch`."""
    from millstream.io.files.json import JsonSource

    if options.pop("watch", False):
        return _watch("json", uri, options)
    return Dataset(Scan(JsonSource(uri, **options)))


def read_parquet(uri: str | list[str], columns: list[str] | None = None, **options: Any) -> Dataset:
    """Parquet files or hive-partitioned directories; columns and filters are pushed into the scan.

    Checked at planning, from the footers: a file that is not Parquet or is truncated is a
    ``StorageError`` naming it; files whose columns or types differ from the first file's
    are a ``SchemaError`` naming the files and the column, unless ``union_by_name=True``
    (columns matched by name, missing ones null, types widened; a conflict that cannot be
    widened is a SchemaError naming the files). ``schema=`` fixes the schema instead. A
    directory or glob holding files of another format (``a.csv``) is a ``PlanError``
    naming them: select the Parquet files with a glob (``dir/*.parquet``)."""
    from millstream.io.files.parquet import ParquetSource

    if options.pop("watch", False):
        return _watch("parquet", uri, {**options, "columns": columns})
    return Dataset(Scan(ParquetSource(uri, columns=columns, **options)))


def read_kafka(topic: str, bootstrap_servers: str, format: str = "json", start: str = "earliest",
               **options: Any) -> Dataset:
    """A Kafka topic, partitions read in parallel by offset.

    Keywords (or an ``options={...}`` dict): Millstream's own (``on_bad_records="error"``
    | ``"skip"`` | a dead-letter directory, ``end_offsets``, ... see
    :data:`millstream.io.kafka.SOURCE_OPTIONS`); any other key is a librdkafka setting
    (``"security.protocol"``, ...).

    In batch mode it is bounded (up to the end offsets found at planning time, or
    ``end_offsets={partition: offset}``); run with ``.start(...)`` it is unbounded, read by
    one reader per partition with the offsets in the checkpoints (``stop_at_end=True``
    on ``start`` ends the job once every partition is caught up)."""
    from millstream.io.kafka import KafkaSource

    nested = options.pop("options", None)  # read_kafka(..., options={...}) as well as keywords
    if nested is not None:
        if not isinstance(nested, dict):
            raise PlanError(f"read_kafka: options must be a dict, got {nested!r}")
        both = sorted(set(nested) & set(options))
        if both:
            raise PlanError(f"read_kafka: {both} given both as keywords and in options=")
        options = {**nested, **options}
    group_id = options.pop("group_id", None)
    schema = options.pop("schema", None)
    return Dataset(Scan(KafkaSource(topic, bootstrap_servers, format=format, start=start,
                                    group_id=group_id, schema=schema, options=options or None)))


def read_postgres(dsn: str, query_or_table: str, partition_column: str | None = None,
                  num_partitions: int | None = None, lower_bound: Any = None,
                  upper_bound: Any = None, fetch_size: int = 10_000,
                  connect_timeout: float = 5) -> Dataset:
    """A PostgreSQL table, view or query (``dsn``: a libpq connection string or URI), read
    in parallel as Spark's JDBC reader does: with ``partition_column`` (numeric, date or
    timestamp), ``num_partitions`` ranges between ``lower_bound`` and ``upper_bound``
    (from the column's min and max when not given; rows outside them go to the first and
    last range, nulls to the first), each read by a task with a server-side cursor. The
    schema comes from the server when the Dataset is made; the columns used and the
    filters that translate to SQL are pushed into the query. Bounded: in a streaming job
    it is read once (e.g. the reference side of a stream-table join)."""
    from millstream.io.postgres import PostgresSource

    source = PostgresSource(dsn, query_or_table, partition_column=partition_column,
                            num_partitions=num_partitions, lower_bound=lower_bound,
                            upper_bound=upper_bound, fetch_size=fetch_size,
                            connect_timeout=connect_timeout)
    source.full_schema()  # a server that cannot be reached, a bad query: an error here
    return Dataset(Scan(source))


def from_generator(fn: Any, rate: float | None = None, count: int | None = None,
                   partitions: int = 1, schema: pa.Schema | None = None) -> Dataset:
    """Rows ``fn(0), fn(1), ...``: endless (streaming) unless ``count``; ``rate`` rows/second.

    ``fn(i)`` returns a row (a dict), or, the fast path, a whole batch (an Arrow record batch
    or table, a pandas or Polars DataFrame, a dict of columns): then ``i`` and ``count``
    count batches.
    """
    from millstream.io.generator import GeneratorSource

    return Dataset(Scan(GeneratorSource(fn, rate=rate, count=count, partitions=partitions,
                                        schema=schema)))


def from_items(rows: Iterable[Any], num_partitions: int | None = None) -> Dataset:
    """A dataset of Python dict rows (other values become a column ``value``)."""
    rows = list(rows)
    batch = rows_to_batch(rows)
    return Dataset(Scan(TableSource(pa.Table.from_batches([batch]), num_partitions, "items")))


def from_arrow(data: pa.Table | pa.RecordBatch, num_partitions: int | None = None) -> Dataset:
    """A dataset of an Arrow table or record batch."""
    table = pa.Table.from_batches([data]) if isinstance(data, pa.RecordBatch) else data
    return Dataset(Scan(TableSource(table, num_partitions, "arrow")))


def from_pandas(df: Any, num_partitions: int | None = None) -> Dataset:
    """A dataset of a pandas DataFrame (the index is dropped)."""
    return Dataset(Scan(TableSource(pa.Table.from_pandas(df, preserve_index=False), num_partitions, "pandas")))


def from_polars(df: Any, num_partitions: int | None = None) -> Dataset:
    """A dataset of a polars DataFrame."""
    return Dataset(Scan(TableSource(df.to_arrow(), num_partitions, "polars")))


def range(start: int, end: int | None = None, step: int = 1, num_partitions: int | None = None) -> Dataset:  # noqa: A001
    """Integers in column ``id``: ``range(n)`` or ``range(start, end, step)``."""
    if end is None:
        start, end = 0, start
    return Dataset(Scan(RangeSource(start, end, step, num_partitions)))
