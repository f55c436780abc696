"""Expression helpers the rules share: conjunctions split and rebuilt, column references
substituted, row-local expressions recognised, null rejection tested, literals folded.

Only the expression classes whose meaning is known here (columns, literals, aliases,
registered row-wise operations, ``when``) are looked into and rebuilt; any other
expression (a window function, an aggregate inside an expression, a class added later)
is opaque: a rule leaves it and the nodes holding it where they are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import pyarrow as pa

from millstream.expr.conditional import When
from millstream.expr.nodes import Alias, Column, Expr, Literal, _Func

#: Registered operations that compute each row from that row alone, deterministically
#: (prefixes cover the string, date-time and numeric families). Anything else is opaque.
_ROW_OPS = frozenset({"add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "abs",
                      "round", "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "xor", "not",
                      "is_null", "is_not_null", "fill_null", "is_in", "cast"})
_ROW_OP_PREFIXES = ("str_", "dt_", "num_")
#: Comparison operations and their mirror (``a < b`` is ``b > a``).
MIRRORED = {"eq": "eq", "ne": "ne", "lt": "gt", "le": "ge", "gt": "lt", "ge": "le"}


def _row_op(op: str) -> bool:
    return op in _ROW_OPS or op.startswith(_ROW_OP_PREFIXES)


def is_row_local(e: Expr) -> bool:
    """True when ``e`` computes each row from that row's columns only, deterministically
    (so it may be evaluated on any subset of rows, before or after other row filters)."""
    t = type(e)
    if t is Column or t is Literal:
        return True
    if t is Alias:
        return is_row_local(e.child)  # type: ignore[attr-defined]
    if t is _Func:
        return _row_op(e.op) and all(is_row_local(a) for a in e.args)  # type: ignore[attr-defined]
    if t is When:
        return all(is_row_local(c) for c in e._children())
    return False


def rebuild(e: Expr, children: tuple[Expr, ...]) -> Expr:
    """``e`` over new children (in the order of ``e._children()``); ``e`` itself when they
    are the same objects. Only for the classes :func:`is_row_local` knows."""
    old = e._children()
    if len(old) == len(children) and all(a is b for a, b in zip(old, children)):
        return e
    t = type(e)
    if t is Alias:
        return Alias(children[0], e.name)  # type: ignore[attr-defined]
    if t is _Func:
        return _Func(e.op, tuple(children), e.params)  # type: ignore[attr-defined]
    if t is When:
        n = len(e.branches)  # type: ignore[attr-defined]
        has_other = e.otherwise_value is not None  # type: ignore[attr-defined]
        values = children[:n + (1 if has_other else 0)]
        conds = children[len(values):]
        return When(tuple(zip(conds, values[:n])), values[n] if has_other else None)
    raise TypeError(f"cannot rebuild {type(e).__name__}")


def transform(e: Expr, fn: Callable[[Expr], Expr | None]) -> Expr | None:
    """``fn`` applied bottom-up to every node of a row-local expression (``fn`` returns the
    node to use, or None to give up); None when ``e`` is not row-local or ``fn`` gave up."""
    if not is_row_local(e):
        return None
    return _transform(e, fn)


def _transform(e: Expr, fn: Callable[[Expr], Expr | None]) -> Expr | None:
    kids = []
    for c in e._children():
        new = _transform(c, fn)
        if new is None:
            return None
        kids.append(new)
    return fn(rebuild(e, tuple(kids)) if kids else e)


def substitute(e: Expr, mapping: Mapping[str, Expr]) -> Expr | None:
    """``e`` with every column named in ``mapping`` replaced by its expression (aliases of
    the replacements dropped); None when ``e`` is not row-local."""
    def swap(node: Expr) -> Expr:
        if type(node) is Column and node.name in mapping:  # type: ignore[attr-defined]
            return strip_alias(mapping[node.name])  # type: ignore[attr-defined]
        return node

    return transform(e, swap)


def rename_columns(e: Expr, names: Mapping[str, str]) -> Expr | None:
    """``e`` reading column ``names[n]`` wherever it read ``n``."""
    return substitute(e, {old: Column(new) for old, new in names.items() if old != new})


def strip_alias(e: Expr) -> Expr:
    """The expression under any aliases."""
    while type(e) is Alias:
        e = e.child  # type: ignore[attr-defined]
    return e


def conjuncts(e: Expr) -> list[Expr]:
    """The parts of a conjunction ``a & b & ...`` (the expression itself otherwise)."""
    e = strip_alias(e)
    if type(e) is _Func and e.op == "and":  # type: ignore[attr-defined]
        return [p for a in e.args for p in conjuncts(a)]  # type: ignore[attr-defined]
    return [e]


def disjuncts(e: Expr) -> list[Expr]:
    """The parts of a disjunction ``a | b | ...`` (the expression itself otherwise)."""
    e = strip_alias(e)
    if type(e) is _Func and e.op == "or":  # type: ignore[attr-defined]
        return [p for a in e.args for p in disjuncts(a)]  # type: ignore[attr-defined]
    return [e]


def factor_disjunction(e: Expr) -> list[Expr] | None:
    """``(a & b & x) | (a & b & y)`` as the conjuncts ``[a, b, x | y]`` (distributivity,
    which Kleene logic keeps), so the common parts can be pushed down alone (TPC-H Q19's
    ship mode and instruction); None when the branches share no conjunct."""
    branches = [conjuncts(d) for d in disjuncts(e)]
    if len(branches) < 2:
        return None
    keys = [{repr(c): c for c in b} for b in branches]
    common = [k for k in keys[0] if all(k in other for other in keys[1:])]
    if not common:
        return None
    rests = [[c for c in b if repr(c) not in common] for b in branches]
    out = [keys[0][k] for k in common]
    if all(rests):  # (a branch left with nothing is true: the disjunction is then true)
        rest = conjoin(rests[0])
        for r in rests[1:]:
            rest = _Func("or", (rest, conjoin(r)))
        out.append(rest)
    return out


def conjoin(parts: Iterable[Expr]) -> Expr:
    """``a & b & ...`` of a non-empty list (one part stays itself)."""
    parts = list(parts)
    out = parts[0]
    for p in parts[1:]:
        out = _Func("and", (out, p))
    return out


def same(a: Expr, b: Expr) -> bool:
    """Structural equality of two expressions (by their canonical text)."""
    return a is b or (type(a) is type(b) and repr(a) == repr(b))


def column_pair(e: Expr) -> tuple[str, str, str] | None:
    """``(op, a, b)`` for a comparison of two plain columns ``col(a) op col(b)``."""
    e = strip_alias(e)
    if type(e) is _Func and e.op in MIRRORED and len(e.args) == 2:  # type: ignore[attr-defined]
        x, y = (strip_alias(a) for a in e.args)  # type: ignore[attr-defined]
        if type(x) is Column and type(y) is Column:
            return e.op, x.name, y.name  # type: ignore[attr-defined]
    return None


_ONE_ROW: list[pa.RecordBatch] = []  # made on first use (building Arrow data at import
# time makes pyarrow import pandas: a second of start-up)


def _one_row() -> pa.RecordBatch:
    if not _ONE_ROW:
        _ONE_ROW.append(pa.RecordBatch.from_arrays([pa.array([0], pa.int8())], names=["__one"]))
    return _ONE_ROW[0]


def fold(e: Expr) -> Literal | None:
    """A row-local expression without columns evaluated once, as a literal of the same type
    (None when it reads columns, is not row-local or fails: it then fails when it runs)."""
    if not is_row_local(e) or e.columns():
        return None
    try:
        value = strip_alias(e).evaluate(_one_row())
    except Exception:  # noqa: BLE001 - an error stays where the user put it: at run time
        return None
    if len(value) != 1:
        return None
    return Literal(value[0])


def literal_truth(e: Expr) -> bool | None:
    """True/False for a boolean literal; None for anything else. A null literal counts as
    False (a filter drops rows where it is null)."""
    e = strip_alias(e)
    if type(e) is not Literal:
        return None
    s = e.scalar  # type: ignore[attr-defined]
    if pa.types.is_boolean(s.type) or pa.types.is_null(s.type):
        return bool(s.as_py()) if s.is_valid else False
    return None


def rejects_nulls(e: Expr, schema: pa.Schema, columns: Iterable[str]) -> bool:
    """True when ``e`` (a filter condition) is null or false on every row whose ``columns``
    are all null, whatever the others hold: it then removes the rows an outer join pads
    with nulls. Decided by evaluating it on such a row, so ``e`` must read only
    ``columns`` (and be row-local)."""
    cols = set(columns)
    if not is_row_local(e) or not e.columns() <= cols:
        return False
    fields = [schema.field(c) for c in sorted(e.columns()) if schema.get_field_index(c) >= 0]
    if len(fields) != len(e.columns()):
        return False
    arrays = [pa.nulls(1, f.type) for f in fields]
    batch = (pa.RecordBatch.from_arrays(arrays, names=[f.name for f in fields]) if fields
             else _one_row())
    try:
        value = e.evaluate(batch)
    except Exception:  # noqa: BLE001 - not decidable here: keep the join as it is
        return False
    return len(value) == 1 and (not value[0].is_valid or value[0].as_py() is False)


def output_type(e: Expr, schema: pa.Schema | None) -> pa.DataType | None:
    """The type ``e`` computes on rows of ``schema``; None when unknown or it fails."""
    if schema is None:
        return None
    try:
        return e.output_type(schema)
    except Exception:  # noqa: BLE001 - unknown: callers then leave the expression alone
        return None


def size(e: Expr) -> int:
    """The number of nodes of an expression tree."""
    return 1 + sum(size(c) for c in e._children())
