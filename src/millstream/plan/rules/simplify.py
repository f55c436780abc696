"""Constant folding and expression simplification.

Parts of expressions without columns are computed once (``lit(2) * 3``, ``lit("1").cast
("int")``, comparisons of literals); boolean logic is simplified where Kleene logic allows
(``x & True`` is ``x``, ``x | True`` is true, ``~~x`` is ``x``, for boolean ``x``); in a
filter, ``x == x`` is ``x.is_not_null()`` and ``x != x`` is false (not for floats: NaN),
and conjuncts common to every branch of a disjunction are taken out of it
(``(a & x) | (a & y)`` is ``a & (x | y)``), so pushdown can move them alone.
A filter that is always true disappears; one that is always false (or null) leaves an
empty relation of the same schema (in a batch plan; a streaming plan keeps its sources, as
they carry its event time). An expression that fails when folded is left to fail where
the user put it, when it runs.
"""

from __future__ import annotations

from dataclasses import replace

import pyarrow as pa

from millstream.expr.aggregates import AggSpec
from millstream.expr.nodes import Alias, Column, Expr, Literal, _Func
from millstream.plan.logical import Aggregate, Filter, Node, Project, WithColumns
from millstream.plan.rules.base import Rule, RuleContext
from millstream.plan.rules.common import bounded, empty_relation, streaming
from millstream.plan.rules.exprs import (
    column_pair,
    conjoin,
    conjuncts,
    factor_disjunction,
    fold,
    is_row_local,
    literal_truth,
    output_type,
    strip_alias,
    transform,
)

_BOOLS: dict[bool, Literal] = {}  # made on first use (pa.scalar at import time makes
# pyarrow import pandas)


def _lit(value: bool) -> Literal:
    if value not in _BOOLS:
        _BOOLS[value] = Literal(value)
    return _BOOLS[value]


class ConstantFolding(Rule):
    """Constant parts of expressions computed once; trivial filters removed."""

    name = "constant_folding"

    def apply(self, node: Node, ctx: RuleContext) -> Node:
        return node.transform_up(lambda n: _fold_node(n, streaming(ctx)))


def _fold_node(node: Node, is_stream: bool) -> Node:
    if isinstance(node, Filter):
        return _filter(node, is_stream)
    if isinstance(node, (Project, WithColumns)):
        schema = node.child.schema
        exprs = tuple(simplify_keep_name(e, schema) for e in node.exprs)
        if any(a is not b for a, b in zip(exprs, node.exprs)):
            return replace(node, exprs=exprs)
        return node
    if isinstance(node, Aggregate):
        schema = node.child.schema
        specs = []
        changed = False
        for s in node.specs:
            arg = simplify_keep_name(s.arg, schema) if s.arg is not None else None
            changed |= arg is not s.arg
            specs.append(AggSpec(s.func, arg, s.name) if arg is not s.arg else s)
        return replace(node, specs=tuple(specs)) if changed else node
    return node


def _filter(node: Filter, is_stream: bool) -> Node:
    schema = node.child.schema
    parts = conjuncts(node.predicate)
    new_parts = []
    for p in parts:
        p = simplify(p, schema)
        factored = factor_disjunction(p) if is_row_local(p) else None
        for q in (factored if factored is not None else [p]):
            new_parts.append(_filter_conjunct(q, schema))
    kept: list[Expr] = []
    for p in new_parts:
        truth = literal_truth(p)
        if truth is True:
            continue
        if truth is False:
            if not is_stream and bounded(node.child) and schema is not None:
                return empty_relation(schema)
            kept = [_lit(False)]
            break
        kept.append(p)
    if not kept:
        return node.child
    if len(kept) == len(parts) and all(a is b for a, b in zip(kept, parts)):
        return node
    if len(kept) == 1 and len(parts) == 1 and literal_truth(parts[0]) is False:
        return node  # already as simple as it gets (a streaming plan's false filter)
    return replace(node, predicate=conjoin(kept))


def _filter_conjunct(p: Expr, schema: pa.Schema | None) -> Expr:
    """Rewrites valid where a null result counts as false (a filter's conjunct)."""
    pair = column_pair(p)
    if pair is None or pair[1] != pair[2] or pair[0] not in ("eq", "ne") or schema is None:
        return p
    if schema.get_field_index(pair[1]) < 0:
        return p
    t = schema.field(pair[1]).type
    if pa.types.is_floating(t) or pa.types.is_nested(t):
        return p
    if pair[0] == "ne":
        return _lit(False)
    return _Func("is_not_null", (Column(pair[1]),))


def simplify_keep_name(e: Expr, schema: pa.Schema | None) -> Expr:
    """:func:`simplify`, keeping the output column name and type of ``e``."""
    new = simplify(e, schema)
    if new is e:
        return e
    if schema is not None:
        before, after = output_type(e, schema), output_type(new, schema)
        if before is None or after is None or not before.equals(after):
            return e
    if new.output_name != e.output_name:
        new = new.alias(e.output_name)
    return new


def simplify(e: Expr, schema: pa.Schema | None) -> Expr:
    """``e`` with constant parts folded and boolean logic simplified (``e`` itself when
    nothing changed, or when it is not an expression this rule understands)."""
    if not is_row_local(e):
        return e
    out = transform(e, lambda n: _simplify_node(n, schema))
    return e if out is None else out


def _simplify_node(e: Expr, schema: pa.Schema | None) -> Expr:
    if type(e) in (Literal, Column, Alias):
        return e  # (an alias's child is already simplified)
    folded = fold(e)
    if folded is not None:
        return folded
    if type(e) is not _Func:
        return e
    op, args = e.op, e.args  # type: ignore[attr-defined]
    if op in ("and", "or"):
        return _logic(e, op, args, schema)
    if op == "not":
        inner = strip_alias(args[0])
        if type(inner) is _Func and inner.op == "not" and _is_bool(inner.args[0], schema):  # type: ignore[attr-defined]
            return inner.args[0]  # type: ignore[attr-defined]
    return e


def _logic(e: Expr, op: str, args: tuple[Expr, ...], schema: pa.Schema | None) -> Expr:
    a, b = args
    for lit_side, other in ((a, b), (b, a)):
        truth = _bool_literal(lit_side)
        if truth is None or not _is_bool(other, schema):
            continue
        if op == "and":
            return other if truth else _lit(False)   # x & true = x;  x & false = false
        return _lit(True) if truth else other        # x | true = true;  x | false = x
    return e


def _bool_literal(e: Expr) -> bool | None:
    """True/False for a non-null boolean literal (a null literal is not simplified)."""
    e = strip_alias(e)
    if type(e) is Literal and pa.types.is_boolean(e.scalar.type) and e.scalar.is_valid:  # type: ignore[attr-defined]
        return bool(e.scalar.as_py())  # type: ignore[attr-defined]
    return None


def _is_bool(e: Expr, schema: pa.Schema | None) -> bool:
    t = output_type(e, schema) if schema is not None else None
    if t is None and not e.columns():
        t = output_type(e, pa.schema([]))
    return t is not None and pa.types.is_boolean(t)
