"""The canonical, order-preserving byte encoding of MapReduce keys.

The map side puts each key's encoding in the shuffle's key column; the engine
hash-partitions on it, the reduce side sorts by it, so equal keys meet and groups come
in key order.

Key order (canonical encoding): keys are ordered first by type, ``None < bool < int <
float < str < bytes < tuple < list < dict < set < frozenset < other``, then by value
(numbers numerically, strings by code point, containers element by element, dicts by
their sorted items); ``1`` and ``1.0`` are different keys; ``-0.0`` is ``0.0``; all NaNs
are one key. Any other object is keyed by its pickle: such keys are equal when their
pickles are equal, and ordered by those bytes.
"""

from __future__ import annotations

import pickle
import struct
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_T_NONE, _T_FALSE, _T_TRUE = b"\x01", b"\x02", b"\x03"
_T_BIGNEG, _T_INT, _T_BIGPOS = 0x0F, 0x10, 0x11
_T_FLOAT, _T_STR, _T_BYTES = 0x20, 0x30, 0x40
_T_TUPLE, _T_LIST, _T_DICT, _T_SET, _T_FROZENSET, _T_OTHER = 0x50, 0x51, 0x60, 0x61, 0x62, 0x70
_END = b"\x00"
#: The int64 range (ints beyond it take a longer encoding).
I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1
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
    if I64_MIN <= k <= I64_MAX:
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


def binary_from_fixed(data: np.ndarray, width: int) -> pa.Array:
    """A binary array of ``width``-byte values from the rows of a uint8 matrix (no copies)."""
    n = data.shape[0]
    offsets = np.arange(0, width * (n + 1), width, dtype=np.int32)
    return pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets),
                                                  pa.py_buffer(np.ascontiguousarray(data))])


def _encode_int64(a: np.ndarray) -> pa.Array:
    u = (a.view(np.uint64) ^ np.uint64(_SIGN)).astype(">u8")
    buf = np.empty((len(a), 9), dtype=np.uint8)
    buf[:, 0] = _T_INT
    buf[:, 1:] = u.view(np.uint8).reshape(len(a), 8)
    return binary_from_fixed(buf, 9)


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
    return binary_from_fixed(buf, 9)


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
