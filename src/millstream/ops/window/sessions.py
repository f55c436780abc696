"""Session window state: sessions per key held in hash buckets, merged as events arrive.

A session is ``[first event, last event + gap)``; two events of a key share a session
when they are less than ``gap`` apart (sessions that only touch stay apart). An event
whose own session ``[t, t + gap)`` is expired is late unless it overlaps a session still
held, or an earlier accepted event of the same batch: exactly what one-event-at-a-time
processing would decide, so results do not depend on batch boundaries.

With allowed lateness a session can grow or merge after it was emitted: each session
remembers the windows it was emitted under, and emitting it under another window
retracts those first (rows with ``is_retraction = True``, aggregates null). Every
session carries the arrival rank of its first event, and sessions are merged in that
order, so ``first`` and ``collect_list`` follow the merged sessions' first arrivals
whatever was spilled (:mod:`millstream.ops.window.session_spill`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from millstream.core.arrow import normalize_key
from millstream.core.time import MIN_WATERMARK
from millstream.expr.aggregates import AggSpec
from millstream.ops.aggregate import _AggCore
from millstream.ops.window.session_spill import SessionSpills, _SessionSpill
from millstream.ops.window.tables import (
    _ROW,
    _WE,
    _WS,
    WindowState,
    _bucket_ids,
    _col_numpy,
    _concat,
    _key_ids,
)

if TYPE_CHECKING:
    from millstream.ops.window.operator import WindowAggregate


class SessionStore(WindowState):
    """The sessions of a session window operator: one table per hash bucket of the key
    (in memory), and the sessions spilled to disk."""

    def __init__(self, op: WindowAggregate) -> None:
        self.op = op
        self.keys = op.keys
        self.num_buckets = 16 if op.keys else 1
        self.buckets: list[pa.Table | None] = [None] * self.num_buckets
        #: sessions on disk
        self.spills = SessionSpills(op)
        self.seq = 0
        # the windows already emitted for each session (two aligned lists, concatenated
        # when sessions merge) and the transient "touched" flag
        core_keys = [_WS, _WE, *op.keys]
        specs = op.specs
        n = len(specs)
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

    def _bucket_ids(self, table: pa.Table | pa.RecordBatch) -> np.ndarray:
        return _bucket_ids(table, self.keys, self.num_buckets)

    # ----------------------------------------------------------------- events

    def process(self, batch: pa.RecordBatch, t: np.ndarray) -> list[pa.Table]:
        op = self.op
        gap = op.window.gap
        if self.spills:
            self._load_spills(self.spills.hit(batch, t), op._expiry())
        suspect = t + gap <= op._expiry()
        accepted = ~suspect
        if suspect.any():
            accepted = self._accept_suspects(batch, t, suspect)
        if not accepted.all():
            op._late(batch, ~accepted)
        if not accepted.any():
            return []
        rows = None if accepted.all() else np.flatnonzero(accepted)
        tt = t if rows is None else t[rows]
        states = self._session_partial(batch, rows, tt)
        bids = self._bucket_ids(states)
        out = []
        w = op.watermark
        for b in np.unique(bids):
            b = int(b)
            part = states if self.num_buckets == 1 else states.filter(pa.array(bids == b))
            cur = self.buckets[b]
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
            self.buckets[b] = merged
        self.maybe_spill()
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
        table = table.append_column(_WE, pa.array(t + self.op.window.gap, pa.int64()))
        table = table.append_column(_ROW, pa.array(np.arange(self.seq, self.seq + m,
                                                             dtype=np.int64)))
        self.seq += m
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
        res = self.op._result(rows, is_update)
        out = []
        gone = ~same
        if gone.any():
            ts = pa.timestamp("us", tz=self.op._tz)
            old = res.take(pa.array(parents[gone]))
            cols = {name: old.column(name) for name in old.column_names}
            cols["window_start"] = pa.array(fs[gone], pa.int64()).cast(ts)
            cols["window_end"] = pa.array(fe[gone], pa.int64()).cast(ts)
            for spec in self.op.specs:
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

    def _merge_sessions(self, table: pa.Table) -> pa.Table:
        """Merge overlapping session intervals per key (and their states and flags).

        Merged states follow the sessions' first arrivals (``first``, ``collect_list``),
        whatever the order of the held sessions in memory (or whether some were spilled).
        """
        table = table.sort_by(self._s_seq)
        n = table.num_rows
        ws = _col_numpy(table, _WS)
        we = _col_numpy(table, _WE)
        kid = _key_ids(table, self.keys)
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
        gap = self.op.window.gap
        keys = self.keys
        n = len(t)
        accepted = ~suspect
        keys_t = pa.table({k: normalize_key(batch.column(k)) for k in keys}) if keys \
            else pa.table({"__x": pa.nulls(n, pa.int8())})
        bids = self._bucket_ids(keys_t) if keys else np.zeros(n, dtype=np.int64)
        held = [self.buckets[int(b)] for b in np.unique(bids[suspect])]
        held = [h.select([*keys, _WS, _WE]) for h in held if h is not None and h.num_rows]
        m = sum(h.num_rows for h in held)
        batch_part = keys_t.select(keys) if keys else pa.table({})
        if keys:
            both = _concat([*(h.select(keys) for h in held), batch_part])
            kid = _key_ids(both, keys)
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

    # ----------------------------------------------------------------- firing

    def fire(self, old: int, w: int) -> list[pa.Table]:
        out = []
        thresh = self.op._expiry()
        # spilled sessions that fire now come back first (those already expired before
        # this watermark were dropped in memory too, so they are skipped)
        self._load_spills([sp for sp in self.spills if sp.unfired <= w],
                          max(old - self.op.allowed_lateness, MIN_WATERMARK))
        self.spills.expire(thresh)
        for b, tbl in enumerate(self.buckets):
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
            self.buckets[b] = tbl if tbl.num_rows else None
        self.maybe_spill()
        if out:
            out = [_concat(out).sort_by([("window_end", "ascending"),
                                         ("window_start", "ascending")])]
        return out

    def finish(self, w: int) -> list[pa.Table]:
        out: list[pa.Table] = []
        # spilled sessions that still have to fire come back (fired ones are done)
        self._load_spills([sp for sp in self.spills if sp.hi > w], self.op._expiry())
        for tbl in self.buckets:
            if tbl is None:
                continue
            due = _col_numpy(tbl, _WE) > w
            if due.any():
                out += self._emit_sessions(tbl, due)[0]
        self.buckets = [None] * self.num_buckets
        self.drop()
        return out

    # ----------------------------------------------------------------- held and spilled

    def _add_to_buckets(self, table: pa.Table) -> None:
        """Add merged sessions (disjoint from those held) to their buckets, in arrival order."""
        if table.num_rows == 0:
            return
        bids = self._bucket_ids(table)
        for b in np.unique(bids):
            b = int(b)
            part = table if self.num_buckets == 1 else table.filter(pa.array(bids == b))
            cur = self.buckets[b]
            self.buckets[b] = _concat([cur, part]) if cur is not None and cur.num_rows else part

    def maybe_spill(self) -> None:
        """Over the memory limit: move the sessions that end first to disk."""
        self.spills.spill_coldest(self.buckets, self.op._memory_limit())

    def _load_spills(self, spills: list[_SessionSpill], expiry: int) -> None:
        """Bring spilled sessions back into their buckets (dropping those ended by ``expiry``)."""
        tables = self.spills.take(spills, expiry)
        if tables:
            self._add_to_buckets(_concat(tables))

    # ----------------------------------------------------------------- snapshots

    def state_tables(self) -> list[pa.Table]:
        return [*(t for t in self.buckets if t is not None),
                *self.spills.read(list(self.spills), self.op._expiry())]

    def iter_state_tables(self) -> Iterator[pa.Table]:
        """The held sessions, then one spill file at a time."""
        yield from (t for t in self.buckets if t is not None)
        for sp in self.spills:
            yield from self.spills.read([sp], self.op._expiry())

    def has_spills(self) -> bool:
        return bool(self.spills)

    def load(self, table: pa.Table) -> None:
        if self._s_seq not in table.schema.names:  # a snapshot from before spilling
            table = table.append_column(self._s_seq, pa.array(
                np.arange(self.seq, self.seq + table.num_rows, dtype=np.int64)))
            self.seq += table.num_rows
        self._add_to_buckets(table)
        self.maybe_spill()

    def drop(self) -> None:
        self.spills.drop()

    def close(self) -> None:
        self.buckets = [None] * self.num_buckets
        self.drop()
