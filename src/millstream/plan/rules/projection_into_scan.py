"""Projections into scans: a source reads only the columns the plan above it needs,
through filters, expressions, aggregates and joins (see ``plan/rules/columns.py``), and
under a shared sub-plan the columns any of its consumers needs."""

from __future__ import annotations

from dataclasses import replace

from millstream.plan.logical import Node, Scan, Shared
from millstream.plan.rules.base import Rule, RuleContext
from millstream.plan.rules.columns import Required, child_requirements, shared_requirements
from millstream.plan.rules.common import rebuilt


class ProjectionIntoScan(Rule):
    """Scans read only the columns the plan above them needs."""

    name = "projection_into_scan"

    def apply(self, node: Node, ctx: RuleContext) -> Node:
        needs = shared_requirements(node)
        built: dict[int, Node] = {}

        def push(n: Node, required: Required) -> Node:
            if isinstance(n, Scan):
                return _scan(n, required)
            if isinstance(n, Shared):  # what all its consumers read, one object at every use
                key = id(n)
                if key not in built:
                    child = push(n.child, needs.get(key))
                    built[key] = n if child is n.child else replace(n, child=child)
                return built[key]
            reqs = child_requirements(n, required)
            return rebuilt(n, (push(c, r) for c, r in zip(n.children, reqs)))

        return push(node, None)


def _scan(node: Scan, required: Required) -> Node:
    if required is None:
        return node
    schema = node.schema
    if schema is None:  # the source may still know its columns when it reads
        have = getattr(node.source, "columns", None)
        if not required or (have is not None and set(have) <= required):
            return node
        new_src, applied, _ = node.source.with_pushdown(sorted(required), None)
        return Scan(new_src) if applied and new_src is not node.source else node
    cols = [c for c in schema.names if c in required]  # in order: the result may show it
    if not cols:
        cols = schema.names[:1]  # rows are needed, not their values: read the first column
    if len(cols) == len(schema.names):
        return node  # already reads no more than needed
    new_src, applied, _ = node.source.with_pushdown(cols, None)
    return Scan(new_src) if applied and new_src is not node.source else node
