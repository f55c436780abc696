"""Decimal add, subtract and multiply on unscaled int64 values (what DuckDB does for
decimals of up to 18 digits).

A decimal128 operand whose values fit in 64 bits becomes a :class:`Fixed`: its unscaled
values as an int64 numpy array (or a Python int for a scalar), its validity, its decimal
type and a bound on its absolute values. Arithmetic on two ``Fixed`` stays in int64 as
long as the bounds prove it cannot overflow, so a tree such as ``price * (1 - discount) *
(1 + tax)`` converts its leaves from decimal128 once and its result back once, instead of
twice per operation (the conversions cost ten times the arithmetic).

The result types are those of :mod:`millstream.expr.decimals` (Spark's rules); an
operation that would round (a capped result that loses scale) or might overflow is left
to the caller (None), which computes it with Arrow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from millstream.expr.types import Datum

#: operands whose unscaled values stay below this can be added or multiplied in int64
SAFE = 1 << 62
#: a decimal128 of at most this many digits always fits in 64 bits
_INT64_DIGITS = 18
_MAX_PRECISION = 38


@dataclass
class Fixed:
    """A decimal128 datum as unscaled int64 values (see the module docstring)."""

    values: np.ndarray | int
    valid: np.ndarray | None  # None: no nulls
    type: pa.Decimal128Type
    peak: int  # an upper bound of abs(values)

    @property
    def is_scalar(self) -> bool:
        """True for a scalar (``values`` is an int)."""
        return isinstance(self.values, int)

    def exact_peak(self) -> int:
        """The largest absolute value (tightens ``peak``, which may be a bound)."""
        if not self.is_scalar:
            v = self.values
            self.peak = max(abs(int(v.min())), abs(int(v.max()))) if len(v) else 0
        return self.peak


def _int_digits(t: pa.DataType) -> int:
    if pa.types.is_unsigned_integer(t) and t.bit_width == 64:
        return 20
    return {8: 3, 16: 5, 32: 10, 64: 19}[t.bit_width]


def _chunk_unscaled(x: pa.Array, check: bool) -> tuple[np.ndarray, np.ndarray | None] | None:
    n = len(x)
    words = np.frombuffer(x.buffers()[1], dtype=np.int64, count=2 * (x.offset + n))
    words = words[2 * x.offset:]
    lo = words[0::2]
    valid = None
    if x.null_count:
        valid = np.asarray(x.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        lo = np.where(valid, lo, 0)
        if check:
            hi = np.where(valid, words[1::2], 0)
            if not np.array_equal(hi, lo >> 63):
                return None
    elif check and not np.array_equal(words[1::2], lo >> 63):
        return None  # (a value beyond 64 bits)
    return np.ascontiguousarray(lo), valid


def to_fixed(x: Datum) -> Fixed | None:
    """A decimal128 or integer datum as :class:`Fixed`, or None (another type, a null
    scalar, a value beyond 64 bits)."""
    t = x.type
    if pa.types.is_integer(t):
        if isinstance(x, pa.Scalar):
            if not x.is_valid:
                return None
            value = int(x.as_py())
            if abs(value) >= SAFE:
                return None
            return Fixed(value, None, pa.decimal128(max(1, len(str(abs(value)))), 0), abs(value))
        x = x.cast(pa.decimal128(_int_digits(t), 0))  # (as expr.decimals types it)
        t = x.type
    if not isinstance(t, pa.Decimal128Type):
        return None
    if isinstance(x, pa.Scalar):
        if not x.is_valid:
            return None
        value = int(x.as_py().scaleb(t.scale))
        return Fixed(value, None, t, abs(value)) if abs(value) < SAFE else None
    check = t.precision > _INT64_DIGITS
    chunks = x.chunks if isinstance(x, pa.ChunkedArray) else [x]
    parts = [_chunk_unscaled(c, check) for c in chunks]
    if any(p is None for p in parts):
        return None
    if len(parts) == 1:
        values, valid = parts[0]  # type: ignore[misc]
    elif not parts:
        values, valid = np.zeros(0, np.int64), None
    else:
        values = np.concatenate([p[0] for p in parts])  # type: ignore[index]
        valid = None
        if any(p[1] is not None for p in parts):  # type: ignore[index]
            valid = np.concatenate([p[1] if p[1] is not None else np.ones(len(p[0]), bool)  # type: ignore[index]
                                    for p in parts])
    out = Fixed(values, valid, t, 0)
    out.exact_peak()
    return out


def _result(op: str, t1: pa.Decimal128Type, t2: pa.Decimal128Type) -> pa.Decimal128Type | None:
    """The result type of ``op``, or None when Spark's rules would round (scale lost)."""
    p1, s1, p2, s2 = t1.precision, t1.scale, t2.precision, t2.scale
    if op == "mul":
        p, s = p1 + p2 + 1, s1 + s2
    else:
        s = max(s1, s2)
        p = max(p1 - s1, p2 - s2) + s + 1
    if p > _MAX_PRECISION:  # capped as expr.decimals.adjust caps it
        if max(_MAX_PRECISION - (p - s), min(s, 6)) != s:  # the result loses scale: rounds
            return None
        p = _MAX_PRECISION
    return pa.decimal128(p, s)


def _bound(op: str, a: Fixed, b: Fixed) -> int:
    if op == "mul":
        return a.peak * b.peak
    s = max(a.type.scale, b.type.scale)
    return a.peak * 10 ** (s - a.type.scale) + b.peak * 10 ** (s - b.type.scale)


def fixed_arith(op: str, a: Fixed, b: Fixed) -> Fixed | None:
    """``a op b`` (add, sub, mul) in int64, or None when it may overflow or would round,
    or both sides are scalars."""
    if a.is_scalar and b.is_scalar:
        return None
    target = _result(op, a.type, b.type)
    if target is None:
        return None
    bound = _bound(op, a, b)
    if bound >= SAFE:
        a.exact_peak(), b.exact_peak()  # the bounds of intermediates may be loose
        bound = _bound(op, a, b)
        if bound >= SAFE:
            return None
    va, vb = a.values, b.values
    if op == "mul":
        out = va * vb
    else:
        s = max(a.type.scale, b.type.scale)
        fa, fb = 10 ** (s - a.type.scale), 10 ** (s - b.type.scale)
        va = va * fa if fa != 1 else va
        vb = vb * fb if fb != 1 else vb
        out = va + vb if op == "add" else va - vb
    valid = a.valid if b.valid is None else (b.valid if a.valid is None else a.valid & b.valid)
    return Fixed(np.asarray(out, dtype=np.int64), valid, target, bound)


def combine(op: str, vals: list[Datum | Fixed]) -> Fixed | None:
    """``op`` on two operands, each a :class:`Fixed` or a datum, in int64 when at least one
    is a decimal and both convert; else None."""
    if not any(isinstance(v, Fixed) or pa.types.is_decimal(v.type) for v in vals):
        return None
    fa, fb = (v if isinstance(v, Fixed) else to_fixed(v) for v in vals)
    return None if fa is None or fb is None else fixed_arith(op, fa, fb)


def to_datum(x: Datum | Fixed) -> Datum:
    """A datum as it is, a :class:`Fixed` as its decimal128 datum."""
    return from_fixed(x) if isinstance(x, Fixed) else x


def from_fixed(x: Fixed) -> Datum:
    """The decimal128 array (or scalar) a :class:`Fixed` holds."""
    if x.is_scalar:
        import decimal

        return pa.scalar(decimal.Decimal(x.values).scaleb(-x.type.scale), x.type)
    return decimal_array(x.values, x.type, x.valid)


def decimal_array(values: np.ndarray, t: pa.DataType,
                  valid: np.ndarray | None = None) -> pa.Array:
    """A decimal128 array of type ``t`` from int64 unscaled ``values`` (sign-extended to
    128 bits), null where ``valid`` is False."""
    values = np.asarray(values, dtype=np.int64)
    n = len(values)
    words = np.empty(2 * n, dtype=np.int64)  # (low, high) words; half np.stack's time
    words[0::2] = values
    np.right_shift(values, 63, out=words[1::2])
    if valid is None:
        return pa.Array.from_buffers(t, n, [None, pa.py_buffer(words)], 0)
    bitmap = pa.array(valid, pa.bool_()).buffers()[1]
    return pa.Array.from_buffers(t, n, [bitmap, pa.py_buffer(words)], int(n - valid.sum()))


def evaluate_fixed(expr: Any, batch: Any) -> Fixed | None:
    """``expr`` on ``batch`` as :class:`Fixed` when it is decimal add/sub/mul that stays in
    int64 (an aggregate sums it without the decimal128 round trip), else None (evaluate it
    as usual). Shares a sub-expression memo as ``evaluate`` does (expr.subexpr)."""
    fixed = getattr(expr, "_eval_fixed", None)  # (expr.nodes' arithmetic nodes)
    if fixed is None or getattr(expr, "op", None) not in ("add", "sub", "mul"):
        return None
    out = fixed(batch)
    return out if isinstance(out, Fixed) else None
