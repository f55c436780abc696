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

import datetime as _dt
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

import pyarrow as pa

from millstream.expr.nodes import Alias, Column, Expr, Literal
from millstream.io.base import ColumnStatistics
from millstream.plan import logical as L

#: Selectivity of ``col == value`` when the column's distinct count is unknown.
DEFAULT_EQ_SELECTIVITY = 0.1
#: Selectivity of a range comparison without min/max statistics.
DEFAULT_RANGE_SELECTIVITY = 1 / 3
#: Selectivity of any other predicate (string matching, functions of columns).
DEFAULT_SELECTIVITY = 0.25
#: Share of nulls assumed when a column's null count is unknown.
DEFAULT_NULL_FRACTION = 0.05
#: Share of left rows an anti join keeps at least (its estimate is a difference).
MIN_ANTI_FRACTION = 0.1

_COMPARISONS = {"eq", "ne", "lt", "le", "gt", "ge"}
_FLIPPED = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le", "eq": "eq", "ne": "ne"}


@dataclass(frozen=True)
class ColumnStats:
    """What is known of one column of a node's output (None: unknown)."""

    #: distinct non-null values
    ndv: float | None = None
    min: Any = None
    max: Any = None
    null_fraction: float | None = None
    #: average bytes a value takes in memory
    width: float = 8.0
    #: distinct values and rows where the column was read (its domain, for joins)
    base_ndv: float | None = None
    base_rows: float | None = None
    #: the NDV is only an upper bound (from the rows or a value range), not a count
    ndv_upper: bool = True


@dataclass(frozen=True)
class Estimate:
    """Expected output of a node: rows, row width, and per-column statistics (in output
    order; empty when the columns are unknown, e.g. after a Python ``map``)."""

    rows: float
    width: float
    columns: dict[str, ColumnStats] = field(default_factory=dict)

    @property
    def bytes(self) -> float:
        """Rows times the average row width."""
        return self.rows * self.width

    def ndv(self, name: str) -> float | None:
        """The distinct count of a column, capped by the rows (None when unknown)."""
        c = self.columns.get(name)
        if c is None or c.ndv is None:
            return None
        return max(1.0, min(c.ndv, self.rows)) if self.rows >= 1 else c.ndv


def type_width(t: pa.DataType) -> float:
    """Average in-memory bytes of a value of type ``t`` (a guess for variable widths)."""
    if pa.types.is_boolean(t):
        return 1.0
    if pa.types.is_null(t):
        return 0.0
    if pa.types.is_dictionary(t):
        return type_width(t.index_type) + 4.0
    if pa.types.is_string(t) or pa.types.is_binary(t):
        return 4.0 + 16.0
    if pa.types.is_large_string(t) or pa.types.is_large_binary(t):
        return 8.0 + 16.0
    if str(t) in ("string_view", "binary_view"):
        return 20.0
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return 8.0 + 3 * type_width(t.value_type)
    if pa.types.is_struct(t):
        return sum(type_width(t.field(i).type) for i in range(t.num_fields)) or 8.0
    try:
        return max(1.0, t.bit_width / 8)
    except ValueError:
        return 16.0


def _offset_width(t: pa.DataType) -> float:
    """The fixed part of a variable-width value (offsets or a view)."""
    if str(t) in ("string_view", "binary_view"):
        return 16.0
    if pa.types.is_large_string(t) or pa.types.is_large_binary(t):
        return 8.0
    return 4.0


def _is_var_width(t: pa.DataType) -> bool:
    return (pa.types.is_string(t) or pa.types.is_binary(t) or pa.types.is_large_string(t)
            or pa.types.is_large_binary(t) or str(t) in ("string_view", "binary_view"))


def _num(x: Any) -> float | None:
    """A value as a number on a line (dates as days, times as seconds), else None."""
    if isinstance(x, bool):
        return float(x)
    if isinstance(x, (int, float, Decimal)):
        return float(x)
    if isinstance(x, _dt.datetime):
        return x.timestamp() if x.tzinfo is not None else \
            x.replace(tzinfo=_dt.timezone.utc).timestamp()
    if isinstance(x, _dt.date):
        return float(x.toordinal())
    if isinstance(x, _dt.timedelta):
        return x.total_seconds()
    return None


def _domain_size(lo: Any, hi: Any, t: pa.DataType | None) -> float | None:
    """How many distinct values fit between ``lo`` and ``hi`` (integers and dates)."""
    if lo is None or hi is None:
        return None
    if lo == hi:
        return 1.0
    if isinstance(lo, bool):
        return 2.0
    if isinstance(lo, int) and isinstance(hi, int):
        return float(hi - lo + 1)
    if isinstance(lo, _dt.date) and not isinstance(lo, _dt.datetime) \
            and isinstance(hi, _dt.date) and not isinstance(hi, _dt.datetime):
        return float((hi - lo).days + 1)
    if t is not None and pa.types.is_decimal(t):
        a, b = _num(lo), _num(hi)
        if a is not None and b is not None:
            return (b - a) * 10 ** t.scale + 1
    return None


def column_from_statistics(cs: ColumnStatistics | None, t: pa.DataType | None,
                           rows: float) -> ColumnStats:
    """A column's stats from a source's statistics (NDV from the distinct count, else
    bounded by the rows and, for integers and dates, by max - min + 1)."""
    width = type_width(t) if t is not None else 8.0
    if cs is None:
        return ColumnStats(width=width, base_rows=rows)
    nulls = cs.null_count
    nf = None if nulls is None or rows <= 0 else min(1.0, nulls / rows)
    nonnull = rows * (1 - (nf or 0.0))
    ndv: float | None = None
    upper = cs.distinct_count is None
    if cs.distinct_count is not None:
        ndv = float(cs.distinct_count)
    else:
        dom = _domain_size(cs.min, cs.max, t)
        if dom is not None:
            ndv = max(1.0, min(dom, nonnull))
    if t is not None and _is_var_width(t):
        avg = None
        if isinstance(cs.min, (str, bytes)) and isinstance(cs.max, (str, bytes)):
            avg = (len(cs.min) + len(cs.max)) / 2
        per_row = cs.data_bytes / rows if cs.data_bytes and rows > 0 else None
        width = _offset_width(t) + max(avg or 0.0, per_row or 0.0, 1.0)
    elif t is None and cs.data_bytes and rows > 0:
        width = cs.data_bytes / rows
    return ColumnStats(ndv, cs.min, cs.max, nf, width, ndv, rows, upper)


def _scaled_ndv(ndv: float | None, rows: float, new_rows: float) -> float | None:
    """Distinct values left when ``new_rows`` of ``rows`` are kept at random."""
    if ndv is None:
        return None
    if rows <= 0 or ndv <= 0:
        return ndv
    keep = min(1.0, max(0.0, new_rows / rows))
    if keep >= 1.0:
        return ndv
    per_value = rows / ndv
    left = ndv * (1 - (1 - keep) ** per_value)
    return max(min(left, new_rows), 1.0 if new_rows >= 1 else 0.0)


def _row_width(columns: dict[str, ColumnStats], default: float) -> float:
    return sum(c.width for c in columns.values()) if columns else default


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
            width = _row_width(cols, 8.0) or 8.0
            return Estimate(max(1.0, size / width), width, cols)
        rows = float(st.num_rows)
        names = schema.names if schema is not None else list(st.columns)
        cols = {}
        for name in names:
            t = schema.field(name).type if schema is not None else None
            cols[name] = column_from_statistics(st.columns.get(name), t, rows)
        est = Estimate(rows, _row_width(cols, 8.0), cols)
        for pred in st.predicates:
            if isinstance(pred, Expr):
                est = self.filtered(est, pred)
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
        return Estimate(child.rows, _row_width(cols, child.width), cols)

    def _est_Filter(self, node: L.Filter) -> Estimate | None:
        child = self.estimate(node.child)
        return None if child is None else self.filtered(child, node.predicate)

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
        return Estimate(child.rows, _row_width(cols, 8.0), cols)

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
        return Estimate(child.rows, _row_width(cols, child.width + extra), cols)

    def _est_Drop(self, node: L.Drop) -> Estimate | None:
        child = self.estimate(node.child)
        if child is None:
            return None
        cols = {n: c for n, c in child.columns.items() if n not in node.columns}
        return Estimate(child.rows, _row_width(cols, child.width), cols)

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
        return Estimate(rows, child.width, {n: replace(c, ndv=_scaled_ndv(c.ndv, child.rows, rows))
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
        return Estimate(groups, _row_width(cols, 8.0), cols)

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
            _row_width(cols, le.width + re.width) if le.columns and re.columns \
            else le.width + re.width
        est = Estimate(max(rows, 1.0) if le.rows >= 1 and re.rows >= 1 else rows, width, cols)
        condition = getattr(node, "condition", None)
        if isinstance(condition, Expr) and how not in ("left", "right", "outer", "full"):
            est = self.filtered(est, condition)
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

    # ---------------------------------------------------------------- predicates
    def filtered(self, est: Estimate, predicate: Expr) -> Estimate:
        """``est`` after rows failing ``predicate`` are dropped: conjuncts one by one
        (each narrowing what the next one sees: ``a >= 1 & a <= 5`` is one range)."""
        for conjunct in _conjuncts(predicate):
            est = self._apply(est, conjunct)
        return est

    def _apply(self, est: Estimate, pred: Expr) -> Estimate:
        sel, col, stats = self._conjunct(est, pred)
        rows = est.rows * sel
        if est.rows >= 1:
            rows = max(rows, 1.0)
        cols = {}
        for n, c in est.columns.items():
            if n == col and stats is not None:
                cols[n] = stats
            else:
                ndv = _scaled_ndv(c.ndv, est.rows, rows)
                cols[n] = c if ndv == c.ndv else replace(c, ndv=ndv)
        return Estimate(rows, est.width, cols)

    def selectivity(self, est: Estimate, pred: Expr) -> float:
        """The share of rows of ``est`` for which ``pred`` holds (0..1)."""
        out = 1.0
        for conjunct in _conjuncts(pred):
            sel, col, stats = self._conjunct(est, conjunct)
            out *= sel
            est = self._apply(est, conjunct) if col is not None else est
        return out

    def _conjunct(self, est: Estimate, pred: Expr) -> tuple[float, str | None, ColumnStats | None]:
        """(selectivity, the column it constrains, that column's stats after it)."""
        op = getattr(pred, "op", None)
        args = getattr(pred, "args", ())
        if isinstance(pred, Literal):
            return (1.0 if pred.value is True else 0.0), None, None
        if op == "and":
            return self.selectivity(est, pred), None, None
        if op == "or":
            a, b = (self.selectivity(est, x) for x in args)
            return min(1.0, a + b - a * b), None, None
        if op == "not":
            return max(0.0, 1.0 - self.selectivity(est, args[0])), None, None
        if op in ("is_null", "is_not_null") and isinstance(args[0], Column):
            c = est.columns.get(args[0].name)
            nf = c.null_fraction if c is not None and c.null_fraction is not None \
                else DEFAULT_NULL_FRACTION
            return (nf if op == "is_null" else 1 - nf), None, None
        if op == "is_in" and isinstance(args[0], Column):
            values = pred.params.get("values") or []  # type: ignore[attr-defined]
            eq = self._eq_selectivity(est, args[0].name)
            return min(1.0, eq * max(1, len(values))), None, None
        if op in _COMPARISONS and len(args) == 2:
            a, b = args
            if isinstance(a, Literal) and isinstance(b, Column):
                a, b, op = b, a, _FLIPPED[op]
            if isinstance(a, Column) and isinstance(b, Literal):
                return self._compare(est, a.name, op, b.value)
            if isinstance(a, Column) and isinstance(b, Column):
                if op == "eq":
                    da, db = est.ndv(a.name), est.ndv(b.name)
                    known = [d for d in (da, db) if d is not None]
                    return (1.0 / max(known) if known else DEFAULT_EQ_SELECTIVITY), None, None
                if op == "ne":
                    return 1.0 - DEFAULT_EQ_SELECTIVITY, None, None
                return DEFAULT_RANGE_SELECTIVITY, None, None
            return (DEFAULT_EQ_SELECTIVITY if op == "eq" else DEFAULT_RANGE_SELECTIVITY), None, None
        return DEFAULT_SELECTIVITY, None, None

    def _eq_selectivity(self, est: Estimate, name: str) -> float:
        d = est.ndv(name)
        c = est.columns.get(name)
        nonnull = 1 - (c.null_fraction or 0.0) if c is not None else 1.0
        return nonnull / d if d else DEFAULT_EQ_SELECTIVITY

    def _compare(self, est: Estimate, name: str, op: str, value: Any
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
            sel = self._eq_selectivity(est, name)
            if c is None:
                return sel, None, None
            return sel, name, replace(c, ndv=1.0, min=value, max=value, null_fraction=0.0)
        if op == "ne":
            return (nonnull if outside else nonnull - self._eq_selectivity(est, name)), None, None
        if lo is None:
            return DEFAULT_RANGE_SELECTIVITY, None, None
        x, a, b = _num(value), _num(lo), _num(hi)
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


def _conjuncts(pred: Expr) -> list[Expr]:
    """``a & b & c`` as ``[a, b, c]``."""
    if getattr(pred, "op", None) == "and":
        out: list[Expr] = []
        for a in pred.args:  # type: ignore[attr-defined]
            out.extend(_conjuncts(a))
        return out
    return [pred]


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


def describe(est: Estimate | None) -> str:
    """An estimate for explain(): ``~1.2M rows, 40 MB``."""
    if est is None:
        return "size unknown"
    return f"~{_short(est.rows)} rows, {_short(est.bytes)}B"


def _short(x: float) -> str:
    if not math.isfinite(x):
        return "?"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"
