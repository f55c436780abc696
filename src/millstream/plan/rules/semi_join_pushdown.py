"""Semi and anti joins below inner joins: a semi or anti join keeps or drops each row by
its own columns alone, so it is a filter, and like a filter it can run on the input of an
inner join below that holds those columns: ``(orders ⋈ lineitem) ⋉ big_orders`` is
``(orders ⋉ big_orders) ⋈ lineitem`` (TPC-H Q18, where the semi join keeps 57 of 1.5M
orders, and the 6M-row join then has almost nothing to do).

Unlike a filter, a semi join costs a probe per input row, so it moves only where its
input gets smaller: onto an input of fewer estimated rows than the join's output (below a
join that multiplies rows, not below one that filters them, as TPC-H Q21's). The keys and
the residual condition must read only that input's columns, under the same names, and
with a condition, the semi join's right side must name its columns alike against either
(no suffix that would change).
"""

from __future__ import annotations

from dataclasses import replace

from millstream.plan import logical as L
from millstream.plan.rules.base import Rule, RuleContext
from millstream.plan.rules.common import LEFT, RIGHT, join_columns
from millstream.plan.stats import Estimator, estimator


class SemiJoinPushdown(Rule):
    """Semi/anti joins moved below an inner join onto the (smaller) input they read."""

    name = "semi_join_pushdown"

    def apply(self, node: L.Node, ctx: RuleContext) -> L.Node:
        if getattr(ctx.settings, "streaming", False):
            return node
        est = estimator(ctx.settings, ctx.facts)
        return node.transform_up(lambda n: _push(n, est))


def _push(node: L.Node, est: Estimator) -> L.Node:
    if not (isinstance(node, L.Join) and node.how in ("semi", "anti") and node.left_on):
        return node
    inner = node.left
    if not (isinstance(inner, L.Join) and inner.how == "inner" and inner.left_on):
        return node
    info = join_columns(inner)
    right_schema = node.right.schema
    if info is None or right_schema is None or inner.schema is None:
        return node
    used = set(node.left_on)
    if node.condition is not None:
        # the condition's columns of the semi join's left side (its right side's are
        # checked below to keep their names)
        used |= node.condition.columns() & set(inner.schema.names)
    inner_out = est.estimate(inner)
    if inner_out is None:
        return node
    for side, child in ((LEFT, inner.left), (RIGHT, inner.right)):
        schema = child.schema
        if schema is None:
            continue
        if not all(c in info.source and info.source[c].get(side) == c for c in used):
            continue
        # a condition must see the semi join's right columns under the same names
        # (suffixed or not) either way
        if node.condition is not None and any(
                (n in inner.schema.names) != (n in schema.names) for n in right_schema.names):
            continue
        side_est = est.estimate(child)
        if side_est is None or not side_est.rows < inner_out.rows:
            continue
        moved = replace(node, left=child)
        kids = (moved, inner.right) if side == LEFT else (inner.left, moved)
        return replace(inner, left=kids[0], right=kids[1])
    return node
