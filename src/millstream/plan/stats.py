"""Cardinality and size estimates of logical plans, for join ordering and the broadcast
choice.

An :class:`Estimate` is the rows a node is expected to produce, their width in bytes, and
what is known of each output column (:class:`ColumnStats`: distinct values, min/max,
null share, width). Scans start from their sources' statistics (Parquet footers,
in-memory tables, ranges) and the filters pushed into them; filters apply selectivities
(equality 1/NDV, ranges from min/max, defaults otherwise); projections, aggregates
(groups <= min(rows, product of the keys' NDVs)), joins (``|L| * |R| / max(NDV)``, semi
and anti joins bounded by the left side), unions and limits derive theirs. A node whose
rows cannot be bounded (a flat_map, a Python batch function, a streaming window) has no
estimate (None), and neither has anything above it that needs its rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import pyarrow as pa

from millstream.expr.nodes import Alias, Column, Expr, Literal
from millstream.plan import logical as L
from millstream.plan.estimates import (
    ColumnStats,
    Estimate,
    column_from_statistics,
    row_width,
    scaled_ndv,
    type_width,
)
from millstream.plan.selectivity import filtered

#: Share of left rows an anti join keeps at least (its estimate is a difference).
MIN_ANTI_FRACTION = 0.1


class Estimator:
    """Estimates of the nodes of plans, each computed once (nodes are immutable)."""

    def __init__(self, cache_lookup: Callable[[int], list[Any] | None] | None = None) -> None:
        self.cache_lookup = cache_lookup
        self._memo: dict[int, tuple[L.Node, Estimate | None]] = {}

    def estimate(self, node: L.Node) -> Estimate | None:
        """The estimate of ``node``'s output, or None when its rows cannot be bounded."""
        hit = self._memo.get(id(node))
        if hit is not None and hit[0] is node:
            return hit[1]
        m = getattr(self, "_est_" + type(node).__name__, None)
        try:
            est = m(node) if m is not None else None
        except (pa.ArrowException, TypeError, ValueError, ArithmeticError, OverflowError):
            est = None  # an estimate is never worth a failed query
        self._memo[id(node)] = (node, est)
        return est

    def rows(self, node: L.Node) -> float | None:
        est = self.estimate(node)
        return None if est is None else est.rows

    def bytes(self, node: L.Node) -> float | None:
        est = self.estimate(node)
        return None if est is None else est.bytes

    # ---------------------------------------------------------------- sources
    def _est_Scan(self, node: L.Scan) -> Estimate | None:
        src = node.source
        schema = node.schema
        st = src.statistics()
        if st is None:
            size = src.estimated_size_bytes()
            if size is None or schema is None:
                return None
            cols = {f.name: ColumnStats(width=type_width(f.type)) for f in schema}
            width = row_width(cols, 8.0) or 8.0
            return Estimate(max(1.0, size / width), width, cols)
        rows = float(st.num_rows)
        names = schema.names if schema is not None else list(st.columns)
        cols = {}
        for name in names:
            t = schema.field(name).type if schema is not None else None
            cols[name] = column_from_statistics(st.columns.get(name), t, rows)
        est = Estimate(rows, row_width(cols, 8.0), cols)
        for pred in st.predicates:
            if isinstance(pred, Expr):
                est = filtered(est, pred)
        return est

    def _est_Cache(self, node: L.Cache) -> Estimate | None:
        blocks = self.cache_lookup(node.cache_id) if self.cache_lookup is not None else None
        child = self.estimate(node.child)
        if blocks is None:
            return child
        rows = float(sum(getattr(b, "rows", 0) for b in blocks))
        nbytes = float(sum(getattr(b, "nbytes", 0) for b in blocks))
        cols = child.columns if child is not None else {}
        return Estimate(rows, nbytes / rows if rows else 0.0, cols)

    # ---------------------------------------------------------------- row nodes
    def _same(self, node: L.Node) -> Estimate | None:
        return self.estimate(node.children[0])

    _est_Sort = _est_Repartition = _est_Shared = _est_WithWatermark = _same
    _est_FilterRows = _same  # a Python predicate: at most its input

    def _est_Map(self, node: L.Map) -> Estimate | None:
        child = self.estimate(node.child)
        if child is None:
            return None
        schema = node.schema
        if schema is None:
            return Estimate(child.rows, child.width, {})
        cols = {f.name: ColumnStats(width=type_width(f.type)) for f in schema}
        return Estimate(child.rows, row_width(cols, child.width), cols)

    def _est_Filter(self, node: L.Filter) -> Estimate | None:
        child = self.estimate(node.child)
        return None if child is None else filtered(child, node.predicate)

    def _expr_column(self, e: Expr, child: Estimate, t: pa.DataType | None) -> ColumnStats:
        inner = e.child if isinstance(e, Alias) else e
        if isinstance(inner, Column) and inner.name in child.columns:
            return child.columns[inner.name]
        if isinstance(inner, Literal):
            v = inner.value
            return ColumnStats(1.0, v, v, 0.0, type_width(t) if t is not None else 8.0)
        return ColumnStats(width=type_width(t) if t is not None else 8.0)

    def _est_Project(self, node: L.Project) -> Estimate | None:
        child = self.estimate(node.child)
        if child is None:
            return None
        schema = node.schema
        cols = {}
        for i, e in enumerate(node.exprs):
            t = schema.field(i).type if schema is not None else None
            cols[e.output_name] = self._expr_column(e, child, t)
        return Estimate(child.rows, row_width(cols, 8.0), cols)

    def _est_WithColumns(self, node: L.WithColumns) -> Estimate | None:
        child = self.estimate(node.child)
        if child is None:
            return None
        schema = node.schema
        cols = dict(child.columns)
        for e in node.exprs:
            t = schema.field(e.output_name).type if schema is not None \
                and schema.get_field_index(e.output_name) >= 0 else None
            cols[e.output_name] = self._expr_column(e, child, t)
        extra = 0.0 if child.columns else sum(c.width for n, c in cols.items())
        return Estimate(child.rows, row_width(cols, child.width + extra), cols)

    def _est_Drop(self, node: L.Drop) -> Estimate | None:
        child = self.estimate(node.child)
        if child is None:
            return None
        cols = {n: c for n, c in child.columns.items() if n not in node.columns}
        return Estimate(child.rows, row_width(cols, child.width), cols)

    def _est_Rename(self, node: L.Rename) -> Estimate | None:
        child = self.estimate(node.child)
        if child is None:
            return None
        names = dict(node.mapping)
        cols = {names.get(n, n): c for n, c in child.columns.items()}
        return Estimate(child.rows, child.width, cols)

    def _est_Limit(self, node: L.Limit) -> Estimate | None:
        child = self.estimate(node.child)
        if child is None:
            return None
        rows = min(float(node.n), child.rows)
        return Estimate(rows, child.width, {n: replace(c, ndv=scaled_ndv(c.ndv, child.rows, rows))
                                            for n, c in child.columns.items()})

    # ---------------------------------------------------------------- relational
    def _groups(self, child: Estimate, keys: Iterable[str]) -> float:
        """Distinct key combinations: at most the rows and the product of the keys' NDVs."""
        keys = list(keys)
        if not keys:
            return 1.0
        product = 1.0
        for k in keys:
            d = child.ndv(k)
            if d is None:
                return max(1.0, child.rows)
            product *= d
        return max(1.0, min(child.rows, product))

    def _est_Aggregate(self, node: L.Aggregate) -> Estimate | None:
        child = self.estimate(node.child)
        if child is None:
            return None
        groups = self._groups(child, node.keys) if child.rows >= 1 else \
            (1.0 if not node.keys else 0.0)
        schema = node.schema
        cols = {}
        for k in node.keys:
            c = child.columns.get(k, ColumnStats())
            cols[k] = replace(c, ndv=None if c.ndv is None else min(c.ndv, groups))
        for s in node.specs:
            t = schema.field(s.name).type if schema is not None \
                and schema.get_field_index(s.name) >= 0 else None
            cols[s.name] = ColumnStats(width=type_width(t) if t is not None else 8.0)
        return Estimate(groups, row_width(cols, 8.0), cols)

    def _est_Distinct(self, node: L.Distinct) -> Estimate | None:
        child = self.estimate(node.child)
        if child is None:
            return None
        groups = self._groups(child, child.columns) if child.columns else child.rows
        return Estimate(groups, child.width, {n: replace(c, ndv=None if c.ndv is None
                                                          else min(c.ndv, groups))
                                              for n, c in child.columns.items()})

    def _est_Union(self, node: L.Union) -> Estimate | None:
        ests = [self.estimate(c) for c in node.inputs]
        if any(e is None for e in ests) or not ests:
            return None
        rows = sum(e.rows for e in ests)  # type: ignore[union-attr]
        first = ests[0]
        cols = {}
        for name, c in first.columns.items():  # type: ignore[union-attr]
            parts = [e.columns.get(name) for e in ests]  # type: ignore[union-attr]
            ndvs = [p.ndv for p in parts if p is not None]
            ndv = min(rows, sum(ndvs)) if len(ndvs) == len(parts) else None
            cols[name] = ColumnStats(ndv, None, None, None, c.width, c.base_ndv, c.base_rows)
        width = sum(e.bytes for e in ests) / rows if rows else first.width  # type: ignore[union-attr]
        return Estimate(rows, width, cols)

    def _keys_ndv(self, est: Estimate, keys: Iterable[str]
                  ) -> tuple[float, float | None, bool]:
        """(distinct key combinations now, distinct combinations in the keys' domain,
        whether the first is only an upper bound)."""
        now = 1.0
        base: float | None = 1.0
        base_rows: float | None = None
        upper = False
        for k in keys:
            d = est.ndv(k)
            now = now * (d if d is not None else max(1.0, est.rows))
            c = est.columns.get(k)
            upper = upper or c is None or d is None or c.ndv_upper
            if c is None or (c.base_ndv is None and c.base_rows is None):
                base = None
                continue
            if base is not None:
                base *= c.base_ndv if c.base_ndv is not None else c.base_rows  # type: ignore[operator]
            if c.base_rows is not None:
                base_rows = c.base_rows if base_rows is None else min(base_rows, c.base_rows)
        if now > est.rows:
            now, upper = est.rows, True
        now = max(1.0, now)
        if base is not None and base_rows is not None:
            base = min(base, base_rows)
        return now, base, upper

    def _est_Join(self, node: L.Join) -> Estimate | None:
        le, re = self.estimate(node.left), self.estimate(node.right)
        if le is None or re is None:
            return None
        how = node.how
        if how == "cross" or not node.left_on:
            inner = le.rows * re.rows
            m_left = m_right = 1.0
            key_ndv = None
        else:
            dl, bl, ul = self._keys_ndv(le, node.left_on)
            dr, br, ur = self._keys_ndv(re, node.right_on)
            # containment: where a side's NDV is only a bound, its values that can find a
            # partner are at most the other side's domain (a foreign key's values are
            # among its primary key's)
            dl2 = min(dl, br) if br is not None and ul else dl
            dr2 = min(dr, bl) if bl is not None and ur else dr
            d = max(dl2, dr2, 1.0)
            inner = le.rows * re.rows / d
            m_left = min(1.0, dr2 / dl2) if dl2 > 0 else 0.0
            m_right = min(1.0, dl2 / dr2) if dr2 > 0 else 0.0
            key_ndv = min(dl2, dr2)
        if how == "semi":
            rows = le.rows * m_left
        elif how == "anti":
            rows = le.rows * max(1.0 - m_left, MIN_ANTI_FRACTION)
        elif how == "left":
            rows = max(inner, le.rows)
        elif how == "right":
            rows = max(inner, re.rows)
        elif how in ("outer", "full"):
            rows = inner + le.rows * (1 - m_left) + re.rows * (1 - m_right)
        else:
            rows = inner
        cols = self._join_columns(node, le, re, rows, key_ndv)
        width = le.width if how in ("semi", "anti") else \
            row_width(cols, le.width + re.width) if le.columns and re.columns \
            else le.width + re.width
        est = Estimate(max(rows, 1.0) if le.rows >= 1 and re.rows >= 1 else rows, width, cols)
        condition = getattr(node, "condition", None)
        if isinstance(condition, Expr) and how not in ("left", "right", "outer", "full"):
            est = filtered(est, condition)
        return est

    def _join_columns(self, node: L.Join, le: Estimate, re: Estimate, rows: float,
                      key_ndv: float | None) -> dict[str, ColumnStats]:
        """The output columns as the hash joins name them: left ones, then right ones
        without same-named keys, clashes getting the suffix."""
        left_keys = set(node.left_on)
        right_keys = set(node.right_on)
        shared = {a for a, b in zip(node.left_on, node.right_on) if a == b}

        def fit(c: ColumnStats, key: bool) -> ColumnStats:
            ndv = c.ndv
            if key and key_ndv is not None and node.how == "inner":
                ndv = key_ndv if ndv is None else min(ndv, key_ndv)
            if ndv is not None:
                ndv = min(ndv, max(rows, 1.0))
            return c if ndv == c.ndv else replace(c, ndv=ndv)

        cols = {n: fit(c, n in left_keys) for n, c in le.columns.items()}
        if node.how in ("semi", "anti"):
            return cols
        for n, c in re.columns.items():
            if n in shared:
                continue
            name = n if n not in le.columns else n + node.suffix
            cols[name] = fit(c, n in right_keys)
        return cols


def estimator(settings: Any = None, facts: dict[str, Any] | None = None) -> Estimator:
    """The estimator of one optimization (kept in a rule context's ``facts``, so rules and
    the planner share what it computed); ``settings`` may carry ``cache_lookup``."""
    if facts is not None and isinstance(facts.get("estimator"), Estimator):
        return facts["estimator"]
    est = Estimator(getattr(settings, "cache_lookup", None))
    if facts is not None:
        facts["estimator"] = est
    return est


def estimate(node: L.Node, cache_lookup: Callable[[int], list[Any] | None] | None = None
             ) -> Estimate | None:
    """The estimate of ``node`` (a fresh estimator; rules share one with :func:`estimator`)."""
    return Estimator(cache_lookup).estimate(node)
