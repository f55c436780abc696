"""SQL types and literal values as Arrow sees them: CAST's type names, INTERVAL literals
(months, days and microseconds, as SQL keeps them apart), and the coercions SQL makes
implicitly (a string literal compared with a date, a decimal literal beside a float).
"""

from __future__ import annotations

import datetime as _dt
import decimal
import re
from dataclasses import dataclass

import pyarrow as pa
from sqlglot import exp

from millstream.expr.nodes import Expr, Literal
from millstream.expr.types import parse_type

_D = exp.DataType.Type
#: sqlglot's type names and the Arrow type each stands for
TYPES: dict[object, pa.DataType] = {
    _D.BOOLEAN: pa.bool_(), _D.TINYINT: pa.int8(), _D.SMALLINT: pa.int16(),
    _D.INT: pa.int32(), _D.BIGINT: pa.int64(), _D.UTINYINT: pa.uint8(),
    _D.USMALLINT: pa.uint16(), _D.UINT: pa.uint32(), _D.UBIGINT: pa.uint64(),
    _D.FLOAT: pa.float32(), _D.DOUBLE: pa.float64(), _D.VARCHAR: pa.string(),
    _D.CHAR: pa.string(), _D.TEXT: pa.string(), _D.NVARCHAR: pa.string(),
    _D.NCHAR: pa.string(), _D.DATE: pa.date32(), _D.TIMESTAMP: pa.timestamp("us"),
    _D.TIMESTAMPNTZ: pa.timestamp("us"), _D.DATETIME: pa.timestamp("us"),
    _D.TIMESTAMPTZ: pa.timestamp("us", "UTC"), _D.TIMESTAMPLTZ: pa.timestamp("us", "UTC"),
    _D.TIMESTAMP_S: pa.timestamp("s"), _D.TIMESTAMP_MS: pa.timestamp("ms"),
    _D.TIMESTAMP_NS: pa.timestamp("ns"), _D.TIME: pa.time64("us"),
    _D.VARBINARY: pa.binary(), _D.BINARY: pa.binary(), _D.BLOB: pa.binary(),
}


def arrow_type(node: exp.DataType) -> pa.DataType | None:
    """The Arrow type of a SQL type (None when there is none)."""
    t = node.this
    if t in (_D.DECIMAL, _D.BIGDECIMAL):
        params = [int(p.this.this) if isinstance(p.this, exp.Literal) else None
                  for p in node.expressions]
        precision = params[0] if params and params[0] is not None else 18
        scale = params[1] if len(params) > 1 and params[1] is not None else 3
        return pa.decimal128(precision, scale) if precision <= 38 else pa.decimal256(precision,
                                                                                      scale)
    if t in (_D.ARRAY, _D.LIST) and node.expressions:
        inner = arrow_type(node.expressions[0])
        return None if inner is None else pa.list_(inner)
    if t in TYPES:
        return TYPES[t]
    try:
        return parse_type(node.sql().lower())
    except Exception:  # noqa: BLE001 - not a type Arrow has
        return None


@dataclass(frozen=True)
class Interval:
    """An INTERVAL value: months, days and microseconds (SQL keeps them apart: a month
    has no fixed length)."""

    months: int = 0
    days: int = 0
    micros: int = 0

    def __neg__(self) -> Interval:
        return Interval(-self.months, -self.days, -self.micros)

    def __add__(self, other: Interval) -> Interval:
        return Interval(self.months + other.months, self.days + other.days,
                        self.micros + other.micros)

    def scaled(self, k: int) -> Interval:
        return Interval(self.months * k, self.days * k, self.micros * k)

    def fixed_micros(self) -> int | None:
        """The length in microseconds when it has one (no months), else None."""
        if self.months:
            return None
        return self.days * 86_400_000_000 + self.micros


_UNIT_MICROS = {"microsecond": 1, "millisecond": 1000, "second": 1_000_000,
                "minute": 60_000_000, "hour": 3_600_000_000}
_UNITS = {"us": "microsecond", "microseconds": "microsecond", "ms": "millisecond",
          "milliseconds": "millisecond", "s": "second", "sec": "second", "secs": "second",
          "seconds": "second", "m": "minute", "min": "minute", "mins": "minute",
          "minutes": "minute", "h": "hour", "hours": "hour", "d": "day", "days": "day",
          "w": "week", "weeks": "week", "mon": "month", "mons": "month", "months": "month",
          "y": "year", "years": "year", "quarters": "quarter", "decades": "decade"}


def unit_name(text: str) -> str:
    """A time unit's canonical name ("HOURS" -> "hour")."""
    u = text.strip().lower()
    return _UNITS.get(u, u)


def interval_of(quantity: decimal.Decimal | int, unit: str) -> Interval:
    """``quantity`` ``unit``s as an Interval; ValueError for an unknown unit."""
    u = unit_name(unit)
    q = decimal.Decimal(quantity)
    if u in ("year", "quarter", "month", "decade"):
        months = q * {"year": 12, "quarter": 3, "month": 1, "decade": 120}[u]
        if months != int(months):
            raise ValueError(f"a fraction of a {u} is not an interval")
        return Interval(months=int(months))
    if u in ("week", "day"):
        days = q * (7 if u == "week" else 1)
        if days == int(days):
            return Interval(days=int(days))
        return Interval(micros=int(days * 86_400_000_000))
    if u in _UNIT_MICROS:
        return Interval(micros=int(q * _UNIT_MICROS[u]))
    raise ValueError(f"unknown interval unit {unit!r}")


_PART = re.compile(r"([+-]?\d+(?:\.\d+)?)\s*([a-zA-Z]+)")


def parse_interval_text(text: str, unit: str | None) -> Interval:
    """The value of ``INTERVAL 'text' [unit]``: ``'3' DAY``, ``'1 day 2 hours'``,
    ``'10' SECOND``; ValueError when it cannot be read."""
    text = text.strip()
    if unit is not None:
        return interval_of(decimal.Decimal(text), unit)
    parts = _PART.findall(text)
    if not parts or _PART.sub("", text).strip():
        raise ValueError(f"cannot read the interval {text!r}")
    total = Interval()
    for q, u in parts:
        total = total + interval_of(decimal.Decimal(q), u)
    return total


def number_literal(text: str) -> Literal:
    """A numeric literal as SQL types it: an integer as int64, a number with a point as an
    exact decimal, with an exponent as a double."""
    if re.fullmatch(r"\d+", text):
        value = int(text)
        return Literal(value) if value < 2**63 else Literal(decimal.Decimal(text))
    if "e" in text.lower():
        return Literal(float(text))
    d = decimal.Decimal(text)
    digits = len(d.as_tuple().digits)
    scale = max(0, -d.as_tuple().exponent)
    return Literal(d, pa.decimal128(max(digits, scale, 1), scale))


def is_literal(e: Expr) -> bool:
    return type(e) is Literal


def literal_cast(value: Literal, to: pa.DataType) -> Literal | None:
    """A literal cast to ``to`` now (None when Arrow cannot)."""
    s = value.scalar
    try:
        if pa.types.is_string(s.type) and pa.types.is_timestamp(to):
            return Literal(pa.scalar(_dt.datetime.fromisoformat(s.as_py().strip()))
                           .cast(pa.timestamp(to.unit)).cast(to))
        return Literal(s.cast(to))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, ValueError,
            OverflowError):
        return None
