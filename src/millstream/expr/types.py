"""Arrow data types and datums for expressions: :func:`parse_type`, which reads a type from a
name or a Python type, and the small helpers the operations share (broadcasting scalars,
numeric casts, values as they print in reprs)."""

from __future__ import annotations

import builtins
import datetime
import re
from typing import Any

import pyarrow as pa

from millstream.errors import PlanError

Datum = pa.Array | pa.Scalar

_NULL_BOOL = pa.nulls(1, pa.bool_())[0]  # (pa.scalar would import pandas)
_F64 = pa.float64()


# --------------------------------------------------------------------------- types

_TYPE_ALIASES: dict[str, pa.DataType] = {
    "int": pa.int64(),
    "integer": pa.int64(),
    "long": pa.int64(),
    "float": pa.float64(),
    "double": pa.float64(),
    "str": pa.string(),
    "string": pa.string(),
    "utf8": pa.string(),
    "large_str": pa.large_string(),
    "bool": pa.bool_(),
    "boolean": pa.bool_(),
    "bytes": pa.binary(),
    "binary": pa.binary(),
    "date": pa.date32(),
    "datetime": pa.timestamp("us"),
    "timestamp": pa.timestamp("us"),
}

_PY_TYPES: dict[type, pa.DataType] = {
    int: pa.int64(),
    float: pa.float64(),
    str: pa.string(),
    bool: pa.bool_(),
    bytes: pa.binary(),
    datetime.date: pa.date32(),
    datetime.datetime: pa.timestamp("us"),
    datetime.timedelta: pa.duration("us"),
}

_TS_RE = re.compile(r"^timestamp\[(s|ms|us|ns)(?:,\s*tz=([^\]]+))?\]$")
_DEC_RE = re.compile(r"^decimal(128|256)?\(\s*(\d+)\s*,\s*(-?\d+)\s*\)$")
_DUR_RE = re.compile(r"^duration\[(s|ms|us|ns)\]$")


def parse_type(t: pa.DataType | str | type) -> pa.DataType:
    """Turn a pa.DataType, a type name ("int64", "timestamp[us, tz=UTC]", ...) or a Python type into a pa.DataType."""
    if isinstance(t, pa.DataType):
        return t
    if isinstance(t, type) and t in _PY_TYPES:
        return _PY_TYPES[t]
    if isinstance(t, builtins.str):
        s = t.strip()
        key = s.lower()
        if key in _TYPE_ALIASES:
            return _TYPE_ALIASES[key]
        m = _TS_RE.match(key)
        if m:
            tz = s[s.index("tz=") + 3 : -1].strip() if m.group(2) else None
            return pa.timestamp(m.group(1), tz=tz)
        m = _DEC_RE.match(key)
        if m:
            make = pa.decimal256 if m.group(1) == "256" else pa.decimal128
            return make(int(m.group(2)), int(m.group(3)))
        m = _DUR_RE.match(key)
        if m:
            return pa.duration(m.group(1))
        try:
            return pa.type_for_alias(key)
        except (ValueError, KeyError):
            pass
    raise PlanError(
        f"unknown data type {t!r}; use a pyarrow DataType or a name such as "
        f"'int64', 'float64', 'string', 'bool', 'date32', 'timestamp[us]'"
    )


# --------------------------------------------------------------------------- helpers


def _q(s: str) -> str:
    """Quote a string with double quotes for reprs."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _fmt(v: Any) -> str:
    """Render a parameter value for a repr."""
    if isinstance(v, builtins.str):
        return _q(v)
    if isinstance(v, pa.DataType):
        return _q(builtins.str(v))
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, tuple):
        return "(" + ", ".join(_fmt(x) for x in v) + ("," if len(v) == 1 else "") + ")"
    return repr(v)


def _broadcast(x: Datum, n: int) -> pa.Array:
    """Return x as an array of length n (scalars are repeated)."""
    if isinstance(x, pa.ChunkedArray):
        return x.combine_chunks()
    if isinstance(x, pa.Scalar):
        return pa.repeat(x, n)
    return x


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def _to_float(x: Datum) -> Datum:
    """Cast integer, decimal and null data to float64; leave floats and other types alone."""
    t = x.type
    if pa.types.is_integer(t) or pa.types.is_decimal(t) or pa.types.is_null(t):
        return x.cast(_F64)
    return x


def _to_f64(x: Datum) -> Datum:
    """Cast numeric and null data to float64; leave other types alone."""
    t = x.type
    if t != _F64 and (_is_numeric(t) or pa.types.is_null(t)):
        return x.cast(_F64)
    return x


def _null_to_bool(x: Datum) -> Datum:
    """Give a null-typed datum the boolean type, so the logical kernels accept it."""
    return x.cast(pa.bool_()) if pa.types.is_null(x.type) else x
