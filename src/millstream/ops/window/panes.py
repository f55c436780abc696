"""Tumbling and sliding window state: one *pane* per window end, and its spilling to disk.

A pane holds the partial states of every (key, window) ending at one instant, as a list
of state tables compacted by merging. A window that already fired but is not expired
(allowed lateness) emits an updated row for each key an allowed late event touches.

Spilling: when the panes held in memory exceed ``state_memory_limit`` bytes (default:
half the task's ``memory_budget``), the panes of the windows that end latest (they fire
last) move to disk, one ``SpillFile`` per window end; more state for a spilled window is
appended to its file. A spilled pane is read back (and merged) when its window fires,
gets an allowed late update, or at snapshot time; its file is deleted when the window
fires or expires, and in ``close()``. Each move or append counts in
``("millstream", "state_spills")``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from millstream.core.spill import SpillFile
from millstream.expr.aggregates import AggSpec
from millstream.ops.aggregate import _AggCore
from millstream.ops.window.tables import (
    _WE,
    _WS,
    WindowState,
    _col_numpy,
    _concat,
    _split_by_value,
    _with_flags,
)

if TYPE_CHECKING:
    from millstream.ops.window.operator import WindowAggregate


class _Pane:
    """Partial states of every (key, window) ending at one instant: a list of state tables."""

    __slots__ = ("tables", "rows")

    def __init__(self, tables: list[pa.Table] | None = None) -> None:
        self.tables = tables or []
        self.rows = sum(t.num_rows for t in self.tables)


class PaneStore(WindowState):
    """The panes of a tumbling or sliding window operator, in memory and spilled."""

    def __init__(self, op: WindowAggregate) -> None:
        self.op = op
        #: pane per window end held in memory
        self.panes: dict[int, _Pane] = {}
        #: spill file per window end whose pane (or part of it) is on disk
        self.spilled: dict[int, SpillFile] = {}
        #: window ends whose state (in memory or on disk) may hold several rows of a key
        #: (combined states added as they came): merged when next read
        self.unmerged: set[int] = set()
        self._spill_skip = 0
        # the operator's algebra plus two hidden max-aggregated flags: "fired" and "touched"
        n = len(op.specs)
        self._fcore = _AggCore([_WS, _WE, *op.keys], [
            *op.specs, AggSpec("max", None, "__millstream_fired"),
            AggSpec("max", None, "__millstream_touched")])
        self._fired = self._fcore.state_cols[n][0]
        self._touched = self._fcore.state_cols[n + 1][0]
        self._flags = (self._fired, self._touched)

    # ----------------------------------------------------------------- events and firing

    def process(self, batch: pa.RecordBatch, t: np.ndarray) -> list[pa.Table]:
        idx, ws, we = self.op.window.assign(t)
        alive = we > self.op._expiry()
        if idx is None:
            late = ~alive
            rows = None if alive.all() else np.flatnonzero(alive)
        else:
            late = np.bincount(idx[alive], minlength=len(t)) == 0
            rows = idx[alive]
        if late.any():
            self.op._late(batch, late)
        if not alive.any():
            return []
        return self.add_states(self._partial(batch, rows, ws[alive], we[alive]))

    def _partial(self, batch: pa.RecordBatch, rows: np.ndarray | None, ws: np.ndarray,
                 we: np.ndarray) -> pa.Table:
        table = pa.Table.from_batches([batch])
        if rows is not None:
            table = table.take(pa.array(rows))
        table = table.append_column(_WS, pa.array(ws, pa.int64()))
        table = table.append_column(_WE, pa.array(we, pa.int64()))
        return self.op.core.partial(table)

    def add_states(self, states: pa.Table, unique: bool = True) -> list[pa.Table]:
        """Partial states of live windows into their panes; windows that fired already
        (allowed lateness) emit their updated rows. ``unique=False``: ``states`` may hold
        several rows of a (window, key) (a combiner's, as they came): they are merged
        when the window's state is next read, not now."""
        op = self.op
        ends = _col_numpy(states, _WE)
        fired = ends <= op.watermark
        pending = states.filter(pa.array(~fired)) if fired.any() else states
        for end, part in _split_by_value(pending, ends[~fired]):
            if not unique:
                self.unmerged.add(end)
            if end in self.spilled:  # its pane lives on disk: append there
                self._spill_write(end, [part])
                continue
            pane = self.panes.get(end)
            if pane is None:
                self.panes[end] = _Pane([part])
                continue
            pane.tables.append(part)
            pane.rows += part.num_rows
            if len(pane.tables) >= op.compact_tables:
                pane.tables = [op.core.merge(_concat(pane.tables))]
                pane.rows = pane.tables[0].num_rows
                if end not in self.spilled:
                    self.unmerged.discard(end)
        if not fired.any():
            self.maybe_spill()
            return []
        # allowed-lateness path: these windows fired already (or fire now, on first data)
        out = []
        for end, part in _split_by_value(states.filter(pa.array(fired)), ends[fired]):
            self.unmerged.discard(end)  # (merged here)
            self._load(end)
            pane = self.panes.get(end)
            old = [_with_flags(x, self._flags, 1, 0) for x in (pane.tables if pane else [])]
            merged = self._fcore.merge(_concat([*old, _with_flags(part, self._flags, 0, 1)]))
            touched = merged.filter(pc.equal(merged.column(self._touched), 1))
            out.append(op._result(touched, _col_numpy(touched, self._fired) == 1))
            self.panes[end] = _Pane([merged.drop_columns(list(self._flags))])
        self.maybe_spill()
        return out

    def fire(self, old: int, w: int) -> list[pa.Table]:
        out = []
        thresh = self.op._expiry()
        for end in sorted(e for e in {*self.panes, *self.spilled} if old < e <= w):
            if end > thresh:
                self._load(end)
                out.append(self.op._result(self._pane_state(end), False))
            else:  # fires and expires at once: read its state back for the last time
                out.append(self.op._result(self._take_pane(end), False))
        for end in [e for e in self.panes if e <= thresh]:
            del self.panes[end]
        for end in [e for e in self.spilled if e <= thresh]:
            self.spilled.pop(end).delete()
        self.unmerged = {e for e in self.unmerged if e > thresh}
        self.maybe_spill()
        return out

    def finish(self, w: int) -> list[pa.Table]:
        out = []
        for end in sorted(e for e in {*self.panes, *self.spilled} if e > w):
            out.append(self.op._result(self._take_pane(end), False))
        self.panes = {}
        self.drop()
        return out

    def _pane_state(self, end: int) -> pa.Table:
        pane = self.panes[end]
        if len(pane.tables) > 1 or end in self.unmerged:
            pane.tables = [self.op.core.merge(_concat(pane.tables))]
            self.unmerged.discard(end)
        return pane.tables[0]

    # ----------------------------------------------------------------- snapshots

    def state_tables(self) -> list[pa.Table]:
        return [self._snapshot_pane(e) for e in sorted({*self.panes, *self.spilled})]

    def iter_state_tables(self) -> Iterator[pa.Table]:
        """One window at a time."""
        for end in sorted({*self.panes, *self.spilled}):
            yield self._snapshot_pane(end)

    def has_spills(self) -> bool:
        return bool(self.spilled)

    def load(self, table: pa.Table) -> None:
        for end, part in _split_by_value(table, _col_numpy(table, _WE)):
            self.panes[end] = _Pane([part])
        self.maybe_spill()

    def add(self, table: pa.Table) -> None:
        """Spills when over the limit as the groups come in."""
        for end, part in _split_by_value(table, _col_numpy(table, _WE), copy=True):
            if end in self.spilled:
                self._spill_write(end, [part])
            elif end in self.panes:
                pane = self.panes[end]
                pane.tables.append(part)
                pane.rows += part.num_rows
                if len(pane.tables) >= self.op.compact_tables:  # disjoint keys: concatenate
                    pane.tables = [_concat(pane.tables)]
            else:
                self.panes[end] = _Pane([part])
        self._spill_skip = 0  # measure now: groups can come in fast
        self.maybe_spill()

    def _snapshot_pane(self, end: int) -> pa.Table:
        """The merged state of window ``end``; a spilled window stays spilled (rewritten merged)."""
        if end not in self.spilled:
            return self._pane_state(end)
        pane = self.panes.pop(end, None)
        tables = self._read_spilled(end) + (pane.tables if pane is not None else [])
        state = self.op.core.merge(_concat(tables)) if len(tables) > 1 \
            or end in self.unmerged else tables[0]
        self.unmerged.discard(end)
        sf = self.spilled[end] = SpillFile(self.op._spill_ctx, "window-state")
        for b in state.to_batches():
            sf.write(b)
        return state

    # ----------------------------------------------------------------- spilling

    def _pane_bytes(self) -> int:
        return sum(t.nbytes for p in self.panes.values() for t in p.tables)

    def _spill_write(self, end: int, tables: list[pa.Table]) -> None:
        """Append state tables to the spill file of window ``end`` (creating it)."""
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return
        sf = self.spilled.get(end)
        if sf is None:
            sf = self.spilled[end] = SpillFile(self.op._spill_context(), "window-state")
        for t in tables:
            for b in t.to_batches():
                sf.write(b)
        if self.op.ctx is not None:
            self.op.ctx.increment_counter("millstream", "state_spills")

    def maybe_spill(self) -> None:
        """Move the panes of the latest-ending windows to disk while over the memory limit."""
        if not self.panes:
            return
        # measuring is O(tables): far below the limit, measure only every few batches
        skip = self._spill_skip
        if skip > 0:
            self._spill_skip = skip - 1
            return
        limit = self.op._memory_limit()
        used = self._pane_bytes()
        if used <= limit:
            self._spill_skip = 16 if used < limit // 4 else 4 if used < limit // 2 else 0
            return
        for end in sorted(self.panes, reverse=True):
            pane = self.panes.pop(end)
            used -= sum(t.nbytes for t in pane.tables)
            self._spill_write(end, pane.tables)
            if used <= limit:
                break

    def _read_spilled(self, end: int) -> list[pa.Table]:
        """The state tables of window ``end`` on disk (its file is deleted)."""
        sf = self.spilled.pop(end, None)
        if sf is None:
            return []
        batches = list(sf.read())
        sf.delete()
        # one table per batch: several tables make _pane_state merge them
        return [pa.Table.from_batches([b]) for b in batches]

    def _load(self, end: int) -> None:
        """Bring window ``end``'s spilled state back into memory (before its in-memory part)."""
        if end not in self.spilled:
            return
        tables = self._read_spilled(end)
        pane = self.panes.get(end)
        tables += pane.tables if pane is not None else []
        if tables:
            self.panes[end] = _Pane(tables)

    def _take_pane(self, end: int) -> pa.Table:
        """The merged state of window ``end`` (memory and disk), removed from the store."""
        self._load(end)
        state = self._pane_state(end)
        del self.panes[end]
        return state

    def drop(self) -> None:
        self.unmerged = set()
        for sf in self.spilled.values():
            sf.delete()
        self.spilled = {}

    def close(self) -> None:
        self.panes = {}
        self.drop()
