"""The streaming scheduler (v1): runs a physical plan's pipelines continuously in the driver.

v1 departs from ``docs/streaming-design.md`` in one accepted way: every stage partition
(an operator chain per source partition, and one per shuffle partition of a key
exchange, by key group) runs in the driver process, on one thread, instead of in
sticky long-lived worker tasks. What the design fixes is kept:

* **Epochs.** Each *round* polls every source partition once (up to
  ``max_batch_records``), pushes the rows through the chains and the key exchanges,
  recomputes the watermark and drives ``on_watermark``. An *epoch* is the rounds
  between two checkpoints; a checkpoint is taken at a round boundary once
  ``checkpoint_interval`` has passed (and something changed).
* **Watermarks.** Per source partition: the larger of the source's explicit watermark
  (test sources) and ``max event time - delay`` of the partition's ``with_watermark``
  operator; a partition that delivered nothing for ``idle_timeout`` is left out of the
  minimum; an ended partition counts as +infinity. The job's watermark is that minimum,
  never decreasing. When every source has ended, operators get ``finish()``
  (watermark +infinity), as in batch mode.
* **Side outputs.** Late and invalid-time rows of window operators, and tagged rows of
  process functions, are drained after every round into ``job.late_records()`` /
  ``job.side_output(tag)``; never dropped silently.
* **Checkpoints** (:mod:`millstream.runtime.checkpoint`): source positions, every
  operator's ``snapshot()``, the job watermark and the sink's pre-commit handle of the
  epoch; then ``_COMPLETE``; then ``sink.commit(handle)``. A restart with the same
  checkpoint location restores the newest complete checkpoint, re-commits its sink
  handle (commits are idempotent), rewinds sources and continues with the next epoch.
* **Key groups.** A keyed exchange hashes the key columns
  (:func:`millstream.core.hashing.hash_columns`) into ``key_groups`` groups (default
  128, ``start(key_groups=...)`` or ``max_parallelism=...``; fixed by the first
  checkpoint) and sends group ``g`` to consumer chain ``g * parallelism // key_groups``.
  Keyed operators (windows with keys, process functions) checkpoint their state and
  timers per key group (``snapshot_by_key_group``), so a job restores at another
  parallelism: each new chain gets the union of the groups it owns
  (``restore_key_groups``). State that is not keyed (a window without keys) and source
  partitions that change refuse a rescaled restore with a :class:`CheckpointError`.
* **Joins.** A chain may have two inputs (a stream join: ``interval_join``,
  ``window_join``, ``join_latest``): both are keyed exchanges by the hidden normalized
  key columns :class:`~millstream.ops.stream_join.JoinKeys` adds, so equal keys reach the
  same key group whatever their types; each batch goes to ``op.process(batch, port)``
  with the port of the exchange it came through. The changelog input of ``join_latest``
  (an operator's ``watermark_inputs`` leaves it out) does not count in the job's
  watermark. A ``join`` with a bounded dataset is planned with
  ``PlannerSettings(streaming=True)``: :func:`resolve_broadcast_tables` computes the
  bounded side once (a batch job) when the job starts and every chain joins against it.
* **Sinks** follow ``begin(epoch)``, ``write(batch)``, ``pre_commit(epoch) -> handle``,
  ``commit(handle)``, ``abort(handle)`` (the :class:`~millstream.io.kafka.KafkaSink`
  protocol). :class:`FileStreamSink` stages each epoch's files and moves them into the
  target at commit; :class:`CollectingSink` keeps committed rows in memory;
  :class:`CallbackSink` (``ms.sink(fn)``, or any function) calls ``fn`` with each
  committed epoch's rows and :class:`ConsoleSink` (``ms.console()``, ``sink="console"``)
  prints them; these three run in the driver (no ``for_subtask``).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

import numpy as np
import pyarrow as pa

from millstream.core.arrow import batch_to_rows, concat_batches
from millstream.core.context import TaskContext, default_context
from millstream.core.hashing import split_by_partition
from millstream.core.keygroups import DEFAULT_KEY_GROUPS, key_group_owners, key_hashes
from millstream.core.shuffle import HashPartitioner
from millstream.core.time import MAX_WATERMARK, MIN_WATERMARK, Clock, WallClock
from millstream.core.units import parse_duration
from millstream.errors import MillstreamError, PlanError, StreamingError
from millstream.io.base import StreamReader, StreamSource
from millstream.io.stream_sinks import make_sink
from millstream.ops.base import Operator, OperatorFactory, is_keyed_op
from millstream.ops.state.process import KeyedProcess
from millstream.ops.watermark import EventTimeWatermark
from millstream.ops.window import WindowAggregate
from millstream.plan import logical as L
from millstream.plan.compile import compile_plan, streaming_settings
from millstream.plan.physical import (
    PlannerSettings,
    ShufflePort,
    SourcePort,
    Stage,
    all_stages,
)
from millstream.runtime.checkpoint import (
    CheckpointError,
    CheckpointStore,
    RestoreTarget,
    plan_restore,
)
from millstream.runtime.stream_task import close_quietly, counter_names, state_bytes

_log = logging.getLogger(__name__)

#: Logical nodes a streaming job can run (the others need all their input first). A
#: ``Join`` runs when its right side is bounded (a stream-table join, see
#: :func:`_check_stream_table_join`).
_STREAMABLE = (L.Scan, L.Narrow, L.WithWatermark, L.WindowAggregate, L.KeyedProcess, L.Union,
               L.Repartition, L.IntervalJoin, L.WindowJoin, L.LatestJoin)
#: Join types a stream-table join can decide batch by batch.
_STREAM_TABLE_HOW = ("inner", "left", "semi", "anti")
#: Points where ``fault=(epoch, point)`` raises :class:`SimulatedCrash`.
FAULT_POINTS = ("during_epoch", "before_checkpoint", "after_checkpoint", "after_commit")


class SimulatedCrash(MillstreamError):
    """Raised inside a streaming job by fault injection (tests): the job dies at that point."""


# =============================================================================== the job


class _Chain:
    """The operator instances of one stage partition."""

    __slots__ = ("key", "stage", "ops", "index", "ctx", "is_source", "key_grouped")

    def __init__(self, key: tuple[int, int, int], stage: Stage, ops: list[Operator],
                 ctx: TaskContext, is_source: bool = False, key_grouped: bool = False) -> None:
        self.key = key
        self.stage = stage
        self.ops = ops
        self.index = key[2]
        self.ctx = ctx
        #: fed by a source partition (its state is restored per chain, with the position)
        self.is_source = is_source
        #: fed by a keyed exchange: owns the key groups ``owned_key_groups(index, ...)``
        self.key_grouped = key_grouped


def _keyed_exchange(stage: Stage) -> bool:
    """True when ``stage`` feeds its consumers by a hash of key columns (key groups)."""
    part = stage.partitioner
    return isinstance(part, HashPartitioner) and bool(part.keys)




class _SourcePart:
    """One source partition: its reader, its chain and its watermark bookkeeping."""

    __slots__ = ("source", "partition", "reader", "chain", "assigner", "last_active",
                 "in_watermark")

    def __init__(self, source: StreamSource, partition: Any, chain: _Chain) -> None:
        self.source = source
        self.partition = partition
        self.chain = chain
        self.reader: StreamReader | None = None
        self.assigner = next((op for op in chain.ops if isinstance(op, EventTimeWatermark)), None)
        self.last_active = 0
        #: counts in the job's watermark (not the changelog input of a latest join)
        self.in_watermark = True


def _unbounded_scans(node: L.Node) -> list[str]:
    """Descriptions of the stream sources below ``node``."""
    if isinstance(node, L.Scan):
        return [] if node.source.bounded else [node.source.describe()]
    return [d for c in node.children for d in _unbounded_scans(c)]


def _check_stream_table_join(node: L.Join) -> None:
    """A join in a streaming job: the right side must be bounded (it is broadcast)."""
    streams = _unbounded_scans(node.right)
    if streams:
        raise PlanError(
            f"{node.label()}: the right side reads the stream(s) {streams}; a streaming job "
            f"can join a stream only with a bounded dataset (files, in-memory data) on the "
            f"right. Join two streams with interval_join(...), window_join(...) or "
            f"join_latest(...), or swap the sides if the left one is the bounded one")
    if node.how not in _STREAM_TABLE_HOW:
        raise PlanError(
            f"{node.label()}: a {node.how} join of a stream with a table needs the end of the "
            f"stream; a streaming job supports how={', '.join(_STREAM_TABLE_HOW)} "
            f"(window_join/interval_join support right and outer joins of two streams)")


def _check_streamable(node: L.Node, stream_table_joins: bool = False) -> None:
    """Raise a PlanError when ``node`` cannot run as a stream.

    ``stream_table_joins``: the caller plans with ``PlannerSettings(streaming=True)`` and
    calls :func:`resolve_broadcast_tables`, so a ``join`` with a bounded dataset can run.
    """
    if isinstance(node, L.Join):
        if not stream_table_joins:
            raise PlanError(f"{node.label()}: a join of a stream with a bounded dataset runs "
                            f"only on the in-process executor in this version; start the "
                            f"job with executor='inline'")
        _check_stream_table_join(node)
        # the bounded right side runs as a batch job
        _check_streamable(node.left, stream_table_joins)
        return
    if not isinstance(node, _STREAMABLE):
        hint = " (use group_by(...).window(...).agg(...))" if isinstance(node, L.Aggregate) else ""
        raise PlanError(f"{node.label()} cannot run on an unbounded stream in this version"
                        f"{hint}; streamable: map/filter/select-style operations, "
                        f"with_watermark, window(...).agg(...), group_by(...).process(...), "
                        f"union, interval_join, window_join, join_latest, and join with a "
                        f"bounded dataset")
    for c in node.children:
        _check_streamable(c, stream_table_joins)


def compute_bounded(node: L.Node) -> pa.Table:
    """Run the bounded plan ``node`` as a batch job on the session's runner; its rows."""
    from millstream.core.shuffle import read_block
    from millstream.runtime.scheduler import Job
    from millstream.runtime.session import effective_settings, get_session

    settings = effective_settings({})
    session = get_session()
    session.get_runner(settings)
    ps = PlannerSettings(settings.resolved_shuffle_partitions(), settings.broadcast_threshold,
                         session.cache.get)
    job = Job(session, settings, compile_plan(node, ps, "blocks"))
    try:
        batches = [b for ref in job.run() for b in read_block(ref)]
        table = concat_batches(batches)
        return table.combine_chunks() if table.num_rows else table
    finally:
        job.cleanup()


def resolve_broadcast_tables(stages: list[Stage]) -> None:
    """Compute the bounded side of every stream-table join once and give it to its operators.

    Operator factories with a ``table_node`` (planned with ``PlannerSettings(streaming=
    True)``) are replaced, in place, by factories holding the computed ``table``.
    """
    tables: dict[int, pa.Table] = {}
    for stage in stages:
        for pipe in stage.pipelines:
            for i, f in enumerate(pipe.ops):
                node = f.kwargs.get("table_node") if isinstance(f.kwargs, dict) else None
                if node is None:
                    continue
                if id(node) not in tables:
                    started = time.perf_counter()
                    tables[id(node)] = compute_bounded(node)
                    _log.info("stream-table join: computed the bounded side (%d rows) in %.3fs",
                              tables[id(node)].num_rows, time.perf_counter() - started)
                kwargs = dict(f.kwargs)
                kwargs.pop("table_node")
                kwargs["table"] = tables[id(node)]
                pipe.ops[i] = OperatorFactory(f.cls, *f.args, **kwargs)


def key_groups_option(key_groups: int | None, max_parallelism: int | None) -> int | None:
    """The number of key groups a job asks for (the two names are one setting), or None."""
    if key_groups is not None and max_parallelism is not None and key_groups != max_parallelism:
        raise PlanError(f"key_groups ({key_groups}) and max_parallelism ({max_parallelism}) "
                        f"are the same setting; give one")
    wanted = key_groups if key_groups is not None else max_parallelism
    if wanted is not None and int(wanted) < 1:
        raise PlanError(f"key_groups must be a positive number, got {wanted!r}")
    return int(wanted) if wanted is not None else None


def task_budget(memory_limit: int | str | None) -> dict[str, int]:
    """TaskContext settings for a per-task ``memory_limit`` (bytes or "64MB"; None: the
    default 256 MiB): stateful operators keep half of it in memory and spill the rest."""
    from millstream.core.units import parse_size

    size = parse_size(memory_limit)
    if size is not None and size < 0:
        raise PlanError(f"memory_limit must be a positive size, got {memory_limit!r}")
    return {} if size is None else {"memory_budget": int(size)}


class JobHandle:
    """What both streaming executors' jobs offer: wait, stop, state, side outputs.

    Subclasses set ``job_id``, ``_thread``, ``_stop``, ``_done``, ``_error``, ``_lock`` and
    ``_side`` (committed side-output batches by tag).
    """

    job_id: str
    _thread: threading.Thread
    _stop: threading.Event
    _done: threading.Event
    _error: BaseException | None
    _lock: threading.Lock
    _side: dict[str, list[pa.RecordBatch]]

    def await_termination(self, timeout: float | None = None) -> bool:
        """Wait until the job ends (its sources ended, or stop()); re-raise its error.

        Returns False when ``timeout`` seconds passed first.
        """
        ended = self._done.wait(timeout)
        if ended and self._error is not None:
            raise self._error
        return ended

    def stop(self, timeout: float | None = 60.0) -> None:
        """Stop gracefully: take a final checkpoint, commit it, end (windows stay open)."""
        self._stop.set()
        if not self._done.wait(timeout):
            raise StreamingError(f"streaming job {self.job_id} did not stop within {timeout}s")
        if self._error is not None:
            raise self._error

    @property
    def is_active(self) -> bool:
        """True while the job runs."""
        return self._thread.is_alive()

    def exception(self) -> BaseException | None:
        """The error the job died of, if any."""
        return self._error

    def late_records(self) -> list[dict[str, Any]]:
        """Rows that arrived after their windows expired (the "late" side output)."""
        return self.side_output("late")

    def side_output(self, tag: str) -> list[dict[str, Any]]:
        """Rows of side output ``tag`` ("late", "invalid", or a process function's tag)."""
        with self._lock:
            batches = list(self._side.get(tag, []))
        return batch_to_rows(concat_batches(batches)) if batches else []


class StreamingJob(JobHandle):
    """A running streaming pipeline; see the module docstring."""

    def __init__(self, node: L.Node, checkpoint: str | None = None,
                 checkpoint_interval: str | int = "10s", sink: Any = None, *,
                 parallelism: int = 4, clock: Clock | None = None, stop_at_end: bool = False,
                 max_batch_records: int = 10_000, poll_timeout: str | int = "50ms",
                 storage_options: dict[str, Any] | None = None,
                 fault: tuple[int, str] | None = None, key_groups: int | None = None,
                 max_parallelism: int | None = None,
                 memory_limit: int | str | None = None) -> None:
        _check_streamable(node, stream_table_joins=True)
        #: the key_groups the caller asked for (None: the checkpoint's, else the default)
        self._key_groups_option = key_groups_option(key_groups, max_parallelism)
        #: fixed number of key groups of keyed state (kept in checkpoints; max parallelism)
        self.key_groups = self._key_groups_option or DEFAULT_KEY_GROUPS
        if fault is not None and fault[1] not in FAULT_POINTS:
            raise PlanError(f"fault point {fault[1]!r} is not one of {FAULT_POINTS}")
        self.job_id = uuid.uuid4().hex[:12]
        self._budget = task_budget(memory_limit)
        self.parallelism = max(1, int(parallelism))
        self.clock = clock or WallClock()
        self.stop_at_end = stop_at_end
        self.max_batch_records = int(max_batch_records)
        self.poll_timeout_s = parse_duration(poll_timeout, "poll_timeout") / 1e6
        self.interval_s = parse_duration(checkpoint_interval, "checkpoint_interval") / 1e6
        self.sink = make_sink(sink)
        self.store = (CheckpointStore(checkpoint, storage_options) if checkpoint is not None
                      else None)
        self._fault = fault
        self._final = compile_plan(node, streaming_settings(self.parallelism))
        self._stages = all_stages(self._final)
        self._chains: list[_Chain] = []
        self._consumers: dict[int, list[_Chain]] = {}
        #: input port of the consumer pipeline each exchange stage feeds (1: a join's right)
        self._consumer_port: dict[int, int] = {}
        self._owners: dict[int, np.ndarray] = {}
        self._parts: list[_SourcePart] = []
        self._side: dict[str, list[pa.RecordBatch]] = {}
        self.epoch = 1
        self.watermark = MIN_WATERMARK
        self._finished = False
        self._dirty = False
        self._stop = threading.Event()
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._op_stats: dict[str, list[int]] = {}
        #: approximate state size per operator at the last checkpoint (bytes)
        self._state_sizes: dict[str, int] = {}
        self._metrics: dict[str, Any] = {"rounds": 0, "records_in": 0, "records_out": 0,
                                         "checkpoints": 0, "last_checkpoint_epoch": None,
                                         "restored_from_epoch": None}
        self._thread = threading.Thread(target=self._main, name=f"millstream-stream-{self.job_id}",
                                        daemon=True)

    # ------------------------------------------------------------------ control

    def start(self) -> StreamingJob:
        """Start the job's thread (``Dataset.start`` does this)."""
        self._thread.start()
        return self

    def metrics(self) -> dict[str, Any]:
        """Epoch, watermark and its lag, records in/out and state size (at the last checkpoint)
        per operator, task counters (e.g. ``millstream.state_spills``), late records,
        checkpoint count/duration/size."""
        with self._lock:
            m = dict(self._metrics)
        lag = None
        if MIN_WATERMARK < self.watermark < MAX_WATERMARK:
            lag = max(0.0, (self.clock.now() - self.watermark) / 1e6)
        with self._lock:
            m["operators"] = {name: {"records_in": i, "records_out": o,
                                     "state_bytes": self._state_sizes.get(name, 0)}
                              for name, (i, o) in self._op_stats.items()}
        counters: dict[str, int] = {}
        for chain in self._chains:
            for name, value in counter_names(chain.ctx.counters).items():
                counters[name] = counters.get(name, 0) + value
        m.update(epoch=self.epoch, watermark=self.watermark, watermark_lag_s=lag,
                 active=self.is_active, counters=counters,
                 late_records=sum(b.num_rows for b in self._side.get("late", [])),
                 positions={(p.source.__class__.__name__, p.partition):
                            (p.reader.position if p.reader else None) for p in self._parts})
        return m

    # ------------------------------------------------------------------ setup

    def _build(self) -> None:
        resolve_broadcast_tables(self._stages)
        sources: dict[int, StreamSource] = {}
        for si, stage in enumerate(self._stages):
            if stage.output_kind == "shuffle" and stage.partitioner is None:
                raise PlanError(f"stage {stage.id}: a shuffle without a partitioner")
            for pi, pipe in enumerate(stage.pipelines):
                for p in pipe.ports:
                    if not isinstance(p, (SourcePort, ShufflePort)):
                        raise PlanError(f"{p.describe()} cannot run on a stream in this version")
                if len(pipe.ports) > 1 and not all(isinstance(p, ShufflePort) for p in pipe.ports):
                    raise PlanError(f"stage {stage.id}: an operator with several inputs must "
                                    f"read them all from exchanges, got "
                                    f"{[p.describe() for p in pipe.ports]}")
                port = pipe.ports[0]
                if isinstance(port, SourcePort):
                    src = sources.setdefault(id(port.source), port.source.as_stream(self.parallelism, self.stop_at_end))
                    n_parts = src.partitions()
                else:
                    src = None
                    counts = {p.stage.partitioner.num_partitions for p in pipe.ports}
                    if len(counts) != 1:
                        raise PlanError(f"stage {stage.id}: its input exchanges disagree on the "
                                        f"number of partitions {sorted(counts)}")
                    n_parts = list(range(counts.pop()))
                chains = []
                for ci, part in enumerate(n_parts):
                    ctx = default_context(job_id=self.job_id, stage_id=stage.id, partition=ci,
                                          stage_name=f"{stage.id} ({stage.purpose})",
                                          **self._budget)
                    ops = [f.create() for f in pipe.ops]
                    for op in ops:
                        timers = getattr(op, "timers", None)  # processing-time operators
                        if timers is not None and hasattr(timers, "clock"):
                            timers.clock = self.clock
                        op.open(ctx)
                    chain = _Chain((si, pi, ci), stage, ops, ctx, is_source=src is not None,
                                   key_grouped=src is None and all(
                                       _keyed_exchange(p.stage) for p in pipe.ports))
                    chains.append(chain)
                    self._chains.append(chain)
                    if src is not None:
                        self._parts.append(_SourcePart(src, part, chain))
                for j, p in enumerate(pipe.ports):
                    if isinstance(p, ShufflePort):
                        self._consumers[p.stage.id] = chains
                        self._consumer_port[p.stage.id] = j
        for part in self._parts:
            part.in_watermark = self._feeds_event_time(part.chain)

    def _feeds_event_time(self, chain: _Chain) -> bool:
        """False when a source chain only feeds an input whose event time does not matter
        (the changelog side of ``join_latest``): it is left out of the job's watermark."""
        stage = chain.stage
        if stage.output_kind != "shuffle" or stage.id not in self._consumers:
            return True
        consumers = self._consumers[stage.id]
        first = consumers[0].ops[0] if consumers and consumers[0].ops else None
        ports = getattr(first, "watermark_inputs", None)
        return ports is None or self._consumer_port[stage.id] in ports

    def _signature(self) -> list[Any]:
        """The pipeline: operator names per (stage, pipeline), independent of parallelism."""
        seen: dict[tuple[int, int], list[str]] = {}
        for c in self._chains:
            seen.setdefault(c.key[:2], [op.name for op in c.ops])
        return sorted(seen.items())

    def _legacy_signature(self) -> list[Any]:
        """The signature of version-1 checkpoints (chain keys and operator names)."""
        return [(c.key, [op.name for op in c.ops]) for c in self._chains]

    def _layout(self) -> list[tuple[int, int, int]]:
        return [c.key for c in self._chains]

    def _set_key_groups(self, key_groups: int) -> None:
        """Fix the key groups and the key group -> consumer chain map of every keyed exchange."""
        self.key_groups = int(key_groups)
        for stage in self._stages:
            if stage.id in self._consumers and _keyed_exchange(stage):
                n = len(self._consumers[stage.id])
                if n > self.key_groups:
                    raise PlanError(f"parallelism {n} of stage {stage.id} exceeds the job's "
                                    f"{self.key_groups} key groups (its maximum parallelism); "
                                    f"start it with key_groups >= {n}")
                self._owners[stage.id] = key_group_owners(self.key_groups, n)

    def _restore_ops(self, epoch: int, state: dict[str, Any]) -> None:
        """Restore every operator: keyed ones by key group, the others per chain."""
        if state.get("version", 1) < 2:
            if state["signature"] != self._legacy_signature():
                raise CheckpointError(
                    f"checkpoint {self.store.uri} epoch {epoch} was taken by a different "
                    f"pipeline or parallelism; restore needs the same plan and parallelism "
                    f"({self.parallelism})")
            self._set_key_groups(self.key_groups)
            for chain in self._chains:
                for k, op in enumerate(chain.ops):
                    snap = state["ops"].get((*chain.key, k))
                    if snap is not None:
                        op.restore(snap)
            return
        targets = [RestoreTarget(c.key, c.ops, c.key_grouped, c.is_source, self._n_consumers(c))
                   for c in self._chains]
        kg, plan = plan_restore(self.store.uri, epoch, state, targets,
                                signature=self._signature(), parallelism=self.parallelism,
                                key_groups_option=self._key_groups_option)
        self._set_key_groups(kg)
        for chain in self._chains:
            for k, (kind, data) in plan[chain.key].items():
                if kind == "keyed":
                    chain.ops[k].restore_key_groups(data)
                else:
                    chain.ops[k].restore(data)

    def _n_consumers(self, chain: _Chain) -> int:
        """How many chains share ``chain``'s stage pipeline (its parallelism)."""
        return sum(1 for c in self._chains if c.key[:2] == chain.key[:2])

    def _restore_or_init(self) -> None:
        # A sink that can re-commit a restored epoch (files: idempotent moves) restores the
        # newest complete checkpoint. One that cannot (a Kafka transaction dies with its
        # producer) restores the newest checkpoint whose commit is known, and the epochs
        # after it are replayed.
        recommit = getattr(self.sink, "recommit_on_restore", True)
        latest = (self.store.latest(committed_only=not recommit)
                  if self.store is not None else None)
        positions: dict[Any, Any] = {}
        if latest is None:
            self._set_key_groups(self.key_groups)
        else:
            epoch, state = latest
            self._restore_ops(epoch, state)
            positions = state["positions"]
            self.watermark = state["watermark"]
            self._side = {t: list(v) for t, v in state.get("side", {}).items()}
            if recommit:
                self.sink.commit(state["sink_handle"])  # idempotent: repairs a crash before commit
            self.epoch = epoch + 1
            self._metrics["restored_from_epoch"] = epoch
            _log.info("streaming job %s restored from checkpoint epoch %d", self.job_id, epoch)
        starts: dict[int, dict[Any, Any]] = {}
        now = self.clock.now()
        for p in self._parts:
            if p.chain.key in positions:
                pos = positions[p.chain.key]
            else:
                src_starts = starts.setdefault(id(p.source), p.source.start_positions())
                pos = src_starts[p.partition]
            p.reader = p.source.open(p.partition, pos, p.chain.ctx)
            p.last_active = now
        if hasattr(self.sink, "open"):
            self.sink.open()
        self.sink.begin(self.epoch)
        if latest is not None:
            self._catch_up_watermark()

    def _catch_up_watermark(self) -> None:
        """Bring restored keyed operators that got no key group state to the job's watermark."""
        for chain in self._chains:
            for k, op in enumerate(chain.ops):
                if chain.key_grouped and is_keyed_op(op) and op.watermark < self.watermark \
                        and self.watermark < MAX_WATERMARK:
                    out = [b for b in op.on_watermark(self.watermark) if b.num_rows]
                    if out:
                        self._run(chain, out, k + 1)

    # ------------------------------------------------------------------ data flow

    def _count(self, op: Any, rows_in: int, rows_out: int) -> None:
        stats = self._op_stats.setdefault(op.name, [0, 0])
        stats[0] += rows_in
        stats[1] += rows_out

    def _run(self, chain: _Chain, batches: list[pa.RecordBatch], start: int = 0,
             port: int = 0) -> None:
        """Push ``batches`` through ``chain`` from operator ``start`` (on its input ``port``)."""
        for k, op in enumerate(chain.ops[start:]):
            nxt: list[pa.RecordBatch] = []
            for b in batches:
                nxt.extend(op.process(b, port) if k == 0 and port else op.process(b))
            rows_in = sum(b.num_rows for b in batches)
            batches = [b for b in nxt if b.num_rows]
            self._count(op, rows_in, sum(b.num_rows for b in batches))
            if not batches:
                return
        self._route(chain, batches)

    def _route(self, chain: _Chain, batches: list[pa.RecordBatch]) -> None:
        stage = chain.stage
        if stage.output_kind != "shuffle":
            for b in batches:
                if b.num_rows:
                    self.sink.write(b)
                    self._metrics["records_out"] += b.num_rows
            return
        consumers = self._consumers[stage.id]
        port = self._consumer_port.get(stage.id, 0)
        for b in batches:
            if not b.num_rows:
                continue
            if len(consumers) == 1:
                self._run(consumers[0], [b], 0, port)
                continue
            owners = self._owners.get(stage.id)
            if owners is not None:  # keyed exchange: key group -> the chain that owns it
                keys = stage.partitioner.keys
                missing = [k for k in keys if k not in b.schema.names]
                if missing:
                    raise PlanError(f"key exchange by {keys}: no column {missing[0]!r}; columns "
                                    f"are {b.schema.names}")
                groups = key_hashes([b.column(k) for k in keys], b.num_rows) \
                    % np.uint64(self.key_groups)
                ids = owners[groups.astype(np.int64)]
            else:
                ids = stage.partitioner.assign(b)
            for i, part in split_by_partition(b, np.asarray(ids, dtype=np.int64), len(consumers)):
                self._run(consumers[i], [part], 0, port)

    def _each_op(self, call: str) -> None:
        """Call ``on_watermark``/``finish``/``advance_processing_time`` in plan order."""
        for chain in self._chains:
            for k, op in enumerate(chain.ops):
                if call == "watermark":
                    out = op.on_watermark(self.watermark)
                elif call == "finish":
                    out = op.finish()
                else:
                    fn = getattr(op, "advance_processing_time", None)
                    out = fn() if fn is not None else ()
                for b in out:  # a batch at a time: a large firing is never held whole
                    if b.num_rows:
                        self._count(op, 0, b.num_rows)
                        self._run(chain, [b], k + 1)
                        self._dirty = True  # e.g. a processing-time firing: commit it

    def _drain_side(self) -> None:
        with self._lock:
            for chain in self._chains:
                for op in chain.ops:
                    if isinstance(op, WindowAggregate):
                        for tag in op.side_outputs:
                            got = op.take_side_output(tag)
                            if got:
                                self._side.setdefault(tag, []).extend(got)
                    elif isinstance(op, KeyedProcess):
                        for tag in op.side_output_tags():
                            self._side.setdefault(tag, []).extend(op.take_side_output(tag))
                    elif getattr(op, "side_outputs", None) and hasattr(op, "take_side_output"):
                        for tag in op.side_outputs:  # e.g. the stream joins' late rows
                            got = op.take_side_output(tag)
                            if got:
                                self._side.setdefault(tag, []).extend(got)

    def _compute_watermark(self) -> int:
        now = self.clock.now()
        marks = []
        idle_marks = []
        for p in self._parts:
            r = p.reader
            if not p.in_watermark:
                continue
            if r.finished:
                marks.append(MAX_WATERMARK)
                continue
            w = r.watermark if r.watermark is not None else MIN_WATERMARK
            if p.assigner is not None:
                w = max(w, p.assigner.watermark())
                idle = p.assigner.idle_timeout
                if idle is not None and now - p.last_active >= idle:
                    idle_marks.append(w)
                    continue
            marks.append(w)
        if not marks:  # every partition idle: the largest watermark any reached (Flink's rule)
            return max([self.watermark, *idle_marks])
        return max(self.watermark, min(marks))

    def _round(self) -> int:
        """Poll every partition once and process; return the number of rows read."""
        rows = 0
        timeout = self.poll_timeout_s / max(1, len(self._parts))
        for p in self._parts:
            if p.reader.finished:
                continue
            batch = p.reader.poll(self.max_batch_records, timeout)
            if batch is not None and batch.num_rows:
                rows += batch.num_rows
                p.last_active = self.clock.now()
                self._run(p.chain, [batch])
        self._each_op("processing_time")
        wm = self._compute_watermark()
        if wm == MAX_WATERMARK and all(p.reader.finished for p in self._parts):
            self._finished = True
        elif wm > self.watermark:
            self.watermark = wm
            self._each_op("watermark")
            self._dirty = True
        self._drain_side()
        with self._lock:
            self._metrics["rounds"] += 1
            self._metrics["records_in"] += rows
        if rows:
            self._dirty = True
            self._maybe_fail("during_epoch")
        return rows

    def _maybe_fail(self, point: str) -> None:
        if self._fault is not None and self._fault == (self.epoch, point):
            raise SimulatedCrash(f"fault injection: crash at {point} of epoch {self.epoch}")

    def _checkpoint(self) -> None:
        started = time.perf_counter()
        self._drain_side()
        handle = self.sink.pre_commit(self.epoch)
        self._maybe_fail("before_checkpoint")
        if self.store is not None:
            ops: dict[tuple[int, ...], Any] = {}
            keyed: dict[tuple[int, ...], dict[int, list[Any]]] = {}
            sizes: dict[str, int] = {}
            for c in self._chains:
                for k, op in enumerate(c.ops):
                    if c.key_grouped and is_keyed_op(op):
                        groups = keyed.setdefault((*c.key[:2], k), {})
                        snap = op.snapshot_by_key_group(self.key_groups)
                        for g, st in snap.items():
                            groups.setdefault(g, []).append(st)
                    else:
                        snap = ops[(*c.key, k)] = op.snapshot()
                    sizes[op.name] = sizes.get(op.name, 0) + state_bytes(snap)
            with self._lock:
                self._state_sizes = sizes
            state = {
                "version": 2, "epoch": self.epoch, "signature": self._signature(),
                "parallelism": self.parallelism, "layout": self._layout(),
                "key_groups": self.key_groups,
                "positions": {p.chain.key: p.reader.position for p in self._parts},
                "ops": ops, "keyed": keyed,
                "watermark": self.watermark, "sink_handle": handle,
                "side": {t: list(v) for t, v in self._side.items()},
            }
            self.store.write(self.epoch, state)
            with self._lock:
                self._metrics["last_checkpoint_bytes"] = self.store.last_size
        self._maybe_fail("after_checkpoint")
        self.sink.commit(handle)
        if self.store is not None:
            self.store.mark_committed(self.epoch)
        self._maybe_fail("after_commit")
        with self._lock:
            self._metrics["checkpoints"] += 1
            self._metrics["last_checkpoint_epoch"] = self.epoch
            self._metrics["last_checkpoint_seconds"] = round(time.perf_counter() - started, 6)
        self.epoch += 1
        self._dirty = False

    def _main(self) -> None:
        try:
            self._build()
            self._restore_or_init()
            last = time.monotonic()
            while True:
                rows = self._round()
                if self._finished:
                    self.watermark = MAX_WATERMARK
                    self._each_op("finish")
                    self._checkpoint()
                    break
                if self._stop.is_set():
                    self._checkpoint()
                    break
                if self._dirty and time.monotonic() - last >= self.interval_s:
                    self._checkpoint()
                    self.sink.begin(self.epoch)
                    last = time.monotonic()
                if not rows:
                    time.sleep(min(0.01, self.poll_timeout_s))
        except BaseException as exc:  # the job dies; its error surfaces in await_termination
            self._error = exc
            if not isinstance(exc, SimulatedCrash):
                _log.error("streaming job %s failed: %r", self.job_id, exc)
        finally:
            # a simulated crash leaves everything as a killed process would (no cleanup)
            if not isinstance(self._error, SimulatedCrash):
                for p in self._parts:
                    close_quietly(p.reader, "a reader")
                for chain in self._chains:
                    for op in chain.ops:
                        close_quietly(op, op.name)
                close_quietly(self.sink, "the sink")  # a Kafka producer: flush, or abort
            self._done.set()
