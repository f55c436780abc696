"""Filter masks: the rows of a record batch where a boolean expression is true (null counts
as false), as a numpy bool array, computed without Arrow's general path where it can be.

A filter keeps the rows whose predicate is true, so nulls and falses are alike to it; AND
and OR are monotone in both, so a tree of them can be computed on plain true/false masks
(``null & x`` drops the row whichever ``x`` is, as does ``false & x``; ``null | x`` keeps it
exactly when ``x`` is true). Its leaves take fast paths:

* a column compared with a literal, or with a column of the same type, on the column's
  storage (dates and timestamps as their integers, decimals of up to 18 digits as their
  unscaled 64-bit integers with the literal scaled once, not the column cast);
* a string column, plain or dictionary encoded, compared with a string or tested with
  ``is_in``: on the dictionary's values (a few) and then by code, for a dictionary;
* anything else (``~``, functions, mixed types) through :meth:`Expr.evaluate`, with
  nulls as false, so every predicate gives the rows the plain path gives.

A conjunction stops at the first conjunct that leaves no row.
"""

from __future__ import annotations

import datetime
import decimal
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from millstream.expr.nodes import Column, Expr, Literal, _Func

_CMP = {"eq": np.equal, "ne": np.not_equal, "lt": np.less, "le": np.less_equal,
        "gt": np.greater, "ge": np.greater_equal}
_PC_CMP = {"eq": pc.equal, "ne": pc.not_equal, "lt": pc.less, "le": pc.less_equal,
           "gt": pc.greater, "ge": pc.greater_equal}
#: the comparison seen from the other side (``3 < x`` is ``x > 3``)
_FLIP = {"eq": "eq", "ne": "ne", "lt": "gt", "le": "ge", "gt": "lt", "ge": "le"}
#: a dictionary column whose matching codes are at most this many is compared code by code
_FEW_CODES = 4
#: (id(literal), column type, op) -> (literal, its storage form): the same filter meets the
#: same literal and type in every batch
_LITERALS: dict[tuple[int, pa.DataType, str], tuple[pa.Scalar, Any]] = {}
#: a decimal128 of at most this many digits holds its unscaled value in the low 64 bits
_INT64_DIGITS = 18
_INT_RANGE = {8: (-(1 << 7), (1 << 7) - 1), 16: (-(1 << 15), (1 << 15) - 1),
              32: (-(1 << 31), (1 << 31) - 1), 64: (-(1 << 63), (1 << 63) - 1)}


class NotBoolean(TypeError):
    """The predicate (or an operand of its AND/OR) gives values that are not booleans."""


def filter_mask(predicate: Expr, batch: pa.RecordBatch) -> np.ndarray:
    """Where ``predicate`` is true on ``batch`` (null as false): a bool array of its rows.

    Raises what :meth:`Expr.evaluate` raises for a predicate it cannot evaluate, and
    :class:`NotBoolean` for one that is not boolean."""
    return all_true([predicate], batch)


def all_true(predicates: Sequence[Expr], batch: pa.RecordBatch) -> np.ndarray:
    """Where every one of ``predicates`` is true on ``batch`` (see :func:`filter_mask`),
    stopping at the first that leaves no row."""
    keep = np.ones(batch.num_rows, dtype=bool)
    for p in predicates:
        keep &= _mask(p, batch, True)
        if not keep.any():
            break
    return keep


def _mask(e: Expr, batch: pa.RecordBatch, top: bool = False) -> np.ndarray:
    if isinstance(e, _Func):
        if e.op == "and":
            left = _mask(e.args[0], batch)
            if not left.any():
                return left
            return left & _mask(e.args[1], batch)
        if e.op == "or":
            left = _mask(e.args[0], batch)
            if left.all():
                return left
            return left | _mask(e.args[1], batch)
        out = _leaf(e, batch)
        if out is not None:
            return out
    return _generic(e, batch, top)


def _generic(e: Expr, batch: pa.RecordBatch, top: bool) -> np.ndarray:
    """Through the expression's own evaluation (on plain strings: Arrow's kernels do not
    all take string views or dictionaries)."""
    values = e.evaluate(_plain_batch(batch, e.columns()))
    if not pa.types.is_boolean(values.type):
        if pa.types.is_null(values.type) and not top:  # (``x & None``: Kleene's null)
            return np.zeros(batch.num_rows, dtype=bool)
        raise NotBoolean(f"the filter expression must be boolean, got {values.type}")
    return _bool_mask(values)


def _plain_batch(batch: pa.RecordBatch, names: set[str]) -> pa.RecordBatch:
    """``batch`` with the named string_view or dictionary-of-string columns as strings."""
    out = batch
    for name in names:
        i = out.schema.get_field_index(name)
        if i < 0:
            continue
        t = out.schema.field(i).type
        if pa.types.is_dictionary(t) and _is_string(t.value_type):
            t = t.value_type
        elif not pa.types.is_string_view(t):
            continue
        out = out.set_column(i, out.schema.field(i).with_type(pa.string()),
                             out.column(i).cast(pa.string()))
    return out


def _bool_mask(values: pa.Array) -> np.ndarray:
    """A boolean array as a numpy mask, null as false."""
    if values.null_count:
        values = pc.fill_null(values, False)
    return values.to_numpy(zero_copy_only=False)


def _column(e: Expr, batch: pa.RecordBatch) -> pa.Array | None:
    if isinstance(e, Column):
        i = batch.schema.get_field_index(e.name)
        if i >= 0:
            return batch.column(i)
    return None


def _leaf(e: _Func, batch: pa.RecordBatch) -> np.ndarray | None:
    """A fast mask for a comparison or ``is_in``, or None (take the generic path)."""
    op = e.op
    if op == "is_in":
        arr = _column(e.args[0], batch)
        return None if arr is None else _is_in(arr, e.params["values"])
    if op not in _CMP:
        return None
    a, b = e.args
    if isinstance(b, Column) and isinstance(a, Literal):
        a, b, op = b, a, _FLIP[op]
    arr = _column(a, batch)
    if arr is None:
        return None
    if isinstance(b, Literal):
        return _against_literal(arr, op, b.scalar)
    other = _column(b, batch)
    if other is None or other.type != arr.type:
        return None
    x, y = _storage(arr), _storage(other)
    if x is None or y is None:
        return None
    out = _CMP[op](x, y)
    return _and_valid(_and_valid(out, arr), other)


# ------------------------------------------------------------------ storage of columns

def _storage(arr: pa.Array) -> np.ndarray | None:
    """The values of a fixed-width column as numpy, or None for other types.

    Dates and times are their integers, decimals of up to 18 digits their unscaled int64
    values (a strided view of the low words of the 128-bit ones: copying them to compare
    contiguously cost more, in place, than it saved); null slots hold anything."""
    t = arr.type
    if pa.types.is_decimal128(t):
        if t.precision > _INT64_DIGITS:
            return None
        words = np.frombuffer(arr.buffers()[1], dtype=np.int64,
                              count=2 * (arr.offset + len(arr)))
        return words[2 * arr.offset::2]
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_date(t) \
            or pa.types.is_timestamp(t) or pa.types.is_duration(t) or pa.types.is_time(t):
        if pa.types.is_float16(t):
            return None
        dtype = _NP_DTYPES.get(t.bit_width if not pa.types.is_floating(t) else -t.bit_width)
        if pa.types.is_unsigned_integer(t):
            dtype = np.dtype(f"u{t.bit_width // 8}")
        if dtype is None:
            return None
        return np.frombuffer(arr.buffers()[1], dtype=dtype,
                             count=arr.offset + len(arr))[arr.offset:]
    return None


_NP_DTYPES = {8: np.dtype("i1"), 16: np.dtype("i2"), 32: np.dtype("i4"), 64: np.dtype("i8"),
              -32: np.dtype("f4"), -64: np.dtype("f8")}


def _and_valid(mask: np.ndarray, arr: pa.Array) -> np.ndarray:
    if arr.null_count:
        mask &= arr.is_valid().to_numpy(zero_copy_only=False)
    return mask


# ------------------------------------------------------------------ column vs literal

def _against_literal(arr: pa.Array, op: str, scalar: pa.Scalar) -> np.ndarray | None:
    if not scalar.is_valid:
        return np.zeros(len(arr), dtype=bool)  # a comparison with null is null
    t = arr.type
    if pa.types.is_dictionary(t) or _is_string(t):
        value = scalar.as_py() if _is_string(scalar.type) else None
        if not isinstance(value, str):
            return None
        return _strings(arr, lambda v: _PC_CMP[op](v, pa.scalar(value, v.type)))
    storage = _storage(arr)
    if storage is None:
        return None
    key = (id(scalar), t, op)
    memo = _LITERALS.get(key)
    if memo is not None and memo[0] is scalar:
        bound = memo[1]
    else:
        bound = _literal_storage(t, op, scalar)
        if len(_LITERALS) >= 1024:
            _LITERALS.clear()
        _LITERALS[key] = (scalar, bound)  # (the scalar held: its id stays its own)
    if bound is None:
        return None
    op, value = bound
    if value is True or value is False:  # the literal falls beyond every value
        out = np.full(len(arr), value, dtype=bool)
    else:
        out = _CMP[op](storage, value)
    return _and_valid(out, arr)


def _literal_storage(t: pa.DataType, op: str, scalar: pa.Scalar) -> tuple[str, Any] | None:
    """The comparison and literal as the column's storage holds values: ``(op, value)``,
    with value True/False when the answer is the same for every non-null row; or None
    when the literal's type does not fit this fast path."""
    lt = scalar.type
    v = scalar.as_py()
    if pa.types.is_decimal128(t):
        if pa.types.is_integer(lt):
            exact = decimal.Decimal(int(v))
        elif pa.types.is_decimal(lt):
            exact = v
        else:
            return None
        return _scaled_int(op, exact.scaleb(t.scale), _INT_RANGE[64])
    if pa.types.is_integer(t):
        if not pa.types.is_integer(lt):
            return None
        lo, hi = (0, (1 << t.bit_width) - 1) if pa.types.is_unsigned_integer(t) \
            else _INT_RANGE[t.bit_width]
        return _scaled_int(op, decimal.Decimal(int(v)), (lo, hi))
    if pa.types.is_floating(t):
        # float64 only: numpy compares a float32 column in float32, Arrow in float64
        if t.bit_width == 64 and (pa.types.is_floating(lt) or pa.types.is_integer(lt)):
            if pa.types.is_integer(lt) and abs(int(v)) > (1 << 53):
                return None  # (Arrow and numpy may round it differently)
            return op, float(v)
        return None
    if lt == t and (pa.types.is_date(t) or pa.types.is_timestamp(t)
                    or pa.types.is_duration(t) or pa.types.is_time(t)):
        if isinstance(v, (datetime.date, datetime.datetime, datetime.time,
                          datetime.timedelta)) or isinstance(v, int):
            return op, int(scalar.cast(pa.int64() if t.bit_width == 64 else pa.int32())
                           .as_py())
    return None


def _scaled_int(op: str, exact: decimal.Decimal, bounds: tuple[int, int]
                ) -> tuple[str, Any] | None:
    """An exact literal against integer storage: a fraction rounds the way that keeps the
    comparison's answer (``x < 5.5`` is ``x < 6``, ``x <= 5.5`` is ``x <= 5``)."""
    if not exact.is_finite():
        return None
    lo, hi = bounds
    if exact == exact.to_integral_value():
        value = int(exact)
    elif op == "eq":
        return op, False
    elif op == "ne":
        return op, True
    else:
        value = math.ceil(exact) if op in ("lt", "ge") else math.floor(exact)
    if value < lo or value > hi:
        above = value > hi  # the literal is beyond every value the column can hold
        answer = {"eq": False, "ne": True, "lt": above, "le": above, "gt": not above,
                  "ge": not above}[op]
        return op, answer
    return op, value


# ------------------------------------------------------------------ strings

def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _strings(arr: pa.Array, test: Any) -> np.ndarray | None:
    """``test`` (values -> boolean array) on a string column; on a dictionary's values
    and then by code."""
    t = arr.type
    if pa.types.is_dictionary(t):
        if not _is_string(t.value_type):
            return None
        hits = _bool_mask(test(_plain_strings(arr.dictionary)))
        codes = arr.indices
        storage = _storage(codes)
        if storage is None:
            return None
        if len(hits) == 0:
            return np.zeros(len(arr), dtype=bool)
        hit_codes = np.flatnonzero(hits)
        if len(hit_codes) <= _FEW_CODES:  # (compares beat a gather: 8x on 100k rows)
            out = np.zeros(len(arr), dtype=bool)
            for code in hit_codes:
                out |= storage == code
        else:
            if codes.null_count:  # (a null's code slot may hold anything)
                storage = np.where((storage >= 0) & (storage < len(hits)), storage, 0)
            out = hits[storage]
        return _and_valid(out, codes)
    if not _is_string(t):
        return None
    return _bool_mask(test(_plain_strings(arr)))


def _plain_strings(arr: pa.Array) -> pa.Array:
    """string_view as string (Arrow 26 has no comparison kernels for views)."""
    return arr.cast(pa.string()) if pa.types.is_string_view(arr.type) else arr


def _is_in(arr: pa.Array, values: list[Any]) -> np.ndarray | None:
    if not values:
        return np.zeros(len(arr), dtype=bool)
    if not all(isinstance(v, str) for v in values):
        return None

    def test(v: pa.Array) -> pa.Array:
        return pc.is_in(v, value_set=pa.array(values, v.type), skip_nulls=True)

    return _strings(arr, test)
