"""Grouping on keys that map to dense integer codes, with sums and counts: numpy
``bincount`` over the codes instead of Arrow's hash grouping, for key ranges of 1e5 codes
and more, where Arrow's hash table outgrows the CPU cache (2.5M rows, 3 sums, 1e5 int64
keys: 49 ms of CPU against 82; below about 5e4 codes Arrow is as fast or faster, and
``group_dense`` leaves those to it).

A key codes densely when its values span a small range: integers (a dictionary's int32
codes, ``id6`` in 1..1e5, a day number), and strings or binaries of one or two bytes,
read from their data or view buffers without decoding. Several keys combine into one code
(mixed radix) while the product of their ranges stays below ``MAX_CODES`` (and twice the
rows); a null key has a code of its own. The groups present are the codes whose count is
not 0 (or whose sum is not 0, for sums of positive values and no count).

Rows are taken in blocks that stay in the CPU cache (the codes and the values of a block
are made, counted and summed before the next block's). Sums are exact as Arrow's are:
integers and decimal128 (as unscaled int64 values) are summed in float64 while no partial
sum can round (or in two halves that cannot), and a sum that might leave 64 bits is left
to Arrow; float64 sums add the rows of a block in order, then the blocks' sums (as the
partial states of two batches merge: within rounding of Arrow's row order; NaN and
infinities as Arrow). Nulls are skipped and a group with no value sums to null (Arrow's
``min_count=1``). Anything else (other aggregates, types, wider or narrower key ranges)
is left to Arrow (None). The result has Arrow's schema for the same grouping; groups come
in code order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from millstream.core.arrow import normalize_key
from millstream.ops.agg_runs import arrow_schema, sums_array

#: fewest codes grouped densely: below, Arrow's hash table stays in the CPU cache and is
#: as fast (2.5M rows, 3 sums: 25 ms against 37 for 1000 codes, 43 against 53 for 30000,
#: 82 against 49 for 1e5, 330 against 229 for 1e6)
DENSE_MIN_CODES = 1 << 16
#: largest number of codes (all keys combined) grouped densely, and its share of the rows
#: (the counts and sums are arrays of that many slots)
MAX_CODES = 1 << 20
MIN_CODES = 1 << 12
CODES_PER_ROW = 2
#: rows per block (at least; and BLOCK_PER_CODE per code, so that adding a block's
#: per-code sums costs little next to making them)
BLOCK_ROWS = 1 << 15
BLOCK_PER_CODE = 2
#: most rows per block (split sums are exact for blocks of up to 2**21 rows)
MAX_BLOCK_ROWS = 1 << 21
#: float64 holds every integer up to this exactly
_EXACT = 1 << 53
_VALID = pc.CountOptions("only_valid")
_ALL = pc.CountOptions("all")

Decoder = Callable[[np.ndarray], pa.Array]
Reader = Callable[[pa.Array], np.ndarray]


@dataclass
class _Key:
    """How one key column turns into codes: ``read`` gives a chunk's values as integers,
    ``lo`` is subtracted, ``size`` codes (the last one for null when ``nulls``)."""

    read: Reader
    lo: int
    size: int
    nulls: bool
    decode: Decoder


@dataclass
class _Sum:
    """One sum: its column, how a chunk's values are read (float64 or unscaled int64),
    and the mode: "float" (float64 values), "exact" (integers whose float64 partial sums
    are exact) or "split" (integers summed in two halves)."""

    index: int
    read: Reader
    mode: str
    type: pa.DataType
    nulls: bool
    low: int | None  # the smallest value (integers)


def group_dense(table: pa.Table, keys: list[str], aggs: list[tuple],
                min_codes: int = DENSE_MIN_CODES) -> pa.Table | None:
    """``table.group_by(keys).aggregate(aggs)`` (keys normalized as
    :func:`~millstream.core.arrow.normalize_key` does) for the cases the module docstring
    names and at least ``min_codes`` codes (fewer are left to Arrow, as fast), else None."""
    n = table.num_rows
    if not keys or n < 2 or not aggs or not all(_supported(table, a) for a in aggs):
        return None
    limit = min(MAX_CODES, max(MIN_CODES, CODES_PER_ROW * n))
    plans: list[_Key] = []
    size = 1
    for k in keys:
        plan = _key_plan(table.column(k), limit // size)
        if plan is None:
            return None
        plans.append(plan)
        size *= plan.size
    if size < min_codes:
        return None
    key_index = [table.schema.get_field_index(k) for k in keys]
    sums: dict[str, _Sum] = {}
    for a in aggs:
        if a[1] == "sum" and f"{a[0]}_sum" not in sums:
            s = _sum_plan(table, a[0])
            if s is None:
                return None
            sums[f"{a[0]}_sum"] = s
    counted = {a[0] for a in aggs if a[1] == "count" and not _counts_rows(a)
               and table.column(a[0]).null_count}  # counts of values, not rows
    # present groups: from the row counts, or from a sum of positive values
    by_sum = next((name for name, s in sums.items() if s.mode != "float" and not s.nulls
                   and s.low is not None and s.low > 0), None)
    need_counts = by_sum is None or any(a[1] != "sum" for a in aggs)

    counts = np.zeros(size, np.int64) if need_counts else None
    totals = {name: np.zeros(size, np.float64 if s.mode == "float" else np.int64)
              for name, s in sums.items()}
    nvalid = {name: np.zeros(size, np.int64) for name, s in sums.items() if s.nulls}
    nvalid.update({f"{c}_count": np.zeros(size, np.int64) for c in counted})
    block = min(MAX_BLOCK_ROWS, max(BLOCK_ROWS, BLOCK_PER_CODE * size))
    codes_buf = np.empty(block, np.int64)
    part_buf = np.empty(block, np.int64)
    weights = np.empty(block, np.float64)
    for batch in table.to_batches(max_chunksize=block):
        m = batch.num_rows
        if not m:
            continue
        codes = codes_buf[:m]
        for i, (plan, col) in enumerate(zip(plans, key_index)):
            target = codes if i == 0 else part_buf[:m]
            _codes(plan, batch.column(col), target)
            if i:
                codes *= plan.size
                codes += target
        if counts is not None:
            counts += np.bincount(codes, minlength=size)
        for name, s in sums.items():
            chunk = batch.column(s.index)
            valid = _chunk_valid(chunk) if chunk.null_count else None
            if s.nulls:  # (a block of the column may have none)
                nvalid[name] += np.bincount(codes if valid is None else codes[valid],
                                            minlength=size)
            _add_sums(s, chunk, codes, valid, size, weights[:m], totals[name])
        for c in counted:
            chunk = batch.column(batch.schema.get_field_index(c))
            nvalid[f"{c}_count"] += np.bincount(codes[_chunk_valid(chunk)], minlength=size)

    present = np.flatnonzero(counts if counts is not None else totals[by_sum])
    cols: dict[str, pa.Array] = {}
    for a in aggs:
        name = "count_all" if a[1] == "count_all" else f"{a[0]}_{a[1]}"
        if a[1] == "sum":
            out = sums_array(totals[name][present], sums[name].type)
            if name in nvalid:  # a group without a value sums to null
                out = pc.if_else(pa.array(nvalid[name][present] > 0), out,
                                 pa.scalar(None, out.type))
            cols[name] = out
        elif name in nvalid:
            cols[name] = pa.array(nvalid[name][present], pa.int64())
        else:
            assert counts is not None
            cols[name] = pa.array(counts[present], pa.int64())
    stride = 1
    for k, plan in reversed(list(zip(keys, plans))):
        cols[k] = plan.decode((present // stride) % plan.size)
        stride *= plan.size
    schema = arrow_schema(_normalized_empty(table, keys), keys, aggs)
    try:
        return pa.table([cols[f.name].cast(f.type) for f in schema], schema=schema)
    except (KeyError, pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return None


def _supported(table: pa.Table, a: tuple) -> bool:
    if a[1] == "count_all":
        return True
    if a[1] == "count":
        return len(a) == 2 or (len(a) == 3 and (a[2] == _VALID or a[2] == _ALL))
    if a[1] != "sum" or len(a) != 2:
        return False
    t = table.schema.field(a[0]).type
    return (pa.types.is_integer(t) and not pa.types.is_uint64(t)) or pa.types.is_float64(t) \
        or isinstance(t, pa.Decimal128Type)


def _counts_rows(a: tuple) -> bool:
    """Whether a count aggregate counts rows, nulls included (else values)."""
    return len(a) == 3 and a[2] == _ALL


def _normalized_empty(table: pa.Table, keys: list[str]) -> pa.Table:
    empty = table.slice(0, 0)
    for k in keys:
        i = empty.schema.get_field_index(k)
        empty = empty.set_column(i, k, normalize_key(empty.column(i)))
    return empty


def _chunk_valid(c: pa.Array) -> np.ndarray:
    return np.asarray(pc.is_valid(c).to_numpy(zero_copy_only=False), dtype=bool)


def _min_max(v: np.ndarray, c: pa.Array) -> tuple[int, int] | None:
    """The smallest and largest of ``v`` at the valid rows of chunk ``c`` (None: none)."""
    if c.null_count:
        v = v[_chunk_valid(c)]
    return (int(v.min()), int(v.max())) if len(v) else None


def _range(col: pa.ChunkedArray, read: Reader) -> tuple[int, int] | None:
    """The smallest and largest value ``read`` gives over the valid rows of ``col``."""
    ranges = [r for c in col.chunks if len(c) > c.null_count
              for r in [_min_max(read(c), c)] if r is not None]
    if not ranges:
        return None
    return min(r[0] for r in ranges), max(r[1] for r in ranges)


# --------------------------------------------------------------------------- key codes


def _key_plan(col: pa.ChunkedArray, limit: int) -> _Key | None:
    """How ``col`` codes (see _Key); None when it has more than ``limit`` codes or a type
    this does not code."""
    t = col.type
    width = 0  # bytes of a string or binary key
    read: Reader
    if pa.types.is_integer(t):
        if pa.types.is_uint64(t) and (pc.max(col).as_py() or 0) >= 1 << 62:
            return None
        read = _integer_chunk
        mm = pc.min_max(col)
        found = None if mm["min"].as_py() is None else (mm["min"].as_py(), mm["max"].as_py())
    elif pa.types.is_fixed_size_binary(t) and t.byte_width <= 2:
        width = t.byte_width
        read = _fixed_bytes
        found = _range(col, read)
    elif pa.types.is_string(t) or pa.types.is_binary(t) or pa.types.is_string_view(t) \
            or pa.types.is_binary_view(t):
        w = _string_width(col)
        if w is None:
            return None
        width = w
        view = pa.types.is_string_view(t) or pa.types.is_binary_view(t)
        read = (lambda c: _view_bytes(c, w)) if view else (lambda c: _string_bytes(c, w))
        if not view and not all(_string_bytes(c, w) is not None for c in col.chunks if len(c)):
            return None  # a null that takes no bytes
        found = _range(col, read)
    else:
        return None
    lo, hi = found if found is not None else (0, 0)
    nulls = col.null_count > 0
    size = hi - lo + 1 + nulls
    if size > limit:
        return None
    return _Key(read, lo, size, nulls, _decoder(t, lo, size if nulls else None, width))


def _codes(plan: _Key, chunk: pa.Array, out: np.ndarray) -> None:
    """Write the codes of ``chunk`` into ``out``."""
    np.subtract(plan.read(chunk), plan.lo, out=out, casting="unsafe")
    if chunk.null_count:
        out[~_chunk_valid(chunk)] = plan.size - 1


def _decoder(t: pa.DataType, lo: int, null_code: int | None, width: int) -> Decoder:
    def decode(codes: np.ndarray) -> pa.Array:
        mask = None if null_code is None else codes == null_code - 1
        values = codes + lo
        if pa.types.is_integer(t):
            return pa.array(values, pa.int64(), mask=mask).cast(t)
        data = pa.py_buffer(values.astype("<u1" if width == 1 else "<u2").tobytes())
        m = len(codes)
        validity = None if mask is None else pa.array(~mask).buffers()[1]
        nulls = 0 if mask is None else int(mask.sum())
        if pa.types.is_fixed_size_binary(t):
            return pa.Array.from_buffers(t, m, [validity, data], null_count=nulls)
        out_type = pa.string() if pa.types.is_string(t) or pa.types.is_string_view(t) \
            else pa.binary()
        offsets = pa.py_buffer(np.arange(m + 1, dtype=np.int32) * np.int32(width))
        return pa.Array.from_buffers(out_type, m, [validity, offsets, data], null_count=nulls)
    return decode


def _integer_chunk(c: pa.Array) -> np.ndarray:
    """An integer chunk's values as numpy, without a copy (any value in a null slot)."""
    dtype = np.dtype(c.type.to_pandas_dtype())
    return np.frombuffer(c.buffers()[1], dtype=dtype, count=c.offset + len(c))[c.offset:]


def _fixed_bytes(c: pa.Array) -> np.ndarray:
    dtype = "<u1" if c.type.byte_width == 1 else "<u2"
    return np.frombuffer(c.buffers()[1], dtype=dtype, count=c.offset + len(c))[c.offset:]


def _string_width(col: pa.ChunkedArray) -> int | None:
    """1 or 2 when every non-null value of a string, binary or view column has that many
    bytes (nulls: any), else None."""
    widths: set[int] = set()
    for c in col.chunks:
        if len(c) == c.null_count:
            continue
        if pa.types.is_string_view(c.type) or pa.types.is_binary_view(c.type):
            lengths = np.frombuffer(c.buffers()[1], dtype=np.int32,
                                    count=4 * (c.offset + len(c)))[4 * c.offset::4]
            lo, hi = _min_max(lengths, c) or (0, 0)
        else:
            mm = pc.min_max(pc.binary_length(c))
            lo, hi = mm["min"].as_py(), mm["max"].as_py()
        if lo != hi or lo not in (1, 2):
            return None
        widths.add(lo)
    if not widths:
        return 1  # (all null)
    return widths.pop() if len(widths) == 1 else None


def _string_bytes(c: pa.Array, width: int) -> np.ndarray | None:
    """The bytes of a string chunk whose non-null values all have ``width`` (1 or 2)
    bytes, as integers (two bytes little-endian); None when a null takes other than
    ``width`` bytes."""
    n = len(c)
    off = np.frombuffer(c.buffers()[1], dtype=np.int32, count=c.offset + n + 1)[c.offset:]
    start = int(off[0])
    if int(off[-1]) - start != n * width or (c.null_count and not np.all(np.diff(off) == width)):
        return None
    data = np.frombuffer(c.buffers()[2], dtype=np.uint8, count=start + n * width)[start:]
    return data if width == 1 else data.view("<u2")


def _view_bytes(c: pa.Array, width: int) -> np.ndarray:
    """The inline bytes of a string-view chunk whose non-null values all have ``width``
    (1 or 2) bytes, as integers (two bytes little-endian)."""
    views = np.frombuffer(c.buffers()[1], dtype=np.uint8,
                          count=16 * (c.offset + len(c)))[16 * c.offset:].reshape(-1, 16)
    if width == 1:
        return views[:, 4]
    return views[:, 4].astype(np.int64) | (views[:, 5].astype(np.int64) << 8)


# --------------------------------------------------------------------------- sums


def _float_chunk(c: pa.Array) -> np.ndarray:
    return np.frombuffer(c.buffers()[1], dtype=np.float64, count=c.offset + len(c))[c.offset:]


def _unscaled(c: pa.Array) -> np.ndarray:
    """A decimal128 chunk's low words: its unscaled values when they fit in 64 bits (any
    value in a null slot)."""
    words = np.frombuffer(c.buffers()[1], dtype=np.int64, count=2 * (c.offset + len(c)))
    return words[2 * c.offset::2]


def _decimal_fits(col: pa.ChunkedArray, precision: int) -> bool:
    """Whether every non-null value of a decimal128 column fits in 64 bits."""
    if precision <= 18:
        return True
    for c in col.chunks:
        words = np.frombuffer(c.buffers()[1], dtype=np.int64, count=2 * (c.offset + len(c)))
        words = words[2 * c.offset:]
        ok = words[1::2] == (words[0::2] >> 63)
        if c.null_count:
            ok |= ~_chunk_valid(c)
        if not ok.all():
            return False
    return True


def _sum_plan(table: pa.Table, name: str) -> _Sum | None:
    """How column ``name`` is summed (see _Sum); None when a sum might leave 64 bits."""
    index = table.schema.get_field_index(name)
    col = table.column(index)
    t = col.type
    nulls = col.null_count > 0
    if pa.types.is_float64(t):
        return _Sum(index, _float_chunk, "float", t, nulls, None)
    if isinstance(t, pa.Decimal128Type):
        if not _decimal_fits(col, t.precision):
            return None
        read: Reader = _unscaled
        found = _range(col, read)
    else:
        read = _integer_chunk
        mm = pc.min_max(col)
        found = None if mm["min"].as_py() is None else (mm["min"].as_py(), mm["max"].as_py())
    lo, hi = found if found is not None else (0, 0)
    bound = max(abs(lo), abs(hi)) * len(col)
    if bound >= (1 << 63) - (1 << 54):
        return None  # a sum might leave int64 (or the halves' recombination might)
    return _Sum(index, read, "exact" if bound <= _EXACT else "split", t, nulls,
                lo if found is not None else None)


def _add_sums(s: _Sum, chunk: pa.Array, codes: np.ndarray, valid: np.ndarray | None,
              size: int, weights: np.ndarray, total: np.ndarray) -> None:
    """Add the block ``chunk``'s sums per code to ``total``."""
    values = s.read(chunk)
    if s.mode == "split":
        v = (np.where(valid, values, 0) if valid is not None else values).astype(np.int64)
        total += split_sums(v, codes, size)
        return
    np.copyto(weights, values, casting="unsafe")
    if valid is not None:
        weights[~valid] = 0.0
    got = np.bincount(codes, weights=weights, minlength=size)
    if s.mode == "float":
        with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: NaN, as Arrow's
            total += got
    else:
        total += got.astype(np.int64)


def split_sums(v: np.ndarray, codes: np.ndarray, size: int) -> np.ndarray:
    """Per code the exact int64 sum of the int64 values ``v`` (whose sums the caller
    knows fit in int64): ``v = hi * 2**shift + lo`` with ``0 <= lo < 2**shift``, both
    halves summed in float64 with every partial sum below 2**53 (for up to 2**20 rows)."""
    n = max(1, len(codes))
    shift = max(1, (_EXACT // n).bit_length() - 1)  # n * 2**shift <= 2**53
    lo = np.bincount(codes, weights=v & ((1 << shift) - 1), minlength=size)
    hi = np.bincount(codes, weights=v >> shift, minlength=size)
    return (hi.astype(np.int64) << shift) + lo.astype(np.int64)
