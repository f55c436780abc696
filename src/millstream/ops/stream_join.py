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
Event times are int64 microseconds (:func:`~millstream.runtime.arrowutil.event_time_micros`).
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

Buffered state is Arrow tables held in memory (not spilled); it is checkpointed per key
group (``snapshot_by_key_group``), so a job restores at another parallelism.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from millstream.errors import PlanError, SchemaError
from millstream.ops.base import Batches, Operator
from millstream.ops.join import join_tables
from millstream.ops.state import key_hashes
from millstream.ops.window import MAX_WATERMARK, MIN_WATERMARK, Sliding, Tumbling, WindowAssigner
from millstream.runtime.arrowutil import event_time_micros, table_to_batches

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


class _Buffer:
    """Buffered rows of one join input: an Arrow table plus aligned numpy columns."""

    def __init__(self, fields: Sequence[str]) -> None:
        self.fields = tuple(fields)
        self.table: pa.Table | None = None
        self.arrays = {f: np.zeros(0, _DTYPES[f]) for f in self.fields}

    @property
    def n(self) -> int:
        return 0 if self.table is None else self.table.num_rows

    def append(self, table: pa.Table, **arrays: np.ndarray) -> None:
        if table.num_rows == 0:
            return
        self.table = table if self.table is None else _concat([self.table, table])
        if self.table.column(0).num_chunks > 64:
            self.table = self.table.combine_chunks()
        for f in self.fields:
            self.arrays[f] = np.concatenate([self.arrays[f], np.asarray(arrays[f], _DTYPES[f])])

    def keep(self, mask: np.ndarray) -> None:
        """Keep only the rows where ``mask`` is true."""
        if self.table is None or mask.all():
            return
        self.table = self.table.filter(pa.array(mask)) if mask.any() else None
        for f in self.fields:
            self.arrays[f] = self.arrays[f][mask]

    def rows(self, idx: np.ndarray) -> pa.Table:
        return self.table.take(pa.array(idx, pa.int64()))

    def clear(self) -> None:
        self.table = None
        self.arrays = {f: np.zeros(0, _DTYPES[f]) for f in self.fields}

    def snapshot(self, mask: np.ndarray | None = None) -> pa.Table | None:
        """The rows (all, or where ``mask``) with the numpy columns as ``__ms_<name>``."""
        if self.table is None:
            return None
        t, arrays = self.table, self.arrays
        if mask is not None:
            if not mask.any():
                return None
            t = t.filter(pa.array(mask))
            arrays = {f: a[mask] for f, a in arrays.items()}
        for f in self.fields:
            t = t.append_column(f"__ms_{f}", pa.array(arrays[f]))
        return t.combine_chunks()

    def load(self, tables: list[pa.Table | None]) -> None:
        """Replace the contents with snapshot tables."""
        self.clear()
        tables = [t for t in tables if t is not None and t.num_rows]
        if not tables:
            return
        t = _concat(tables)
        arrays = {f: np.asarray(t.column(f"__ms_{f}").combine_chunks(), _DTYPES[f])
                  for f in self.fields}
        self.append(t.drop_columns([f"__ms_{f}" for f in self.fields]), **arrays)

    def groups(self, key_groups: int) -> dict[int, np.ndarray]:
        """Row masks per key group (by the ``h`` column)."""
        if not self.n:
            return {}
        g = (self.arrays["h"] % np.uint64(key_groups)).astype(np.int64)
        return {int(x): g == x for x in np.unique(g)}


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
    _kind = "StreamJoin"

    def __init__(self, left_on: list[str], right_on: list[str], how: str, suffix: str,
                 name: str) -> None:
        if len(left_on) != len(right_on) or not left_on:
            raise PlanError(f"{name}: left keys {left_on} and right keys {right_on} must be "
                            f"non-empty and as many")
        super().__init__(name)
        self.left_on, self.right_on = list(left_on), list(right_on)
        self.how = how
        self.suffix = suffix
        self.hidden = join_key_names(len(self.left_on))
        self.watermark = MIN_WATERMARK
        #: the user columns of each input, once seen (the output of an unmatched row needs them)
        self._schemas: list[pa.Schema | None] = [None, None]
        self._side: dict[str, list[pa.RecordBatch]] = {t: [] for t in self.side_outputs}
        self._counts = {"late_records": 0, "invalid_records": 0}
        self._bufs = [_Buffer(self._fields), _Buffer(self._fields)]
        self._emitted = False

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
        return {**self._meta(), "sides": [b.snapshot() for b in self._bufs],
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
        masks = [b.groups(key_groups) for b in self._bufs]
        groups: dict[int, dict[str, Any]] = {}
        for g in sorted(set(masks[0]) | set(masks[1])):
            groups[g] = {**self._meta(), "key_group": g,
                         "sides": [b.snapshot(m[g]) if g in m else None
                                   for b, m in zip(self._bufs, masks)],
                         "side": {k: [] for k in self._side},
                         "counts": {k: 0 for k in self._counts}}
        first = min(groups, default=0)
        if first not in groups:
            groups[first] = {**self._meta(), "key_group": first, "sides": [None, None],
                             "side": {}, "counts": {}}
        groups[first]["side"] = {k: list(v) for k, v in self._side.items()}
        groups[first]["counts"] = dict(self._counts)
        return groups

    def restore_key_groups(self, states: list[dict[str, Any]]) -> None:
        """Restore from the ``snapshot_by_key_group`` states of the groups this instance owns."""
        for st in states:
            self._check_snapshot(st, True)
        self._restore(states)

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

    def close(self) -> None:
        for b in self._bufs:
            b.clear()

    def describe(self) -> str:
        return self.name


class IntervalJoin(_KeyedJoin):
    """Stream-stream join of rows whose times are close: ``l.t + lower <= r.t <= l.t + upper``.

    Port 0 is the left input, port 1 the right; ``how`` is inner, left, right or outer.
    See the module docstring for lateness, state clean-up and outer rows.
    """

    side_outputs = ("late", "invalid")
    _fields = ("t", "m", "h")
    _kind = "IntervalJoin"

    def __init__(self, left_on: list[str], right_on: list[str], lower: int, upper: int,
                 left_time: str, right_time: str, how: str = "inner", suffix: str = "_right",
                 name: str | None = None) -> None:
        how = _check_how(how, ("inner", "left", "right", "outer"), "interval_join")
        self.lower, self.upper = int(lower), int(upper)
        if self.lower > self.upper:
            raise PlanError(f"interval_join: between=(lower, upper) needs lower <= upper, got "
                            f"({lower}, {upper}) µs")
        self.time_columns = (left_time, right_time)
        super().__init__(left_on, right_on, how, suffix, name or (
            f"IntervalJoin({how}, left_on={list(left_on)}, right_on={list(right_on)}, "
            f"between=({self.lower}us, {self.upper}us), time=({left_time!r}, {right_time!r}))"))

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
        if table.num_rows and other.n:
            ot = other.arrays["t"]
            if port == 0:  # right rows with r.t in [min l.t + lower, max l.t + upper]
                near = (ot >= int(t.min()) + self.lower) & (ot <= int(t.max()) + self.upper)
            else:
                near = (ot >= int(t.min()) - self.upper) & (ot <= int(t.max()) - self.lower)
            cand = np.flatnonzero(near)
            if len(cand):
                sub = other.rows(cand)
                if port == 0:
                    ni, oi = match_keys(self._keys_of(table), self._keys_of(sub),
                                        self.left_on, self.right_on)
                else:
                    oi, ni = match_keys(self._keys_of(sub), self._keys_of(table),
                                        self.left_on, self.right_on)
                tl, tr = (t[ni], ot[cand[oi]]) if port == 0 else (ot[cand[oi]], t[ni])
                ok = (tr >= tl + self.lower) & (tr <= tl + self.upper)
                ni, oi = ni[ok], oi[ok]
                if len(ni):
                    matched[ni] = True
                    other.arrays["m"][cand[oi]] = True
                    out.append(self._assemble(table, ni, sub, oi) if port == 0
                               else self._assemble(sub, oi, table, ni))
        self._bufs[port].append(table, t=t, m=matched, h=self._hash(table))
        out += self._expire(port)
        return self._emit(out)

    def _expire(self, port: int) -> list[pa.Table]:
        """Drop buffered rows of input ``port`` no row that is not late can match any more."""
        buf = self._bufs[port]
        if not buf.n or self.watermark == MIN_WATERMARK:
            return []
        # left: l.t + upper < W;  right: r.t - lower < W
        thr = self.watermark - self.upper if port == 0 else self.watermark + self.lower
        thr = min(max(thr, MIN_WATERMARK), MAX_WATERMARK)
        gone = buf.arrays["t"] < thr
        if not gone.any():
            return []
        out = []
        if self._outer(port):
            lonely = np.flatnonzero(gone & ~buf.arrays["m"])
            if len(lonely):
                out.append(self._unmatched(port, buf.rows(lonely)))
        buf.keep(~gone)
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
            if self._outer(port) and buf.n:
                lonely = np.flatnonzero(~buf.arrays["m"])
                if len(lonely):
                    out.append(self._unmatched(port, buf.rows(lonely)))
            buf.clear()
        self.watermark = MAX_WATERMARK
        return (*self._emit(out), *self._final_empty())


class WindowJoin(_KeyedJoin):
    """Stream-stream join of rows that share a key and a tumbling or sliding window.

    A window's pairs are emitted when the watermark reaches its end, with
    ``window_start`` and ``window_end`` first. See the module docstring.
    """

    side_outputs = ("late", "invalid")
    _fields = ("ws", "we", "h")
    _kind = "WindowJoin"

    def __init__(self, left_on: list[str], right_on: list[str], window: WindowAssigner,
                 left_time: str, right_time: str, how: str = "inner", suffix: str = "_right",
                 name: str | None = None) -> None:
        how = _check_how(how, ("inner", "left", "right", "outer"), "window_join")
        if not isinstance(window, (Tumbling, Sliding)):
            raise PlanError(f"window_join: window must be ms.tumbling(...) or ms.sliding(...), "
                            f"got {window!r} (session and global windows do not close at "
                            f"fixed times; join such streams with interval_join(...))")
        self.window = window
        self.time_columns = (left_time, right_time)
        super().__init__(left_on, right_on, how, suffix, name or (
            f"WindowJoin({how}, {window.describe()}, left_on={list(left_on)}, "
            f"right_on={list(right_on)}, time=({left_time!r}, {right_time!r}))"))

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
        return _EMPTY

    def _fire(self, limit: int) -> list[pa.Table]:
        """Join and drop every buffered window with ``end <= limit``."""
        lb, rb = self._bufs
        lm = lb.arrays["we"] <= limit if lb.n else np.zeros(0, bool)
        rm = rb.arrays["we"] <= limit if rb.n else np.zeros(0, bool)
        if not lm.any() and not rm.any():
            return []
        li_all, ri_all = np.flatnonzero(lm), np.flatnonzero(rm)
        left = lb.rows(li_all) if len(li_all) else None
        right = rb.rows(ri_all) if len(ri_all) else None
        lws, lwe = lb.arrays["ws"][li_all], lb.arrays["we"][li_all]
        rws, rwe = rb.arrays["ws"][ri_all], rb.arrays["we"][ri_all]
        out = []
        ts = pa.timestamp("us", tz=self._tz)

        def prefix(ws: np.ndarray, we: np.ndarray) -> list[tuple[str, pa.Array]]:
            return [("window_start", pa.array(ws, pa.int64()).cast(ts)),
                    ("window_end", pa.array(we, pa.int64()).cast(ts))]

        lmatch = np.zeros(len(li_all), bool)
        rmatch = np.zeros(len(ri_all), bool)
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
        if len(li_all):
            lb.keep(~lm)
        if len(ri_all):
            rb.keep(~rm)
        if out:
            out = [_concat(out).sort_by([("window_end", "ascending"),
                                         ("window_start", "ascending")])]
        return out

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
                 deleted: str | None = None, name: str | None = None) -> None:
        how = _check_how(how, ("inner", "left"), "join_latest")
        self.version = version
        self.deleted = deleted
        self._seq = 0
        extra = (f", version={version!r}" if version else "") + \
            (f", deleted={deleted!r}" if deleted else "")
        super().__init__(left_on, right_on, how, suffix, name or (
            f"LatestJoin({how}, left_on={list(left_on)}, right_on={list(right_on)}{extra})"))

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
        if state.n and keyed.any():
            idx = np.flatnonzero(keyed)
            sub = table.take(pa.array(idx))
            li, ri = match_keys(self._keys_of(sub), self._keys_of(state.table), self.left_on,
                                self.right_on)
            if self.deleted is not None and len(ri):
                live = ~self._is_deleted(state.table.take(pa.array(ri)))
                li, ri = li[live], ri[live]
            if len(li):
                matched[idx[li]] = True
                out.append(self._assemble(sub, li, state.table, ri))
        if self.how == "left" and not matched.all():
            out.append(self._unmatched(0, table.filter(pa.array(~matched))))
        return self._emit(out)

    def _is_deleted(self, table: pa.Table) -> np.ndarray:
        if self.deleted not in table.column_names:
            raise SchemaError(f"{self.name}: the right input has no column {self.deleted!r} "
                              f"(deleted=); columns are {_strip(table).column_names}")
        return np.asarray(table.column(self.deleted).combine_chunks().fill_null(False),
                          dtype=bool)

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
        else:
            both, seqs = table, seq
        # keep, per key, the row that sorts last by (version, arrival)
        cols: dict[str, Any] = {}
        if self.version:  # a null version sorts first (oldest)
            v = both.column(self.version)
            cols = {"vn": pc.is_valid(v), "v": v}
        order_t = pa.table({**cols, "s": pa.array(seqs)})
        sort_keys = [(c, "ascending") for c in order_t.column_names]
        order = np.asarray(pc.sort_indices(order_t, sort_keys=sort_keys), np.int64)
        pos = np.empty(len(order), np.int64)
        pos[order] = np.arange(len(order), dtype=np.int64)
        kt = pa.table([both.column(h) for h in self.hidden] + [pa.array(pos)],
                      names=[*self.hidden, "__pos"])
        last = kt.group_by(self.hidden, use_threads=False).aggregate([("__pos", "max")])
        keep = np.sort(order[np.asarray(last.column("__pos_max").combine_chunks(), np.int64)])
        kept = both.take(pa.array(keep))
        seqs = seqs[keep]
        if self.deleted is not None and self.version is None:
            alive = ~self._is_deleted(kept)
            kept, seqs = kept.filter(pa.array(alive)), seqs[alive]
        state.clear()
        state.append(kept.combine_chunks(), seq=seqs, h=self._hash(kept))

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
