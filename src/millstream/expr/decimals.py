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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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
            fast = _int64_arith(op, a, b, pa.decimal128(p_out, s_out))
            if fast is not None:
                return fast
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


#: operands whose unscaled values stay below this can be added or multiplied in int64
_SAFE = 1 << 62


def _unscaled(x: Datum) -> tuple[np.ndarray | int, np.ndarray | None] | None:
    """A decimal128 operand's unscaled values as int64 (an array, or an int for a scalar)
    and its validity (None: no nulls), or None when a value does not fit in 64 bits."""
    if isinstance(x, pa.Scalar):
        if not x.is_valid:
            return None
        value = int(x.as_py().scaleb(x.type.scale))
        return (value, None) if abs(value) < _SAFE else None
    if isinstance(x, pa.ChunkedArray):
        x = x.combine_chunks()
    n = len(x)
    words = np.frombuffer(x.buffers()[1], dtype=np.int64, count=2 * (x.offset + n))
    words = words[2 * x.offset:]
    lo, hi = words[0::2], words[1::2]
    valid = None
    if x.null_count:
        valid = np.asarray(x.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        lo = np.where(valid, lo, 0)
        hi = np.where(valid, hi, 0)
    if not np.array_equal(hi, lo >> 63):
        return None  # (a value beyond 64 bits)
    return lo, valid


def _int64_arith(op: str, a: Datum, b: Datum, target: pa.DataType) -> pa.Array | None:
    """``a op b`` on decimal128 operands computed on their unscaled values in int64 (what
    DuckDB does for decimals of up to 18 digits), typed ``target``; None when an operand
    is not an array of values that fit, so the caller computes it with Arrow."""
    if isinstance(a, pa.Scalar) and isinstance(b, pa.Scalar):
        return None
    ua, ub = _unscaled(a), _unscaled(b)
    if ua is None or ub is None:
        return None
    (va, ma), (vb, mb) = ua, ub
    sa, sb = a.type.scale, b.type.scale

    def peak(v: np.ndarray | int) -> int:
        if isinstance(v, int):
            return abs(v)
        return int(np.abs(v).max()) if len(v) else 0

    if op == "mul":
        if peak(va) * peak(vb) >= _SAFE:
            return None
        out = va * vb
    else:
        scale = max(sa, sb)
        fa, fb = 10 ** (scale - sa), 10 ** (scale - sb)
        if (peak(va) * fa + peak(vb) * fb) >= _SAFE:
            return None
        va = va * fa if fa != 1 else va
        vb = vb * fb if fb != 1 else vb
        out = va + vb if op == "add" else va - vb
    out = np.asarray(out, dtype=np.int64)
    n = len(out)
    words = np.empty(2 * n, dtype=np.int64)
    words[0::2] = out
    words[1::2] = out >> 63
    valid = ma if mb is None else (mb if ma is None else ma & mb)
    if valid is None:
        return pa.Array.from_buffers(target, n, [None, pa.py_buffer(words)], 0)
    bitmap = pa.array(valid, pa.bool_()).buffers()[1]
    return pa.Array.from_buffers(target, n, [bitmap, pa.py_buffer(words)],
                                 int(n - valid.sum()))
