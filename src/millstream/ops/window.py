"""Windows: assigners (tumbling, sliding, session, global with triggers) and keyed window
aggregation.

Conventions
-----------
* Event time comes from a timestamp column (any unit, with or without a time zone), an
  integer column of epoch milliseconds, or a date column; inside, it is int64 microseconds
  since the epoch (see :func:`millstream.core.arrow.event_time_micros`).
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
  ``AggSpec.name``), and, when ``allowed_lateness > 0``, a boolean ``is_update``
  (global windows differ: see "Global windows" below).

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
append counts in ``("millstream", "state_spills")``.

Spilling (sessions): over the same limit, the sessions that *end first* move to disk,
sorted by end into files of about a quarter of the limit (at least
``session_spill_min_rows`` sessions). Unlike a window pane, a session cannot take new
events blindly (an event may extend or bridge it), and the sessions that end last are the
ones still receiving events; those that end first are either fired and only held for
allowed lateness (their file is deleted unread once they expire) or get no in-order event
any more. Memory keeps, per file, the distinct key hashes and the span of its sessions; a
file comes back (whole) when an event of one of its keys overlaps that span, when the
watermark reaches its earliest unfired session end, and at ``finish()``, so a held session
never overlaps a spilled one and merging always sees every session it must. Expired
sessions are dropped as they come back. Every session carries the arrival rank of its
first event, and sessions are merged in that order, so ``first`` and ``collect_list`` do
not depend on what was on disk. Snapshots read spilled sessions (their files stay).

Global windows (:class:`GlobalWindow`, operator :class:`GlobalWindowAggregate`): one
window per key over all time. A *trigger* decides when a key's window emits ("fires"):
``CountTrigger(n)`` every n elements of the key (counted in arrival order, also inside
one batch); ``ProcessingTimeTrigger(interval)`` at the first multiple of ``interval``
(aligned to the epoch) of processing time after the first element of the pending pane
arrived, checked in ``advance_processing_time()``; ``EventTimeTrigger(every, offset)``
when the watermark reaches the first multiple of ``every`` (plus ``offset``) after the
earliest event time of the pending pane (at the next watermark advance); several joined
with ``|`` fire when any does. Only keys with elements since their last firing fire, and
``finish()`` fires every such key once more (so with no trigger a global window is a
plain keyed aggregation emitted at the end of input). Discarding (default): a firing
emits the aggregate of the elements since the key's previous firing, then forgets them
(a key that fired and got nothing since holds no state). Accumulating
(``accumulate=True``): a firing emits the aggregate of all the key's elements so far,
with ``is_update`` True when the key fired before (upsert by key: the row supersedes
the key's previous one). Results have the group keys and the aggregates, and no
``window_start``/``window_end``: a global window has no bounds, and a placeholder
(null, or the minimum/maximum timestamp, which Python datetimes cannot hold) would only
mislead. Elements are never late; without an event-time trigger the event-time column
is not used at all. Count triggers give the same panes in batch and streaming mode as
long as the elements of a key arrive in the same order (one input partition, or a
streaming job that reads partitions in the same order). Global-window state is one row
per key and is not spilled.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from millstream.core.arrow import event_time_micros, normalize_key, table_to_batches
from millstream.core.context import TaskContext
from millstream.core.hashing import partition_ids
from millstream.core.keygroups import key_hashes
from millstream.core.spill import GroupFiles, SpillFile
from millstream.core.time import MAX_WATERMARK, MIN_WATERMARK, Clock, WallClock
from millstream.core.units import format_duration, parse_duration
from millstream.errors import MillstreamError, PlanError, SchemaError
from millstream.expr.aggregates import AggSpec
from millstream.ops.aggregate import _AggCore
from millstream.ops.base import Batches, Operator

_EMPTY: tuple[pa.RecordBatch, ...] = ()

# Internal column names of the state tables.
_WS = "__millstream_ws"
_WE = "__millstream_we"
_ROW = "__millstream_row"
#: Schema metadata key marking a batch of pre-aggregated window states (its value: the
#: time zone of the event-time column, or empty)
_COMBINED = b"millstream.window_states"
_RESERVED = ("window_start", "window_end", "is_update", "is_retraction")

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
        off = f", offset={format_duration(self.offset)}" if self.offset else ""
        return f"Tumbling({format_duration(self.size)}{off})"


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
        off = f", offset={format_duration(self.offset)}" if self.offset else ""
        return f"Sliding({format_duration(self.size)}, every={format_duration(self.every)}{off})"


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
        return f"Session(gap={format_duration(self.gap)})"


# --------------------------------------------------------------------------- triggers


class Trigger:
    """When a global window emits a key's aggregate ("fires"); combine triggers with ``|``."""

    def parts(self) -> tuple[Trigger, ...]:
        """The single triggers this one fires on (any of them)."""
        return (self,)

    def describe(self) -> str:
        """Short text for explain()."""
        return type(self).__name__

    def __or__(self, other: Trigger) -> AnyTrigger:
        return AnyTrigger(self, other)

    def __repr__(self) -> str:
        return self.describe()


class CountTrigger(Trigger):
    """Fires a key every ``count`` elements of that key (in arrival order)."""

    def __init__(self, count: int) -> None:
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
            raise PlanError(f"count_trigger: count must be a positive int, got {count!r}")
        self.count = int(count)

    def describe(self) -> str:
        return f"count({self.count})"


class ProcessingTimeTrigger(Trigger):
    """Fires a key at the first multiple of ``interval`` of processing time (epoch-aligned)
    after the first element of its pending pane arrived."""

    def __init__(self, interval: str | int | _dt.timedelta) -> None:
        self.interval = parse_duration(interval, "processing_time_trigger(interval)")
        if self.interval <= 0:
            raise PlanError(f"processing_time_trigger: interval must be positive, got "
                            f"{interval!r}")

    def describe(self) -> str:
        return f"processing_time({format_duration(self.interval)})"


class EventTimeTrigger(Trigger):
    """Fires a key once the watermark reaches the first multiple of ``every`` (plus
    ``offset``) after the earliest event time in its pending pane."""

    def __init__(self, every: str | int | _dt.timedelta,
                 offset: str | int | _dt.timedelta = 0) -> None:
        self.every = parse_duration(every, "event_time_trigger(every)")
        if self.every <= 0:
            raise PlanError(f"event_time_trigger: every must be positive, got {every!r}")
        self.offset = parse_duration(offset, "event_time_trigger(offset)") % self.every

    def describe(self) -> str:
        off = f", offset={format_duration(self.offset)}" if self.offset else ""
        return f"event_time({format_duration(self.every)}{off})"


class AnyTrigger(Trigger):
    """Fires when any of its triggers fires (at most one of each kind)."""

    def __init__(self, *triggers: Trigger) -> None:
        flat: list[Trigger] = []
        for t in triggers:
            if not isinstance(t, Trigger):
                raise PlanError(f"a trigger is ms.count_trigger(...), "
                                f"ms.processing_time_trigger(...) or ms.event_time_trigger(...), "
                                f"got {t!r}")
            flat.extend(t.parts())
        kinds = [type(t).__name__ for t in flat]
        dup = sorted({k for k in kinds if kinds.count(k) > 1})
        if dup:
            raise PlanError(f"a trigger combines at most one trigger of each kind; {dup[0]} "
                            f"appears {kinds.count(dup[0])} times in {' | '.join(map(str, flat))}")
        self.triggers = tuple(flat)

    def parts(self) -> tuple[Trigger, ...]:
        return self.triggers

    def describe(self) -> str:
        return " | ".join(t.describe() for t in self.triggers)


class GlobalWindow(WindowAssigner):
    """One window per key over all time, emitted when its ``trigger`` fires and at the end of input.

    ``accumulate=False`` (default, discarding): each firing emits the aggregate of the
    key's elements since its previous firing, then forgets them. ``accumulate=True``:
    each firing emits the aggregate of all the key's elements so far (it supersedes the
    key's previous row). ``trigger=None``: fire only at the end of a bounded input.
    """

    def __init__(self, trigger: Trigger | list[Trigger] | tuple[Trigger, ...] | None = None,
                 accumulate: bool = False) -> None:
        if isinstance(trigger, (list, tuple)):
            trigger = AnyTrigger(*trigger) if trigger else None
        if trigger is not None and not isinstance(trigger, Trigger):
            raise PlanError(f"global_window(trigger=...): expected ms.count_trigger(n), "
                            f"ms.processing_time_trigger(interval), ms.event_time_trigger(every) "
                            f"or several combined with |, got {trigger!r}")
        if not isinstance(accumulate, bool):
            raise PlanError(f"global_window(accumulate=...): expected True or False, got "
                            f"{accumulate!r}")
        self.trigger = trigger
        self.accumulate = accumulate
        by = {type(t): t for t in (trigger.parts() if trigger is not None else ())}
        count = by.get(CountTrigger)
        proc = by.get(ProcessingTimeTrigger)
        event = by.get(EventTimeTrigger)
        #: elements per firing of a key (None: no count trigger)
        self.count: int | None = count.count if count is not None else None
        #: processing-time firing interval (µs; None: none)
        self.interval: int | None = proc.interval if proc is not None else None
        #: event-time firing period and offset (µs; every None: none)
        self.every: int | None = event.every if event is not None else None
        self.offset: int = event.offset if event is not None else 0

    def assign(self, t: np.ndarray) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        raise PlanError("a global window has no time bounds to assign")

    def describe(self) -> str:
        trig = self.trigger.describe() if self.trigger is not None else "end of input"
        mode = "accumulating" if self.accumulate else "discarding"
        return f"GlobalWindow(trigger={trig}, {mode})"


# --------------------------------------------------------------------------- helpers


def _col_numpy(table: pa.Table, name: str) -> np.ndarray:
    return np.asarray(table.column(name).combine_chunks() if table.num_rows else [],
                      dtype=np.int64)


def _concat(tables: list[pa.Table]) -> pa.Table:
    if len(tables) == 1:
        return tables[0]
    return pa.concat_tables(tables, promote_options="permissive")


def _split_by_value(table: pa.Table, values: np.ndarray, copy: bool = False
                    ) -> Iterable[tuple[int, pa.Table]]:
    """(value, rows) groups of a table by an int64 column, in ascending value order.

    The groups are slices of one reordered table, which they keep alive together; with
    ``copy`` each is a table of its own (for groups kept apart for long, e.g. restored
    state that spills piece by piece)."""
    if table.num_rows == 0:
        return
    order = np.argsort(values, kind="stable")
    sv = values[order]
    bounds = np.flatnonzero(np.diff(sv)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(sv)]])
    if copy:
        for s, e in zip(starts, ends):
            yield int(sv[s]), table.take(pa.array(order[s:e]))
        return
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


class _SessionSpill:
    """Sessions moved to disk: the file, and what tells when they must come back."""

    __slots__ = ("file", "hashes", "lo", "hi", "unfired")

    def __init__(self, file: SpillFile, hashes: np.ndarray | None, lo: int, hi: int,
                 unfired: int) -> None:
        self.file = file
        #: sorted distinct key hashes of the sessions (None without keys: every key)
        self.hashes = hashes
        #: earliest start and latest end of the sessions
        self.lo, self.hi = lo, hi
        #: earliest end of a session not fired yet (MAX_WATERMARK: all fired)
        self.unfired = unfired


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
    #: Fewest sessions per session spill file (unless fewer are spilled).
    session_spill_min_rows = 64

    def __new__(cls, window: Any = None, *args: Any, **kwargs: Any) -> WindowAggregate:
        # a global window has its own operator (same interface, other state)
        if cls is WindowAggregate and isinstance(window, GlobalWindow):
            cls = GlobalWindowAggregate
        return super().__new__(cls)

    def __init__(self, window: WindowAssigner, keys: list[str] | str | None, aggs: list[Any],
                 time_column: str, allowed_lateness: str | int | _dt.timedelta = 0,
                 emit: str = "final", name: str | None = None,
                 state_memory_limit: int | None = None) -> None:
        if not isinstance(window, WindowAssigner):
            raise PlanError(f"WindowAggregate: window must be Tumbling, Sliding or Session (or "
                            f"a GlobalWindow), got {window!r}")
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
        self._session_spills: list[_SessionSpill] = []
        self._spill_ctx: TaskContext | None = None
        super().__init__(name or (
            f"WindowAggregate({window.describe()}, keys={keys}, time={time_column!r}, aggs=["
            + ", ".join(f"{s.func}:{s.name}" for s in specs) + "]"
            + (f", allowed_lateness={format_duration(self.allowed_lateness)}"
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
            AggSpec("max", None, "__millstream_touched"),
            AggSpec("min", None, "__millstream_seq")])
        self._em = (self._score.state_cols[n][0], self._score.state_cols[n + 1][0])
        self._s_touched = self._score.state_cols[n + 2][0]
        # arrival rank of a session's first event: restores arrival order after spilling
        self._s_seq = self._score.state_cols[n + 3][0]
        self._pcore = _AggCore(core_keys, [*specs, AggSpec("min", _ROW, "__millstream_seq")])
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
        self._seq = 0
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
        if batch.schema.metadata and _COMBINED in batch.schema.metadata:
            return self._emit(self._process_combined(batch))
        batch, t = self._valid_times(batch)
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
            # spilled sessions that still have to fire come back (fired ones are done)
            self._load_session_spills([sp for sp in self._session_spills if sp.hi > w],
                                      self._expiry())
            for tbl in self._buckets:
                if tbl is None:
                    continue
                due = _col_numpy(tbl, _WE) > w
                if due.any():
                    out += self._emit_sessions(tbl, due)[0]
            self._buckets = [None] * self.num_buckets
            self._drop_spills()
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
        """The whole state (spilled parts included): one Arrow table of partial states plus
        small metadata (picklable)."""
        tables = [t for t in self._state_tables() if t.num_rows]
        state = _concat(tables).combine_chunks() if tables else None
        return {"version": 1, "operator": "WindowAggregate", "watermark": self.watermark,
                "tz": self._tz, "late_records": self.late_records,
                "invalid_records": self.invalid_records, "state": state, "seq": self._seq,
                "side": {k: list(v) for k, v in self._side.items()}}

    def _state_tables(self) -> list[pa.Table]:
        """Every state table, in memory or on disk (spilled state stays spilled)."""
        if self.window.merging:
            return [*(t for t in self._buckets if t is not None),
                    *self._read_session_spills(self._session_spills, self._expiry())]
        return [self._snapshot_pane(e) for e in sorted({*self._panes, *self._spilled})]

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
        self._seq = int(state.get("seq", 0))
        table: pa.Table | None = state["state"]
        if table is None or table.num_rows == 0:
            return
        self._load_state(table)

    def _add_state(self, table: pa.Table) -> None:
        """Add one key group's state table to what is restored already (the groups'
        keys are disjoint); spill when over the limit."""
        if self.window.merging:
            self._load_state(table)
            return
        for end, part in _split_by_value(table, _col_numpy(table, _WE), copy=True):
            if end in self._spilled:
                self._spill_write(end, [part])
            elif end in self._panes:
                pane = self._panes[end]
                pane.tables.append(part)
                pane.rows += part.num_rows
                if len(pane.tables) >= self.compact_tables:  # disjoint keys: concatenate
                    pane.tables = [_concat(pane.tables)]
            else:
                self._panes[end] = _Pane([part])
        self._spill_skip = 0  # measure now: groups can come in fast
        self._maybe_spill()

    def _load_state(self, table: pa.Table) -> None:
        """Put a snapshot's state table (not empty) into the operator's structures."""
        if self.window.merging:
            if self._s_seq not in table.schema.names:  # a snapshot from before spilling
                table = table.append_column(self._s_seq, pa.array(
                    np.arange(self._seq, self._seq + table.num_rows, dtype=np.int64)))
                self._seq += table.num_rows
            self._add_to_buckets(table)
            self._maybe_spill_sessions()
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

        Every group's snapshot carries the watermark, time zone and arrival counter; the
        counters and any undrained side output rows go with the smallest group (group 0 when
        there is no state).
        """
        if not self.keys:
            raise PlanError(f"{self.name}: a window without keys has no key groups; its state "
                            f"can only be restored at the same parallelism")
        full = self.snapshot()
        table: pa.Table | None = full["state"]
        groups: dict[int, dict[str, Any]] = {}
        if table is not None and table.num_rows:
            table, hashes = self._canonical_order(table)
            gids = (hashes % np.uint64(key_groups)).astype(np.int64)
            for g, part in _split_by_value(table, gids):
                groups[g] = self._group_snapshot(g, part.combine_chunks())
        first = min(groups, default=0)
        groups.setdefault(first, self._group_snapshot(first, None))
        groups[first].update(late_records=full["late_records"],
                             invalid_records=full["invalid_records"], side=full["side"])
        return groups

    def iter_key_group_snapshots(self, key_groups: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """``snapshot_by_key_group`` one group at a time, in group order, with memory for
        one window (or session file) and one group: when state has spilled, each window's
        state is split by key group into per-group files on disk first, and each group is
        read back only when its turn comes (the caller writes it out before the next)."""
        if not (self._spilled or self._session_spills):
            yield from sorted(self.snapshot_by_key_group(key_groups).items())
            return
        if not self.keys:
            raise PlanError(f"{self.name}: a window without keys has no key groups; its state "
                            f"can only be restored at the same parallelism")
        with GroupFiles(self._spill_context(), "snapshot-group") as files:
            for table in self._iter_state_tables():
                if not table.num_rows:
                    continue
                hashes = key_hashes([normalize_key(table.column(k)) for k in self.keys],
                                    table.num_rows)
                for g, part in _split_by_value(table, (hashes % np.uint64(key_groups))
                                               .astype(np.int64)):
                    files.put(g, part)
            first = min(files.groups(), default=0)
            for g in sorted({*files.groups(), first}):
                state = files.take(g)
                if state is not None:
                    state = self._canonical_order(state)[0].combine_chunks()
                snap = self._group_snapshot(g, state)
                if g == first:
                    snap.update(late_records=self.late_records,
                                invalid_records=self.invalid_records,
                                side={k: list(v) for k, v in self._side.items()})
                yield g, snap

    def _iter_state_tables(self) -> Iterator[pa.Table]:
        """``_state_tables()`` one table at a time (one window, or one session file)."""
        if self.window.merging:
            yield from (t for t in self._buckets if t is not None)
            for sp in self._session_spills:
                yield from self._read_session_spills([sp], self._expiry())
        else:
            for end in sorted({*self._panes, *self._spilled}):
                yield self._snapshot_pane(end)

    def _canonical_order(self, table: pa.Table) -> tuple[pa.Table, np.ndarray]:
        """Rows by (key hash, window start), and their key hashes: a group whose state did
        not change snapshots to the same bytes (incremental checkpoints store it once)."""
        hashes = key_hashes([normalize_key(table.column(k)) for k in self.keys],
                            table.num_rows)
        starts = (table.column(_WS).to_numpy() if _WS in table.schema.names
                  else np.zeros(table.num_rows, np.int64))
        order = np.lexsort((starts, hashes))
        return table.take(pa.array(order)), hashes[order]

    def _group_snapshot(self, group: int, state: pa.Table | None) -> dict[str, Any]:
        """One key group's snapshot (counters and side output go with the first group)."""
        return {"version": 1, "operator": "WindowAggregate", "watermark": self.watermark,
                "tz": self._tz, "late_records": 0, "invalid_records": 0, "state": state,
                "seq": self._seq, "side": {k: [] for k in self._side}, "key_group": group}

    #: ``restore_key_groups`` takes ``load``: the groups' state tables may still be blob
    #: references, read one group at a time (spilling as they come in)
    restores_key_groups_lazily = True

    def restore_key_groups(self, states: list[dict[str, Any]], load: Any = None) -> None:
        """Restore from ``snapshot_by_key_group`` states of the key groups this instance owns.

        With ``load`` (resolves checkpoint blob references in a value, passes anything
        else through), each group's state is read and put in place before the next, and
        spills over the memory limit as usual: a restore needs memory for one group."""
        for st in states:
            if not isinstance(st, dict) or st.get("operator") != "WindowAggregate" \
                    or "key_group" not in st:
                raise PlanError(f"{self.name}: cannot restore from {type(st).__name__}: not a "
                                f"WindowAggregate key-group snapshot")
        if load is not None:  # side-output batches may be blobs too
            states = [{**st, "side": load(st["side"])} for st in states]
            self.restore(self._merged_group_meta(states, None))
            for st in states:
                table = load(st["state"])
                if table is not None and table.num_rows:
                    self._add_state(table)
            return
        tables = [st["state"] for st in states if st["state"] is not None and st["state"].num_rows]
        self.restore(self._merged_group_meta(states, _concat(tables) if tables else None))

    def _merged_group_meta(self, states: list[dict[str, Any]], state: pa.Table | None
                           ) -> dict[str, Any]:
        """One ``snapshot()``-shaped dict from several key groups' snapshots."""
        return {
            "version": 1, "operator": "WindowAggregate",
            "watermark": max([MIN_WATERMARK, *(st["watermark"] for st in states)]),
            "tz": next((st["tz"] for st in states if st["tz"] is not None), None),
            "late_records": sum(st["late_records"] for st in states),
            "invalid_records": sum(st["invalid_records"] for st in states),
            "state": state,
            "seq": max([0, *(st.get("seq", 0) for st in states)]),
            "side": {k: [b for st in states for b in st["side"].get(k, [])]
                     for k in self.side_outputs},
        }

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

    def _valid_times(self, batch: pa.RecordBatch) -> tuple[pa.RecordBatch, np.ndarray]:
        """The rows with an event time and their times (µs); rows without one go to the
        "invalid" side output."""
        t, valid = event_time_micros(self._time_column(batch), self.time_column)
        if valid is not None:
            bad = batch.filter(pa.array(~valid))
            self._to_side("invalid", bad, "invalid_time_records")
            self.invalid_records += bad.num_rows
            batch = batch.filter(pa.array(valid))
            t = t[valid]
        return batch, t

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
        return self._add_states(self._partial(batch, rows, ws[alive], we[alive]))

    def _process_combined(self, batch: pa.RecordBatch) -> list[pa.Table]:
        """States a :class:`WindowCombiner` built upstream (never late here: it only
        combines rows whose windows outlive its watermark, which is never behind ours)."""
        tz = batch.schema.metadata[_COMBINED].decode()
        if tz and self._tz is None:
            self._tz = tz
        # merged: a task may have joined several senders' state batches into one
        states = self.core.merge(pa.Table.from_batches([batch.replace_schema_metadata(None)]))
        expired = _col_numpy(states, _WE) <= self._expiry()
        if expired.any():  # a broken invariant; say so loudly rather than drop silently
            raise MillstreamError(
                f"{self.name}: {int(expired.sum())} pre-aggregated window states arrived "
                f"after their windows expired (watermark {self.watermark}); run with window "
                f"combining off (MILLSTREAM_WINDOW_COMBINER=0) and report this")
        return self._add_states(states)

    def _add_states(self, states: pa.Table) -> list[pa.Table]:
        """Partial states of live windows into their panes; windows that fired already
        (allowed lateness) emit their updated rows."""
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
            sf = self._spilled[end] = SpillFile(self._spill_context(), "window-state")
        for t in tables:
            for b in t.to_batches():
                sf.write(b)
        if self.ctx is not None:
            self.ctx.increment_counter("millstream", "state_spills")

    def _maybe_spill(self) -> None:
        """Move the panes of the latest-ending windows to disk while over the memory limit."""
        if not self._panes:
            return
        # measuring is O(tables): far below the limit, measure only every few batches
        skip = getattr(self, "_spill_skip", 0)
        if skip > 0:
            self._spill_skip = skip - 1
            return
        limit = self._memory_limit()
        used = self._pane_bytes()
        if used <= limit:
            self._spill_skip = 16 if used < limit // 4 else 4 if used < limit // 2 else 0
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
        for sp in getattr(self, "_session_spills", ()):
            sp.file.delete()
        self._session_spills = []

    def _spill_context(self) -> TaskContext:
        if self._spill_ctx is None:
            self._spill_ctx = self.ctx if self.ctx is not None else TaskContext()
        return self._spill_ctx

    # ----------------------------------------------------------------- sessions

    def _bucket_ids(self, table: pa.Table | pa.RecordBatch) -> np.ndarray:
        if self.num_buckets == 1:
            return np.zeros(table.num_rows, dtype=np.int64)
        cols = [normalize_key(table.column(k)) for k in self.keys]
        return partition_ids(cols, table.num_rows, self.num_buckets)

    def _process_sessions(self, batch: pa.RecordBatch, t: np.ndarray) -> list[pa.Table]:
        gap = self.window.gap
        if self._session_spills:
            self._load_hit_session_spills(batch, t)
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
        states = self._session_partial(batch, rows, tt)
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
        self._maybe_spill_sessions()
        if out:
            out = [_concat(out).sort_by([("window_end", "ascending"),
                                         ("window_start", "ascending")])]
        return out

    def _session_partial(self, batch: pa.RecordBatch, rows: np.ndarray | None, t: np.ndarray
                         ) -> pa.Table:
        """Fresh (touched) session states ``[t, t + gap)`` of events, with the emitted-windows
        lists (empty) and the arrival rank of each one's first event."""
        table = pa.Table.from_batches([batch])
        if rows is not None:
            table = table.take(pa.array(rows))
        m = table.num_rows
        table = table.append_column(_WS, pa.array(t, pa.int64()))
        table = table.append_column(_WE, pa.array(t + self.window.gap, pa.int64()))
        table = table.append_column(_ROW, pa.array(np.arange(self._seq, self._seq + m,
                                                             dtype=np.int64)))
        self._seq += m
        states = self._pcore.partial(table)
        seq_name = self._pcore.state_cols[-1][0]
        seq = states.column(seq_name)
        states = states.drop_columns([seq_name])
        n = states.num_rows
        empty = pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, dtype=np.int32)),
                                         pa.array([], pa.int64()))
        for name in self._em:
            states = states.append_column(name, empty)
        states = states.append_column(self._s_touched, pa.array(np.ones(n, dtype=np.int8)))
        return states.append_column(self._s_seq, seq)

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
        """Merge overlapping session intervals per key (and their states and flags).

        Merged states follow the sessions' first arrivals (``first``, ``collect_list``),
        whatever the order of the held sessions in memory (or whether some were spilled).
        """
        table = table.sort_by(self._s_seq)
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
        # spilled sessions that fire now come back first (those already expired before
        # this watermark were dropped in memory too, so they are skipped)
        self._load_session_spills([sp for sp in self._session_spills if sp.unfired <= w],
                                  max(old - self.allowed_lateness, MIN_WATERMARK))
        for sp in [sp for sp in self._session_spills if sp.hi <= thresh]:
            sp.file.delete()  # every session in it fired before and is now expired
            self._session_spills.remove(sp)
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
        self._maybe_spill_sessions()
        if out:
            out = [_concat(out).sort_by([("window_end", "ascending"),
                                         ("window_start", "ascending")])]
        return out

    # ----------------------------------------------------------------- session spilling

    def _add_to_buckets(self, table: pa.Table) -> None:
        """Add merged sessions (disjoint from those held) to their buckets, in arrival order."""
        if table.num_rows == 0:
            return
        bids = self._bucket_ids(table)
        for b in np.unique(bids):
            b = int(b)
            part = table if self.num_buckets == 1 else table.filter(pa.array(bids == b))
            cur = self._buckets[b]
            self._buckets[b] = _concat([cur, part]) if cur is not None and cur.num_rows else part

    def _session_bytes(self) -> int:
        return sum(t.nbytes for t in self._buckets if t is not None)

    def _maybe_spill_sessions(self) -> None:
        """Over the memory limit: move the sessions that end first to disk, in files by end.

        Sessions ending first are the coldest: fired ones held for allowed lateness are
        only needed by a late event (and their file is deleted unread once they expire);
        unfired ones get no in-order event any more and are read back when they fire.
        """
        limit = self._memory_limit()
        used = self._session_bytes()
        if used <= limit:
            return
        held = [(b, t) for b, t in enumerate(self._buckets) if t is not None and t.num_rows]
        ends = np.concatenate([_col_numpy(t, _WE) for _, t in held])
        sizes = np.concatenate([np.full(t.num_rows, t.nbytes / t.num_rows) for _, t in held])
        order = np.argsort(ends, kind="stable")
        # down to three quarters of the limit, so that spills are not tiny and frequent
        need = used - limit * 3 // 4
        k = min(len(order), int(np.searchsorted(np.cumsum(sizes[order]), need)) + 1)
        chosen = np.zeros(len(order), dtype=bool)
        chosen[order[:k]] = True
        out, at = [], 0
        for b, t in held:
            mask = chosen[at:at + t.num_rows]
            at += t.num_rows
            if not mask.any():
                continue
            out.append(t.filter(pa.array(mask)))
            rest = t.filter(pa.array(~mask))
            self._buckets[b] = rest if rest.num_rows else None
        spilled = _concat(out)
        spilled = spilled.take(pa.array(np.argsort(_col_numpy(spilled, _WE), kind="stable")))
        # files of a quarter of the limit (not tiny: each costs an open and a check per batch)
        row_bytes = max(1.0, spilled.nbytes / spilled.num_rows)
        per_file = max(self.session_spill_min_rows, int(limit // 4 / row_bytes))
        for s in range(0, spilled.num_rows, per_file):
            self._write_session_spill(spilled.slice(s, per_file))

    def _write_session_spill(self, table: pa.Table) -> None:
        sf = SpillFile(self._spill_context(), "session-state")
        for b in table.to_batches():
            sf.write(b)
        sf.close()
        ws, we = _col_numpy(table, _WS), _col_numpy(table, _WE)
        unfired = we[we > self.watermark]
        if self.keys:
            cols = [normalize_key(table.column(k)) for k in self.keys]
            hashes = np.unique(key_hashes(cols, table.num_rows))
        else:
            hashes = None
        self._session_spills.append(_SessionSpill(
            sf, hashes, int(ws.min()), int(we.max()),
            int(unfired.min()) if len(unfired) else MAX_WATERMARK))
        if self.ctx is not None:
            self.ctx.increment_counter("millstream", "state_spills")

    def _read_session_spills(self, spills: list[_SessionSpill], expiry: int) -> list[pa.Table]:
        """The sessions in ``spills`` that end after ``expiry`` (the files stay)."""
        out = []
        for sp in spills:
            batches = [b for b in sp.file.read() if b.num_rows]
            if not batches:
                continue
            t = pa.Table.from_batches(batches)
            keep = _col_numpy(t, _WE) > expiry
            out.append(t if keep.all() else t.filter(pa.array(keep)))
        return out

    def _load_session_spills(self, spills: list[_SessionSpill], expiry: int) -> None:
        """Bring spilled sessions back into their buckets (dropping those ended by ``expiry``)."""
        if not spills:
            return
        tables = [t for t in self._read_session_spills(spills, expiry) if t.num_rows]
        for sp in spills:
            sp.file.delete()
            self._session_spills.remove(sp)
        if tables:
            self._add_to_buckets(_concat(tables))

    def _load_hit_session_spills(self, batch: pa.RecordBatch, t: np.ndarray) -> None:
        """Load the spill files that may hold a session one of these events overlaps.

        A file is loaded when an event's key is among the file's keys and its own session
        ``[t, t + gap)`` overlaps the span of the file's sessions; so a held session never
        overlaps a spilled one, and merging sees every session it has to.
        """
        lo, hi = t, t + self.window.gap
        hashes = None
        if self.keys:
            hashes = key_hashes([normalize_key(batch.column(k)) for k in self.keys],
                                batch.num_rows)
        hit = []
        for sp in self._session_spills:
            m = (lo < sp.hi) & (hi > sp.lo)
            if hashes is not None and m.any():
                m = np.isin(hashes[m], sp.hashes)
            if m.any():
                hit.append(sp)
        self._load_session_spills(hit, self._expiry())


# --------------------------------------------------------------------------- global windows

_PANE = "__millstream_pane"
_FPT_IN = "__millstream_fpt_in"
_FET_IN = "__millstream_fet_in"
_UP_IN = "__millstream_up_in"
_T = "__millstream_t"


class WindowCombiner(Operator):
    """Map-side combining for tumbling and sliding windows (Flink's local-global
    aggregation): before the key exchange, rows become partial window states per key and
    window, so far fewer rows cross the exchange. The :class:`WindowAggregate` after the
    exchange merges them as its own.

    Lateness stays exact: a row is combined only when every window it falls into ends
    after this operator's watermark minus the allowed lateness. The window operator's
    watermark is never ahead of the one its senders passed on, so such a row can never be
    late there. Other rows (possibly late, or with no event time) go on unchanged and the
    window operator decides, as without combining.

    Batch mode builds it with ``watermark=MIN_WATERMARK`` (no watermark moves before the
    end of input). Streaming builds it with ``watermark=None``: it passes rows through
    until its task calls :meth:`start_watermark` with the watermark the job starts from
    (``MIN_WATERMARK``, or the restored one; no window operator after it is ahead of
    that). The parallel executor does; the inline executor does not, as its exchanges
    are in-process and combining would only add a group-by (measured: 8.2 M events/s
    without it, 6.0 M with it); the operator stays in the plan so both executors restore
    each other's checkpoints.
    """

    def __init__(self, window: WindowAssigner, keys: list[str], specs: list[AggSpec],
                 time_column: str, allowed_lateness: int = 0,
                 watermark: int | None = None) -> None:
        if window.merging or isinstance(window, GlobalWindow):
            raise PlanError(f"WindowCombiner: only tumbling and sliding windows combine, "
                            f"not {window.describe()}")
        super().__init__(f"WindowCombiner({window.describe()}, keys={list(keys)})")
        self.window = window
        self.keys = list(keys)
        self.time_column = time_column
        self.allowed_lateness = int(allowed_lateness)
        self.watermark = watermark
        self.core = _AggCore([_WS, _WE, *self.keys], list(specs))

    def start_watermark(self, watermark: int) -> None:
        """Start combining: no window operator downstream is ahead of ``watermark``."""
        self.watermark = int(watermark) if self.watermark is None \
            else max(self.watermark, int(watermark))

    def on_watermark(self, watermark: int) -> Batches:
        if self.watermark is not None:  # not started: pass-through
            self.watermark = max(self.watermark, int(watermark))
        return _EMPTY

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        if batch.num_rows == 0 or self.watermark is None:
            return (batch,)
        col = batch.column(self.time_column) if self.time_column in batch.schema.names \
            else None
        if col is None or any(k not in batch.schema.names for k in self.keys):
            return (batch,)  # the window operator names what is missing
        t, valid = event_time_micros(col, self.time_column)
        if valid is None:
            valid = np.ones(batch.num_rows, dtype=bool)
            tv = t
        else:
            tv = t[valid]
        rows = np.flatnonzero(valid)
        idx, ws, we = self.window.assign(tv)
        if idx is None:
            first_end = we
        else:  # every row lies in at least one window; its windows are contiguous in idx
            starts = np.flatnonzero(np.r_[True, idx[1:] != idx[:-1]])
            first_end = np.minimum.reduceat(we, starts)
        expiry = self.watermark - self.allowed_lateness \
            if self.watermark > MIN_WATERMARK + self.allowed_lateness else MIN_WATERMARK
        safe = first_end > expiry
        n_safe = int(safe.sum())
        if n_safe == 0:
            return (batch,)
        combine = rows[safe]
        if idx is None:
            take, ws, we = combine, ws[safe], we[safe]
        else:
            keep = safe[idx]
            take, ws, we = rows[idx[keep]], ws[keep], we[keep]
        table = pa.Table.from_batches([batch])
        if idx is not None or n_safe < batch.num_rows:  # (all rows, once each: no copy)
            table = table.take(pa.array(take))
        table = table.append_column(_WS, pa.array(ws, pa.int64()))
        table = table.append_column(_WE, pa.array(we, pa.int64()))
        states = self.core.partial(table)
        tz = col.type.tz if pa.types.is_timestamp(col.type) and col.type.tz else ""
        states = states.replace_schema_metadata({_COMBINED: tz.encode()})
        out: list[pa.RecordBatch] = states.combine_chunks().to_batches()
        if n_safe < batch.num_rows:  # the rest goes on as it came (in its order)
            mask = np.ones(batch.num_rows, dtype=bool)
            mask[combine] = False
            out.append(batch.filter(pa.array(mask)))
        return out

    def describe(self) -> str:
        return self.name


class ProcessingTimeService:
    """Where an operator reads processing time; the streaming runtime sets ``clock`` to the
    task's clock (a ``VirtualClock`` in tests)."""

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock: Clock = clock or WallClock()

    def now(self) -> int:
        """The clock's time (µs since the epoch)."""
        return int(self.clock.now())


class GlobalWindowAggregate(WindowAggregate):
    """Keyed aggregation in one global window per key, emitted by triggers (see the module
    docstring, "Global windows"). ``WindowAggregate(GlobalWindow(...), ...)`` builds one."""

    #: its state (one row per key) is not spilled; it restores all owned groups at once
    restores_key_groups_lazily = False

    def __init__(self, window: WindowAssigner, keys: list[str] | str | None, aggs: list[Any],
                 time_column: str | None = None,
                 allowed_lateness: str | int | _dt.timedelta = 0, emit: str = "final",
                 name: str | None = None, state_memory_limit: int | None = None) -> None:
        if not isinstance(window, GlobalWindow):
            raise PlanError(f"GlobalWindowAggregate: window must be a GlobalWindow, got "
                            f"{window!r}")
        if parse_duration(allowed_lateness, "allowed_lateness"):
            raise PlanError("a global window never closes, so allowed_lateness does not apply "
                            "to it; leave it out")
        if window.every is not None and not time_column:
            raise PlanError("event_time_trigger needs the event time: call "
                            "with_watermark(column, ...) first or give window(..., on=column)")
        if window.every is None:
            time_column = None  # event time plays no part: the column is not even needed
        keys = [keys] if isinstance(keys, str) else list(keys or [])
        specs = [a if isinstance(a, AggSpec) else self._to_spec(a) for a in aggs]
        if name is None:
            on = f", time={time_column!r}" if time_column else ""
            name = (f"WindowAggregate({window.describe()}, keys={keys}{on}, aggs=["
                    + ", ".join(f"{s.func}:{s.name}" for s in specs) + "])")
        super().__init__(window, keys, specs, time_column or "", 0, emit, name,
                         state_memory_limit)
        self.time_column = time_column
        self.accumulate = window.accumulate
        self.count, self.interval = window.count, window.interval
        self.every, self.offset = window.every, window.offset
        #: processing time (the streaming runtime hands its clock to ``timers.clock``)
        self.timers = ProcessingTimeService()
        n = len(specs)
        # per (pane, key): the aggregate states plus elements since the last firing (n),
        # the earliest processing/event firing time of those (fpt, fet) and "fired before" (up)
        self._gcore = _AggCore([_PANE, *keys], [
            # (count of a never-null column: a second count_all would clash with the user's)
            *specs, AggSpec("count", _UP_IN, "__millstream_n"),
            AggSpec("min", _FPT_IN, "__millstream_fpt"), AggSpec("min", _FET_IN, "__millstream_fet"),
            AggSpec("max", _UP_IN, "__millstream_up")])
        self._n, self._fpt, self._fet, self._up = (self._gcore.state_cols[n + i][0]
                                                   for i in range(4))
        self._out_core = _AggCore(keys, specs)
        self._scan_core = _AggCore([_T], specs)
        self._state_names = [c for cols in self._gcore.state_cols[:n] for c in cols]
        self.num_buckets = 16 if keys else 1
        self._buckets = [None] * self.num_buckets

    def set_clock(self, clock: Clock) -> None:
        """Read processing time from ``clock`` (the job's clock)."""
        self.timers.clock = clock

    @property
    def clock(self) -> Clock:
        """The clock processing-time triggers follow."""
        return self.timers.clock

    # ----------------------------------------------------------------- interface

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        """Add a batch of elements; returns the rows of count-trigger firings it completes."""
        if batch.num_rows == 0:
            return _EMPTY
        if self.watermark == MAX_WATERMARK:
            raise PlanError(f"{self.name}: process() called after finish()")
        fet: np.ndarray | int = MAX_WATERMARK
        if self.every is not None:
            batch, t = self._valid_times(batch)
            if batch.num_rows == 0:
                return _EMPTY
            fet = (np.floor_divide(t - self.offset, self.every) + 1) * self.every + self.offset
        else:
            self._check_keys(batch)
        m = batch.num_rows
        fpt = MAX_WATERMARK
        if self.interval is not None:
            fpt = (self.timers.now() // self.interval + 1) * self.interval
        table = pa.Table.from_batches([batch])
        table = table.append_column(_FPT_IN, pa.array(np.broadcast_to(
            np.asarray(fpt, dtype=np.int64), (m,)).copy()))
        table = table.append_column(_FET_IN, pa.array(np.broadcast_to(
            np.asarray(fet, dtype=np.int64), (m,)).copy()))
        table = table.append_column(_UP_IN, pa.array(np.zeros(m, dtype=np.int8)))
        bids = self._bucket_ids(table)
        out: list[pa.Table] = []
        for b in np.unique(bids):
            part = table if self.num_buckets == 1 else table.filter(pa.array(bids == b))
            out += self._add(int(b), part)
        return self._emit(out)

    def advance_processing_time(self) -> Batches:
        """Fire the keys whose processing-time trigger is due by the clock."""
        if self.interval is None or self.watermark == MAX_WATERMARK:
            return _EMPTY
        now = self.timers.now()
        return self._emit(self._fire(lambda tbl: _col_numpy(tbl, self._fpt) <= now))

    def on_watermark(self, watermark: int) -> Batches:
        """Advance event time; fire the keys whose event-time trigger is due."""
        w = int(watermark)
        if w <= self.watermark:
            return _EMPTY
        self.watermark = w
        if self.every is None:
            return _EMPTY
        return self._emit(self._fire(lambda tbl: _col_numpy(tbl, self._fet) <= w))

    def finish(self) -> Batches:
        """End of input: every key with elements since its last firing fires once more."""
        out = self._fire(lambda tbl: np.ones(tbl.num_rows, dtype=bool))
        self._buckets = [None] * self.num_buckets
        self.watermark = MAX_WATERMARK
        return self._emit(out)

    # ----------------------------------------------------------------- state

    def _state_tables(self) -> list[pa.Table]:
        return [t for t in self._buckets if t is not None]

    def _load_state(self, table: pa.Table) -> None:
        bids = self._bucket_ids(table)
        for b in np.unique(bids):
            part = table if self.num_buckets == 1 else table.filter(pa.array(bids == b))
            cur = self._buckets[int(b)]
            self._buckets[int(b)] = _concat([cur, part]) if cur is not None else part

    def _check_keys(self, batch: pa.RecordBatch) -> None:
        missing = [k for k in self.keys if k not in batch.schema.names]
        if missing:
            raise SchemaError(f"{self.name}: no key column(s) {missing}; columns are "
                              f"{batch.schema.names}")

    # ----------------------------------------------------------------- firing

    def _add(self, b: int, part: pa.Table) -> list[pa.Table]:
        """Merge new elements of bucket ``b``; emit the panes a count trigger completes."""
        cur = self._buckets[b]
        m = part.num_rows
        if self.count is None:
            chunk = np.zeros(m, dtype=np.int64)
        else:
            # each element's position among its key's elements since the last firing:
            # element g (0-based) belongs to pane g // count; full panes fire now
            keys_t = pa.table({k: normalize_key(part.column(k)) for k in self.keys}) \
                if self.keys else \
                pa.table({"__x": pa.nulls(m, pa.int8())})
            if cur is not None and cur.num_rows and self.keys:
                kid = self._key_ids(_concat([cur.select(self.keys), keys_t]))
                kid_s, kid_b = kid[:cur.num_rows], kid[cur.num_rows:]
            else:
                kid = self._key_ids(keys_t)
                kid_s, kid_b = kid[:0], kid
                if cur is not None and cur.num_rows:  # no keys: the one row of state
                    kid_s = np.zeros(cur.num_rows, dtype=np.int64)
            c0 = np.zeros(int(kid.max()) + 1 if len(kid) else 1, dtype=np.int64)
            if len(kid_s):
                c0[kid_s] = _col_numpy(cur, self._n)
            order = np.argsort(kid_b, kind="stable")
            sk = kid_b[order]
            first = np.ones(m, dtype=bool)
            first[1:] = sk[1:] != sk[:-1]
            starts = np.flatnonzero(first)
            rank_sorted = np.arange(m) - np.repeat(starts, np.diff(np.append(starts, m)))
            rank = np.empty(m, dtype=np.int64)
            rank[order] = rank_sorted
            chunk = (c0[kid_b] + rank) // self.count
        states = self._gcore.partial(part.append_column(_PANE, pa.array(chunk, pa.int64())))
        merged = self._gcore.merge(_concat([cur, states])) if cur is not None else states
        if self.count is None:
            self._buckets[b] = merged
            return []
        full = _col_numpy(merged, self._n) == self.count
        if not full.any():
            self._buckets[b] = merged if merged.num_rows else None
            return []
        if not self.accumulate:
            # a key's panes in order (grouping does not keep it)
            out = [self._result(merged.filter(pa.array(full)).sort_by(_PANE), None)]
            rest = merged.filter(pa.array(~full))
            self._buckets[b] = self._pane_zero(rest) if rest.num_rows else None
            return out
        return self._add_accumulating(b, merged)

    def _add_accumulating(self, b: int, merged: pa.Table) -> list[pa.Table]:
        """Accumulating count firings: every full pane emits the running aggregate of its key."""
        kid = self._key_ids(merged)
        pane = _col_numpy(merged, _PANE)
        order = np.lexsort((pane, kid))
        merged = merged.take(pa.array(order))
        kid, pane = kid[order], pane[order]
        n = merged.num_rows
        last = np.ones(n, dtype=bool)
        last[:-1] = kid[1:] != kid[:-1]
        # panes of a key are 0..k in order: pane is the position within the key
        running = self._prefix_merge(merged, pane)
        full = _col_numpy(merged, self._n) == self.count
        up = (pane > 0) | (_col_numpy(merged, self._up) == 1)
        cols = {name: running.column(name) for name in self._state_names}
        acc = merged
        for name, col in cols.items():
            acc = acc.set_column(acc.schema.get_field_index(name), name, col)
        out = [self._result(acc.filter(pa.array(full)), up[full])]
        # the new state of each key: its running aggregate, pending = the last, open pane
        keep = acc.filter(pa.array(last))
        open_ = ~full[last]
        never = np.full(keep.num_rows, MAX_WATERMARK, dtype=np.int64)
        fired_any = np.maximum.reduceat(full.astype(np.int8), np.flatnonzero(
            np.r_[True, kid[1:] != kid[:-1]])) == 1
        keep = _set_cols(keep, {
            self._n: np.where(open_, _col_numpy(keep, self._n), 0),
            self._fpt: np.where(open_, _col_numpy(keep, self._fpt), never),
            self._fet: np.where(open_, _col_numpy(keep, self._fet), never),
            self._up: (fired_any | up[last]).astype(np.int8)})
        self._buckets[b] = self._pane_zero(keep)
        return out

    def _prefix_merge(self, table: pa.Table, pos: np.ndarray) -> pa.Table:
        """Running (inclusive) merge of the aggregate states of consecutive rows of each group.

        Rows of a group are contiguous and ``pos`` numbers them 0, 1, ...; a parallel scan
        takes log2(longest group) merges, earlier rows first (so ``first`` and
        ``collect_list`` keep arrival order).
        """
        cur = table.select(self._state_names)
        n = cur.num_rows
        idx = np.arange(n, dtype=np.int64)
        d = 1
        top = int(pos.max()) if n else 0
        while d <= top:
            tgt = idx[pos >= d]
            shifted = cur.take(pa.array(tgt - d)).append_column(_T, pa.array(tgt))
            own = cur.append_column(_T, pa.array(idx))
            merged = self._scan_core.merge(_concat([shifted, own])).sort_by(_T)
            cur = merged.select(self._state_names)
            d *= 2
        return cur

    def _fire(self, due_of: Any) -> list[pa.Table]:
        """Fire every key with pending elements for which ``due_of(bucket table)`` holds."""
        out = []
        for b, tbl in enumerate(self._buckets):
            if tbl is None or not tbl.num_rows:
                continue
            due = (_col_numpy(tbl, self._n) > 0) & due_of(tbl)
            if not due.any():
                continue
            rows = tbl.filter(pa.array(due))
            if not self.accumulate:
                out.append(self._result(rows, None))
                rest = tbl.filter(pa.array(~due))
                self._buckets[b] = rest if rest.num_rows else None
                continue
            out.append(self._result(rows, _col_numpy(rows, self._up) == 1))
            never = np.full(tbl.num_rows, MAX_WATERMARK, dtype=np.int64)
            self._buckets[b] = _set_cols(tbl, {
                self._n: np.where(due, 0, _col_numpy(tbl, self._n)),
                self._fpt: np.where(due, never, _col_numpy(tbl, self._fpt)),
                self._fet: np.where(due, never, _col_numpy(tbl, self._fet)),
                self._up: np.where(due, 1, _col_numpy(tbl, self._up)).astype(np.int8)})
        return out

    def _pane_zero(self, table: pa.Table) -> pa.Table:
        return _set_cols(table, {_PANE: np.zeros(table.num_rows, dtype=np.int64)})

    def _result(self, states: pa.Table, is_update: Any) -> pa.Table:
        """States -> result rows: keys, aggregates and, when accumulating, ``is_update``."""
        res = self._out_core.finalize(states)
        if self.accumulate:
            flag = np.broadcast_to(np.asarray(is_update, dtype=bool), (res.num_rows,))
            res = res.append_column("is_update", pa.array(flag, pa.bool_()))
        return res


def _set_cols(table: pa.Table, cols: dict[str, np.ndarray]) -> pa.Table:
    """Replace (or add) int columns of a table with numpy arrays (int8 stays int8)."""
    for name, values in cols.items():
        i = table.schema.get_field_index(name)
        typ = table.schema.field(name).type if i >= 0 else pa.from_numpy_dtype(values.dtype)
        arr = pa.array(values, typ)
        table = table.set_column(i, name, arr) if i >= 0 else table.append_column(name, arr)
    return table
