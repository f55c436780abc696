"""A source of rows made by a Python function of an index, optionally rate-limited.

``fn(i)`` returns the row (a dict) of index ``i`` — or, the fast path, a whole batch: an
Arrow record batch or table, a pandas or Polars DataFrame, or a dict of columns; then
``i`` counts batches. Partition ``p`` of ``P`` makes the indices ``p, p + P, p + 2P, ...``.
The position of a partition is how many indices it has made, so a restored streaming job
continues exactly where its checkpoint was taken. With ``count`` (rows, or batches) the
source is bounded (and can run in batch mode); without, it is endless. ``rate`` is rows
per second for all partitions together.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa

from millstream.core.arrow import rows_to_batch
from millstream.core.context import TaskContext
from millstream.errors import PlanError, UserCodeFailure
from millstream.io.base import Source, SourceStatistics, Split, StreamReader, StreamSource


class GeneratorSource(Source):
    """Rows ``fn(0), fn(1), ...`` at up to ``rate`` rows per second (all partitions together)."""

    name = "generator"

    def __init__(self, fn: Callable[[int], Any], rate: float | None = None,
                 count: int | None = None, partitions: int = 1,
                 schema: pa.Schema | None = None) -> None:
        if not callable(fn):
            raise PlanError(f"from_generator needs a function of the row index, got {fn!r}")
        if rate is not None and rate <= 0:
            raise PlanError(f"from_generator: rate must be positive rows/second, got {rate!r}")
        if count is not None and count < 0:
            raise PlanError(f"from_generator: count must be >= 0, got {count!r}")
        if partitions < 1:
            raise PlanError(f"from_generator: partitions must be >= 1, got {partitions!r}")
        self.fn = fn
        self.rate = rate
        self.count = count
        self.num_partitions = int(partitions)
        self.row_schema = schema
        self._makes_batches: bool | None = None

    def _indices(self, partition: int, start: int, n: int) -> list[int]:
        out = []
        i = partition + start * self.num_partitions
        while len(out) < n and (self.count is None or i < self.count):
            out.append(i)
            i += self.num_partitions
        return out

    def _call(self, i: int) -> Any:
        try:
            return self.fn(i)
        except Exception as exc:
            raise UserCodeFailure("from_generator", getattr(self.fn, "__name__", "fn"), exc,
                                  f"index {i}") from exc

    def _rows(self, indices: list[int]) -> pa.RecordBatch:
        """The rows (or the batches, when ``fn`` makes batches) of ``indices``."""
        made = [self._call(i) for i in indices]
        if made and _batch_like(made[0]):
            batches = [_as_batch(m, self.row_schema, i) for m, i in zip(made, indices)]
            if len(batches) == 1:
                return batches[0]
            return pa.Table.from_batches(batches).combine_chunks().to_batches()[0]
        return rows_to_batch(made, self.row_schema)

    def _make(self, partition: int, position: int, n: int) -> tuple[pa.RecordBatch | None, int]:
        """The next output of ``partition`` from ``position``: a batch of up to ``n`` rows
        (row mode) or one made batch (batch mode), and how many indices it used. Whether
        ``fn`` makes rows or batches is learnt from its first value (no extra call)."""
        if self._makes_batches is None:
            first = self._indices(partition, position, 1)
            if not first:
                return None, 0
            value = self._call(first[0])
            self._makes_batches = _batch_like(value)
            if self._makes_batches:
                return _as_batch(value, self.row_schema, first[0]), 1
            rest = self._indices(partition, position + 1, n - 1) if n > 1 else []
            rows = [value] + [self._call(i) for i in rest]
            return rows_to_batch(rows, self.row_schema), 1 + len(rest)
        idx = self._indices(partition, position, 1 if self._makes_batches else n)
        if not idx:
            return None, 0
        return self._rows(idx), len(idx)

    def plan_splits(self, target_splits: int) -> list[Split]:
        if self.count is None:
            raise PlanError("from_generator without count= is unbounded: run it with "
                            ".start(...) (streaming), or pass count=N for a batch job")
        return [Split(p, p, description=f"generator partition {p}")
                for p in range(self.num_partitions)]

    def read_split(self, split: Split, ctx: TaskContext) -> Iterator[pa.RecordBatch]:
        pos = 0
        while True:
            batch, used = self._make(split.info, pos, ctx.batch_size)
            if batch is None:
                return
            pos += used
            yield batch

    def schema(self) -> pa.Schema | None:
        """The schema given to the source (None: inferred from the rows made)."""
        return self.row_schema

    def statistics(self) -> SourceStatistics | None:
        """The row count of a bounded generator (nothing is known of the columns)."""
        return None if self.count is None else SourceStatistics(self.count, {})

    def fingerprint(self) -> Any:
        """Equal for generators of the same function, rate, count and partitions."""
        return ("generator", id(self.fn), self.rate, self.count, self.num_partitions,
                str(self.row_schema))

    @property
    def bounded(self) -> bool:  # type: ignore[override]
        """With ``count`` the rows end; without, the source is endless."""
        return self.count is not None

    def as_stream(self, target_splits: int, stop_at_end: bool = False) -> StreamSource:
        src = self

        class _Reader(StreamReader):
            def __init__(self, partition: int, position: int) -> None:
                self.partition = partition
                self.position = int(position)
                self._t0 = time.monotonic()
                self._made = 0

            def poll(self, max_records: int, timeout_s: float) -> pa.RecordBatch | None:
                n = max_records
                if src.rate is not None:
                    per = src.rate / src.num_partitions
                    allowed = int((time.monotonic() - self._t0) * per) - self._made
                    if allowed <= 0:
                        return None
                    n = min(n, allowed)  # (a made batch may go beyond it, once)
                out, used = src._make(self.partition, self.position, n)
                if out is None:
                    self.finished = src.count is not None
                    return None
                self.position += used
                self._made += out.num_rows
                return out

        class _Stream(StreamSource):
            def partitions(self) -> list[Any]:
                return list(range(src.num_partitions))

            def start_positions(self) -> dict[Any, Any]:
                return {p: 0 for p in range(src.num_partitions)}

            def open(self, partition: Any, position: Any, ctx: TaskContext) -> StreamReader:
                return _Reader(int(partition), int(position))

        return _Stream()

    def describe(self) -> str:
        rate = f", rate={self.rate}/s" if self.rate else ""
        count = f", count={self.count}" if self.count is not None else ""
        return f"generator({getattr(self.fn, '__name__', 'fn')}{rate}{count})"


def _batch_like(value: Any) -> bool:
    """Whether a generated value is a whole batch (not one row)."""
    if isinstance(value, (pa.RecordBatch, pa.Table)):
        return True
    module = type(value).__module__.split(".")[0]
    if module in ("pandas", "polars") and hasattr(value, "columns"):
        return True
    return isinstance(value, dict) and bool(value) and all(
        isinstance(v, (list, tuple, pa.Array, pa.ChunkedArray)) or type(v).__module__ ==
        "numpy" and getattr(v, "ndim", 0) == 1 for v in value.values())


def _as_batch(value: Any, schema: pa.Schema | None, index: int) -> pa.RecordBatch:
    """A generated batch as one Arrow record batch (of ``schema`` when given)."""
    if isinstance(value, pa.RecordBatch):
        batch = value
    elif isinstance(value, pa.Table):
        batch = value.combine_chunks().to_batches()[0] if value.num_rows else \
            pa.RecordBatch.from_pylist([], schema=value.schema)
    elif isinstance(value, dict):
        batch = pa.RecordBatch.from_pydict(value)
    elif type(value).__module__.split(".")[0] == "polars":
        table = value.to_arrow()
        batch = table.combine_chunks().to_batches()[0] if table.num_rows else \
            pa.RecordBatch.from_pylist([], schema=table.schema)
    else:  # pandas
        batch = pa.RecordBatch.from_pandas(value, preserve_index=False)
    from millstream.core.arrow import without_view_types

    plain = without_view_types(batch.schema)
    if plain is not None:
        batch = batch.cast(plain)
    if schema is not None and not batch.schema.equals(schema):
        try:
            batch = batch.select(schema.names).cast(schema)
        except (KeyError, pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise PlanError(f"from_generator: batch {index} does not fit the schema given "
                            f"({exc}); columns are {batch.schema.names}") from exc
    return batch
