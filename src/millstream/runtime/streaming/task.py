"""A long-lived streaming task: one stage partition's operator chain, fed by channels.

A streaming job (:mod:`millstream.runtime.streaming.job`) runs one :class:`StreamTask` per
stage partition for the life of the job, stepped by the task slot that holds it
(:mod:`~millstream.runtime.streaming.slot`: all tasks in one slot in the driver for the
inline executor, a slot per worker process or Ray actor for the parallel one). A task
owns its operator instances and so their keyed state. It talks through a
:class:`Channels` object:

* its **inbox** (bounded: a producer blocks while it is full, which is the backpressure
  that slows a source down to the pace of the slowest consumer) carries, per sender,
  in order: ``("data", sender, port, batch)``, ``("wm", sender, watermark, idle)``,
  ``("end", sender)`` (a bounded input ended) and ``("barrier", sender, epoch, final)``;
* its **control** queue (from the coordinator): ``("barrier", epoch, final)`` for source
  tasks, ``("commit", epoch)`` for sinks that commit in their task (Kafka transactions);
* the **coordinator** queue: acknowledgements with snapshots, side outputs, rows for a
  sink that runs in the driver, metrics, errors.

Checkpoints are asynchronous barrier snapshots (Chandy-Lamport as Flink aligns them): a
source task snapshots its reader position and operators when the coordinator's barrier
arrives and forwards the barrier downstream; a task with several senders *aligns*: once
a sender delivered barrier ``e``, that sender's later messages wait in a local buffer
until every sender delivered ``e``; then the task snapshots, acknowledges, forwards the
barrier and replays the buffer. Watermarks are per sender; a task's watermark is the
minimum over senders that are neither idle nor ended.

Messages carry ``pyarrow.RecordBatch`` objects; hosts in other processes encode them on
the way (:mod:`~millstream.runtime.streaming.wire`).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

import pyarrow as pa

from millstream.core import lazy_pandas
from millstream.core.context import default_context
from millstream.core.time import MAX_WATERMARK, MIN_WATERMARK, Clock, WallClock
from millstream.ops.base import Operator, is_keyed_op
from millstream.ops.watermark import EventTimeWatermark
from millstream.runtime.checkpoint import BlobStore, externalize
from millstream.runtime.streaming.spec import (
    Channels,
    TaskSpec,
    close_quietly,
    counter_names,
    state_bytes,
)

_log = logging.getLogger(__name__)

#: Metrics go to the coordinator at most this often (s).
METRICS_EVERY_S = 0.25
#: Rows of queued input messages processed as one batch by an inner task.
COALESCE_ROWS = 65_536


class StreamTask:
    """Runs one :class:`TaskSpec`: :meth:`open`, then :meth:`step` calls from its slot
    (:mod:`~millstream.runtime.streaming.slot`) until it is ``stopped`` by its final
    barrier, then :meth:`close`."""

    def __init__(self, spec: TaskSpec, channels: Channels, clock: Clock | None = None) -> None:
        lazy_pandas.ensure_for_task()
        self.spec = spec
        self.ch = channels
        self.clock = clock or spec.clock or WallClock()
        self.ctx = default_context(job_id=spec.job_id, stage_id=spec.stage_id,
                                   partition=spec.key[2], stage_name=spec.stage_name,
                                   **spec.settings)
        self.ops: list[Operator] = [f.create() for f in spec.ops]
        self.epoch = spec.epoch
        self.watermark = MIN_WATERMARK
        self.sender_wm: dict[int, int] = {s: MIN_WATERMARK for s in spec.senders}
        self.idle: set[int] = set()
        self.ended: set[int] = set()
        self.blocked: set[int] = set()
        self.buffer: deque[tuple] = deque()
        self.finished = False
        #: the final barrier was handled: the task has nothing more to do
        self.stopped = False
        # senders on input ports the first operator leaves out of its watermark (a
        # changelog side of a latest-value join)
        ports = getattr(self.ops[0], "watermark_inputs", None) if self.ops else None
        self.no_watermark = ({s for s, p in spec.sender_ports.items() if p not in ports}
                             if ports is not None else set())
        self.stats: dict[str, list[int]] = {}
        self.records_in = 0
        self.records_out = 0
        self._last_metrics = 0.0
        self._sink = spec.output.sink if spec.output.kind == "sink" else None
        self.reader: Any = None
        self.assigner: EventTimeWatermark | None = None
        self.last_active = 0
        self._idle_sent = False
        self._active_sent = False
        self._read_sent = False
        self._wm_sent = MIN_WATERMARK  # the watermark consumers last heard of
        self._wm_sent_at = 0.0
        self._blobs: set[str] = set()  # shared blobs of this task's last checkpoint
        self.state_sizes: dict[str, int] = {}  # per operator, at the last checkpoint
        self._blob_store = BlobStore(*spec.checkpoint) if spec.checkpoint is not None else None
        #: a message read while gathering data messages, handled next
        self._ahead: tuple | None = None
        #: (epoch, sink handle, final) while waiting for the coordinator's commit
        self._awaiting_commit: tuple[int, Any, bool] | None = None
        #: when the first barrier of the checkpoint being aligned arrived (perf_counter)
        self._align_start: float | None = None

    # ------------------------------------------------------------------ setup

    def open(self) -> None:
        """Open the operators, restore their state, open the sink and the source reader."""
        for op in self.ops:
            timers = getattr(op, "timers", None)
            if timers is not None and hasattr(timers, "clock"):
                timers.clock = self.clock
            op.open(self.ctx)
        store = self._blob_store
        for k, (kind, data) in self.spec.restore.items():
            op = self.ops[k]
            if kind == "keyed":  # its blobs were left for this task to read (see read())
                if getattr(op, "restores_key_groups_lazily", False) and store is not None:
                    op.restore_key_groups(data, load=store.resolve)  # a group at a time
                else:
                    op.restore_key_groups(store.resolve(data) if store is not None else data)
            elif data is not None:
                op.restore(data)
        if self._sink is not None:
            if hasattr(self._sink, "open"):
                self._sink.open()
            self._sink.begin(self.epoch)
        if self.spec.source is not None:
            src, partition, position = self.spec.source
            self.reader = src.open(partition, position, self.ctx)
            self._reader_begin()
            self.assigner = next((op for op in self.ops if isinstance(op, EventTimeWatermark)),
                                 None)
            self.last_active = self.clock.now()
        wm = self.spec.watermark
        for op in self.ops:  # a window combiner starts at the job's (restored) watermark
            start = getattr(op, "start_watermark", None)
            if start is not None and self.spec.combine:
                start(wm)
        if MIN_WATERMARK < wm < MAX_WATERMARK:  # keyed operators that got no state catch up
            for k, op in enumerate(self.ops):
                if is_keyed_op(op) and op.watermark < wm:
                    self._emit(k + 1, op.on_watermark(wm))
            if not self.spec.senders:
                self.watermark = wm

    def close(self) -> None:
        """Release the reader, the operators' resources and the sink."""
        close_quietly(self.reader, "a reader")
        for op in self.ops:
            close_quietly(op, op.name)
        close_quietly(self._sink, "the sink")

    # ------------------------------------------------------------------ data flow

    def _count(self, op: Operator, rows_in: int, rows_out: int) -> None:
        s = self.stats.setdefault(op.name, [0, 0])
        s[0] += rows_in
        s[1] += rows_out

    def _run(self, batches: list[pa.RecordBatch], start: int = 0, port: int = 0) -> None:
        """Push ``batches`` through the operators from ``start`` on, then to the output."""
        for k in range(start, len(self.ops)):
            op = self.ops[k]
            nxt: list[pa.RecordBatch] = []
            for b in batches:
                nxt.extend(op.process(b, port) if k == start else op.process(b))
            rows_in = sum(b.num_rows for b in batches)
            batches = [b for b in nxt if b.num_rows]
            self._count(op, rows_in, sum(b.num_rows for b in batches))
            if not batches:
                break
        else:
            self._output(batches)
        self._side_outputs()

    def _emit(self, start: int, batches: Iterable[pa.RecordBatch]) -> None:
        """Results an operator produced on its own (watermark, timer, finish) go on from it,
        a batch at a time (a large window firing is never held whole)."""
        for b in batches:
            if b.num_rows:
                self._count(self.ops[start - 1], 0, b.num_rows)
                self._run([b], start)

    def _mark_active(self, read: bool = False) -> None:
        """Tell the coordinator this epoch has something to checkpoint (it skips idle ones):
        input read, output written, or the watermark moved; and, once, that a source read
        rows in it (``read``)."""
        if read and not self._read_sent:
            self._read_sent = self._active_sent = True
            self.ch.to_coordinator(("active", self.spec.index, self.epoch, True))
        elif not self._active_sent:
            self._active_sent = True
            self.ch.to_coordinator(("active", self.spec.index, self.epoch, False))

    def _output(self, batches: list[pa.RecordBatch]) -> None:
        out = self.spec.output
        self._mark_active()
        for b in batches:
            if not b.num_rows:
                continue
            if out.kind == "sink":
                self._sink.write(b)
                self.records_out += b.num_rows
            elif out.kind == "driver":
                self.ch.to_coordinator(("out", self.spec.index, self.epoch, b))
                self.records_out += b.num_rows
            else:
                for route in out.routes():
                    for dest, part in route.route(b):
                        self.ch.send(dest, ("data", self.spec.index, route.port, part))

    def _broadcast(self, msg: tuple) -> None:
        """Send a control record (watermark, end, barrier) to every consumer."""
        if self.spec.output.kind == "exchange":
            for route in self.spec.output.routes():
                for c in route.consumers:
                    self.ch.send(c, msg)

    def _side_outputs(self) -> None:
        for op in self.ops:
            take = getattr(op, "take_side_output", None)
            if take is None:
                continue
            tags = getattr(op, "side_outputs", None)
            if tags is None:
                tags_fn = getattr(op, "side_output_tags", None)
                tags = tags_fn() if tags_fn is not None else ()
            for tag in list(tags):
                got = take(tag)
                if got:
                    self.ch.to_coordinator(("side", self.spec.index, self.epoch, tag, list(got)))

    def _advance(self, wm: int) -> None:
        """The task's watermark moved to ``wm``: operators react, consumers hear of it."""
        if wm <= self.watermark:
            return
        self.watermark = wm
        self._mark_active()
        for k, op in enumerate(self.ops):
            self._emit(k + 1, op.on_watermark(wm))
        self._send_watermark(force=wm == MAX_WATERMARK)

    def _send_watermark(self, force: bool = False) -> None:
        """Tell consumers the watermark, at most every ``watermark_interval_s`` (a message
        per batch would cost as much as the batch); the end of input and barriers force it."""
        if self._wm_sent >= self.watermark:
            return
        now = time.monotonic()
        if force or now - self._wm_sent_at >= self.spec.watermark_interval_s:
            self._wm_sent, self._wm_sent_at = self.watermark, now
            self._broadcast(("wm", self.spec.index, self.watermark, False))

    def _tick(self) -> None:
        for k, op in enumerate(self.ops):
            fn = getattr(op, "advance_processing_time", None)
            if fn is not None:
                self._emit(k + 1, fn())
        self._send_watermark()
        now = time.monotonic()
        if now - self._last_metrics >= METRICS_EVERY_S:
            self._report()

    def _report(self) -> None:
        self._last_metrics = time.monotonic()
        self.ch.to_coordinator(("metrics", self.spec.index, {
            "operators": {n: list(v) for n, v in self.stats.items()},
            "watermark": self.watermark, "records_in": self.records_in,
            "state_bytes": dict(self.state_sizes), "counters": counter_names(self.ctx.counters),
            "records_out": self.records_out, "idle": self._idle_sent,
            # time blocked sending to full inboxes (backpressure), if the channels measure it
            "blocked_s": getattr(self.ch, "blocked_s", 0.0),
            "position": self.reader.position if self.reader is not None else None}))

    def _finish(self) -> None:
        """Every input ended: watermark +infinity, ``finish()``, tell consumers."""
        if self.finished:
            return
        self._advance(MAX_WATERMARK)
        for k, op in enumerate(self.ops):
            self._emit(k + 1, op.finish())
        self.finished = True
        self._broadcast(("end", self.spec.index))

    # ------------------------------------------------------------------ checkpoints

    def _snapshot(self, epoch: int, final: bool) -> None:
        """Snapshot operators (and the source position), pre-commit the sink, acknowledge."""
        ops: dict[int, Any] = {}
        keyed: dict[int, dict[int, Any]] = {}
        used: set[str] = set()
        sizes: dict[str, int] = {}
        group_sizes: dict[str, dict[int, int]] = {}  # per operator and key group
        blob_bytes = 0
        aligned_s = (time.perf_counter() - self._align_start
                     if self._align_start is not None else 0.0)
        self._align_start = None
        for k, op in enumerate(self.ops if self.spec.checkpoint is not None else ()):
            # (no checkpoint location: epochs only commit the sink, nothing is snapshotted)
            # large values become shared blobs; unchanged ones since the last checkpoint
            # travel as references only (incremental checkpoints)
            groups = getattr(op, "iter_key_group_snapshots", None)
            if self.spec.key_grouped and is_keyed_op(op) and groups is not None \
                    and self._blob_store is not None:
                # one key group at a time, written out before the next (state that spilled
                # never has to fit in memory whole)
                keyed[k] = {}
                for g, snap in groups(self.spec.key_groups):
                    keyed[k][g] = externalize(snap, self._blobs, used)
                    blob_bytes += self._blob_store.put(keyed[k][g])
                    size = state_bytes(snap)
                    sizes[op.name] = sizes.get(op.name, 0) + size
                    group_sizes.setdefault(op.name, {})[g] = size
                continue
            if self.spec.key_grouped and is_keyed_op(op):
                snap = op.snapshot_by_key_group(self.spec.key_groups)
                keyed[k] = externalize(snap, self._blobs, used)
            else:
                snap = op.snapshot()
                ops[k] = externalize(snap, self._blobs, used)
            sizes[op.name] = sizes.get(op.name, 0) + state_bytes(snap)
        self._blobs = used
        self.state_sizes = sizes
        if self._blob_store is not None:  # large values go to storage from here, not via the driver
            blob_bytes += self._blob_store.put(ops) + self._blob_store.put(keyed)
        handle = self._sink.pre_commit(epoch) if self._sink is not None else None
        # what the reader wrote itself (dead letters) is committed with the checkpoint too
        pre_commit = getattr(self.reader, "pre_commit", None)
        source_handle = pre_commit(epoch) if pre_commit is not None else None
        self._side_outputs()
        self.ch.to_coordinator(("ack", self.spec.index, epoch, {
            "ops": ops, "keyed": keyed, "sink_handle": handle, "source_handle": source_handle,
            "position": self.reader.position if self.reader is not None else None,
            "watermark": self.watermark, "finished": self.finished,
            "blob_bytes": blob_bytes, "alignment_s": aligned_s, "state_groups": group_sizes}))
        self._report()
        self._send_watermark(force=True)
        self._broadcast(("barrier", self.spec.index, epoch, final))
        if self._sink is not None and getattr(self._sink, "commits_in_subtask", False):
            # the sink commits here once the coordinator has the complete checkpoint
            self._awaiting_commit = (epoch, handle, final)
            return
        self._epoch_done(epoch, final)

    def _epoch_done(self, epoch: int, final: bool) -> None:
        self.epoch = epoch + 1
        self._active_sent = self._read_sent = False
        if final:
            self.stopped = True
            return
        if self._sink is not None:
            self._sink.begin(self.epoch)
        self._reader_begin()

    def _reader_begin(self) -> None:
        begin = getattr(self.reader, "begin", None)
        if begin is not None:
            begin(self.epoch)

    def _commit_step(self, wait: float) -> bool:
        """While the sink's commit is pending, only the coordinator's commit (or shutdown)
        counts; True once the commit is done."""
        msg = self.ch.recv_control(wait)
        while msg is not None:
            if msg[0] == "commit" and msg[1] == self._awaiting_commit[0]:
                epoch, handle, final = self._awaiting_commit
                self._awaiting_commit = None
                self._sink.commit(handle)
                self.ch.to_coordinator(("committed", self.spec.index, epoch))
                self._epoch_done(epoch, final)
                if not self.stopped:
                    self._replay()
                return True
            if msg[0] == "shutdown":
                self.stopped = True
                return True
            msg = self.ch.recv_control(0.0)
        return False

    # ------------------------------------------------------------------ loops

    def step(self, wait: float = 0.0) -> bool:
        """Do what is ready: control messages, then one poll of the source (a source task)
        or one run of queued input (an inner task); wait up to ``wait`` seconds for input.
        True when something was done."""
        if self._awaiting_commit is not None:
            return self._commit_step(wait)
        did = self._control()
        if self.stopped or self._awaiting_commit is not None:
            return True
        if self.spec.source is not None:
            return self._source_step(wait) or did
        return self._inner_step(wait) or did

    def control_step(self) -> bool:
        """Only the coordinator's messages (barriers, commits), no input; True if any."""
        if self._awaiting_commit is not None:
            return self._commit_step(0.0)
        return self._control()

    def _control(self, timeout: float = 0.0) -> bool:
        msg = self.ch.recv_control(timeout)
        did = False
        while msg is not None:
            did = True
            if msg[0] == "barrier":
                self._snapshot(msg[1], msg[2])
                if self.stopped or self._awaiting_commit is not None:
                    return True
            elif msg[0] == "shutdown":
                self.stopped = True
                return True
            msg = self.ch.recv_control(0.0)
        return did

    def _source_watermark(self) -> None:
        r = self.reader
        if r.finished:
            return
        w = r.watermark if r.watermark is not None else MIN_WATERMARK
        if self.assigner is not None:
            w = max(w, self.assigner.watermark())
            idle = self.assigner.idle_timeout
            is_idle = idle is not None and self.clock.now() - self.last_active >= idle
            if is_idle != self._idle_sent:  # consumers leave an idle partition out
                self._idle_sent = is_idle
                self._broadcast(("wm", self.spec.index, self.watermark, is_idle))
        self._advance(w)

    def _source_step(self, wait: float) -> bool:
        did = self.poll_source(wait)
        return self.source_watermark() or did

    def poll_source(self, wait: float = 0.0) -> bool:
        """Read one batch of the source and push it through (no watermark yet); True when
        rows were read."""
        spec = self.spec
        if self.finished:
            if wait:
                return self._control(wait)
            return False
        batch = self.reader.poll(spec.max_batch_records, spec.poll_timeout_s)
        did = False
        if batch is not None and batch.num_rows:
            did = True
            self.records_in += batch.num_rows
            self.last_active = self.clock.now()
            if self._idle_sent:
                self._idle_sent = False
                self._broadcast(("wm", spec.index, self.watermark, False))
            self._mark_active(read=True)
            self._run([batch])
        self._tick()
        return did

    def source_watermark(self) -> bool:
        """After a read: the source's watermark moves (or its end is announced); True at
        the end of input."""
        if self.finished or self.stopped or self._awaiting_commit is not None:
            return False
        if self.reader.finished:
            self._finish()
            self.ch.to_coordinator(("ended", self.spec.index))
            return True
        self._source_watermark()
        return False

    def _input_watermark(self) -> int:
        counted = {s: w for s, w in self.sender_wm.items() if s not in self.no_watermark}
        marks = [w for s, w in counted.items() if s not in self.idle]
        if marks:
            return min(marks)
        # every sender idle: the largest watermark any of them reached (as Flink does), so
        # a partition that went quiet first is not held back by one that went quiet later
        return max([self.watermark, *counted.values()])

    def _handle(self, msg: tuple) -> None:
        kind, sender = msg[0], msg[1]
        if kind == "data":
            self._data([msg[3]], msg[2])
        elif kind == "wm":
            self.sender_wm[sender] = max(self.sender_wm[sender], msg[2])
            if msg[3]:
                self.idle.add(sender)
            else:
                self.idle.discard(sender)
            self._advance(self._input_watermark())
        elif kind == "end":
            self.ended.add(sender)
            self.sender_wm[sender] = MAX_WATERMARK
            self.idle.discard(sender)
            if len(self.ended) == len(self.sender_wm):
                self._finish()
            else:
                self._advance(self._input_watermark())
        elif kind == "barrier":
            if not self.blocked:
                self._align_start = time.perf_counter()
            self.blocked.add(sender)
            if len(self.blocked) == len(self.sender_wm):
                self.blocked.clear()
                self._snapshot(msg[2], msg[3])
                if not self.stopped and self._awaiting_commit is None:
                    self._replay()
        else:  # pragma: no cover - protocol error
            raise RuntimeError(f"unknown stream message {kind!r}")

    def _replay(self) -> None:
        """Messages that arrived behind a barrier, in order, now that it is aligned."""
        pending, self.buffer = self.buffer, deque()
        while pending:
            m = pending.popleft()
            if m[1] in self.blocked or self.stopped or self._awaiting_commit is not None:
                self.buffer.append(m)
            else:
                self._handle(m)

    def _data(self, batches: list[pa.RecordBatch], port: int) -> None:
        """Input rows on ``port``: one batch through the operators (merged when several)."""
        rows = sum(b.num_rows for b in batches)
        self.records_in += rows
        if len(batches) > 1:
            try:
                batches = pa.Table.from_batches(batches).combine_chunks().to_batches()
            except (pa.ArrowInvalid, pa.ArrowTypeError):  # senders' schemas differ: one by one
                pass
        self._run(batches, 0, port)

    def _inner_step(self, wait: float) -> bool:
        msg, self._ahead = (self._ahead, None) if self._ahead is not None \
            else (self.ch.recv(wait), None)
        if msg is None:
            self._tick()
            return False
        if msg[1] in self.blocked:
            self.buffer.append(msg)
        elif msg[0] == "data":
            # data messages waiting in the inbox go through the operators together (up
            # to COALESCE_ROWS): per-call costs (a group-by per batch) are paid once;
            # per-sender order holds, and a watermark or barrier ends the run
            batches, port = [msg[3]], msg[2]
            rows = batches[0].num_rows
            while rows < COALESCE_ROWS:
                nxt = self.ch.recv(0.0)
                if nxt is None:
                    break
                if nxt[0] != "data" or nxt[2] != port or nxt[1] in self.blocked:
                    self._ahead = nxt
                    break
                batches.append(nxt[3])
                rows += batches[-1].num_rows
            self._data(batches, port)
        else:
            self._handle(msg)
        self._tick()
        return True
