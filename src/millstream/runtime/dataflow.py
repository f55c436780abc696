"""The parallel streaming executor: long-lived tasks in worker processes (or Ray actors).

The physical plan is the batch planner's. Every stage partition becomes a
:class:`~millstream.runtime.stream_task.StreamTask` that runs for the life of the job in
a host the runner starts (``Runner.start_stream_hosts``: a process per task on the local
runner, an actor per task on Ray). Tasks send Arrow batches to each other through
bounded inboxes (backpressure), keyed exchanges route rows by key group, and this
coordinator (in the driver) only triggers checkpoints, collects acknowledgements, writes
checkpoints, commits sinks and watches the hosts.

Checkpoint ``e``: the coordinator sends barrier ``e`` to every source task; barriers flow
with the data and are aligned (see :mod:`millstream.runtime.stream_task`); each task
acknowledges with its operators' snapshots (keyed ones per key group), its source
position and its sink's pre-commit handle. With every acknowledgement in, the
coordinator writes the checkpoint (the same state layout as the in-process executor, so a
job can restore at another parallelism), then commits: file sinks by moving each task's
staged files, Kafka sinks in their own tasks (a transaction belongs to its producer),
driver-side sinks (collecting, callables, console) with the rows the tasks sent it for
that epoch. Then ``_COMMITTED``.

A host that dies (process killed, out of memory, Ray node lost) restarts the job from
the last complete checkpoint (``max_restarts`` times). A task that *raises* fails the
job: replaying the same input would raise again; ``await_termination`` re-raises it.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from functools import partial
from typing import Any

import cloudpickle
import pyarrow as pa

from millstream.core.keygroups import DEFAULT_KEY_GROUPS, key_group_owners
from millstream.core.shuffle import HashPartitioner
from millstream.core.time import MAX_WATERMARK, MIN_WATERMARK
from millstream.core.units import parse_duration
from millstream.errors import PlanError, StreamingError, WorkerLostError
from millstream.io.stream_sinks import make_sink
from millstream.plan import logical as L
from millstream.plan.compile import compile_plan, streaming_settings
from millstream.plan.stages import (
    ShufflePort,
    SourcePort,
    all_stages,
)
from millstream.runtime.checkpoint import (
    CheckpointError,
    CheckpointStore,
    RestoreTarget,
    plan_restore,
)
from millstream.runtime.stream_task import (
    Output,
    StreamTask,
    TaskSpec,
    close_quietly,
    decode_batch,
)
from millstream.runtime.streaming import (
    JobHandle,
    _check_streamable,
    key_groups_option,
    resolve_broadcast_tables,
    task_budget,
)

_log = logging.getLogger(__name__)


EXECUTORS = ("parallel", "inline")
#: Overrides the default executor (e.g. to run a test suite on the other one).
EXECUTOR_ENV = "MILLSTREAM_STREAMING_EXECUTOR"


def choose_executor(node: L.Node, executor: str | None, options: dict[str, Any]) -> str:
    """``executor`` if given; else "inline" when the job needs this process (a test source,
    a virtual clock, fault points), else "parallel" (or ``$MILLSTREAM_STREAMING_EXECUTOR``)."""
    import os

    from millstream.core.time import WallClock

    if executor is not None:
        if executor not in EXECUTORS:
            raise PlanError(f"executor must be one of {EXECUTORS}, got {executor!r}")
        return executor
    clock = options.get("clock")
    if options.get("_fault") is not None or (clock is not None
                                             and not isinstance(clock, WallClock)):
        return "inline"
    if any(getattr(n.source, "in_process_only", False) for n in _scans(node)):
        return "inline"
    env = os.environ.get(EXECUTOR_ENV)
    if env:
        if env not in EXECUTORS:
            raise PlanError(f"${EXECUTOR_ENV} must be one of {EXECUTORS}, got {env!r}")
        return env
    return "parallel"


def _scans(node: L.Node) -> list[L.Scan]:
    out = [node] if isinstance(node, L.Scan) else []
    for c in node.children:
        out.extend(_scans(c))
    return out


def run_stream_task(spec: TaskSpec, channels: Any) -> None:
    """What a host runs: one task until its final barrier (module-level so it pickles)."""
    StreamTask(spec, channels).run()


class _Chain:
    """Driver-side facts of one stage partition (its task's spec is built from them)."""

    def __init__(self, index: int, key: tuple[int, int, int], stage: Any, pipe: Any,
                 ops: list[Any], n: int) -> None:
        self.index = index
        self.key = key
        self.stage = stage
        self.pipe = pipe
        self.ops = ops  # instances for names and flags only (never opened)
        self.n = n  # chains of this pipeline
        self.source: tuple[Any, Any] | None = None
        self.key_grouped = False
        self.senders: list[int] = []
        self.sender_ports: dict[int, int] = {}


class ParallelStreamingJob(JobHandle):
    """A streaming job whose stage partitions run as long-lived tasks on the runner.

    Same controls as :class:`~millstream.runtime.streaming.StreamingJob`: ``start``,
    ``await_termination``, ``stop`` (final checkpoint), ``metrics``, ``late_records``,
    ``side_output``. Options beyond the inline executor's: ``runner`` (a runner object,
    default the session's), ``max_restarts`` (restarts from the last checkpoint after a
    lost task host or a checkpoint timeout), ``inbox_capacity`` (messages a task's inbox
    holds before its producers wait), ``memory_limit`` (per task; keyed state spills beyond
    half of it), ``checkpoint_timeout`` (a checkpoint not acknowledged by every task in this
    time counts as a failure).
    """

    def __init__(self, node: L.Node, checkpoint: str | None = None,
                 checkpoint_interval: str | int = "10s", sink: Any = None, *,
                 parallelism: int | None = None, runner: Any = None, stop_at_end: bool = False,
                 max_batch_records: int = 10_000, poll_timeout: str | int = "50ms",
                 storage_options: dict[str, Any] | None = None, key_groups: int | None = None,
                 max_parallelism: int | None = None, max_restarts: int = 3,
                 inbox_capacity: int = 8, memory_limit: int | str | None = None,
                 checkpoint_timeout: str | int = "10m") -> None:
        _check_streamable(node, stream_table_joins=True)
        self._key_groups_option = key_groups_option(key_groups, max_parallelism)
        self.key_groups = self._key_groups_option or DEFAULT_KEY_GROUPS
        self.job_id = uuid.uuid4().hex[:12]
        self._runner = runner
        if parallelism is None:
            from millstream.runtime.session import get_session

            parallelism = get_session().settings.resolved_parallelism()
        self.parallelism = max(1, int(parallelism))
        self.stop_at_end = stop_at_end
        self.max_batch_records = int(max_batch_records)
        self.poll_timeout_s = parse_duration(poll_timeout, "poll_timeout") / 1e6
        self.interval_s = parse_duration(checkpoint_interval, "checkpoint_interval") / 1e6
        self.checkpoint_timeout_s = parse_duration(checkpoint_timeout, "checkpoint_timeout") / 1e6
        self.sink = make_sink(sink)
        self._parallel_sink = hasattr(self.sink, "for_subtask")
        self._sink_commits_in_task = bool(getattr(self.sink, "commits_in_subtask", False))
        self.store = (CheckpointStore(checkpoint, storage_options) if checkpoint is not None
                      else None)
        self._checkpoint_location = ((checkpoint, dict(storage_options or {}))
                                     if checkpoint is not None else None)
        self.max_restarts = int(max_restarts)
        self.inbox_capacity = max(1, int(inbox_capacity))
        self._settings = task_budget(memory_limit)
        self._stages = all_stages(compile_plan(node, streaming_settings(self.parallelism)))
        self.epoch = 1
        self.watermark = MIN_WATERMARK
        self.restarts = 0
        self._stop = threading.Event()
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._side: dict[str, list[pa.RecordBatch]] = {}
        self._task_metrics: dict[int, dict[str, Any]] = {}
        self._metrics: dict[str, Any] = {"checkpoints": 0, "last_checkpoint_epoch": None,
                                         "restored_from_epoch": None, "restarts": 0,
                                         "last_checkpoint_seconds": None,
                                         "last_checkpoint_bytes": None}
        self._hosts: Any = None
        self._chains: list[_Chain] = []
        self._thread = threading.Thread(target=self._main, daemon=True,
                                        name=f"millstream-dataflow-{self.job_id}")

    # ------------------------------------------------------------------ control

    def start(self) -> ParallelStreamingJob:
        """Start the coordinator thread (``Dataset.start`` does this)."""
        if self._runner is None:  # connect here, in the caller's thread (Ray wants the main one)
            from millstream.runtime.session import get_session

            s = get_session()
            self._runner = s.get_runner(s.settings)
        self._thread.start()
        return self

    def host_pids(self) -> list[int]:
        """Process ids of the task hosts (local runner; for tests and monitoring)."""
        hosts = self._hosts
        return list(hosts.pids()) if hosts is not None and hasattr(hosts, "pids") else []

    def host_nodes(self) -> list[str]:
        """The Ray node id of every task (Ray runner; for tests and monitoring)."""
        hosts = self._hosts
        return list(getattr(hosts, "nodes", ())) if hosts is not None else []

    def metrics(self) -> dict[str, Any]:
        """Epoch, watermark and its lag, records in/out and state size (at the last
        checkpoint) per operator, task counters (e.g. ``millstream.state_spills``) of the
        current run, checkpoint count/duration/size, restarts."""
        with self._lock:
            m = dict(self._metrics)
            tasks = dict(self._task_metrics)
            late = sum(b.num_rows for b in self._side.get("late", []))
        ops: dict[str, dict[str, int]] = {}
        counters: dict[str, int] = {}
        for tm in tasks.values():
            for name, (i, o) in tm.get("operators", {}).items():
                agg = ops.setdefault(name, {"records_in": 0, "records_out": 0,
                                            "state_bytes": 0})
                agg["records_in"] += i
                agg["records_out"] += o
            for name, size in tm.get("state_bytes", {}).items():
                if name in ops:
                    ops[name]["state_bytes"] += size
            for name, value in tm.get("counters", {}).items():
                counters[name] = counters.get(name, 0) + value
        sources = [c.index for c in self._chains if c.source is not None]
        sinks = [c.index for c in self._chains if c.stage.output_kind != "shuffle"]
        lag = None
        if MIN_WATERMARK < self.watermark < MAX_WATERMARK:
            lag = max(0.0, (time.time_ns() // 1000 - self.watermark) / 1e6)
        m.update(epoch=self.epoch, watermark=self.watermark, watermark_lag_s=lag,
                 active=self.is_active, operators=ops, late_records=late, tasks=len(self._chains),
                 counters=counters,
                 records_in=sum(tasks.get(i, {}).get("records_in", 0) for i in sources),
                 records_out=sum(tasks.get(i, {}).get("records_out", 0) for i in sinks),
                 positions={(type(c.source[0]).__name__, c.source[1]):
                            tasks.get(c.index, {}).get("position")
                            for c in self._chains if c.source is not None})
        return m

    # ------------------------------------------------------------------ plan

    def _build(self) -> None:
        """Chains (stage partitions) with their sources, senders and key-group flags."""
        resolve_broadcast_tables(self._stages)  # bounded sides of stream-table joins, once
        chains: list[_Chain] = []
        by_stage: dict[int, list[_Chain]] = {}
        self._consumer_pipe: dict[int, tuple[list[_Chain], int]] = {}
        sources: dict[int, Any] = {}
        for si, stage in enumerate(self._stages):
            if stage.output_kind == "shuffle" and stage.partitioner is None:
                raise PlanError(f"stage {stage.id}: a shuffle without a partitioner")
            for pi, pipe in enumerate(stage.pipelines):
                parts: list[Any]
                src = None
                for port in pipe.ports:
                    if not isinstance(port, (SourcePort, ShufflePort)):
                        raise PlanError(f"{port.describe()} cannot run in a parallel streaming "
                                        f"job yet; use executor='inline'")
                if isinstance(pipe.ports[0], SourcePort):
                    if len(pipe.ports) != 1:
                        raise PlanError("a pipeline reads one source")
                    port = pipe.ports[0]
                    src = sources.setdefault(id(port.source), port.source.as_stream(self.parallelism, self.stop_at_end))
                    if getattr(port.source, "in_process_only", False):
                        raise PlanError(f"{port.source.describe()} lives in this process (a test "
                                        f"source): run the job with executor='inline'")
                    parts = src.partitions()
                else:
                    parts = list(range(pipe.ports[0].stage.partitioner.num_partitions))
                mine = []
                for ci, part in enumerate(parts):
                    c = _Chain(len(chains), (si, pi, ci), stage, pipe,
                               [f.create() for f in pipe.ops] if ci == 0 else mine[0].ops,
                               len(parts))
                    if src is not None:
                        c.source = (src, part)
                    chains.append(c)
                    mine.append(c)
                by_stage.setdefault(stage.id, []).extend(mine)
                for j, port in enumerate(pipe.ports):
                    if isinstance(port, ShufflePort):
                        self._consumer_pipe[port.stage.id] = (mine, j)
        for c in chains:
            for j, port in enumerate(c.pipe.ports):
                if isinstance(port, ShufflePort):
                    c.senders.extend(p.index for p in by_stage[port.stage.id])
                    c.sender_ports.update({p.index: j for p in by_stage[port.stage.id]})
                    if _keyed_exchange(port.stage):
                        c.key_grouped = True
        self._chains = chains

    def _signature(self) -> list[Any]:
        seen: dict[tuple[int, int], list[str]] = {}
        for c in self._chains:
            seen.setdefault(c.key[:2], [op.name for op in c.ops])
        return sorted(seen.items())

    def _layout(self) -> list[tuple[int, int, int]]:
        return [c.key for c in self._chains]

    def _output(self, chain: _Chain, sink_index: dict[int, int]) -> Output:
        stage = chain.stage
        if stage.output_kind != "shuffle":
            if self._parallel_sink:
                return Output("sink", sink=self.sink.for_subtask(sink_index[chain.index]))
            return Output("driver")
        consumers, port = self._consumer_pipe[stage.id]
        out = Output("exchange", [c.index for c in consumers], port, stage.partitioner)
        if _keyed_exchange(stage) and len(consumers) > 1:
            if len(consumers) > self.key_groups:
                raise PlanError(f"parallelism {len(consumers)} of stage {stage.id} exceeds the "
                                f"job's {self.key_groups} key groups (its maximum parallelism); "
                                f"start it with key_groups >= {len(consumers)}")
            out.keys = list(stage.partitioner.keys)
            out.owners = key_group_owners(self.key_groups, len(consumers))
            out.key_groups = self.key_groups
        return out

    # ------------------------------------------------------------------ restore

    def _restore_data(self, epoch: int, state: dict[str, Any]) -> dict[int, dict[int, Any]]:
        """Per chain, per operator: what to restore (keyed state by owned key group)."""
        if state.get("version", 1) < 2 or "signature" not in state:
            raise CheckpointError(f"checkpoint {self.store.uri} epoch {epoch} has an old format; "
                                  f"restore it with executor='inline'")
        targets = [RestoreTarget(c.key, c.ops, c.key_grouped, c.source is not None, c.n)
                   for c in self._chains]
        self.key_groups, plan = plan_restore(
            self.store.uri, epoch, state, targets, signature=self._signature(),
            parallelism=self.parallelism, key_groups_option=self._key_groups_option)
        return {c.index: plan[c.key] for c in self._chains}

    def _specs(self) -> list[TaskSpec]:
        """Build every task's spec from the newest usable checkpoint (or from the start)."""
        recommit = getattr(self.sink, "recommit_on_restore", True)
        latest = (self.store.latest(committed_only=not recommit, keyed_as_blobs=True)
                  if self.store is not None else None)
        restore: dict[int, dict[int, Any]] = {}
        positions: dict[Any, Any] = {}
        wm = MIN_WATERMARK
        if latest is not None:
            epoch, state = latest
            restore = self._restore_data(epoch, state)
            positions = state["positions"]
            wm = state["watermark"]
            with self._lock:
                self._side = {t: list(v) for t, v in state.get("side", {}).items()}
            if recommit:  # idempotent: repairs a crash between _COMPLETE and the commits
                if state.get("sink_handle") is not None:
                    self.sink.commit(state["sink_handle"])
                for h in state.get("sink_handles", ()):
                    self.sink.commit(h)
            self.epoch = epoch + 1
            self._metrics["restored_from_epoch"] = epoch
            _log.info("streaming job %s restored from checkpoint epoch %d", self.job_id, epoch)
        else:
            self.epoch = 1
            with self._lock:
                self._side = {}
        self.watermark = wm
        starts: dict[int, dict[Any, Any]] = {}
        sources: dict[int, tuple[Any, dict[Any, Any]]] = {}
        for c in self._chains:
            if c.source is not None:
                src, part = c.source
                pos = positions[c.key] if c.key in positions else \
                    starts.setdefault(id(src), src.start_positions())[part]
                sources.setdefault(id(src), (src, {}))[1][part] = pos
        for src, at in sources.values():
            src.prepare(at)  # e.g. a JSON topic's schema, once for all tasks
        sink_index = {c.index: i for i, c in enumerate(
            c for c in self._chains if c.stage.output_kind != "shuffle")}
        if self._parallel_sink:
            self._retire_sink_instances(len(sink_index))
        specs = []
        for c in self._chains:
            source = None
            if c.source is not None:
                src, part = c.source
                source = (src, part, sources[id(src)][1][part])
            specs.append(TaskSpec(
                index=c.index, key=c.key, job_id=self.job_id, stage_id=c.stage.id,
                stage_name=f"{c.stage.id} ({c.stage.purpose})", ops=list(c.pipe.ops),
                senders=list(c.senders), sender_ports=dict(c.sender_ports),
                output=self._output(c, sink_index),
                key_grouped=c.key_grouped, key_groups=self.key_groups, source=source,
                restore=restore.get(c.index, {}), watermark=wm, epoch=self.epoch,
                max_batch_records=self.max_batch_records, poll_timeout_s=self.poll_timeout_s,
                settings=dict(self._settings), checkpoint=self._checkpoint_location))
        return specs

    def _retire_sink_instances(self, n: int) -> None:
        """Before ``n`` sink instances start: if an earlier run of this job had more (it ran
        at a higher parallelism), close out the ones no task will own again (a Kafka sink
        aborts their open transactions and fences their producers, as Flink does), so a
        leftover process of that run cannot commit, nor an open transaction hold
        ``read_committed`` readers back until it times out. The most instances ever
        started is kept with the checkpoints."""
        if self.store is None:
            return
        before = int(self.store.job_meta().get("sink_instances", 0))
        retire = getattr(self.sink, "retire_instances", None)
        if before > n and retire is not None:
            retire(range(n, before))
            _log.info("streaming job %s: retired sink instances %d..%d of an earlier run",
                      self.job_id, n, before - 1)
        if before != n:
            self.store.update_job_meta(sink_instances=n if retire is not None else
                                       max(n, before))

    # ------------------------------------------------------------------ running

    def _launch(self) -> None:
        specs = self._specs()
        runner = self._runner
        payloads = [cloudpickle.dumps(partial(run_stream_task, spec)) for spec in specs]
        try:
            self._hosts = runner.start_stream_hosts(payloads, self.inbox_capacity)
        except WorkerLostError as exc:
            raise _HostLost(str(exc)) from None

    def _trigger(self, final: bool) -> dict[str, Any]:
        e = self.epoch
        for c in self._chains:
            if c.source is not None:
                self._hosts.send_control(c.index, ("barrier", e, final))
        return {"epoch": e, "final": final, "acks": {}, "started": time.perf_counter(),
                "committing": None}

    def _complete(self, pending: dict[str, Any], out: dict[int, list[pa.RecordBatch]],
                  side: dict[int, dict[str, list[pa.RecordBatch]]]) -> None:
        """All tasks acknowledged: write the checkpoint, then commit."""
        e = pending["epoch"]
        acks = pending["acks"]
        driver_handle = None
        if not self._parallel_sink:
            self.sink.begin(e)
            for b in out.pop(e, []):
                self.sink.write(b)
            driver_handle = self.sink.pre_commit(e)
        handles = [acks[c.index]["sink_handle"] for c in self._chains
                   if c.stage.output_kind != "shuffle" and self._parallel_sink]
        source_wms = [acks[c.index]["watermark"] for c in self._chains if c.source is not None]
        wm = max(self.watermark, min(source_wms)) if source_wms else self.watermark
        with self._lock:
            committed_side = {t: list(v) for t, v in self._side.items()}
        for tag, batches in side.pop(e, {}).items():
            committed_side.setdefault(tag, []).extend(batches)
        if self.store is not None:
            ops: dict[tuple[int, ...], Any] = {}
            keyed: dict[tuple[int, ...], dict[int, list[Any]]] = {}
            for c in self._chains:
                ack = acks[c.index]
                for k, snap in ack["ops"].items():
                    ops[(*c.key, k)] = snap
                for k, groups in ack["keyed"].items():
                    dst = keyed.setdefault((*c.key[:2], k), {})
                    for g, st in groups.items():
                        dst.setdefault(g, []).append(st)
            state = {
                "version": 2, "executor": "parallel", "epoch": e,
                "signature": self._signature(), "parallelism": self.parallelism,
                "layout": self._layout(), "key_groups": self.key_groups,
                "positions": {c.key: acks[c.index]["position"] for c in self._chains
                              if c.source is not None},
                "ops": ops, "keyed": keyed, "watermark": wm,
                "sink_handle": driver_handle,
                "sink_handles": [] if self._sink_commits_in_task else handles,
                "side": committed_side,
            }
            self.store.write(e, state)
            with self._lock:  # the state file, and the blobs the tasks wrote themselves
                self._metrics["last_checkpoint_bytes"] = self.store.last_size + sum(
                    a.get("blob_bytes", 0) for a in acks.values())
        if driver_handle is not None:
            self.sink.commit(driver_handle)
        if self._sink_commits_in_task:
            for c in self._chains:
                if c.stage.output_kind != "shuffle":
                    self._hosts.send_control(c.index, ("commit", e))
            pending["committing"] = {c.index for c in self._chains
                                     if c.stage.output_kind != "shuffle"}
        else:
            for h in handles:
                self.sink.commit(h)
        self.watermark = wm
        with self._lock:
            self._side = committed_side
        if not pending["committing"]:
            self._committed(pending)

    def _committed(self, pending: dict[str, Any]) -> None:
        e = pending["epoch"]
        if self.store is not None:
            self.store.mark_committed(e)
        with self._lock:
            self._metrics["checkpoints"] += 1
            self._metrics["last_checkpoint_epoch"] = e
            self._metrics["last_checkpoint_seconds"] = round(
                time.perf_counter() - pending["started"], 6)
        self.epoch = e + 1

    def _run_once(self) -> bool:
        """Run the tasks until the job ends (True) or a host dies (False)."""
        self._launch()
        hosts = self._hosts
        n = len(self._chains)
        pending: dict[str, Any] | None = None
        out: dict[int, list[pa.RecordBatch]] = {}
        side: dict[int, dict[str, list[pa.RecordBatch]]] = {}
        ended: set[int] = set()
        done: set[int] = set()
        n_sources = sum(1 for c in self._chains if c.source is not None)
        active = False
        last = time.monotonic()
        final_done = False
        while True:
            for msg in hosts.poll(0.02):
                kind, idx = msg[0], msg[1]
                if kind == "ack":
                    if pending is None or msg[2] != pending["epoch"]:
                        raise StreamingError(f"task {idx} acknowledged epoch {msg[2]}, but the "
                                             f"checkpoint in flight is "
                                             f"{pending and pending['epoch']}")
                    pending["acks"][idx] = msg[3]
                    if len(pending["acks"]) == n:
                        self._complete(pending, out, side)
                        if not pending["committing"]:
                            final_done = pending["final"]
                            pending = None
                            last = time.monotonic()
                elif kind == "committed":
                    pending["committing"].discard(idx)
                    if not pending["committing"]:
                        self._committed(pending)
                        final_done = pending["final"]
                        pending = None
                        last = time.monotonic()
                elif kind == "out":
                    out.setdefault(msg[2], []).append(decode_batch(msg[3]))
                elif kind == "side":
                    side.setdefault(msg[2], {}).setdefault(msg[3], []).extend(msg[4])
                elif kind == "metrics":
                    with self._lock:
                        self._task_metrics[idx] = msg[2]
                elif kind == "active":
                    active = True
                elif kind == "ended":
                    ended.add(idx)
                elif kind == "done":
                    done.add(idx)
                elif kind == "error":
                    if isinstance(msg[4], WorkerLostError):  # a peer's host died, not the task
                        c = self._chains[idx]
                        raise _HostLost(f"task {c.key} (stage {c.stage.id}) lost a peer: "
                                        f"{msg[2]}")
                    raise _TaskFailed(self._chains[idx], msg[2], msg[3], msg[4])
            if final_done and len(done) == n:
                return True
            dead = hosts.dead()
            if dead:
                idx, why = dead[0]
                if final_done:  # exited after the end anyway
                    return True
                c = self._chains[idx]
                raise _HostLost(f"the host of task {c.key} (stage {c.stage.id}, partition "
                                f"{c.key[2]}) died: {why}")
            if pending is not None and \
                    time.perf_counter() - pending["started"] > self.checkpoint_timeout_s:
                # a task stuck (or a message lost): as Flink, a checkpoint that does not
                # complete in time fails the attempt, which restarts from the last one
                missing = sorted(self._chains[i].key for i in range(n)
                                 if i not in pending["acks"])
                raise _HostLost(f"checkpoint {pending['epoch']} did not complete within "
                                f"{self.checkpoint_timeout_s:g}s (no acknowledgement from "
                                f"tasks {missing[:8]})")
            if pending is None and not final_done:
                if len(ended) == n_sources or self._stop.is_set():
                    pending = self._trigger(final=True)
                elif active and time.monotonic() - last >= self.interval_s:
                    active = False
                    pending = self._trigger(final=False)

    def _main(self) -> None:
        try:
            self._build()
            while True:
                try:
                    self._run_once()
                    break
                except _HostLost as exc:
                    self._shutdown_hosts()
                    if self.store is None or self.restarts >= self.max_restarts:
                        raise StreamingError(
                            f"streaming job {self.job_id}: {exc}; "
                            + ("no checkpoint location to restart from" if self.store is None
                               else f"gave up after {self.restarts} restart(s)")) from None
                    self.restarts += 1
                    with self._lock:
                        self._metrics["restarts"] = self.restarts
                    _log.warning("streaming job %s: %s; restarting from the last checkpoint "
                                 "(restart %d of %d)", self.job_id, exc, self.restarts,
                                 self.max_restarts)
                    # back off a little, so a cluster notices a lost node before the
                    # tasks are placed again (0.5 s, 1 s, 2 s, ...)
                    self._stop.wait(min(0.5 * 2 ** (self.restarts - 1), 5.0))
        except _TaskFailed as exc:
            self._error = exc.error()
            _log.error("streaming job %s failed: %s", self.job_id, exc.text)
        except BaseException as exc:  # noqa: BLE001 - surfaces in await_termination
            self._error = exc
            _log.error("streaming job %s failed: %r", self.job_id, exc)
        finally:
            self._shutdown_hosts()
            if not self._parallel_sink:  # parallel sinks are closed by their tasks
                close_quietly(self.sink, "the sink")
            self._done.set()

    def _shutdown_hosts(self) -> None:
        if self._hosts is not None:
            try:
                self._hosts.shutdown()
            except Exception:  # noqa: BLE001
                _log.warning("stopping the task hosts failed", exc_info=True)
            self._hosts = None


class _HostLost(Exception):
    """A task host died (not an error the task raised)."""


class _TaskFailed(Exception):
    """A task raised; carries its error for the driver."""

    def __init__(self, chain: _Chain, text: str, tb: str, exc: BaseException | None) -> None:
        super().__init__(text)
        self.chain = chain
        self.text = text
        self.tb = tb
        self.exc = exc

    def error(self) -> BaseException:
        c = self.chain
        where = f"stage {c.stage.id} ({c.stage.purpose}), partition {c.key[2]}"
        if self.exc is not None:
            try:
                self.exc.add_note(f"in streaming task {where}; task traceback:\n{self.tb}")
            except AttributeError:  # pragma: no cover
                pass
            return self.exc
        return StreamingError(f"streaming task {where} failed: {self.text}\n{self.tb}")


def _keyed_exchange(stage: Any) -> bool:
    part = stage.partitioner
    return isinstance(part, HashPartitioner) and bool(part.keys)
