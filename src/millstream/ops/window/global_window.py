"""Global windows: one window per key over all time, emitted when a trigger fires
(:class:`GlobalWindowAggregate`), and where operators read processing time
(:class:`ProcessingTimeService`).

A *trigger* (:mod:`millstream.expr.windows`) decides when a key's window emits ("fires"):
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
from typing import Any

import numpy as np
import pyarrow as pa

from millstream.core.arrow import normalize_key
from millstream.core.time import MAX_WATERMARK, Clock, WallClock
from millstream.core.units import parse_duration
from millstream.errors import PlanError, SchemaError
from millstream.expr.aggregates import AggSpec
from millstream.expr.windows import GlobalWindow, WindowAssigner
from millstream.ops.aggregate import _AggCore
from millstream.ops.base import Batches
from millstream.ops.window.operator import WindowAggregate
from millstream.ops.window.tables import (
    _EMPTY,
    WindowState,
    _bucket_ids,
    _col_numpy,
    _concat,
    _key_ids,
    _set_cols,
)

_PANE = "__millstream_pane"
_FPT_IN = "__millstream_fpt_in"
_FET_IN = "__millstream_fet_in"
_UP_IN = "__millstream_up_in"
_T = "__millstream_t"


class ProcessingTimeService:
    """Where an operator reads processing time; the streaming runtime sets ``clock`` to the
    task's clock (a ``VirtualClock`` in tests)."""

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock: Clock = clock or WallClock()

    def now(self) -> int:
        """The clock's time (µs since the epoch)."""
        return int(self.clock.now())


class GlobalStore(WindowState):
    """A global window operator's state: per hash bucket of the key, one table with a row
    per (pane, key) holding the aggregate states and the trigger bookkeeping."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys
        self.num_buckets = 16 if keys else 1
        self.buckets: list[pa.Table | None] = [None] * self.num_buckets

    def state_tables(self) -> list[pa.Table]:
        return [t for t in self.buckets if t is not None]

    def load(self, table: pa.Table) -> None:
        bids = _bucket_ids(table, self.keys, self.num_buckets)
        for b in np.unique(bids):
            part = table if self.num_buckets == 1 else table.filter(pa.array(bids == b))
            cur = self.buckets[int(b)]
            self.buckets[int(b)] = _concat([cur, part]) if cur is not None else part

    def close(self) -> None:
        self.buckets = [None] * self.num_buckets


class GlobalWindowAggregate(WindowAggregate):
    """Keyed aggregation in one global window per key, emitted by triggers (see the module
    docstring). The physical planner builds one for a :class:`GlobalWindow`."""

    #: its state (one row per key) is not spilled; it restores all owned groups at once
    restores_key_groups_lazily = False
    global_windows = True
    _store: GlobalStore

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

    def _new_store(self) -> GlobalStore:
        return GlobalStore(self.keys)

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
        bids = _bucket_ids(table, self.keys, self._store.num_buckets)
        out: list[pa.Table] = []
        for b in np.unique(bids):
            part = table if self._store.num_buckets == 1 else table.filter(pa.array(bids == b))
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
        self._store.buckets = [None] * self._store.num_buckets
        self.watermark = MAX_WATERMARK
        return self._emit(out)

    # ----------------------------------------------------------------- state

    def _check_keys(self, batch: pa.RecordBatch) -> None:
        missing = [k for k in self.keys if k not in batch.schema.names]
        if missing:
            raise SchemaError(f"{self.name}: no key column(s) {missing}; columns are "
                              f"{batch.schema.names}")

    # ----------------------------------------------------------------- firing

    def _add(self, b: int, part: pa.Table) -> list[pa.Table]:
        """Merge new elements of bucket ``b``; emit the panes a count trigger completes."""
        cur = self._store.buckets[b]
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
                kid = _key_ids(_concat([cur.select(self.keys), keys_t]), self.keys)
                kid_s, kid_b = kid[:cur.num_rows], kid[cur.num_rows:]
            else:
                kid = _key_ids(keys_t, self.keys)
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
            self._store.buckets[b] = merged
            return []
        full = _col_numpy(merged, self._n) == self.count
        if not full.any():
            self._store.buckets[b] = merged if merged.num_rows else None
            return []
        if not self.accumulate:
            # a key's panes in order (grouping does not keep it)
            out = [self._result(merged.filter(pa.array(full)).sort_by(_PANE), None)]
            rest = merged.filter(pa.array(~full))
            self._store.buckets[b] = self._pane_zero(rest) if rest.num_rows else None
            return out
        return self._add_accumulating(b, merged)

    def _add_accumulating(self, b: int, merged: pa.Table) -> list[pa.Table]:
        """Accumulating count firings: every full pane emits the running aggregate of its key."""
        kid = _key_ids(merged, self.keys)
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
        self._store.buckets[b] = self._pane_zero(keep)
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
        for b, tbl in enumerate(self._store.buckets):
            if tbl is None or not tbl.num_rows:
                continue
            due = (_col_numpy(tbl, self._n) > 0) & due_of(tbl)
            if not due.any():
                continue
            rows = tbl.filter(pa.array(due))
            if not self.accumulate:
                out.append(self._result(rows, None))
                rest = tbl.filter(pa.array(~due))
                self._store.buckets[b] = rest if rest.num_rows else None
                continue
            out.append(self._result(rows, _col_numpy(rows, self._up) == 1))
            never = np.full(tbl.num_rows, MAX_WATERMARK, dtype=np.int64)
            self._store.buckets[b] = _set_cols(tbl, {
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
