"""Predicate pushdown: filters merged and split into their conjuncts, each moved as far
down the plan as it stays correct.

A conjunct goes below a ``select`` (rewritten through its expressions), a ``with_columns``
(through the columns it produces, when they are row-local expressions), a rename or drop,
a sort, distinct, repartition, explode (not reading the exploded column) or Python row
filter; to every input of a union; below a group-by when it reads only grouping keys; and
into the inputs of a join that can take it (both sides of an inner join where it reads
join keys; never the side an outer join pads with nulls: see ``outer_join_to_inner``).
A conjunct of a keyed join's own ``condition`` that reads one input only goes into that
input when the join type allows it (any side of an inner join, the side a left or right
join pads, either side of a semi join and the right of an anti join): rows it rejects
never pair (TPC-H Q13's left join on orders with ``o_comment NOT LIKE ...`` filters the
orders before they are shuffled, and no longer ships their comments).
It never passes a limit, a cache, a Python map, a watermark (event time is computed from
the rows it sees), an event-time window or process function, or a node it does not know.
"""

from __future__ import annotations

from dataclasses import replace

from millstream.expr.nodes import Expr
from millstream.plan.logical import (
    Aggregate,
    Distinct,
    Drop,
    Explode,
    Filter,
    FilterRows,
    Join,
    Node,
    Project,
    Rename,
    Repartition,
    Sort,
    Union,
    WithColumns,
)
from millstream.plan.rules.base import Rule, RuleContext
from millstream.plan.rules.common import LEFT, RIGHT, join_columns, push_sides, rebuilt
from millstream.plan.rules.exprs import (
    conjoin,
    conjuncts,
    is_row_local,
    rename_columns,
    size,
    substitute,
)

#: Nodes a filter passes unchanged: they keep every row's values (and order within a
#: partition does not matter to a filter).
_PASS_THROUGH = (Sort, Distinct, Repartition, FilterRows)
#: Largest produced expression (in nodes) a filter is rewritten through: the filter then
#: computes it too, below, while the column is still computed above.
SIMPLE_SIZE = 8


class PredicatePushdown(Rule):
    """Filters merged, split into conjuncts and moved down (see the module docstring)."""

    name = "predicate_pushdown"

    def apply(self, node: Node, ctx: RuleContext) -> Node:
        return sink(node, [])


def sink(node: Node, preds: list[Expr]) -> Node:
    """``node`` with the conditions ``preds`` (on its output) applied, pushed as deep as
    they go; ``node`` itself when nothing moved."""
    below, rest = push_through(node, preds)
    if not rest:
        return below
    if (isinstance(node, Filter) and below is node.child and len(rest) == len(preds)
            and all(a is b for a, b in zip(rest, preds))):
        return node  # defensive: nothing changed
    return Filter(below, conjoin(rest))


def push_through(node: Node, preds: list[Expr]) -> tuple[Node, list[Expr]]:
    """``(node', rest)``: ``node'`` with as many of ``preds`` as possible applied below its
    top, and the conditions that must stay above it (the same objects where unchanged)."""
    if isinstance(node, Filter):
        own = conjuncts(node.predicate)
        below, rest = push_through(node.child, [*preds, *own])
        if below is node.child and len(rest) == len(preds) + len(own) and \
                all(a is b for a, b in zip(rest, [*preds, *own])) and not preds:
            return node, []  # the filter could not move: keep it as it was
        return below, rest
    handler = _HANDLERS.get(type(node))
    if handler is not None:
        return handler(node, preds)
    return _stop(node, preds)


def _stop(node: Node, preds: list[Expr]) -> tuple[Node, list[Expr]]:
    """A barrier: nothing passes; the inputs are still optimized."""
    return rebuilt(node, (sink(c, []) for c in node.children)), preds


def _unary(node: Node, preds: list[Expr], rewrite) -> tuple[Node, list[Expr]]:
    """Push the conditions ``rewrite`` (returning the condition on the input, or None)
    accepts below the single-input ``node``."""
    down, rest = [], []
    for p in preds:
        q = rewrite(p) if is_row_local(p) else None
        if q is None:
            rest.append(p)
        else:
            down.append(q)
    child = sink(node.children[0], down)
    return rebuilt(node, (child,)), rest


def _pass(node: Node, preds: list[Expr]) -> tuple[Node, list[Expr]]:
    return _unary(node, preds, lambda p: p)


def _project(node: Project, preds: list[Expr]) -> tuple[Node, list[Expr]]:
    if not all(is_row_local(e) for e in node.exprs):
        return _stop(node, preds)
    mapping = {e.output_name: e for e in node.exprs}

    def rewrite(p: Expr) -> Expr | None:
        cols = p.columns()
        if not cols <= mapping.keys() or any(size(mapping[c]) > SIMPLE_SIZE for c in cols):
            return None
        return substitute(p, {c: mapping[c] for c in cols})

    return _unary(node, preds, rewrite)


def _with_columns(node: WithColumns, preds: list[Expr]) -> tuple[Node, list[Expr]]:
    if not all(is_row_local(e) for e in node.exprs):
        return _stop(node, preds)  # e.g. a window function: it must see every row
    produced = {e.output_name: e for e in node.exprs}

    def rewrite(p: Expr) -> Expr | None:
        used = p.columns() & produced.keys()
        if not used:
            return p
        if not all(size(produced[c]) <= SIMPLE_SIZE for c in used):
            return None  # computing it twice (in the filter and the column) may cost more
        return substitute(p, {c: produced[c] for c in used})

    return _unary(node, preds, rewrite)


def _rename(node: Rename, preds: list[Expr]) -> tuple[Node, list[Expr]]:
    schema = node.child.schema
    if schema is None:
        return _stop(node, preds)
    mapping = dict(node.mapping)
    back = {mapping.get(n, n): n for n in schema.names}  # output name -> input name
    if len(back) != len(schema.names):
        return _stop(node, preds)  # a rename onto an existing name: leave it alone

    def rewrite(p: Expr) -> Expr | None:
        if not p.columns() <= back.keys():
            return None
        return rename_columns(p, {c: back[c] for c in p.columns()})

    return _unary(node, preds, rewrite)


def _drop(node: Drop, preds: list[Expr]) -> tuple[Node, list[Expr]]:
    dropped = set(node.columns)
    return _unary(node, preds, lambda p: None if p.columns() & dropped else p)


def _explode(node: Explode, preds: list[Expr]) -> tuple[Node, list[Expr]]:
    return _unary(node, preds, lambda p: None if node.column in p.columns() else p)


def _aggregate(node: Aggregate, preds: list[Expr]) -> tuple[Node, list[Expr]]:
    keys = set(node.keys)
    out, child = node.schema, node.child.schema
    if not keys or out is None or child is None:
        return _stop(node, preds)
    same = {k for k in keys if out.field(k).type.equals(child.field(k).type)}
    spec_names = {s.name for s in node.specs}

    def rewrite(p: Expr) -> Expr | None:
        cols = p.columns()
        return p if cols <= same and not cols & spec_names else None

    return _unary(node, preds, rewrite)


def _union(node: Union, preds: list[Expr]) -> tuple[Node, list[Expr]]:
    out = node.schema
    schemas = [c.schema for c in node.inputs]
    if out is None or any(s is None for s in schemas):
        return _stop(node, preds)

    def fits(p: Expr) -> bool:
        if not is_row_local(p):
            return False
        for c in p.columns():
            if out.get_field_index(c) < 0:
                return False
            t = out.field(c).type
            for s in schemas:
                if s.get_field_index(c) < 0 or not s.field(c).type.equals(t):  # type: ignore[union-attr]
                    return False
        return True

    down = [p for p in preds if fits(p)]
    rest = [p for p in preds if not fits(p)]
    return rebuilt(node, (sink(c, down) for c in node.inputs)), rest


def _join(node: Join, preds: list[Expr]) -> tuple[Node, list[Expr]]:
    info = join_columns(node) if preds else None
    sides: tuple[list[Expr], list[Expr]] = ([], [])
    rest = []
    for p in preds:
        targets = push_sides(info, node.how, p.columns()) if (info is not None
                                                                  and is_row_local(p)) else None
        if targets is None:
            rest.append(p)
            continue
        rewritten = []
        for s in targets:
            q = rename_columns(p, {c: info.source[c][s] for c in p.columns()})  # type: ignore[union-attr]
            if q is None:
                break
            rewritten.append((s, q))
        else:
            for s, q in rewritten:
                sides[s].append(q)
            continue
        rest.append(p)
    condition, own = _split_condition(node)
    left = sink(node.left, sides[0] + own[0])
    right = sink(node.right, sides[1] + own[1])
    if condition is not node.condition:
        return replace(node, left=left, right=right, condition=condition), rest
    return rebuilt(node, (left, right)), rest


#: The inputs of a keyed join a conjunct of its condition reading that input alone may be
#: applied to, by join type (a side whose unmatched rows the join keeps never is).
_CONDITION_SIDES = {"inner": (LEFT, RIGHT), "left": (RIGHT,), "right": (LEFT,),
                    "semi": (LEFT, RIGHT), "anti": (RIGHT,)}


def _split_condition(node: Join) -> tuple[Expr | None, tuple[list[Expr], list[Expr]]]:
    """The join's condition without the conjuncts that can be applied to one input, and
    those conjuncts by input (renamed to its columns); the same condition object when none
    can."""
    sides: tuple[list[Expr], list[Expr]] = ([], [])
    allowed = _CONDITION_SIDES.get(node.how, ())
    if node.condition is None or not node.left_on or not allowed:
        return node.condition, sides
    # the condition names columns as the inner join outputs them
    info = join_columns(replace(node, how="inner", condition=None))
    if info is None:
        return node.condition, sides
    rest = []
    for p in conjuncts(node.condition):
        cols = p.columns()
        side = next((s for s in allowed if cols and is_row_local(p) and all(
            c in info.source and s in info.source[c] for c in cols)), None)
        q = rename_columns(p, {c: info.source[c][side] for c in cols}) \
            if side is not None else None
        if q is None:
            rest.append(p)
        else:
            sides[side].append(q)  # type: ignore[index]
    if not sides[0] and not sides[1]:
        return node.condition, sides
    return (conjoin(rest) if rest else None), sides


_HANDLERS = {
    Project: _project,
    WithColumns: _with_columns,
    Rename: _rename,
    Drop: _drop,
    Explode: _explode,
    Aggregate: _aggregate,
    Union: _union,
    Join: _join,
    **{t: _pass for t in _PASS_THROUGH},
}
