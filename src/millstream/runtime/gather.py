"""Adaptive execution of small sorts and top-k: their last step in one task.

A global sort of a large input samples its keys, range-partitions the rows and sorts each
partition; a top-k keeps the first rows per task, then those of all tasks in one. Both
cost stages and tasks that a small input does not need (TPC-H's sorts after a group-by
read a handful of rows). The batch scheduler calls :func:`adapt_gather` before each stage:
for a pipeline marked with an :class:`~millstream.plan.stages.AdaptiveGather`, when what
the sort's (or top-k's) input stage reads measured small, that stage's operators run in
the one final task instead (the group-by's last step and the sort in one task); when the
input stage has run and its output measured small, the one task reads it without the
range shuffle. Decisions go to the job's notes (``ms.last_job_stats().explain()``).
"""

from __future__ import annotations

from typing import Any

from millstream.core.units import format_size
from millstream.ops.aggregate import DistinctFinal, FinalAggregate, PartialAggregate
from millstream.ops.join import HashJoin
from millstream.ops.join.runtime_filter import KeyFilter
from millstream.ops.narrow import (
    Drop,
    FilterExpr,
    FilterRows,
    LocalLimit,
    MapRows,
    Project,
    Rename,
    WithColumns,
)
from millstream.ops.sort import Sort
from millstream.ops.topk import TopK
from millstream.plan.stages import (
    AdaptiveGather,
    BlocksPort,
    Pipeline,
    ShufflePort,
    SourcePort,
    Stage,
    all_stages,
)
from millstream.runtime.events import BUS, publish

#: Operators that never give more rows than they read (exact classes: a FlatMapRows is a
#: MapRows that may), so a pipeline of them fed by few rows yields few rows.
_NOT_GROWING = (FinalAggregate, PartialAggregate, DistinctFinal, Project, WithColumns,
                FilterExpr, Drop, Rename, LocalLimit, MapRows, FilterRows, TopK, Sort,
                KeyFilter)


def adapt_gather(job: Any, st: Stage) -> bool:
    """Before ``st`` runs (``job``: the scheduler's ``Job``): run a small sort's or top-k's
    input in its one final task, or skip a small sort's range shuffle. True when the plan
    changed (``st`` may then no longer run)."""
    for consumer in all_stages(job.final):
        for idx, pipe in enumerate(consumer.pipelines):
            g = pipe.gather
            if g is None or g.decision is not None:
                continue
            if st is g.source:
                if _fuse(job, consumer, idx, pipe, g):
                    return True
                if g.range_stage is None:
                    g.decision = (f"{g.label} in one task ({g.planned})" if g.planned else
                                  f"{g.label}: partial step per task, then one task")
                    job.stats.notes.append(f"adaptive: {g.decision}; stage {st.id} "
                                           f"({st.purpose}) runs on its own")
            elif st is g.range_stage:
                return _skip_range(job, consumer, idx, pipe, g)
    return False


def _fuse(job: Any, consumer: Stage, idx: int, pipe: Pipeline, g: AdaptiveGather) -> bool:
    """Run ``g.source``'s pipeline in the consumer's one task when what it reads is
    measured (or by the planner known) small."""
    src = g.source
    if len(src.pipelines) != 1 or src.cache_id is not None or job._consumers(src) != 1:
        return False
    p = src.pipelines[0]
    size = _input_size(job, p)
    one_anyway = size is None and g.range_stage is None and not g.planned and p.ports \
        and len(job._port_inputs(p.ports[0])) == 1
    if one_anyway:
        # a top-k whose partial step runs in one task anyway: the final step joins it
        what = "its input stage runs in one task"
    elif size is None:
        if not g.planned or any(not isinstance(port, SourcePort) for port in p.ports):
            return False
        what = g.planned
    else:
        rows, nbytes = size
        if rows > g.max_rows or nbytes > g.max_bytes:
            return False
        what = f"input measured {rows} rows, {format_size(nbytes)}"
    factor = 1.0 if one_anyway else _growth(job, p)
    if factor is None or (size is not None and size[0] * factor > g.max_rows):
        return False
    fused = p.copy()
    fused.single_task = True
    fused.gather = None
    fused.ops.extend(pipe.ops)
    fused.descriptions.extend(pipe.descriptions)
    consumer.pipelines[idx:idx + 1] = [fused]
    g.decision = f"{g.label} in one task, fused with its input stage ({what})"
    job.stats.notes.append(f"adaptive: {g.decision}; stage {src.id} ({src.purpose}) runs in "
                           f"stage {consumer.id}'s one task")
    _skipped(job, [src, g.range_stage], g.decision)
    return True


def _skip_range(job: Any, consumer: Stage, idx: int, pipe: Pipeline,
                g: AdaptiveGather) -> bool:
    """The sort's input has run: sort it in one task when it measured small, without the
    range shuffle."""
    rows = job.measured_rows.get(g.source.id)
    nbytes = job.measured.get(g.source.id)
    if rows is None or nbytes is None or rows > g.max_rows or nbytes > g.max_bytes:
        g.decision = f"{g.label} range-partitioned" + (
            "" if rows is None or nbytes is None else
            f" (input measured {rows} rows, {format_size(nbytes)}: over {g.max_rows} rows "
            f"or {format_size(g.max_bytes)})")
        job.stats.notes.append(f"adaptive: {g.decision}")
        return False
    one = Pipeline([BlocksPort(stage=g.source)], list(pipe.ops), list(pipe.descriptions),
                   single_task=True)
    consumer.pipelines[idx:idx + 1] = [one]
    g.decision = f"{g.label} in one task (input measured {rows} rows, {format_size(nbytes)})"
    job.stats.notes.append(f"adaptive: {g.decision}; stage {g.range_stage.id} "
                           f"({g.range_stage.purpose}) not run")
    _skipped(job, [g.range_stage], g.decision)
    return True


def _skipped(job: Any, stages: list[Stage | None], why: str) -> None:
    """Tell listeners (the dashboard) that stages of the plan will not run."""
    if BUS.active:
        for s in stages:
            if s is not None:
                publish("stage_end", job=job.job_id, stage=s.id, status="skipped",
                        why=f"adaptive: {why}")


def _input_size(job: Any, p: Pipeline) -> tuple[int, int] | None:
    """Rows and bytes the pipeline's ports hold, when all were measured (or cached)."""
    rows = nbytes = 0
    for port in p.ports:
        if isinstance(port, BlocksPort) and port.blocks is not None:
            rows += sum(getattr(b, "rows", 0) or 0 for b in port.blocks)
            nbytes += sum(getattr(b, "nbytes", 0) or 0 for b in port.blocks)
            continue
        if not isinstance(port, (ShufflePort, BlocksPort)) or port.stage is None \
                or port.stage.results is None or port.stage.id not in job.measured_rows:
            return None
        rows += job.measured_rows[port.stage.id]
        nbytes += job.measured[port.stage.id]
    return rows, nbytes


def _growth(job: Any, p: Pipeline) -> float | None:
    """How many times its input rows the pipeline may yield at most (None: unbounded)."""
    if p.adaptive is not None and p.adaptive.decision is None:
        return None
    factor = 1.0
    for f in p.ops:
        bst = f.kwargs.get("broadcast_stage") if isinstance(f.kwargs, dict) else None
        how = f.args[2] if len(f.args) > 2 else None
        if f.cls in _NOT_GROWING:
            continue
        if bst is not None and issubclass(f.cls, HashJoin):
            # each streamed row meets at most every row of the broadcast side
            b = job.measured_rows.get(bst.id)
            if b is None:
                return None
            factor *= 1.0 if how in ("semi", "anti") else max(1.0, float(b))
        elif f.cls is HashJoin and how in ("semi", "anti"):
            continue  # the left side's rows at most
        else:
            return None
    return factor

