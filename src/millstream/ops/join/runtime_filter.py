"""Runtime join filters (semi-join reduction, as Spark's and DuckDB's runtime filters):
before the big side of a shuffle join is shuffled, rows whose join key is not among the
keys of the (already computed) small side are dropped, since no row of the other side can
match them.

:class:`KeyFilter` reads the small side's whole output (as a broadcast join does), builds
a membership test per key column (a bitmap over the key range for integers, Arrow's
``is_in`` otherwise) once per worker process, and keeps the rows whose every key is in
it. A row with a null key is dropped (it never matches an equi-join); a task whose first
rows nearly all pass stops testing (``TRIAL_ROWS``). The batch scheduler
inserts it (``runtime.scheduler``, adaptive execution) only where the join type lets the
rows go: the right side of inner, left, semi and anti joins, the left side of inner, right
and semi joins.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from millstream.core.shuffle import read_block
from millstream.ops.base import Batches, Operator
from millstream.ops.join.hash_join import _BuiltSides
from millstream.ops.join.index import JoinIndex
from millstream.ops.join.keys import canonical_type, key_column, unified_type

#: counter of the rows a runtime filter dropped
DROPPED_COUNTER = ("millstream", "runtime_filter_rows_dropped")
#: a task stops testing once it has tested this many rows and dropped under 1 in
#: MIN_DROPPED of them (every key of a foreign-key join matches: the test only costs)
TRIAL_ROWS = 200_000
MIN_DROPPED = 8
#: an integer key range up to this many values is tested with a bitmap of one byte a
#: value, up to ``_MAX_BITS`` with one bit a value (32 MB); a wider range (or another key
#: type) with a join index built once (Arrow's ``is_in`` hashes its whole value set again
#: on every call: TPC-H SF10's order keys span 60M values, and testing 38M lineitem rows
#: against 574k orders with ``is_in`` took 30 s)
_MAX_BITMAP = 1 << 25
_MAX_BITS = 1 << 28


class KeyMembership:
    """Whether values are among a set of keys (nulls never are)."""

    def __init__(self, keys: pa.ChunkedArray) -> None:
        self.bitmap: np.ndarray | None = None
        self.packed = False  # ``bitmap`` holds a bit a value (little-endian bit order)
        self.lo = 0
        self.values: pa.Array | None = None
        self.index: JoinIndex | None = None
        self.key_type: pa.DataType | None = None
        keys = keys.filter(pc.is_valid(keys)) if keys.null_count else keys
        if pa.types.is_integer(keys.type):
            v = np.concatenate([c.to_numpy() for c in keys.chunks]) if keys.num_chunks \
                else np.zeros(0, np.int64)
            if len(v) == 0:
                self.bitmap = np.zeros(0, dtype=bool)
                return
            lo, hi = int(v.min()), int(v.max())
            if hi - lo < _MAX_BITS:
                self.lo = lo
                self.packed = hi - lo >= _MAX_BITMAP
                self.bitmap = _bits(v - lo, hi - lo + 1) if self.packed else \
                    np.zeros(hi - lo + 1, dtype=bool)
                if not self.packed:
                    self.bitmap[v - lo] = True
                return
        self.key_type = canonical_type(keys.type)
        col = key_column(keys, self.key_type)
        self.index = JoinIndex([col], len(col))
        if self.index.encoder is not None and not self.index.pure:
            self.index = None  # (two keys share a hash: is_in tells them apart)
        if self.index is None:
            self.values = pc.unique(col)

    def contains(self, arr: pa.Array) -> np.ndarray | None:
        """A boolean mask of ``arr``'s values in the set; None when it cannot tell (a type
        the set cannot be compared with): every row is then kept."""
        if self.bitmap is not None and pa.types.is_integer(arr.type):
            return self._in_bitmap(arr)
        try:
            if self.index is not None and self.key_type is not None and self.key_type == \
                    unified_type(canonical_type(arr.type), self.key_type):
                count, _, check = self.index.lookup([key_column(arr, self.key_type)], len(arr))
                if check is None:
                    return count > 0
            values = self.values
            if values is None:
                if self.index is None:
                    return None
                enc = self.index.encoder
                values = self.values = pc.unique(enc.build_cols[0]) if enc is not None \
                    else pa.array([], self.key_type)
            if values.type != arr.type:
                values = values.cast(arr.type)
            out = pc.is_in(arr, value_set=values, skip_nulls=True)
            return out.fill_null(False).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            return None

    def _in_bitmap(self, arr: pa.Array) -> np.ndarray:
        """:meth:`contains` of integers, looked up in the bitmap over the key range."""
        bitmap = self.bitmap
        assert bitmap is not None
        n = len(arr)
        if len(bitmap) == 0:
            return np.zeros(n, dtype=bool)
        v = arr.fill_null(0).to_numpy() if arr.null_count else arr.to_numpy()
        v = v.astype(np.int64, copy=False) - self.lo
        span = len(bitmap) * 8 if self.packed else len(bitmap)
        inside = (v >= 0) & (v < span)
        at = np.where(inside, v, 0)
        if self.packed:
            hit = (bitmap[at >> 3] >> (at & 7).astype(np.uint8)) & 1
            mask = inside & hit.astype(bool)
        else:
            mask = inside & bitmap[at]
        if arr.null_count:
            mask &= arr.is_valid().to_numpy(zero_copy_only=False)
        return mask


def _bits(offsets: np.ndarray, span: int) -> np.ndarray:
    """A bitmap (a bit a value, little-endian bit order) of ``span`` values with the bits
    of ``offsets`` set, built without a byte-a-value array of the whole span (nor a sort
    of the offsets): one pass per bit position."""
    v = offsets.astype(np.int64, copy=False)
    out = np.zeros((span + 7) // 8, dtype=np.uint8)
    low = (v & 7).astype(np.uint8)
    for bit in range(8):
        out[v[low == bit] >> 3] |= np.uint8(1 << bit)
    return out


class _Sets:
    """The latest key sets built in this worker process (every task of a stage tests
    against the same small side)."""

    MAX_ENTRIES = 4

    def __init__(self) -> None:
        self.entries: OrderedDict[tuple, list[KeyMembership | None]] = OrderedDict()

    def get(self, blocks: list[Any] | None, keys: list[str]) -> list[KeyMembership | None]:
        key = _BuiltSides.key(blocks, "runtime filter", tuple(keys))
        hit = self.entries.get(key) if key is not None else None
        if hit is not None:
            self.entries.move_to_end(key)
            return hit
        columns: dict[str, list[pa.Array]] = {k: [] for k in keys}
        types: dict[str, pa.DataType] = {}
        for ref in blocks or []:
            for b in _key_batches(ref, keys):
                for k in keys:
                    i = b.schema.get_field_index(k)
                    if i >= 0:
                        types[k] = b.schema.field(i).type
                        if b.num_rows:
                            columns[k].append(b.column(i))
        sets: list[KeyMembership | None] = []
        for k in keys:
            try:
                sets.append(KeyMembership(pa.chunked_array(columns[k], types[k])))
            except (KeyError, pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                sets.append(None)  # (no such column or type: that key does not filter)
        if key is not None:
            self.entries[key] = sets
            while len(self.entries) > self.MAX_ENTRIES:
                self.entries.popitem(last=False)
        return sets


_SETS = _Sets()


def _key_batches(ref: Any, keys: list[str]) -> Any:
    """The batches of a materialized block, with only the ``keys`` columns decoded when it
    is a local IPC stream file (the small side's other columns are neither decompressed
    nor read); every column otherwise (a runner's own handle)."""
    path = getattr(ref, "path", None)
    if getattr(ref, "read", None) is not None or not isinstance(path, str):
        yield from read_block(ref)
        return
    try:
        with pa.memory_map(path, "r") as mm:
            schema = pa.ipc.open_stream(mm).schema
            fields = [i for i, name in enumerate(schema.names) if name in keys]
            mm.seek(0)
            reader = pa.ipc.open_stream(mm, options=pa.ipc.IpcReadOptions(
                included_fields=fields))
            got = False
            for b in reader:
                got = True
                yield b
            if not got:
                yield pa.RecordBatch.from_pylist([], schema=reader.schema)
    except (FileNotFoundError, OSError, pa.ArrowInvalid):
        yield from read_block(ref)  # (reports a block that is gone as the scheduler expects)


class KeyFilter(Operator):
    """Keeps the rows whose ``keys`` are all among the ``source_keys`` values of the small
    side's output ``blocks`` (see the module docstring)."""

    def __init__(self, keys: list[str], source_keys: list[str], broadcast_stage: Any = None,
                 blocks: list[Any] | None = None) -> None:
        super().__init__(f"RuntimeFilter({', '.join(keys)} in {', '.join(source_keys)})")
        self.keys = list(keys)
        self.source_keys = list(source_keys)
        self.blocks = blocks
        self.sets: list[KeyMembership | None] = []
        self.seen = 0  # rows tested, and dropped, in this task
        self.dropped = 0

    def open(self, ctx) -> None:
        super().open(ctx)
        self.sets = _SETS.get(self.blocks, self.source_keys)

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        if self.seen >= TRIAL_ROWS and self.dropped * MIN_DROPPED < self.seen:
            return (batch,)  # it keeps (nearly) every row: not worth testing the rest
        self.seen += batch.num_rows
        mask = None
        for k, s in zip(self.keys, self.sets):
            i = batch.schema.get_field_index(k)
            if s is None or i < 0:
                continue
            m = s.contains(batch.column(i))
            if m is not None:
                mask = m if mask is None else mask & m
        if mask is None:
            return (batch,)
        kept = int(mask.sum())
        if kept == batch.num_rows:
            return (batch,)
        self.dropped += batch.num_rows - kept
        if self.ctx is not None:
            self.ctx.increment_counter(*DROPPED_COUNTER, batch.num_rows - kept)
        return (batch.filter(pa.array(mask, pa.bool_())),)
