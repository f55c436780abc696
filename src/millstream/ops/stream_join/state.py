"""The buffered state of a keyed stream join: both inputs' rows under a memory limit.

:class:`JoinState` holds one :class:`_Buffer` per input. Over the memory limit it moves
rows to spill runs (down to half the limit, both inputs in proportion to their bytes, in
the order the join chooses), merges the newest runs of an input so that there are few,
and lays both inputs' rows out for snapshots: whole, or one key group at a time (through
files on disk when rows have spilled).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa

from millstream.core.context import TaskContext
from millstream.core.spill import GroupFiles
from millstream.ops.stream_join.buffer import _Buffer, _concat
from millstream.ops.stream_join.chunks import _SortedBuffer
from millstream.ops.stream_join.runs import _hash_bounds, _Run, _RunWriter

#: Transient bytes a join with spilled state may hold beyond its limit while it merges
#: spill runs, builds a snapshot or fires a window (the limit itself when larger).
SPILL_WORK_MIN_BYTES = 4 << 20


class JoinState:
    """The buffered rows of both inputs (``bufs[0]`` left, ``bufs[1]`` right), in memory
    and in spill runs, kept under ``limit`` bytes in memory.

    ``fields`` are the numpy columns kept per row; rows whose ``time_field`` falls below a
    run's clean-up threshold are dropped. Rows move to disk in the order of ``order_by``
    (``descending``: largest first; None: arrival order); ``track_matched`` says per input
    whether spilled rows keep their matched flag; an input's runs are merged only while
    there are more than ``merge_above``. ``sorted_by`` (a field): the rows in memory are
    sorted chunks (:class:`~millstream.ops.stream_join.chunks._SortedBuffer`) rather than
    one table in arrival order; ``side_fields``: each input's fields when they differ.
    """

    def __init__(self, fields: Sequence[str], time_field: str | None = None, *,
                 order_by: str | None = None, descending: bool = False,
                 track_matched: tuple[bool, bool] = (False, False),
                 merge_above: int = 1, sorted_by: str | None = None,
                 side_fields: tuple[Sequence[str], Sequence[str]] | None = None) -> None:
        self.fields = tuple(fields)
        self.time_field = time_field
        sides = side_fields or (self.fields, self.fields)
        if sorted_by is None:
            self.bufs = [_Buffer(tuple(f), time_field) for f in sides]
        else:
            self.bufs = [_SortedBuffer(tuple(f), time_field, sorted_by) for f in sides]
        self.order_by = order_by
        self.descending = descending
        self.track_matched = tuple(track_matched)
        self.merge_above = merge_above
        #: bytes of buffered rows kept in memory (None: half the task's memory budget)
        self.limit: int | None = None
        #: transient bytes beyond the limit for merges, snapshots and firings (tests lower it)
        self.work_min_bytes = SPILL_WORK_MIN_BYTES
        #: the task's context, once the operator is opened (memory budget, spill directory)
        self.ctx: TaskContext | None = None
        self._spill_ctx: TaskContext | None = None
        #: the largest in-memory state seen (bytes, before spilling), runs written, rows spilled
        self.peak_bytes = 0
        self.spills = 0
        self.spilled_rows = 0

    # ------------------------------------------------------------------ accounting

    def memory_limit(self) -> int:
        """Bytes of buffered rows this instance keeps in memory."""
        if self.limit is not None:
            return self.limit
        budget = self.ctx.memory_budget if self.ctx is not None else TaskContext.memory_budget
        return budget // 2

    def work_bytes(self) -> int:
        """Bytes a merge, snapshot or firing may read into memory at once."""
        return max(self.memory_limit(), self.work_min_bytes)

    def spill_context(self) -> TaskContext:
        """The context spill files are written in (a default one before ``open``)."""
        if self._spill_ctx is None:
            self._spill_ctx = self.ctx if self.ctx is not None else TaskContext()
        return self._spill_ctx

    @property
    def spilled(self) -> bool:
        """True when either input has rows on disk."""
        return any(b.runs for b in self.bufs)

    def memory_bytes(self) -> int:
        """Bytes of join state in memory: buffered rows, and the index of the spilled ones."""
        b0, b1 = self.bufs
        used = b0.bytes + b1.bytes
        if b0.runs or b1.runs:
            used += b0.index_bytes + b1.index_bytes
        return used

    def stats(self) -> dict[str, int]:
        """Rows in memory, runs on disk and rows in them, bytes of their files, runs
        written and rows moved to disk so far."""
        runs = [r for b in self.bufs for r in b.runs]
        return {"memory_rows": self.bufs[0].n + self.bufs[1].n, "runs": len(runs),
                "spilled_rows": sum(r.rows for r in runs),
                "disk_bytes": sum(r.file.bytes for r in runs), "spills": self.spills,
                "rows_moved_out": self.spilled_rows}

    # ------------------------------------------------------------------ spilling

    def spill_order(self, port: int) -> np.ndarray:
        """Rows in memory of input ``port``, the first to move to disk first."""
        buf = self.bufs[port]
        if self.order_by is None:
            return np.arange(buf.n, dtype=np.int64)
        order = np.argsort(buf.arrays[self.order_by], kind="stable")
        return order[::-1] if self.descending else order

    def maybe_spill(self) -> None:
        """Over the memory limit: move rows to disk, down to half the limit (both inputs in
        proportion to their bytes), in the order ``spill_order`` gives."""
        used = self.memory_bytes()
        if used > self.peak_bytes:
            self.peak_bytes = used
        limit = self.memory_limit()
        if used <= limit:
            return
        mem = [b.measure() for b in self.bufs]
        used = self.memory_bytes()
        if used <= limit:
            return
        total = sum(mem)
        if total == 0:
            return
        need = used - limit // 2
        for port, buf in enumerate(self.bufs):
            if not buf.n:
                continue
            share = need * mem[port] / total
            k = min(buf.n, int(np.ceil(share / (mem[port] / buf.n))))
            if k <= 0:
                continue
            mask = np.zeros(buf.n, dtype=bool)
            mask[self.spill_order(port)[:k]] = True
            run = buf.spill(mask, self.spill_context(), self.track_matched[port])
            if run is not None:
                self.spills += 1
                self.spilled_rows += run.rows
                if self.ctx is not None:
                    self.ctx.increment_counter("millstream", "state_spills")
                self.after_spill(port)

    def after_spill(self, port: int) -> None:
        """A run was added to input ``port``: merge the newest runs while the older is at
        most twice the newer, so there are few runs (a probe searches each), each row is
        rewritten a few times, and dropped (or superseded) rows leave the disk."""
        runs = self.bufs[port].runs
        while len(runs) > max(1, self.merge_above) and runs[-2].rows <= 2 * runs[-1].rows:
            merging = runs[-2:]
            merged = self.merge_runs(port, merging, len(runs) == 2)
            for r in merging:
                r.delete()
            runs[-2:] = [merged] if merged is not None else []

    def merge_runs(self, port: int, runs: list[_Run], oldest: bool) -> _Run | None:
        """One run of the live rows of ``runs``, written hash range by hash range (each
        range about the work budget, so the merge holds no more in memory)."""
        fields = self.bufs[port].fields
        writer = _RunWriter(self.spill_context(), fields, self.time_field,
                            self.track_matched[port])
        bounds = _hash_bounds(max(1, int(np.ceil(sum(r.nbytes for r in runs)
                                                 / self.work_bytes()))))
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            tables: list[pa.Table] = []
            arrays: dict[str, list[np.ndarray]] = {f: [] for f in fields}
            for run in runs:
                for t, cols in run.live_rows(fields, lo, hi):
                    tables.append(t)
                    for f in fields:
                        arrays[f].append(cols[f])
            if not tables:
                continue
            table = _concat(tables)
            cols = {f: np.concatenate(a) for f, a in arrays.items()}
            order = np.argsort(cols["h"], kind="stable")
            writer.add(table.take(pa.array(order)), {f: a[order] for f, a in cols.items()})
        merged = writer.finish()
        if merged is not None:
            # every live row is at or above the newest clean-up threshold of the runs
            merged.done = max(r.done for r in runs)
        return merged

    # ------------------------------------------------------------------ snapshots

    def snapshot(self, port: int) -> pa.Table | None:
        """Every buffered row of input ``port`` (memory and disk), numpy columns included."""
        buf = self.bufs[port]
        return buf.snapshot_all() if buf.runs else buf.snapshot()

    def group_tables(self, port: int, key_groups: int) -> dict[int, pa.Table]:
        """``snapshot(port)`` split by key group."""
        return self.bufs[port].snapshot_groups(key_groups)

    def by_key_group(self, key_groups: int) -> list[tuple[int, list[pa.Table | None]]]:
        """Both inputs' rows split by key group: (group, [left rows, right rows]) in group
        order; group 0 with no rows when no row is buffered."""
        sides = [self.group_tables(port, key_groups) for port in (0, 1)]
        groups = sorted(set(sides[0]) | set(sides[1])) or [0]
        return [(g, [side.get(g) for side in sides]) for g in groups]

    def iter_key_groups(self, key_groups: int
                        ) -> Iterator[tuple[int, list[pa.Table | None]]]:
        """``by_key_group`` one group at a time: when rows have spilled, both inputs' rows
        are first split by group into files on disk, so that this needs memory for one
        group, not the whole state."""
        if not self.spilled:
            yield from self.by_key_group(key_groups)
            return
        ctx = self.spill_context()
        with GroupFiles(ctx, "snapshot-join-group") as left, \
                GroupFiles(ctx, "snapshot-join-group") as right:
            files = (left, right)
            for buf, gf in zip(self.bufs, files):
                for g, part in buf.group_pieces(key_groups):
                    gf.put(g, part)
            for g in sorted({*left.groups(), *right.groups()}) or [0]:
                yield g, [gf.take(g) for gf in files]

    def load(self, port: int, tables: list[pa.Table | None]) -> None:
        """Replace input ``port``'s rows with those of snapshot tables."""
        self.bufs[port].load(tables)

    def reset(self) -> None:
        """Forget every row and delete the spill files."""
        for b in self.bufs:
            b.reset()
