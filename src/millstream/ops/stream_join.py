"""Stream joins: interval join, window join, latest-value (temporal) join, stream-table join.

Key exchange
------------
Both inputs of a keyed stream join pass :class:`JoinKeys` first: it appends normalized
copies of the join keys as hidden columns ``__ms_jk0, __ms_jk1, ...`` (integers as int64,
timestamps and dates as int64 microseconds, floats as float64 with -0.0 = 0.0,
dictionaries decoded, decimals as canonical strings). The key exchange of both sides
hashes these hidden columns, so equal key values reach the same key group and the same
task even when the two sides type them differently (int32 vs int64, timestamp[ms] vs
timestamp[us]); the operators match rows on them too (after unifying the two sides'
types) and drop them from their output. Keys that cannot be compared (a string against
an integer) raise a :class:`~millstream.errors.SchemaError`. A null key never matches.

Event time and lateness (interval and window joins)
---------------------------------------------------
Event times are int64 microseconds (:func:`~millstream.core.arrow.event_time_micros`).
The operator's watermark ``W`` is the job's (the minimum over every source partition of
both inputs). A row whose event time is null goes to the side output ``"invalid"``.

* **Interval join** (Flink's ``intervalJoin().between(lower, upper)``): a left row ``l``
  and a right row ``r`` with equal keys join when
  ``l.time + lower <= r.time <= l.time + upper`` (both bounds inclusive). A pair is
  emitted as soon as its second row arrives. A row with ``time < W`` is *late* (side
  output ``"late"``, with a column ``join_side`` = "left"/"right"). A buffered left row
  is dropped once ``l.time + upper < W`` and a right row once ``r.time - lower < W``:
  from then on no row that is not late can match it, so every pair of rows that are
  not late is joined exactly once, whatever the arrival order and batch boundaries.
  Outer joins emit a row that found no partner (the other side's columns null) when it
  is dropped, or at once when its key is null.
* **Window join** (Flink's ``join().window(...)``): rows of both sides are assigned to
  tumbling or sliding windows of their event time; a left and a right row join when
  they share a key and a window; the window's pairs are emitted, with ``window_start``
  and ``window_end`` in front, when the watermark reaches the window's end
  (``end <= W``), as :class:`~millstream.ops.window.WindowAggregate` fires. A sliding
  pair appears once per window both rows share. A row all of whose windows have
  ``end <= W`` on arrival is late. Outer joins emit unmatched rows of a window when it
  fires.

Output rows carry their inputs' event times, which can be behind the watermark when they
are emitted (an interval pair when its second row arrives, an outer row when it is
dropped); an event-time window over a join's output should allow that much lateness.

In batch mode (bounded inputs, no watermarks) nothing is late: both inputs are read,
then ``finish()`` completes every interval and window, so a bounded pipeline gives the
streaming result whenever no row was late in the stream.

Latest-value join (:class:`LatestJoin`)
---------------------------------------
The right input is a changelog: each row upserts the row of its key. Each left row is
joined with the right row its key holds *when the left row is processed*, and emitted at
once (Flink's processing-time temporal join, ``FOR SYSTEM_TIME AS OF`` a processing-time
attribute). Results depend on how left and right rows interleave; in batch mode the
right input is read completely first, so every left row meets the last version of its
key. ``version`` (optional) names a right column: a row replaces the held one only if
its version is not smaller (out-of-order changelogs). ``deleted`` (optional) names a
boolean right column: a true value deletes the key. Left rows are not kept; the right
state holds one row per key (deleted keys are forgotten, or kept as tombstones when
``version`` is given, so that an older version arriving late cannot revive them).

Stream-table join (:class:`BroadcastTableJoin`)
-----------------------------------------------
``stream.join(bounded_dataset)`` in a streaming job: the bounded side is computed once
when the job starts (a batch job) and every task joins its batches against it (inner,
left, semi or anti). It is not checkpointed: a restarted job computes it again.

State and spilling
------------------
The buffered rows (both inputs of interval and window joins, the latest row per key of
``LatestJoin``) are an Arrow table per input plus aligned numpy columns (event time or
window bounds, matched flag, key hash, arrival number). They are bounded by
``state_memory_limit`` bytes (default: half the task's ``memory_budget``, as for windows
and keyed state). Over the limit, rows move to disk until half the limit is left (both
inputs in proportion to their bytes): the oldest rows of an interval join (they are
dropped first), the rows of the windows that end last (they fire last), the keys updated
longest ago. Each move writes a *run*: an uncompressed Arrow IPC file of record batches
sorted by key hash, memory-mapped for reading, so that reading a column or binary-searching
hashes touches only the pages it needs, in the kernel's page cache rather than the task's
heap. Memory keeps per run only a few numbers per batch and, for the outer side of an
interval join, one bit per row (the matched flag, which changes after the move); this
index counts against the limit.

* Interval join: a batch probes every run whose time span can pair with it: the rows of
  its key hashes (binary search per batch of the run), then their times, then the exact
  keys. Clean-up moves the run's threshold (rows below it are gone; outer joins emit
  those not matched); a run whose newest row is gone is deleted.
* Window join: runs are read when their windows fire, one group of window ends at a time
  of at most the work budget (the limit, at least ``SPILL_WORK_MIN_BYTES``), and one hash
  range at a time within a window larger than that; output stays ordered by window.
* Latest join: a left batch reads the rows of its key hashes from every run and from
  memory, and keeps the last per key (by version, then arrival); without ``version`` a
  deleted key stays as a tombstone while older rows of it may be on disk.

The newest runs of an input are merged (hash range by hash range, within the work
budget) while the older is at most twice the newer, so there are few runs, dropped and
superseded rows leave the disk, and each row is rewritten a few times (window joins merge
only beyond 8 runs: they never probe them). Results do not depend on what was on disk.
Snapshots read the runs (their files stay), ``restore`` spills again when over the limit,
and ``close()`` (or ``finish()``) deletes the files. State is checkpointed per key group
(``snapshot_by_key_group``), so a job restores at another parallelism.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from millstream.core.arrow import event_time_micros, table_to_batches
from millstream.core.context import TaskContext
from millstream.core.keygroups import key_hashes
from millstream.core.spill import GroupFiles, SpillFile
from millstream.core.time import MAX_WATERMARK, MIN_WATERMARK
from millstream.errors import PlanError, SchemaError
from millstream.expr.windows import Sliding, Tumbling, WindowAssigner
from millstream.ops.base import Batches, Operator
from millstream.ops.join import join_tables

_EMPTY: tuple[pa.RecordBatch, ...] = ()

#: Prefix of the hidden normalized key columns the key exchange of a stream join hashes.
JOIN_KEY_PREFIX = "__ms_jk"
#: Column added to late rows in the side output: which input they came from.
SIDE_COLUMN = "join_side"
_SIDES = ("left", "right")
_DTYPES = {"t": np.int64, "m": np.bool_, "h": np.uint64, "ws": np.int64, "we": np.int64,
           "seq": np.int64}


def join_key_names(n: int) -> list[str]:
    """Names of the ``n`` hidden normalized key columns."""
    return [f"{JOIN_KEY_PREFIX}{i}" for i in range(n)]


def normalize_join_key(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    """A key column in the form both sides of a stream join hash and compare."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], arr.type)
    t = arr.type
    if pa.types.is_dictionary(t):
        arr = arr.cast(t.value_type)
        t = arr.type
    if pa.types.is_integer(t):
        if pa.types.is_uint64(t):
            mx = pc.max(arr).as_py()
            if mx is not None and mx >= 2**63:
                return arr
        return arr.cast(pa.int64())
    if pa.types.is_floating(t):
        arr = arr.cast(pa.float64())
        zero = pa.scalar(0.0, pa.float64())
        return pc.if_else(pc.equal(arr, zero), zero, arr)
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        vals, valid = event_time_micros(arr, "join key")
        return pa.array(vals, pa.int64(), mask=None if valid is None else ~valid)
    if pa.types.is_time(t) or pa.types.is_duration(t):
        unit = t.unit
        raw = arr.cast(pa.int64()) if pa.types.is_duration(t) else \
            arr.view(pa.int32() if t.bit_width == 32 else pa.int64()).cast(pa.int64())
        mult = {"s": 1_000_000, "ms": 1_000, "us": 1}.get(unit)
        return pc.multiply(raw, mult) if mult is not None else pc.divide(raw, 1000)
    if pa.types.is_decimal(t):
        return pa.array([None if v is None else str(v.normalize()) for v in arr.to_pylist()],
                        pa.string())
    return arr


def _strip(table: pa.Table) -> pa.Table:
    """The user's columns (hidden key columns dropped)."""
    hidden = [n for n in table.column_names if n.startswith(JOIN_KEY_PREFIX)]
    return table.drop_columns(hidden) if hidden else table


def _concat(tables: list[pa.Table]) -> pa.Table:
    tables = [t for t in tables if t is not None]
    if len(tables) == 1:
        return tables[0]
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise SchemaError(f"stream join: batches of one input disagree on column types: {exc}; "
                          f"cast the columns to one type before the join") from exc


def _take(table: pa.Table, idx: np.ndarray) -> pa.Table:
    """Rows ``idx`` of ``table``; -1 gives a row of nulls."""
    missing = idx < 0
    if not missing.any():
        return table.take(pa.array(idx, pa.int64()))
    return table.take(pa.array(np.where(missing, 0, idx), pa.int64(), mask=missing))


def _common_types(left: list[pa.DataType], right: list[pa.DataType], left_on: list[str],
                  right_on: list[str]) -> list[pa.DataType]:
    out = []
    for i, (lt, rt) in enumerate(zip(left, right)):
        if lt.equals(rt):
            out.append(lt)
            continue
        if pa.types.is_null(lt) or pa.types.is_null(rt):
            out.append(rt if pa.types.is_null(lt) else lt)
            continue
        try:
            out.append(pa.unify_schemas([pa.schema([("x", lt)]), pa.schema([("x", rt)])],
                                        promote_options="permissive").field("x").type)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise SchemaError(f"stream join: key {left_on[i]!r} is {lt} on the left and "
                              f"{right_on[i]!r} is {rt} on the right; these cannot be "
                              f"compared, cast one side (e.g. with_columns(...cast(...)))"
                              ) from exc
    return out


def match_keys(left: list[pa.Array], right: list[pa.Array], left_on: list[str],
               right_on: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (left row, right row) whose key columns are equal (nulls never match)."""
    n_l, n_r = (len(left[0]), len(right[0])) if left and right else (0, 0)
    if not n_l or not n_r:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    types = _common_types([a.type for a in left], [a.type for a in right], left_on, right_on)
    names = [f"k{i}" for i in range(len(left))]

    def table(cols: list[pa.Array], n: int, idx: str) -> pa.Table:
        arrays = [c if c.type.equals(t) else c.cast(t) for c, t in zip(cols, types)]
        return pa.table([*arrays, pa.array(np.arange(n, dtype=np.int64))], names=[*names, idx])

    joined = table(left, n_l, "li").join(table(right, n_r, "ri"), names, join_type="inner",
                                         use_threads=False)
    li = np.asarray(joined.column("li").combine_chunks() if joined.num_rows else [], np.int64)
    ri = np.asarray(joined.column("ri").combine_chunks() if joined.num_rows else [], np.int64)
    return li, ri


def _keys_valid(table: pa.Table, names: list[str]) -> np.ndarray:
    """True for rows whose hidden keys are all non-null."""
    ok = np.ones(table.num_rows, dtype=bool)
    for n in names:
        c = table.column(n)
        if c.null_count:
            ok &= np.asarray(pc.is_valid(c), dtype=bool)
    return ok


class JoinKeys(Operator):
    """Appends the hidden normalized join key columns the key exchange hashes."""

    def __init__(self, keys: list[str], side: str = "") -> None:
        super().__init__(f"JoinKeys({side + ', ' if side else ''}{keys})")
        self.keys = list(keys)
        self.hidden = join_key_names(len(self.keys))

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        """The batch with the hidden key columns set."""
        names = batch.schema.names
        missing = [k for k in self.keys if k not in names]
        if missing:
            raise SchemaError(f"join: no key column {missing[0]!r}; columns are "
                              f"{[n for n in names if not n.startswith(JOIN_KEY_PREFIX)]}")
        keep = [i for i, n in enumerate(names) if n not in self.hidden]
        arrays = [batch.column(i) for i in keep]
        out_names = [names[i] for i in keep]
        for k, h in zip(self.keys, self.hidden):
            arrays.append(normalize_join_key(batch.column(k)))
            out_names.append(h)
        return (pa.RecordBatch.from_arrays(arrays, names=out_names),)


#: Transient bytes a join with spilled state may hold beyond its limit while it merges
#: spill runs, builds a snapshot or fires a window (the limit itself when larger).
SPILL_WORK_MIN_BYTES = 4 << 20
#: Rows of one segment of a spill run at most (a segment is one record batch, sorted by hash).
_SEGMENT_MAX_BYTES = 64 << 20
#: Bytes the in-memory index of a spill run costs beyond its matched-flag bits (Python
#: and Arrow objects: the run, its file, per segment the mapped batch and column views).
_RUN_OVERHEAD = 2048
_SEGMENT_OVERHEAD = 3072
_COLUMN_OVERHEAD = 512
_U64_SPAN = 1 << 64


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _field_column(name: str) -> str:
    return f"__ms_{name}"


def _ranges_to_indices(starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """Every index of the half-open ranges ``[starts[i], stops[i])``, in order."""
    counts = stops - starts
    keep = counts > 0
    if not keep.all():
        starts, counts = starts[keep], counts[keep]
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    offsets = np.cumsum(counts) - counts
    return np.repeat(starts - offsets, counts) + np.arange(total, dtype=np.int64)


def _get_bits(bits: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Flags ``idx`` of a little-endian packed bit array."""
    return ((bits[idx >> 3] >> (idx & 7).astype(np.uint8)) & 1).astype(bool)


def _set_bits(bits: np.ndarray, idx: np.ndarray) -> None:
    """Set flags ``idx`` of a little-endian packed bit array."""
    if len(idx):
        np.bitwise_or.at(bits, idx >> 3, np.left_shift(np.uint8(1), (idx & 7).astype(np.uint8)))


def _hash_bounds(parts: int) -> list[int]:
    """``parts + 1`` boundaries splitting the uint64 hash space into equal ranges."""
    return [i * _U64_SPAN // parts for i in range(parts + 1)]


def _range_slice(h: np.ndarray, lo: int, hi: int) -> tuple[int, int]:
    """Positions of sorted hashes ``h`` in ``[lo, hi)`` (``hi`` may be 2**64)."""
    a = 0 if lo == 0 else int(np.searchsorted(h, np.uint64(lo), "left"))
    b = len(h) if hi >= _U64_SPAN else int(np.searchsorted(h, np.uint64(hi), "left"))
    return a, b


class _Segment:
    """One record batch of a spill run, memory-mapped, its rows sorted by key hash."""

    __slots__ = ("data", "h", "cols", "offset", "rows", "nbytes", "h_lo", "h_hi")

    def __init__(self, batch: pa.RecordBatch, fields: Sequence[str], offset: int) -> None:
        names = [_field_column(f) for f in fields if f != "m"]
        #: the rows' own columns (user and hidden key columns), zero-copy from the mapping
        self.data = batch.drop_columns(names)
        #: the numpy columns (``h``, times, ``seq``), zero-copy views of the mapping
        self.cols = {f: np.asarray(batch.column(_field_column(f))) for f in fields if f != "m"}
        self.h: np.ndarray = self.cols["h"]
        self.offset = offset
        self.rows = batch.num_rows
        self.nbytes = self.data.nbytes
        self.h_lo, self.h_hi = int(self.h[0]), int(self.h[-1])

    def lookup(self, hashes: np.ndarray) -> np.ndarray:
        """Positions of the rows whose hash is in ``hashes`` (sorted, distinct), in order."""
        if not len(hashes) or int(hashes[-1]) < self.h_lo or int(hashes[0]) > self.h_hi:
            return np.zeros(0, np.int64)
        return _ranges_to_indices(np.searchsorted(self.h, hashes, "left"),
                                  np.searchsorted(self.h, hashes, "right"))

    def take(self, idx: np.ndarray) -> pa.Table:
        """Rows ``idx`` (copied out of the mapping)."""
        return pa.Table.from_batches([self.data.take(pa.array(idx, pa.int64()))])


class _Run:
    """Rows of one join input moved to disk by one spill (or merge).

    An uncompressed Arrow IPC stream file of segments (record batches, each sorted by key
    hash, with the numpy columns as ``__ms_<name>`` columns), memory-mapped: reading a
    column or probing hashes touches only the pages it needs, and the pages are the
    kernel's cache, not the task's heap. In memory: a few numbers per segment, and one
    bit per row for the interval join's "matched" flags (they change after the spill).
    ``done``: rows whose time (the buffer's ``time_field``) is below it were dropped.
    """

    __slots__ = ("file", "segs", "rows", "nbytes", "time_field", "lo", "hi", "done", "bits",
                 "index_bytes", "_finalizer", "__weakref__")

    def __init__(self, file: SpillFile, fields: Sequence[str], time_field: str | None,
                 bits: np.ndarray | None) -> None:
        self.file = file
        # the file goes with the run even when the operator is dropped without close()
        self._finalizer = weakref.finalize(self, _unlink, file.path)
        with pa.memory_map(file.path) as mm:
            batches = list(pa.ipc.open_stream(mm))
        self.segs: list[_Segment] = []
        at = 0
        for b in batches:
            if b.num_rows:
                self.segs.append(_Segment(b, fields, at))
                at += b.num_rows
        self.rows = at
        self.nbytes = sum(s.nbytes for s in self.segs)
        self.time_field = time_field
        if time_field is not None and self.segs:
            self.lo = min(int(s.cols[time_field].min()) for s in self.segs)
            self.hi = max(int(s.cols[time_field].max()) for s in self.segs)
        else:
            self.lo, self.hi = MIN_WATERMARK, MAX_WATERMARK
        self.done = MIN_WATERMARK
        self.bits = bits
        #: bytes this run keeps in memory
        self.index_bytes = (_RUN_OVERHEAD + sum(
            _SEGMENT_OVERHEAD + _COLUMN_OVERHEAD * (s.data.num_columns + len(s.cols))
            for s in self.segs)
            + (bits.nbytes if bits is not None else 0))

    def alive(self, seg: _Segment) -> np.ndarray | None:
        """Mask of the segment's rows not dropped yet (None: all)."""
        if self.time_field is None or self.done <= self.lo:
            return None
        return seg.cols[self.time_field] >= self.done

    def matched(self, seg: _Segment, idx: np.ndarray) -> np.ndarray:
        """The matched flags of rows ``idx`` of ``seg``."""
        if self.bits is None:
            return np.zeros(len(idx), bool)
        return _get_bits(self.bits, seg.offset + idx)

    def set_matched(self, seg: _Segment, idx: np.ndarray) -> None:
        """Flag rows ``idx`` of ``seg`` as matched."""
        if self.bits is not None:
            _set_bits(self.bits, seg.offset + idx)

    def snapshot_parts(self, fields: Sequence[str]) -> Iterator[tuple[pa.Table, np.ndarray]]:
        """Per segment: the live rows with every numpy column as ``__ms_<name>``, and their hashes."""
        for seg in self.segs:
            mask = self.alive(seg)
            idx = np.arange(seg.rows, dtype=np.int64) if mask is None else np.flatnonzero(mask)
            if not len(idx):
                continue
            t = seg.data if len(idx) == seg.rows else seg.data.take(pa.array(idx))
            t = pa.Table.from_batches([t])
            for f in fields:
                arr = self.matched(seg, idx) if f == "m" else seg.cols[f][idx]
                t = t.append_column(_field_column(f), pa.array(arr))
            yield t, seg.h[idx]

    def delete(self) -> None:
        """Delete the file (mapped pages still referenced stay valid until released)."""
        self.segs = []
        self.bits = None
        self.file.delete()
        self._finalizer.detach()


class _RunWriter:
    """Writes the segments of a new spill run; ``finish()`` maps it."""

    def __init__(self, ctx: TaskContext, fields: Sequence[str], time_field: str | None,
                 track_matched: bool) -> None:
        self.file = SpillFile(ctx, "join-state", compression=None)
        self.fields = tuple(fields)
        self.time_field = time_field
        self.track = track_matched
        self._m: list[np.ndarray] = []
        self.rows = 0

    def add(self, table: pa.Table, arrays: dict[str, np.ndarray]) -> None:
        """Append rows (sorted by ``arrays["h"]``) as one or more segments."""
        n = table.num_rows
        if n == 0:
            return
        per = max(1, int(n * _SEGMENT_MAX_BYTES // max(1, table.nbytes)))
        for s in range(0, n, per):
            part = table.slice(s, per)
            for f in self.fields:
                if f != "m":
                    part = part.append_column(_field_column(f), pa.array(arrays[f][s:s + per]))
            self.file.write(part.combine_chunks().to_batches()[0])
        if self.track:
            self._m.append(np.asarray(arrays["m"], bool))
        self.rows += n

    def finish(self) -> _Run | None:
        """The run written (None when it has no rows)."""
        self.file.close()
        if self.rows == 0:
            self.file.delete()
            return None
        bits = None
        if self.track:
            bits = np.packbits(np.concatenate(self._m), bitorder="little")
        return _Run(self.file, self.fields, self.time_field, bits)


class _Buffer:
    """Buffered rows of one join input: an Arrow table plus aligned numpy columns in
    memory, and the spill runs of rows moved to disk."""

    def __init__(self, fields: Sequence[str], time_field: str | None = None) -> None:
        self.fields = tuple(fields)
        self.time_field = time_field
        self.table: pa.Table | None = None
        self.arrays = {f: np.zeros(0, _DTYPES[f]) for f in self.fields}
        #: bytes of ``table`` and ``arrays``
        self.bytes = 0
        self._keeps = 0
        self.runs: list[_Run] = []

    def __getstate__(self) -> dict[str, Any]:
        if self.runs:
            raise PlanError("a stream join whose state spilled to disk cannot be pickled; "
                            "snapshot() it instead")
        return dict(self.__dict__)

    @property
    def n(self) -> int:
        """Rows in memory."""
        return 0 if self.table is None else self.table.num_rows

    def append(self, table: pa.Table, **arrays: np.ndarray) -> None:
        if table.num_rows == 0:
            return
        self.table = table if self.table is None else _concat([self.table, table])
        if self.table.column(0).num_chunks > 64:
            self.table = self.table.combine_chunks()
        added = table.nbytes
        for f in self.fields:
            a = np.asarray(arrays[f], _DTYPES[f])
            self.arrays[f] = np.concatenate([self.arrays[f], a])
            added += a.nbytes
        self.bytes += added

    def keep(self, mask: np.ndarray) -> None:
        """Keep only the rows (in memory) where ``mask`` is true."""
        if self.table is None or mask.all():
            return
        if not mask.any():
            self.clear()
            return
        n = len(mask)
        self.table = self.table.filter(pa.array(mask))
        for f in self.fields:
            self.arrays[f] = self.arrays[f][mask]
        # in proportion to the rows kept (measuring is O(chunks x columns)); measured
        # exactly every 32 calls, and when a spill decision depends on it
        self._keeps += 1
        if self._keeps % 32:
            self.bytes = self.bytes * self.table.num_rows // n
        else:
            self.measure()

    def measure(self) -> int:
        """Measure (and return) the bytes of the rows in memory exactly."""
        self.bytes = (0 if self.table is None else self.table.nbytes) + \
            sum(a.nbytes for a in self.arrays.values())
        return self.bytes

    def rows(self, idx: np.ndarray) -> pa.Table:
        """Rows ``idx`` in memory."""
        return self.table.take(pa.array(idx, pa.int64()))

    take = rows

    def clear(self) -> None:
        """Forget the rows in memory (runs stay)."""
        self.table = None
        self.arrays = {f: np.zeros(0, _DTYPES[f]) for f in self.fields}
        self.bytes = 0

    def drop_runs(self, keep: Callable[[_Run], bool] | None = None) -> None:
        """Delete the spill runs (those for which ``keep`` is false)."""
        stay = []
        for r in self.runs:
            if keep is not None and keep(r):
                stay.append(r)
            else:
                r.delete()
        self.runs = stay

    def reset(self) -> None:
        """Forget every row, in memory and on disk."""
        self.clear()
        self.drop_runs()

    @property
    def index_bytes(self) -> int:
        """Bytes the runs keep in memory."""
        return sum(r.index_bytes for r in self.runs)

    def spill(self, mask: np.ndarray, ctx: TaskContext, track_matched: bool) -> _Run | None:
        """Move the rows where ``mask`` is true to a new run (sorted by hash)."""
        if self.table is None or not mask.any():
            return None
        if mask.all():
            table, arrays = self.table, self.arrays
        else:
            table = self.table.filter(pa.array(mask))
            arrays = {f: a[mask] for f, a in self.arrays.items()}
        order = np.argsort(arrays["h"], kind="stable")
        writer = _RunWriter(ctx, self.fields, self.time_field, track_matched)
        writer.add(table.take(pa.array(order)), {f: a[order] for f, a in arrays.items()})
        run = writer.finish()
        if run is not None:
            self.runs.append(run)
        self.keep(~mask)
        return run

    def snapshot(self, mask: np.ndarray | None = None) -> pa.Table | None:
        """The rows in memory (all, or where ``mask``) with the numpy columns as ``__ms_<name>``."""
        if self.table is None:
            return None
        t, arrays = self.table, self.arrays
        if mask is not None:
            if not mask.any():
                return None
            t = t.filter(pa.array(mask))
            arrays = {f: a[mask] for f, a in arrays.items()}
        for f in self.fields:
            t = t.append_column(_field_column(f), pa.array(arrays[f]))
        return t.combine_chunks()

    def snapshot_all(self) -> pa.Table | None:
        """Every row, in memory and spilled, as ``snapshot()`` lays them out."""
        parts = [t for r in self.runs for t, _h in r.snapshot_parts(self.fields)]
        mem = self.snapshot()
        if mem is not None:
            parts.append(mem)
        if not parts:
            return None
        return _concat(parts).combine_chunks()

    def snapshot_groups(self, key_groups: int) -> dict[int, pa.Table]:
        """``snapshot_all()`` split by key group (hash mod ``key_groups``)."""
        pieces: dict[int, list[pa.Table]] = {}
        for g, part in self.group_pieces(key_groups):
            pieces.setdefault(g, []).append(part)
        return {g: ps[0] if len(ps) == 1 else _concat(ps).combine_chunks()
                for g, ps in pieces.items()}

    def group_pieces(self, key_groups: int) -> Iterator[tuple[int, pa.Table]]:
        """Every row (spilled runs first, then memory) as ``snapshot()`` lays them out, in
        pieces of one key group each: a run part (or the rows in memory) at a time."""
        for r in self.runs:
            for t, h in r.snapshot_parts(self.fields):
                yield from _split_groups(t, h, key_groups)
        for g, mask in self.groups(key_groups).items():
            part = self.snapshot(mask)
            if part is not None:
                yield g, part

    def load(self, tables: list[pa.Table | None]) -> None:
        """Replace the contents with snapshot tables."""
        self.reset()
        tables = [t for t in tables if t is not None and t.num_rows]
        if tables:
            self.add_snapshot(_concat(tables))

    def add_snapshot(self, t: pa.Table) -> None:
        """Add the rows of a snapshot table to those held."""
        arrays = {f: np.asarray(t.column(_field_column(f)).combine_chunks(), _DTYPES[f])
                  for f in self.fields}
        self.append(t.drop_columns([_field_column(f) for f in self.fields]), **arrays)

    def groups(self, key_groups: int) -> dict[int, np.ndarray]:
        """Row masks per key group (by the ``h`` column) of the rows in memory."""
        if not self.n:
            return {}
        g = (self.arrays["h"] % np.uint64(key_groups)).astype(np.int64)
        return {int(x): g == x for x in np.unique(g)}


def _split_groups(table: pa.Table, h: np.ndarray, key_groups: int
                  ) -> Iterator[tuple[int, pa.Table]]:
    """``table``'s rows per key group of their hashes ``h``."""
    g = (h % np.uint64(key_groups)).astype(np.int64)
    order = np.argsort(g, kind="stable")
    gs = g[order]
    cuts = np.flatnonzero(np.diff(gs)) + 1
    starts = np.concatenate([[0], cuts])
    stops = np.concatenate([cuts, [len(gs)]])
    table = table.take(pa.array(order))
    for a, b in zip(starts, stops):
        yield int(gs[a]), table.slice(int(a), int(b - a))


def _check_how(how: str, allowed: tuple[str, ...], what: str) -> str:
    how = "outer" if how == "full" else how
    if how not in allowed:
        raise PlanError(f"{what}: how={how!r} is not one of {', '.join(allowed)}")
    return how


class _KeyedJoin(Operator):
    """What the keyed stream joins share: keys, output assembly, side outputs, key groups."""

    num_inputs = 2
    input_order: tuple[int, ...] = (1, 0)
    #: Its state is keyed: checkpointed per key group, restorable at another parallelism.
    is_keyed = True
    side_outputs: tuple[str, ...] = ()
    #: event-time columns of the (left, right) inputs (interval and window joins)
    time_columns: tuple[str, str] = ("", "")
    #: time zone of the event-time column, once seen (window bounds carry it)
    _tz: str | None = None
    _fields: tuple[str, ...] = ("h",)
    #: the numpy column that orders the buffered rows in time (rows below a run's ``done``
    #: are dropped); None: rows are never dropped by time
    _time_field: str | None = None
    _kind = "StreamJoin"
    #: transient bytes beyond the limit for merges, snapshots and firings (tests lower it)
    spill_work_min_bytes = SPILL_WORK_MIN_BYTES
    #: runs of one input merged only while there are more than this many
    _merge_above = 1

    def __init__(self, left_on: list[str], right_on: list[str], how: str, suffix: str,
                 name: str, state_memory_limit: int | None = None) -> None:
        if len(left_on) != len(right_on) or not left_on:
            raise PlanError(f"{name}: left keys {left_on} and right keys {right_on} must be "
                            f"non-empty and as many")
        if state_memory_limit is not None and int(state_memory_limit) < 0:
            raise PlanError(f"{name}: state_memory_limit must be >= 0 bytes, got "
                            f"{state_memory_limit}")
        super().__init__(name)
        #: bytes of buffered rows kept in memory (None: half the task's memory budget)
        self.state_memory_limit = None if state_memory_limit is None else int(state_memory_limit)
        self._spill_ctx: TaskContext | None = None
        #: the largest in-memory state seen (bytes, before spilling), runs written, rows spilled
        self.peak_state_memory_bytes = 0
        self._spills = 0
        self._spilled_rows = 0
        self.left_on, self.right_on = list(left_on), list(right_on)
        self.how = how
        self.suffix = suffix
        self.hidden = join_key_names(len(self.left_on))
        self.watermark = MIN_WATERMARK
        #: the user columns of each input, once seen (the output of an unmatched row needs them)
        self._schemas: list[pa.Schema | None] = [None, None]
        self._side: dict[str, list[pa.RecordBatch]] = {t: [] for t in self.side_outputs}
        self._counts = {"late_records": 0, "invalid_records": 0}
        self._bufs = [_Buffer(self._fields, self._time_field),
                      _Buffer(self._fields, self._time_field)]
        self._emitted = False

    # ------------------------------------------------------------------ spilling

    def _memory_limit(self) -> int:
        """Bytes of buffered rows this instance keeps in memory."""
        if self.state_memory_limit is not None:
            return self.state_memory_limit
        budget = self.ctx.memory_budget if self.ctx is not None else TaskContext.memory_budget
        return budget // 2

    def _work_bytes(self) -> int:
        """Bytes a merge, snapshot or firing may read into memory at once."""
        return max(self._memory_limit(), self.spill_work_min_bytes)

    def _spill_context(self) -> TaskContext:
        if self._spill_ctx is None:
            self._spill_ctx = self.ctx if self.ctx is not None else TaskContext()
        return self._spill_ctx

    def state_memory_bytes(self) -> int:
        """Bytes of join state in memory: buffered rows, and the index of the spilled ones."""
        b0, b1 = self._bufs
        used = b0.bytes + b1.bytes
        if b0.runs or b1.runs:
            used += b0.index_bytes + b1.index_bytes
        return used

    def spill_stats(self) -> dict[str, int]:
        """Rows in memory, runs on disk and rows in them, bytes of their files, runs
        written and rows moved to disk so far."""
        runs = [r for b in self._bufs for r in b.runs]
        return {"memory_rows": self._bufs[0].n + self._bufs[1].n, "runs": len(runs),
                "spilled_rows": sum(r.rows for r in runs),
                "disk_bytes": sum(r.file.bytes for r in runs), "spills": self._spills,
                "rows_moved_out": self._spilled_rows}

    def _spill_order(self, port: int) -> np.ndarray:
        """Rows in memory of input ``port``, the first to move to disk first."""
        return np.arange(self._bufs[port].n, dtype=np.int64)

    def _track_matched(self, port: int) -> bool:
        return False

    def _maybe_spill(self) -> None:
        """Over the memory limit: move rows to disk, down to half the limit (both inputs in
        proportion to their bytes), in the order ``_spill_order`` gives."""
        used = self.state_memory_bytes()
        if used > self.peak_state_memory_bytes:
            self.peak_state_memory_bytes = used
        limit = self._memory_limit()
        if used <= limit:
            return
        mem = [b.measure() for b in self._bufs]
        used = self.state_memory_bytes()
        if used <= limit:
            return
        total = sum(mem)
        if total == 0:
            return
        need = used - limit // 2
        for port, buf in enumerate(self._bufs):
            if not buf.n:
                continue
            share = need * mem[port] / total
            k = min(buf.n, int(np.ceil(share / (mem[port] / buf.n))))
            if k <= 0:
                continue
            mask = np.zeros(buf.n, dtype=bool)
            mask[self._spill_order(port)[:k]] = True
            run = buf.spill(mask, self._spill_context(), self._track_matched(port))
            if run is not None:
                self._spills += 1
                self._spilled_rows += run.rows
                if self.ctx is not None:
                    self.ctx.increment_counter("millstream", "state_spills")
                self._after_spill(port)

    def _after_spill(self, port: int) -> None:
        """A run was added to input ``port``: merge the newest runs while the older is at
        most twice the newer, so there are few runs (a probe searches each), each row is
        rewritten a few times, and dropped (or superseded) rows leave the disk."""
        runs = self._bufs[port].runs
        while len(runs) > max(1, self._merge_above) and runs[-2].rows <= 2 * runs[-1].rows:
            merging = runs[-2:]
            merged = self._merge_runs(port, merging, len(runs) == 2)
            for r in merging:
                r.delete()
            runs[-2:] = [merged] if merged is not None else []

    def _merge_runs(self, port: int, runs: list[_Run], oldest: bool) -> _Run | None:
        """One run of the live rows of ``runs``, written hash range by hash range (each
        range about the work budget, so the merge holds no more in memory)."""
        writer = _RunWriter(self._spill_context(), self._fields, self._time_field,
                            self._track_matched(port))
        bounds = _hash_bounds(max(1, int(np.ceil(sum(r.nbytes for r in runs)
                                                 / self._work_bytes()))))
        tf = self._time_field
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            tables: list[pa.Table] = []
            arrays: dict[str, list[np.ndarray]] = {f: [] for f in self._fields}
            for run in runs:
                for seg in run.segs:
                    a, b = _range_slice(seg.h, lo, hi)
                    if b <= a:
                        continue
                    idx = np.arange(a, b, dtype=np.int64)
                    if tf is not None and run.done > run.lo:
                        idx = idx[seg.cols[tf][a:b] >= run.done]
                    if not len(idx):
                        continue
                    tables.append(seg.take(idx))
                    for f in self._fields:
                        arrays[f].append(run.matched(seg, idx) if f == "m" else seg.cols[f][idx])
            if not tables:
                continue
            table = _concat(tables)
            cols = {f: np.concatenate(a) for f, a in arrays.items()}
            order = np.argsort(cols["h"], kind="stable")
            writer.add(table.take(pa.array(order)), {f: a[order] for f, a in cols.items()})
        merged = writer.finish()
        if merged is not None:
            # every live row is at or above the newest clean-up threshold of the runs
            merged.done = max(r.done for r in runs)
        return merged

    # ------------------------------------------------------------------ helpers

    def _keys_of(self, table: pa.Table) -> list[pa.Array]:
        return [table.column(n).combine_chunks() for n in self.hidden]

    def _check_input(self, batch: pa.RecordBatch, port: int) -> None:
        missing = [n for n in self.hidden if n not in batch.schema.names]
        if missing:
            keys = self.left_on if port == 0 else self.right_on
            raise SchemaError(f"{self.name}: the {_SIDES[port]} input lacks the join key "
                              f"columns of {keys} (it must pass JoinKeys before the key "
                              f"exchange); columns are {batch.schema.names}")
        if self._schemas[port] is None:
            self._schemas[port] = _strip(pa.Table.from_batches([batch]).slice(0, 0)).schema

    def _hash(self, table: pa.Table) -> np.ndarray:
        return key_hashes([table.column(n) for n in self.hidden], table.num_rows)

    def _empty(self, port: int) -> pa.Table:
        s = self._schemas[port]
        return s.empty_table() if s is not None else pa.table({})

    def _outer(self, port: int) -> bool:
        return self.how == "outer" or self.how == ("left", "right")[port]

    def _assemble(self, left: pa.Table, li: np.ndarray, right: pa.Table, ri: np.ndarray,
                  prefix: list[tuple[str, pa.Array]] | None = None) -> pa.Table:
        """Output rows: ``prefix`` columns, left columns, right columns (-1: nulls).

        Same-named keys appear once (coalesced for right and outer joins); other right
        columns named like a left column get ``suffix``.
        """
        left, right = _strip(left), _strip(right)
        shared = {a for a, b in zip(self.left_on, self.right_on) if a == b}
        lt, rt = _take(left, li), _take(right, ri)
        arrays: list[Any] = []
        names: list[str] = []
        for name, arr in prefix or []:
            arrays.append(arr)
            names.append(name)
        coalesce = self.how in ("right", "outer")
        for name in left.column_names:
            col = lt.column(name)
            if name in shared and coalesce and name in right.column_names:
                other = rt.column(name)
                if not col.type.equals(other.type):
                    common = _common_types([col.type], [other.type], [name], [name])[0]
                    col, other = col.cast(common), other.cast(common)
                col = pc.coalesce(col, other)
            arrays.append(col)
            names.append(name)
        if coalesce:  # a shared key the left side never showed: the right's values
            for name in self.left_on:
                if name in shared and name not in left.column_names and name in right.column_names:
                    arrays.append(rt.column(name))
                    names.append(name)
        left_names = set(names)
        for name in right.column_names:
            if name in shared:
                continue
            arrays.append(rt.column(name))
            names.append(name if name not in left_names else name + self.suffix)
        return pa.table(arrays, names=names)

    def _unmatched(self, port: int, rows: pa.Table,
                   prefix: list[tuple[str, pa.Array]] | None = None) -> pa.Table:
        """Rows of input ``port`` without a partner, the other input's columns null."""
        n = rows.num_rows
        mine = np.arange(n, dtype=np.int64)
        none = np.full(n, -1, dtype=np.int64)
        if port == 0:
            return self._assemble(rows, mine, self._empty(1), none, prefix)
        return self._assemble(self._empty(0), none, rows, mine, prefix)

    def _emit(self, tables: list[pa.Table]) -> Batches:
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return _EMPTY
        self._emitted = True
        out = tables[0] if len(tables) == 1 else pa.concat_tables(
            tables, promote_options="permissive")
        return table_to_batches(out, self.ctx.batch_size if self.ctx else 65536)

    def _to_side(self, tag: str, rows: pa.Table, port: int, counter: str) -> None:
        rows = _strip(rows)
        if SIDE_COLUMN not in rows.column_names:
            rows = rows.append_column(SIDE_COLUMN, pa.array([_SIDES[port]] * rows.num_rows,
                                                            pa.string()))
        self._side[tag].extend(rows.combine_chunks().to_batches())
        self._counts[counter] += rows.num_rows
        if self.ctx is not None:
            self.ctx.increment_counter("millstream", counter, rows.num_rows)

    def _times(self, table: pa.Table, port: int) -> tuple[pa.Table, np.ndarray]:
        """Rows with a valid event time and their times (µs); the others go to "invalid"."""
        col = self.time_columns[port]
        if col not in table.column_names:
            raise SchemaError(f"{self.name}: the {_SIDES[port]} input has no time column "
                              f"{col!r}; columns are {_strip(table).column_names}")
        c = table.column(col)
        if self._tz is None and pa.types.is_timestamp(c.type) and c.type.tz:
            self._tz = c.type.tz
        t, valid = event_time_micros(c, col)
        if valid is not None and not valid.all():
            self._to_side("invalid", table.filter(pa.array(~valid)), port, "invalid_records")
            table, t = table.filter(pa.array(valid)), t[valid]
        return table, t

    def _final_empty(self) -> Batches:
        """A typed empty batch when nothing was emitted (batch mode: later stages see columns)."""
        if self._emitted or self._schemas[0] is None or self._schemas[1] is None:
            return _EMPTY
        out = self._assemble(self._empty(0), np.zeros(0, np.int64), self._empty(1),
                             np.zeros(0, np.int64), self._prefix_empty())
        return (pa.RecordBatch.from_arrays([pa.array([], f.type) for f in out.schema],
                                           schema=out.schema),)

    def _prefix_empty(self) -> list[tuple[str, pa.Array]] | None:
        return None

    # ------------------------------------------------------------------ interface

    def take_side_output(self, tag: str = "late") -> list[pa.RecordBatch]:
        """Rows routed to side output ``tag`` since the last call ("late", "invalid")."""
        if tag not in self._side:
            raise PlanError(f"{self.name}: no side output {tag!r}; it has {list(self._side)}")
        out, self._side[tag] = self._side[tag], []
        return out

    @property
    def late_records(self) -> int:
        """Rows sent to the "late" side output so far."""
        return self._counts["late_records"]

    def _meta(self) -> dict[str, Any]:
        return {"version": 1, "operator": self._kind, "watermark": self.watermark,
                "schemas": list(self._schemas), "tz": self._tz, "extra": self._extra_state()}

    def _extra_state(self) -> Any:
        return None

    def _load_extra(self, extras: list[Any]) -> None:
        """Merge operator-specific state of restored snapshots."""

    def snapshot(self) -> dict[str, Any]:
        """Buffered rows of both inputs, watermark, schemas, undrained side outputs."""
        return {**self._meta(), "sides": [self._side_snapshot(p) for p in (0, 1)],
                "side": {k: list(v) for k, v in self._side.items()},
                "counts": dict(self._counts)}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from ``snapshot()`` output."""
        self._check_snapshot(state, False)
        self._restore([state])

    def snapshot_by_key_group(self, key_groups: int) -> dict[int, dict[str, Any]]:
        """``snapshot()`` split by key group (hash of the normalized keys mod ``key_groups``).

        Every group carries the watermark and schemas; counters and undrained side output
        rows go with the smallest group (group 0 when no row is buffered).
        """
        sides = [self._side_groups(p, key_groups) for p in (0, 1)]
        groups: dict[int, dict[str, Any]] = {}
        for g in sorted(set(sides[0]) | set(sides[1])):
            groups[g] = {**self._meta(), "key_group": g,
                         "sides": [side.get(g) for side in sides],
                         "side": {k: [] for k in self._side},
                         "counts": {k: 0 for k in self._counts}}
        first = min(groups, default=0)
        if first not in groups:
            groups[first] = {**self._meta(), "key_group": first, "sides": [None, None],
                             "side": {}, "counts": {}}
        groups[first]["side"] = {k: list(v) for k, v in self._side.items()}
        groups[first]["counts"] = dict(self._counts)
        return groups

    def iter_key_group_snapshots(self, key_groups: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """``snapshot_by_key_group`` one group at a time, in group order: when rows have
        spilled, both inputs' rows are first split by group into files on disk, so a
        checkpoint needs memory for one group, not the whole state."""
        if not any(b.runs for b in self._bufs):
            yield from sorted(self.snapshot_by_key_group(key_groups).items())
            return
        ctx = self._spill_context()
        with GroupFiles(ctx, "snapshot-join-group") as left, \
                GroupFiles(ctx, "snapshot-join-group") as right:
            files = (left, right)
            for buf, gf in zip(self._bufs, files):
                for g, part in buf.group_pieces(key_groups):
                    gf.put(g, part)
            first = min([*left.groups(), *right.groups()], default=0)
            for g in sorted({*left.groups(), *right.groups(), first}):
                st = {**self._meta(), "key_group": g, "sides": [gf.take(g) for gf in files],
                      "side": {k: [] for k in self._side}, "counts": {k: 0 for k in self._counts}}
                if g == first:
                    st["side"] = {k: list(v) for k, v in self._side.items()}
                    st["counts"] = dict(self._counts)
                yield g, st

    #: ``restore_key_groups`` takes ``load``: blob references are read one group at a time
    restores_key_groups_lazily = True

    def restore_key_groups(self, states: list[dict[str, Any]], load: Any = None) -> None:
        """Restore from the ``snapshot_by_key_group`` states of the groups this instance owns.

        With ``load`` (resolves checkpoint blob references in a value), each group's rows
        are read and put in place (spilling over the limit) before the next group's."""
        for st in states:
            self._check_snapshot(st, True)
        if load is None:
            self._restore(states)
            return
        meta = [{**st, "sides": [None, None], "side": load(st["side"])} for st in states]
        self._restore(meta)
        for st in states:
            for port in (0, 1):
                t = load(st["sides"][port])
                if t is not None and t.num_rows:
                    self._bufs[port].add_snapshot(t)
            self._maybe_spill()

    def _check_snapshot(self, st: Any, keyed: bool) -> None:
        if not isinstance(st, dict) or st.get("operator") != self._kind or \
                (keyed and "key_group" not in st):
            what = "key-group snapshot" if keyed else "snapshot"
            raise PlanError(f"{self.name}: cannot restore from {type(st).__name__}: not a "
                            f"{self._kind} {what}")

    def _restore(self, states: list[dict[str, Any]]) -> None:
        self.watermark = max([MIN_WATERMARK, *(st["watermark"] for st in states)])
        for port in (0, 1):
            self._schemas[port] = next((st["schemas"][port] for st in states
                                        if st["schemas"][port] is not None), None)
            self._bufs[port].load([st["sides"][port] for st in states])
        self._tz = next((st["tz"] for st in states if st["tz"] is not None), None)
        self._side = {t: [b for st in states for b in st["side"].get(t, [])]
                      for t in self.side_outputs}
        self._counts = {k: sum(st["counts"].get(k, 0) for st in states) for k in self._counts}
        self._load_extra([st["extra"] for st in states])
        self._maybe_spill()

    def _side_snapshot(self, port: int) -> pa.Table | None:
        """Every buffered row of input ``port`` (memory and disk), numpy columns included."""
        buf = self._bufs[port]
        return buf.snapshot_all() if buf.runs else buf.snapshot()

    def _side_groups(self, port: int, key_groups: int) -> dict[int, pa.Table]:
        """``_side_snapshot(port)`` split by key group."""
        return self._bufs[port].snapshot_groups(key_groups)

    def close(self) -> None:
        """Drop the state and delete the spill files."""
        for b in self._bufs:
            b.reset()

    def describe(self) -> str:
        return self.name


class IntervalJoin(_KeyedJoin):
    """Stream-stream join of rows whose times are close: ``l.t + lower <= r.t <= l.t + upper``.

    Port 0 is the left input, port 1 the right; ``how`` is inner, left, right or outer.
    See the module docstring for lateness, state clean-up, outer rows and spilling.
    """

    side_outputs = ("late", "invalid")
    _fields = ("t", "m", "h")
    _time_field = "t"
    _kind = "IntervalJoin"

    def __init__(self, left_on: list[str], right_on: list[str], lower: int, upper: int,
                 left_time: str, right_time: str, how: str = "inner", suffix: str = "_right",
                 name: str | None = None, state_memory_limit: int | None = None) -> None:
        how = _check_how(how, ("inner", "left", "right", "outer"), "interval_join")
        self.lower, self.upper = int(lower), int(upper)
        if self.lower > self.upper:
            raise PlanError(f"interval_join: between=(lower, upper) needs lower <= upper, got "
                            f"({lower}, {upper}) µs")
        self.time_columns = (left_time, right_time)
        super().__init__(left_on, right_on, how, suffix, name or (
            f"IntervalJoin({how}, left_on={list(left_on)}, right_on={list(right_on)}, "
            f"between=({self.lower}us, {self.upper}us), time=({left_time!r}, {right_time!r}))"),
            state_memory_limit)

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        """Join the rows with the other input's buffered rows; buffer them."""
        if batch.num_rows == 0:
            return _EMPTY
        if self.watermark == MAX_WATERMARK:
            raise PlanError(f"{self.name}: process() called after finish()")
        self._check_input(batch, port)
        table, t = self._times(pa.Table.from_batches([batch]), port)
        late = t < self.watermark
        if late.any():
            self._to_side("late", table.filter(pa.array(late)), port, "late_records")
            table, t = table.filter(pa.array(~late)), t[~late]
        if table.num_rows == 0:
            return _EMPTY
        out: list[pa.Table] = []
        keyed = _keys_valid(table, self.hidden)
        if not keyed.all():  # a null key never matches: outer rows now, the rest dropped
            if self._outer(port):
                out.append(self._unmatched(port, table.filter(pa.array(~keyed))))
            table, t = table.filter(pa.array(keyed)), t[keyed]
        matched = np.zeros(table.num_rows, dtype=bool)
        other = self._bufs[1 - port]
        h = self._hash(table)
        if table.num_rows and (other.n or other.runs):
            # the other side's rows whose time can pair with one of these rows
            if port == 0:  # r.t in [min l.t + lower, max l.t + upper]
                lo, hi = int(t.min()) + self.lower, int(t.max()) + self.upper
            else:
                lo, hi = int(t.min()) - self.upper, int(t.max()) - self.lower
            if other.n:
                ot = other.arrays["t"]
                cand = np.flatnonzero((ot >= lo) & (ot <= hi))
                if len(cand):
                    sub = other.rows(cand)
                    ni, oi = self._pairs(port, table, t, sub, ot, cand)
                    if len(ni):
                        matched[ni] = True
                        other.arrays["m"][cand[oi]] = True
                        out.append(self._assemble(table, ni, sub, oi) if port == 0
                                   else self._assemble(sub, oi, table, ni))
            if other.runs:
                out += self._probe_runs(port, table, t, h, lo, hi, matched)
        self._bufs[port].append(table, t=t, m=matched, h=h)
        out += self._expire(port)
        self._maybe_spill()
        return self._emit(out)

    def _pairs(self, port: int, table: pa.Table, t: np.ndarray, sub: pa.Table,
               ot: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row of ``table``, row of ``sub``) pairs with equal keys and times in the interval
        (row ``i`` of ``sub`` has time ``ot[pos[i]]``)."""
        if port == 0:
            ni, oi = match_keys(self._keys_of(table), self._keys_of(sub), self.left_on,
                                self.right_on)
        else:
            oi, ni = match_keys(self._keys_of(sub), self._keys_of(table), self.left_on,
                                self.right_on)
        tl, tr = (t[ni], ot[pos[oi]]) if port == 0 else (ot[pos[oi]], t[ni])
        ok = (tr >= tl + self.lower) & (tr <= tl + self.upper)
        return ni[ok], oi[ok]

    def _probe_runs(self, port: int, table: pa.Table, t: np.ndarray, h: np.ndarray, lo: int,
                    hi: int, matched: np.ndarray) -> list[pa.Table]:
        """Join the rows with the other input's spilled rows: per segment, the rows of their
        key hashes (a binary search in the mapped hash column), then of their times."""
        out = []
        hashes = np.unique(h)
        for run in self._bufs[1 - port].runs:
            if run.hi < max(lo, run.done) or run.lo > hi:
                continue
            for seg in run.segs:
                idx = seg.lookup(hashes)
                if not len(idx):
                    continue
                ot = seg.cols["t"]
                it = ot[idx]
                near = (it >= max(lo, run.done)) & (it <= hi)
                if not near.all():
                    idx = idx[near]
                if not len(idx):
                    continue
                sub = seg.take(idx)
                ni, oi = self._pairs(port, table, t, sub, ot, idx)
                if len(ni):
                    matched[ni] = True
                    run.set_matched(seg, idx[oi])
                    out.append(self._assemble(table, ni, sub, oi) if port == 0
                               else self._assemble(sub, oi, table, ni))
        return out

    def _spill_order(self, port: int) -> np.ndarray:
        # the oldest rows first: they are dropped first, so their runs go away soonest
        return np.argsort(self._bufs[port].arrays["t"], kind="stable")

    def _track_matched(self, port: int) -> bool:
        return self._outer(port)

    def _expire(self, port: int) -> list[pa.Table]:
        """Drop buffered rows of input ``port`` no row that is not late can match any more."""
        buf = self._bufs[port]
        if (not buf.n and not buf.runs) or self.watermark == MIN_WATERMARK:
            return []
        # left: l.t + upper < W;  right: r.t - lower < W
        thr = self.watermark - self.upper if port == 0 else self.watermark + self.lower
        thr = min(max(thr, MIN_WATERMARK), MAX_WATERMARK)
        out = []
        if buf.n:
            gone = buf.arrays["t"] < thr
            if gone.any():
                if self._outer(port):
                    lonely = np.flatnonzero(gone & ~buf.arrays["m"])
                    if len(lonely):
                        out.append(self._unmatched(port, buf.rows(lonely)))
                buf.keep(~gone)
        if buf.runs:
            for run in buf.runs:
                if run.done >= thr or run.lo >= thr:
                    continue
                if self._outer(port):
                    out += self._lonely_in_run(port, run, thr)
                run.done = thr
            buf.drop_runs(keep=lambda r: r.hi >= r.done)
        return out

    def _lonely_in_run(self, port: int, run: _Run, thr: int | None) -> list[pa.Table]:
        """Outer rows of a run: its live unmatched rows with time below ``thr`` (None: all)."""
        out = []
        for seg in run.segs:
            tm = seg.cols["t"]
            sel = None if thr is None else tm < thr
            if run.done > run.lo:
                sel = tm >= run.done if sel is None else sel & (tm >= run.done)
            idx = np.flatnonzero(sel) if sel is not None else np.arange(seg.rows, dtype=np.int64)
            if len(idx):
                idx = idx[~run.matched(seg, idx)]
            if len(idx):
                out.append(self._unmatched(port, seg.take(idx)))
        return out

    def on_watermark(self, watermark: int) -> Batches:
        """Drop rows that can no longer match (outer joins emit the unmatched ones)."""
        w = int(watermark)
        if w <= self.watermark:
            return _EMPTY
        self.watermark = w
        return self._emit(self._expire(0) + self._expire(1))

    def finish(self) -> Batches:
        """End of input: emit the unmatched rows of outer joins, drop all state."""
        out = []
        for port in (0, 1):
            buf = self._bufs[port]
            if self._outer(port):
                for run in buf.runs:
                    out += self._lonely_in_run(port, run, None)
                if buf.n:
                    lonely = np.flatnonzero(~buf.arrays["m"])
                    if len(lonely):
                        out.append(self._unmatched(port, buf.rows(lonely)))
            buf.reset()
        self.watermark = MAX_WATERMARK
        return (*self._emit(out), *self._final_empty())


class _Pick:
    """Buffered rows of one input that fire now: rows ``idx`` of memory or of a segment."""

    __slots__ = ("source", "idx", "ws", "we", "h", "row_bytes")

    def __init__(self, source: _Buffer | _Segment, idx: np.ndarray, ws: np.ndarray,
                 we: np.ndarray, h: np.ndarray, row_bytes: float) -> None:
        self.source, self.idx, self.ws, self.we, self.h = source, idx, ws, we, h
        self.row_bytes = row_bytes


class WindowJoin(_KeyedJoin):
    """Stream-stream join of rows that share a key and a tumbling or sliding window.

    A window's pairs are emitted when the watermark reaches its end, with
    ``window_start`` and ``window_end`` first. See the module docstring.
    """

    side_outputs = ("late", "invalid")
    _fields = ("ws", "we", "h")
    _time_field = "we"
    _kind = "WindowJoin"
    # runs are read only when their windows fire (not probed per batch): merge only to
    # keep their number (and index) small
    _merge_above = 8

    def __init__(self, left_on: list[str], right_on: list[str], window: WindowAssigner,
                 left_time: str, right_time: str, how: str = "inner", suffix: str = "_right",
                 name: str | None = None, state_memory_limit: int | None = None) -> None:
        how = _check_how(how, ("inner", "left", "right", "outer"), "window_join")
        if not isinstance(window, (Tumbling, Sliding)):
            raise PlanError(f"window_join: window must be ms.tumbling(...) or ms.sliding(...), "
                            f"got {window!r} (session and global windows do not close at "
                            f"fixed times; join such streams with interval_join(...))")
        self.window = window
        self.time_columns = (left_time, right_time)
        super().__init__(left_on, right_on, how, suffix, name or (
            f"WindowJoin({how}, {window.describe()}, left_on={list(left_on)}, "
            f"right_on={list(right_on)}, time=({left_time!r}, {right_time!r}))"),
            state_memory_limit)

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        """Buffer the rows in their windows; rows whose windows all closed are late."""
        if batch.num_rows == 0:
            return _EMPTY
        if self.watermark == MAX_WATERMARK:
            raise PlanError(f"{self.name}: process() called after finish()")
        self._check_input(batch, port)
        clash = [c for c in ("window_start", "window_end") if c in batch.schema.names]
        if clash:
            raise SchemaError(f"{self.name}: the {_SIDES[port]} input has column(s) {clash}, "
                              f"which the window join adds; rename them first")
        table, t = self._times(pa.Table.from_batches([batch]), port)
        if table.num_rows == 0:
            return _EMPTY
        idx, ws, we = self.window.assign(t)
        if idx is None:
            idx = np.arange(len(t), dtype=np.int64)
        alive = we > self.watermark
        late = np.bincount(idx[alive], minlength=len(t)) == 0
        if late.any():
            self._to_side("late", table.filter(pa.array(late)), port, "late_records")
        if alive.any():
            rows = table.take(pa.array(idx[alive]))
            self._bufs[port].append(rows, ws=ws[alive], we=we[alive], h=self._hash(rows))
            self._maybe_spill()
        return _EMPTY

    def _spill_order(self, port: int) -> np.ndarray:
        # the rows of the windows that end last first: they stay on disk longest
        return np.argsort(self._bufs[port].arrays["we"], kind="stable")[::-1]

    def _fire(self, limit: int) -> list[pa.Table]:
        """Join and drop every buffered window with ``end <= limit``."""
        lb, rb = self._bufs
        if lb.runs or rb.runs:
            return self._fire_spilled(limit)
        lm = lb.arrays["we"] <= limit if lb.n else np.zeros(0, bool)
        rm = rb.arrays["we"] <= limit if rb.n else np.zeros(0, bool)
        if not lm.any() and not rm.any():
            return []
        li_all, ri_all = np.flatnonzero(lm), np.flatnonzero(rm)
        out = self._join_windows(
            lb.rows(li_all) if len(li_all) else None, lb.arrays["ws"][li_all],
            lb.arrays["we"][li_all],
            rb.rows(ri_all) if len(ri_all) else None, rb.arrays["ws"][ri_all],
            rb.arrays["we"][ri_all])
        if len(li_all):
            lb.keep(~lm)
        if len(ri_all):
            rb.keep(~rm)
        return out

    def _join_windows(self, left: pa.Table | None, lws: np.ndarray, lwe: np.ndarray,
                      right: pa.Table | None, rws: np.ndarray, rwe: np.ndarray
                      ) -> list[pa.Table]:
        """The output of windows' rows (each row with its window's start and end), sorted
        by window end and start."""
        out = []
        ts = pa.timestamp("us", tz=self._tz)

        def prefix(ws: np.ndarray, we: np.ndarray) -> list[tuple[str, pa.Array]]:
            return [("window_start", pa.array(ws, pa.int64()).cast(ts)),
                    ("window_end", pa.array(we, pa.int64()).cast(ts))]

        lmatch = np.zeros(len(lws), bool)
        rmatch = np.zeros(len(rws), bool)
        if left is not None and right is not None:
            lk = [*self._keys_of(left), pa.array(lws, pa.int64())]
            rk = [*self._keys_of(right), pa.array(rws, pa.int64())]
            li, ri = match_keys(lk, rk, [*self.left_on, "window_start"],
                                [*self.right_on, "window_start"])
            if len(li):
                lmatch[li] = True
                rmatch[ri] = True
                out.append(self._assemble(left, li, right, ri, prefix(lws[li], lwe[li])))
        if left is not None and self._outer(0) and not lmatch.all():
            lonely = np.flatnonzero(~lmatch)
            out.append(self._unmatched(0, left.take(pa.array(lonely)),
                                       prefix(lws[lonely], lwe[lonely])))
        if right is not None and self._outer(1) and not rmatch.all():
            lonely = np.flatnonzero(~rmatch)
            out.append(self._unmatched(1, right.take(pa.array(lonely)),
                                       prefix(rws[lonely], rwe[lonely])))
        if out:
            out = [_concat(out).sort_by([("window_end", "ascending"),
                                         ("window_start", "ascending")])]
        return out

    def _picks(self, port: int, limit: int) -> list[_Pick]:
        """The rows of input ``port`` (memory and runs) in windows with ``end <= limit``."""
        buf = self._bufs[port]
        picks = []
        if buf.n:
            idx = np.flatnonzero(buf.arrays["we"] <= limit)
            if len(idx):
                a = buf.arrays
                picks.append(_Pick(buf, idx, a["ws"][idx], a["we"][idx], a["h"][idx],
                                   buf.bytes / buf.n))
        for run in buf.runs:
            if run.lo > limit:
                continue
            for seg in run.segs:
                we = seg.cols["we"]
                sel = we <= limit
                alive = run.alive(seg)
                if alive is not None:
                    sel &= alive
                idx = np.flatnonzero(sel)
                if len(idx):
                    picks.append(_Pick(seg, idx, seg.cols["ws"][idx], we[idx], seg.h[idx],
                                       seg.nbytes / seg.rows))
        return picks

    def _fire_spilled(self, limit: int) -> list[pa.Table]:
        """``_fire`` with rows on disk: the firing rows of memory and runs, joined window by
        window (and by hash range within a window larger than the work budget)."""
        picks = [self._picks(0, limit), self._picks(1, limit)]
        every = picks[0] + picks[1]
        out: list[pa.Table] = []
        if every:
            budget = self._work_bytes()
            total = sum(len(p.idx) * p.row_bytes for p in every)
            if total <= budget:
                units = [(MIN_WATERMARK, MAX_WATERMARK, 0, _U64_SPAN)]
            else:
                units = self._fire_units(every, budget)
            for unit in units:
                (lt, lws, lwe), (rt, rws, rwe) = [self._gather(ps, unit) for ps in picks]
                if lt is not None or rt is not None:
                    out += self._join_windows(lt, lws, lwe, rt, rws, rwe)
        for buf in self._bufs:
            if buf.n:
                buf.keep(buf.arrays["we"] > limit)
            if limit == MAX_WATERMARK:
                buf.drop_runs()
            elif buf.runs:
                for run in buf.runs:
                    run.done = max(run.done, limit + 1)
                buf.drop_runs(keep=lambda r: r.hi >= r.done)
        return out

    @staticmethod
    def _fire_units(picks: list[_Pick], budget: int) -> list[tuple[int, int, int, int]]:
        """(first end, last end, hash from, hash to) of parts of about ``budget`` bytes:
        consecutive window ends, and hash ranges of one end too large on its own."""
        ends = np.concatenate([p.we for p in picks])
        weights = np.concatenate([np.full(len(p.idx), p.row_bytes) for p in picks])
        uniq, inv = np.unique(ends, return_inverse=True)
        sizes = np.bincount(inv, weights=weights)
        units: list[tuple[int, int, int, int]] = []
        first: int | None = None
        last, acc = 0, 0.0
        for e, size in zip(uniq.tolist(), sizes.tolist()):
            if size > budget:
                if first is not None:
                    units.append((first, last, 0, _U64_SPAN))
                    first, acc = None, 0.0
                bounds = _hash_bounds(int(np.ceil(size / budget)))
                units += [(e, e, a, b) for a, b in zip(bounds[:-1], bounds[1:])]
                continue
            if first is not None and acc + size > budget:
                units.append((first, last, 0, _U64_SPAN))
                first, acc = None, 0.0
            if first is None:
                first = e
            last, acc = e, acc + size
        if first is not None:
            units.append((first, last, 0, _U64_SPAN))
        return units

    @staticmethod
    def _gather(picks: list[_Pick], unit: tuple[int, int, int, int]
                ) -> tuple[pa.Table | None, np.ndarray, np.ndarray]:
        """The picked rows in ``unit`` (see ``_fire_units``), with their window bounds."""
        e_lo, e_hi, h_lo, h_hi = unit
        tables, wss, wes = [], [], []
        for p in picks:
            sel = None
            if e_lo > MIN_WATERMARK or e_hi < MAX_WATERMARK:
                sel = (p.we >= e_lo) & (p.we <= e_hi)
            if h_lo > 0:
                sel = (p.h >= np.uint64(h_lo)) if sel is None else sel & (p.h >= np.uint64(h_lo))
            if h_hi < _U64_SPAN:
                sel = (p.h < np.uint64(h_hi)) if sel is None else sel & (p.h < np.uint64(h_hi))
            pos = np.arange(len(p.idx)) if sel is None else np.flatnonzero(sel)
            if not len(pos):
                continue
            idx = p.idx[pos]
            tables.append(p.source.take(idx))
            wss.append(p.ws[pos])
            wes.append(p.we[pos])
        if not tables:
            return None, np.zeros(0, np.int64), np.zeros(0, np.int64)
        return _concat(tables), np.concatenate(wss), np.concatenate(wes)

    def on_watermark(self, watermark: int) -> Batches:
        """Emit the pairs of every window whose end the watermark reached."""
        w = int(watermark)
        if w <= self.watermark:
            return _EMPTY
        self.watermark = w
        return self._emit(self._fire(w))

    def finish(self) -> Batches:
        """End of input: emit every window still held."""
        out = self._fire(MAX_WATERMARK)
        self.watermark = MAX_WATERMARK
        return (*self._emit(out), *self._final_empty())

    def _prefix_empty(self) -> list[tuple[str, pa.Array]]:
        ts = pa.timestamp("us", tz=self._tz)
        return [("window_start", pa.array([], ts)), ("window_end", pa.array([], ts))]


class LatestJoin(_KeyedJoin):
    """Joins each left row with the latest right row of its key seen so far (a changelog).

    ``how`` is inner or left. See the module docstring (processing-time temporal join).
    """

    #: The right input (a changelog) carries no event time the output depends on: a
    #: scheduler leaves its source partitions out of the watermark.
    watermark_inputs = (0,)
    _fields = ("seq", "h")
    _kind = "LatestJoin"

    def __init__(self, left_on: list[str], right_on: list[str], how: str = "inner",
                 suffix: str = "_right", version: str | None = None,
                 deleted: str | None = None, name: str | None = None,
                 state_memory_limit: int | None = None) -> None:
        how = _check_how(how, ("inner", "left"), "join_latest")
        self.version = version
        self.deleted = deleted
        self._seq = 0
        extra = (f", version={version!r}" if version else "") + \
            (f", deleted={deleted!r}" if deleted else "")
        super().__init__(left_on, right_on, how, suffix, name or (
            f"LatestJoin({how}, left_on={list(left_on)}, right_on={list(right_on)}{extra})"),
            state_memory_limit)

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        """Left rows: join with the held rows. Right rows: upsert (or delete) their keys."""
        if batch.num_rows == 0:
            return _EMPTY
        self._check_input(batch, port)
        table = pa.Table.from_batches([batch])
        if port == 1:
            self._upsert(table)
            return _EMPTY
        keyed = _keys_valid(table, self.hidden)
        state = self._bufs[1]
        out = []
        matched = np.zeros(table.num_rows, dtype=bool)
        if (state.n or state.runs) and keyed.any():
            idx = np.flatnonzero(keyed)
            sub = table.take(pa.array(idx))
            held = self._held(sub) if state.runs else state.table
            if held is not None:
                li, ri = match_keys(self._keys_of(sub), self._keys_of(held), self.left_on,
                                    self.right_on)
                if self.deleted is not None and len(ri):
                    live = ~self._is_deleted(held.take(pa.array(ri)))
                    li, ri = li[live], ri[live]
                if len(li):
                    matched[idx[li]] = True
                    out.append(self._assemble(sub, li, held, ri))
        if self.how == "left" and not matched.all():
            out.append(self._unmatched(0, table.filter(pa.array(~matched))))
        return self._emit(out)

    def _is_deleted(self, table: pa.Table) -> np.ndarray:
        if self.deleted not in table.column_names:
            raise SchemaError(f"{self.name}: the right input has no column {self.deleted!r} "
                              f"(deleted=); columns are {_strip(table).column_names}")
        return np.asarray(table.column(self.deleted).combine_chunks().fill_null(False),
                          dtype=bool)

    def _winners(self, table: pa.Table, seqs: np.ndarray) -> np.ndarray:
        """Positions (ascending) of the row per key that sorts last by (version, arrival)."""
        cols: dict[str, Any] = {}
        if self.version:  # a null version sorts first (oldest)
            v = table.column(self.version)
            cols = {"vn": pc.is_valid(v), "v": v}
        order_t = pa.table({**cols, "s": pa.array(seqs)})
        sort_keys = [(c, "ascending") for c in order_t.column_names]
        order = np.asarray(pc.sort_indices(order_t, sort_keys=sort_keys), np.int64)
        pos = np.empty(len(order), np.int64)
        pos[order] = np.arange(len(order), dtype=np.int64)
        kt = pa.table([table.column(h) for h in self.hidden] + [pa.array(pos)],
                      names=[*self.hidden, "__pos"])
        last = kt.group_by(self.hidden, use_threads=False).aggregate([("__pos", "max")])
        return np.sort(order[np.asarray(last.column("__pos_max").combine_chunks(), np.int64)])

    def _upsert(self, table: pa.Table) -> None:
        keyed = _keys_valid(table, self.hidden)
        if not keyed.all():
            table = table.filter(pa.array(keyed))
        if table.num_rows == 0:
            return
        if self.version is not None and self.version not in table.column_names:
            raise SchemaError(f"{self.name}: the right input has no column {self.version!r} "
                              f"(version=); columns are {_strip(table).column_names}")
        n = table.num_rows
        seq = np.arange(self._seq, self._seq + n, dtype=np.int64)
        self._seq += n
        state = self._bufs[1]
        if state.n:
            both = _concat([state.table, table])
            seqs = np.concatenate([state.arrays["seq"], seq])
            hashes = np.concatenate([state.arrays["h"], self._hash(table)])
        else:
            both, seqs, hashes = table, seq, self._hash(table)
        # keep, per key, the row that sorts last by (version, arrival)
        keep = self._winners(both, seqs)
        kept, seqs, hashes = both.take(pa.array(keep)), seqs[keep], hashes[keep]
        if self.deleted is not None and self.version is None and not state.runs:
            # (with rows on disk, a deleted key's row stays as a tombstone that hides them)
            alive = ~self._is_deleted(kept)
            kept, seqs, hashes = kept.filter(pa.array(alive)), seqs[alive], hashes[alive]
        state.clear()
        state.append(kept.combine_chunks(), seq=seqs, h=hashes)
        self._maybe_spill()

    # ------------------------------------------------------------------ spilled state

    def _spill_order(self, port: int) -> np.ndarray:
        # the keys updated longest ago first
        return np.argsort(self._bufs[port].arrays["seq"], kind="stable")

    def _held(self, sub: pa.Table) -> pa.Table | None:
        """The held row (tombstones included) of each key of ``sub`` that has one, from
        memory and runs: the candidates of the keys' hashes, reduced to the last per key."""
        state = self._bufs[1]
        hashes = np.unique(self._hash(sub))
        tables, seqs = [], []
        for run in state.runs:
            for seg in run.segs:
                idx = seg.lookup(hashes)
                if len(idx):
                    tables.append(seg.take(idx))
                    seqs.append(seg.cols["seq"][idx])
        if state.n:
            mask = np.isin(state.arrays["h"], hashes)
            if mask.any():
                tables.append(state.table.filter(pa.array(mask)))
                seqs.append(state.arrays["seq"][mask])
        if not tables:
            return None
        both = _concat(tables)
        return both.take(pa.array(self._winners(both, np.concatenate(seqs))))

    def _resolved(self, runs: list[_Run], memory: bool, drop_tombstones: bool
                  ) -> Iterator[tuple[pa.Table, np.ndarray, np.ndarray]]:
        """The last row per key of ``runs`` (and of memory), by hash range of about the work
        budget: (rows sorted by hash, their ``seq``, their hashes)."""
        state = self._bufs[1]
        total = sum(r.nbytes for r in runs) + (state.bytes if memory else 0)
        bounds = _hash_bounds(max(1, int(np.ceil(total / self._work_bytes()))))
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            tables, seqs, hs = [], [], []
            for run in runs:
                for seg in run.segs:
                    a, b = _range_slice(seg.h, lo, hi)
                    if b > a:
                        tables.append(pa.Table.from_batches([seg.data.slice(a, b - a)]))
                        seqs.append(seg.cols["seq"][a:b])
                        hs.append(seg.h[a:b])
            if memory and state.n:
                h = state.arrays["h"]
                mask = h >= np.uint64(lo)
                if hi < _U64_SPAN:
                    mask &= h < np.uint64(hi)
                if mask.any():
                    tables.append(state.table.filter(pa.array(mask)))
                    seqs.append(state.arrays["seq"][mask])
                    hs.append(h[mask])
            if not tables:
                continue
            both, seq, h = _concat(tables), np.concatenate(seqs), np.concatenate(hs)
            keep = self._winners(both, seq)
            if drop_tombstones and self.deleted is not None and self.version is None:
                keep = keep[~self._is_deleted(both.take(pa.array(keep)))]
            if not len(keep):
                continue
            keep = keep[np.argsort(h[keep], kind="stable")]
            yield both.take(pa.array(keep)), seq[keep], h[keep]

    def _merge_runs(self, port: int, runs: list[_Run], oldest: bool) -> _Run | None:
        """One run of the last row per key of ``runs`` (tombstones go once no older run
        is left for them to hide)."""
        writer = _RunWriter(self._spill_context(), self._fields, None, False)
        for t, seq, h in self._resolved(runs, False, oldest):
            writer.add(t, {"seq": seq, "h": h})
        return writer.finish()

    def _side_snapshot(self, port: int) -> pa.Table | None:
        state = self._bufs[port]
        if port == 0 or not state.runs:
            return super()._side_snapshot(port)
        parts = []
        for t, seq, h in self._resolved(state.runs, True, True):
            parts.append(t.append_column("__ms_seq", pa.array(seq))
                         .append_column("__ms_h", pa.array(h)))
        return _concat(parts).combine_chunks() if parts else None

    def _side_groups(self, port: int, key_groups: int) -> dict[int, pa.Table]:
        state = self._bufs[port]
        if port == 0 or not state.runs:
            return super()._side_groups(port, key_groups)
        pieces: dict[int, list[pa.Table]] = {}
        for t, seq, h in self._resolved(state.runs, True, True):
            t = t.append_column("__ms_seq", pa.array(seq)).append_column("__ms_h", pa.array(h))
            for g, part in _split_groups(t, h, key_groups):
                pieces.setdefault(g, []).append(part)
        return {g: ps[0] if len(ps) == 1 else _concat(ps).combine_chunks()
                for g, ps in pieces.items()}

    def on_watermark(self, watermark: int) -> Batches:
        """Nothing waits for event time; only the watermark is recorded."""
        self.watermark = max(self.watermark, int(watermark))
        return _EMPTY

    def finish(self) -> Batches:
        """End of input: nothing is pending."""
        self.watermark = MAX_WATERMARK
        return self._final_empty()

    def _extra_state(self) -> Any:
        return {"seq": self._seq}

    def _load_extra(self, extras: list[Any]) -> None:
        self._seq = max([0, *(e["seq"] for e in extras if e)])


class BroadcastTableJoin(Operator):
    """Joins each batch of a stream with a bounded table computed once (inner/left/semi/anti).

    ``table`` is the bounded side; a streaming scheduler computes it from ``table_node``
    (:func:`millstream.runtime.streaming.resolve_broadcast_tables`) before the job runs.
    """

    def __init__(self, left_on: list[str], right_on: list[str], how: str = "inner",
                 suffix: str = "_right", table: pa.Table | None = None,
                 table_node: Any = None) -> None:
        how = _check_how(how, ("inner", "left", "semi", "anti"), "join of a stream with a table")
        super().__init__(f"StreamTableJoin({how}, left_on={list(left_on)}, "
                         f"right_on={list(right_on)})")
        self.left_on, self.right_on, self.how, self.suffix = (list(left_on), list(right_on),
                                                              how, suffix)
        self.table = table
        self.table_node = table_node

    def open(self, ctx: Any) -> None:
        super().open(ctx)
        if self.table is None:
            raise PlanError(f"{self.name}: the bounded side of the join was not computed; the "
                            f"streaming scheduler must call resolve_broadcast_tables(stages) "
                            f"before it creates operators")

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        """Join the batch with the table."""
        if batch.num_rows == 0:
            return _EMPTY
        right = self.table
        left = pa.Table.from_batches([batch])
        if right.num_columns == 0:  # the bounded side had no rows and no schema
            right = pa.table({r: pa.array([], left.column(k).type)
                              for k, r in zip(self.left_on, self.right_on)})
        out = join_tables(left, right, self.left_on, self.right_on, self.how, self.suffix)
        return table_to_batches(out, self.ctx.batch_size if self.ctx else 65536)
