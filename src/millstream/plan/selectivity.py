"""Filter selectivities: the share of rows a predicate keeps, from an :class:`Estimate` of
its input. Conjuncts apply one after another, each narrowing the statistics the next one
sees (so ``a >= 1 & a <= 5`` is one range); equality is 1/NDV (0 outside min/max),
ranges come from min/max, null tests from null counts, string pattern matches a tenth,
and anything else gets a default fraction."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from millstream.expr.nodes import Column, Expr, Literal, conjuncts
from millstream.plan.estimates import ColumnStats, Estimate, number, scaled_ndv

#: Selectivity of ``col == value`` when the column's distinct count is unknown.
DEFAULT_EQ_SELECTIVITY = 0.1
#: Selectivity of a range comparison without min/max statistics.
DEFAULT_RANGE_SELECTIVITY = 1 / 3
#: Selectivity of any other predicate (functions of columns).
DEFAULT_SELECTIVITY = 0.25
#: Selectivity of matching a string pattern (contains, starts/ends with, LIKE): TPC-H's
#: range from 1% (``p_name`` starting with "forest") to 20% (a ``p_type`` ending with
#: "BRASS"); 0.25 overestimated Q9's and Q20's part filters 5x to 25x.
STRING_MATCH_SELECTIVITY = 0.1
_STRING_MATCHES = {"str_contains", "str_starts_with", "str_ends_with", "str_like",
                   "str_regexp_like"}
#: Share of nulls assumed when a column's null count is unknown.
DEFAULT_NULL_FRACTION = 0.05

_COMPARISONS = {"eq", "ne", "lt", "le", "gt", "ge"}
_FLIPPED = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le", "eq": "eq", "ne": "ne"}


def filtered(est: Estimate, predicate: Expr) -> Estimate:
    """``est`` after rows failing ``predicate`` are dropped: conjuncts one by one
    (each narrowing what the next one sees: ``a >= 1 & a <= 5`` is one range)."""
    for conjunct in conjuncts(predicate):
        est = _apply(est, conjunct)
    return est


def _apply(est: Estimate, pred: Expr) -> Estimate:
    sel, col, stats = _conjunct(est, pred)
    rows = est.rows * sel
    if est.rows >= 1:
        rows = max(rows, 1.0)
    cols = {}
    for n, c in est.columns.items():
        if n == col and stats is not None:
            cols[n] = stats
        else:
            ndv = scaled_ndv(c.ndv, est.rows, rows)
            cols[n] = c if ndv == c.ndv else replace(c, ndv=ndv)
    return Estimate(rows, est.width, cols)


def selectivity(est: Estimate, pred: Expr) -> float:
    """The share of rows of ``est`` for which ``pred`` holds (0..1)."""
    out = 1.0
    for conjunct in conjuncts(pred):
        sel, col, stats = _conjunct(est, conjunct)
        out *= sel
        est = _apply(est, conjunct) if col is not None else est
    return out


def _conjunct(est: Estimate, pred: Expr) -> tuple[float, str | None, ColumnStats | None]:
    """(selectivity, the column it constrains, that column's stats after it)."""
    op = getattr(pred, "op", None)
    args = getattr(pred, "args", ())
    if isinstance(pred, Literal):
        return (1.0 if pred.value is True else 0.0), None, None
    if op == "and":
        return selectivity(est, pred), None, None
    if op == "or":
        a, b = (selectivity(est, x) for x in args)
        return min(1.0, a + b - a * b), None, None
    if op == "not":
        return max(0.0, 1.0 - selectivity(est, args[0])), None, None
    if op in ("is_null", "is_not_null") and isinstance(args[0], Column):
        c = est.columns.get(args[0].name)
        nf = c.null_fraction if c is not None and c.null_fraction is not None \
            else DEFAULT_NULL_FRACTION
        return (nf if op == "is_null" else 1 - nf), None, None
    if op == "is_in" and isinstance(args[0], Column):
        values = pred.params.get("values") or []  # type: ignore[attr-defined]
        eq = _eq_selectivity(est, args[0].name)
        return min(1.0, eq * max(1, len(values))), None, None
    if op in _COMPARISONS and len(args) == 2:
        a, b = args
        if isinstance(a, Literal) and isinstance(b, Column):
            a, b, op = b, a, _FLIPPED[op]
        if isinstance(a, Column) and isinstance(b, Literal):
            return _compare(est, a.name, op, b.value)
        if isinstance(a, Column) and isinstance(b, Column):
            if op == "eq":
                da, db = est.ndv(a.name), est.ndv(b.name)
                known = [d for d in (da, db) if d is not None]
                return (1.0 / max(known) if known else DEFAULT_EQ_SELECTIVITY), None, None
            if op == "ne":
                return 1.0 - DEFAULT_EQ_SELECTIVITY, None, None
            return DEFAULT_RANGE_SELECTIVITY, None, None
        return (DEFAULT_EQ_SELECTIVITY if op == "eq" else DEFAULT_RANGE_SELECTIVITY), None, None
    if op in _STRING_MATCHES:
        return STRING_MATCH_SELECTIVITY, None, None
    return DEFAULT_SELECTIVITY, None, None


def _eq_selectivity(est: Estimate, name: str) -> float:
    d = est.ndv(name)
    c = est.columns.get(name)
    nonnull = 1 - (c.null_fraction or 0.0) if c is not None else 1.0
    return nonnull / d if d else DEFAULT_EQ_SELECTIVITY


def _compare(est: Estimate, name: str, op: str, value: Any
             ) -> tuple[float, str | None, ColumnStats | None]:
    c = est.columns.get(name)
    if value is None:
        return 0.0, None, None  # a comparison with null is never true
    lo = hi = None
    if c is not None and c.min is not None and c.max is not None:
        lo, hi = c.min, c.max
    nonnull = 1 - (c.null_fraction or 0.0) if c is not None else 1.0
    try:
        outside = lo is not None and (value < lo or value > hi)
    except TypeError:
        outside, lo, hi = False, None, None
    if op == "eq":
        if outside:
            return 0.0, name, c
        sel = _eq_selectivity(est, name)
        if c is None:
            return sel, None, None
        return sel, name, replace(c, ndv=1.0, min=value, max=value, null_fraction=0.0)
    if op == "ne":
        return (nonnull if outside else nonnull - _eq_selectivity(est, name)), None, None
    if lo is None:
        return DEFAULT_RANGE_SELECTIVITY, None, None
    x, a, b = number(value), number(lo), number(hi)
    if x is None or a is None or b is None:
        return DEFAULT_RANGE_SELECTIVITY, None, None
    if b <= a:
        keep = {"lt": x > a, "le": x >= a, "gt": x < a, "ge": x <= a}[op]
        return (nonnull if keep else 0.0), None, None
    frac = (x - a) / (b - a)
    frac = min(1.0, max(0.0, frac if op in ("lt", "le") else 1 - frac))
    sel = nonnull * frac
    assert c is not None
    if op in ("lt", "le"):
        new = replace(c, max=value if value < hi else hi, null_fraction=0.0)
    else:
        new = replace(c, min=value if value > lo else lo, null_fraction=0.0)
    if c.ndv is not None:
        new = replace(new, ndv=max(1.0, c.ndv * frac))
    return sel, name, new
