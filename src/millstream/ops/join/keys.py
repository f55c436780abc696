"""Join keys as int64 codes: equal key tuples get equal codes, so a join looks them up with
numpy instead of hashing the build side again for every probe batch.

Each key column becomes one or more int64 "atoms": integers, booleans and temporal values
are their integer values, floats their bits (``-0.0`` as ``0.0``, one NaN), decimals their
unscaled words; strings, binaries and other types a 64-bit hash. Exact atoms combine into
one code by mixed radix over the build side's value ranges (an exact code: equal codes are
equal keys); otherwise the atoms are hashed together and equal codes are confirmed by
comparing the keys (:meth:`KeyEncoder.verify`). Nulls never match (SQL semantics).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from millstream.core.hashing import hash_array
from millstream.errors import SchemaError

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_NAN_BITS = np.int64(0x7FF8000000000000)
#: Exact codes must stay below this (room for the offset arithmetic).
_MAX_SPAN = 1 << 62


def canonical_type(t: pa.DataType) -> pa.DataType:
    """The type a key of type ``t`` is compared as: dictionaries decoded, every string
    layout as large_string, every binary layout as large_binary."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.large_string()
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return pa.large_binary()
    return t


def unified_type(a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    """The type two key columns meet as (null gives way to the other, then Arrow's
    permissive promotion: int32 and int64 as int64, int and float as float64, ...); None
    when they cannot meet."""
    if a.equals(b):
        return a
    if pa.types.is_null(a) or pa.types.is_null(b):
        return b if pa.types.is_null(a) else a
    try:
        return pa.unify_schemas([pa.schema([("x", a)]), pa.schema([("x", b)])],
                                promote_options="permissive").field("x").type
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None


def common_key_type(a: pa.DataType, b: pa.DataType, left: str, right: str) -> pa.DataType:
    """The type both sides' key columns are cast to before they are compared;
    SchemaError when they cannot meet."""
    a, b = canonical_type(a), canonical_type(b)
    t = unified_type(a, b)
    if t is None:
        raise SchemaError(f"join: key {left!r} is {a} on the left and {right!r} is {b} on "
                          f"the right; cast one side")
    return t


def key_column(arr: pa.Array | pa.ChunkedArray, t: pa.DataType) -> pa.Array:
    """``arr`` as one array of the comparison type ``t``."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if not arr.type.equals(t):
        arr = arr.cast(t)
    return arr


def _mix(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * _M1
        x = x ^ (x >> np.uint64(27))
        x = x * _M2
        return x ^ (x >> np.uint64(31))


def _fixed_words(arr: pa.Array, width: int) -> list[np.ndarray]:
    """The int64 words of a fixed-width value (decimals: 16 or 32 bytes)."""
    n = len(arr)
    words = width // 8
    buf = np.frombuffer(arr.buffers()[1], dtype=np.int64, count=n * words,
                        offset=arr.offset * width).reshape(n, words)
    return [np.ascontiguousarray(buf[:, i]) for i in range(words)]


def atoms(arr: pa.Array) -> tuple[list[np.ndarray], bool]:
    """The int64 atoms of a key column of its comparison type, and whether they are exact
    (equal atoms are equal values) rather than hashes. Atoms of null slots are arbitrary."""
    t = arr.type
    n = len(arr)
    if pa.types.is_null(t):
        return [np.zeros(n, dtype=np.int64)], True
    if pa.types.is_boolean(t):
        return [np.asarray(arr.fill_null(False).cast(pa.int8()), dtype=np.int64)], True
    if pa.types.is_integer(t):
        filled = arr.fill_null(0) if arr.null_count else arr
        if pa.types.is_uint64(t):
            return [np.asarray(filled).view(np.int64)], True
        return [np.asarray(filled, dtype=np.int64)], True
    if pa.types.is_temporal(t) and t.bit_width in (32, 64):
        phys = pa.int64() if t.bit_width == 64 else pa.int32()
        filled = arr.view(phys)
        filled = filled.fill_null(0) if filled.null_count else filled
        return [np.asarray(filled, dtype=np.int64)], True
    if pa.types.is_floating(t):
        f = np.array(arr.cast(pa.float64()).fill_null(0.0), dtype=np.float64)
        f[f == 0.0] = 0.0  # -0.0 == 0.0
        bits = f.view(np.int64)
        bits[np.isnan(f)] = _NAN_BITS  # NaN == NaN, as DuckDB and group_by have it
        return [bits], True
    if pa.types.is_decimal(t):
        if t.byte_width not in (16, 32):  # decimal32/decimal64
            arr = arr.cast(pa.decimal128(t.precision, t.scale))
        return _fixed_words(arr, arr.type.byte_width), True
    if pa.types.is_large_string(t) or pa.types.is_large_binary(t):
        return [hash_bytes(arr).view(np.int64)], False
    return [hash_array(arr).view(np.int64)], False


def hash_bytes(arr: pa.Array) -> np.ndarray:
    """64-bit hashes of large_string or large_binary values, read 8 bytes at a time (a
    numpy round per 8 bytes of the longest value, over the values that long); nulls hash
    as empty values. Only equal within one process's use: build and probe alike."""
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64, count=n + 1,
                            offset=arr.offset * 8)
    start = offsets[:-1]
    lengths = offsets[1:] - start
    h = _mix(lengths.astype(np.uint64) ^ _M2)
    data = arr.buffers()[2]
    lo, hi = (int(offsets[0]), int(offsets[-1])) if n else (0, 0)
    if data is None or hi == lo:
        return h
    # only this slice's bytes (a batch may be a slice of a far larger array), padded with
    # a whole word past the last value
    raw = np.frombuffer(data, dtype=np.uint8, count=hi - lo, offset=lo)
    padded = np.zeros(len(raw) + 8, dtype=np.uint8)
    padded[:len(raw)] = raw
    start = start - lo
    # words[i]: the 8 bytes from byte i on (little-endian), an overlapping strided view
    words = np.ndarray(shape=(len(raw),), dtype="<u8", buffer=padded.data, strides=(1,))
    active = np.flatnonzero(lengths > 0)
    k = 0
    with np.errstate(over="ignore"):
        while len(active):
            w = words[start[active] + k]
            rest = lengths[active] - k
            short = rest < 8
            if short.any():  # keep only the value's own bytes of its last word
                drop = ((8 - rest[short]) * 8).astype(np.uint64)
                w[short] = (w[short] << drop) >> drop
            h[active] = _mix(h[active] * _M1 + w)
            k += 8
            active = active[lengths[active] > k]
    return h


def _valid(cols: Sequence[pa.Array]) -> np.ndarray | None:
    """Rows whose key columns are all non-null (None: all rows)."""
    out: np.ndarray | None = None
    for c in cols:
        if c.null_count:
            v = np.asarray(c.is_valid(), dtype=bool)
            out = v if out is None else out & v
    return out


class KeyEncoder:
    """int64 codes for the key tuples of one join, fitted to the build side's values.

    ``exact``: equal codes mean equal keys (mixed radix over the build side's ranges of
    exact atoms); otherwise codes are hashes and :meth:`verify` checks candidate pairs.
    """

    def __init__(self, build_cols: Sequence[pa.Array]) -> None:
        self.build_cols = list(build_cols)
        per_col = [atoms(c) for c in self.build_cols]
        self.exact_cols = [ex for _, ex in per_col]
        self.build_atoms = [a for a, _ in per_col]
        flat = [a for col in self.build_atoms for a in col]
        self.build_valid = _valid(self.build_cols)
        self.exact = all(self.exact_cols)
        self.mins: list[int] = []
        self.maxs: list[int] = []
        self.spans: list[int] = []
        if self.exact:
            rows = self.build_valid
            span = 1
            for a in flat:
                v = a if rows is None else a[rows]
                lo, hi = (int(v.min()), int(v.max())) if len(v) else (0, 0)
                self.mins.append(lo)
                self.maxs.append(hi)
                self.spans.append(hi - lo + 1)
                span *= hi - lo + 1
            if span >= _MAX_SPAN:
                self.exact = False
            self.span = span
        self.build_codes, _ = self._codes(self.build_atoms, len(self.build_cols[0])
                                          if self.build_cols else 0)

    def _codes(self, col_atoms: list[list[np.ndarray]], n: int
               ) -> tuple[np.ndarray, np.ndarray | None]:
        """Codes of rows, and which rows fall inside the build side's ranges (exact codes
        only; None: all)."""
        flat = [a for col in col_atoms for a in col]
        if self.exact:
            inside: np.ndarray | None = None
            if len(flat) == 1:  # one atom (a single integer key): its offset is the code
                a, lo, hi = flat[0], self.mins[0], self.maxs[0]
                ok = (a >= lo) & (a <= hi)
                if not ok.all():
                    inside = ok
                with np.errstate(over="ignore"):
                    return (a - np.int64(lo) if lo else a.astype(np.int64, copy=False)), inside
            code = np.zeros(n, dtype=np.int64)
            with np.errstate(over="ignore"):
                for a, lo, hi, span in zip(flat, self.mins, self.maxs, self.spans):
                    ok = (a >= lo) & (a <= hi)
                    if not ok.all():
                        inside = ok if inside is None else inside & ok
                    code = code * np.int64(span) + (a - np.int64(lo))
            return code, inside
        h = np.zeros(n, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for a in flat:
                h = _mix(h * np.uint64(31) + (a.view(np.uint64) ^ _M2))
        return h.view(np.int64), None

    def encode(self, probe_cols: Sequence[pa.Array]) -> tuple[np.ndarray, np.ndarray | None,
                                                              list[list[np.ndarray]]]:
        """Codes of probe rows, the rows that can match (None: all), and their atoms."""
        n = len(probe_cols[0])
        col_atoms = [atoms(c)[0] for c in probe_cols]
        code, inside = self._codes(col_atoms, n)
        valid = _valid(probe_cols)
        if inside is not None:
            valid = inside if valid is None else valid & inside
        return code, valid, col_atoms

    def verify(self, probe_cols: Sequence[pa.Array], probe_atoms: list[list[np.ndarray]],
               pi: np.ndarray, bi: np.ndarray) -> np.ndarray | None:
        """Which candidate pairs (probe row ``pi``, build row ``bi``) have equal keys (None:
        all of them, when the codes are exact)."""
        if self.exact:
            return None
        keep = np.ones(len(pi), dtype=bool)
        for j, exact in enumerate(self.exact_cols):
            if exact:
                for pa_, ba in zip(probe_atoms[j], self.build_atoms[j]):
                    keep &= pa_[pi] == ba[bi]
            else:
                keep &= _equal(probe_cols[j].take(pa.array(pi)),
                               self.build_cols[j].take(pa.array(bi)))
        return keep


def _equal(a: pa.Array, b: pa.Array) -> np.ndarray:
    """Element-wise equality of two non-null arrays of one type."""
    try:
        return np.asarray(pc.equal(a, b).fill_null(False), dtype=bool)
    except (pa.ArrowNotImplementedError, pa.ArrowTypeError):
        # lists, structs and other types without a comparison kernel
        return np.fromiter((x == y for x, y in zip(a.to_pylist(), b.to_pylist())),
                           dtype=bool, count=len(a))
