"""Event-time windows: assigners (tumbling, sliding, session) and keyed window aggregation.

Conventions
-----------
* Event time comes from a timestamp column (any unit, with or without a time zone), an
  integer column of epoch milliseconds, or a date column; inside, it is int64 microseconds
  since the epoch (see :func:`millstream.runtime.arrowutil.event_time_micros`).
* A watermark ``W`` (int64 microseconds) says "no more events with event time <= W are
  expected". A window ``[start, end)`` fires when ``end <= W``. It is *expired* when
  ``end + allowed_lateness <= W``: its state is dropped and an event that would only fall
  into expired windows is *late*: it goes to the side output ``"late"`` (never dropped
  silently) and is counted in the ``("millstream", "late_records")`` counter.
* A sliding-window event lies in several windows; it is late only when all of them are
  expired, otherwise it counts in those still held (as in Flink).
* Rows with a null event time go to the side output ``"invalid"`` (counter
  ``invalid_time_records``).
* ``first`` and ``collect_list`` follow arrival order (for sessions that merged: the order
  of the merged sessions' first arrivals).
* Results have the columns ``window_start``, ``window_end`` (timestamp[us], with the time
  zone of the input column, if any), the group keys, the aggregates (named as their
  ``AggSpec.name``), and, when ``allowed_lateness > 0``, a boolean ``is_update``.

Updates (``allowed_lateness > 0``): a window first fires with ``is_update = False``; an
allowed late event (its window already fired but is not expired) makes the operator emit,
at once, a new row for that key and window with ``is_update = True`` that *supersedes*
the earlier row for the same key and window (upsert semantics: a sink keyed by
``(window_start, window_end, *keys)`` keeps the last row). Tumbling and sliding windows
never move, so that is all they need. Session windows can grow or merge when a late
event arrives; their results then also carry ``is_retraction``: before the row of the
new window, the operator emits one row per window that session was emitted under
before, with ``is_retraction = True`` (aggregates null), meaning "delete the row with this
key and window". ``is_update`` is True exactly when a row for the same key and window
was emitted before and not retracted. With ``allowed_lateness = 0`` a window is emitted
once and neither column exists.

A session is ``[first event, last event + gap)``; two events of a key share a session
when they are less than ``gap`` apart (sessions that only touch stay apart). An event
whose own session ``[t, t + gap)`` is expired is late unless it overlaps a session still
held, or an earlier accepted event of the same batch: exactly what one-event-at-a-time
processing would decide, so results do not depend on batch boundaries.

State is kept as Arrow tables of partial aggregation states (the ``_AggCore`` algebra of
``ops.aggregate``), never a Python object per event: tumbling and sliding windows keep one
*pane* per window end (a list of state tables, compacted by merging), session windows
keep one table of sessions per hash bucket of the key.

Spilling (tumbling and sliding): when the panes held in memory exceed
``state_memory_limit`` bytes (default: half the task's ``memory_budget``), the panes of
the windows that end latest (they fire last) move to disk, one ``SpillFile`` per window
end; more state for a spilled window is appended to its file. A spilled pane is read back
(and merged) when its window fires, gets an allowed late update, or at snapshot time;
its file is deleted when the window fires or expires, and in ``close()``. Each move or
append counts in ``("millstream", "state_spills")``. Session state is not spilled.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from millstream.errors import PlanError, SchemaError
from millstream.ops.aggregate import AggSpec, _AggCore
from millstream.ops.base import Batches, Operator
from millstream.ops.state import key_hashes
from millstream.runtime.arrowutil import event_time_micros, normalize_key, table_to_batches
from millstream.runtime.context import TaskContext
from millstream.runtime.hashing import partition_ids
from millstream.runtime.spill import SpillFile

_EMPTY: tuple[pa.RecordBatch, ...] = ()

#: The watermark before any was seen, and the one that ends a bounded input.
MIN_WATERMARK = -(2**63)
MAX_WATERMARK = 2**63 - 1

# Internal column names of the state tables.
_WS = "__millstream_ws"
_WE = "__millstream_we"
_RESERVED = ("window_start", "window_end", "is_update", "is_retraction")

# --------------------------------------------------------------------------- durations

_UNIT_MICROS = {
    "us": 1, "µs": 1, "ms": 1_000, "s": 1_000_000, "sec": 1_000_000, "m": 60_000_000,
    "min": 60_000_000, "h": 3_600_000_000, "hr": 3_600_000_000, "d": 86_400_000_000,
    "w": 604_800_000_000,
}
_PART_RE = re.compile(r"\s*(\d+(?:\.\d*)?)\s*(us|µs|ms|sec|s|min|m|hr|h|d|w)\s*")


def parse_duration(value: str | int | _dt.timedelta, what: str = "duration") -> int:
    """A duration ("5s", "1m", "1h30m", "500ms", "2d", timedelta, or int µs) in microseconds."""
    if isinstance(value, bool):
        raise PlanError(f"{what}: expected a duration such as '5s', got {value!r}")
    if isinstance(value, _dt.timedelta):
        micros = (value.days * 86_400 + value.seconds) * 1_000_000 + value.microseconds
    elif isinstance(value, (int, np.integer)):
        micros = int(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        pos, micros, matched = 0, 0.0, False
        while pos < len(text):
            m = _PART_RE.match(text, pos)
            if not m:
                break
            micros += float(m.group(1)) * _UNIT_MICROS[m.group(2)]
            pos, matched = m.end(), True
        if not matched or pos != len(text):
            raise PlanError(f"{what}: cannot read the duration {value!r}; use e.g. '500ms', "
                            f"'5s', '10m', '1h', '1h30m', '2d', '1w' (units us, ms, s, m, h, d, w)")
        if micros != int(micros):
            raise PlanError(f"{what}: {value!r} is not a whole number of microseconds")
        micros = int(micros)
    else:
        raise PlanError(f"{what}: expected a duration string such as '5s', a datetime.timedelta "
                        f"or an int of microseconds, got {type(value).__name__} {value!r}")
    if micros < 0:
        raise PlanError(f"{what}: must not be negative, got {value!r}")
    return micros


def _fmt_duration(micros: int) -> str:
    for unit, k in (("d", 86_400_000_000), ("h", 3_600_000_000), ("m", 60_000_000),
                    ("s", 1_000_000), ("ms", 1_000)):
        if micros and micros % k == 0:
            return f"{micros // k}{unit}"
    return f"{micros}us"


# --------------------------------------------------------------------------- assigners


class WindowAssigner:
    """Maps event times to windows ``[start, end)`` (microseconds)."""

    #: Merging assigners (sessions) grow and merge windows per key.
    merging: bool = False

    def assign(self, t: np.ndarray) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """(row index per window or None for one window per row, starts, ends)."""
        raise NotImplementedError

    def describe(self) -> str:
        """Short text for explain()."""
        return type(self).__name__


class Tumbling(WindowAssigner):
    """Fixed, non-overlapping windows of ``size``, aligned to the epoch plus ``offset``."""

    def __init__(self, size: str | int | _dt.timedelta, offset: str | int | _dt.timedelta = 0
                 ) -> None:
        self.size = parse_duration(size, "Tumbling(size)")
        if self.size <= 0:
            raise PlanError(f"Tumbling(size): must be positive, got {size!r}")
        self.offset = parse_duration(offset, "Tumbling(offset)") % self.size

    def assign(self, t: np.ndarray) -> tuple[None, np.ndarray, np.ndarray]:
        start = np.floor_divide(t - self.offset, self.size) * self.size + self.offset
        return None, start, start + self.size

    def describe(self) -> str:
        off = f", offset={_fmt_duration(self.offset)}" if self.offset else ""
        return f"Tumbling({_fmt_duration(self.size)}{off})"


class Sliding(WindowAssigner):
    """Windows of ``size`` starting every ``every``: each event lies in about size/every windows."""

    def __init__(self, size: str | int | _dt.timedelta, every: str | int | _dt.timedelta,
                 offset: str | int | _dt.timedelta = 0) -> None:
        self.size = parse_duration(size, "Sliding(size)")
        self.every = parse_duration(every, "Sliding(every)")
        if self.size <= 0 or self.every <= 0:
            raise PlanError(f"Sliding: size and every must be positive, got size={size!r}, "
                            f"every={every!r}")
        if self.every > self.size:
            raise PlanError(f"Sliding: every ({every!r}) is larger than size ({size!r}); events "
                            f"between windows would belong to no window")
        self.offset = parse_duration(offset, "Sliding(offset)") % self.every

    def assign(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = len(t)
        k = -(-self.size // self.every)
        last = np.floor_divide(t - self.offset, self.every) * self.every + self.offset
        starts = last[:, None] - (np.arange(k, dtype=np.int64) * self.every)[None, :]
        inside = (starts + self.size > t[:, None]).ravel()
        idx = np.repeat(np.arange(n, dtype=np.int64), k)[inside]
        s = starts.ravel()[inside]
        return idx, s, s + self.size

    def describe(self) -> str:
        off = f", offset={_fmt_duration(self.offset)}" if self.offset else ""
        return f"Sliding({_fmt_duration(self.size)}, every={_fmt_duration(self.every)}{off})"


class Session(WindowAssigner):
    """Per-key sessions: events less than ``gap`` apart share a window ``[first, last + gap)``."""

    merging = True

    def __init__(self, gap: str | int | _dt.timedelta) -> None:
        self.gap = parse_duration(gap, "Session(gap)")
        if self.gap <= 0:
            raise PlanError(f"Session(gap): must be positive, got {gap!r}")

    def assign(self, t: np.ndarray) -> tuple[None, np.ndarray, np.ndarray]:
        return None, t, t + self.gap

    def describe(self) -> str:
        return f"Session(gap={_fmt_duration(self.gap)})"


# --------------------------------------------------------------------------- helpers


def _col_numpy(table: pa.Table, name: str) -> np.ndarray:
    return np.asarray(table.column(name).combine_chunks() if table.num_rows else [],
                      dtype=np.int64)


def _concat(tables: list[pa.Table]) -> pa.Table:
    if len(tables) == 1:
        return tables[0]
    return pa.concat_tables(tables, promote_options="permissive")


def _split_by_value(table: pa.Table, values: np.ndarray) -> Iterable[tuple[int, pa.Table]]:
    """(value, rows) groups of a table by an int64 column, in ascending value order."""
    if table.num_rows == 0:
        return
    order = np.argsort(values, kind="stable")
    sv = values[order]
    bounds = np.flatnonzero(np.diff(sv)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(sv)]])
    ordered = table.take(pa.array(order)) if len(starts) > 1 else table
    for s, e in zip(starts, ends):
        yield int(sv[s]), ordered.slice(int(s), int(e - s)) if len(starts) > 1 else ordered


def _with_flags(table: pa.Table, names: tuple[str, str], fired: Any, touched: int) -> pa.Table:
    """Set the two hidden flag columns (int8) of a state table."""
    n = table.num_rows
    for name, v in zip(names, (fired, touched)):
        arr = pa.array(np.broadcast_to(np.asarray(v, dtype=np.int8), (n,)).copy(), pa.int8())
        i = table.schema.get_field_index(name)
        table = table.set_column(i, name, arr) if i >= 0 else table.append_column(name, arr)
    return table


class _Pane:
    """Partial states of every (key, window) ending at one instant: a list of state tables."""

    __slots__ = ("tables", "rows")

    def __init__(self, tables: list[pa.Table] | None = None) -> None:
        self.tables = tables or []
        self.rows = sum(t.num_rows for t in self.tables)


# --------------------------------------------------------------------------- operator


class WindowAggregate(Operator):
    """Keyed event-time window aggregation with watermarks, allowed lateness and a late side output.

    ``keys`` may be empty (one window per time range over all events). ``aggs`` are
    ``AggSpec``s or ``AggExpr``s (``ms.sum("x").alias("total")``). See the module
    docstring for the firing, lateness and update semantics.
    """

    #: Side output tags this operator fills; drain them with ``take_side_output(tag)``.
    side_outputs = ("late", "invalid")
    #: Merge a pane's state tables once it holds this many.
    compact_tables = 16

    def __init__(self, window: WindowAssigner, keys: list[str] | str | None, aggs: list[Any],
                 time_column: str, allowed_lateness: str | int | _dt.timedelta = 0,
                 emit: str = "final", name: str | None = None,
                 state_memory_limit: int | None = None) -> None:
        if not isinstance(window, WindowAssigner):
            raise PlanError(f"WindowAggregate: window must be Tumbling, Sliding or Session, got "
                            f"{window!r}")
        if emit != "final":
            raise PlanError(f"WindowAggregate: emit={emit!r} is not supported; only 'final' "
                            f"(one result per window when the watermark passes its end)")
        keys = [keys] if isinstance(keys, str) else list(keys or [])
        specs = [a if isinstance(a, AggSpec) else self._to_spec(a) for a in aggs]
        if not specs:
            raise PlanError("WindowAggregate: at least one aggregate is needed")
        names = [*keys, *(s.name for s in specs)]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise PlanError(f"WindowAggregate: duplicate output column(s) {dup} among keys and "
                            f"aggregate names")
        clash = [n for n in names if n in _RESERVED or n.startswith("__millstream")]
        if clash:
            raise PlanError(f"WindowAggregate: column name(s) {clash} are reserved for the "
                            f"window result; rename them")
        self.window = window
        self.keys = keys
        self.specs = specs
        self.time_column = time_column
        self.allowed_lateness = parse_duration(allowed_lateness, "allowed_lateness")
        self.emit = emit
        #: bytes of in-memory pane state before spilling (None: half the task memory budget)
        self.state_memory_limit = state_memory_limit
        self._spilled: dict[int, SpillFile] = {}
        self._spill_ctx: TaskContext | None = None
        super().__init__(name or (
            f"WindowAggregate({window.describe()}, keys={keys}, time={time_column!r}, aggs=["
            + ", ".join(f"{s.func}:{s.name}" for s in specs) + "]"
            + (f", allowed_lateness={_fmt_duration(self.allowed_lateness)}"
               if self.allowed_lateness else "") + ")"))
        core_keys = [_WS, _WE, *keys]
        self.core = _AggCore(core_keys, specs)
        # the same algebra plus two hidden max-aggregated flags: "fired" and "touched"
        n = len(specs)
        self._fcore = _AggCore(core_keys, [*specs, AggSpec("max", None, "__millstream_fired"),
                                           AggSpec("max", None, "__millstream_touched")])
        self._fired = self._fcore.state_cols[n][0]
        self._touched = self._fcore.state_cols[n + 1][0]
        self._flags = (self._fired, self._touched)
        # sessions: the windows already emitted for each session (two aligned lists,
        # concatenated when sessions merge) and the transient "touched" flag
        self._score = _AggCore(core_keys, [
            *specs, AggSpec("collect_list", None, "__millstream_emitted_start"),
            AggSpec("collect_list", None, "__millstream_emitted_end"),
            AggSpec("max", None, "__millstream_touched")])
        self._em = (self._score.state_cols[n][0], self._score.state_cols[n + 1][0])
        self._s_touched = self._score.state_cols[n + 2][0]
        #: session windows with allowed lateness can move: earlier rows get retracted
        self.retractions = window.merging and self.allowed_lateness > 0
        self.num_buckets = 16 if (window.merging and keys) else 1
        self._reset()

    @staticmethod
    def _to_spec(agg: Any) -> AggSpec:
        func, arg, name = (getattr(agg, a, None) for a in ("func", "arg", "name"))
        if func is None or name is None:
            raise PlanError(f"WindowAggregate: aggregates must be AggSpec or AggExpr "
                            f"(e.g. ms.sum('x')), got {agg!r}")
        return AggSpec(func, arg, name)

    def _reset(self) -> None:
        self._drop_spills()
        self.watermark = MIN_WATERMARK
        self.late_records = 0
        self.invalid_records = 0
        self._tz: str | None = None
        self._side: dict[str, list[pa.RecordBatch]] = {t: [] for t in self.side_outputs}
        self._panes: dict[int, _Pane] = {}
        self._buckets: list[pa.Table | None] = [None] * self.num_buckets

    # ----------------------------------------------------------------- interface

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        """Add a batch of events; returns rows of windows the watermark has already passed."""
        if batch.num_rows == 0:
            return _EMPTY
        if self.watermark == MAX_WATERMARK:
            raise PlanError(f"{self.name}: process() called after finish()")
        col = self._time_column(batch)
        t, valid = event_time_micros(col, self.time_column)
        if valid is not None:
            bad = batch.filter(pa.array(~valid))
            self._to_side("invalid", bad, "invalid_time_records")
            self.invalid_records += bad.num_rows
            batch = batch.filter(pa.array(valid))
            t = t[valid]
            if batch.num_rows == 0:
                return _EMPTY
        if self.window.merging:
            out = self._process_sessions(batch, t)
        else:
            out = self._process_fixed(batch, t)
        return self._emit(out)

    def on_watermark(self, watermark: int) -> Batches:
        """Fire every window with ``end <= watermark``; drop state of expired windows."""
        w = int(watermark)
        if w <= self.watermark:
            return _EMPTY
        old, self.watermark = self.watermark, w
        if self.window.merging:
            return self._emit(self._fire_sessions(old, w))
        out = []
        thresh = self._expiry()
        for end in sorted(e for e in {*self._panes, *self._spilled} if old < e <= w):
            if end > thresh:
                self._load(end)
                out.append(self._result(self._pane_state(end), False))
            else:  # fires and expires at once: read its state back for the last time
                out.append(self._result(self._take_pane(end), False))
        for end in [e for e in self._panes if e <= thresh]:
            del self._panes[end]
        for end in [e for e in self._spilled if e <= thresh]:
            self._spilled.pop(end).delete()
        self._maybe_spill()
        return self._emit(out)

    def finish(self) -> Batches:
        """End of input (watermark +infinity): emit every window not yet emitted, in end order."""
        w = self.watermark
        out: list[pa.Table] = []
        if self.window.merging:
            for tbl in self._buckets:
                if tbl is None:
                    continue
                due = _col_numpy(tbl, _WE) > w
                if due.any():
                    out += self._emit_sessions(tbl, due)[0]
            self._buckets = [None] * self.num_buckets
        else:
            for end in sorted(e for e in {*self._panes, *self._spilled} if e > w):
                out.append(self._result(self._take_pane(end), False))
            self._panes = {}
            self._drop_spills()
        self.watermark = MAX_WATERMARK
        return self._emit(out, sort=self.window.merging)

    def take_side_output(self, tag: str = "late") -> list[pa.RecordBatch]:
        """Rows routed to side output ``tag`` since the last call ("late" events, "invalid" times)."""
        if tag not in self._side:
            raise PlanError(f"{self.name}: no side output {tag!r}; it has {list(self._side)}")
        out, self._side[tag] = self._side[tag], []
        return out

    def snapshot(self) -> dict[str, Any]:
        """The whole state: one Arrow table of partial states plus small metadata (picklable)."""
        if self.window.merging:
            tables = [t for t in self._buckets if t is not None and t.num_rows]
        else:
            tables = [self._snapshot_pane(e) for e in sorted({*self._panes, *self._spilled})]
        state = _concat(tables).combine_chunks() if tables else None
        return {"version": 1, "operator": "WindowAggregate", "watermark": self.watermark,
                "tz": self._tz, "late_records": self.late_records,
                "invalid_records": self.invalid_records, "state": state,
                "side": {k: list(v) for k, v in self._side.items()}}

    def restore(self, state: dict[str, Any]) -> None:
        """Rebuild the state from ``snapshot()`` output; the operator continues as the original."""
        if not isinstance(state, dict) or state.get("operator") != "WindowAggregate":
            raise PlanError(f"{self.name}: cannot restore from {type(state).__name__}: not a "
                            f"WindowAggregate snapshot")
        self._reset()
        self.watermark = state["watermark"]
        self._tz = state["tz"]
        self.late_records = state["late_records"]
        self.invalid_records = state["invalid_records"]
        self._side = {k: list(v) for k, v in state["side"].items()}
        table: pa.Table | None = state["state"]
        if table is None or table.num_rows == 0:
            return
        if self.window.merging:
            bids = self._bucket_ids(table)
            for b in np.unique(bids):
                self._buckets[int(b)] = table.filter(pa.array(bids == b))
        else:
            for end, part in _split_by_value(table, _col_numpy(table, _WE)):
                self._panes[end] = _Pane([part])
            self._maybe_spill()

    @property
    def is_keyed(self) -> bool:
        """True when the state is keyed (``keys`` given): it can be split by key group."""
        return bool(self.keys)

    def snapshot_by_key_group(self, key_groups: int) -> dict[int, dict[str, Any]]:
        """``snapshot()`` split by key group (hash of the key columns mod ``key_groups``).

        Every group's snapshot carries the watermark and time zone; the counters and any
        undrained side output rows go with the smallest group (group 0 when there is no state).
        """
        if not self.keys:
            raise PlanError(f"{self.name}: a window without keys has no key groups; its state "
                            f"can only be restored at the same parallelism")
        full = self.snapshot()
        table: pa.Table | None = full["state"]
        groups: dict[int, dict[str, Any]] = {}
        base = {"version": 1, "operator": "WindowAggregate", "watermark": self.watermark,
                "tz": self._tz, "late_records": 0, "invalid_records": 0, "state": None,
                "side": {k: [] for k in self._side}}
        if table is not None and table.num_rows:
            cols = [normalize_key(table.column(k)) for k in self.keys]
            gids = (key_hashes(cols, table.num_rows) % np.uint64(key_groups)).astype(np.int64)
            for g, part in _split_by_value(table, gids):
                groups[g] = {**base, "key_group": g, "state": part.combine_chunks(),
                             "side": {k: [] for k in self._side}}
        first = min(groups, default=0)
        groups.setdefault(first, {**base, "key_group": first})
        groups[first].update(late_records=full["late_records"],
                             invalid_records=full["invalid_records"], side=full["side"])
        return groups

    def restore_key_groups(self, states: list[dict[str, Any]]) -> None:
        """Restore from ``snapshot_by_key_group`` states of the key groups this instance owns."""
        for st in states:
            if not isinstance(st, dict) or st.get("operator") != "WindowAggregate" \
                    or "key_group" not in st:
                raise PlanError(f"{self.name}: cannot restore from {type(st).__name__}: not a "
                                f"WindowAggregate key-group snapshot")
        tables = [st["state"] for st in states if st["state"] is not None and st["state"].num_rows]
        merged: dict[str, Any] = {
            "version": 1, "operator": "WindowAggregate",
            "watermark": max([MIN_WATERMARK, *(st["watermark"] for st in states)]),
            "tz": next((st["tz"] for st in states if st["tz"] is not None), None),
            "late_records": sum(st["late_records"] for st in states),
            "invalid_records": sum(st["invalid_records"] for st in states),
            "state": _concat(tables) if tables else None,
            "side": {k: [b for st in states for b in st["side"].get(k, [])]
                     for k in self.side_outputs},
        }
        self.restore(merged)

    def close(self) -> None:
        self._panes = {}
        self._drop_spills()
        self._buckets = [None] * self.num_buckets

    def describe(self) -> str:
        return self.name

    # ----------------------------------------------------------------- common

    def _time_column(self, batch: pa.RecordBatch) -> pa.Array:
        i = batch.schema.get_field_index(self.time_column)
        if i < 0:
            raise SchemaError(f"{self.name}: no time column {self.time_column!r}; columns are "
                              f"{batch.schema.names}")
        missing = [k for k in self.keys if k not in batch.schema.names]
        if missing:
            raise SchemaError(f"{self.name}: no key column(s) {missing}; columns are "
                              f"{batch.schema.names}")
        col = batch.column(i)
        if self._tz is None and pa.types.is_timestamp(col.type) and col.type.tz:
            self._tz = col.type.tz
        return col

    def _expiry(self) -> int:
        """Windows with ``end <= this`` are expired (watermark minus allowed lateness)."""
        return max(self.watermark - self.allowed_lateness, MIN_WATERMARK)

    def _to_side(self, tag: str, rows: pa.RecordBatch, counter: str) -> None:
        self._side[tag].append(rows)
        if self.ctx is not None:
            self.ctx.increment_counter("millstream", counter, rows.num_rows)

    def _late(self, batch: pa.RecordBatch, mask: np.ndarray) -> None:
        rows = batch.filter(pa.array(mask))
        self.late_records += rows.num_rows
        self._to_side("late", rows, "late_records")

    def _partial(self, batch: pa.RecordBatch, rows: np.ndarray | None, ws: np.ndarray,
                 we: np.ndarray) -> pa.Table:
        table = pa.Table.from_batches([batch])
        if rows is not None:
            table = table.take(pa.array(rows))
        table = table.append_column(_WS, pa.array(ws, pa.int64()))
        table = table.append_column(_WE, pa.array(we, pa.int64()))
        return self.core.partial(table)

    def _result(self, states: pa.Table, is_update: Any) -> pa.Table:
        """Merged states -> result rows (window bounds as timestamps, keys, aggregates, flags)."""
        res = self.core.finalize(states)
        ts = pa.timestamp("us", tz=self._tz)
        arrays = [res.column(_WS).cast(ts), res.column(_WE).cast(ts)]
        names = ["window_start", "window_end"]
        for name in res.schema.names[2:]:
            arrays.append(res.column(name))
            names.append(name)
        if self.allowed_lateness > 0:
            flag = np.broadcast_to(np.asarray(is_update, dtype=bool), (res.num_rows,))
            arrays.append(pa.array(flag, pa.bool_()))
            names.append("is_update")
        if self.retractions:
            arrays.append(pa.array(np.zeros(res.num_rows, dtype=bool), pa.bool_()))
            names.append("is_retraction")
        return pa.table(arrays, names=names)

    def _emit(self, tables: list[pa.Table], sort: bool = False) -> Batches:
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return _EMPTY
        out = _concat(tables)
        if sort:
            out = out.sort_by([("window_end", "ascending"), ("window_start", "ascending")])
        return table_to_batches(out, self.ctx.batch_size if self.ctx else 65536)

    # ----------------------------------------------------------------- tumbling and sliding

    def _pane_state(self, end: int) -> pa.Table:
        pane = self._panes[end]
        if len(pane.tables) > 1:
            pane.tables = [self.core.merge(_concat(pane.tables))]
        return pane.tables[0]

    def _process_fixed(self, batch: pa.RecordBatch, t: np.ndarray) -> list[pa.Table]:
        idx, ws, we = self.window.assign(t)
        alive = we > self._expiry()
        if idx is None:
            late = ~alive
            rows = None if alive.all() else np.flatnonzero(alive)
        else:
            late = np.bincount(idx[alive], minlength=len(t)) == 0
            rows = idx[alive]
        if late.any():
            self._late(batch, late)
        if not alive.any():
            return []
        states = self._partial(batch, rows, ws[alive], we[alive])
        ends = _col_numpy(states, _WE)
        fired = ends <= self.watermark
        pending = states.filter(pa.array(~fired)) if fired.any() else states
        for end, part in _split_by_value(pending, ends[~fired]):
            if end in self._spilled:  # its pane lives on disk: append there
                self._spill_write(end, [part])
                continue
            pane = self._panes.get(end)
            if pane is None:
                self._panes[end] = _Pane([part])
                continue
            pane.tables.append(part)
            pane.rows += part.num_rows
            if len(pane.tables) >= self.compact_tables:
                pane.tables = [self.core.merge(_concat(pane.tables))]
                pane.rows = pane.tables[0].num_rows
        if not fired.any():
            self._maybe_spill()
            return []
        # allowed-lateness path: these windows fired already (or fire now, on first data)
        out = []
        for end, part in _split_by_value(states.filter(pa.array(fired)), ends[fired]):
            self._load(end)
            pane = self._panes.get(end)
            old = [_with_flags(x, self._flags, 1, 0) for x in (pane.tables if pane else [])]
            merged = self._fcore.merge(_concat([*old, _with_flags(part, self._flags, 0, 1)]))
            touched = merged.filter(pc.equal(merged.column(self._touched), 1))
            out.append(self._result(touched, _col_numpy(touched, self._fired) == 1))
            self._panes[end] = _Pane([merged.drop_columns(list(self._flags))])
        self._maybe_spill()
        return out

    # ----------------------------------------------------------------- spilling

    def _memory_limit(self) -> int:
        if self.state_memory_limit is not None:
            return int(self.state_memory_limit)
        budget = self.ctx.memory_budget if self.ctx is not None else TaskContext.memory_budget
        return budget // 2

    def _pane_bytes(self) -> int:
        return sum(t.nbytes for p in self._panes.values() for t in p.tables)

    def _spill_write(self, end: int, tables: list[pa.Table]) -> None:
        """Append state tables to the spill file of window ``end`` (creating it)."""
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return
        sf = self._spilled.get(end)
        if sf is None:
            if self._spill_ctx is None:
                self._spill_ctx = self.ctx if self.ctx is not None else TaskContext()
            sf = self._spilled[end] = SpillFile(self._spill_ctx, "window-state")
        for t in tables:
            for b in t.to_batches():
                sf.write(b)
        if self.ctx is not None:
            self.ctx.increment_counter("millstream", "state_spills")

    def _maybe_spill(self) -> None:
        """Move the panes of the latest-ending windows to disk while over the memory limit."""
        if not self._panes:
            return
        limit = self._memory_limit()
        used = self._pane_bytes()
        if used <= limit:
            return
        for end in sorted(self._panes, reverse=True):
            pane = self._panes.pop(end)
            used -= sum(t.nbytes for t in pane.tables)
            self._spill_write(end, pane.tables)
            if used <= limit:
                break

    def _read_spilled(self, end: int) -> list[pa.Table]:
        """The state tables of window ``end`` on disk (its file is deleted)."""
        sf = self._spilled.pop(end, None)
        if sf is None:
            return []
        batches = list(sf.read())
        sf.delete()
        # one table per batch: several tables make _pane_state merge them
        return [pa.Table.from_batches([b]) for b in batches]

    def _load(self, end: int) -> None:
        """Bring window ``end``'s spilled state back into memory (before its in-memory part)."""
        if end not in self._spilled:
            return
        tables = self._read_spilled(end)
        pane = self._panes.get(end)
        tables += pane.tables if pane is not None else []
        if tables:
            self._panes[end] = _Pane(tables)

    def _take_pane(self, end: int) -> pa.Table:
        """The merged state of window ``end`` (memory and disk), removed from the operator."""
        self._load(end)
        state = self._pane_state(end)
        del self._panes[end]
        return state

    def _snapshot_pane(self, end: int) -> pa.Table:
        """The merged state of window ``end``; a spilled window stays spilled (rewritten merged)."""
        if end not in self._spilled:
            return self._pane_state(end)
        pane = self._panes.pop(end, None)
        tables = self._read_spilled(end) + (pane.tables if pane is not None else [])
        state = self.core.merge(_concat(tables)) if len(tables) > 1 else tables[0]
        sf = self._spilled[end] = SpillFile(self._spill_ctx, "window-state")
        for b in state.to_batches():
            sf.write(b)
        return state

    def _drop_spills(self) -> None:
        for sf in getattr(self, "_spilled", {}).values():
            sf.delete()
        self._spilled = {}

    # ----------------------------------------------------------------- sessions

    def _bucket_ids(self, table: pa.Table | pa.RecordBatch) -> np.ndarray:
        if self.num_buckets == 1:
            return np.zeros(table.num_rows, dtype=np.int64)
        cols = [normalize_key(table.column(k)) for k in self.keys]
        return partition_ids(cols, table.num_rows, self.num_buckets)

    def _process_sessions(self, batch: pa.RecordBatch, t: np.ndarray) -> list[pa.Table]:
        gap = self.window.gap
        suspect = t + gap <= self._expiry()
        accepted = ~suspect
        if suspect.any():
            accepted = self._accept_suspects(batch, t, suspect)
        if not accepted.all():
            self._late(batch, ~accepted)
        if not accepted.any():
            return []
        rows = None if accepted.all() else np.flatnonzero(accepted)
        tt = t if rows is None else t[rows]
        states = self._session_cols(self._partial(batch, rows, tt, tt + gap), 1)
        bids = self._bucket_ids(states)
        out = []
        w = self.watermark
        for b in np.unique(bids):
            b = int(b)
            part = states if self.num_buckets == 1 else states.filter(pa.array(bids == b))
            cur = self._buckets[b]
            if cur is not None and cur.num_rows:
                old = cur.append_column(self._s_touched,
                                        pa.array(np.zeros(cur.num_rows, dtype=np.int8)))
                part = _concat([old, part])
            merged = self._merge_sessions(part)
            touched = _col_numpy(merged, self._s_touched) == 1
            merged = merged.drop_columns([self._s_touched])
            due = touched & (_col_numpy(merged, _WE) <= w)
            if due.any():
                emitted, merged = self._emit_sessions(merged, due)
                out += emitted
            self._buckets[b] = merged
        if out:
            out = [_concat(out).sort_by([("window_end", "ascending"),
                                         ("window_start", "ascending")])]
        return out

    def _session_cols(self, states: pa.Table, touched: int) -> pa.Table:
        """Add the emitted-windows lists (empty) and the touched flag to fresh session states."""
        n = states.num_rows
        empty = pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, dtype=np.int32)),
                                         pa.array([], pa.int64()))
        for name in self._em:
            states = states.append_column(name, empty)
        return states.append_column(self._s_touched,
                                    pa.array(np.full(n, touched, dtype=np.int8)))

    def _emit_sessions(self, table: pa.Table, due: np.ndarray) -> tuple[list[pa.Table], pa.Table]:
        """Result rows of the ``due`` sessions, retractions of their earlier windows, new state.

        A session remembers the windows it was emitted with; emitting it again under another
        window (it grew or merged) retracts those, so consumers never keep a stale session.
        """
        rows = table.filter(pa.array(due))
        n = rows.num_rows
        ws, we = _col_numpy(rows, _WS), _col_numpy(rows, _WE)
        em_s = rows.column(self._em[0]).combine_chunks()
        parents = np.asarray(pc.list_parent_indices(em_s), dtype=np.int64)
        fs = np.asarray(pc.list_flatten(em_s), dtype=np.int64)
        fe = np.asarray(pc.list_flatten(rows.column(self._em[1]).combine_chunks()), dtype=np.int64)
        same = (fs == ws[parents]) & (fe == we[parents])
        is_update = np.zeros(n, dtype=bool)
        is_update[parents[same]] = True
        res = self._result(rows, is_update)
        out = []
        gone = ~same
        if gone.any():
            ts = pa.timestamp("us", tz=self._tz)
            old = res.take(pa.array(parents[gone]))
            cols = {name: old.column(name) for name in old.column_names}
            cols["window_start"] = pa.array(fs[gone], pa.int64()).cast(ts)
            cols["window_end"] = pa.array(fe[gone], pa.int64()).cast(ts)
            for spec in self.specs:
                cols[spec.name] = pa.nulls(old.num_rows, old.schema.field(spec.name).type)
            cols["is_update"] = pa.array(np.zeros(old.num_rows, dtype=bool))
            cols["is_retraction"] = pa.array(np.ones(old.num_rows, dtype=bool))
            out.append(pa.table(cols))
        out.append(res)
        # from now on each due session has been emitted exactly under its current window
        mask = pa.array(due)
        full_ws, full_we = _col_numpy(table, _WS), _col_numpy(table, _WE)
        singles = pa.array(np.arange(table.num_rows + 1, dtype=np.int32))
        for name, vals in zip(self._em, (full_ws, full_we)):
            new = pa.ListArray.from_arrays(singles, pa.array(vals, pa.int64()))
            col = pc.if_else(mask, new, table.column(name).combine_chunks())
            table = table.set_column(table.schema.get_field_index(name), name, col)
        return out, table

    def _key_ids(self, table: pa.Table) -> np.ndarray:
        """A dense id per distinct key (nulls equal, as in grouping) for every row."""
        n = table.num_rows
        if not self.keys:
            return np.zeros(n, dtype=np.int64)
        kt = pa.table({**{k: normalize_key(table.column(k)) for k in self.keys},
                       "__row": pa.array(np.arange(n, dtype=np.int64))})
        g = kt.group_by(self.keys, use_threads=False).aggregate([("__row", "list")])
        lists = g.column("__row_list").combine_chunks()
        ids = np.empty(n, dtype=np.int64)
        ids[np.asarray(pc.list_flatten(lists))] = np.asarray(pc.list_parent_indices(lists))
        return ids

    def _merge_sessions(self, table: pa.Table) -> pa.Table:
        """Merge overlapping session intervals per key (and their states and flags)."""
        n = table.num_rows
        ws = _col_numpy(table, _WS)
        we = _col_numpy(table, _WE)
        kid = self._key_ids(table)
        # compress times to ranks so key-major coordinates cannot overflow int64
        uniq, inv = np.unique(np.concatenate([ws, we]), return_inverse=True)
        span = len(uniq) + 1
        rs, re_ = inv[:n] + kid * span, inv[n:] + kid * span
        order = np.lexsort((rs, kid))
        so, eo = rs[order], re_[order]
        runmax = np.maximum.accumulate(eo)
        new = np.ones(n, dtype=bool)
        new[1:] = so[1:] >= runmax[:-1]  # strict overlap merges; touching sessions stay apart
        heads = np.flatnonzero(new)
        gid = np.empty(n, dtype=np.int64)
        gid[order] = np.cumsum(new) - 1
        g_start = ws[order][heads]
        g_end = np.maximum.reduceat(we[order], heads)
        table = table.set_column(table.schema.get_field_index(_WS), _WS,
                                 pa.array(g_start[gid], pa.int64()))
        table = table.set_column(table.schema.get_field_index(_WE), _WE,
                                 pa.array(g_end[gid], pa.int64()))
        return self._score.merge(table)

    def _accept_suspects(self, batch: pa.RecordBatch, t: np.ndarray, suspect: np.ndarray
                         ) -> np.ndarray:
        """Which events, whose own session would be expired, join a live session (in arrival order).

        Such an event is accepted iff it overlaps a held session of its key or an earlier
        accepted event of this batch; so the outcome is the same as one event at a time.
        """
        gap = self.window.gap
        n = len(t)
        accepted = ~suspect
        keys_t = pa.table({k: normalize_key(batch.column(k)) for k in self.keys}) if self.keys \
            else pa.table({"__x": pa.nulls(n, pa.int8())})
        bids = self._bucket_ids(keys_t) if self.keys else np.zeros(n, dtype=np.int64)
        held = [self._buckets[int(b)] for b in np.unique(bids[suspect])]
        held = [h.select([*self.keys, _WS, _WE]) for h in held if h is not None and h.num_rows]
        m = sum(h.num_rows for h in held)
        batch_part = keys_t.select(self.keys) if self.keys else pa.table({})
        if self.keys:
            both = _concat([*(h.select(self.keys) for h in held), batch_part])
            kid = self._key_ids(both)
        else:
            kid = np.zeros(m + n, dtype=np.int64)
        h_ws = np.concatenate([_col_numpy(h, _WS) for h in held]) if held else np.zeros(0, np.int64)
        h_we = np.concatenate([_col_numpy(h, _WE) for h in held]) if held else np.zeros(0, np.int64)
        kid_h, kid_b = kid[:m], kid[m:]
        wanted = set(kid_b[suspect].tolist())
        sessions: dict[int, list[tuple[int, int]]] = {}
        for i in np.flatnonzero(np.isin(kid_h, list(wanted))):
            sessions.setdefault(int(kid_h[i]), []).append((int(h_ws[i]), int(h_we[i])))
        by_key: dict[int, list[int]] = {}
        for j in np.flatnonzero(np.isin(kid_b, list(wanted))):
            by_key.setdefault(int(kid_b[j]), []).append(int(j))
        for i in np.flatnonzero(suspect):
            k, lo = int(kid_b[i]), int(t[i])
            hi = lo + gap
            ok = any(s < hi and lo < e for s, e in sessions.get(k, ()))
            if not ok:
                for j in by_key.get(k, ()):
                    if j >= i:
                        break
                    if accepted[j] and abs(int(t[j]) - lo) < gap:
                        ok = True
                        break
            accepted[i] = ok
        return accepted

    def _fire_sessions(self, old: int, w: int) -> list[pa.Table]:
        out = []
        thresh = self._expiry()
        for b, tbl in enumerate(self._buckets):
            if tbl is None:
                continue
            we = _col_numpy(tbl, _WE)
            due = (we > old) & (we <= w)
            if due.any():
                emitted, tbl = self._emit_sessions(tbl, due)
                out += emitted
            keep = we > thresh
            if not keep.all():
                tbl = tbl.filter(pa.array(keep))
            self._buckets[b] = tbl if tbl.num_rows else None
        if out:
            out = [_concat(out).sort_by([("window_end", "ascending"),
                                         ("window_start", "ascending")])]
        return out
