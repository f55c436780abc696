"""Filters and projections pushed into scans (and filters below the ``with_columns`` they
do not read), so sources skip row groups and columns."""

from __future__ import annotations

from dataclasses import replace

from millstream.plan.logical import Aggregate, Drop, Filter, Node, Project, Scan, Sort, WithColumns
from millstream.plan.rules.base import Rule, RuleContext


class FilterIntoScan(Rule):
    """A filter moves below a ``with_columns`` it does not read, and into a scan that can
    skip data with it (the filter stays when the scan cannot apply it exactly)."""

    name = "filter_into_scan"

    def apply(self, node: Node, ctx: RuleContext) -> Node:
        return node.transform_up(_push_filter)


class ProjectionIntoScan(Rule):
    """Scans read only the columns the plan above them needs."""

    name = "projection_into_scan"

    def apply(self, node: Node, ctx: RuleContext) -> Node:
        return _push_projection(node, None)


def _push_filter(node: Node) -> Node:
    """A filter moved below a with_columns it does not depend on, and into a scan."""
    # a filter that does not read the columns a with_columns produces can run before it
    # (and may then reach the scan)
    if isinstance(node, Filter) and isinstance(node.child, WithColumns):
        if not (node.predicate.columns() & node.child.produced()):
            below = _push_filter(replace(node, child=node.child.child))
            return replace(node.child, child=below)
    if isinstance(node, Filter) and isinstance(node.child, Scan):
        expr = node.predicate
        if expr.to_arrow() is None:
            return node
        src = node.child.source
        new_src, _cols, fully = src.with_pushdown(None, expr)
        if new_src is src:
            return node
        scan = Scan(new_src)
        return scan if fully else replace(node, child=scan)
    return node


def _push_projection(node: Node, required: set[str] | None) -> Node:
    """Push down the set of columns the nodes above need (None: all of them)."""
    if isinstance(node, Scan):
        if required is None:
            return node
        have = getattr(node.source, "columns", None)
        if have is not None and set(have) <= required:
            return node  # already reads no more than needed
        new_src, applied, _ = node.source.with_pushdown(sorted(required), None)
        return Scan(new_src) if applied else node
    if isinstance(node, Project):
        child_req: set[str] | None = set(node.references() or ()) or None
    elif isinstance(node, Filter):
        child_req = None if required is None else required | set(node.references() or ())
    elif isinstance(node, WithColumns):
        child_req = None if required is None else \
            (required - node.produced()) | set(node.references() or ())
    elif isinstance(node, Aggregate):
        child_req = set(node.references() or ()) or None
    elif isinstance(node, Sort):
        child_req = None if required is None else required | set(node.by)
    elif isinstance(node, Drop):
        child_req = None
    else:
        return _rebuilt(node, tuple(_push_projection(c, None) for c in node.children))
    return _rebuilt(node, (_push_projection(node.child, child_req),))


def _rebuilt(node: Node, children: tuple[Node, ...]) -> Node:
    """``node`` over ``children``; the same object when they are the same."""
    if all(a is b for a, b in zip(children, node.children)):
        return node
    return node.with_children(children)
