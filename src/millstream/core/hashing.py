"""Deterministic, vectorized hashing of Arrow columns for hash partitioning.

Python's ``hash`` is salted per process, so it cannot decide which worker gets a key.
These hashes depend only on the values, are the same in every process, and are
computed with numpy over Arrow buffers (no Python loop per row for numbers and strings).
"""

from __future__ import annotations

import pickle
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_NULL_HASH = np.uint64(0x5BD1E9955BD1E995)
# Per-position multipliers for string hashing (odd 64-bit constants).
_POS_CACHE: list[np.ndarray] = []


def _positions() -> np.ndarray:
    """64 odd per-position weights for string hashing (drawn on first use: numpy.random
    is slow to import)."""
    if not _POS_CACHE:
        rng = np.random.default_rng(0x5EED)
        _POS_CACHE.append(rng.integers(1, 2**63, size=64, dtype=np.uint64) | np.uint64(1))
    return _POS_CACHE[0]


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: spreads the bits of 64-bit integers."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * _M1
        x = x ^ (x >> np.uint64(27))
        x = x * _M2
        x = x ^ (x >> np.uint64(31))
    return x


_CHUNK_BYTES = 1 << 17


def _hash_binary(arr: pa.Array) -> np.ndarray:
    """Hash strings chunk by chunk so the numpy temporaries stay small (~40 bytes per byte)."""
    arr = arr.cast(pa.large_binary()) if not pa.types.is_large_binary(arr.type) else arr
    n = len(arr)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64, count=n + 1, offset=arr.offset * 8)
    total = int(offsets[-1] - offsets[0])
    if total <= _CHUNK_BYTES:
        return _hash_binary_chunk(arr)
    out = np.empty(n, dtype=np.uint64)
    start = 0
    while start < n:
        # rows whose bytes fit in the chunk (at least one row)
        limit = offsets[start] + _CHUNK_BYTES
        end = int(np.searchsorted(offsets, limit, side="right")) - 1
        end = max(start + 1, min(n, end))
        out[start:end] = _hash_binary_chunk(arr.slice(start, end - start))
        start = end
    return out


def _hash_binary_chunk(arr: pa.Array) -> np.ndarray:
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64, count=n + 1, offset=arr.offset * 8)
    start, end = int(offsets[0]), int(offsets[-1])
    data_buf = arr.buffers()[2]
    lengths = np.diff(offsets).astype(np.uint64)
    if end == start:
        return _mix(lengths * _M1)
    longest = int(lengths.max())
    if longest <= 64 and n * longest <= 2 * (end - start):
        return _hash_short_binary(data_buf, offsets, lengths, longest)
    data = np.frombuffer(data_buf, dtype=np.uint8, count=end - start, offset=start).astype(np.uint64)
    rel = offsets - start
    # position of every byte within its string
    pos = np.arange(end - start, dtype=np.int64)
    owner_starts = np.repeat(rel[:-1], np.diff(rel))
    pos -= owner_starts
    with np.errstate(over="ignore"):
        weighted = (data + np.uint64(1)) * _positions()[pos % 64] * (np.uint64(1) + (pos // 64).astype(np.uint64))
        sums = np.zeros(n, dtype=np.uint64)
        nonempty = np.diff(rel) > 0
        if nonempty.any():
            idx = rel[:-1][nonempty]
            sums[nonempty] = np.add.reduceat(weighted, idx)
        return _mix(sums ^ (lengths * _M2))


def _hash_short_binary(data_buf: pa.Buffer, offsets: np.ndarray, lengths: np.ndarray,
                       width: int) -> np.ndarray:
    """:func:`_hash_binary_chunk`'s hashes of strings of at most 64 bytes and of similar
    lengths (keys such as ids): the bytes gathered into a row per string, padded to the
    longest, and summed along the rows (1.7x faster on 12-byte ids; the sums wrap alike)."""
    start, end = int(offsets[0]), int(offsets[-1])
    padded = np.zeros(end - start + width, dtype=np.uint8)
    padded[:end - start] = np.frombuffer(data_buf, dtype=np.uint8, count=end - start,
                                         offset=start)
    cols = np.arange(width, dtype=np.int64)
    weighted = padded[(offsets[:-1] - start)[:, None] + cols].astype(np.uint64)
    weighted += np.uint64(1)
    weighted *= cols < lengths.astype(np.int64)[:, None]  # bytes past a string's end add 0
    with np.errstate(over="ignore"):
        weighted *= _positions()[:width]
        sums = weighted.sum(axis=1, dtype=np.uint64)
        return _mix(sums ^ (lengths * _M2))


def _few_distinct(arr: pa.Array) -> bool:
    """Whether a sample of the values repeats enough for hashing through a dictionary to
    pay (unique keys, such as a combiner's output, are hashed directly: encoding them first
    costs a pass for nothing)."""
    sample = arr.slice(0, _DICT_SAMPLE)
    return pc.count_distinct(sample).as_py() * 4 <= len(sample) * 3


def hash_array(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """uint64 hash per value; equal values hash equal in every process; nulls hash alike."""
    if isinstance(arr, pa.ChunkedArray):
        if arr.num_chunks == 0:
            return np.zeros(0, dtype=np.uint64)
        return np.concatenate([hash_array(c) for c in arr.chunks])
    n = len(arr)
    t = arr.type
    if pa.types.is_dictionary(t):
        return _hash_through_dictionary(arr)
    if _is_binary_like(t) and n >= _DICT_MIN_ROWS and _few_distinct(arr):
        # repeated keys (the common case) are hashed once each: encoding is a C++ hash
        # table pass, far cheaper than hashing every row's bytes with numpy
        encoded = pc.dictionary_encode(arr)
        if len(encoded.dictionary) <= n // 2:
            return _hash_through_dictionary(encoded)
    if _is_binary_like(t):
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            arr = arr.cast(pa.large_string()).view(pa.large_binary()) if pa.types.is_string(t) \
                else arr.view(pa.large_binary())
        out = _hash_binary(arr.fill_null(b"") if arr.null_count else arr)
    elif pa.types.is_boolean(t):
        out = _mix(np.asarray(arr.fill_null(False).cast(pa.uint8()), dtype=np.uint64) + np.uint64(7))
    elif pa.types.is_floating(t):
        f = np.asarray(arr.cast(pa.float64()).fill_null(0.0), dtype=np.float64).copy()
        f[f == 0.0] = 0.0  # -0.0 == 0.0
        # integral floats hash like the equal integer, so 1 and 1.0 meet in the same partition
        ints = np.zeros(n, dtype=np.int64)
        integral = np.isfinite(f) & (f == np.round(f)) & (np.abs(f) < 2**63)
        ints[integral] = f[integral].astype(np.int64)
        bits = f.view(np.uint64).copy()
        bits[np.isnan(f)] = np.uint64(0x7FF8000000000000)
        out = np.where(integral, _mix(ints.view(np.uint64)), _mix(bits ^ _M2))
    elif pa.types.is_integer(t) or pa.types.is_temporal(t):
        if pa.types.is_temporal(t):
            width = t.bit_width if hasattr(t, "bit_width") else 64
            arr = arr.view(pa.int64() if width == 64 else pa.int32())
        if not pa.types.is_int64(arr.type):
            arr = arr.cast(pa.int64())
        # a key without nulls is read as it is (fill_null would copy it for nothing)
        vals = np.asarray(arr.fill_null(0) if arr.null_count else arr, dtype=np.int64)
        out = _mix(vals.view(np.uint64))
    else:
        # Lists, structs, decimals, pickled objects: hash a canonical byte form (slow path).
        values = arr.to_pylist()
        out = np.fromiter(
            ((zlib.crc32(pickle.dumps(v, protocol=4)) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
             for v in values), dtype=np.uint64, count=n)
        out = _mix(out)
    if arr.null_count:
        valid = np.asarray(pc.is_valid(arr), dtype=bool)
        out = np.where(valid, out, _NULL_HASH)
    return out


_DICT_MIN_ROWS = 256
_DICT_SAMPLE = 1024


def _is_binary_like(t: pa.DataType) -> bool:
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
            or pa.types.is_large_binary(t))


def _hash_through_dictionary(arr: pa.DictionaryArray) -> np.ndarray:
    """Hash a dictionary array by its dictionary's values (equal to hashing every row)."""
    hashes = hash_array(arr.dictionary)
    indices = arr.indices
    idx = np.asarray(indices.fill_null(0) if indices.null_count else indices, dtype=np.int64)
    out = hashes[idx] if len(hashes) else np.zeros(len(arr), dtype=np.uint64)
    if arr.null_count:
        valid = np.asarray(pc.is_valid(arr), dtype=bool)
        out = np.where(valid, out, _NULL_HASH)
    return out


def hash_columns(columns: list[pa.Array | pa.ChunkedArray], num_rows: int) -> np.ndarray:
    """Combined uint64 hash of several key columns, row by row."""
    if not columns:
        return np.zeros(num_rows, dtype=np.uint64)
    # the first column's step from h = 0 is _mix(0 * 31 + hash): no zeros to multiply
    h = _mix(hash_array(columns[0]))
    with np.errstate(over="ignore"):
        for c in columns[1:]:
            h = _mix(h * np.uint64(31) + hash_array(c))
    return h


def partition_ids(columns: list[pa.Array | pa.ChunkedArray], num_rows: int,
                  num_partitions: int) -> np.ndarray:
    """Target partition (0..num_partitions-1) of every row by hash of its key columns."""
    if num_partitions == 1:
        return np.zeros(num_rows, dtype=np.int64)
    return (hash_columns(columns, num_rows) % np.uint64(num_partitions)).astype(np.int64)


def split_by_partition(batch: pa.RecordBatch, pids: np.ndarray, num_partitions: int
                       ) -> list[tuple[int, pa.RecordBatch]]:
    """Split a batch into (partition, sub-batch) pairs, keeping the row order within each."""
    if batch.num_rows == 0:
        return []
    if num_partitions == 1:
        return [(0, batch)]
    # numpy sorts 8- and 16-bit integers stably by radix: 4x faster than int64 ids
    small = np.uint8 if num_partitions <= 256 else np.uint16 if num_partitions <= 65536 else None
    counts = np.bincount(pids, minlength=num_partitions)
    whole = np.flatnonzero(counts == batch.num_rows)
    if len(whole):  # every row goes to one partition: the batch as it is, no gather
        return [(int(whole[0]), batch)]
    order = np.argsort(pids.astype(small) if small else pids, kind="stable")
    taken = batch.take(pa.array(order))
    out = []
    start = 0
    for p in range(num_partitions):
        c = int(counts[p])
        if c:
            out.append((p, taken.slice(start, c)))
        start += c
    return out
