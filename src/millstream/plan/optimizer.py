"""Rule-based optimizer: push filters and projections into scans.

Operator fusion (narrow chains run in one task) and map-side partial aggregation are
done by the physical planner, which builds stages.
"""

from __future__ import annotations

from dataclasses import replace

from millstream.plan.logical import Aggregate, Narrow, Node, Scan, Sort

_EXPR_KINDS = ("project", "with_columns", "filter")


def optimize(node: Node) -> Node:
    """Return an equivalent plan with filters and projections pushed into scans."""
    node = _push_filters(node)
    return _push_projection(node, None)


def _push_filters(node: Node) -> Node:
    node = node.with_children(tuple(_push_filters(c) for c in node.children))
    # a filter that does not read the columns a with_columns produces can run before it
    # (and may then reach the scan)
    if isinstance(node, Narrow) and node.kind == "filter" and isinstance(node.child, Narrow) \
            and node.child.kind == "with_columns":
        produced = {e.output_name for e in node.child.payload}
        if not (set(node.payload.columns()) & produced):
            below = _push_filters(replace(node, child=node.child.child))
            return replace(node.child, child=below)
    if isinstance(node, Narrow) and node.kind == "filter" and isinstance(node.child, Scan):
        expr = node.payload
        if expr.to_arrow() is None:
            return node
        src = node.child.source
        new_src, _cols, fully = src.with_pushdown(None, expr)
        if new_src is src:
            return node
        scan = Scan(new_src)
        return scan if fully else replace(node, child=scan)
    return node


def _referenced(exprs) -> set[str]:
    cols: set[str] = set()
    for e in exprs:
        cols |= set(e.columns())
    return cols


def _push_projection(node: Node, required: set[str] | None) -> Node:
    if isinstance(node, Scan):
        if required is None:
            return node
        new_src, applied, _ = node.source.with_pushdown(sorted(required), None)
        return Scan(new_src) if applied else node
    if isinstance(node, Narrow) and node.kind in _EXPR_KINDS:
        if node.kind == "project":
            child_req = _referenced(node.payload) or None
        elif node.kind == "filter":
            child_req = None if required is None else required | _referenced([node.payload])
        else:  # with_columns
            if required is None:
                child_req = None
            else:
                produced = {e.output_name for e in node.payload}
                child_req = (required - produced) | _referenced(node.payload)
        return node.with_children((_push_projection(node.child, child_req),))
    if isinstance(node, Narrow) and node.kind == "drop":
        return node.with_children((_push_projection(node.child, None),))
    if isinstance(node, Aggregate):
        req = set(node.keys)
        for s in node.specs:
            if s.arg is not None:
                req |= set(s.arg.columns())
        return node.with_children((_push_projection(node.child, req or None),))
    if isinstance(node, Sort):
        child_req = None if required is None else required | set(node.by)
        return node.with_children((_push_projection(node.child, child_req),))
    return node.with_children(tuple(_push_projection(c, None) for c in node.children))
