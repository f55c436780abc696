"""In-memory sources: Python rows, Arrow tables, pandas frames, integer ranges."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from millstream.core.arrow import without_view_types
from millstream.core.context import TaskContext
from millstream.io.base import ColumnStatistics, Source, SourceStatistics, Split

#: Tables up to this many rows get exact distinct counts; larger ones a sample's estimate.
EXACT_DISTINCT_ROWS = 200_000
#: Rows of the sample the distinct count of a larger table is estimated from.
DISTINCT_SAMPLE_ROWS = 50_000


class TableSource(Source):
    """An Arrow table held by the driver, cut into row slices shipped with the tasks."""

    name = "memory"
    rereads_cheaply = True
    runs_user_code = False

    def __init__(self, table: pa.Table, num_partitions: int | None = None, label: str = "memory") -> None:
        plain = without_view_types(table.schema)  # (polars frames come as string_view)
        self.table = table.cast(plain) if plain is not None else table
        self.num_partitions = num_partitions
        self.label = label
        self.columns: list[str] | None = None
        #: column statistics, computed once (shared with the copies pushdown makes)
        self._stats_box: dict[str, ColumnStatistics] = {}

    def plan_splits(self, target_splits: int) -> list[Split]:
        n = self.table.num_rows
        parts = self.num_partitions or max(1, min(target_splits, n // 1000 + 1))
        parts = max(1, min(parts, n)) if n else 1
        bounds = np.linspace(0, n, parts + 1).astype(np.int64)
        splits = []
        for i in range(parts):
            lo, hi = int(bounds[i]), int(bounds[i + 1])
            t = self.table.slice(lo, hi - lo)
            if self.columns is not None:
                t = t.select(self.columns)
            # Arrow IPC writes only the slice's own bytes; pickling a slice would ship the
            # whole parent buffers with every task
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, t.schema) as w:
                w.write_table(t)
            splits.append(Split(i, sink.getvalue(), t.nbytes, f"rows {lo}-{hi}"))
        return splits

    def __getstate__(self) -> dict:
        # tasks carry their split; the table itself stays on the driver
        state = dict(self.__dict__)
        state["table"] = self.table.schema.empty_table()
        return state

    def read_split(self, split: Split, ctx: TaskContext) -> Iterator[pa.RecordBatch]:
        batches = list(pa.ipc.open_stream(split.info))
        if not batches:
            batches = [pa.RecordBatch.from_pylist([], schema=pa.ipc.open_stream(split.info).schema)]
        for b in batches:
            if b.num_rows > ctx.batch_size:
                for s in range(0, b.num_rows, ctx.batch_size):
                    yield b.slice(s, ctx.batch_size)
            else:
                yield b

    def with_pushdown(self, columns, predicate):
        if columns is None or not all(c in self.table.schema.names for c in columns):
            return self, False, False
        new = TableSource(self.table, self.num_partitions, self.label)
        new.columns = list(columns)
        new._stats_box = self._stats_box
        return new, True, False

    def estimated_size_bytes(self) -> int | None:
        return self.table.nbytes

    def with_limit(self, n: int) -> Source:
        """The first ``n`` rows of the table only."""
        if self.table.num_rows <= n:
            return self
        new = TableSource(self.table.slice(0, n), self.num_partitions, self.label)
        new.columns = self.columns
        return new

    def statistics(self) -> SourceStatistics | None:
        """Exact row count; min/max/null counts/sizes and distinct counts of the columns read
        (exact for small tables, estimated from a sample for large ones), computed once."""
        names = self.columns if self.columns is not None else self.table.column_names
        cols = {}
        for name in names:
            if name not in self._stats_box:
                self._stats_box[name] = column_statistics(self.table.column(name))
            cols[name] = self._stats_box[name]
        return SourceStatistics(self.table.num_rows, cols)

    def fingerprint(self) -> Any:
        """Equal for sources over the same table object, columns and partitioning."""
        return ("memory", id(self.table), None if self.columns is None else tuple(self.columns),
                self.num_partitions)

    def schema(self) -> pa.Schema:
        """The table's schema (only the pushed columns, when a projection was pushed)."""
        schema = self.table.schema
        return schema if self.columns is None else pa.schema([schema.field(c)
                                                              for c in self.columns])

    def describe(self) -> str:
        cols = f" columns={self.columns}" if self.columns is not None else ""
        return f"{self.label} ({self.table.num_rows} rows){cols}"


class RangeSource(Source):
    """Integers ``start <= id < end`` in column ``id``, generated by the workers."""

    name = "range"
    rereads_cheaply = True
    runs_user_code = False

    def __init__(self, start: int, end: int, step: int = 1, num_partitions: int | None = None) -> None:
        if step == 0:
            raise ValueError("range step must not be 0")
        self.start, self.end, self.step = start, end, step
        self.num_partitions = num_partitions

    def _count(self) -> int:
        return max(0, len(range(self.start, self.end, self.step)))

    def plan_splits(self, target_splits: int) -> list[Split]:
        n = self._count()
        parts = self.num_partitions or max(1, min(target_splits, n // 10000 + 1))
        bounds = np.linspace(0, n, parts + 1).astype(np.int64)
        return [Split(i, (int(bounds[i]), int(bounds[i + 1])), int(bounds[i + 1] - bounds[i]) * 8,
                      f"ids {bounds[i]}-{bounds[i + 1]}") for i in range(parts)]

    def read_split(self, split: Split, ctx: TaskContext) -> Iterator[pa.RecordBatch]:
        lo, hi = split.info
        if lo == hi:
            yield pa.RecordBatch.from_arrays([pa.array([], pa.int64())], names=["id"])
            return
        for s in range(lo, hi, ctx.batch_size):
            e = min(hi, s + ctx.batch_size)
            ids = self.start + np.arange(s, e, dtype=np.int64) * self.step
            # the array over the numpy buffer, as pa.array(ids) makes it (which imports
            # numpy.ma: a tenth of a small job's time)
            arr = pa.Array.from_buffers(pa.int64(), len(ids), [None, pa.py_buffer(ids)])
            yield pa.RecordBatch.from_arrays([arr], names=["id"])

    def estimated_size_bytes(self) -> int | None:
        return self._count() * 8

    def with_limit(self, n: int) -> Source:
        """The first ``n`` integers only."""
        if self._count() <= n:
            return self
        return RangeSource(self.start, self.start + n * self.step, self.step, self.num_partitions)

    def statistics(self) -> SourceStatistics | None:
        """Exact: ``id`` is unique, between the first and the last value."""
        n = self._count()
        ends = (self.start, self.start + (n - 1) * self.step) if n else (None, None)
        return SourceStatistics(n, {"id": ColumnStatistics(min(ends) if n else None,
                                                           max(ends) if n else None,
                                                           0, n, 8 * n)})

    def fingerprint(self) -> Any:
        return ("range", self.start, self.end, self.step, self.num_partitions)

    def schema(self) -> pa.Schema:
        """One column ``id: int64``."""
        return pa.schema([("id", pa.int64())])

    def describe(self) -> str:
        return f"range({self.start}, {self.end}, {self.step})"


def column_statistics(column: pa.ChunkedArray) -> ColumnStatistics:
    """Min, max, null count, size and distinct count of an in-memory column (None where
    the type has no order or the kernels cannot compute it)."""
    n = len(column)
    lo = hi = None
    try:
        mm = pc.min_max(column)
        lo, hi = mm["min"].as_py(), mm["max"].as_py()
    except (pa.ArrowException, TypeError, ValueError):
        pass
    distinct = None
    try:
        if n <= EXACT_DISTINCT_ROWS:
            distinct = int(pc.count_distinct(column).as_py())
        else:
            distinct = _sampled_distinct(column)
    except (pa.ArrowException, TypeError, ValueError):
        pass
    return ColumnStatistics(lo, hi, column.null_count, distinct, column.nbytes)


def _sampled_distinct(column: pa.ChunkedArray) -> int:
    """The distinct count of a large column from a random sample: values seen once scale
    up with sqrt(N/n) (the GEE estimator), values seen more often count once."""
    n = len(column)
    rng = np.random.default_rng(7)
    idx = np.sort(rng.integers(0, n, DISTINCT_SAMPLE_ROWS))
    sample = column.take(pa.array(idx)).drop_null()
    if len(sample) == 0:
        return 0
    counts = pc.value_counts(sample).field("counts").to_numpy()
    once = int((counts == 1).sum())
    est = (n / len(sample)) ** 0.5 * once + (len(counts) - once)
    return int(min(n, max(len(counts), est)))
