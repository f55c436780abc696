"""The interval join (:class:`IntervalJoin`): stream-stream pairs of rows whose event
times are close, ``l.time + lower <= r.time <= l.time + upper``, emitted as soon as the
second row of a pair arrives; buffered rows are dropped once the watermark passes them
(outer joins emit the unmatched ones then)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from millstream.core.time import MAX_WATERMARK, MIN_WATERMARK
from millstream.errors import PlanError
from millstream.ops.base import Batches
from millstream.ops.stream_join.keyed import _KeyedJoin
from millstream.ops.stream_join.keys import _keys_valid, match_keys
from millstream.ops.stream_join.output import _EMPTY, _check_how
from millstream.ops.stream_join.runs import _Run
from millstream.ops.stream_join.state import JoinState


class IntervalJoin(_KeyedJoin):
    """Stream-stream join of rows whose times are close: ``l.t + lower <= r.t <= l.t + upper``.

    Port 0 is the left input, port 1 the right; ``how`` is inner, left, right or outer.
    See the package docstring for lateness, state clean-up, outer rows and spilling;
    ``broadcast``: the port of an input every task receives whole (a broadcast join).
    """

    side_outputs = ("late", "invalid")
    _kind = "IntervalJoin"

    def __init__(self, left_on: list[str], right_on: list[str], lower: int, upper: int,
                 left_time: str, right_time: str, how: str = "inner", suffix: str = "_right",
                 name: str | None = None, state_memory_limit: int | None = None,
                 broadcast: int | None = None,
                 input_schemas: tuple[pa.Schema | None, pa.Schema | None] = (None, None)
                 ) -> None:
        how = _check_how(how, ("inner", "left", "right", "outer"), "interval_join")
        self.lower, self.upper = int(lower), int(upper)
        if self.lower > self.upper:
            raise PlanError(f"interval_join: between=(lower, upper) needs lower <= upper, got "
                            f"({lower}, {upper}) µs")
        self.time_columns = (left_time, right_time)
        super().__init__(left_on, right_on, how, suffix, name or (
            f"IntervalJoin({how}, left_on={list(left_on)}, right_on={list(right_on)}, "
            f"between=({self.lower}us, {self.upper}us), time=({left_time!r}, {right_time!r}))"),
            state_memory_limit, broadcast, input_schemas)

    def _new_state(self) -> JoinState:
        # rows are dropped by time: in memory they are chunks sorted by time (a watermark
        # advance cuts a prefix of each, a probe takes a time range); the oldest move to
        # disk first (they are dropped first, so their runs go away soonest); outer inputs
        # keep their matched flags on disk
        return JoinState(("t", "m", "h"), "t", order_by="t",
                         track_matched=(self._outer(0), self._outer(1)), sorted_by="t")

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        """Join the rows with the other input's buffered rows; buffer them."""
        if batch.num_rows == 0:
            return _EMPTY
        self._check_input(batch, port, timed=True)
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
                out += self._probe_memory(port, table, t, h, lo, hi, matched)
            if other.runs:
                out += self._probe_runs(port, table, t, h, lo, hi, matched)
        self._bufs[port].append(table, t=t, m=matched, h=h)
        out += self._expire(port)
        self._state.maybe_spill()
        return self._emit(out)

    def _probe_memory(self, port: int, table: pa.Table, t: np.ndarray, h: np.ndarray,
                      lo: int, hi: int, matched: np.ndarray) -> list[pa.Table]:
        """Join the rows with the other input's rows in memory: those in the time range
        (a slice of each chunk), of the rows' key hashes when that leaves far fewer."""
        other = self._bufs[1 - port]
        parts = other.by_time(lo, hi)
        if not parts:
            return []
        if sum(len(idx) for _c, idx in parts) > max(256, 4 * table.num_rows):
            hashes = np.unique(h)
            parts = [(c, idx[np.isin(c.cols["h"][idx], hashes)]) for c, idx in parts]
            parts = [(c, idx) for c, idx in parts if len(idx)]
            if not parts:
                return []
        picked = other.pick(parts)
        ot = picked.cols["t"]
        ni, oi = self._pairs(port, table, t, picked.table, ot, np.arange(len(ot)))
        if not len(ni):
            return []
        matched[ni] = True
        picked.set("m", np.unique(oi), True)
        return [self._pair_rows(port, table, ni, picked.table, oi)]

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

    def _pair_rows(self, port: int, table: pa.Table, ni: np.ndarray, sub: pa.Table,
                   oi: np.ndarray) -> pa.Table:
        """Output of the pairs (row ``ni`` of ``table`` on input ``port``, row ``oi`` of
        the other input's ``sub``)."""
        if port == 0:
            return self._assemble(table, ni, sub, oi)
        return self._assemble(sub, oi, table, ni)

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
                    out.append(self._pair_rows(port, table, ni, sub, oi))
        return out

    def _expire(self, port: int) -> list[pa.Table]:
        """Drop buffered rows of input ``port`` no row that is not late can match any more."""
        buf = self._bufs[port]
        if (not buf.n and not buf.runs) or self.watermark == MIN_WATERMARK:
            return []
        # left: l.t + upper < W;  right: r.t - lower < W
        thr = self.watermark - self.upper if port == 0 else self.watermark + self.lower
        thr = min(max(thr, MIN_WATERMARK), MAX_WATERMARK)
        out = []
        if buf.n:  # a prefix of each chunk: only the rows that expire are touched
            for rows, cols in buf.expire_prefix(thr, collect=self._outer(port)):
                lonely = ~cols["m"]
                if lonely.any():
                    out.append(self._unmatched(port, rows.filter(pa.array(lonely))))
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
            sel = run.alive(seg)
            if thr is not None:
                sel = seg.cols["t"] < thr if sel is None else sel & (seg.cols["t"] < thr)
            idx = np.flatnonzero(sel) if sel is not None else np.arange(seg.rows, dtype=np.int64)
            if len(idx):
                idx = idx[~run.matched(seg, idx)]
            if len(idx):
                out.append(self._unmatched(port, seg.take(idx)))
        return out

    def on_watermark(self, watermark: int) -> Batches:
        """Drop rows that can no longer match (outer joins emit the unmatched ones)."""
        if not self._advance(watermark):
            return _EMPTY
        return self._emit(self._expire(0) + self._expire(1))

    def finish(self) -> Batches:
        """End of input: emit the unmatched rows of outer joins, drop all state."""
        out = []
        for port in (0, 1):
            buf = self._bufs[port]
            if self._outer(port):
                for run in buf.runs:
                    out += self._lonely_in_run(port, run, None)
                for rows, cols in buf.live_rows():
                    lonely = ~cols["m"]
                    if lonely.any():
                        out.append(self._unmatched(port, rows.filter(pa.array(lonely))))
            buf.reset()
        self.watermark = MAX_WATERMARK
        return (*self._emit(out), *self._final_empty())
