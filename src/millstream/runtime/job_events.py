"""The events jobs publish, built from the jobs themselves (see
:mod:`millstream.runtime.events` for the bus and the list of event types).

Batch: the stage graph of the physical plan (what each stage reads, its fused operators,
its output), the plans and the optimizer's rules that fired, and the job's outcome.
Streaming: the operator graph (stages, their operators and tasks, who feeds whom),
metrics snapshots (``job.metrics()`` plus per-task watermarks, backpressure, positions),
checkpoints, restarts and the end. Only called while somebody listens.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from millstream.plan.stages import BlocksPort, ShufflePort, SourcePort, Stage, all_stages
from millstream.runtime.events import BUS, call_site, error_text

_log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])


def guarded(fn: F) -> F:
    """Building an event never fails the job that publishes it (it is logged instead)."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception:  # noqa: BLE001 - observers must not break jobs
            _log.warning("publishing %s failed", fn.__name__, exc_info=True)
            return None

    return call  # type: ignore[return-value]


def describe(thing: Any) -> str:
    """What a source or sink calls itself (its class name when it has no ``describe``)."""
    text = getattr(thing, "describe", None)
    return text() if callable(text) else type(thing).__name__.lstrip("_")


def _counters(counters: dict[tuple[str, str], int]) -> dict[str, int]:
    return {f"{group}.{name}": value for (group, name), value in counters.items()}


def _port_kind(port: Any) -> str:
    if isinstance(port, SourcePort):
        return "source"
    if isinstance(port, ShufflePort):
        return "shuffle"
    if isinstance(port, BlocksPort):
        return "cache" if port.blocks is not None else "blocks"
    return type(port).__name__


def _output_text(st: Stage) -> str:
    if st.output_kind == "shuffle":
        return f"shuffle write, {st.partitioner.describe()}"
    if st.output_kind == "sink":
        return f"write {describe(st.sink)}"
    return "materialize" + (f" (cache #{st.cache_id})" if st.cache_id else "")


def stage_info(st: Stage) -> dict[str, Any]:
    """A stage of the physical plan as the dashboard draws it."""
    return {
        "id": st.id, "purpose": st.purpose, "deps": [d.id for d in st.deps],
        "output": st.output_kind, "output_text": _output_text(st),
        "cached": st.cache_id is not None, "text": st.describe(),
        "pipelines": [{"ports": [{"kind": _port_kind(p), "text": p.describe()} for p in pipe.ports],
                       "ops": list(pipe.descriptions)} for pipe in st.pipelines],
    }


@guarded
def job_started(job: Any) -> None:
    """A batch job (``runtime.scheduler.Job``) starts."""
    st = job.settings
    BUS.publish({
        "type": "job_start", "ts": time.time(), "job": job.job_id, "kind": "batch",
        "name": call_site() or f"job {job.job_id}", "runner": st.runner,
        "parallelism": st.resolved_parallelism(), "in_driver": job.in_driver,
        "stages": [stage_info(s) for s in all_stages(job.final)], "plan": job.plan or {}})


@guarded
def job_ended(job: Any, error: BaseException | None) -> None:
    """A batch job ends (``error``: what it failed with)."""
    stats = job.stats
    stages = {s["stage"]: s for s in stats.stages}
    reads = [s for s in all_stages(job.final)
             if any(isinstance(p, SourcePort) or (isinstance(p, BlocksPort) and p.blocks is not None)
                    for pipe in s.pipelines for p in pipe.ports)]
    rows_in = sum(stages[s.id]["rows_in"] for s in reads if s.id in stages)
    bytes_in = sum(stages[s.id].get("bytes_in", 0) for s in reads if s.id in stages)
    final = stages.get(job.final.id, {})
    event: dict[str, Any] = {
        "type": "job_end", "ts": time.time(), "job": job.job_id,
        "status": "failed" if error is not None else "succeeded", "seconds": stats.seconds,
        "rows_in": rows_in, "bytes_in": bytes_in, "rows_out": final.get("rows_out", 0),
        "bytes_out": final.get("bytes_out", 0), "counters": _counters(stats.counters)}
    if error is not None:
        event["error"] = error_text(error)
        user_tb = getattr(error, "user_traceback", None)
        if user_tb:
            event["user_traceback"] = user_tb
    BUS.publish(event)


@guarded
def plan_info(node: Any, planner_settings: Any) -> dict[str, Any] | None:
    """The logical and optimized plans of a job and the optimizer rules that fired."""
    from millstream.plan.optimizer import optimize_traced

    optimized, fired = optimize_traced(node, planner_settings)
    return {"logical": node.tree(), "optimized": optimized.tree(), "rules": fired}


# ---------------------------------------------------------------------------- streaming


@guarded
def stream_started(sjob: Any) -> None:
    """A streaming job's layout is known: its operator graph."""
    layout = sjob._layout
    stages: dict[int, dict[str, Any]] = {}
    for c in layout.chains:
        st = stages.get(c.stage.id)
        if st is None:
            descriptions = list(c.pipe.descriptions)
            ops = [{"name": op.name,
                    "text": descriptions[i] if i < len(descriptions) else op.name}
                   for i, op in enumerate(c.ops)]
            st = stages[c.stage.id] = {
                "id": c.stage.id, "purpose": c.stage.purpose, "ops": ops, "tasks": [],
                "inputs": set(), "source": None, "output": _stream_output(c.stage)}
        st["tasks"].append(c.index)
        if c.source is not None:
            st["source"] = describe(c.source[0])
        for s in c.senders:
            st["inputs"].add(layout.chains[s].stage.id)
    for st in stages.values():
        st["inputs"] = sorted(st["inputs"])
    BUS.publish({
        "type": "stream_start", "ts": time.time(), "job": sjob.job_id, "kind": "stream",
        "name": sjob.name, "executor": sjob.executor, "parallelism": sjob.parallelism,
        "checkpoint": sjob._checkpoint_location[0] if sjob._checkpoint_location else None,
        "interval_s": sjob.interval_s, "stages": list(stages.values()),
        "tasks": [{"index": c.index, "stage": c.stage.id, "partition": c.key[2]}
                  for c in layout.chains]})


def _stream_output(stage: Stage) -> str:
    if stage.output_kind == "shuffle":
        return f"exchange, {stage.partitioner.describe()}"
    if stage.output_kind == "sink" and stage.sink is not None:
        return f"write {describe(stage.sink)}"
    return "to the job's sink"


def json_metrics(m: dict[str, Any]) -> dict[str, Any]:
    """``job.metrics()`` with JSON keys (source positions keyed by "Source[partition]")."""
    out = dict(m)
    out["positions"] = [{"source": k[0], "partition": str(k[1]), "position": _plain(v)}
                        for k, v in m.get("positions", {}).items()]
    return out


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


@guarded
def stream_metrics(sjob: Any, final: bool = False) -> None:
    """A snapshot of a streaming job's metrics, with per-task detail."""
    m = json_metrics(sjob.metrics())
    with sjob._lock:
        tasks = {i: dict(t) for i, t in sjob._task_metrics.items()}
    detail = []
    for i, t in sorted(tasks.items()):
        detail.append({
            "index": i, "watermark": t.get("watermark"), "records_in": t.get("records_in", 0),
            "records_out": t.get("records_out", 0), "blocked_s": t.get("blocked_s", 0.0),
            "idle": t.get("idle", False), "position": _plain(t.get("position")),
            "operators": t.get("operators", {}), "state_bytes": t.get("state_bytes", {})})
    BUS.publish({"type": "stream_metrics", "ts": time.time(), "job": sjob.job_id,
                 "final": final, "now": sjob.clock.now(), "metrics": m, "tasks": detail})


@guarded
def checkpoint_event(sjob: Any, pending: dict[str, Any], status: str,
                     error: str | None = None) -> None:
    """A checkpoint completed (committed) or failed."""
    acks = pending.get("acks", {})
    groups: dict[str, dict[str, int]] = {}
    for ack in acks.values():
        for op, sizes in (ack.get("state_groups") or {}).items():
            dst = groups.setdefault(op, {})
            for g, size in sizes.items():
                dst[str(g)] = dst.get(str(g), 0) + size
    event = {
        "type": "checkpoint", "ts": time.time(), "job": sjob.job_id,
        "epoch": pending["epoch"], "status": status, "final": pending.get("final", False),
        "seconds": time.perf_counter() - pending["started"],
        "bytes": sjob._metrics.get("last_checkpoint_bytes") if status == "completed" else None,
        "incremental_bytes": sum(a.get("blob_bytes", 0) for a in acks.values()),
        "alignment_s": max([a.get("alignment_s", 0.0) for a in acks.values()] or [0.0]),
        "acks": len(acks), "state_groups": groups}
    if error is not None:
        event["error"] = error
    BUS.publish(event)


@guarded
def stream_ended(sjob: Any, error: BaseException | None) -> None:
    """A streaming job ended: a last metrics snapshot, then its outcome."""
    stream_metrics(sjob, final=True)
    event: dict[str, Any] = {"type": "stream_end", "ts": time.time(), "job": sjob.job_id,
                             "status": "failed" if error is not None else "finished",
                             "restarts": sjob.restarts}
    if error is not None:
        event["error"] = error_text(error)
        user_tb = getattr(error, "user_traceback", None)
        if user_tb:
            event["user_traceback"] = user_tb
    BUS.publish(event)
