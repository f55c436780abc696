"""The latest-value (temporal) join (:class:`LatestJoin`): each left row joins the row its
key holds in the right input, a changelog, when the left row is processed.

:class:`LatestState` holds the right input's latest row per key (by version, then
arrival; deleted keys forgotten, or kept as tombstones), in memory and in spill runs,
where superseded rows are dropped when runs merge and when snapshots are taken.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from millstream.core.time import MAX_WATERMARK
from millstream.errors import SchemaError
from millstream.ops.base import Batches
from millstream.ops.stream_join.buffer import _concat, _join_groups, _split_groups
from millstream.ops.stream_join.keyed import _KeyedJoin
from millstream.ops.stream_join.keys import _keys_valid, _strip, match_keys
from millstream.ops.stream_join.output import _EMPTY, _check_how
from millstream.ops.stream_join.runs import (
    _U64_SPAN,
    _field_column,
    _hash_bounds,
    _Run,
    _RunWriter,
)
from millstream.ops.stream_join.state import JoinState


class LatestState(JoinState):
    """The latest row per key of the right input (``bufs[1]``; left rows are never held).

    Rows carry their arrival number (``seq``) and key hash; the keys updated longest ago
    move to disk first. With rows on disk, a key's latest row is the last of its rows in
    memory and runs (by ``version``, then arrival), and a deleted key (``deleted``,
    without ``version``) stays as a tombstone that hides its older rows.
    """

    def __init__(self, hidden: list[str], version: str | None, deleted: str | None,
                 name: str) -> None:
        super().__init__(("seq", "h"), order_by="seq")
        self.hidden = hidden
        self.version = version
        self.deleted = deleted
        #: the operator's name (for error messages)
        self.name = name

    def is_deleted(self, table: pa.Table) -> np.ndarray:
        """True for the rows of ``table`` that delete their key."""
        if self.deleted not in table.column_names:
            raise SchemaError(f"{self.name}: the right input has no column {self.deleted!r} "
                              f"(deleted=); columns are {_strip(table).column_names}")
        return np.asarray(table.column(self.deleted).combine_chunks().fill_null(False),
                          dtype=bool)

    def winners(self, table: pa.Table, seqs: np.ndarray) -> np.ndarray:
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

    def upsert(self, table: pa.Table, seq: np.ndarray, hashes: np.ndarray) -> None:
        """Merge right rows (keys valid, arrival numbers ``seq``) into the rows in memory."""
        state = self.bufs[1]
        if state.n:
            both = _concat([state.table, table])
            seqs = np.concatenate([state.arrays["seq"], seq])
            hashes = np.concatenate([state.arrays["h"], hashes])
        else:
            both, seqs = table, seq
        # keep, per key, the row that sorts last by (version, arrival)
        keep = self.winners(both, seqs)
        kept, seqs, hashes = both.take(pa.array(keep)), seqs[keep], hashes[keep]
        if self.deleted is not None and self.version is None and not state.runs:
            # (with rows on disk, a deleted key's row stays as a tombstone that hides them)
            alive = ~self.is_deleted(kept)
            kept, seqs, hashes = kept.filter(pa.array(alive)), seqs[alive], hashes[alive]
        state.clear()
        state.append(kept.combine_chunks(), seq=seqs, h=hashes)
        self.maybe_spill()

    def held(self, hashes: np.ndarray) -> pa.Table | None:
        """The held row (tombstones included) of each key whose hash is in ``hashes``
        (sorted, distinct), from memory and runs: the candidates of the hashes, reduced to
        the last per key."""
        state = self.bufs[1]
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
        return both.take(pa.array(self.winners(both, np.concatenate(seqs))))

    def resolved(self, runs: list[_Run], memory: bool, drop_tombstones: bool
                 ) -> Iterator[tuple[pa.Table, np.ndarray, np.ndarray]]:
        """The last row per key of ``runs`` (and of memory), by hash range of about the work
        budget: (rows sorted by hash, their ``seq``, their hashes)."""
        state = self.bufs[1]
        total = sum(r.nbytes for r in runs) + (state.bytes if memory else 0)
        bounds = _hash_bounds(max(1, int(np.ceil(total / self.work_bytes()))))
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            tables, seqs, hs = [], [], []
            for run in runs:
                for t, cols in run.live_rows(self.fields, lo, hi):
                    tables.append(t)
                    seqs.append(cols["seq"])
                    hs.append(cols["h"])
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
            keep = self.winners(both, seq)
            if drop_tombstones and self.deleted is not None and self.version is None:
                keep = keep[~self.is_deleted(both.take(pa.array(keep)))]
            if not len(keep):
                continue
            keep = keep[np.argsort(h[keep], kind="stable")]
            yield both.take(pa.array(keep)), seq[keep], h[keep]

    def merge_runs(self, port: int, runs: list[_Run], oldest: bool) -> _Run | None:
        """One run of the last row per key of ``runs`` (tombstones go once no older run
        is left for them to hide)."""
        writer = _RunWriter(self.spill_context(), self.fields, None, False)
        for t, seq, h in self.resolved(runs, False, oldest):
            writer.add(t, {"seq": seq, "h": h})
        return writer.finish()

    def _resolved_parts(self) -> Iterator[tuple[pa.Table, np.ndarray]]:
        """The latest rows (memory and runs, tombstones resolved) as snapshots lay them out,
        a hash range at a time, with their hashes."""
        for t, seq, h in self.resolved(self.bufs[1].runs, True, True):
            yield (t.append_column(_field_column("seq"), pa.array(seq))
                   .append_column(_field_column("h"), pa.array(h))), h

    def snapshot(self, port: int) -> pa.Table | None:
        if port == 0 or not self.bufs[port].runs:
            return super().snapshot(port)
        parts = [t for t, _h in self._resolved_parts()]
        return _concat(parts).combine_chunks() if parts else None

    def group_tables(self, port: int, key_groups: int) -> dict[int, pa.Table]:
        if port == 0 or not self.bufs[port].runs:
            return super().group_tables(port, key_groups)
        return _join_groups(piece for t, h in self._resolved_parts()
                            for piece in _split_groups(t, h, key_groups))


class LatestJoin(_KeyedJoin):
    """Joins each left row with the latest right row of its key seen so far (a changelog).

    ``how`` is inner or left. See the package docstring (processing-time temporal join).
    """

    #: The right input (a changelog) carries no event time the output depends on: a
    #: scheduler leaves its source partitions out of the watermark.
    watermark_inputs = (0,)
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

    def _new_state(self) -> LatestState:
        return LatestState(self.hidden, self.version, self.deleted, self.name)

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
            held = self._state.held(np.unique(self._hash(sub))) if state.runs else state.table
            if held is not None:
                li, ri = match_keys(self._keys_of(sub), self._keys_of(held), self.left_on,
                                    self.right_on)
                if self.deleted is not None and len(ri):
                    live = ~self._state.is_deleted(held.take(pa.array(ri)))
                    li, ri = li[live], ri[live]
                if len(li):
                    matched[idx[li]] = True
                    out.append(self._assemble(sub, li, held, ri))
        if self.how == "left" and not matched.all():
            out.append(self._unmatched(0, table.filter(pa.array(~matched))))
        return self._emit(out)

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
        self._state.upsert(table, seq, self._hash(table))

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
