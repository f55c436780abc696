"""The regular join of two streams (:class:`RegularJoin`): Flink's unbounded stream-stream
join. Every row of each input is kept (until its state time-to-live, if any) and joined
with every row of the other input that has its key, whenever it arrives.

Output: a pair is emitted when its second row arrives. An outer side's row without a
partner is emitted at once with the other side's columns null (+I); when its first
partner arrives, that row is taken back (-D) before the pairs (+I); when its last
partner is taken back, it is emitted again (+I). Inputs may carry changes
(``core.changelog``): a retraction (-U, -D) takes back one stored copy of an equal row
and the pairs it made (-D, or the input's -U in an inner join, whose pairs keep their
input's kind: +I/+U/-U/-D). An inner join of append-only inputs emits inserts only.
Rows of one key keep their order; batches are processed in steps (``changes.phases``)
that keep it.

State time-to-live (``state_ttl``, µs): a row is dropped once its time is more than the
TTL behind: by event time (the input's ``with_watermark`` column against the job's
watermark) when both inputs have one, else by processing time (its arrival). As in
Flink, nothing is emitted when state expires: a row arriving later for that key does not
meet the dropped rows, an outer row matched only by dropped rows is not emitted again,
and taking back a dropped row takes back the pairs it meets now. Without a TTL the
state grows with the inputs (spilling to disk over the memory limit).

State: each input is a :class:`~millstream.ops.stream_join.chunks._SortedBuffer` sorted
by key hash (a key's rows are a binary search away) with numpy columns ``t`` (the row's
time for the TTL), ``h`` (key hash) and, on outer sides, ``n`` (how many partners it
has been emitted with); over the memory limit the oldest rows move to spill runs, which
keep ``n`` and the rows taken back in memory. It is checkpointed per key group.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from millstream.core.arrow import event_time_micros, table_to_batches
from millstream.core.changelog import (
    CHANGE,
    DELETE,
    INSERT,
    is_retraction,
    kinds,
    with_kinds,
    without_kinds,
)
from millstream.core.time import MAX_WATERMARK, MIN_WATERMARK, Clock, WallClock
from millstream.core.units import format_duration
from millstream.errors import PlanError, SchemaError
from millstream.ops.base import Batches
from millstream.ops.stream_join.changes import claim, equal_rows, phases
from millstream.ops.stream_join.chunks import _Picked, _SortedBuffer
from millstream.ops.stream_join.keyed import _SIDES, _KeyedJoin
from millstream.ops.stream_join.keys import (
    JOIN_KEY_PREFIX,
    _keys_valid,
    _strip,
    data_schema,
    match_keys,
)
from millstream.ops.stream_join.output import _EMPTY, _check_how
from millstream.ops.stream_join.runs import _Run, _Segment
from millstream.ops.stream_join.state import JoinState


class _ProcessingTime:
    """The clock a streaming task hands to its operators' timers (``op.timers.clock``):
    the regular join reads processing time from it for its state TTL."""

    def __init__(self, clock: Clock | None) -> None:
        self.clock = clock or WallClock()


class _RunPick:
    """Rows picked from a segment of a spill run, with the interface of
    :class:`~millstream.ops.stream_join.chunks._Picked`."""

    def __init__(self, run: _Run, seg: _Segment, idx: np.ndarray, fields: tuple[str, ...]
                 ) -> None:
        self.run, self.seg, self.idx = run, seg, idx
        self.table = seg.take(idx)
        self.cols = {f: run.count(seg, idx) if f == "n" else seg.cols[f][idx] for f in fields}

    def add(self, field: str, sel: np.ndarray, delta: np.ndarray) -> None:
        self.run.add_count(self.seg, self.idx[sel], delta)
        self.cols[field][sel] += delta

    def kill(self, sel: np.ndarray) -> None:
        self.run.kill(self.seg, self.idx[sel])


class _MemoryPick(_Picked):
    """Rows picked from a buffer's chunks; ``kill`` takes them back."""

    def __init__(self, buf: _SortedBuffer, parts: list) -> None:
        super().__init__(parts, buf.fields)
        self.buf = buf

    def add(self, field: str, sel: np.ndarray, delta: np.ndarray) -> None:
        super().add(field, sel, delta)
        self.cols[field][sel] += delta

    def kill(self, sel: np.ndarray) -> None:
        for c, rows, _pos in list(self._locate(sel)):
            self.buf.kill(c, rows)


class RegularJoin(_KeyedJoin):
    """Regular (unbounded) join of two streams, inner, left, right or outer, with an
    optional state time-to-live; inputs may carry changes. See the module docstring.

    ``left_time``/``right_time``: event-time columns (both given: the TTL runs on event
    time). ``emit_kinds``: always give output rows a change kind (default: for outer
    joins; an inner join adds them when an input carries changes). ``condition``: a
    residual condition on the pairs of equal keys (named as the inner join's columns); a
    pair that fails it is no pair (an outer row without another is padded).
    """

    accepts_updates = True
    _kind = "RegularJoin"

    def __init__(self, left_on: list[str], right_on: list[str], how: str = "inner",
                 suffix: str = "_right", state_ttl: int | None = None,
                 left_time: str | None = None, right_time: str | None = None,
                 emit_kinds: bool | None = None,
                 input_schemas: tuple[pa.Schema | None, pa.Schema | None] = (None, None),
                 clock: Clock | None = None, name: str | None = None,
                 state_memory_limit: int | None = None, condition: Any = None) -> None:
        how = _check_how(how, ("inner", "left", "right", "outer"), "join of two streams")
        if state_ttl is not None and int(state_ttl) <= 0:
            raise PlanError(f"join: state_ttl must be a positive duration, got {state_ttl}")
        self.how = how
        self.state_ttl = None if state_ttl is None else int(state_ttl)
        self.event_time = bool(left_time and right_time)
        self.time_columns = (left_time or "", right_time or "")
        self.condition = condition
        ttl = f", state_ttl={format_duration(self.state_ttl)}" if self.state_ttl else ""
        cond = f", condition={condition!r}" if condition is not None else ""
        super().__init__(left_on, right_on, how, suffix, name or (
            f"RegularJoin({how}, left_on={list(left_on)}, right_on={list(right_on)}"
            f"{cond}{ttl})"), state_memory_limit, input_schemas=input_schemas)
        self.emit_kinds = how != "inner" if emit_kinds is None else bool(emit_kinds)
        self._schemas = list(self._planned)  # (the updates it emits need them at once)
        self.timers = _ProcessingTime(clock)

    @property
    def emits_updates(self) -> bool:  # type: ignore[override]
        """Outer joins take padded rows back; an inner join passes its inputs' changes."""
        return self.emit_kinds

    def _new_state(self) -> JoinState:
        # by key hash in memory (a key's rows are a binary search away); the oldest rows
        # move to disk first (they expire first); outer sides count their partners
        sides = tuple(("t", "h", "n") if self._outer(p) else ("t", "h") for p in (0, 1))
        return JoinState(("t", "h"), "t", order_by="t", sorted_by="h", side_fields=sides)

    # ------------------------------------------------------------------ input

    def _check_input(self, batch: pa.RecordBatch, port: int, timed: bool = False) -> None:
        known = self._schemas[port]
        super()._check_input(batch, port, timed)
        if known is None:
            self._schemas[port] = data_schema(self._schemas[port])

    def _restore(self, states: list[dict[str, Any]]) -> None:
        super()._restore(states)
        self._schemas = [s if s is not None else p for s, p in zip(self._schemas, self._planned)]

    def _now(self) -> int:
        return int(self.timers.clock.now())

    def _threshold(self) -> int:
        """Rows whose time is below this are expired (MIN_WATERMARK: none)."""
        if self.state_ttl is None:
            return MIN_WATERMARK
        now = self.watermark if self.event_time else self._now()
        if now <= MIN_WATERMARK or now >= MAX_WATERMARK:
            return MIN_WATERMARK
        return now - self.state_ttl

    def _row_times(self, table: pa.Table, port: int) -> np.ndarray:
        """Each row's time for the TTL: its event time, or the processing time now."""
        n = table.num_rows
        if self.state_ttl is None:
            return np.zeros(n, np.int64)
        if not self.event_time:
            return np.full(n, self._now(), np.int64)
        col = self.time_columns[port]
        if col not in table.column_names:
            raise SchemaError(f"{self.name}: the {_SIDES[port]} input has no time column "
                              f"{col!r}; columns are {_strip(table).column_names}")
        t, valid = event_time_micros(table.column(col), col)
        if valid is not None:  # no time: as old as the watermark
            t = np.where(valid, t, max(self.watermark, MIN_WATERMARK + 1))
        return t

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        """Join the rows (or their retractions) with the other input's state; keep them."""
        if batch.num_rows == 0:
            return _EMPTY
        self._check_input(batch, port)
        table = pa.Table.from_batches([batch])
        kind = kinds(table)
        data = without_kinds(table)
        if self.state_ttl is not None and not self.event_time:
            self._expire(self._threshold())
        t = self._row_times(data, port)
        out: list[pa.Table] = []
        keyed = _keys_valid(data, self.hidden)
        if not keyed.all():  # a null key never matches: an outer row goes out as it is
            lost = ~keyed
            if self._outer(port):
                back = is_retraction(kind[lost])
                out.append(self._kinded(self._unmatched(port, data.filter(pa.array(lost))),
                                        np.where(back, DELETE, INSERT)))
            data, kind, t = data.filter(pa.array(keyed)), kind[keyed], t[keyed]
        if data.num_rows:
            h = self._hash(data)
            for add, back in phases(h, kind):
                if len(add):
                    rows = data if len(add) == data.num_rows else data.take(pa.array(add))
                    out += self._add(port, rows, kind[add], t[add], h[add])
                if len(back):
                    out += self._take_back(port, data.take(pa.array(back)), kind[back],
                                           h[back])
        self._state.maybe_spill()
        return self._emit(out)

    # ------------------------------------------------------------------ state access

    def _picks(self, port: int, hashes: np.ndarray) -> list[Any]:
        """The live rows of input ``port`` whose key hash is in ``hashes`` (sorted,
        distinct): picks from memory and from each spill run segment."""
        buf = self._bufs[port]
        out: list[Any] = []
        if buf.n:
            parts = buf.by_hash(hashes)
            if parts:
                out.append(_MemoryPick(buf, parts))
        for run in buf.runs:
            for seg in run.segs:
                idx = seg.lookup(hashes)
                if not len(idx):
                    continue
                alive = run.alive_at(seg, idx)
                if alive is not None:
                    idx = idx[alive]
                if len(idx):
                    out.append(_RunPick(run, seg, idx, buf.fields))
        return out

    def _match(self, port: int, rows: pa.Table, other: pa.Table
               ) -> tuple[np.ndarray, np.ndarray, pa.Table | None]:
        """(row of ``rows`` on input ``port``, row of ``other`` of the other input) pairs
        with equal keys that satisfy the condition, and their output rows (None: no pair)."""
        if port == 0:
            ri, oi = match_keys(self._keys_of(rows), self._keys_of(other), self.left_on,
                                self.right_on)
        else:
            oi, ri = match_keys(self._keys_of(other), self._keys_of(rows), self.left_on,
                                self.right_on)
        if not len(ri):
            return ri, oi, None
        paired = self._pair_rows(port, rows, ri, other, oi)
        if self.condition is not None:
            ok = self._satisfied(paired)
            if not ok.all():
                ri, oi = ri[ok], oi[ok]
                paired = paired.filter(pa.array(ok)) if len(ri) else None
        return ri, oi, paired

    def _satisfied(self, paired: pa.Table) -> np.ndarray:
        """Which pairs satisfy the residual condition (null counts as false)."""
        missing = sorted(self.condition.columns() - set(paired.column_names))
        if missing:
            raise SchemaError(f"join condition {self.condition!r}: no column(s) {missing}; "
                              f"columns are {_strip(paired).column_names}")
        batch = pa.RecordBatch.from_arrays([c.combine_chunks() for c in paired.columns],
                                           names=paired.column_names)
        mask = self.condition.evaluate(batch)
        if not pa.types.is_boolean(mask.type):
            raise SchemaError(f"join condition {self.condition!r} must be boolean, got "
                              f"{mask.type}")
        return np.asarray(mask.fill_null(False), dtype=bool)

    def _pair_rows(self, port: int, rows: pa.Table, ri: np.ndarray, other: pa.Table,
                   oi: np.ndarray) -> pa.Table:
        if port == 0:
            return self._assemble(rows, ri, other, oi)
        return self._assemble(other, oi, rows, ri)

    def _kinded(self, table: pa.Table, values: np.ndarray | int) -> pa.Table:
        """``table`` with change kinds ``values``, unless they are all inserts and the join
        does not emit kinds."""
        if not self.emit_kinds:
            v = np.asarray(values)
            if not v.any():
                return table
        return with_kinds(table, values if isinstance(values, int) else
                          np.asarray(values, np.int8))

    def _pair_kinds(self, kind: np.ndarray, back: bool) -> np.ndarray | int:
        """Kinds of pairs made by rows of kinds ``kind``: the input's in an inner join,
        +I or -D in an outer one (as Flink)."""
        if self.how == "inner":
            return kind
        return DELETE if back else INSERT

    # ------------------------------------------------------------------ adding rows

    def _add(self, port: int, rows: pa.Table, kind: np.ndarray, t: np.ndarray,
             h: np.ndarray) -> list[pa.Table]:
        """Rows that add (+I, +U) on input ``port``: pairs with the other input's rows,
        -D of the other side's outer rows they are the first partner of, +I of their
        own rows without a partner (outer); then they are kept."""
        other = 1 - port
        n = rows.num_rows
        partners = np.zeros(n, np.int64)
        first, pairs = [], []
        for pick in self._picks(other, np.unique(h)):
            ri, oi, paired = self._match(port, rows, pick.table)
            if paired is None:
                continue
            partners += np.bincount(ri, minlength=n)
            if self._outer(other):
                ou, cnt = np.unique(oi, return_counts=True)
                lonely = ou[pick.cols["n"][ou] == 0]
                if len(lonely):
                    first.append(self._kinded(self._unmatched(other, pick.table.take(
                        pa.array(lonely))), DELETE))
                pick.add("n", ou, cnt)
            k = self._pair_kinds(kind, False)
            pairs.append(self._kinded(paired,
                                      k if isinstance(k, int) else k[ri]))
        out = first + pairs
        if self._outer(port):
            lonely = partners == 0
            if lonely.any():
                out.append(self._kinded(self._unmatched(port, rows.filter(pa.array(lonely))),
                                        INSERT))
        keep = t >= self._threshold()  # a row already past its TTL is not kept
        if not keep.all():
            rows, t, h, partners = (rows.filter(pa.array(keep)), t[keep], h[keep],
                                    partners[keep])
        if rows.num_rows:
            cols = {"t": t, "h": h}
            if self._outer(port):
                cols["n"] = partners
            self._bufs[port].append(rows, **cols)
        return out

    # ------------------------------------------------------------------ taking back

    def _take_back(self, port: int, rows: pa.Table, kind: np.ndarray, h: np.ndarray
                   ) -> list[pa.Table]:
        """Rows that take back (-U, -D) on input ``port``: one stored copy each goes; the
        pairs they made are taken back, their own outer row (-D) when they had no
        partner, and the other side's outer rows they were the last partner of come
        back (+I)."""
        other = 1 - port
        n = rows.num_rows
        found, held_n = self._remove(port, rows, h)
        partners = np.zeros(n, np.int64)
        pairs, again = [], []
        for pick in self._picks(other, np.unique(h)):
            ri, oi, paired = self._match(port, rows, pick.table)
            if paired is None:
                continue
            partners += np.bincount(ri, minlength=n)
            k = self._pair_kinds(kind, True)
            pairs.append(self._kinded(paired,
                                      k if isinstance(k, int) else k[ri]))
            if self._outer(other):
                ou, cnt = np.unique(oi, return_counts=True)
                before = pick.cols["n"][ou]
                after = np.maximum(before - cnt, 0)
                pick.add("n", ou, after - before)
                back = ou[(before > 0) & (after == 0)]
                if len(back):
                    again.append(self._kinded(self._unmatched(other, pick.table.take(
                        pa.array(back))), INSERT))
        out = pairs
        if self._outer(port):
            # its outer row is out there when it had no partner (as its stored copy says;
            # a row no longer stored: when it meets none now)
            lonely = np.where(found, held_n == 0, partners == 0)
            if lonely.any():
                out.append(self._kinded(self._unmatched(port, rows.filter(pa.array(lonely))),
                                        DELETE))
        return out + again

    def _remove(self, port: int, rows: pa.Table, h: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
        """Take one stored copy of each row of ``rows`` (equal in every column) out of
        input ``port``'s state: (rows that found one, that copy's partner count)."""
        n = rows.num_rows
        found = np.zeros(n, bool)
        held_n = np.zeros(n, np.int64)
        picks = self._picks(port, np.unique(h))
        if not picks:
            return found, held_n
        columns = [c for c in rows.column_names if not c.startswith(JOIN_KEY_PREFIX)]
        keys = self.left_on if port == 0 else self.right_on
        pair_rows, pair_cands, offsets = [], [], [0]
        for pick in picks:
            ri, ci = match_keys(self._keys_of(rows), self._keys_of(pick.table), keys, keys)
            if len(ri):
                same = equal_rows(rows.take(pa.array(ri)), pick.table.take(pa.array(ci)),
                                  columns)
                pair_rows.append(ri[same])
                pair_cands.append(ci[same] + offsets[-1])
            offsets.append(offsets[-1] + pick.table.num_rows)
        if not pair_rows:
            return found, held_n
        got, cand = claim(np.concatenate(pair_rows), np.concatenate(pair_cands))
        which = np.searchsorted(offsets, cand, "right") - 1
        for p, pick in enumerate(picks):
            mine = which == p
            if not mine.any():
                continue
            local = cand[mine] - offsets[p]
            if "n" in pick.cols:
                held_n[got[mine]] = pick.cols["n"][local]
            found[got[mine]] = True
            pick.kill(local)
        return found, held_n

    # ------------------------------------------------------------------ time

    def _expire(self, thr: int) -> None:
        """Drop the rows whose time is below ``thr`` (lazily: see ``_SortedBuffer``)."""
        if thr <= MIN_WATERMARK:
            return
        for buf in self._bufs:
            buf.expire_below(thr)
            if buf.runs:
                for run in buf.runs:
                    run.done = max(run.done, thr)
                buf.drop_runs(keep=lambda r: not r.all_dead)

    def on_watermark(self, watermark: int) -> Batches:
        """Event-time TTL: drop the rows the watermark left more than the TTL behind."""
        if self._advance(watermark) and self.event_time and self.state_ttl is not None:
            self._expire(self._threshold())
        return _EMPTY

    def advance_processing_time(self) -> Batches:
        """Processing-time TTL: drop the rows that arrived more than the TTL ago (the
        streaming task calls this now and then)."""
        if self.state_ttl is not None and not self.event_time:
            self._expire(self._threshold())
        return _EMPTY

    def finish(self) -> Batches:
        """End of input: every result was emitted as rows came; the state goes."""
        for buf in self._bufs:
            buf.reset()
        self.watermark = MAX_WATERMARK
        return self._final_empty()

    # ------------------------------------------------------------------ output

    def _emit(self, tables: list[pa.Table]) -> Batches:
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return _EMPTY
        if any(CHANGE in t.column_names for t in tables):
            tables = [t if CHANGE in t.column_names else with_kinds(t, INSERT) for t in tables]
        self._emitted = True
        out = tables[0] if len(tables) == 1 else pa.concat_tables(
            tables, promote_options="permissive")
        return table_to_batches(out, self.ctx.batch_size if self.ctx else 65536)

    def _final_empty(self) -> Batches:
        out = super()._final_empty()
        if out and self.emit_kinds:
            return tuple(with_kinds(b, INSERT) for b in out)
        return out
