"""The interfaces every source and sink implements, in batch and in streaming.

Batch: a *source* is planned on the driver (``plan_splits`` lists files and cuts them into
splits) and read on the workers (``read_split`` streams record batches of one split).
A *sink* is prepared and committed on the driver and written by the workers; the
output becomes visible all at once in ``commit`` (staging, then commit), and
``abort`` removes every trace of a failed job.

Streaming: ``Source.as_stream`` gives a :class:`StreamSource` (stable partitions, start
positions, a :class:`StreamReader` per partition whose ``position`` a checkpoint stores);
a bounded source becomes a stream that ends (:class:`BoundedStreamSource`). A streaming
sink follows :class:`StreamSink`: ``begin(epoch)``, ``write(batch)``, ``pre_commit(epoch)
-> handle`` at a checkpoint, ``commit(handle)`` once the checkpoint is complete (two-phase
commit, idempotent per handle), ``abort``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import pyarrow as pa

if TYPE_CHECKING:
    from millstream.core.context import TaskContext
    from millstream.expr.nodes import Expr


@dataclass(frozen=True)
class Split:
    """One unit of input read by one task: a file, a byte range, a row group set, a slice.

    ``info`` is source specific and must be picklable. ``size_bytes`` guides scheduling.
    """

    index: int
    info: Any
    size_bytes: int = 0
    description: str = ""


class Source(ABC):
    """A bounded, partitioned input."""

    #: Short name for explain() and progress, e.g. "parquet", "text".
    name: str = "source"

    @abstractmethod
    def plan_splits(self, target_splits: int) -> list[Split]:
        """Cut the input into about ``target_splits`` splits (driver side; may list files)."""

    @abstractmethod
    def read_split(self, split: Split, ctx: TaskContext) -> Iterator[pa.RecordBatch]:
        """Stream the record batches of one split (worker side).

        Honors ``self.columns`` and ``self.predicate`` when the source accepted them
        through ``with_pushdown``.
        """

    def with_pushdown(self, columns: list[str] | None, predicate: Expr | None
                      ) -> tuple[Source, bool, bool]:
        """Return (source, columns_applied, predicate_fully_applied).

        The optimizer calls this to push a projection and a filter into the scan. A
        source that cannot use them returns ``(self, False, False)``; a source that uses
        the predicate only to skip data (row groups) but may return non-matching rows
        returns ``predicate_fully_applied=False`` so the filter stays in the plan.
        """
        return self, False, False

    def estimated_size_bytes(self) -> int | None:
        """A cheap estimate of the data size (file sizes, in-memory size), or None."""
        return None

    def with_limit(self, n: int) -> Source:
        """A source whose rows begin with the first ``n`` rows of this one, in split order,
        and that reads less to give them (fewer splits or rows); ``self`` when it cannot
        stop early or already reads no more. The optimizer pushes ``limit(n)`` here (the
        limit itself stays above the scan)."""
        return self

    def schema(self) -> pa.Schema | None:
        """The schema of the rows read (after a pushed projection), when the source knows
        it cheaply (a file footer, an in-memory table, a given or already inferred schema);
        None otherwise. Must not read the data."""
        return None

    def describe(self) -> str:
        """One line for explain(): the source, its location and what was pushed into it."""
        return self.name

    #: Whether the input ends by itself (files, in-memory data). Streams (Kafka topics,
    #: watched directories, endless generators) say False and override ``as_stream``.
    bounded: bool = True
    #: True when a streaming job must run in this process (its data lives here).
    in_process_only: bool = False
    #: True when a streaming job should run on the inline executor unless told otherwise
    #: (a source fed by a test, whose rounds make results deterministic).
    prefers_inline: bool = False

    def as_stream(self, target_splits: int, stop_at_end: bool = False) -> StreamSource:
        """This source in a streaming job: by default its splits, read once, as partitions
        that end (``stop_at_end``: an unbounded source ends once it has caught up)."""
        return BoundedStreamSource(self, target_splits)


class Sink(ABC):
    """A bounded output committed atomically."""

    name: str = "sink"

    @abstractmethod
    def prepare(self, job_id: str) -> None:
        """Driver side, before any task runs: check the target (mode), create staging."""

    @abstractmethod
    def write_partition(self, batches: Iterator[pa.RecordBatch], ctx: TaskContext) -> Any:
        """Worker side: write one partition into staging; return a picklable commit message.

        Each attempt of a task writes to its own staging names, so a retried or
        speculative attempt never mixes with another; only the messages of the
        attempts that won reach ``commit``.
        """

    @abstractmethod
    def commit(self, messages: list[Any]) -> None:
        """Driver side, after all tasks succeeded: make the output visible, write _SUCCESS."""

    @abstractmethod
    def abort(self) -> None:
        """Driver side, after a failure: remove staging, leave the target as it was."""

    def describe(self) -> str:
        return self.name


# ============================================================================= streaming

class StreamReader:
    """Reads one source partition from a position; ``position`` is what a checkpoint stores."""

    position: Any = None
    #: An explicit watermark of this partition (µs), or None when the source has none.
    watermark: int | None = None
    #: True once a bounded partition has delivered everything.
    finished: bool = False

    def poll(self, max_records: int, timeout_s: float) -> pa.RecordBatch | None:
        """The next rows (None when nothing is available now)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the reader's resources."""


class StreamSource:
    """Partitions, initial positions and readers of one source in a streaming job."""

    def partitions(self) -> list[Any]:
        """Stable partition ids."""
        raise NotImplementedError

    def start_positions(self) -> dict[Any, Any]:
        """Where a job without a checkpoint starts, per partition."""
        raise NotImplementedError

    def open(self, partition: Any, position: Any, ctx: TaskContext) -> StreamReader:
        """A reader of ``partition`` at ``position``."""
        raise NotImplementedError

    def prepare(self, positions: dict[Any, Any]) -> None:
        """Driver-side work before the partitions are opened elsewhere (no-op by default)."""


class _BoundedReader(StreamReader):
    """A batch split read as a stream; the position is the number of rows delivered."""

    def __init__(self, batches: Iterator[pa.RecordBatch], position: int) -> None:
        self._it = batches
        self._rest: pa.RecordBatch | None = None
        self.position = 0
        skip = int(position)
        while skip > 0:
            b = next(self._it, None)
            if b is None:
                break
            if b.num_rows > skip:
                self._rest = b.slice(skip)
                self.position += skip
                break
            skip -= b.num_rows
            self.position += b.num_rows

    def poll(self, max_records: int, timeout_s: float) -> pa.RecordBatch | None:
        while True:
            b = self._rest if self._rest is not None else next(self._it, None)
            self._rest = None
            if b is None:
                self.finished = True
                return None
            if not b.num_rows:
                continue
            if max_records and b.num_rows > max_records:
                self._rest = b.slice(max_records)
                b = b.slice(0, max_records)
            self.position += b.num_rows
            return b


class BoundedStreamSource(StreamSource):
    """Any batch :class:`Source` (files, in-memory data) as a stream that ends."""

    def __init__(self, source: Source, target_splits: int) -> None:
        self.source = source
        self.splits = source.plan_splits(target_splits)

    def partitions(self) -> list[Any]:
        return list(range(len(self.splits)))

    def start_positions(self) -> dict[Any, Any]:
        return {p: 0 for p in self.partitions()}

    def open(self, partition: Any, position: Any, ctx: TaskContext) -> StreamReader:
        return _BoundedReader(iter(self.source.read_split(self.splits[partition], ctx)),
                              int(position))


@runtime_checkable
class StreamSink(Protocol):
    """What a streaming job writes to, exactly once per epoch (two-phase commit).

    Optional members a sink may have: ``open()``/``close()``; ``for_subtask(i)`` (a copy
    for parallel instance ``i``, written in the tasks: without it the sink runs in the
    driver, fed with each epoch's rows); ``commits_in_subtask`` (its instances commit in
    their own task, e.g. a Kafka transaction); ``recommit_on_restore = False`` (a handle
    cannot be committed again after a restart); ``retire_instances(indexes)``;
    ``changelog_mode`` (what results it takes, see ``core.changelog``: "append" when
    absent, inserts only; "retract": every change, each row's kind in the hidden column
    ``core.changelog.CHANGE``; "upsert": changes of rows keyed by its ``upsert_keys``,
    ``core.changelog.upserts`` gives the last change per key). A streaming job refuses
    a sink that cannot take its result.
    """

    def begin(self, epoch: int) -> None:
        """Start ``epoch``; discard what an unfinished earlier attempt of it wrote."""

    def write(self, batch: pa.RecordBatch) -> None:
        """Rows of the current epoch (not yet visible)."""

    def pre_commit(self, epoch: int) -> Any:
        """Make the epoch durable but invisible; the picklable handle goes into the checkpoint."""

    def commit(self, handle: Any) -> None:
        """Make a pre-committed epoch visible (idempotent: may be called again after a crash)."""

    def abort(self, handle: Any = None) -> None:
        """Drop the current epoch's rows."""
