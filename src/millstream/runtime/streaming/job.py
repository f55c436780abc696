"""A streaming job: one coordinator for both executors.

The physical plan is the batch planner's. Every stage partition becomes a
:class:`~millstream.runtime.streaming.task.StreamTask` that runs for the life of the job.
The two executors differ only in where those tasks run and how their messages move:

* ``executor="parallel"`` (the default): each task in a host the runner starts
  (``Runner.start_stream_hosts``: a worker process per task on the local runner, a Ray
  actor per task on Ray); batches cross processes as Arrow IPC through bounded inboxes
  (backpressure);
* ``executor="inline"``: every task in this process, stepped round by round
  (:mod:`~millstream.runtime.streaming.inline`), deterministic; test sources, virtual
  clocks and fault points choose it.

This coordinator (a thread in the driver) only triggers checkpoints, collects
acknowledgements, writes checkpoints and commits sinks
(:mod:`~millstream.runtime.streaming.epochs`), and watches the hosts. Checkpoint ``e``:
barrier ``e`` goes to every source task; barriers flow with the data and are aligned
(see :mod:`~millstream.runtime.streaming.task`); each task acknowledges with its
operators' snapshots (keyed ones per key group), its source position and its sink's
pre-commit handle.

A host that dies (process killed, out of memory, Ray node lost) restarts the job from
the last complete checkpoint (``max_restarts`` times). A task that *raises* fails the
job: replaying the same input would raise again; ``await_termination`` re-raises it.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid
from functools import partial
from typing import Any

import pyarrow as pa

from millstream.core import pickling
from millstream.core.arrow import batch_to_rows, concat_batches
from millstream.core.keygroups import DEFAULT_KEY_GROUPS
from millstream.core.time import MAX_WATERMARK, MIN_WATERMARK, Clock, WallClock
from millstream.core.units import parse_duration
from millstream.errors import (
    PlanError,
    SimulatedCrash,
    StreamingError,
    WorkerLostError,
)
from millstream.io.stream_sinks import make_sink
from millstream.plan import logical as L
from millstream.plan.compile import compile_plan, streaming_settings
from millstream.plan.rank_filter import rank_filters_to_top_n
from millstream.plan.stages import all_stages
from millstream.plan.updates import check_sink, check_updates
from millstream.runtime.checkpoint import CheckpointStore
from millstream.runtime.display import summary_line, watch
from millstream.runtime.events import BUS, call_site, error_text, publish
from millstream.runtime.job_events import (
    checkpoint_event,
    stream_ended,
    stream_metrics,
    stream_started,
)
from millstream.runtime.progress import progress_enabled
from millstream.runtime.streaming.epochs import Epochs, Restored, check_fault
from millstream.runtime.streaming.failures import TaskFailed, note_failure, raise_taken_error
from millstream.runtime.streaming.inline import InlineHosts
from millstream.runtime.streaming.job_metrics import sum_task_metrics
from millstream.runtime.streaming.layout import (
    EXECUTORS,
    Layout,
    check_streamable,
    key_groups_option,
    resolve_broadcast_tables,
    scans,
    task_budget,
)
from millstream.runtime.streaming.running import end_with_the_program
from millstream.runtime.streaming.slot import SlotSpec, run_slot
from millstream.runtime.streaming.spec import TaskSpec, close_quietly

_log = logging.getLogger(__name__)

#: metrics snapshots go to the event bus about this often, while anybody listens (s)
METRICS_EVERY_S = 1.0


class StreamingJob:
    """A running streaming pipeline: ``await_termination``, ``stop`` (final checkpoint),
    ``metrics``, ``late_records``, ``side_output``.

    Options: ``executor`` ("parallel" or "inline"), ``parallelism`` (partitions per
    stage; default the session's), ``runner`` (a runner object, default the session's),
    ``clock`` (processing time; inline only), ``max_restarts`` (restarts from the last
    checkpoint after a lost task host or a checkpoint timeout), ``inbox_capacity``
    (messages a task's inbox holds before its producers wait), ``memory_limit`` (per task;
    keyed state spills beyond half of it), ``checkpoint_timeout`` (a checkpoint not
    acknowledged by every task in this time counts as a failure), ``key_groups`` (the
    maximum parallelism of keyed state, fixed by the first checkpoint),
    ``max_batch_records`` and ``poll_timeout`` (source reads), ``max_batch_delay`` (how long
    rows may wait in a source read, a watermark in a task, or an idle slot before going on:
    lower trades throughput for latency; default 20 ms), ``stop_at_end`` (an unbounded
    source ends once caught up).
    """

    def __init__(self, node: L.Node, checkpoint: str | None = None,
                 checkpoint_interval: str | int = "10s", sink: Any = None, *,
                 executor: str = "parallel", parallelism: int | None = None,
                 runner: Any = None, clock: Clock | None = None, stop_at_end: bool = False,
                 max_batch_records: int = 10_000, poll_timeout: str | int = "50ms",
                 max_batch_delay: str | int = "20ms",
                 storage_options: dict[str, Any] | None = None, key_groups: int | None = None,
                 max_parallelism: int | None = None, max_restarts: int = 3,
                 inbox_capacity: int = 8, memory_limit: int | str | None = None,
                 checkpoint_timeout: str | int = "10m",
                 fault: tuple[int, str] | None = None) -> None:
        if executor not in EXECUTORS:
            raise StreamingError(f"executor must be one of {EXECUTORS}, got {executor!r}")
        node = rank_filters_to_top_n(node)
        check_streamable(node)
        check_updates(node)
        if executor == "parallel":
            local = [s.source.describe() for s in scans(node) if s.source.in_process_only]
            if local:
                raise PlanError(f"{local[0]} lives in this process: run the job with "
                                f"executor='inline'")
        self.executor = executor
        self._key_groups_option = key_groups_option(key_groups, max_parallelism)
        self.job_id = uuid.uuid4().hex[:12]
        self._runner = runner
        if parallelism is None:
            from millstream.runtime.session import get_session

            parallelism = get_session().settings.resolved_parallelism()
        self.parallelism = max(1, int(parallelism))
        self.clock = clock or WallClock()
        self.stop_at_end = stop_at_end
        self.max_batch_records = int(max_batch_records)
        self.max_batch_delay_s = parse_duration(max_batch_delay, "max_batch_delay") / 1e6
        self.poll_timeout_s = min(parse_duration(poll_timeout, "poll_timeout") / 1e6,
                                  max(self.max_batch_delay_s, 0.001))
        self.interval_s = parse_duration(checkpoint_interval, "checkpoint_interval") / 1e6
        self.checkpoint_timeout_s = parse_duration(checkpoint_timeout, "checkpoint_timeout") / 1e6
        self.sink = make_sink(sink)
        check_sink(node, self.sink)
        self._parallel_sink = hasattr(self.sink, "for_subtask")
        self.store = (CheckpointStore(checkpoint, storage_options) if checkpoint is not None
                      else None)
        self._checkpoint_location = ((checkpoint, dict(storage_options or {}))
                                     if checkpoint is not None else None)
        self._fault = check_fault(fault)
        self.max_restarts = int(max_restarts)
        self.inbox_capacity = max(1, int(inbox_capacity))
        self._memory_limit = memory_limit
        task_budget(memory_limit)  # a bad size fails here
        from millstream.runtime.session import get_session

        self._stages = all_stages(compile_plan(node, streaming_settings(self.parallelism),
                                               disabled_rules=get_session().settings
                                               .rules_off()))
        self.epoch = 1
        self.watermark = MIN_WATERMARK
        self.restarts = 0
        self._stop = threading.Event()
        self._done = threading.Event()
        #: the program is exiting: end now, no final checkpoint, no restart
        self._abandoned = threading.Event()
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        #: side outputs of committed epochs, and of epochs still in flight
        self._side: dict[str, list[pa.RecordBatch]] = {}
        self._side_pending: dict[int, dict[str, list[pa.RecordBatch]]] = {}
        self._task_metrics: dict[int, dict[str, Any]] = {}
        self._metrics: dict[str, Any] = {"checkpoints": 0, "last_checkpoint_epoch": None,
                                         "restored_from_epoch": None, "restarts": 0,
                                         "last_checkpoint_seconds": None,
                                         "last_checkpoint_bytes": None}
        self._hosts: Any = None
        self._route: dict[int, int] = {}  # task index -> the slot (host) it runs in
        self._scratch: str | None = None
        self._layout: Layout | None = None
        self._epochs: Epochs | None = None
        self._thread = threading.Thread(target=self._main, daemon=True,
                                        name=f"millstream-stream-{self.job_id}")
        #: what the dashboard calls the job (where the user's code started it)
        self.name = (call_site() if BUS.active else "") or f"stream {self.job_id}"
        self._unwatch: Any = None

    # ------------------------------------------------------------------ control

    def start(self) -> StreamingJob:
        """Start the coordinator thread (``Dataset.start`` does this)."""
        from millstream.runtime.session import get_session

        s = get_session()
        if self._runner is None and self.executor == "parallel":
            # connect here, in the caller's thread (Ray wants the main one)
            self._runner = s.get_runner(s.settings)
        if progress_enabled(s.settings.progress):
            self._unwatch = watch(self.job_id)
        end_with_the_program(self)
        self._thread.start()
        return self

    def await_termination(self, timeout: float | None = None) -> bool:
        """Wait until the job ends (its sources ended, or stop()); re-raise its error.

        Returns False when ``timeout`` seconds passed first.
        """
        ended = self._done.wait(timeout)
        if ended and self._error is not None:
            raise_taken_error(self.job_id, self._error)
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

    def abandon(self) -> None:
        """End the job now, without a final checkpoint or a restart (the program exits)."""
        self._abandoned.set()
        self._stop.set()  # (wakes a restart's back-off)

    def exception(self) -> BaseException | None:
        """The error the job died of, if any."""
        return self._error

    def late_records(self) -> list[dict[str, Any]]:
        """Rows that arrived after their windows expired (the "late" side output)."""
        return self.side_output("late")

    def side_output(self, tag: str) -> list[dict[str, Any]]:
        """Rows of side output ``tag`` ("late", "invalid", or a process function's tag):
        those of committed epochs, then those of epochs still in flight."""
        with self._lock:
            batches = list(self._side.get(tag, []))
            for e in sorted(self._side_pending):
                batches.extend(self._side_pending[e].get(tag, []))
        return batch_to_rows(concat_batches(batches)) if batches else []

    def host_pids(self) -> list[int]:
        """Process ids of the task hosts (local runner; for tests and monitoring)."""
        hosts = self._hosts
        return list(hosts.pids()) if hosts is not None and hasattr(hosts, "pids") else []

    def host_nodes(self) -> list[str]:
        """The Ray node id of every task (Ray runner; for tests and monitoring)."""
        hosts = self._hosts
        return list(getattr(hosts, "nodes", ())) if hosts is not None else []

    def summary(self) -> str:
        """The job in a line (records, checkpoints, late records, restarts), for people."""
        return summary_line(self.metrics())

    def metrics(self) -> dict[str, Any]:
        """Epoch, watermark and its lag, records in/out and state size (at the last
        checkpoint) per operator, task counters (e.g. ``millstream.state_spills``) of the
        current run, late records, checkpoint count/duration/size, restarts, positions."""
        with self._lock:
            m = dict(self._metrics)
            tasks = dict(self._task_metrics)
            late = sum(b.num_rows for b in self._side.get("late", []))
            late += sum(b.num_rows for p in self._side_pending.values()
                        for b in p.get("late", []))
        ops, counters = sum_task_metrics(tasks.values())
        layout = self._layout
        chains = layout.chains if layout is not None else []
        sources = [c for c in chains if c.source is not None]
        wm = self.watermark
        marks = [tasks[c.index]["watermark"] for c in sources if c.index in tasks]
        if sources and len(marks) == len(sources):
            wm = max(wm, min(marks))
        lag = None
        if MIN_WATERMARK < wm < MAX_WATERMARK:
            lag = max(0.0, (self.clock.now() - wm) / 1e6)
        hosts = self._hosts
        if hosts is not None and hasattr(hosts, "rounds"):
            m["rounds"] = hosts.rounds
        m.update(executor=self.executor, epoch=self.epoch, watermark=wm, watermark_lag_s=lag,
                 active=self.is_active, operators=ops, late_records=late, tasks=len(chains),
                 counters=counters,
                 records_in=sum(tasks.get(c.index, {}).get("records_in", 0) for c in sources),
                 records_out=sum(tasks.get(c.index, {}).get("records_out", 0)
                                 for c in chains if c.is_sink),
                 positions={(type(c.source[0]).__name__, c.source[1]):
                            tasks.get(c.index, {}).get("position") for c in sources})
        return m

    # ------------------------------------------------------------------ running

    def _specs(self, restored: Restored) -> list[TaskSpec]:
        """Every task's spec, from ``restored`` (or from the start)."""
        layout, epochs = self._layout, self._epochs
        starts: dict[int, dict[Any, Any]] = {}
        sources: dict[int, tuple[Any, dict[Any, Any]]] = {}
        for c in layout.sources:
            src, part = c.source
            pos = restored.positions[c.key] if c.key in restored.positions else \
                starts.setdefault(id(src), src.start_positions())[part]
            sources.setdefault(id(src), (src, {}))[1][part] = pos
        for src, at in sources.values():
            src.prepare(at)  # e.g. a JSON topic's schema, once for all tasks
        sink_index = {c.index: i for i, c in enumerate(layout.sinks)}
        if self._parallel_sink:
            epochs.retire_sink_instances(len(sink_index))
        inline = self.executor == "inline"
        run_dir = self._run_dir()
        specs = []
        for c in layout.chains:
            source = None
            if c.source is not None:
                src, part = c.source
                source = (src, part, sources[id(src)][1][part])
            sink = (self.sink.for_subtask(sink_index[c.index])
                    if self._parallel_sink and c.is_sink else None)
            specs.append(TaskSpec(
                index=c.index, key=c.key, job_id=self.job_id, stage_id=c.stage.id,
                stage_name=f"{c.stage.id} ({c.stage.purpose})", ops=list(c.pipe.ops),
                senders=list(c.senders), sender_ports=dict(c.sender_ports),
                output=layout.output(c, epochs.key_groups, sink),
                key_grouped=c.key_grouped, key_groups=epochs.key_groups, source=source,
                restore=restored.restore.get(c.index, {}), watermark=restored.watermark,
                epoch=restored.epoch, max_batch_records=self.max_batch_records,
                poll_timeout_s=(self.poll_timeout_s / max(1, len(layout.sources))
                                if inline else self.poll_timeout_s),
                settings={**task_budget(self._memory_limit, len(layout.chains)),
                          "spill_dir": os.path.join(run_dir, f"task-{c.index:04d}")},
                checkpoint=self._checkpoint_location,
                watermark_interval_s=0.0 if inline else min(0.02, self.max_batch_delay_s),
                combine=not inline,
                clock=None if isinstance(self.clock, WallClock) else self.clock))
        return specs

    def _run_dir(self) -> str:
        """Where this run's tasks spill (under the session's scratch; a run killed by a lost
        host leaves files here, removed when the job ends or restarts)."""
        from millstream.runtime.session import get_session

        if self._scratch is None:
            self._scratch = get_session().job_dir(f"stream-{self.job_id}")
        return os.path.join(self._scratch, f"run-{self.restarts}")

    def _launch(self) -> None:
        """Restore (or start) every task in its host."""
        restored = self._epochs.restore()
        self.epoch, self.watermark = restored.epoch, restored.watermark
        with self._lock:
            self._side = restored.side
            self._side_pending = {}
            self._task_metrics = {}
            if restored.from_epoch is not None:
                self._metrics["restored_from_epoch"] = restored.from_epoch
        specs = self._specs(restored)
        if self.executor == "inline":
            self._route = {s.index: 0 for s in specs}
            self._hosts = InlineHosts(specs, self.clock,
                                      idle_sleep_s=min(0.01, self.max_batch_delay_s))
            return
        # task slots: slot i hosts partition i (mod the slots) of every stage
        nslots = max(1, min(self.parallelism, len(specs)))
        self._route = {s.index: s.key[2] % nslots for s in specs}
        slots = [SlotSpec(i, [s for s in specs if self._route[s.index] == i], self._route,
                          capacity=self.inbox_capacity, idle_wait_s=self.max_batch_delay_s)
                 for i in range(nslots)]
        slots = [s for s in slots if s.tasks]
        if len(slots) != nslots:  # (a slot without tasks: renumber)
            renumber = {s.index: i for i, s in enumerate(slots)}
            self._route = {t: renumber[sl] for t, sl in self._route.items()}
            slots = [SlotSpec(i, s.tasks, self._route, capacity=self.inbox_capacity,
                              idle_wait_s=self.max_batch_delay_s) for i, s in enumerate(slots)]
        try:
            payloads = [pickling.dumps(partial(run_slot, slot)) for slot in slots]
        except Exception:
            from millstream.runtime.runner import Runner

            Runner.check_shippable(specs)  # names what cannot be sent
            raise
        try:
            self._hosts = self._runner.start_stream_hosts(payloads, self.inbox_capacity)
        except WorkerLostError as exc:
            raise _HostLost(str(exc)) from None

    def _send_control(self, task: int, msg: tuple) -> None:
        """A coordinator message to task ``task`` (through its slot's host)."""
        if self.executor == "inline":
            self._hosts.send_control(task, msg)
        else:
            self._hosts.send_control(self._route[task], (task, *msg))

    def _trigger(self, final: bool) -> dict[str, Any]:
        e = self.epoch
        for c in self._layout.sources:
            self._send_control(c.index, ("barrier", e, final))
        return {"epoch": e, "final": final, "acks": {}, "started": time.perf_counter(),
                "committing": None}

    def _complete(self, pending: dict[str, Any], out: dict[int, list[pa.RecordBatch]]) -> None:
        """All tasks acknowledged: write the checkpoint, then commit."""
        e = pending["epoch"]
        with self._lock:
            committed_side = {t: list(v) for t, v in self._side.items()}
            for tag, batches in self._side_pending.get(e, {}).items():
                committed_side.setdefault(tag, []).extend(batches)
        wm, size, handles, driver_handle = self._epochs.complete(
            e, pending["acks"], out.pop(e, []), committed_side, self.watermark)
        if size is not None:
            with self._lock:
                self._metrics["last_checkpoint_bytes"] = size
        self._epochs.commit(handles, driver_handle)
        if self._epochs.commits_in_task:
            sinks = [c.index for c in self._layout.sinks]
            for i in sinks:
                self._send_control(i, ("commit", e))
            pending["committing"] = set(sinks)
        self.watermark = wm
        with self._lock:
            self._side = committed_side
            self._side_pending.pop(e, None)
        if not pending["committing"]:
            self._committed(pending)

    def _committed(self, pending: dict[str, Any]) -> None:
        e = pending["epoch"]
        self._epochs.committed(e)
        with self._lock:
            self._metrics["checkpoints"] += 1
            self._metrics["last_checkpoint_epoch"] = e
            self._metrics["last_checkpoint_seconds"] = round(
                time.perf_counter() - pending["started"], 6)
        self.epoch = e + 1
        if BUS.active:
            checkpoint_event(self, pending, "completed")

    def _run_once(self) -> None:
        """Run the tasks until the job ends; raise _HostLost when a host dies."""
        self._launch()
        hosts = self._hosts
        chains = self._layout.chains
        n = len(chains)
        pending: dict[str, Any] | None = None
        out: dict[int, list[pa.RecordBatch]] = {}
        ended: set[int] = set()
        done: set[int] = set()
        n_sources = len(self._layout.sources)
        active: set[int] = set()  # epochs in which something happened
        last = time.monotonic()
        final_done = False
        published = 0.0  # when metrics were last published (when anybody listens)
        while True:
            if self._abandoned.is_set():
                raise _Abandoned()
            if BUS.active and time.monotonic() - published >= METRICS_EVERY_S:
                published = time.monotonic()
                stream_metrics(self)
            for msg in hosts.poll(0.02):
                kind, idx = msg[0], msg[1]
                if kind == "ack":
                    if pending is None or msg[2] != pending["epoch"]:
                        raise StreamingError(f"task {idx} acknowledged epoch {msg[2]}, but the "
                                             f"checkpoint in flight is "
                                             f"{pending and pending['epoch']}")
                    pending["acks"][idx] = msg[3]
                    if len(pending["acks"]) == n:
                        self._complete_or_report(pending, out)
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
                    out.setdefault(msg[2], []).append(msg[3])
                elif kind == "side":
                    with self._lock:
                        self._side_pending.setdefault(msg[2], {}).setdefault(
                            msg[3], []).extend(msg[4])
                elif kind == "metrics":
                    with self._lock:
                        self._task_metrics[idx] = msg[2]
                elif kind == "active":
                    active.add(msg[2])
                    if msg[3]:
                        self._epochs.maybe_fail(msg[2], "during_epoch")
                elif kind == "ended":
                    ended.add(idx)
                elif kind == "done":
                    done.add(idx)
                elif kind == "error":
                    if isinstance(msg[4], WorkerLostError):  # a peer's host died, not the task
                        c = chains[idx]
                        raise _HostLost(f"task {c.key} (stage {c.stage.id}) lost a peer: "
                                        f"{msg[2]}")
                    raise TaskFailed(chains[idx], msg[2], msg[3], msg[4],
                                      msg[5] if len(msg) > 5 else None)
            if final_done and len(done) == n:
                return
            dead = hosts.dead()
            if dead:
                slot, why = dead[0]
                if final_done:  # exited after the end anyway
                    return
                c = next(c for c in chains if self._route.get(c.index) == slot)
                raise _HostLost(f"the host of task slot {slot} (with task {c.key}, stage "
                                f"{c.stage.id}, partition {c.key[2]}) died: {why}")
            if pending is not None and \
                    time.perf_counter() - pending["started"] > self.checkpoint_timeout_s:
                # a task stuck (or a message lost): as Flink, a checkpoint that does not
                # complete in time fails the attempt, which restarts from the last one
                missing = sorted(chains[i].key for i in range(n) if i not in pending["acks"])
                why = (f"checkpoint {pending['epoch']} did not complete within "
                       f"{self.checkpoint_timeout_s:g}s (no acknowledgement from "
                       f"tasks {missing[:8]})")
                if BUS.active:
                    checkpoint_event(self, pending, "failed", why)
                raise _HostLost(why)
            if pending is None and not final_done:
                if len(ended) == n_sources or self._stop.is_set():
                    pending = self._trigger(final=True)
                elif self.epoch in active and time.monotonic() - last >= self.interval_s:
                    pending = self._trigger(final=False)

    def _complete_or_report(self, pending: dict[str, Any],
                            out: dict[int, list[pa.RecordBatch]]) -> None:
        """:meth:`_complete`; a checkpoint that fails there is reported as failed."""
        try:
            self._complete(pending, out)
        except BaseException as exc:
            if BUS.active:
                checkpoint_event(self, pending, "failed", error_text(exc))
            raise

    def _main(self) -> None:
        crashed = False
        try:
            resolve_broadcast_tables(self._stages)  # bounded sides of stream-table joins, once
            self._layout = Layout(self._stages, self.parallelism, self.stop_at_end)
            if BUS.active:
                stream_started(self)
            self._epochs = Epochs(self.job_id, self.store, self.sink, self._layout,
                                  self.parallelism,
                                  self._key_groups_option or DEFAULT_KEY_GROUPS,
                                  self._key_groups_option, self._parallel_sink, self._fault)
            while True:
                try:
                    self._run_once()
                    break
                except _HostLost as exc:
                    self._shutdown_hosts()
                    shutil.rmtree(self._run_dir(), ignore_errors=True)  # a dead task's spills
                    if self._abandoned.is_set():
                        raise _Abandoned() from None
                    if self.store is None or self.restarts >= self.max_restarts:
                        raise StreamingError(
                            f"streaming job {self.job_id}: {exc}; "
                            + ("no checkpoint location to restart from" if self.store is None
                               else f"gave up after {self.restarts} restart(s)")) from None
                    self.restarts += 1
                    with self._lock:
                        self._metrics["restarts"] = self.restarts
                    publish("restart", job=self.job_id, restart=self.restarts, cause=str(exc))
                    _log.warning("streaming job %s: %s; restarting from the last checkpoint "
                                 "(restart %d of %d)", self.job_id, exc, self.restarts,
                                 self.max_restarts)
                    # back off a little, so a cluster notices a lost node before the
                    # tasks are placed again (0.5 s, 1 s, 2 s, ...)
                    self._stop.wait(min(0.5 * 2 ** (self.restarts - 1), 5.0))
        except TaskFailed as exc:
            self._error = exc.error()
            note_failure(self.job_id, exc.text)
        except SimulatedCrash as exc:  # a killed driver: no cleanup
            self._error = exc
            crashed = True
        except _Abandoned:
            self._error = StreamingError(
                f"streaming job {self.job_id} ended with the program that ran it (no final "
                f"checkpoint; a restart continues from the last one)")
        except BaseException as exc:  # noqa: BLE001 - surfaces in await_termination
            self._error = exc
            note_failure(self.job_id, repr(exc))
        finally:
            self._shutdown_hosts(crashed)
            if not self._parallel_sink and not crashed:  # parallel sinks close in their tasks
                close_quietly(self.sink, "the sink")
            if self._scratch is not None:
                shutil.rmtree(self._scratch, ignore_errors=True)
            if BUS.active and self._layout is not None:
                stream_ended(self, self._error)
            if self._unwatch is not None:
                self._unwatch()
            self._done.set()

    def _shutdown_hosts(self, crashed: bool = False) -> None:
        if self._hosts is not None:
            with self._lock:
                self._metrics["rounds"] = getattr(self._hosts, "rounds", None)
            try:
                if isinstance(self._hosts, InlineHosts):
                    self._hosts.shutdown(crashed)
                else:
                    self._hosts.shutdown()
            except Exception:  # noqa: BLE001
                _log.warning("stopping the task hosts failed", exc_info=True)
            self._hosts = None


class _HostLost(Exception):
    """A task host died (not an error the task raised)."""


class _Abandoned(Exception):
    """The program is exiting while the job runs."""
