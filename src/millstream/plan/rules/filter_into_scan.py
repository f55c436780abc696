"""Filters into scans: the conjuncts of a filter right above a scan that have an Arrow form
go into the source, which skips row groups or files with them (and filters exactly when it
says so; otherwise the filter stays above the scan as well)."""

from __future__ import annotations

from millstream.plan.logical import Filter, Node, Scan
from millstream.plan.rules.base import Rule, RuleContext
from millstream.plan.rules.exprs import conjoin, conjuncts

_PUSHED = "filter_into_scan.pushed"


class FilterIntoScan(Rule):
    """A filter over a scan hands the source what it can apply."""

    name = "filter_into_scan"

    def apply(self, node: Node, ctx: RuleContext) -> Node:
        # (source id, predicate) -> the source (held, so its id stays its own)
        pushed: dict[tuple[int, str], object] = ctx.facts.setdefault(_PUSHED, {})
        return node.transform_up(lambda n: _into_scan(n, pushed))


def _into_scan(node: Node, pushed: dict[tuple[int, str], object]) -> Node:
    if not (isinstance(node, Filter) and isinstance(node.child, Scan)):
        return node
    src = node.child.source
    parts = conjuncts(node.predicate)
    arrow = [p for p in parts if p.to_arrow() is not None]
    if not arrow:
        return node
    expr = conjoin(arrow)
    if (id(src), repr(expr)) in pushed:
        return node  # handed to this source already, which keeps the filter above too
    new_src, _cols, fully = src.with_pushdown(None, expr)
    if new_src is src or (not fully and _same_source(new_src, src)):
        # the source took nothing (e.g. no Arrow kernel for the column's type): a new but
        # equal source object would be pushed into again once sub-plan reuse merged it
        # with an equal scan, and the rules would never reach a fixed point
        return node
    pushed[(id(new_src), repr(expr))] = new_src
    scan = Scan(new_src)
    rest = [p for p in parts if p.to_arrow() is None] if fully else parts
    return Filter(scan, conjoin(rest)) if rest else scan


def _same_source(a: object, b: object) -> bool:
    """Whether two sources read the same (by their fingerprints, when they have them)."""
    try:
        return a.fingerprint() == b.fingerprint()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - a source without a comparable fingerprint
        return False
