"""A source of rows made by a Python function of the row index, optionally rate-limited.

``fn(i)`` returns the row (a dict) of index ``i``; partition ``p`` of ``P`` makes the
indices ``p, p + P, p + 2P, ...``. The position of a partition is how many rows it has
made, so a restored streaming job continues exactly where its checkpoint was taken.
With ``count`` the source is bounded (and can run in batch mode); without, it is endless.
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

    def _indices(self, partition: int, start: int, n: int) -> list[int]:
        out = []
        i = partition + start * self.num_partitions
        while len(out) < n and (self.count is None or i < self.count):
            out.append(i)
            i += self.num_partitions
        return out

    def _rows(self, indices: list[int]) -> pa.RecordBatch:
        rows = []
        for i in indices:
            try:
                rows.append(self.fn(i))
            except Exception as exc:
                raise UserCodeFailure("from_generator", getattr(self.fn, "__name__", "fn"), exc,
                                      f"index {i}") from exc
        return rows_to_batch(rows, self.row_schema)

    def plan_splits(self, target_splits: int) -> list[Split]:
        if self.count is None:
            raise PlanError("from_generator without count= is unbounded: run it with "
                            ".start(...) (streaming), or pass count=N for a batch job")
        return [Split(p, p, description=f"generator partition {p}")
                for p in range(self.num_partitions)]

    def read_split(self, split: Split, ctx: TaskContext) -> Iterator[pa.RecordBatch]:
        pos = 0
        while True:
            idx = self._indices(split.info, pos, ctx.batch_size)
            if not idx:
                return
            pos += len(idx)
            yield self._rows(idx)

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
                    n = min(n, int((time.monotonic() - self._t0) * per) - self._made)
                    if n <= 0:
                        return None
                idx = src._indices(self.partition, self.position, n)
                if not idx:
                    self.finished = src.count is not None
                    return None
                self.position += len(idx)
                self._made += len(idx)
                return src._rows(idx)

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
