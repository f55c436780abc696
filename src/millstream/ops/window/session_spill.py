"""Session windows' spilled state: which sessions move to disk, and when they come back.

Over the memory limit, the sessions that *end first* move to disk, sorted by end into
files of about a quarter of the limit (at least ``session_spill_min_rows`` sessions).
Unlike a window pane, a session cannot take new events blindly (an event may extend or
bridge it), and the sessions that end last are the ones still receiving events; those
that end first are either fired and only held for allowed lateness (their file is
deleted unread once they expire) or get no in-order event any more. Memory keeps, per
file, the distinct key hashes and the span of its sessions; a file comes back (whole)
when an event of one of its keys overlaps that span, when the watermark reaches its
earliest unfired session end, and at ``finish()``, so a held session never overlaps a
spilled one and merging always sees every session it must. Expired sessions are dropped
as they come back. Snapshots read spilled sessions (their files stay).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from millstream.core.arrow import normalize_key
from millstream.core.keygroups import key_hashes
from millstream.core.spill import SpillFile
from millstream.core.time import MAX_WATERMARK
from millstream.ops.window.tables import _WE, _WS, _col_numpy, _concat

if TYPE_CHECKING:
    from millstream.ops.window.operator import WindowAggregate


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


class SessionSpills:
    """The spill files of a session window operator (iterable; false when there are none)."""

    def __init__(self, op: WindowAggregate) -> None:
        self.op = op
        self.files: list[_SessionSpill] = []

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[_SessionSpill]:
        return iter(self.files)

    def spill_coldest(self, buckets: list[pa.Table | None], limit: int) -> None:
        """Over ``limit`` bytes: move the sessions that end first out of ``buckets`` (in
        place) to disk, in files by end.

        Sessions ending first are the coldest: fired ones held for allowed lateness are
        only needed by a late event (and their file is deleted unread once they expire);
        unfired ones get no in-order event any more and are read back when they fire.
        """
        used = sum(t.nbytes for t in buckets if t is not None)
        if used <= limit:
            return
        held = [(b, t) for b, t in enumerate(buckets) if t is not None and t.num_rows]
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
            buckets[b] = rest if rest.num_rows else None
        spilled = _concat(out)
        spilled = spilled.take(pa.array(np.argsort(_col_numpy(spilled, _WE), kind="stable")))
        # files of a quarter of the limit (not tiny: each costs an open and a check per batch)
        row_bytes = max(1.0, spilled.nbytes / spilled.num_rows)
        per_file = max(self.op.session_spill_min_rows, int(limit // 4 / row_bytes))
        for s in range(0, spilled.num_rows, per_file):
            self.write(spilled.slice(s, per_file))

    def write(self, table: pa.Table) -> None:
        """Move sessions (sorted by end) to a new spill file."""
        op = self.op
        sf = SpillFile(op._spill_context(), "session-state")
        for b in table.to_batches():
            sf.write(b)
        sf.close()
        ws, we = _col_numpy(table, _WS), _col_numpy(table, _WE)
        unfired = we[we > op.watermark]
        if op.keys:
            cols = [normalize_key(table.column(k)) for k in op.keys]
            hashes = np.unique(key_hashes(cols, table.num_rows))
        else:
            hashes = None
        self.files.append(_SessionSpill(
            sf, hashes, int(ws.min()), int(we.max()),
            int(unfired.min()) if len(unfired) else MAX_WATERMARK))
        if op.ctx is not None:
            op.ctx.increment_counter("millstream", "state_spills")

    def read(self, spills: list[_SessionSpill], expiry: int) -> list[pa.Table]:
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

    def take(self, spills: list[_SessionSpill], expiry: int) -> list[pa.Table]:
        """The sessions in ``spills`` that end after ``expiry``; their files are deleted."""
        if not spills:
            return []
        tables = [t for t in self.read(spills, expiry) if t.num_rows]
        for sp in spills:
            sp.file.delete()
            self.files.remove(sp)
        return tables

    def hit(self, batch: pa.RecordBatch, t: np.ndarray) -> list[_SessionSpill]:
        """The spill files that may hold a session one of these events overlaps.

        A file is hit when an event's key is among the file's keys and its own session
        ``[t, t + gap)`` overlaps the span of the file's sessions; so a held session never
        overlaps a spilled one, and merging sees every session it has to.
        """
        op = self.op
        lo, hi = t, t + op.window.gap
        hashes = None
        if op.keys:
            hashes = key_hashes([normalize_key(batch.column(k)) for k in op.keys],
                                batch.num_rows)
        hit = []
        for sp in self.files:
            m = (lo < sp.hi) & (hi > sp.lo)
            if hashes is not None and m.any():
                m = np.isin(hashes[m], sp.hashes)
            if m.any():
                hit.append(sp)
        return hit

    def expire(self, expiry: int) -> None:
        """Delete the files whose sessions all end by ``expiry`` (fired before, now expired)."""
        for sp in [sp for sp in self.files if sp.hi <= expiry]:
            sp.file.delete()
            self.files.remove(sp)

    def drop(self) -> None:
        """Delete every file."""
        for sp in self.files:
            sp.file.delete()
        self.files = []
