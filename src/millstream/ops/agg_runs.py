"""Grouping on one integer key whose rows arrive in runs of equal keys (a table stored in
key order: TPC-H's lineitem by order key), with sums and counts: segment sums over the
runs in numpy instead of Arrow's hash grouping (about 3x less CPU for 1.5M rows and 375k
groups: no hash table, one pass).

Keys already in order are summed as they are; keys in a few ascending runs (map outputs
of a shuffle concatenated) are put in order first with a stable merge of the runs;
anything else, or a type, null or value this does not cover, is left to Arrow (None).
The result has Arrow's schema for the same grouping (column names, order and types),
found once per input schema on no rows; groups come in key order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from millstream.expr.fixed_point import decimal_array

#: sort when at most one in this many neighbouring keys descends (a few sorted runs)
_MAX_DESCENT_SHARE = 64
#: keys looked at first (see _sample_in_runs)
_SAMPLE = 4096
#: Arrow's output schema per (input schema, key, aggregates)
_SCHEMAS: dict[tuple[Any, ...], pa.Schema] = {}
_SCHEMAS_MAX = 256


def group_runs(table: pa.Table, keys: list[str], aggs: list[tuple]) -> pa.Table | None:
    """``table.group_by(keys).aggregate(aggs)`` for the cases the module docstring names,
    else None."""
    if len(keys) != 1 or table.num_rows < 2 or not aggs:
        return None
    key = table.column(keys[0])
    if not pa.types.is_integer(key.type) or key.null_count or not _sample_in_runs(key):
        return None
    values: list[np.ndarray | None] = []  # per aggregate: int64 values to sum, None: count
    for a in aggs:
        if a[1] == "count_all" or (a[1] == "count" and len(a) == 3 and _counts_valid(a[2])
                                   and table.column(a[0]).null_count == 0):
            values.append(None)
        elif a[1] == "sum" and len(a) == 2:
            v = _int64_values(table.column(a[0]))
            if v is None:
                return None
            values.append(v)
        else:
            return None
    k = np.asarray(_one_chunk(key).to_numpy(zero_copy_only=False))
    n = len(k)
    descents = int(np.count_nonzero(k[1:] < k[:-1]))
    if descents:
        if descents * _MAX_DESCENT_SHARE > n:
            return None
        order = np.argsort(k, kind="stable")  # (merges the ascending runs)
        k = k[order]
        values = [None if v is None else v[order] for v in values]
    starts = np.flatnonzero(np.concatenate(([True], k[1:] != k[:-1])))
    counts = np.diff(np.append(starts, n))
    schema = arrow_schema(table, keys, aggs)
    cols: dict[str, pa.Array] = {}
    for a, v in zip(aggs, values):
        name = "count_all" if a[1] == "count_all" else f"{a[0]}_{a[1]}"
        if v is None:
            cols[name] = pa.array(counts, pa.int64())
            continue
        peak = int(np.abs(v).max()) if len(v) else 0
        if peak and peak * int(counts.max()) >= 2**63:
            return None  # a sum might overflow 64 bits
        cols[name] = sums_array(np.add.reduceat(v, starts), table.column(a[0]).type)
    cols[keys[0]] = pa.array(k[starts], key.type)
    try:
        return pa.table([cols[f.name].cast(f.type) for f in schema], schema=schema)
    except (KeyError, pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return None


def _sample_in_runs(key: pa.ChunkedArray) -> bool:
    """Whether the first ``_SAMPLE`` keys descend rarely enough to be in runs: unordered
    keys are told apart without reading (and copying) the whole column."""
    first = next((c for c in key.chunks if len(c)), None)
    if first is None:
        return True
    k = np.asarray(first.slice(0, _SAMPLE).to_numpy(zero_copy_only=False))
    return int(np.count_nonzero(k[1:] < k[:-1])) * _MAX_DESCENT_SHARE <= len(k)


def _counts_valid(options: Any) -> bool:
    """Whether a count's options count the non-null values (Arrow's default)."""
    return options == pc.CountOptions("only_valid")


def _one_chunk(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        return col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    return col


def _int64_values(col: pa.ChunkedArray | pa.Array) -> np.ndarray | None:
    """A column without nulls as int64 numpy values: integers as they are, decimal128 as
    unscaled values (when every value fits in 64 bits); None otherwise."""
    if col.null_count:
        return None
    arr = _one_chunk(col)
    t = arr.type
    if pa.types.is_integer(t):
        if pa.types.is_uint64(t):
            return None
        return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=np.int64)
    if not isinstance(t, pa.Decimal128Type):
        return None
    n = len(arr)
    words = np.frombuffer(arr.buffers()[1], dtype=np.int64, count=2 * (arr.offset + n))
    words = words[2 * arr.offset:]
    lo = words[0::2]
    if t.precision > 18 and not np.array_equal(words[1::2], lo >> 63):
        return None  # a value beyond 64 bits
    return np.ascontiguousarray(lo)


def sums_array(sums: np.ndarray, t: pa.DataType) -> pa.Array:
    """Sums as Arrow: float64 sums as float64; int64 sums as integers, or as decimal128(38)
    unscaled values at the scale of ``t`` when the summed column is a decimal (cast to
    Arrow's result type by the caller)."""
    if sums.dtype == np.float64:
        return pa.array(sums, pa.float64())
    if not isinstance(t, pa.Decimal128Type):
        return pa.array(sums, pa.int64())
    return decimal_array(sums, pa.decimal128(38, t.scale))


def arrow_schema(table: pa.Table, keys: list[str], aggs: list[tuple]) -> pa.Schema:
    """The schema Arrow's grouping gives (found on no rows, remembered per input)."""
    cache_key = (table.schema, tuple(keys), repr(aggs))
    schema = _SCHEMAS.get(cache_key)
    if schema is None:
        schema = table.slice(0, 0).group_by(keys, use_threads=False).aggregate(aggs).schema
        if len(_SCHEMAS) >= _SCHEMAS_MAX:
            _SCHEMAS.clear()
        _SCHEMAS[cache_key] = schema
    return schema
