"""Helpers for testing streaming pipelines: a source with explicit event times and watermarks,
a virtual clock, a collecting sink, and crash-and-restore of a running job.

    src = TestSource()
    src.add([{"k": "a", "ts": 1_000}], watermark=0)      # ts: epoch ms (or timestamps)
    src.advance_watermark(60_000_000)                     # watermarks: int µs or datetime
    src.close()                                           # the stream ends
    job = (src.dataset().with_watermark("ts", "0s")
           .group_by("k").window(ms.tumbling("1m"), on="ts").agg(ms.count().alias("n"))
           .start(sink=CollectingSink(), checkpoint=tmp, checkpoint_interval=0))
    job.await_termination(30)
    job.sink.rows()

Each ``add``/``advance_watermark`` call is one item of the partition; a streaming job
reads at most one data item per partition per round, so with ``checkpoint_interval=0``
every ``add`` is an epoch of its own (deterministic crash points).
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from millstream.core.arrow import rows_to_batch
from millstream.core.context import TaskContext
from millstream.core.time import VirtualClock
from millstream.errors import PlanError, SimulatedCrash
from millstream.io.base import Source, Split, StreamReader, StreamSource
from millstream.io.stream_sinks import CollectingSink
from millstream.runtime.streaming.job import StreamingJob

#: How long a test source read in another process waits for an item before it returns.
_REMOTE_WAIT_S = 0.01

__all__ = ["CollectingSink", "SimulatedCrash", "TestSource", "VirtualClock", "crash_and_restore",
           "to_micros"]


def to_micros(value: int | _dt.datetime) -> int:
    """A watermark as int64 µs since the epoch (ints pass through; naive datetimes are UTC)."""
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.timezone.utc)
        delta = value - _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
        return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlanError(f"a watermark is an int of epoch microseconds or a datetime, got {value!r}")
    return int(value)


def _as_batch(rows: Any, schema: pa.Schema | None) -> pa.RecordBatch:
    if isinstance(rows, pa.RecordBatch):
        return rows
    if isinstance(rows, pa.Table):
        return rows.combine_chunks().to_batches()[0] if rows.num_rows else \
            pa.RecordBatch.from_pylist([], schema=rows.schema)
    return rows_to_batch(list(rows), schema)


class TestSource(Source):
    """A source the test feeds: rows with explicit event times, explicit watermarks, an end.

    Usable in streaming jobs (positions are item indexes, so restores replay exactly) and,
    once closed, in batch jobs (every item's rows, per partition).
    """

    __test__ = False  # not a pytest test class
    name = "test"
    #: a streaming job runs it on the inline executor unless told otherwise (deterministic
    #: rounds); with ``executor="parallel"`` its tasks read the items from a shared directory
    prefers_inline = True

    def __init__(self, schema: pa.Schema | None = None, partitions: int = 1) -> None:
        if partitions < 1:
            raise PlanError(f"TestSource: partitions must be >= 1, got {partitions}")
        self.row_schema = schema
        self.num_partitions = int(partitions)
        self._items: list[list[tuple[pa.RecordBatch | None, int | None]]] = [
            [] for _ in range(self.num_partitions)]
        self._closed = False
        self._lock = threading.Lock()
        #: once pickled for a streaming task, items are also files here (other processes)
        self._dir: str | None = None
        #: this copy reads its items from ``_dir`` (it was sent to another process)
        self._remote = False

    def schema(self) -> pa.Schema | None:
        """The schema given to the source (None: each batch's own)."""
        return self.row_schema

    def _check(self, partition: int) -> None:
        if self._closed:
            raise PlanError("TestSource: add/advance_watermark after close()")
        if not 0 <= partition < self.num_partitions:
            raise PlanError(f"TestSource: no partition {partition} (it has "
                            f"{self.num_partitions})")

    def add(self, rows: Any, watermark: int | _dt.datetime | None = None,
            partition: int = 0) -> TestSource:
        """Append rows (dicts, an Arrow table or batch); then, optionally, a watermark (µs)."""
        self._check(partition)
        batch = _as_batch(rows, self.row_schema)
        wm = None if watermark is None else to_micros(watermark)
        with self._lock:
            self._items[partition].append((batch, wm))
            self._write_item(partition, len(self._items[partition]) - 1)
        return self

    def advance_watermark(self, watermark: int | _dt.datetime,
                          partition: int | None = None) -> TestSource:
        """Declare that no event with time <= ``watermark`` follows (one or every partition)."""
        parts = range(self.num_partitions) if partition is None else [partition]
        wm = to_micros(watermark)
        for p in parts:
            self._check(p)
            with self._lock:
                self._items[p].append((None, wm))
                self._write_item(p, len(self._items[p]) - 1)
        return self

    def close(self) -> TestSource:
        """End the stream: a streaming job finishes (watermark +infinity) once all is read."""
        with self._lock:
            self._closed = True
            if self._dir is not None:
                open(os.path.join(self._dir, "closed"), "w").close()
        return self

    @property
    def closed(self) -> bool:
        """True after ``close()``."""
        if self._remote:
            return os.path.exists(os.path.join(self._dir, "closed"))
        return self._closed

    # ------------------------------------------------------ items shared across processes
    def _item_path(self, partition: int, index: int) -> str:
        return os.path.join(self._dir, f"p{partition}-{index:09d}.arrow")

    def _write_item(self, partition: int, index: int) -> None:
        """Write item ``index`` of ``partition`` for other processes (once shared); a file
        appears whole (written aside, then renamed)."""
        if self._dir is None:
            return
        batch, wm = self._items[partition][index]
        if batch is None:
            batch = pa.RecordBatch.from_pylist([])
        meta = {b"watermark": b"" if wm is None else str(wm).encode(),
                b"has_rows": b"1" if self._items[partition][index][0] is not None else b"0"}
        schema = batch.schema.with_metadata(meta)
        tmp = self._item_path(partition, index) + ".tmp"
        with pa.OSFile(tmp, "wb") as f, pa.ipc.new_file(f, schema) as w:
            w.write_batch(batch.replace_schema_metadata(meta))
        os.replace(tmp, self._item_path(partition, index))

    def _share(self) -> None:
        """Start writing items to a directory other processes read (on first pickling)."""
        if self._dir is not None:
            return
        from millstream.runtime.session import get_session

        self._dir = tempfile.mkdtemp(prefix="testsource-", dir=get_session().scratch())
        weakref.finalize(self, shutil.rmtree, self._dir, True)
        for p, items in enumerate(self._items):
            for i in range(len(items)):
                self._write_item(p, i)
        if self._closed:
            open(os.path.join(self._dir, "closed"), "w").close()

    def _load(self, partition: int, upto: int | None = None) -> None:
        """Read the items other processes' ``add`` calls wrote (a remote copy)."""
        items = self._items[partition]
        while upto is None or len(items) <= upto:
            path = self._item_path(partition, len(items))
            if not os.path.exists(path):
                return
            with pa.memory_map(path) as f:
                reader = pa.ipc.open_file(f)
                batch = reader.get_batch(0)
                meta = reader.schema.metadata or {}
            wm = int(meta[b"watermark"]) if meta.get(b"watermark") else None
            has_rows = meta.get(b"has_rows", b"1") == b"1"
            items.append((batch.replace_schema_metadata(None) if has_rows else None, wm))

    def dataset(self) -> Any:
        """A Dataset reading this source."""
        from millstream.api.dataset import Dataset
        from millstream.plan.logical import Scan

        return Dataset(Scan(self))

    # --------------------------------------------------------------- batch
    def plan_splits(self, target_splits: int) -> list[Split]:
        splits = []
        for p in range(self.num_partitions):
            with self._lock:
                batches = [b for b, _ in self._items[p] if b is not None and b.num_rows]
            sink = pa.BufferOutputStream()
            if batches:
                table = pa.Table.from_batches(batches) if len({b.schema for b in batches}) == 1 \
                    else pa.concat_tables([pa.Table.from_batches([b]) for b in batches],
                                          promote_options="permissive")
                with pa.ipc.new_stream(sink, table.schema) as w:
                    w.write_table(table)
                splits.append(Split(p, sink.getvalue(), table.nbytes, f"test partition {p}"))
            else:
                splits.append(Split(p, None, 0, f"test partition {p} (empty)"))
        return splits

    def read_split(self, split: Split, ctx: TaskContext) -> Iterator[pa.RecordBatch]:
        if split.info is None:
            return
        yield from pa.ipc.open_stream(split.info)

    def __getstate__(self) -> dict[str, Any]:
        with self._lock:
            self._share()
            state = dict(self.__dict__)
        state["_lock"] = None
        # batch splits carry their data; streaming copies read the shared directory
        state["_items"] = [[] for _ in range(self.num_partitions)]
        state["_remote"] = True
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # --------------------------------------------------------------- streaming
    bounded = False

    def as_stream(self, target_splits: int, stop_at_end: bool = False) -> StreamSource:
        """The streaming view: one reader per partition, positions are item indexes."""
        return _TestStream(self)

    def _item(self, partition: int, index: int) -> tuple[pa.RecordBatch | None, int | None] | None:
        with self._lock:
            items = self._items[partition]
            if self._remote and index >= len(items):
                self._load(partition, index)
            return items[index] if index < len(items) else None

    def _length(self, partition: int) -> int:
        with self._lock:
            if self._remote:
                self._load(partition)
            return len(self._items[partition])

    def describe(self) -> str:
        return f"TestSource({self.num_partitions} partition(s))"


class _TestReader(StreamReader):
    def __init__(self, src: TestSource, partition: int, position: int) -> None:
        self.src = src
        self.partition = partition
        self.position = 0
        self.watermark = None
        while self.position < position:  # replay watermarks up to the restored position
            self._take()

    def _take(self) -> pa.RecordBatch | None:
        item = self.src._item(self.partition, self.position)
        if item is None:
            return None
        self.position += 1
        batch, wm = item
        if wm is not None:
            self.watermark = wm if self.watermark is None else max(self.watermark, wm)
        return batch

    def poll(self, max_records: int, timeout_s: float) -> pa.RecordBatch | None:
        deadline = None
        while True:
            if self.src._item(self.partition, self.position) is None:
                self.finished = self.src.closed and \
                    self.position >= self.src._length(self.partition)
                if self.finished or not self.src._remote or timeout_s <= 0:
                    return None
                # in a task process of its own (the parallel executor): wait a little for
                # the test to add an item instead of spinning; briefly, so that barriers
                # waiting behind this poll are not held up
                now = time.monotonic()
                if deadline is None:
                    deadline = now + min(timeout_s, _REMOTE_WAIT_S)
                if now >= deadline:
                    return None
                time.sleep(0.001)
                continue
            batch = self._take()
            if batch is not None and batch.num_rows:
                return batch


class _TestStream(StreamSource):
    def __init__(self, src: TestSource) -> None:
        self.src = src

    def partitions(self) -> list[Any]:
        return list(range(self.src.num_partitions))

    def start_positions(self) -> dict[Any, Any]:
        return {p: 0 for p in self.partitions()}

    def open(self, partition: Any, position: Any, ctx: TaskContext) -> StreamReader:
        return _TestReader(self.src, int(partition), int(position))


def crash_and_restore(dataset: Any, *, checkpoint: str, sink: Any, crash_epoch: int,
                      point: str = "after_checkpoint", timeout: float = 60.0,
                      **start_options: Any) -> StreamingJob:
    """Run ``dataset.start(...)`` until it crashes at ``point`` of epoch ``crash_epoch``, then
    start it again from its checkpoint and wait for the end; returns the restarted job.

    Points: "during_epoch" (rows of the epoch processed, nothing checkpointed),
    "before_checkpoint" (sink pre-committed), "after_checkpoint" (``_COMPLETE`` written,
    sink not committed), "after_commit". The crashed job does no cleanup, like a killed
    process.
    """
    first = dataset.start(checkpoint=checkpoint, sink=sink, _fault=(crash_epoch, point),
                          **start_options)
    try:
        first.await_termination(timeout)
    except SimulatedCrash:
        pass
    else:
        raise AssertionError(f"the job ended without reaching epoch {crash_epoch} ({point}); "
                             f"it took {first.metrics()['epoch'] - 1} epoch(s)")
    second = dataset.start(checkpoint=checkpoint, sink=sink, **start_options)
    if not second.await_termination(timeout):
        second.stop()
        raise AssertionError(f"the restarted job did not end within {timeout}s")
    return second
