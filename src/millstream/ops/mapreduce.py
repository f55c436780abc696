"""MapReduce operators: a job's mapper (and combiner) per map task, its reducer per partition.

The map side emits batches with a canonical, order-preserving byte encoding of each key
(column ``__mr_key``) and the value in an exact encoding (a binary payload in ``value``
and a type tag in ``__mr_value_t``: int64, double, UTF-8, bytes, bool, None or a pickle),
so a value comes back as the very Python value the mapper yielded, whatever the other
values of the task or partition look like. The engine hash-partitions on ``__mr_key``; the reduce side sorts by it with the
external-merge :class:`~millstream.ops.sort.Sort` and walks the sorted stream group by
group, handing the reducer an iterator that streams a key's values across batches and
spilled runs.

Key order (canonical encoding): keys are ordered first by type, ``None < bool < int <
float < str < bytes < tuple < list < dict < set < frozenset < other``, then by value
(numbers numerically, strings by code point, containers element by element, dicts by
their sorted items); ``1`` and ``1.0`` are different keys; ``-0.0`` is ``0.0``; all NaNs
are one key. Any other object is keyed by its pickle: such keys are equal when their
pickles are equal, and ordered by those bytes.
"""

from __future__ import annotations

import itertools
import pickle
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from millstream.core.arrow import PICKLED_KEY, batch_to_rows, column_to_pylist
from millstream.core.context import TaskContext
from millstream.errors import PlanError, SchemaError, UserCodeFailure
from millstream.ops.base import Batches, Operator
from millstream.ops.narrow import function_name
from millstream.ops.sort import Sort

KEY_COLUMN = "__mr_key"
PART_COLUMN = "__mr_part"
COUNTER_GROUP = "mapreduce"

_EMPTY: tuple[pa.RecordBatch, ...] = ()
_NoneType = type(None)

# ----------------------------------------------------------------------------------------
# Canonical key encoding
# ----------------------------------------------------------------------------------------

_T_NONE, _T_FALSE, _T_TRUE = b"\x01", b"\x02", b"\x03"
_T_BIGNEG, _T_INT, _T_BIGPOS = 0x0F, 0x10, 0x11
_T_FLOAT, _T_STR, _T_BYTES = 0x20, 0x30, 0x40
_T_TUPLE, _T_LIST, _T_DICT, _T_SET, _T_FROZENSET, _T_OTHER = 0x50, 0x51, 0x60, 0x61, 0x62, 0x70
_END = b"\x00"
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1
_SIGN = 1 << 63
_MASK64 = (1 << 64) - 1
_NAN_BITS = 0x7FF8000000000000


def _escape(raw: bytes) -> bytes:
    return raw.replace(b"\x00", b"\x00\xff") if b"\x00" in raw else raw


def _float_bits(x: float) -> int:
    if x != x:
        u = _NAN_BITS
    elif x == 0.0:
        u = 0
    else:
        u = struct.unpack(">Q", struct.pack(">d", x))[0]
    return (~u & _MASK64) if u >> 63 else (u | _SIGN)


def _encode_int(k: int) -> bytes:
    if _I64_MIN <= k <= _I64_MAX:
        return bytes((_T_INT,)) + (k + _SIGN).to_bytes(8, "big")
    if k > 0:
        raw = k.to_bytes((k.bit_length() + 7) // 8, "big")
        return bytes((_T_BIGPOS,)) + len(raw).to_bytes(4, "big") + raw
    m = -k
    raw = m.to_bytes((m.bit_length() + 7) // 8, "big")
    return (bytes((_T_BIGNEG,)) + (0xFFFFFFFF - len(raw)).to_bytes(4, "big")
            + bytes(255 - b for b in raw))


def _encode_into(k: Any, out: list[bytes]) -> None:
    t = type(k)
    if t is str:
        out.append(b"\x30" + _escape(k.encode("utf-8", "surrogatepass")) + _END)
    elif t is int:
        out.append(_encode_int(k))
    elif k is None:
        out.append(_T_NONE)
    elif t is bool:
        out.append(_T_TRUE if k else _T_FALSE)
    elif t is float:
        out.append(b"\x20" + _float_bits(k).to_bytes(8, "big"))
    elif t is bytes:
        out.append(b"\x40" + _escape(k) + _END)
    elif t is tuple or t is list:
        out.append(b"\x50" if t is tuple else b"\x51")
        for x in k:
            _encode_into(x, out)
        out.append(_END)
    elif t is dict:
        out.append(b"\x60")
        for ek, ev in sorted((encode_key(a), encode_key(b)) for a, b in k.items()):
            out.append(ek)
            out.append(ev)
        out.append(_END)
    elif t is set or t is frozenset:
        out.append(b"\x61" if t is set else b"\x62")
        out.extend(sorted(encode_key(x) for x in k))
        out.append(_END)
    else:
        out.append(b"\x70" + _escape(pickle.dumps(k, protocol=4)) + _END)


def encode_key(k: Any) -> bytes:
    """The canonical, order-preserving byte encoding of a key (see the module docstring)."""
    t = type(k)
    if t is str:
        return b"\x30" + _escape(k.encode("utf-8", "surrogatepass")) + _END
    if t is int:
        return _encode_int(k)
    out: list[bytes] = []
    _encode_into(k, out)
    return b"".join(out)


def _read_escaped(b: bytes, pos: int) -> tuple[bytes, int]:
    start = pos
    while True:
        i = b.index(0, pos)
        if i + 1 < len(b) and b[i + 1] == 0xFF:
            pos = i + 2
            continue
        raw = b[start:i]
        return (raw.replace(b"\x00\xff", b"\x00") if b"\x00" in raw else raw), i + 1


def _decode_at(b: bytes, pos: int) -> tuple[Any, int]:
    tag = b[pos]
    pos += 1
    if tag == _T_STR:
        raw, pos = _read_escaped(b, pos)
        return raw.decode("utf-8", "surrogatepass"), pos
    if tag == _T_INT:
        return int.from_bytes(b[pos:pos + 8], "big") - _SIGN, pos + 8
    if tag == 0x01:
        return None, pos
    if tag in (0x02, 0x03):
        return tag == 0x03, pos
    if tag == _T_FLOAT:
        u = int.from_bytes(b[pos:pos + 8], "big")
        u = (u & ~_SIGN & _MASK64) if u >> 63 else (~u & _MASK64)
        return struct.unpack(">d", u.to_bytes(8, "big"))[0], pos + 8
    if tag == _T_BYTES:
        return _read_escaped(b, pos)
    if tag in (_T_BIGPOS, _T_BIGNEG):
        n = int.from_bytes(b[pos:pos + 4], "big")
        if tag == _T_BIGNEG:
            n = 0xFFFFFFFF - n
            raw = bytes(255 - x for x in b[pos + 4:pos + 4 + n])
            return -int.from_bytes(raw, "big"), pos + 4 + n
        return int.from_bytes(b[pos + 4:pos + 4 + n], "big"), pos + 4 + n
    if tag in (_T_TUPLE, _T_LIST, _T_SET, _T_FROZENSET):
        items = []
        while b[pos] != 0:
            x, pos = _decode_at(b, pos)
            items.append(x)
        pos += 1
        if tag == _T_TUPLE:
            return tuple(items), pos
        if tag == _T_LIST:
            return items, pos
        return (set(items) if tag == _T_SET else frozenset(items)), pos
    if tag == _T_DICT:
        d = {}
        while b[pos] != 0:
            k, pos = _decode_at(b, pos)
            v, pos = _decode_at(b, pos)
            d[k] = v
        return d, pos + 1
    if tag == _T_OTHER:
        raw, pos = _read_escaped(b, pos)
        return pickle.loads(raw), pos
    raise ValueError(f"corrupt MapReduce key encoding: tag {tag:#x} at byte {pos - 1} of {b!r}")


def decode_key(b: bytes) -> Any:
    """The key whose canonical encoding is ``b`` (the inverse of :func:`encode_key`)."""
    tag = b[0]
    if tag == _T_STR and b.find(0, 1) == len(b) - 1:
        return b[1:-1].decode("utf-8", "surrogatepass")
    if tag == _T_INT and len(b) == 9:
        return int.from_bytes(b[1:9], "big") - _SIGN
    value, pos = _decode_at(b, 0)
    if pos != len(b):
        raise ValueError(f"corrupt MapReduce key encoding: {len(b) - pos} trailing byte(s) in {b!r}")
    return value


def _binary_from_fixed(data: np.ndarray, width: int) -> pa.Array:
    n = data.shape[0]
    offsets = np.arange(0, width * (n + 1), width, dtype=np.int32)
    return pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets),
                                                  pa.py_buffer(np.ascontiguousarray(data))])


def _encode_int64(a: np.ndarray) -> pa.Array:
    u = (a.view(np.uint64) ^ np.uint64(_SIGN)).astype(">u8")
    buf = np.empty((len(a), 9), dtype=np.uint8)
    buf[:, 0] = _T_INT
    buf[:, 1:] = u.view(np.uint8).reshape(len(a), 8)
    return _binary_from_fixed(buf, 9)


def _encode_float64(f: np.ndarray) -> pa.Array:
    f = f.astype(np.float64, copy=True)
    f[f == 0.0] = 0.0
    bits = f.view(np.uint64).copy()
    bits[np.isnan(f)] = np.uint64(_NAN_BITS)
    neg = (bits >> np.uint64(63)) == 1
    bits = np.where(neg, ~bits, bits | np.uint64(_SIGN)).astype(">u8")
    buf = np.empty((len(f), 9), dtype=np.uint8)
    buf[:, 0] = _T_FLOAT
    buf[:, 1:] = bits.view(np.uint8).reshape(len(f), 8)
    return _binary_from_fixed(buf, 9)


def _binary_scalar(value: bytes) -> pa.Scalar:
    """A binary scalar built from buffers (pa.scalar/pa.array would import pandas at import)."""
    offsets = pa.py_buffer(np.array([0, len(value)], dtype=np.int32).tobytes())
    return pa.Array.from_buffers(pa.binary(), 1, [None, offsets, pa.py_buffer(value)])[0]


_STR_TAG = _binary_scalar(b"\x30")
_END_SCALAR = _binary_scalar(b"\x00")
_NO_SEP = _binary_scalar(b"")


def _encode_strings(arr: pa.Array) -> pa.Array:
    raw = arr.cast(pa.binary())
    if pc.any(pc.match_substring(arr, "\x00")).as_py():
        raw = pc.replace_substring(raw, b"\x00", b"\x00\xff")
    return pc.binary_join_element_wise(_STR_TAG, raw, _END_SCALAR, _NO_SEP)


def encode_keys(keys: list[Any]) -> pa.Array:
    """Canonical encodings of many keys as a binary array (vectorized for str, int, float)."""
    n = len(keys)
    if n:
        types = set(map(type, keys))
        if len(types) == 1:
            t = types.pop()
            try:
                if t is str:
                    return _encode_strings(pa.array(keys, pa.string()))
                if t is int:
                    return _encode_int64(np.fromiter(keys, dtype=np.int64, count=n))
                if t is float:
                    return _encode_float64(np.fromiter(keys, dtype=np.float64, count=n))
            except (OverflowError, UnicodeError, pa.ArrowException):
                pass  # huge ints, lone surrogates: the per-key path handles them
    return pa.array([encode_key(k) for k in keys], pa.binary())


# ----------------------------------------------------------------------------------------
# Exact values: a type tag column and a binary payload column give back the very value
# ----------------------------------------------------------------------------------------

_V_NONE, _V_BOOL, _V_INT, _V_FLOAT, _V_STR, _V_BYTES, _V_PICKLE = range(7)
_VCODE = {_NoneType: _V_NONE, bool: _V_BOOL, int: _V_INT, float: _V_FLOAT, str: _V_STR,
          bytes: _V_BYTES}


def tag_column(name: str) -> str:
    """The name of the type-tag column that goes with exact-encoded column ``name``."""
    return f"__mr_{name}_t"


def _encode_one(v: Any) -> tuple[int, bytes | None]:
    t = type(v)
    if t is str:
        try:
            return _V_STR, v.encode("utf-8")
        except UnicodeError:
            return _V_PICKLE, pickle.dumps(v, protocol=4)
    if t is int:
        if _I64_MIN <= v <= _I64_MAX:
            return _V_INT, v.to_bytes(8, "little", signed=True)
        return _V_PICKLE, pickle.dumps(v, protocol=4)
    if t is float:
        return _V_FLOAT, struct.pack("<d", v)
    if v is None:
        return _V_NONE, None
    if t is bool:
        return _V_BOOL, b"\x01" if v else b"\x00"
    if t is bytes:
        return _V_BYTES, v
    return _V_PICKLE, pickle.dumps(v, protocol=4)


def encode_values(values: list[Any]) -> tuple[pa.Array, pa.Array]:
    """Exact encoding of Python values: (int8 type tags, binary payloads); vectorized when
    the values share one of the types int, float, str, bytes, bool or None."""
    n = len(values)
    types = set(map(type, values))
    if len(types) == 1:
        t = types.pop()
        code = _VCODE.get(t, _V_PICKLE)
        payload: pa.Array | None = None
        try:
            if code == _V_INT:
                payload = _binary_from_fixed(
                    np.fromiter(values, dtype=np.int64, count=n).astype("<i8").view(np.uint8)
                    .reshape(n, 8), 8)
            elif code == _V_FLOAT:
                payload = _binary_from_fixed(
                    np.fromiter(values, dtype=np.float64, count=n).astype("<f8").view(np.uint8)
                    .reshape(n, 8), 8)
            elif code == _V_STR:
                payload = pa.array(values, pa.string()).cast(pa.binary())
            elif code == _V_BYTES:
                payload = pa.array(values, pa.binary())
            elif code == _V_NONE:
                payload = pa.nulls(n, pa.binary())
        except (OverflowError, UnicodeError, pa.ArrowException):
            payload = None
        if payload is not None:
            return pa.array(np.full(n, code, dtype=np.int8)), payload
    codes = np.empty(n, dtype=np.int8)
    out: list[bytes | None] = [None] * n
    for i, v in enumerate(values):
        codes[i], out[i] = _encode_one(v)
    return pa.array(codes), pa.array(out, pa.binary())


def _decode_one(code: int, raw: bytes | None) -> Any:
    if code == _V_STR:
        return raw.decode("utf-8")
    if code == _V_INT:
        return int.from_bytes(raw, "little", signed=True)
    if code == _V_FLOAT:
        return struct.unpack("<d", raw)[0]
    if code == _V_NONE:
        return None
    if code == _V_BOOL:
        return raw == b"\x01"
    if code == _V_BYTES:
        return raw
    if code == _V_PICKLE:
        return pickle.loads(raw)
    raise ValueError(f"corrupt MapReduce value encoding: type tag {code}")


def _fixed_payload(payload: pa.Array, dtype: str) -> list[Any] | None:
    n = len(payload)
    if payload.null_count:
        return None
    offsets = np.frombuffer(payload.buffers()[1], dtype=np.int32)[payload.offset:
                                                                   payload.offset + n + 1]
    lo, hi = int(offsets[0]), int(offsets[-1])
    if hi - lo != 8 * n or (np.diff(offsets) != 8).any():
        return None
    data = np.frombuffer(payload.buffers()[2], dtype=np.uint8)[lo:hi]
    return data.view(dtype).tolist()


def decode_values(tags: pa.Array | pa.ChunkedArray, payload: pa.Array | pa.ChunkedArray
                  ) -> list[Any]:
    """The Python values of an exact encoding (see :func:`encode_values`)."""
    if isinstance(payload, pa.ChunkedArray):
        payload = payload.combine_chunks()
    if isinstance(tags, pa.ChunkedArray):
        tags = tags.combine_chunks()
    n = len(payload)
    if n == 0:
        return []
    codes = tags.to_numpy(zero_copy_only=False)
    first = int(codes[0])
    if (codes == first).all():
        if first == _V_STR:
            return payload.cast(pa.string()).to_pylist()
        if first in (_V_INT, _V_FLOAT):
            got = _fixed_payload(payload, "<i8" if first == _V_INT else "<f8")
            if got is not None:
                return got
        elif first == _V_BYTES:
            return payload.to_pylist()
        elif first == _V_NONE:
            return [None] * n
        elif first == _V_PICKLE:
            return [pickle.loads(b) for b in payload.to_pylist()]
    return [_decode_one(c, raw) for c, raw in zip(codes.tolist(), payload.to_pylist())]


def encoded_columns(name: str, values: list[Any]) -> tuple[list[pa.Array], list[str]]:
    """The payload and tag columns of an exact-encoded column."""
    tags, payload = encode_values(values)
    return [payload, tags], [name, tag_column(name)]


def column_values(arr: pa.Array | pa.ChunkedArray, field: pa.Field | None) -> list[Any]:
    """Python values of a column, unpickling columns marked pickled."""
    if field is None:
        return arr.to_pylist()
    return column_to_pylist(arr, field)


# ----------------------------------------------------------------------------------------
# Natural output columns (the job's final result)
# ----------------------------------------------------------------------------------------

_SCALAR_TYPES = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_(),
                 bytes: pa.binary()}
_PICKLED = pa.binary()


def natural_type(values: list[Any]) -> pa.DataType | None:
    """The Arrow type that holds ``values`` exactly, or None (they must be pickled)."""
    types = set(map(type, values))
    types.discard(_NoneType)
    if not types:
        return pa.null()
    if len(types) != 1:
        return None
    t = types.pop()
    if t in _SCALAR_TYPES:
        return _SCALAR_TYPES[t]
    if t is list:
        inner = {type(x) for v in values if v is not None for x in v}
        inner.discard(_NoneType)
        if not inner:
            return pa.list_(pa.null())
        if len(inner) == 1:
            it = inner.pop()
            if it in _SCALAR_TYPES:
                return pa.list_(_SCALAR_TYPES[it])
    return None


def _is_nullish(t: pa.DataType) -> bool:
    return pa.types.is_null(t) or (pa.types.is_list(t) and pa.types.is_null(t.value_type))


def pickled_array(values: list[Any]) -> pa.Array:
    """Values pickled into a binary array (None stays null)."""
    return pa.array([None if v is None else pickle.dumps(v, protocol=4) for v in values],
                    pa.binary())


class ColumnTyper:
    """Types one output column: the first typed batch fixes the Arrow type for the task.

    A later batch that does not fit is pickled (the engine then unifies the column to a
    pickled one) or, when ``strict`` (Parquet output needs one type per file), raises.
    """

    def __init__(self, name: str, strict: bool = False) -> None:
        self.name = name
        self.strict = strict
        self.type: pa.DataType | None = None
        self.pickled = False

    def field_and_array(self, values: list[Any]) -> tuple[pa.Field, pa.Array]:
        """An Arrow field and array for one batch of this column's values."""
        if self.pickled:
            return self._pickled(values)
        t = natural_type(values)
        if self.type is not None and (t is None or not (t == self.type or _is_nullish(t))):
            return self._mismatch(values, t)
        target = self.type or t
        if target is None:  # mixed types from the start: pickled for the whole task
            self.pickled = True
            return self._pickled(values)
        try:
            arr = pa.array(values, target)
        except (OverflowError, UnicodeError, pa.ArrowException):
            if self.type is None:  # e.g. ints beyond int64 in the first batch
                self.pickled = True
                return self._pickled(values)
            return self._mismatch(values, None)
        if self.type is None and not _is_nullish(target):
            self.type = target
        return pa.field(self.name, target), arr

    def _mismatch(self, values: list[Any], t: pa.DataType | None) -> tuple[pa.Field, pa.Array]:
        if self.strict:
            sample = next((v for v in values if v is not None), None)
            raise SchemaError(
                f"MapReduce output column {self.name!r} holds {self.type} values, then a batch "
                f"of {t if t is not None else 'mixed-type'} values (e.g. {sample!r}); Parquet "
                f"needs one type per column: yield values of one type, or write text output")
        return self._pickled(values)

    def _pickled(self, values: list[Any]) -> tuple[pa.Field, pa.Array]:
        return pa.field(self.name, pa.binary(), metadata={PICKLED_KEY: b"1"}), pickled_array(values)


# ----------------------------------------------------------------------------------------
# Input records
# ----------------------------------------------------------------------------------------

def input_pairs(batch: pa.RecordBatch) -> tuple[list[Any], list[Any]]:
    """The (key, value) records of an input batch.

    Exact-encoded ``key`` and ``value`` (from the previous step): those. Columns ``key``
    and ``value``: those. Text read with offsets (``text``, ``path``,
    ``offset``): key ``(path, byte offset)``, value the line. One column: key None, value
    the column's value. Otherwise key None, value the row as a dict.
    """
    names = batch.schema.names
    n = batch.num_rows
    schema = batch.schema
    kt, vt = tag_column("key"), tag_column("value")
    if kt in names and vt in names:
        return (decode_values(batch.column(names.index(kt)), batch.column(names.index("key"))),
                decode_values(batch.column(names.index(vt)), batch.column(names.index("value"))))
    if "key" in names and "value" in names:
        ki, vi = names.index("key"), names.index("value")
        return (column_values(batch.column(ki), schema.field(ki)),
                column_values(batch.column(vi), schema.field(vi)))
    if "text" in names and "path" in names and "offset" in names:
        texts = batch.column(names.index("text")).to_pylist()
        offsets = batch.column(names.index("offset")).to_pylist()
        paths = batch.column(names.index("path"))
        if n and pc.count_distinct(paths).as_py() == 1 and paths.null_count == 0:
            p = paths[0].as_py()
            return [(p, o) for o in offsets], texts
        return list(zip(paths.to_pylist(), offsets)), texts
    if batch.num_columns == 1:
        return [None] * n, column_values(batch.column(0), schema.field(0))
    return [None] * n, batch_to_rows(batch)


# ----------------------------------------------------------------------------------------
# Operators
# ----------------------------------------------------------------------------------------

class PairError(TypeError):
    """A mapper, combiner or reducer yielded something that is not a (key, value) pair."""


def _pair_error(role: str, item: Any) -> PairError:
    text = repr(item)
    if len(text) > 200:
        text = text[:200] + "..."
    return PairError(f"{role} must yield (key, value) pairs; it yielded {text} "
                     f"({type(item).__name__})")


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def partition_representatives(n: int) -> np.ndarray:
    """For each partition p < n, an int64 value that hash partitioning sends to p."""
    from millstream.core.hashing import partition_ids

    reps = np.full(n, -1, dtype=np.int64)
    start, size = 0, max(64, 8 * n)
    while (reps < 0).any():
        cand = np.arange(start, start + size, dtype=np.int64)
        pids = partition_ids([pa.array(cand)], len(cand), n)
        missing = reps < 0
        for p in np.flatnonzero(missing):
            hit = np.flatnonzero(pids == p)
            if len(hit):
                reps[p] = cand[hit[0]]
        start += size
        if start > 1 << 40:  # pragma: no cover - would mean a broken hash
            raise RuntimeError(f"no value hashes to some of {n} partitions")
    return reps


_NO_KEY = object()


class _StepOperator(Operator):
    """Shared by the mapper and reducer operators: the job's step and its counters."""

    role = "step"

    def __init__(self, payload: bytes, step: int, label: str, output: str,
                 num_reducers: int = 1, strict_types: bool = False) -> None:
        super().__init__(f"{label} step {step + 1} {self.role}")
        if output not in ("shuffle", "exact", "final"):
            raise PlanError(f"unknown MapReduce output mode {output!r}")
        self.payload = payload
        self.step = step
        self.label = label
        self.output = output
        self.num_reducers = num_reducers
        self.strict_types = strict_types
        self.counts: dict[str, int] = {}

    def open(self, ctx: TaskContext) -> None:
        import cloudpickle

        super().open(ctx)
        job, steps = cloudpickle.loads(self.payload)
        self.job = job
        self.spec = steps[self.step]
        if job is not None:
            job._mr_task_context = ctx
        self.batch_rows = max(1024, min(ctx.batch_size, 65536))
        self.key_typer = ColumnTyper("key", self.strict_types)
        self.value_typer = ColumnTyper("value", self.strict_types)
        self.partitioner: Callable[[Any, int], int] | None = None
        self.reps: np.ndarray | None = None
        if self.output == "shuffle" and getattr(self.spec, "partitioner", None) is not None:
            self.partitioner = self.spec.partitioner
            self.reps = partition_representatives(self.num_reducers)

    def _count(self, name: str, n: int) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def _flush_counts(self) -> None:
        if self.ctx is None:
            return
        for name, n in self.counts.items():
            if n:
                self.ctx.increment_counter(COUNTER_GROUP, f"step {self.step + 1} {name}", n)
        self.counts = {}

    def _call(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:
            raise UserCodeFailure(self.name, function_name(fn), exc, f"<{what}>") from exc

    def _collect(self, role: str, fn: Callable[..., Any], res: Any, ak: Callable[[Any], None],
                 av: Callable[[Any], None], record: Any, key: Any = _NO_KEY) -> None:
        """Append the pairs a hook or reducer returned; wrap its errors."""
        try:
            if res is not None:
                for item in res:
                    try:
                        k, v = item
                    except (TypeError, ValueError):
                        raise _pair_error(role, item) from None
                    ak(k)
                    av(v)
        except Exception as exc:
            if key is not _NO_KEY:
                record = f"key {_short(key)}"
            raise UserCodeFailure(self.name, function_name(fn), exc, record) from exc

    def _batches(self, keys: list[Any], values: list[Any]) -> Iterator[pa.RecordBatch]:
        """Output batches of pairs in this operator's output mode."""
        step = self.batch_rows
        for lo in range(0, len(keys), step):
            ks, vs = keys[lo:lo + step], values[lo:lo + step]
            if self.output == "shuffle":
                yield self._shuffle_batch(ks, vs)
            elif self.output == "exact":
                ka, kn = encoded_columns("key", ks)
                va, vn = encoded_columns("value", vs)
                yield pa.RecordBatch.from_arrays(ka + va, names=kn + vn)
            else:
                kf, ka = self.key_typer.field_and_array(ks)
                vf, va = self.value_typer.field_and_array(vs)
                yield pa.RecordBatch.from_arrays([ka, va], schema=pa.schema([kf, vf]))

    def _shuffle_batch(self, keys: list[Any], values: list[Any]) -> pa.RecordBatch:
        va, vn = encoded_columns("value", values)
        arrays = [encode_keys(keys), *va]
        names = [KEY_COLUMN, *vn]
        if self.partitioner is not None:
            arrays.append(pa.array(self.reps[self._partitions(keys)]))
            names.append(PART_COLUMN)
        return pa.RecordBatch.from_arrays(arrays, names=names)

    def _partitions(self, keys: list[Any]) -> np.ndarray:
        fn, n = self.partitioner, self.num_reducers
        try:
            parts = [fn(k, n) for k in keys]
        except Exception as exc:
            raise UserCodeFailure(self.name, function_name(fn), exc, "<partitioner>") from exc
        try:
            arr = np.asarray(parts, dtype=np.int64)
            bad = (arr < 0) | (arr >= n)
            ok = not bad.any() and all(type(p) is int or isinstance(p, np.integer) for p in parts)
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            i = next(i for i, p in enumerate(parts)
                     if not (isinstance(p, (int, np.integer)) and not isinstance(p, bool)
                             and 0 <= p < n))
            err = ValueError(f"partitioner must return an int in [0, {n}) for every key; it "
                             f"returned {parts[i]!r} for key {_short(keys[i])}")
            raise UserCodeFailure(self.name, function_name(fn), err, _short(keys[i]))
        return arr


class MapperOp(_StepOperator):
    """Runs one step's mapper (with its init/final hooks) and combiner over a map task."""

    role = "map"

    def open(self, ctx: TaskContext) -> None:
        super().open(ctx)
        spec = self.spec
        self.mapper = spec.mapper or _identity_mapper
        self.combiner = spec.combiner if self.output == "shuffle" else None
        self.started = False
        self.keys: list[Any] = []
        self.values: list[Any] = []
        self.groups: dict[Any, list[Any]] = {}
        self.buffered = 0
        # values held for the combiner before it runs (Hadoop's sort buffer)
        self.combine_limit = max(10_000, min(1_000_000, ctx.memory_budget // 256))

    def _start(self) -> None:
        self.started = True
        if self.spec.mapper_init is not None:
            self._call("mapper_init", self.spec.mapper_init)
        if self.combiner is not None and self.spec.combiner_init is not None:
            self._call("combiner_init", self.spec.combiner_init)

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        if batch.num_rows == 0:
            return _EMPTY
        return self._map(batch)

    def _map(self, batch: pa.RecordBatch) -> Iterator[pa.RecordBatch]:
        if not self.started:
            self._start()
        keys, values = input_pairs(batch)
        self._count("map input records", len(keys))
        if self.combiner is not None:
            yield from self._map_combining(keys, values)
        else:
            yield from self._map_plain(keys, values)

    def _map_plain(self, keys: list[Any], values: list[Any]) -> Iterator[pa.RecordBatch]:
        """Run the mapper; emit a batch whenever ``batch_rows`` pairs are buffered."""
        mapper = self.mapper
        out_k, out_v = self.keys, self.values
        ak, av = out_k.append, out_v.append
        limit = self.batch_rows
        records = zip(keys, values)
        k = v = None
        while True:
            done = True
            try:
                for k, v in records:
                    res = mapper(k, v)
                    if res is not None:
                        for item in res:
                            try:
                                k2, v2 = item
                            except (TypeError, ValueError):
                                raise _pair_error("mapper", item) from None
                            ak(k2)
                            av(v2)
                    if len(out_k) >= limit:
                        done = False
                        break
            except Exception as exc:
                raise UserCodeFailure(self.name, function_name(mapper), exc,
                                      _short((k, v))) from exc
            if len(out_k) >= limit:
                yield from self._emit_plain()
                out_k, out_v = self.keys, self.values
                ak, av = out_k.append, out_v.append
            if done:
                return

    def _emit_plain(self) -> Iterator[pa.RecordBatch]:
        keys, values = self.keys, self.values
        self.keys, self.values = [], []
        self._count("map output records", len(keys))
        yield from self._batches(keys, values)

    def _map_combining(self, keys: list[Any], values: list[Any]) -> Iterator[pa.RecordBatch]:
        """Run the mapper, grouping its pairs by key; run the combiner when the buffer fills."""
        mapper = self.mapper
        groups = self.groups
        get = groups.get
        limit = self.combine_limit
        n = self.buffered
        records = zip(keys, values)
        k = v = None
        while True:
            done = True
            try:
                for k, v in records:
                    res = mapper(k, v)
                    if res is not None:
                        for item in res:
                            try:
                                k2, v2 = item
                            except (TypeError, ValueError):
                                raise _pair_error("mapper", item) from None
                            t = type(k2)
                            # str and int keys group as themselves; others by their encoding
                            # (so that 1, 1.0 and True stay three keys, as in the shuffle)
                            gk = k2 if t is str or t is int else encode_key(k2)
                            lst = get(gk)
                            if lst is None:
                                groups[gk] = [k2, v2]
                            else:
                                lst.append(v2)
                            n += 1
                    if n >= limit:
                        done = False
                        break
            except Exception as exc:
                self.buffered = n
                raise UserCodeFailure(self.name, function_name(mapper), exc,
                                      _short((k, v))) from exc
            self.buffered = n
            if n >= limit:
                yield from self._combine()
                groups = self.groups
                get = groups.get
                n = 0
            if done:
                return

    def _group(self, keys: list[Any], values: list[Any]) -> None:
        groups = self.groups
        for k, v in zip(keys, values):
            t = type(k)
            gk = k if t is str or t is int else encode_key(k)
            lst = groups.get(gk)
            if lst is None:
                groups[gk] = [k, v]
            else:
                lst.append(v)
        self.buffered += len(keys)

    def _combine(self) -> Iterator[pa.RecordBatch]:
        groups, self.groups = self.groups, {}
        self._count("map output records", self.buffered)
        self._count("combine input records", self.buffered)
        self.buffered = 0
        combiner = self.combiner
        ok: list[Any] = []
        ov: list[Any] = []
        ak, av = ok.append, ov.append
        for lst in groups.values():
            key = lst[0]
            self._collect("combiner", combiner, self._call_reducer(combiner, key, lst), ak, av,
                          None, key)
        del groups
        self._count("combine output records", len(ok))
        yield from self._batches(ok, ov)

    def _call_reducer(self, fn: Callable[..., Any], key: Any, lst: list[Any]) -> Any:
        try:
            return fn(key, itertools.islice(lst, 1, None))
        except Exception as exc:
            raise UserCodeFailure(self.name, function_name(fn), exc, f"key {_short(key)}") from exc

    def finish(self) -> Batches:
        return self._finish()

    def _finish(self) -> Iterator[pa.RecordBatch]:
        if not self.started:
            self._start()
        spec = self.spec
        if spec.mapper_final is not None:
            self._collect("mapper_final", spec.mapper_final,
                          self._call("mapper_final", spec.mapper_final),
                          self.keys.append, self.values.append, "<mapper_final>")
        if self.combiner is None:
            yield from self._emit_plain()
        else:
            keys, values = self.keys, self.values
            self.keys, self.values = [], []
            self._group(keys, values)
            yield from self._combine()
        if self.combiner is not None and spec.combiner_final is not None:
            ok: list[Any] = []
            ov: list[Any] = []
            self._collect("combiner_final", spec.combiner_final,
                          self._call("combiner_final", spec.combiner_final),
                          ok.append, ov.append, "<combiner_final>")
            self._count("combine output records", len(ok))
            yield from self._batches(ok, ov)
        self._flush_counts()

    def describe(self) -> str:
        spec = getattr(self, "spec", None) or self._load_spec()
        names = [f"mapper={function_name(spec.mapper)}" if spec and spec.mapper else "identity mapper"]
        if spec is not None and spec.combiner is not None and self.output == "shuffle":
            names.append(f"combiner={function_name(spec.combiner)}")
        return f"MapReduce {self.label} step {self.step + 1} map ({', '.join(names)})"

    def _load_spec(self) -> Any:
        import cloudpickle

        try:
            return cloudpickle.loads(self.payload)[1][self.step]
        except Exception:  # noqa: BLE001 - describe() must not fail
            return None


def _identity_mapper(key: Any, value: Any) -> Iterable[tuple[Any, Any]]:
    return ((key, value),)


class _GroupCursor:
    """Walks a key-sorted batch stream one group at a time; values stream across batches."""

    def __init__(self, batches: Iterable[pa.RecordBatch]) -> None:
        self._it = iter(batches)
        self.rows = 0
        self._keys: list[bytes] = []
        self._starts: list[int] = []
        self._vals: list[Any] = []
        self._g = 0
        self.advanced = False
        self._load()

    def _load(self) -> bool:
        for b in self._it:
            n = b.num_rows
            if n == 0:
                continue
            names = b.schema.names
            keys = b.column(names.index(KEY_COLUMN))
            if n > 1:
                neq = pc.not_equal(keys.slice(1), keys.slice(0, n - 1))
                cut = (np.flatnonzero(neq.to_numpy(zero_copy_only=False)) + 1).tolist()
            else:
                cut = []
            starts = [0, *cut]
            self._keys = keys.take(pa.array(starts, pa.int64())).to_pylist()
            self._starts = [*starts, n]
            self._vals = decode_values(b.column(names.index(tag_column("value"))),
                                       b.column(names.index("value")))
            self._g = 0
            self.rows += n
            return True
        self._keys, self._starts, self._vals, self._g = [], [], [], 0
        return False

    def key(self) -> bytes | None:
        """The encoded key of the current group, or None at the end."""
        return self._keys[self._g] if self._g < len(self._keys) else None

    def _next(self, key: bytes) -> bool:
        """Advance past the current piece of group ``key``; True if the group goes on."""
        g = self._g
        if g + 1 < len(self._keys):
            self._g = g + 1
            return False
        if not self._load():
            return False
        return self._keys[0] == key

    def values(self, key: bytes) -> Iterator[Any]:
        """The values of group ``key``, read lazily (pulls further batches as needed)."""
        while True:
            g = self._g
            yield from self._vals[self._starts[g]:self._starts[g + 1]]
            more = self._next(key)
            if not more:
                self.advanced = True
                return

    def skip(self, key: bytes) -> None:
        """Move past the rest of group ``key`` without reading its values."""
        while self._next(key):
            pass
        self.advanced = True


class ReducerOp(_StepOperator):
    """Sorts a reduce partition by key (external merge) and runs the reducer group by group."""

    role = "reduce"

    def open(self, ctx: TaskContext) -> None:
        super().open(ctx)
        self.sort = Sort([KEY_COLUMN], [False])
        self.sort.open(ctx)

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        if PART_COLUMN in batch.schema.names:
            batch = batch.drop_columns([PART_COLUMN])
        return self.sort.process(batch)

    def finish(self) -> Batches:
        return self._reduce()

    def _reduce(self) -> Iterator[pa.RecordBatch]:
        spec = self.spec
        reducer = spec.reducer
        if spec.reducer_init is not None:
            self._call("reducer_init", spec.reducer_init)
        ok: list[Any] = []
        ov: list[Any] = []
        ak, av = ok.append, ov.append
        limit = self.batch_rows
        cursor = _GroupCursor(self.sort.finish())
        groups = 0
        while True:
            kb = cursor.key()
            if kb is None:
                break
            groups += 1
            key = decode_key(kb)
            cursor.advanced = False
            values = cursor.values(kb)
            try:
                try:
                    res = reducer(key, values)
                except Exception as exc:
                    raise UserCodeFailure(self.name, function_name(reducer), exc,
                                          f"key {_short(key)}") from exc
                self._collect("reducer", reducer, res, ak, av, None, key)
            finally:
                values.close()
            if not cursor.advanced:
                cursor.skip(kb)
            if len(ok) >= limit:
                self._count("reduce output records", len(ok))
                yield from self._batches(ok, ov)
                ok, ov = [], []
                ak, av = ok.append, ov.append
        if spec.reducer_final is not None:
            self._collect("reducer_final", spec.reducer_final,
                          self._call("reducer_final", spec.reducer_final), ak, av,
                          "<reducer_final>")
        self._count("reduce input groups", groups)
        self._count("reduce input records", cursor.rows)
        self._count("reduce output records", len(ok))
        yield from self._batches(ok, ov)
        self._flush_counts()

    def close(self) -> None:
        self.sort.close()

    def describe(self) -> str:
        return f"MapReduce {self.label} step {self.step + 1} reduce (external sort by key)"
