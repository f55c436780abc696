"""The registered scalar operations on values: arithmetic (Python semantics for ``//`` and
``%``; decimals typed as Spark and DuckDB type them, see ``expr.decimals``; ``/`` gives
float64), comparisons, Kleene boolean logic, null handling, ``is_in`` and ``cast``."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from millstream.expr import decimals
from millstream.expr.registry import _register
from millstream.expr.types import _F64, _NULL_BOOL, Datum, _broadcast, _to_f64, _to_float

# ---- arithmetic


def _py_divmod(kind: str, a: Datum, b: Datum, n: int) -> Datum:
    """Floor division or modulo with Python semantics; integer division by zero gives null."""
    t = pc.subtract(pa.array([], a.type), pa.array([], b.type)).type
    if pa.types.is_null(t):
        return pa.nulls(n)
    is_int = pa.types.is_integer(t)
    if not (is_int or pa.types.is_floating(t)):
        raise pa.ArrowNotImplementedError(f"'{kind}' supports integer and floating types, not {t}")
    a = _broadcast(a.cast(t), n)
    b = _broadcast(b.cast(t), n)
    valid = pc.and_(pc.is_valid(a), pc.is_valid(b))
    bv = pc.fill_null(b, 1).to_numpy(zero_copy_only=False)
    if is_int:
        zero = bv == 0
        if zero.any():
            valid = pc.and_(valid, pa.array(~zero))
            bv = np.where(zero, 1, bv)
    av = pc.fill_null(a, 0).to_numpy(zero_copy_only=False)
    with np.errstate(all="ignore"):
        out = np.floor_divide(av, bv) if kind == "floordiv" else np.remainder(av, bv)
    mask = None if pc.all(valid).as_py() is not False else pc.invert(valid).to_numpy(
        zero_copy_only=False)
    return pa.array(out, type=t, mask=mask)


def _arith(op: str, fn: Any) -> Any:
    """Checked arithmetic; decimals typed as Spark and DuckDB type them (``expr.decimals``)."""

    def ev(v: list[Datum], p: dict[str, Any], n: int) -> Datum:
        if pa.types.is_decimal(v[0].type) or pa.types.is_decimal(v[1].type):
            return decimals.arith(op, v[0], v[1])
        return fn(v[0], v[1])

    return ev


_register("add", "bin", "+", _arith("add", pc.add_checked),
          lambda e, p: pc.add_checked(e[0], e[1]))
_register("sub", "bin", "-", _arith("sub", pc.subtract_checked),
          lambda e, p: pc.subtract_checked(e[0], e[1]))
_register("mul", "bin", "*", _arith("mul", pc.multiply_checked),
          lambda e, p: pc.multiply_checked(e[0], e[1]))
_register("truediv", "bin", "/", lambda v, p, n: pc.divide(_to_float(v[0]), _to_float(v[1])),
          lambda e, p: pc.divide(e[0].cast(_F64), e[1].cast(_F64)))
_register("floordiv", "bin", "//", lambda v, p, n: _py_divmod("floordiv", v[0], v[1], n))
_register("mod", "bin", "%", lambda v, p, n: _py_divmod("mod", v[0], v[1], n))
_register("pow", "bin", "**", lambda v, p, n: pc.power(_to_f64(v[0]), _to_f64(v[1])),
          lambda e, p: pc.power(e[0].cast(_F64), e[1].cast(_F64)))
_register("neg", "prefix", "-", lambda v, p, n: pc.negate_checked(v[0]),
          lambda e, p: pc.negate_checked(e[0]))
_register("abs", "method", "abs", lambda v, p, n: pc.abs_checked(v[0]),
          lambda e, p: pc.abs_checked(e[0]))
_register("round", "method", "round",
          lambda v, p, n: pc.round(v[0], ndigits=p["ndigits"], round_mode="half_to_even"),
          lambda e, p: pc.round(e[0], ndigits=p["ndigits"], round_mode="half_to_even"),
          pos=("ndigits",))

# ---- comparison and logic

for _name, _sym, _fn in [("eq", "==", pc.equal), ("ne", "!=", pc.not_equal), ("lt", "<", pc.less),
                         ("le", "<=", pc.less_equal), ("gt", ">", pc.greater),
                         ("ge", ">=", pc.greater_equal)]:
    _register(_name, "bin", _sym,
              (lambda f: lambda v, p, n: f(*decimals.comparable(v[0], v[1])))(_fn),
              (lambda f: lambda e, p: f(e[0], e[1]))(_fn))

_register("and", "bin", "&", lambda v, p, n: pc.and_kleene(v[0], v[1]),
          lambda e, p: pc.and_kleene(e[0], e[1]), bool_args=True)
_register("or", "bin", "|", lambda v, p, n: pc.or_kleene(v[0], v[1]),
          lambda e, p: pc.or_kleene(e[0], e[1]), bool_args=True)
_register("xor", "bin", "^", lambda v, p, n: pc.xor(v[0], v[1]),
          lambda e, p: pc.xor(e[0], e[1]), bool_args=True)
_register("not", "prefix", "~", lambda v, p, n: pc.invert(v[0]),
          lambda e, p: pc.invert(e[0]), bool_args=True)

# ---- nulls, membership, cast


def _fill_null(v: list[Datum], p: dict[str, Any], n: int) -> Datum:
    x, fill = v
    if pa.types.is_null(x.type):
        x = x.cast(fill.type)
    if fill.type != x.type and not pa.types.is_null(x.type):
        try:
            fill = fill.cast(x.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            pass
    return pc.coalesce(x, fill)


def _is_in(v: list[Datum], p: dict[str, Any], n: int) -> Datum:
    x = v[0]
    values = p["values"]
    if not values:
        hit: Datum = pa.scalar(False)
    else:
        try:
            value_set = pa.array(values, type=x.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError,
                ValueError, OverflowError):
            value_set = pa.array(values)
        hit = pc.is_in(x, value_set=value_set, skip_nulls=True)
    return pc.if_else(pc.is_valid(x), hit, _NULL_BOOL)


def _is_in_arrow(e: list[pc.Expression], p: dict[str, Any]) -> pc.Expression | None:
    values = p["values"]
    if not values:
        hit = pc.scalar(False)
    else:
        try:
            # typed as the column when its type is known (a decimal column's set must be
            # decimals: Arrow cannot compare it with integers in a scan)
            value_set = pa.array(values, type=p.get("value_type"))
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError,
                ValueError, OverflowError):
            try:
                value_set = pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
                return None
        hit = pc.is_in(e[0], value_set=value_set, skip_nulls=True)
    return pc.if_else(pc.is_valid(e[0]), hit, pc.scalar(_NULL_BOOL))


_register("is_null", "method", "is_null", lambda v, p, n: pc.is_null(v[0]),
          lambda e, p: pc.is_null(e[0]))
_register("is_not_null", "method", "is_not_null", lambda v, p, n: pc.is_valid(v[0]),
          lambda e, p: pc.is_valid(e[0]))
_register("fill_null", "method", "fill_null", _fill_null, lambda e, p: pc.coalesce(e[0], e[1]))
_register("is_in", "method", "is_in", _is_in, _is_in_arrow, pos=("values",))
_register("cast", "method", "cast", lambda v, p, n: v[0].cast(p["dtype"]),
          lambda e, p: e[0].cast(p["dtype"]), pos=("dtype",))

# ---- strings
