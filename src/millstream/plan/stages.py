"""The physical plan's data structures: stages of pipelines fed by ports.

A :class:`Stage` is a set of :class:`Pipeline` s whose tasks run in parallel and end in
one kind of output (a shuffle write, materialized blocks, or a sink). A pipeline's ports
say what its tasks read: source splits (:class:`SourcePort`), one reduce partition of a
stage's shuffle output (:class:`ShufflePort`), or materialized blocks (:class:`BlocksPort`).
The physical planner (``plan/physical.py``) builds them; the schedulers run them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from millstream.core.shuffle import Partitioner, RangePartitioner
from millstream.io.base import Source
from millstream.ops.base import OperatorFactory


# ----------------------------------------------------------------- ports
@dataclass
class SourcePort:
    """Tasks = the source's splits."""

    source: Source

    def describe(self) -> str:
        return f"scan {self.source.describe()}"


@dataclass
class ShufflePort:
    """Task i reads reduce partition i of the stage's map outputs."""

    stage: Stage

    def describe(self) -> str:
        return f"shuffle read from stage {self.stage.id}"


@dataclass
class BlocksPort:
    """Task i reads block i of a materialized stage or cached dataset."""

    stage: Stage | None = None
    blocks: list[Any] | None = None
    label: str = ""

    def describe(self) -> str:
        if self.blocks is not None:
            return self.label or f"{len(self.blocks)} cached block(s)"
        return f"blocks of stage {self.stage.id}"


@dataclass
class AdaptiveJoin:
    """A shuffle join the batch scheduler may turn into a broadcast join at run time
    (adaptive execution): when one side's map stage has run and its measured output is
    at most ``threshold`` bytes, the other side is not shuffled but joined, task by task,
    against that side's whole output (``broadcast_right``/``broadcast_left``: the join
    operator to use then, None where the join type cannot broadcast that side). The
    join operator is the first of the pipeline that holds this."""

    left: Stage
    right: Stage
    threshold: int
    broadcast_right: OperatorFactory | None
    broadcast_left: OperatorFactory | None
    #: estimated bytes of each side (None: unknown): the smaller side's map stage runs first
    left_bytes: float | None = None
    right_bytes: float | None = None
    label: str = "join"
    #: what the scheduler decided (for the job's statistics)
    decision: str | None = None
    #: runtime filters (``ops.join.runtime_filter.KeyFilter``) for the left / right side's
    #: map stage, fed by the other side's output, when the join type lets that side's
    #: unmatched rows go (None: it does not): added when the other side ran first and is
    #: not small enough to broadcast but well smaller than this side
    filter_left: OperatorFactory | None = None
    filter_right: OperatorFactory | None = None


@dataclass
class AdaptiveGather:
    """The last step of a global sort or a top-k, which the batch scheduler runs in one
    task when its input is small (adaptive execution): before ``source`` (the stage whose
    tasks feed it: the sort's input, the top-k's partial step) runs, when everything
    ``source`` reads measured at most ``max_rows`` rows and ``max_bytes`` bytes (and its
    operators cannot multiply rows past that), ``source``'s pipeline runs in the one
    task, fused in front of this pipeline's operators; otherwise, for a sort, when
    ``source``'s own output measured that small, the one task reads it without the range
    shuffle (``range_stage``, then never run). The pipeline that holds this is the one
    the decision replaces."""

    source: Stage
    range_stage: Stage | None
    max_rows: int
    max_bytes: int
    label: str = "sort"
    #: the planner's reason to run it in one task from the start (a sure bound), else None
    planned: str | None = None
    #: what the scheduler decided (for the job's statistics)
    decision: str | None = None


@dataclass
class Pipeline:
    """Tasks sharing a fused operator chain; ``ports`` feed the first operator."""

    ports: list[Any]
    ops: list[OperatorFactory] = field(default_factory=list)
    descriptions: list[str] = field(default_factory=list)
    #: a shuffle join (the first operator) that may become a broadcast join at run time
    adaptive: AdaptiveJoin | None = None
    #: all of the ports' partitions (splits, shuffle partitions, blocks) in one task
    single_task: bool = False
    #: a sort's or top-k's last step that may run in one task at run time
    gather: AdaptiveGather | None = None

    def copy(self) -> Pipeline:
        return Pipeline(list(self.ports), list(self.ops), list(self.descriptions),
                        self.adaptive, self.single_task, self.gather)

    def add(self, factory: OperatorFactory, text: str) -> None:
        self.ops.append(factory)
        self.descriptions.append(text)


_stage_ids = itertools.count(1)


@dataclass(eq=False)
class Stage:
    """A set of pipelines whose tasks run in parallel, ending in one kind of output."""

    pipelines: list[Pipeline]
    output_kind: str  # "shuffle" | "blocks" | "sink"
    partitioner: Partitioner | None = None
    sink: Any = None
    cache_id: int | None = None
    purpose: str = ""
    id: int = field(default_factory=lambda: next(_stage_ids))
    #: streaming only: task i feeds task i of every consumer pipeline (a shared sub-plan
    #: read by several consumers, each partition's rows to all of them, order kept; the
    #: large side of a broadcast stream join, kept in its tasks)
    forward: bool = False
    #: streaming only: every task's rows go to every consumer task (the small side of a
    #: stream join, whose other side stays in its own tasks)
    broadcast: bool = False
    #: sort keys sampled while the stage's output is written (its blocks then feed a
    #: range shuffle whose boundaries come from ``samples``)
    sample_by: list[str] | None = None
    # filled in by the scheduler
    results: list[Any] | None = None
    samples: list[Any] | None = None

    @property
    def deps(self) -> list[Stage]:
        out: list[Stage] = []
        for p in self.pipelines:
            for port in p.ports:
                st = getattr(port, "stage", None)
                if st is not None and st not in out:
                    out.append(st)
            for f in p.ops:
                st = f.kwargs.get("broadcast_stage") if isinstance(f.kwargs, dict) else None
                if st is not None and st not in out:
                    out.append(st)
        if isinstance(self.partitioner, RangePartitioner) and self.sample_stage is not None \
                and self.sample_stage not in out:
            out.append(self.sample_stage)
        return out

    sample_stage: Stage | None = None

    def describe(self) -> str:
        lines = [f"Stage {self.id}" + (f" ({self.purpose})" if self.purpose else "") + ":"]
        for i, p in enumerate(self.pipelines):
            prefix = f"  pipeline {i}: " if len(self.pipelines) > 1 else "  "
            lines.append(prefix + " + ".join(port.describe() for port in p.ports)
                         + (" (all in one task)" if p.single_task else ""))
            for d in p.descriptions:
                lines.append("    -> " + d)
        if self.forward:
            lines.append("  => forward, each task to its same-numbered task of every consumer")
        elif self.broadcast:
            lines.append("  => broadcast to every consumer task")
        elif self.output_kind == "shuffle":
            lines.append(f"  => shuffle write, {self.partitioner.describe()}")
        elif self.output_kind == "sink":
            lines.append(f"  => write {self.sink.describe()}")
        else:
            lines.append("  => materialize" + (f" (cache #{self.cache_id})" if self.cache_id else "")
                         + (f", sampling {', '.join(self.sample_by)}" if self.sample_by else ""))
        return "\n".join(lines)


def all_stages(final: Stage) -> list[Stage]:
    """Stages in an order where every stage comes after the stages it depends on."""
    order: list[Stage] = []
    seen: set[int] = set()

    def visit(s: Stage) -> None:
        if s.id in seen:
            return
        seen.add(s.id)
        for d in s.deps:
            visit(d)
        order.append(s)

    visit(final)
    return order
