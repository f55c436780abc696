"""Vectorized window-function kernels over a chunk of whole partitions, sorted by
(partition keys, order keys).

Every kernel works on numpy position arrays: for each row, the bounds of its partition
(``seg``), of its peer group (``peer``: equal order keys) and of its frame (``lo``/``hi``,
half open). Frame aggregates never subtract running totals of floats (which would lose
small values next to large ones): integer sums use exact prefix differences, everything
else a binary decomposition of each frame into power-of-two blocks (:func:`range_reduce`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, localcontext

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from millstream.errors import SchemaError
from millstream.expr.fixed_point import decimal_array


# ----------------------------------------------------------------------------- runs
@dataclass
class Spans:
    """Per row: the first position of its run, one past its last, and the run's number."""

    start: np.ndarray
    end: np.ndarray
    ids: np.ndarray


def spans(flags: np.ndarray) -> Spans:
    """The runs that start where ``flags`` is true (``flags[0]`` is true when non-empty)."""
    n = len(flags)
    starts = np.flatnonzero(flags)
    ids = np.cumsum(flags, dtype=np.int64) - 1
    ends = np.append(starts[1:], n).astype(np.int64)
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return Spans(empty, empty, empty)
    return Spans(starts[ids].astype(np.int64), ends[ids], ids)


def comparable(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One chunk, dictionaries decoded and view types as large ones, so the compute kernels
    (comparison, sorting) accept it."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], arr.type)
    t = arr.type
    if pa.types.is_dictionary(t):
        arr = arr.cast(t.value_type)
        t = arr.type
    if pa.types.is_string_view(t):
        arr = arr.cast(pa.large_string())
    elif pa.types.is_binary_view(t):
        arr = arr.cast(pa.large_binary())
    return arr


def take(arr: pa.Array, indices: pa.Array) -> pa.Array:
    """``arr.take(indices)``, also for view types (which Arrow cannot take from)."""
    t = arr.type
    if pa.types.is_string_view(t) or pa.types.is_binary_view(t):
        return comparable(arr).take(indices).cast(t)
    return arr.take(indices)


def _bools(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=bool)


def _differs(cur: pa.Array, prev: pa.Array) -> np.ndarray:
    """Row by row, whether ``cur`` differs from ``prev`` as SQL groups values: nulls equal
    each other, NaN equals NaN."""
    try:
        ne = pc.not_equal(cur, prev)
    except (pa.ArrowNotImplementedError, pa.ArrowTypeError):  # nested types: compare in Python
        return np.array([a != b for a, b in zip(cur.to_pylist(), prev.to_pylist())], dtype=bool)
    out = _bools(ne.fill_null(False)) if ne.null_count else _bools(ne)
    if cur.null_count or prev.null_count:
        out |= _bools(cur.is_null()) != _bools(prev.is_null())
    if pa.types.is_floating(cur.type):
        out &= ~(_bools(pc.is_nan(cur).fill_null(False)) & _bools(pc.is_nan(prev).fill_null(False)))
    return out


def change_flags(columns: list[pa.Array | pa.ChunkedArray], n: int) -> np.ndarray:
    """True at row 0 and wherever any of ``columns`` (sorted) differs from the row before."""
    flags = np.zeros(n, dtype=bool)
    if n == 0:
        return flags
    flags[0] = True
    for c in columns:
        a = comparable(c)
        if n > 1:
            flags[1:] |= _differs(a.slice(1), a.slice(0, n - 1))
    return flags


# ----------------------------------------------------------------------------- ranking
def ranking(func: str, seg: Spans, peer: Spans, buckets: int) -> np.ndarray:
    """row_number, rank, dense_rank, percent_rank, cume_dist or ntile of every row."""
    n = len(seg.start)
    idx = np.arange(n, dtype=np.int64)
    if func == "row_number":
        return idx - seg.start + 1
    if func == "rank":
        return peer.start - seg.start + 1
    if func == "dense_rank":
        return peer.ids - peer.ids[seg.start] + 1
    size = seg.end - seg.start
    if func == "percent_rank":
        return np.where(size > 1, (peer.start - seg.start) / np.maximum(size - 1, 1), 0.0)
    if func == "cume_dist":
        return (peer.end - seg.start) / size
    if func == "ntile":  # the first size % buckets buckets hold one row more
        r = idx - seg.start
        q, rem = size // buckets, size % buckets
        big = rem * (q + 1)
        return np.where(r < big, r // (q + 1), rem + (r - big) // np.maximum(q, 1)) + 1
    raise ValueError(func)


def shifted(arr: pa.Array, seg: Spans, offset: int, default: pa.Array | None) -> pa.Array:
    """lag (``offset`` > 0 looks back) and lead (< 0 looks ahead): the value ``offset`` rows
    away within the partition, else ``default`` (or null)."""
    n = len(arr)
    src = np.arange(n, dtype=np.int64) - offset
    ok = (src >= seg.start) & (src < seg.end)
    if default is None:
        return take(arr, pa.array(np.where(ok, src, 0), mask=~ok))
    both = pa.concat_arrays([arr, default])
    return take(both, pa.array(np.where(ok, src, n + np.arange(n, dtype=np.int64))))


def positional(func: str, arr: pa.Array, lo: np.ndarray, hi: np.ndarray, nth: int,
               ignore_nulls: bool) -> pa.Array:
    """first_value, last_value and nth_value of every row's frame ``[lo, hi)``."""
    n = len(arr)
    if ignore_nulls and arr.null_count:
        valid = _bools(arr.is_valid())
        idx = np.arange(n, dtype=np.int64)
        if func == "first_value":
            nxt = np.minimum.accumulate(np.where(valid, idx, n)[::-1])[::-1]
            pos = nxt[np.minimum(lo, n - 1)] if n else lo
            ok = (lo < hi) & (pos < hi)
        else:
            prv = np.maximum.accumulate(np.where(valid, idx, -1))
            pos = prv[np.maximum(hi - 1, 0)] if n else hi
            ok = (lo < hi) & (pos >= lo)
    else:
        pos = lo + (nth - 1) if func == "nth_value" else (lo if func == "first_value" else hi - 1)
        ok = (lo < hi) & (pos < hi)
    return take(arr, pa.array(np.where(ok, pos, 0), mask=~ok))


# ----------------------------------------------------------------------------- frames
def range_reduce(values: np.ndarray, lo: np.ndarray, hi: np.ndarray, op: Callable,
                 identity: object) -> np.ndarray:
    """``op`` folded over ``values[lo:hi]`` for every row, by power-of-two blocks: level k
    holds ``op`` over ``values[i:i + 2**k]``; each frame takes the blocks of its width's
    binary digits, lowest first. O(n log(max width)) time, O(n) memory."""
    n = len(values)
    acc = np.full(n, identity, dtype=values.dtype)
    width = hi - lo
    maxw = int(width.max()) if n else 0
    pos = lo.copy()
    level = values
    step = 1
    while step <= maxw:
        take = (width & step) != 0
        if take.any():
            p = pos[take]
            acc[take] = op(acc[take], level[p])
            pos[take] = p + step
        if step * 2 <= maxw:
            nxt = level.copy()  # the last entries stay partial; no frame reads them
            nxt[:n - step] = op(level[:n - step], level[step:])
            level = nxt
        step *= 2
    return acc


def _prefix_diff(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Exact integer sums of ``values[lo:hi]`` (two's complement wrap-around cancels)."""
    prefix = np.zeros(len(values) + 1, dtype=values.dtype)
    np.cumsum(values, out=prefix[1:])
    with np.errstate(over="ignore"):
        return prefix[hi] - prefix[lo]


def _decimal_unscaled(arr: pa.Array) -> np.ndarray | None:
    """The unscaled int64 values of a decimal128 of precision <= 18 (nulls as 0), else None."""
    t = arr.type
    if not pa.types.is_decimal128(t) or t.precision > 18:
        return None
    words = np.frombuffer(arr.buffers()[1], dtype=np.int64, count=2 * (arr.offset + len(arr)))
    out = words[0::2][arr.offset:].copy()
    if arr.null_count:
        out[~_bools(arr.is_valid())] = 0
    return out


def _decimal_from_unscaled(values: np.ndarray, scale: int, empty: np.ndarray) -> pa.Array:
    """decimal128(38, scale) from int64 unscaled values, null where ``empty``."""
    return decimal_array(values, pa.decimal128(38, scale), ~empty if empty.any() else None)


def _numbers(arr: pa.Array, fill: object) -> np.ndarray:
    filled = arr.fill_null(fill) if arr.null_count else arr
    return np.asarray(filled.to_numpy(zero_copy_only=False))


def dense_codes(arr: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """Each value's rank among the distinct values (-1 for null), and the distinct values in
    order (NaN above every number), so min/max of any orderable type reduce integers."""
    a = comparable(arr)
    n = len(a)
    valid = n - a.null_count
    order = np.asarray(pc.array_sort_indices(a, null_placement="at_end"))[:valid]
    sorted_vals = a.take(pa.array(order))
    flags = change_flags([sorted_vals], valid)
    codes = np.full(n, -1, dtype=np.int64)
    codes[order] = np.cumsum(flags, dtype=np.int64) - 1
    return codes, take(arr, pa.array(order[flags]))


def frame_aggregate(func: str, arr: pa.Array | None, lo: np.ndarray, hi: np.ndarray,
                    out_type: pa.DataType) -> pa.Array:
    """sum, mean, min, max, count (non-null values) or count_all (rows) of every frame."""
    if func == "count_all" or arr is None:
        return pa.array(hi - lo, pa.int64()).cast(out_type)
    n = len(arr)
    valid = np.ones(n, dtype=bool) if not arr.null_count else _bools(arr.is_valid())
    count = _prefix_diff(valid.astype(np.int64), lo, hi)
    if func == "count":
        return pa.array(count, pa.int64()).cast(out_type)
    empty = count == 0
    t = arr.type
    if func in ("sum", "mean"):
        return _sum_or_mean(func, arr, t, lo, hi, count, empty, out_type)
    if func in ("min", "max"):
        return _min_max(func, arr, t, lo, hi, empty, out_type)
    raise ValueError(func)


def _sum_or_mean(func: str, arr: pa.Array, t: pa.DataType, lo: np.ndarray, hi: np.ndarray,
                 count: np.ndarray, empty: np.ndarray, out_type: pa.DataType) -> pa.Array:
    safe = np.maximum(count, 1)
    if pa.types.is_decimal(t):
        unscaled = _decimal_unscaled(arr)
        if unscaled is not None:
            total = _prefix_diff(unscaled, lo, hi)
            if func == "mean":
                mean = total.astype(np.float64) / safe / (10.0 ** t.scale)
                return pa.array(mean, mask=empty).cast(out_type)
            return _decimal_from_unscaled(total, t.scale, empty).cast(out_type)
        # wide decimals: exact Python Decimals (slow path), with digits to spare
        vals = np.array([Decimal(0) if v is None else v for v in arr.to_pylist()], dtype=object)
        with localcontext() as ctx:
            ctx.prec = 100
            total = range_reduce(vals, lo, hi, np.add, Decimal(0))
        if func == "mean":
            return pa.array([float(s) / c for s, c in zip(total, safe)], mask=empty,
                            type=pa.float64()).cast(out_type)
        return pa.array(list(total), mask=empty).cast(out_type)
    if pa.types.is_integer(t) or pa.types.is_boolean(t):
        dtype = np.uint64 if pa.types.is_unsigned_integer(t) else np.int64
        total = _prefix_diff(_numbers(arr, 0).astype(dtype), lo, hi)
        if func == "mean":
            return pa.array(total.astype(np.float64) / safe, mask=empty).cast(out_type)
        return pa.array(total, mask=empty).cast(out_type)
    if pa.types.is_floating(t):
        total = range_reduce(_numbers(arr, 0.0).astype(np.float64), lo, hi, np.add, 0.0)
        if func == "mean":
            return pa.array(total / safe, mask=empty).cast(out_type)
        return pa.array(total, mask=empty).cast(out_type)
    raise SchemaError(f"{func} over a window needs numbers, got {t}")


def _min_max(func: str, arr: pa.Array, t: pa.DataType, lo: np.ndarray, hi: np.ndarray,
             empty: np.ndarray, out_type: pa.DataType) -> pa.Array:
    op = np.minimum if func == "min" else np.maximum
    numeric = pa.types.is_integer(t) or (pa.types.is_floating(t) and not pc.any(
        pc.is_nan(arr)).as_py())
    if numeric:
        if pa.types.is_floating(t):
            ident = np.inf if func == "min" else -np.inf
            vals = _numbers(arr, 0.0).astype(np.float64)
        else:
            info = np.iinfo(arr.type.to_pandas_dtype())
            ident = info.max if func == "min" else info.min
            vals = _numbers(arr, 0).astype(arr.type.to_pandas_dtype())
        if arr.null_count:
            vals[~_bools(arr.is_valid())] = ident
        out = range_reduce(vals, lo, hi, op, ident)
        return pa.array(out, mask=empty).cast(out_type)
    codes, uniques = dense_codes(arr)
    ident = len(uniques) if func == "min" else -1
    if func == "min":
        codes = np.where(codes < 0, ident, codes)
    best = range_reduce(codes, lo, hi, op, ident)
    return take(uniques, pa.array(np.where(empty, 0, best), mask=empty)).cast(out_type)
