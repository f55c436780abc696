"""Frame bounds: for every row of a sorted chunk, the half-open range ``[lo, hi)`` of the
rows its frame covers.

ROWS frames count positions. RANGE frames take the peer group for CURRENT ROW and, for
offsets, search the (single) order key's values: the frame of a row with key ``v`` holds
the rows of its partition with ``v + start <= key <= v + end`` (in the order's direction:
descending, "preceding" means larger keys). A row whose key is null or NaN has as frame
bound its peer group, as in SQL; other rows' offset frames never reach null or NaN keys.
The search is one ``lexsort`` of the rows and the queries together, for all partitions
of the chunk at once.
"""

from __future__ import annotations

import datetime as _dt

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from millstream.errors import SchemaError
from millstream.expr.analytic import Frame
from millstream.ops.analytic.kernels import Spans

_INT64_MAX = np.iinfo(np.int64).max
_INT64_MIN = np.iinfo(np.int64).min
_UNIT_MICROS = {"s": 1_000_000, "ms": 1_000, "us": 1}


def _temporal_unit(t: pa.DataType) -> str | None:
    """The unit offsets of a temporal key are counted in (None: not temporal)."""
    if pa.types.is_timestamp(t) or pa.types.is_duration(t) or pa.types.is_time(t):
        return t.unit
    if pa.types.is_date32(t):
        return "day"
    if pa.types.is_date64(t):
        return "ms"
    return None


def key_offset(offset: int | float | _dt.timedelta, key_type: pa.DataType,
               column: str) -> int | float:
    """A RANGE offset in the units of the order key (SchemaError when they do not fit)."""
    if not (pa.types.is_integer(key_type) or pa.types.is_floating(key_type)
            or pa.types.is_decimal(key_type) or _temporal_unit(key_type) is not None):
        raise SchemaError(f"a RANGE frame with offsets needs a numeric or temporal order key; "
                          f"{column!r} is {key_type}")
    unit = _temporal_unit(key_type)
    if isinstance(offset, _dt.timedelta):
        if unit is None:
            raise SchemaError(f"RANGE offset {offset} is a duration but the order key "
                              f"{column!r} is {key_type}; give a number")
        micros = offset // _dt.timedelta(microseconds=1)
        if unit == "day":
            if micros % 86_400_000_000:
                raise SchemaError(f"RANGE offset {offset} on the date column {column!r} must "
                                  f"be whole days")
            return micros // 86_400_000_000
        if unit == "ns":
            return micros * 1000
        per = _UNIT_MICROS[unit]
        if micros % per:
            raise SchemaError(f"RANGE offset {offset} is finer than the unit ({unit}) of "
                              f"{column!r}")
        return micros // per
    if unit is not None and unit != "day":
        raise SchemaError(f"RANGE offset {offset!r} on the temporal key {column!r} "
                          f"({key_type}): give a datetime.timedelta or a duration such as "
                          f"'-1h'")
    return offset


def check_frame(frame: Frame | None, order_types: list[tuple[str, pa.DataType]]) -> None:
    """Raise a SchemaError for a RANGE frame whose offsets the order key cannot take."""
    if frame is None or frame.kind != "range" or not frame.has_offsets:
        return
    column, key_type = order_types[0]
    for b in (frame.start, frame.end):
        if b is not None and not (isinstance(b, (int, float)) and b == 0):
            key_offset(b, key_type, column)


def frame_bounds(frame: Frame, seg: Spans, peer: Spans, order_key: pa.Array | None,
                 descending: bool, column: str) -> tuple[np.ndarray, np.ndarray]:
    """``lo``/``hi`` of every row's frame, within its partition (``hi >= lo``)."""
    n = len(seg.start)
    idx = np.arange(n, dtype=np.int64)
    if frame.kind == "rows":
        lo = seg.start if frame.start is None else \
            np.clip(idx + _clamp(frame.start, n), seg.start, seg.end)
        hi = seg.end if frame.end is None else \
            np.clip(idx + _clamp(frame.end, n) + 1, seg.start, seg.end)
        return lo, np.maximum(hi, lo)
    search = None
    if frame.has_offsets:
        assert order_key is not None
        search = _RangeSearch(order_key, descending, seg, column)
    lo = (seg.start if frame.start is None else peer.start if frame.start == 0
          else search.bound(frame.start, peer.start, right=False))
    hi = (seg.end if frame.end is None else peer.end if frame.end == 0
          else search.bound(frame.end, peer.end, right=True))
    return lo, np.maximum(hi, lo)


def _clamp(offset: int, n: int) -> int:
    return max(-n - 1, min(n + 1, offset))


class _RangeSearch:
    """Searches of key + offset among the non-special (not null, not NaN) keys of each
    partition, ``t`` the keys turned ascending (bitwise-not for ints, negation for floats
    when descending)."""

    def __init__(self, key: pa.Array, descending: bool, seg: Spans, column: str) -> None:
        self.type, self.column = key.type, column
        n = len(key)
        special = np.zeros(n, dtype=bool) if not key.null_count else \
            np.asarray(key.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        t = key.type
        if pa.types.is_floating(t) or pa.types.is_decimal(t) or pa.types.is_unsigned_integer(t):
            vals = np.asarray(key.cast(pa.float64()).fill_null(0.0).to_numpy(
                zero_copy_only=False), dtype=np.float64)
            special |= np.isnan(vals)
            vals = -vals if descending else vals
        else:
            if pa.types.is_integer(t):
                ints = key.cast(pa.int64())
            else:
                width = pa.int32() if t.bit_width == 32 else pa.int64()
                ints = key.view(width).cast(pa.int64())
            vals = np.asarray(ints.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
            vals = ~vals if descending else vals
        self.vals, self.special, self.seg = vals, special, seg
        # rows of a partition sort as: specials before the keys (0), keys (1), specials after (2)
        normal = ~special
        seen = np.cumsum(normal, dtype=np.int64)
        before_seg = seen[seg.start] - normal[seg.start]
        self.group = np.where(normal, 1, np.where(seen - before_seg > 0, 2, 0)).astype(np.int8)

    def _targets(self, offset: int | float) -> np.ndarray:
        off = key_offset(offset, self.type, self.column)
        vals = self.vals
        if vals.dtype == np.float64 or isinstance(off, float):
            return vals.astype(np.float64) + float(off)
        off = max(_INT64_MIN, min(_INT64_MAX, int(off)))
        with np.errstate(over="ignore"):
            out = vals + np.int64(off)
        if off > 0:
            out = np.where(out < vals, _INT64_MAX, out)
        elif off < 0:
            out = np.where(out > vals, _INT64_MIN, out)
        return out

    def bound(self, offset: int | float, peer_bound: np.ndarray, right: bool) -> np.ndarray:
        """Per row, the first position (of its partition's keys) whose key is >= (``right``:
        >) the row's key + ``offset``; special rows get ``peer_bound``."""
        n = len(self.vals)
        targets = self._targets(offset)
        keys = self.vals.astype(targets.dtype) if targets.dtype != self.vals.dtype else self.vals
        q = np.flatnonzero(~self.special)
        m = len(q)
        seg_ids = np.concatenate([self.seg.ids, self.seg.ids[q]])
        groups = np.concatenate([self.group, np.ones(m, dtype=np.int8)])
        values = np.concatenate([keys, targets[q]])
        # queries sort before equal keys for ">=", after them for ">"
        tie = np.concatenate([np.full(n, 0 if right else 1, dtype=np.int8),
                              np.full(m, 1 if right else 0, dtype=np.int8)])
        order = np.lexsort((tie, values, groups, seg_ids))
        is_row = order < n
        rows_before = np.cumsum(is_row, dtype=np.int64) - is_row
        out = peer_bound.copy()
        out[q[order[~is_row] - n]] = rows_before[~is_row]
        return out


def order_key_array(table: pa.Table, column: str) -> pa.Array:
    """An order key column as one array (for RANGE offset searches)."""
    arr = table.column(column)
    arr = arr.combine_chunks() if arr.num_chunks else pa.array([], arr.type)
    if pa.types.is_dictionary(arr.type):
        arr = pc.cast(arr, arr.type.value_type)
    return arr
