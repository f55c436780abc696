"""Outer joins made inner (or one-sided) by a filter above them that rejects the rows they
pad with nulls: ``left_join(...).filter(right.x > 3)`` keeps no unmatched left row (its
``x`` is null), so it is an inner join, and the filter can then move into the right input.
"""

from __future__ import annotations

from dataclasses import replace

from millstream.plan.logical import Filter, Join, Node
from millstream.plan.rules.base import Rule, RuleContext
from millstream.plan.rules.common import LEFT, RIGHT, join_columns, same_schema
from millstream.plan.rules.exprs import conjuncts, rejects_nulls

#: (join type, side whose padded rows a filter removed) -> the join type left
_STRONGER = {("left", RIGHT): "inner", ("right", LEFT): "inner",
             ("outer", LEFT): "left", ("outer", RIGHT): "right"}


class OuterJoinToInner(Rule):
    """A filter over an outer join that rejects the nulls of a padded side narrows it."""

    name = "outer_join_to_inner"

    def apply(self, node: Node, ctx: RuleContext) -> Node:
        return node.transform_up(_narrow)


def _narrow(node: Node) -> Node:
    if not (isinstance(node, Filter) and isinstance(node.child, Join)
            and node.child.how in ("left", "right", "outer")):
        return node
    join = node.child
    info = join_columns(join)
    schema = join.schema
    if info is None or schema is None:
        return node
    how = join.how
    for p in conjuncts(node.predicate):
        for side in (LEFT, RIGHT):
            padded = info.padded[side]
            if padded and p.columns() and p.columns() <= padded and \
                    rejects_nulls(p, schema, padded):
                how = _STRONGER.get((how, side), how)
    if how == join.how:
        return node
    new = replace(join, how=how)
    if not same_schema(new.schema, schema):
        return node  # e.g. a coalesced key of another type: keep the join as it was
    return Filter(new, node.predicate)
