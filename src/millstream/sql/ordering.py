"""ORDER BY, LIMIT and OFFSET on relations: sorts with SQL's per-key null placement
(the engine's sort has one null setting for all keys: keys that differ get an
``is null`` key before them), and OFFSET as a row number in the sort's order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlglot import exp

from millstream.api import analytic
from millstream.expr.analytic import row_number
from millstream.expr.nodes import Column, Expr, Literal
from millstream.plan import logical as L
from millstream.sql.fromclause import is_unbounded
from millstream.sql.scope import NotFound, Relation, Scope

if TYPE_CHECKING:
    from millstream.sql.planner import Planner


def order_spec(keys: list[tuple[str, bool, bool]]
               ) -> tuple[list[Expr], list[str], list[bool], bool | None]:
    """Sort keys (column, descending, nulls first) in the engine's terms: flag columns to
    add (``is null`` keys, when the keys' null placements differ), the columns to sort by,
    their directions, and the one null setting."""
    names = [k[0] for k in keys]
    desc = [k[1] for k in keys]
    first = [k[2] for k in keys]
    if all(not f for f in first):
        return [], names, desc, True
    if all(first):
        return [], names, desc, False
    if all(f == (not d) for f, d in zip(first, desc)):
        return [], names, desc, None
    flags: list[Expr] = []
    by: list[str] = []
    directions: list[bool] = []
    for i, (n, d, f) in enumerate(keys):
        flag = f"__sql_null{i}_{n}"
        flags.append(Column(n).is_null().alias(flag))
        by += [flag, n]
        directions += [f, d]  # nulls first: the true flag sorts first when descending
    return flags, by, directions, None


def sort_by(rel: Relation, keys: list[tuple[str, bool, bool]]) -> Relation:
    """``rel`` sorted by columns with per-key direction and null placement."""
    flags, by, directions, nulls_last = order_spec(keys)
    node = L.WithColumns(rel.node, tuple(flags)) if flags else rel.node
    node = L.Sort(node, tuple(by), tuple(directions), nulls_last)
    if flags:
        node = L.Drop(node, tuple(f.output_name for f in flags))
    return rel.with_node(node)


def sort_relation(p: Planner, rel: Relation, ordered: list[exp.Ordered]) -> Relation:
    """A set operation's ORDER BY: output columns by ordinal or name."""
    keys = []
    visible = rel.visible()
    for o in ordered:
        target = o.this
        if isinstance(target, exp.Literal) and not target.is_string:
            k = int(target.this)
            if not 1 <= k <= len(visible):
                raise p.error(f"ORDER BY {k}: the query has {len(visible)} columns", target)
            name = visible[k - 1].internal
        elif isinstance(target, exp.Column):
            try:
                name = Scope(rel).resolve(target.table or None, target.name)[0].internal
            except NotFound as exc:
                raise p.error(exc.message, target) from None
        else:
            raise p.error("ORDER BY of a UNION/INTERSECT/EXCEPT takes column names or "
                          "positions", target)
        keys.append((name, bool(o.args.get("desc")), bool(o.args.get("nulls_first"))))
    return sort_by(rel, keys)


def _constant_int(p: Planner, node: exp.Expr | None, what: str) -> int | None:
    if node is None:
        return None
    value = node.expression if isinstance(node, (exp.Limit, exp.Offset)) else node
    if isinstance(value, exp.Literal) and not value.is_string:
        try:
            n = int(value.this)
        except ValueError:
            n = -1
        if n >= 0:
            return n
    raise p.error(f"{what} takes a non-negative whole number", value)


def apply_limit(p: Planner, q: exp.Expr, rel: Relation,
                sort_keys: list[tuple[str, bool, bool]] | None = None) -> Relation:
    """LIMIT and OFFSET: a Limit node; an offset numbers the rows (in the ORDER BY's
    order) and skips the first ones."""
    limit = _constant_int(p, q.args.get("limit"), "LIMIT")
    offset = _constant_int(p, q.args.get("offset"), "OFFSET")
    if (limit is not None or offset) and is_unbounded(rel.node):
        from millstream.sql.streaming import unsupported_on_stream

        raise unsupported_on_stream(p, "LIMIT/OFFSET", q.args.get("limit") or q.args["offset"])
    if offset:
        rn = p.fresh("rownum")
        keys = sort_keys or []
        flags, by, directions, nulls_last = order_spec(keys)
        base = L.WithColumns(rel.node, tuple(flags)) if flags else rel.node
        fn = row_number().over(order_by=by or None, descending=directions if by else False,
                               nulls_last=nulls_last)
        node = analytic.with_columns(base, [fn.alias(rn)])
        if flags:
            node = L.Drop(node, tuple(f.output_name for f in flags))
        cond = Column(rn) > Literal(offset)
        if limit is not None:
            cond = cond & (Column(rn) <= Literal(offset + limit))
        node = L.Filter(node, cond)
        if keys:
            node = sort_by(rel.with_node(node), keys).node
        return rel.with_node(L.Drop(node, (rn,)))
    if limit is not None:
        return rel.with_node(L.Limit(rel.node, limit))
    return rel
