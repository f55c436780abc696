"""The coordinator's side of checkpoints: restoring tasks from the newest usable checkpoint,
and completing an epoch once every task acknowledged its barrier.

Completing epoch ``e``: the driver-side sink (collecting, ``ms.sink(fn)``, console) gets
the rows the tasks sent for ``e`` and pre-commits; the checkpoint (operator snapshots,
keyed ones per key group, source positions, the watermark, sink handles, the source
readers' handles, side outputs) is written with ``_COMPLETE``; then the sinks commit:
driver-side and file sinks here, sinks that commit in their own task (Kafka
transactions) when told to; then ``_COMMITTED``, and the source readers' handles (their
dead letters) commit. A restore commits the restored checkpoint's handles again. Fault points (``fault=(epoch, point)``, tests) raise
:class:`~millstream.errors.SimulatedCrash` at the named moment.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from millstream.core.time import MIN_WATERMARK
from millstream.errors import PlanError, SimulatedCrash
from millstream.runtime.checkpoint import (
    CheckpointError,
    CheckpointStore,
    RestoreTarget,
    plan_restore,
)
from millstream.runtime.streaming.layout import Layout

_log = logging.getLogger(__name__)

#: Points where ``fault=(epoch, point)`` raises :class:`SimulatedCrash`.
FAULT_POINTS = ("during_epoch", "before_checkpoint", "after_checkpoint", "after_commit")


def check_fault(fault: tuple[int, str] | None) -> tuple[int, str] | None:
    """``fault`` if it names a known point (a PlanError otherwise)."""
    if fault is not None and fault[1] not in FAULT_POINTS:
        raise PlanError(f"fault point {fault[1]!r} is not one of {FAULT_POINTS}")
    return fault


@dataclass
class Restored:
    """Where a run of the job starts: the epoch, watermark, source positions and, per task,
    what each operator restores (empty when nothing was checkpointed yet)."""

    epoch: int = 1
    watermark: int = MIN_WATERMARK
    from_epoch: int | None = None
    positions: dict[Any, Any] = field(default_factory=dict)
    restore: dict[int, dict[int, Any]] = field(default_factory=dict)
    side: dict[str, list[pa.RecordBatch]] = field(default_factory=dict)


class Epochs:
    """Checkpoint bookkeeping of one job: restore, complete, commit."""

    def __init__(self, job_id: str, store: CheckpointStore | None, sink: Any, layout: Layout,
                 parallelism: int, key_groups: int, key_groups_option: int | None,
                 parallel_sink: bool, fault: tuple[int, str] | None) -> None:
        self.job_id = job_id
        self.store = store
        self.sink = sink
        self.layout = layout
        self.parallelism = parallelism
        self.key_groups = key_groups
        self.key_groups_option = key_groups_option
        self.parallel_sink = parallel_sink
        self.commits_in_task = bool(getattr(sink, "commits_in_subtask", False))
        self.fault = fault
        #: per epoch completed and not yet committed: the source readers' handles
        self._source_handles: dict[int, list[Any]] = {}

    def maybe_fail(self, epoch: int, point: str) -> None:
        """Raise the simulated crash of fault injection at ``point`` of ``epoch``."""
        if self.fault is not None and self.fault == (epoch, point):
            raise SimulatedCrash(f"fault injection: crash at {point} of epoch {epoch}")

    # ------------------------------------------------------------------ restore

    def restore(self) -> Restored:
        """The newest usable checkpoint, with its sink handles committed again (idempotent:
        repairs a crash between ``_COMPLETE`` and the commits).

        A sink that can re-commit a restored epoch (files) restores the newest complete
        checkpoint. One that cannot (a Kafka transaction dies with its producer) restores
        the newest checkpoint whose commit is known, and the epochs after it are replayed.
        """
        recommit = getattr(self.sink, "recommit_on_restore", True)
        self._source_handles.clear()  # an earlier run's: in the checkpoint, or never to commit
        latest = (self.store.latest(committed_only=not recommit, keyed_as_blobs=True)
                  if self.store is not None else None)
        if latest is None:
            return Restored()
        epoch, state = latest
        if not recommit:  # newer checkpoints (commit unknown) are replayed: they go
            self.store.discard_after(epoch)
        if state.get("version", 1) < 2 or "signature" not in state:
            raise CheckpointError(f"checkpoint {self.store.uri} epoch {epoch} has a format this "
                                  f"version cannot restore (version {state.get('version', 1)})")
        chains = self.layout.chains
        targets = [RestoreTarget(c.key, c.ops, c.key_grouped, c.source is not None, c.n)
                   for c in chains]
        self.key_groups, plan = plan_restore(
            self.store.uri, epoch, state, targets, signature=self.layout.signature(),
            parallelism=self.parallelism, key_groups_option=self.key_groups_option)
        if recommit:
            if state.get("sink_handle") is not None:
                self.sink.commit(state["sink_handle"])
            for h in state.get("sink_handles", ()):
                self.sink.commit(h)
        for h in state.get("source_handles", ()):
            h.commit()
        _log.info("streaming job %s restored from checkpoint epoch %d", self.job_id, epoch)
        return Restored(epoch + 1, state["watermark"], epoch, state["positions"],
                        {c.index: plan[c.key] for c in chains},
                        {t: list(v) for t, v in state.get("side", {}).items()})

    def retire_sink_instances(self, n: int) -> None:
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

    # ------------------------------------------------------------------ complete

    def complete(self, epoch: int, acks: dict[int, dict[str, Any]], rows: list[pa.RecordBatch],
                 committed_side: dict[str, list[pa.RecordBatch]], watermark: int
                 ) -> tuple[int, int | None, list[Any], Any]:
        """Every task acknowledged ``epoch``: pre-commit the driver-side sink, write the
        checkpoint. Returns (the job watermark, checkpoint bytes, the parallel sinks'
        handles, the driver sink's handle); :meth:`commit` makes them visible."""
        chains = self.layout.chains
        driver_handle = None
        if not self.parallel_sink:
            self.sink.begin(epoch)
            for b in rows:
                self.sink.write(b)
            driver_handle = self.sink.pre_commit(epoch)
        handles = [acks[c.index]["sink_handle"] for c in self.layout.sinks
                   if self.parallel_sink]
        source_handles = [h for c in self.layout.sources
                          if (h := acks[c.index].get("source_handle")) is not None]
        self._source_handles[epoch] = source_handles
        source_wms = [acks[c.index]["watermark"] for c in self.layout.sources]
        wm = max(watermark, min(source_wms)) if source_wms else watermark
        self.maybe_fail(epoch, "before_checkpoint")
        size = None
        if self.store is not None:
            ops: dict[tuple[int, ...], Any] = {}
            keyed: dict[tuple[int, ...], dict[int, list[Any]]] = {}
            for c in chains:
                ack = acks[c.index]
                for k, snap in ack["ops"].items():
                    ops[(*c.key, k)] = snap
                for k, groups in ack["keyed"].items():
                    dst = keyed.setdefault((*c.key[:2], k), {})
                    for g, st in groups.items():
                        dst.setdefault(g, []).append(st)
            state = {
                "version": 2, "epoch": epoch,
                "signature": self.layout.signature(), "parallelism": self.parallelism,
                "layout": self.layout.keys(), "key_groups": self.key_groups,
                "positions": {c.key: acks[c.index]["position"] for c in self.layout.sources},
                "ops": ops, "keyed": keyed, "watermark": wm,
                "sink_handle": driver_handle,
                "sink_handles": [] if self.commits_in_task else handles,
                "source_handles": source_handles,
                "side": committed_side,
            }
            self.store.write(epoch, state)
            # the state file, and the blobs the tasks wrote themselves
            size = self.store.last_size + sum(a.get("blob_bytes", 0) for a in acks.values())
        self.maybe_fail(epoch, "after_checkpoint")
        return wm, size, handles, driver_handle

    def commit(self, handles: list[Any], driver_handle: Any) -> None:
        """Make the epoch visible in the sinks that commit here (not those that commit in
        their own task)."""
        if driver_handle is not None:
            self.sink.commit(driver_handle)
        if not self.commits_in_task:
            for h in handles:
                self.sink.commit(h)

    def committed(self, epoch: int) -> None:
        """Every sink committed ``epoch``: record it, then commit the source readers'
        handles (a crash in between: the restore of this checkpoint commits them)."""
        if self.store is not None:
            self.store.mark_committed(epoch)
        for h in self._source_handles.pop(epoch, ()):
            h.commit()
        self.maybe_fail(epoch, "after_commit")
