"""Semi-join reduction below an aggregate: an inner (or semi) join on the group keys of an
aggregate (or an outer join that preserves the other side) drops every group whose key the
other side lacks, so the aggregate's input rows
of those groups need not be aggregated at all. When the other side is small,
``agg(X by k) ⋈ small on k`` becomes ``agg((X ⋉ small) by k) ⋈ small``: the semi join
runs where ``X`` is read (a broadcast join, before the partial aggregate and its
shuffle), and ``small``, now read twice, is one shared sub-plan (the reuse rule).

TPC-H Q17 aggregates 6M lineitem rows by part to keep 200 of the 200k parts; with the
semi join below, 6k rows reach the aggregate. Q20 likewise.

The join keys must reach the aggregate's group keys through renames, column projections
and filters only, and the other side must be estimated small: within the broadcast
threshold and at most a quarter of the aggregate's groups (else it drops little).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from millstream.expr.nodes import Alias, Column
from millstream.plan import logical as L
from millstream.plan.rules.base import Rule, RuleContext
from millstream.plan.stats import Estimator, estimator

#: the small side may have at most this share of the aggregate's groups
MAX_GROUP_SHARE = 0.25
_DEFAULT_THRESHOLD = 10 << 20


class SemiJoinBelowAggregate(Rule):
    """``agg(X) ⋈ small`` on the group keys as ``agg(X ⋉ small) ⋈ small``."""

    name = "semi_join_below_aggregate"

    def apply(self, node: L.Node, ctx: RuleContext) -> L.Node:
        if getattr(ctx.settings, "streaming", False):
            return node
        est = estimator(ctx.settings, ctx.facts)
        threshold = getattr(ctx.settings, "broadcast_threshold", None) or _DEFAULT_THRESHOLD
        return node.transform_up(lambda n: _reduce(n, est, threshold))


def _reduce(node: L.Node, est: Estimator, threshold: float) -> L.Node:
    if not (isinstance(node, L.Join) and node.how in ("inner", "semi", "left", "right")
            and node.left_on):
        return node
    sides = []  # (the aggregate's side: its groups without a match are dropped)
    if node.how in ("inner", "semi", "right"):
        sides.append((node.left, node.left_on, node.right, node.right_on, "left"))
    if node.how in ("inner", "left"):
        sides.append((node.right, node.right_on, node.left, node.left_on, "right"))
    for grouped, keys, small, small_keys, which in sides:
        traced = _trace(grouped, list(keys))
        if traced is None:
            continue
        path, agg, agg_keys = traced
        if _already_reduced(agg, agg_keys):
            continue
        groups = est.estimate(agg)
        if groups is None:
            continue
        def fits(side: L.Node) -> bool:
            other = est.estimate(side)
            return other is not None and other.bytes <= threshold \
                and other.rows <= MAX_GROUP_SHARE * groups.rows  # noqa: B023

        picked = next((c for c in reversed(_key_path(small, list(small_keys)))
                       if fits(c[0])), None)
        if picked is None:
            continue
        right, right_keys = picked
        semi = L.Join(left=agg.child, right=right, left_on=tuple(agg_keys),
                      right_on=tuple(right_keys), how="semi")
        new: L.Node = replace(agg, child=semi)
        for above in reversed(path):
            new = replace(above, child=new)
        return replace(node, left=new) if which == "left" else replace(node, right=new)
    return node


def _trace(node: L.Node, cols: list[str]) -> tuple[list[L.Node], L.Aggregate, list[str]] | None:
    """The nodes from ``node`` down to an aggregate whose group keys ``cols`` are (through
    renames, column projections and filters), the aggregate, and the keys' names there."""
    path: list[L.Node] = []
    while True:
        if isinstance(node, L.Aggregate):
            if node.keys and all(c in node.keys for c in cols):
                return path, node, cols
            return None
        traced = _through(node, cols)
        if traced is None or isinstance(node, L.Shared):
            return None
        path.append(node)
        node, cols = traced


def _key_path(node: L.Node, cols: list[str]) -> list[tuple[L.Node, list[str]]]:
    """``node`` and the inputs below it its key columns ``cols`` come from (with their
    names there), down through inner joins (whose output keys are a subset of that
    input's), projections, renames, filters and shared sub-plans. A semi join against
    any of them keeps at least the rows one against ``node`` keeps (the join above still
    drops the rest), and the deepest small one is often a mere filtered scan."""
    out = [(node, cols)]
    while True:
        if isinstance(node, L.Join) and node.how == "inner":
            ls, rs = node.left.schema, node.right.schema
            if ls is None or rs is None:
                return out
            if all(c in ls.names and c not in rs.names for c in cols):
                node = node.left
            elif all(c in rs.names and c not in ls.names for c in cols):
                node = node.right
            else:
                return out
        else:
            traced = _through(node, cols)
            if traced is None:
                return out
            node, cols = traced
        out.append((node, cols))


def _through(node: L.Node, cols: list[str]) -> tuple[L.Node, list[str]] | None:
    """``node``'s input and the names ``cols`` have there, for a rename, a projection of
    columns, a filter or a shared sub-plan; None for other nodes."""
    if isinstance(node, L.Rename):
        back = {new: old for old, new in node.mapping}
        return node.child, [back.get(c, c) for c in cols]
    if isinstance(node, L.Project):
        by_name = {e.output_name: e for e in node.exprs}
        mapped = []
        for c in cols:
            e: Any = by_name.get(c)
            if isinstance(e, Alias):
                e = e.child
            if not isinstance(e, Column):
                return None
            mapped.append(e.name)
        return node.child, mapped
    if isinstance(node, (L.Filter, L.Shared)):
        return node.child, cols
    return None


def _already_reduced(agg: L.Aggregate, keys: list[str]) -> bool:
    """Whether the aggregate's input is a semi join on these keys already (the rule fired;
    later rules may have reshaped its right side, so that is not compared)."""
    child = agg.child
    while isinstance(child, (L.Filter, L.Project)):
        child = child.child
    return isinstance(child, L.Join) and child.how == "semi" and list(child.left_on) == keys
