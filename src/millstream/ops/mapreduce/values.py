"""The exact encoding of MapReduce values: a type-tag column and a binary payload column.

A value travels as a binary payload (column ``value``) and a type tag (column
``__mr_value_t``: int64, double, UTF-8, bytes, bool, None or a pickle), so it comes back
as the very Python value the mapper yielded, whatever the other values of the task or
partition look like. Encoding and decoding are vectorized when a batch's values share one
of the plain types.
"""

from __future__ import annotations

import pickle
import struct
from typing import Any

import numpy as np
import pyarrow as pa

from millstream.core.arrow import column_to_pylist
from millstream.ops.mapreduce.keys import I64_MAX, I64_MIN, binary_from_fixed

_NoneType = type(None)

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
        if I64_MIN <= v <= I64_MAX:
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
                payload = binary_from_fixed(
                    np.fromiter(values, dtype=np.int64, count=n).astype("<i8").view(np.uint8)
                    .reshape(n, 8), 8)
            elif code == _V_FLOAT:
                payload = binary_from_fixed(
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
