"""The one compile step: a logical plan -> optimizer rules -> a physical plan of stages.

Every action (batch jobs, ``explain``, streaming jobs on either executor, MapReduce) goes
through :func:`compile_plan`, so they all see the same optimized plan.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from millstream.plan.logical import Node
from millstream.plan.optimizer import optimize, optimize_traced
from millstream.plan.physical import PhysicalPlanner, PlannerSettings
from millstream.plan.stages import Stage, all_stages


def compile_plan(node: Node, settings: PlannerSettings, output_kind: str = "blocks",
                 sink: Any = None, disabled_rules: Iterable[str] = ()) -> Stage:
    """The final stage of ``node``'s physical plan (its dependencies hang below it);
    ``disabled_rules`` names optimizer rules not to run (``"all"``: none)."""
    return PhysicalPlanner(settings).plan(optimize(node, settings, disabled_rules),
                                          output_kind, sink)


def explain_plan(node: Node, settings: PlannerSettings,
                 disabled_rules: Iterable[str] = ()) -> str:
    """The logical, optimized and physical plans of ``node`` as text (``explain()``)."""
    optimized, fired = optimize_traced(node, settings, disabled_rules)
    final = PhysicalPlanner(settings).plan(optimized)
    parts = ["== Logical plan ==", node.tree(), "", "== Optimized plan ==", optimized.tree(),
             "", "== Rules applied ==", ", ".join(fired) if fired else "(none)", "",
             "== Physical plan =="]
    parts += [s.describe() for s in all_stages(final)]
    return "\n".join(parts)


def streaming_settings(parallelism: int) -> PlannerSettings:
    """Planner settings of a streaming job: ``parallelism`` partitions per exchange, no
    broadcast of streams, no cache, bounded sides of stream-table joins broadcast."""
    return PlannerSettings(parallelism, 0, lambda _cid: None, streaming=True)
