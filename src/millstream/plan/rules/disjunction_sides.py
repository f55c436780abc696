"""Per-side filters implied by a disjunction over a join: above a join,
``(n1 = 'FRANCE' & n2 = 'GERMANY') | (n1 = 'GERMANY' & n2 = 'FRANCE')`` (TPC-H Q7) reads
both inputs and cannot move down, but it implies ``n1 = 'FRANCE' | n1 = 'GERMANY'`` on
one input and the same of ``n2`` on the other: each input is filtered by the disjunction
of its own parts of the branches, when every branch has one.

The implied filters are added beside the original (which stays above the join: it is
what decides), and predicate pushdown then moves them into the inputs. A side gets one
only where pushdown may filter that side (never the side an outer join pads with nulls).
Each implied filter is derived once per optimization (recorded in the rule context), so
the rules still reach a fixed point.
"""

from __future__ import annotations

from dataclasses import replace

from millstream.expr.nodes import Expr, _Func
from millstream.plan.logical import Filter, Join, Node
from millstream.plan.rules.base import Rule, RuleContext
from millstream.plan.rules.common import LEFT, RIGHT, join_columns, push_sides
from millstream.plan.rules.exprs import conjoin, conjuncts, disjuncts, is_row_local, same

#: The facts key of the implied filters already derived (their text).
_DERIVED = "disjunction_sides"


class DisjunctionSides(Rule):
    """A filter over a join gets the per-side filters its disjunctions imply."""

    name = "disjunction_sides"

    def apply(self, node: Node, ctx: RuleContext) -> Node:
        done: set[str] = ctx.facts.setdefault(_DERIVED, set())
        return node.transform_up(lambda n: _derive(n, done))


def _derive(node: Node, done: set[str]) -> Node:
    if not isinstance(node, Filter) or not isinstance(node.child, Join):
        return node
    join = node.child
    info = join_columns(join)
    if info is None:
        return node
    parts = conjuncts(node.predicate)
    added: list[Expr] = []
    for p in parts:
        branches = disjuncts(p)
        if len(branches) < 2 or not is_row_local(p):
            continue
        for side in (LEFT, RIGHT):
            q = _implied(branches, side, info)
            if q is None or same(q, p):
                continue
            targets = push_sides(info, join.how, q.columns())
            key = repr(q)
            if targets is None or side not in targets or key in done:
                continue
            done.add(key)
            added.append(q)
    if not added:
        return node
    return replace(node, predicate=conjoin([*parts, *added]))


def _implied(branches: list[Expr], side: int, info) -> Expr | None:
    """The disjunction, over ``branches``, of each branch's conjuncts that read only
    columns of input ``side``; None when a branch has none."""
    out: Expr | None = None
    for b in branches:
        own = [c for c in conjuncts(b) if _on_side(c, side, info)]
        if not own:
            return None
        part = conjoin(own)
        out = part if out is None else _Func("or", (out, part))
    return out


def _on_side(e: Expr, side: int, info) -> bool:
    cols = e.columns()
    return bool(cols) and is_row_local(e) and all(
        c in info.source and side in info.source[c] for c in cols)
