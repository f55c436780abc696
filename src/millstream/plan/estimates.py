"""What the optimizer's estimates are made of: an :class:`Estimate` of a node's output
(rows, row width, per-column :class:`ColumnStats`: distinct values, min/max, null share,
width, the column's domain where it was read) and the helpers that turn a source's
statistics and Arrow types into them. ``plan/stats.py`` computes estimates of plans,
``plan/selectivity.py`` those of filters."""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pyarrow as pa

from millstream.io.base import ColumnStatistics


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


def number(x: Any) -> float | None:
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
        a, b = number(lo), number(hi)
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


def scaled_ndv(ndv: float | None, rows: float, new_rows: float) -> float | None:
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


def row_width(columns: dict[str, ColumnStats], default: float) -> float:
    """The sum of the columns' widths (``default`` when the columns are unknown)."""
    return sum(c.width for c in columns.values()) if columns else default


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
