"""The aggregate functions users call (``ms.sum("x")``, ``ms.std("x")``, ``ms.quantile("x",
0.9)`` ...) and :func:`plan_aggregates`, which turns the items of an ``agg(...)`` call,
aggregates or expressions over aggregates, into the aggregates to compute and the projection
that computes the items from their results."""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from typing import Any

from millstream.errors import PlanError, SchemaError
from millstream.expr.aggregates import AggSpec
from millstream.expr.conditional import When
from millstream.expr.nodes import AggExpr, Alias, Column, Expr, _Func, contains_aggregate, to_expr


def _agg(func: str, c: str | Expr, **params: Any) -> AggExpr:
    if not isinstance(c, (builtins.str, Expr)):
        raise PlanError(f"{func}() expects a column name or an Expr, got {c!r}")
    return AggExpr(func, to_expr(c), params=params)


def sum(c: str | Expr) -> AggExpr:
    """Sum of the non-null values of a column."""
    return _agg("sum", c)


def mean(c: str | Expr) -> AggExpr:
    """Mean of the non-null values of a column."""
    return _agg("mean", c)


avg = mean


def min(c: str | Expr) -> AggExpr:
    """Smallest non-null value of a column."""
    return _agg("min", c)


def max(c: str | Expr) -> AggExpr:
    """Largest non-null value of a column."""
    return _agg("max", c)


def count(c: str | Expr | None = None) -> AggExpr:
    """Number of non-null values of a column; count() or count("*") counts rows."""
    if c is None or (isinstance(c, builtins.str) and c == "*"):
        return AggExpr("count_all", None)
    return _agg("count", c)


def count_distinct(c: str | Expr) -> AggExpr:
    """Number of distinct non-null values of a column."""
    return _agg("count_distinct", c)


def first(c: str | Expr) -> AggExpr:
    """First non-null value of a column in each group."""
    return _agg("first", c)


def last(c: str | Expr) -> AggExpr:
    """Last non-null value of a column in each group (in arrival order)."""
    return _agg("last", c)


def collect_list(c: str | Expr) -> AggExpr:
    """All values of a column in each group, as a list."""
    return _agg("collect_list", c)


def any_value(c: str | Expr) -> AggExpr:
    """Some non-null value of a column in each group (null only when all are null)."""
    return _agg("any_value", c)


def std(c: str | Expr, ddof: int = 1) -> AggExpr:
    """Standard deviation of the non-null values: sample (ddof=1), population (ddof=0)."""
    return _agg("std", c, ddof=ddof)


stddev = std


def var(c: str | Expr, ddof: int = 1) -> AggExpr:
    """Variance of the non-null values: sample (ddof=1), population (ddof=0)."""
    return _agg("var", c, ddof=ddof)


variance = var


def median(c: str | Expr) -> AggExpr:
    """Exact median of the non-null values (the mean of the middle two for an even count)."""
    return _agg("median", c)


def quantile(c: str | Expr, q: float, interpolation: str = "linear") -> AggExpr:
    """Exact q-quantile of the non-null values; "linear" interpolation is DuckDB's
    ``quantile_cont`` (Spark's ``percentile``), "discrete" SQL's ``percentile_disc``
    (DuckDB's ``quantile_disc``); also numpy's "lower", "higher", "midpoint", "nearest"."""
    return _agg("quantile", c, q=q, interpolation=interpolation)


def approx_count_distinct(c: str | Expr) -> AggExpr:
    """Estimated number of distinct non-null values: HyperLogLog with 4096 registers,
    standard error about 1.6%, a few KB of state per group."""
    return _agg("approx_count_distinct", c)


def approx_quantile(c: str | Expr, q: float) -> AggExpr:
    """Estimated q-quantile of the non-null values from a t-digest: the answer's rank is
    within about 0.5% of q (closer at the tails), with at most a few hundred centroids of
    state per group."""
    return _agg("approx_quantile", c, q=q)


# ---------------------------------------------------------------------- agg(...) planning


@dataclass
class AggPlan:
    """What ``agg(...)`` computes: the aggregates, then (when an item is an expression over
    aggregates) a projection of the keys and the items over the aggregates' results."""

    specs: tuple[AggSpec, ...]
    #: None when every item is a plain aggregate (the aggregates' output is the result)
    projection: tuple[Expr, ...] | None


def plan_aggregates(items: list[Any], keys: list[str], what: str = "agg()",
                    key_names: dict[str, str] | None = None) -> AggPlan:
    """Aggregates and projection for ``agg(*items)`` grouped by ``keys``.

    Items are aggregates (``ms.sum("x").alias("s")``) or expressions that combine aggregates
    with literals, functions and the group keys (``ms.max("x") - ms.min("x")``). Equal
    aggregates are computed once. ``key_names`` maps a key's name in the result to the column
    the aggregation groups by, when they differ (computed keys).
    """
    for it in items:
        if not isinstance(it, Expr):
            raise PlanError(f"{what} takes aggregates such as ms.sum('x') or ms.count(), or "
                            f"expressions over them, got {it!r}")
    if builtins.all(isinstance(it, AggExpr) for it in items):
        return AggPlan(tuple(_spec(a, a.name) for a in items), None)
    specs: list[AggSpec] = []
    by_key: dict[tuple[Any, ...], str] = {}
    taken = {it.name for it in items if isinstance(it, AggExpr)} | set(keys)
    renames = dict(key_names or {})
    for it in items:
        # plain aggregates keep their names; the others' aggregates get private ones
        if isinstance(it, AggExpr) and it.key() not in by_key:
            by_key[it.key()] = it.name
            specs.append(_spec(it, it.name))

    def private(a: AggExpr) -> Expr:
        name = by_key.get(a.key())
        if name is None:
            name = f"__agg{len(specs)}"  # (the window operators reserve __millstream*)
            while name in taken:
                name += "_"
            by_key[a.key()] = name
            specs.append(_spec(a, name))
        return Column(name)

    projection: list[Expr] = [Column(k) for k in keys]
    for it in items:
        if isinstance(it, AggExpr):
            ref = Column(by_key[it.key()])
            projection.append(ref if ref.name == it.name else ref.alias(it.name))
            continue
        if not contains_aggregate(it):
            outside = sorted(it.columns() - set(keys) - set(renames))
            if outside:
                raise SchemaError(f"{what}: {it!r} is not an aggregate and reads column(s) "
                                  f"{outside} that are not group keys; group keys: "
                                  f"{list(renames) or keys}")
        rewritten = _replace_aggregates(it, private, renames)
        outside = sorted(rewritten.columns() - set(keys) - set(by_key.values()))
        if outside:
            raise SchemaError(f"{what}: {it!r} reads column(s) {outside} outside an aggregate; "
                              f"only the group keys {list(renames) or keys} can be read there")
        named = isinstance(rewritten, Alias) and rewritten.name == it.output_name
        projection.append(rewritten if named else rewritten.alias(it.output_name))
    return AggPlan(tuple(specs), tuple(projection))


def _spec(a: AggExpr, name: str) -> AggSpec:
    return AggSpec(a.func, a.arg, name, dict(a.params))


def _replace_aggregates(e: Expr, replace: Any, renames: dict[str, str]) -> Expr:
    """``e`` with every aggregate replaced by ``replace(aggregate)`` and key columns renamed."""
    if isinstance(e, AggExpr):
        return replace(e)
    if isinstance(e, Column):
        return Column(renames[e.name]) if e.name in renames else e
    if isinstance(e, Alias):
        return Alias(_replace_aggregates(e.child, replace, renames), e.name)
    if isinstance(e, _Func):
        return _Func(e.op, tuple(_replace_aggregates(a, replace, renames) for a in e.args),
                     e.params)
    if isinstance(e, When):
        branches = tuple((_replace_aggregates(c, replace, renames),
                          _replace_aggregates(v, replace, renames)) for c, v in e.branches)
        other = e.otherwise_value
        return When(branches, None if other is None
                    else _replace_aggregates(other, replace, renames))
    if contains_aggregate(e) or e.columns():
        raise PlanError(f"agg(): cannot compute {e!r} ({type(e).__name__}) over aggregates")
    return e
