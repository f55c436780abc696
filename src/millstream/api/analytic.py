"""Window expressions in ``with_columns``, ``select`` and ``filter``: the expressions are
lowered to ``Window`` nodes (one per set of partition keys, so functions sharing a
partitioning share one shuffle) and the per-batch nodes around them.

``with_columns(f.over(...).alias("a"), g.over(...).alias("b"))`` becomes a single chain of
Window nodes computing ``a`` and ``b``. Otherwise (window expressions inside larger
expressions, mixed with plain ones, partition or order keys that are expressions, names
another window function reads, or columns the Window nodes would append in another
order) the functions are computed into private columns, which the expressions then read
and which are dropped after.
"""

from __future__ import annotations

from collections.abc import Sequence

from millstream.errors import PlanError
from millstream.expr.analytic import WindowExpr, WindowFunction
from millstream.expr.conditional import When
from millstream.expr.nodes import Alias, Column, Expr, _Func, col
from millstream.plan import logical as L
from millstream.plan.logical.analytic import sort_groups

_PRIVATE = "__millstream_window"


def window_exprs(e: Expr) -> list[WindowExpr]:
    """The window expressions inside ``e`` (outermost first; none nested in another)."""
    if isinstance(e, WindowExpr):
        for child in e._children():
            if window_exprs(child):
                raise PlanError(f"{e!r}: a window function cannot read another window "
                                f"function; compute the inner one with with_columns first")
        return [e]
    return [w for child in e._children() for w in window_exprs(child)]


def _substitute(e: Expr, names: dict[int, str]) -> Expr:
    """``e`` with each window expression replaced by the column that holds its values."""
    if isinstance(e, WindowExpr):
        return col(names[id(e)])
    if not window_exprs(e):
        return e
    if isinstance(e, Alias):
        return Alias(_substitute(e.child, names), e.name)
    if isinstance(e, _Func):
        return _Func(e.op, tuple(_substitute(a, names) for a in e.args), e.params)
    if isinstance(e, When):
        other = e.otherwise_value
        return When(tuple((_substitute(c, names), _substitute(v, names)) for c, v in e.branches),
                    None if other is None else _substitute(other, names))
    raise PlanError(f"a window function inside {type(e).__name__} is not supported; add it "
                    f"as a column with with_columns first")


def _top_level(e: Expr) -> WindowExpr | None:
    """The window expression ``e`` is (possibly renamed), else None."""
    while isinstance(e, Alias):
        e = e.child
    return e if isinstance(e, WindowExpr) else None


class _Lowering:
    """Window expressions -> private key columns, resolved functions, Window nodes."""

    def __init__(self) -> None:
        self.keys: list[Expr] = []  # computed partition/order keys (aliased to private names)
        self.partitions: dict[tuple[str, ...], list[WindowFunction]] = {}

    def _key(self, e: Expr) -> str:
        if isinstance(e, Column):
            return e.name
        name = f"{_PRIVATE}_key{len(self.keys)}"
        self.keys.append(e.alias(name))
        return name

    def add(self, w: WindowExpr, name: str) -> None:
        parts = tuple(self._key(e) for e in w.spec.partition_by)
        order = [self._key(e) for e in w.spec.order_by]
        self.partitions.setdefault(parts, []).append(w.resolve(name, order))

    def functions(self) -> list[WindowFunction]:
        return [f for fs in self.partitions.values() for f in fs]

    def appended_order(self) -> list[str]:
        """The order the Window nodes append their columns in (by partitioning, then by
        sort within each)."""
        return [f.name for fns in self.partitions.values() for group in sort_groups(fns)
                for f in group]

    def build(self, child: L.Node) -> L.Node:
        node = L.WithColumns(child, tuple(self.keys)) if self.keys else child
        for parts, fns in self.partitions.items():
            node = L.Window(node, parts, tuple(fns))
        return node

    def private(self) -> tuple[str, ...]:
        return tuple(k.output_name for k in self.keys)


def _private(child: L.Node, found: list[list[WindowExpr]], exprs: Sequence[Expr]
             ) -> tuple[L.Node, list[Expr], tuple[str, ...]]:
    """Every window function computed into a private column: the Window nodes over
    ``child``, the expressions reading those columns (under their own names), and the
    private names."""
    lowering, names = _Lowering(), {}
    for ws in found:
        for w in ws:
            if id(w) not in names:  # the same expression used twice is computed once
                names[id(w)] = f"{_PRIVATE}{len(names)}"
                lowering.add(w, names[id(w)])
    subst = []
    for e in exprs:
        out = _substitute(e, names)
        subst.append(out if out.output_name == e.output_name else out.alias(e.output_name))
    return lowering.build(child), subst, (*names.values(), *lowering.private())


def with_columns(child: L.Node, exprs: Sequence[Expr]) -> L.Node:
    """``Dataset.with_columns``: a WithColumns node, or Window nodes (and the per-batch
    nodes around them) when expressions hold window functions."""
    found = [window_exprs(e) for e in exprs]
    if not any(found):
        return L.WithColumns(child, tuple(exprs))
    tops = [_top_level(e) for e in exprs]
    if all(t is not None for t in tops):
        direct = _Lowering()
        for e, w in zip(exprs, tops):
            direct.add(w, e.output_name)
        names = [e.output_name for e in exprs]
        reads = set().union(*(f.columns() for f in direct.functions()))
        reads |= {k for parts in direct.partitions for k in parts}
        if not direct.keys and len(set(names)) == len(names) and not set(names) & reads \
                and direct.appended_order() == names:
            return direct.build(child)
    node, subst, private = _private(child, found, exprs)
    return L.Drop(L.WithColumns(node, tuple(subst)), private, strict=False)


def select(child: L.Node, exprs: Sequence[Expr]) -> L.Node:
    """``Dataset.select``: a Project node, over Window nodes when expressions hold window
    functions (computed into private columns the projection reads)."""
    found = [window_exprs(e) for e in exprs]
    if not any(found):
        return L.Project(child, tuple(exprs))
    node, subst, _ = _private(child, found, exprs)
    return L.Project(node, tuple(subst))


def filter_rows(child: L.Node, predicate: Expr) -> L.Node:
    """``Dataset.filter``: a Filter node; a predicate over window functions (SQL's
    QUALIFY) filters after Window nodes computing them into private columns."""
    found = [window_exprs(predicate)]
    if not any(found):
        return L.Filter(child, predicate)
    node, subst, private = _private(child, found, [predicate])
    return L.Drop(L.Filter(node, subst[0]), private, strict=False)
