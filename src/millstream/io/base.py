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
commit, idempotent per handle), ``abort``. A reader that writes something of its own (dead
letters) follows the same protocol: ``begin(epoch)``, and ``pre_commit(epoch)`` at the
barrier returns a handle that travels with the checkpoint and whose ``commit()`` the
coordinator calls once the checkpoint is complete.
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
class ColumnStatistics:
    """What a source knows of one column without reading it (Parquet footers, an in-memory
    table): Python ``min``/``max`` of the non-null values, ``null_count``,
    ``distinct_count`` and the ``data_bytes`` the column takes (uncompressed), each None
    when unknown. The optimizer's estimates (``plan/stats.py``) read them."""

    min: Any = None
    max: Any = None
    null_count: int | None = None
    distinct_count: int | None = None
    data_bytes: int | None = None


@dataclass(frozen=True)
class SourceStatistics:
    """A source's row count and column statistics, before ``predicates`` (filters pushed
    into the source that the counts do not reflect yet: the estimates apply them)."""

    num_rows: int
    columns: dict[str, ColumnStatistics]
    predicates: tuple[Any, ...] = ()


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

    def statistics(self) -> SourceStatistics | None:
        """Row count and column statistics known without reading the data (file footers,
        an in-memory table), or None. Driver side; may read metadata, never the rows."""
        return None

    def fingerprint(self) -> Any:
        """A hashable value equal for two sources that read the same rows, so the
        optimizer runs a sub-plan read twice once. By default the object's identity."""
        return ("source", id(self))

    def schema(self) -> pa.Schema | None:
        """The schema of the rows read (after a pushed projection), when the source knows
        it cheaply (a file footer, an in-memory table, a given or already inferred schema);
        None otherwise. Must not read the data."""
        return None

    def describe(self) -> str:
        """One line for explain(): the source, its location and what was pushed into it."""
        return self.name

    #: Whether reading the input again costs about what reading it once did (files with
    #: a columnar layout, in-memory data): the planner then re-reads it rather than
    #: materializing it for a second consumer.
    rereads_cheaply: bool = False
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

    def with_staged_dead_letters(self, ctx: TaskContext, skip: int = 0
                                 ) -> tuple[Source, Any] | None:
        """For a streaming reader: a copy of this source whose dead letters go to the
        returned output, which stages them per epoch (``begin``, ``pre_commit``, ``count``
        of records reported, the first ``skip`` dropped; see
        :class:`~millstream.io.files.dead_letters.StagedDeadLetters`). None when this
        source writes no dead letters."""
        return None


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

    def begin(self, epoch: int) -> None:
        """Epoch ``epoch`` starts (called after ``open`` and after each checkpoint)."""

    def pre_commit(self, epoch: int) -> Any:
        """At epoch ``epoch``'s barrier, with ``position``: make what the reader itself
        wrote in the epoch (dead letters) durable but invisible. Returns a picklable handle
        whose ``commit()`` (idempotent) the coordinator calls once the checkpoint is
        complete, or None."""
        return None


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
    """A batch split read as a stream; the position is the number of rows delivered, and
    with staged dead letters ``(rows, dead letters reported)``."""

    def __init__(self, batches: Iterator[pa.RecordBatch], position: Any,
                 dead_letters: Any = None) -> None:
        self._it = batches
        self._rest: pa.RecordBatch | None = None
        self._dead = dead_letters
        self._rows = 0
        skip = int(position[0]) if isinstance(position, (tuple, list)) else int(position)
        while skip > 0:
            b = next(self._it, None)
            if b is None:
                break
            if b.num_rows > skip:
                self._rest = b.slice(skip)
                self._rows += skip
                break
            skip -= b.num_rows
            self._rows += b.num_rows

    @property  # type: ignore[override]
    def position(self) -> Any:
        return self._rows if self._dead is None else (self._rows, self._dead.count)

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
            self._rows += b.num_rows
            return b

    def begin(self, epoch: int) -> None:
        if self._dead is not None:
            self._dead.begin(epoch)

    def pre_commit(self, epoch: int) -> Any:
        return self._dead.pre_commit(epoch) if self._dead is not None else None

    def close(self) -> None:
        if self._dead is not None:
            self._dead.close()


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
        source, dead = self.source, None
        staged = source.with_staged_dead_letters(
            ctx, skip=position[1] if isinstance(position, (tuple, list)) else 0)
        if staged is not None:
            source, dead = staged
        return _BoundedReader(iter(source.read_split(self.splits[partition], ctx)), position,
                              dead)


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
