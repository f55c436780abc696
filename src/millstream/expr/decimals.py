"""Decimal arithmetic typed as Spark and DuckDB type it.

Arrow's own rules give ``p1 + p2 + 1`` digits to a product and type an integer as
``decimal(19, 0)``, so ``price * (1 - discount) * (1 + tax)`` on ``decimal(15, 2)`` columns
asks for 61 digits and fails. Here, as in Spark (``spark.sql.decimalOperations.
allowPrecisionLoss``, the default):

- an integer literal is ``decimal(p, 0)`` with the digits it needs (``1`` is ``decimal(1,
  0)``); an integer column is ``decimal(3|5|10|19|20, 0)`` by its width;
- ``a + b`` and ``a - b``: scale ``max(s1, s2)``, precision ``max(p1 - s1, p2 - s2) + scale
  + 1``; ``a * b``: precision ``p1 + p2 + 1``, scale ``s1 + s2``;
- a precision over 38 is capped at 38 and the scale reduced to keep the integer digits, but
  never below ``min(scale, 6)``; the result is rounded half away from zero to that scale, and
  a value that does not fit raises an overflow error.

Division of decimals gives float64, as DuckDB's ``/`` does (see ``expr.functions``).
"""

from __future__ import annotations

import decimal

import pyarrow as pa
import pyarrow.compute as pc

from millstream.expr.fixed_point import fixed_arith, from_fixed, to_fixed
from millstream.expr.types import Datum

#: the largest precision of a decimal128 result; decimal256 operands cap at 76
MAX_PRECISION = 38
MAX_PRECISION_256 = 76
#: the scale a capped result keeps at least (when its inputs had that many digits)
MIN_ADJUSTED_SCALE = 6

_ARITH = {"add": pc.add_checked, "sub": pc.subtract_checked, "mul": pc.multiply_checked}
_INT_DIGITS = {8: 3, 16: 5, 32: 10, 64: 19}


def integer_digits(t: pa.DataType) -> int:
    """Decimal digits an integer type needs (uint64 needs 20)."""
    if pa.types.is_unsigned_integer(t) and t.bit_width == 64:
        return 20
    return _INT_DIGITS[t.bit_width]


def literal_type(value: int) -> pa.DataType:
    """The narrowest ``decimal(p, 0)`` holding an integer value."""
    return pa.decimal128(max(1, len(str(abs(int(value))))), 0)


def as_decimal(x: Datum) -> Datum:
    """Integers as decimals (scalars by their value, arrays by their type); others as given."""
    t = x.type
    if not pa.types.is_integer(t):
        return x
    if isinstance(x, pa.Scalar):
        if not x.is_valid:
            return pa.scalar(None, pa.decimal128(1, 0))
        value = x.as_py()
        return pa.scalar(decimal.Decimal(value), literal_type(value))
    return x.cast(pa.decimal128(integer_digits(t), 0))


def adjust(precision: int, scale: int, cap: int = MAX_PRECISION) -> tuple[int, int]:
    """Cap a result's precision, giving up scale (never below ``min(scale, 6)``) so the
    integer digits stay."""
    if precision <= cap:
        return precision, scale
    int_digits = precision - scale
    min_scale = min(scale, MIN_ADJUSTED_SCALE)
    return cap, max(cap - int_digits, min_scale)


def raw_type(op: str, t1: pa.DataType, t2: pa.DataType) -> tuple[int, int]:
    """Precision and scale of ``op`` on two decimal types before capping."""
    p1, s1, p2, s2 = t1.precision, t1.scale, t2.precision, t2.scale
    if op == "mul":
        return p1 + p2 + 1, s1 + s2
    scale = max(s1, s2)
    return max(p1 - s1, p2 - s2) + scale + 1, scale


def result_type(op: str, t1: pa.DataType, t2: pa.DataType) -> pa.DataType:
    """The type of ``op`` (add, sub, mul) on operands of types t1 and t2 (integers are read as
    decimals of their width): capped as the module docstring says."""
    t1 = pa.decimal128(integer_digits(t1), 0) if pa.types.is_integer(t1) else t1
    t2 = pa.decimal128(integer_digits(t2), 0) if pa.types.is_integer(t2) else t2
    wide = isinstance(t1, pa.Decimal256Type) or isinstance(t2, pa.Decimal256Type)
    p, s = adjust(*raw_type(op, t1, t2), MAX_PRECISION_256 if wide else MAX_PRECISION)
    return pa.decimal256(p, s) if wide else pa.decimal128(p, s)


def needs_cap(op: str, t1: pa.DataType, t2: pa.DataType) -> bool:
    """True when Arrow's own typing of ``op`` exceeds the cap (the result must be reduced)."""
    t1 = pa.decimal128(integer_digits(t1), 0) if pa.types.is_integer(t1) else t1
    t2 = pa.decimal128(integer_digits(t2), 0) if pa.types.is_integer(t2) else t2
    wide = isinstance(t1, pa.Decimal256Type) or isinstance(t2, pa.Decimal256Type)
    return raw_type(op, t1, t2)[0] > (MAX_PRECISION_256 if wide else MAX_PRECISION)


def arith(op: str, a: Datum, b: Datum) -> Datum:
    """``a op b`` (op: add, sub, mul) where at least one side is a decimal."""
    fn = _ARITH[op]
    a, b = as_decimal(a), as_decimal(b)
    ta, tb = a.type, b.type
    if not (pa.types.is_decimal(ta) and pa.types.is_decimal(tb)):
        return fn(a, b)  # decimal with float (float64) or null
    wide = isinstance(ta, pa.Decimal256Type) or isinstance(tb, pa.Decimal256Type)
    cap = MAX_PRECISION_256 if wide else MAX_PRECISION
    p, s = raw_type(op, ta, tb)
    if not wide:
        p_out, s_out = adjust(p, s, cap)
        if s_out == s:  # (no rounding: a reduced result keeps its scale)
            fa, fb = to_fixed(a), to_fixed(b)
            fast = None if fa is None or fb is None else fixed_arith(op, fa, fb)
            if fast is not None:
                return from_fixed(fast)
    if p <= cap:
        return fn(a, b)  # Arrow types it exactly so
    if p > MAX_PRECISION_256:
        raise pa.ArrowInvalid(f"decimal {op} of {ta} and {tb} needs {p} digits, more than "
                              f"{MAX_PRECISION_256} even before rounding")
    p2, s2 = adjust(p, s, cap)
    target = pa.decimal256(p2, s2) if wide else pa.decimal128(p2, s2)
    # the declared types overflow the cap, the values seldom do: type each operand by the
    # digits its values have, and compute in 128 bits when that fits (about 2x faster than
    # 256 bits on TPC-H's charge, price * (1 - discount) * (1 + tax))
    na, nb = _narrowed(a), _narrowed(b)
    if raw_type(op, na.type, nb.type)[0] <= cap:
        out = fn(na, nb)
    else:
        out = fn(a.cast(pa.decimal256(ta.precision, ta.scale)),
                 b.cast(pa.decimal256(tb.precision, tb.scale)))
    if s2 < s:
        out = pc.round(out, ndigits=s2, round_mode="half_towards_infinity")
    return out.cast(target)


def _narrowed(x: Datum) -> Datum:
    """A decimal with the same values, typed with the fewest digits its values need."""
    t = x.type
    if isinstance(x, pa.Scalar):
        values = [x.as_py()] if x.is_valid else []
    else:
        mm = pc.min_max(x)
        values = [v for v in (mm["min"].as_py(), mm["max"].as_py()) if v is not None]
    if not values:
        return x
    unscaled = max(abs(int(v.scaleb(t.scale))) for v in values)
    digits = max(1, len(str(unscaled)), t.scale)
    if digits >= t.precision:
        return x
    return x.cast(pa.decimal128(digits, t.scale) if digits <= MAX_PRECISION
                  else pa.decimal256(digits, t.scale))


def comparable(a: Datum, b: Datum) -> tuple[Datum, Datum]:
    """Two operands of a comparison that Arrow can compare: decimals whose common type
    (the larger integer digits plus the larger scale) needs more than 38 digits are
    compared in 256 bits (``decimal(38, 2) > decimal(38, 6)`` needs 42)."""
    ta, tb = a.type, b.type
    if not (pa.types.is_decimal(ta) and pa.types.is_decimal(tb)) or ta.scale == tb.scale:
        return a, b
    scale = max(ta.scale, tb.scale)
    digits = max(ta.precision - ta.scale, tb.precision - tb.scale) + scale
    if digits <= MAX_PRECISION:
        return a, b
    return (a.cast(pa.decimal256(ta.precision, ta.scale)),
            b.cast(pa.decimal256(tb.precision, tb.scale)))
