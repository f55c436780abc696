"""Numeric operations with SQL's meaning, registered as ``num_*`` operations: rounding
half away from zero, truncating division and remainder, integer casts that round, the
math functions (sqrt, ln, log, exp, trigonometry, sign ...) and greatest/least.

Build them with :func:`num` (``num("sqrt", col("x"))``); SQL maps its functions here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from millstream.expr.registry import _OPS, _register
from millstream.expr.types import _F64, Datum, _broadcast, _to_f64


def _unary(fn: Any, to_float: bool = True) -> tuple[Any, Any]:
    def ev(v: list[Datum], p: dict[str, Any], n: int) -> Datum:
        return fn(_to_f64(v[0]) if to_float else v[0])

    def ar(e: list[pc.Expression], p: dict[str, Any]) -> pc.Expression:
        return fn(e[0].cast(_F64) if to_float else e[0])

    return ev, ar


#: math functions of one argument computed in float64 (names as SQL spells them)
_FLOAT_FUNCS = {
    "sqrt": pc.sqrt_checked, "exp": pc.exp, "ln": pc.ln_checked, "log10": pc.log10_checked,
    "log2": pc.log2_checked, "sin": pc.sin, "cos": pc.cos, "tan": pc.tan,
    "asin": pc.asin_checked, "acos": pc.acos_checked, "atan": pc.atan,
    "cbrt": lambda x: pc.multiply(pc.sign(x), pc.power(pc.abs(x), 1.0 / 3.0)),
    "degrees": lambda x: pc.multiply(x, 180.0 / np.pi),
    "radians": lambda x: pc.multiply(x, np.pi / 180.0),
}


for _name, _fn in _FLOAT_FUNCS.items():
    _register(f"num_{_name}", "method", _name, *_unary(_fn))

#: functions that keep their input's type (ceil and floor of integers are the integers)
for _name, _fn in {"ceil": pc.ceil, "floor": pc.floor, "sign": pc.sign,
                   "trunc": pc.trunc}.items():
    def _keep(fn: Any) -> tuple[Any, Any]:
        def ev(v: list[Datum], p: dict[str, Any], n: int) -> Datum:
            x = v[0]
            if pa.types.is_integer(x.type) and fn is not pc.sign:
                return x
            if pa.types.is_null(x.type):
                return x.cast(_F64)
            return fn(x)

        return ev, None

    _register(f"num_{_name}", "method", _name, *_keep(_fn))


def _round(v: list[Datum], p: dict[str, Any], n: int) -> Datum:
    x = v[0]
    if pa.types.is_null(x.type):
        return x.cast(_F64)
    if pa.types.is_integer(x.type) and p["ndigits"] >= 0:
        return x
    return pc.round(x, ndigits=p["ndigits"], round_mode="half_towards_infinity")


_register("num_round", "method", "round_sql", _round,
          lambda e, p: pc.round(e[0], ndigits=p["ndigits"], round_mode="half_towards_infinity"),
          pos=("ndigits",))


def _binary_float(fn: Any) -> Any:
    return lambda v, p, n: fn(_to_f64(v[0]), _to_f64(v[1]))


_register("num_atan2", "method", "atan2", _binary_float(pc.atan2))
_register("num_log", "method", "log",  # log(base, x)
          lambda v, p, n: pc.divide(pc.ln_checked(_to_f64(v[1])), pc.ln_checked(_to_f64(v[0]))))


def _trunc_divmod(kind: str, a: Datum, b: Datum, n: int) -> Datum:
    """Integer division truncated toward zero and its remainder (SQL's ``/`` of integers in
    some dialects, ``//`` in DuckDB, ``%`` everywhere): the remainder has the sign of the
    dividend; a zero divisor gives null."""
    t = pc.subtract(pa.array([], a.type), pa.array([], b.type)).type
    if pa.types.is_null(t):
        return pa.nulls(n)
    if pa.types.is_decimal(t):
        t = _F64
    a = _broadcast(a.cast(t), n)
    b = _broadcast(b.cast(t), n)
    valid = pc.and_(pc.is_valid(a), pc.is_valid(b))
    bv = pc.fill_null(b, 1).to_numpy(zero_copy_only=False)
    zero = bv == 0
    if zero.any():
        valid = pc.and_(valid, pa.array(~zero))
        bv = np.where(zero, 1, bv)
    av = pc.fill_null(a, 0).to_numpy(zero_copy_only=False)
    with np.errstate(all="ignore"):
        if kind == "mod":
            out = np.fmod(av, bv)
        elif pa.types.is_integer(t):
            q = np.abs(av) // np.abs(bv)
            out = np.where((av < 0) != (bv < 0), -q, q)
        else:
            out = np.trunc(av / bv)
    mask = pc.invert(valid).to_numpy(zero_copy_only=False)
    return pa.array(out, type=t, mask=mask if mask.any() else None)


_register("num_intdiv", "bin", "div", lambda v, p, n: _trunc_divmod("div", v[0], v[1], n))
_register("num_mod", "bin", "mod", lambda v, p, n: _trunc_divmod("mod", v[0], v[1], n))


def _to_integer(v: list[Datum], p: dict[str, Any], n: int) -> Datum:
    """SQL's cast to an integer type: floats round half to even (as C's rint: DuckDB,
    Postgres), decimals half away from zero."""
    x, t = v[0], p["dtype"]
    if pa.types.is_floating(x.type):
        x = pc.round(x, round_mode="half_to_even")
    elif pa.types.is_decimal(x.type):
        x = pc.round(x, round_mode="half_towards_infinity")
    return x.cast(t)


_register("num_to_integer", "method", "to_integer", _to_integer, pos=("dtype",))


def _extreme(kind: str) -> Any:
    fn = pc.max_element_wise if kind == "greatest" else pc.min_element_wise

    def ev(v: list[Datum], p: dict[str, Any], n: int) -> Datum:
        vals = [x for x in v if not pa.types.is_null(x.type)]
        if not vals:
            return pa.nulls(n)
        return fn(*vals, skip_nulls=True)

    return ev


_register("num_greatest", "method", "greatest", _extreme("greatest"))
_register("num_least", "method", "least", _extreme("least"))


def num(name: str, *args: Any, **params: Any) -> Any:
    """The numeric operation ``num_<name>`` on ``args`` (expressions or values)."""
    from millstream.expr.nodes import _Func, _lit_or_expr

    op = f"num_{name}"
    return _Func(op, tuple(_lit_or_expr(a) for a in args), {**_OPS[op].default, **params})
