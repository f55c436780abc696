"""The window join (:class:`WindowJoin`): stream-stream pairs of rows that share a key and
a tumbling or sliding window of their event times, emitted (with ``window_start`` and
``window_end`` first) when the watermark reaches the window's end; with rows on disk, the
firing windows are read and joined a group of window ends (or a hash range) at a time."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from millstream.core.time import MAX_WATERMARK, MIN_WATERMARK
from millstream.errors import PlanError, SchemaError
from millstream.expr.windows import Sliding, Tumbling, WindowAssigner
from millstream.ops.base import Batches
from millstream.ops.stream_join.buffer import _Buffer, _concat
from millstream.ops.stream_join.keyed import _SIDES, _KeyedJoin
from millstream.ops.stream_join.keys import match_keys
from millstream.ops.stream_join.output import _EMPTY, _check_how
from millstream.ops.stream_join.runs import _U64_SPAN, _hash_bounds, _Segment
from millstream.ops.stream_join.state import JoinState


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
    ``window_start`` and ``window_end`` first. See the package docstring (``broadcast``:
    the port of an input every task receives whole, a broadcast join).
    """

    side_outputs = ("late", "invalid")
    _kind = "WindowJoin"

    def __init__(self, left_on: list[str], right_on: list[str], window: WindowAssigner,
                 left_time: str, right_time: str, how: str = "inner", suffix: str = "_right",
                 name: str | None = None, state_memory_limit: int | None = None,
                 broadcast: int | None = None,
                 input_schemas: tuple[pa.Schema | None, pa.Schema | None] = (None, None)
                 ) -> None:
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
            state_memory_limit, broadcast, input_schemas)

    def _new_state(self) -> JoinState:
        # rows are dropped by window end; the rows of the windows that end last move to
        # disk first (they stay there longest); runs are read only when their windows fire
        # (not probed per batch): merged only to keep their number (and index) small
        return JoinState(("ws", "we", "h"), "we", order_by="we", descending=True,
                         merge_above=8)

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        """Buffer the rows in their windows; rows whose windows all closed are late."""
        if batch.num_rows == 0:
            return _EMPTY
        self._check_input(batch, port, timed=True)
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
            self._state.maybe_spill()
        return _EMPTY

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
            budget = self._state.work_bytes()
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
        if not self._advance(watermark):
            return _EMPTY
        return self._emit(self._fire(self.watermark))

    def finish(self) -> Batches:
        """End of input: emit every window still held."""
        out = self._fire(MAX_WATERMARK)
        self.watermark = MAX_WATERMARK
        return (*self._emit(out), *self._final_empty())

    def _prefix_empty(self) -> list[tuple[str, pa.Array]]:
        ts = pa.timestamp("us", tz=self._tz)
        return [("window_start", pa.array([], ts)), ("window_end", pa.array([], ts))]
