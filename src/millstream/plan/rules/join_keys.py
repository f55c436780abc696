"""Join conditions inferred from filters: ``a.join(b, ...).filter(col("x") == col("y"))``
with ``x`` from one input and ``y`` from the other is a join on one more key pair; over a
cross join it makes the join an equi-join, so it no longer pairs every row with every row.

Only plain column equalities of one type that hashing compares as ``==`` does (no floats:
NaN never equals itself in a filter) become keys.
"""

from __future__ import annotations

from dataclasses import replace

import pyarrow as pa

from millstream.expr.nodes import Column, Expr
from millstream.plan.logical import Filter, Join, Node, Project
from millstream.plan.rules.base import Rule, RuleContext
from millstream.plan.rules.common import INNER_LIKE, LEFT, RIGHT, join_columns, same_schema
from millstream.plan.rules.exprs import column_pair, conjoin, conjuncts

# TODO(issue 10, joins): a conjunct comparing both sides that is not an equality of
# columns (``a.x != b.y``, ranges) could become the join's residual ``condition`` once the
# Join node has one; it stays in the filter above the join until then.


class InferJoinKeys(Rule):
    """Equalities between the two inputs of an inner or cross join become join keys."""

    name = "infer_join_keys"

    def apply(self, node: Node, ctx: RuleContext) -> Node:
        return node.transform_up(_infer)


def _keyable(t: pa.DataType) -> bool:
    return (pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)
            or pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_date(t)
            or pa.types.is_timestamp(t) or pa.types.is_decimal(t) or pa.types.is_boolean(t)
            or pa.types.is_time(t) or pa.types.is_duration(t)
            or getattr(pa.types, "is_string_view", lambda _t: False)(t))


def _infer(node: Node) -> Node:
    if not (isinstance(node, Filter) and isinstance(node.child, Join)
            and node.child.how in INNER_LIKE):
        return node
    join = node.child
    info = join_columns(join)
    left, right = join.left.schema, join.right.schema
    if info is None or left is None or right is None:
        return node
    lk, rk = list(join.left_on), list(join.right_on)
    rest: list[Expr] = []
    for p in conjuncts(node.predicate):
        pair = column_pair(p)
        if pair is None or pair[0] != "eq" or pair[1] not in info.origin \
                or pair[2] not in info.origin:
            rest.append(p)
            continue
        (s1, c1), (s2, c2) = info.origin[pair[1]], info.origin[pair[2]]
        if s1 == s2:
            rest.append(p)
            continue
        a, b = (c1, c2) if s1 == LEFT else (c2, c1)
        ta, tb = left.field(a).type, right.field(b).type
        if not (ta.equals(tb) and _keyable(ta)) or any(x == a and y == b
                                                        for x, y in zip(lk, rk)):
            rest.append(p)
            continue
        lk.append(a)
        rk.append(b)
    if len(lk) == len(join.left_on):
        return node
    new: Node = replace(join, left_on=tuple(lk), right_on=tuple(rk),
                        how="inner" if join.how == "cross" else join.how)
    new = _restore_columns(join, new)  # type: ignore[arg-type]
    if new is None:
        return node
    return Filter(new, conjoin(rest)) if rest else new


def _restore_columns(old: Join, new: Join) -> Node | None:
    """``new`` with ``old``'s output columns (a same-named key pair shows its column once:
    the right one is rebuilt from the left one, equal on every row of an inner join)."""
    want = old.schema
    if same_schema(new.schema, want):
        return new
    before, after = join_columns(old), join_columns(new)
    if before is None or after is None or want is None:
        return None
    by_origin = {o: n for n, o in after.origin.items()}
    keys = dict(zip(new.right_on, new.left_on))
    exprs: list[Expr] = []
    for name in want.names:
        side, col = before.origin[name]
        found = by_origin.get((side, col))
        if found is None and side == RIGHT and col in keys:
            found = by_origin.get((LEFT, keys[col]))
        if found is None:
            return None
        exprs.append(Column(found) if found == name else Column(found).alias(name))
    fixed = Project(new, tuple(exprs))
    return fixed if same_schema(fixed.schema, want) else None
