"""The buffered rows of one stream-join input as sorted chunks (:class:`_SortedBuffer`).

New rows go to an *open* part (the batches as they came, zero-copy). Once it holds about a
sixteenth of the buffer (at least ``_SEAL_MIN_ROWS`` rows, or ``_OPEN_MAX_CHUNKS`` batches)
it is *sealed*: its live rows become one chunk sorted by one numpy column, the event time
(interval join) or the key hash (regular join). So there are a few dozen chunks whatever
the number of rows, and:

* a chunk sorted by time expires a prefix (:meth:`_SortedBuffer.expire_prefix`, a
  zero-copy slice): a watermark advance touches the rows that expire, not the others;
  rows in a time range are a slice too (:meth:`~_SortedBuffer.by_time`);
* a chunk sorted by key hash finds a key's rows by binary search
  (:meth:`~_SortedBuffer.by_hash`);
* rows can be dropped lazily: taken back one by one (:meth:`~_SortedBuffer.kill`, a dead
  mask) or all those whose time is below a threshold (:meth:`~_SortedBuffer.expire_below`);
  a chunk whose live rows fall under half of those it holds is compacted (copied), and a
  chunk with no live row left is dropped whole.

A chunk is one Arrow table with one chunk per column, so taking rows from it stays fast.
The buffer keeps the interface of :class:`~millstream.ops.stream_join.buffer._Buffer`
(masks and row numbers count the rows held, chunk after chunk, dead ones included; what
it writes to runs and snapshots is the live rows), so
:class:`~millstream.ops.stream_join.state.JoinState` spills and snapshots it the same way.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from millstream.core.context import TaskContext
from millstream.core.time import MAX_WATERMARK, MIN_WATERMARK
from millstream.ops.stream_join.buffer import _DTYPES, _Buffer, _concat
from millstream.ops.stream_join.runs import _field_column, _ranges_to_indices, _Run, _RunWriter

#: A sealed chunk holds at least this many rows (unless the open part reached
#: ``_OPEN_MAX_CHUNKS`` batches first) ...
_SEAL_MIN_ROWS = 16_384
#: ... and about this fraction of the buffer's rows ...
_SEAL_FRACTION = 16
#: ... and at most this many.
_SEAL_MAX_ROWS = 1 << 20
#: The open part is sealed once it holds this many batches.
_OPEN_MAX_CHUNKS = 16
#: Chunks holding fewer rows are not copied to free the memory of their dropped rows
#: (they are merged with their neighbours as the buffer seals).
_COMPACT_MIN_ROWS = 1024


def _writable(a: np.ndarray) -> np.ndarray:
    """``a``, copied when it is a read-only view (of an Arrow buffer): flags change in place."""
    return a if a.flags.writeable else a.copy()


def _single(table: pa.Table) -> pa.Table:
    """``table`` with one chunk per column (taking rows from many chunks is slow)."""
    if all(c.num_chunks == 1 for c in table.columns):
        return table
    return table.combine_chunks()


def _runs_order(keys: list[np.ndarray]) -> list[int] | None:
    """The order of the runs ``keys`` in which their concatenation is sorted, and as a
    stable sort of them one after the other would leave it (ties keep the runs' order), or
    None when a run is unsorted or two overlap. A task with several senders gets batches
    in order from each, interleaved: such runs are put in order without a row gather."""
    ends = []
    for i, k in enumerate(keys):
        if len(k) > 1 and not (k[1:] >= k[:-1]).all():
            return None
        if len(k):
            ends.append((k[0], i, k[-1]))
    ends.sort()
    for (_, a, last), (first, b, _) in zip(ends, ends[1:]):
        if last > first or (last == first and a > b):
            return None
    empty = [i for i, k in enumerate(keys) if not len(k)]
    return empty + [i for _, i, _ in ends]


class _Chunk:
    """Rows of one input held in memory: a table and aligned numpy columns, sorted by the
    buffer's sort field when ``sorted``; ``dead`` marks rows taken back (None: none)."""

    __slots__ = ("data", "cols", "dead", "ndead", "sorted", "held", "tmin", "tmax", "nbytes")

    def __init__(self, data: pa.Table, cols: dict[str, np.ndarray], sorted_: bool,
                 time_field: str | None) -> None:
        self.data = _single(data)
        self.cols = cols
        self.dead: np.ndarray | None = None
        self.ndead = 0
        self.sorted = sorted_
        #: rows whose memory the chunk holds (a sliced chunk keeps its buffers)
        self.held = data.num_rows
        self.tmin, self.tmax = MIN_WATERMARK, MAX_WATERMARK
        self.bounds(time_field)
        self.nbytes = 0
        self.measure()

    @property
    def n(self) -> int:
        return self.data.num_rows

    def bounds(self, time_field: str | None) -> None:
        """Note the smallest and largest time of the rows."""
        if time_field is not None and self.n:
            t = self.cols[time_field]
            self.tmin, self.tmax = int(t.min()), int(t.max())

    def measure(self) -> int:
        self.nbytes = self.data.nbytes + sum(a.nbytes for a in self.cols.values()) + \
            (self.dead.nbytes if self.dead is not None else 0)
        return self.nbytes

    def live(self, done: int, time_field: str | None, idx: np.ndarray | None = None
             ) -> np.ndarray | None:
        """Mask of the rows (or of rows ``idx``) not taken back and not below ``done``
        (None: all of them)."""
        mask = None
        if time_field is not None and done > self.tmin:
            t = self.cols[time_field]
            mask = (t if idx is None else t[idx]) >= done
        if self.ndead:
            gone = self.dead if idx is None else self.dead[idx]
            mask = ~gone if mask is None else mask & ~gone
        return mask

    def take(self, idx: np.ndarray) -> pa.Table:
        """Rows ``idx`` (a slice when they are contiguous)."""
        if len(idx) and int(idx[-1]) - int(idx[0]) + 1 == len(idx) and \
                (len(idx) < 2 or bool((np.diff(idx) == 1).all())):
            return self.data.slice(int(idx[0]), len(idx))
        return self.data.take(pa.array(idx, pa.int64()))

    def filter(self, mask: np.ndarray) -> None:
        """Keep the rows where ``mask`` is true (copied: the dropped rows' memory goes)."""
        self.data = self.data.filter(pa.array(mask))
        self.cols = {f: a[mask] for f, a in self.cols.items()}
        if self.dead is not None:
            self.dead = self.dead[mask]
            self.ndead = int(self.dead.sum())
            if not self.ndead:
                self.dead = None
        self.held = self.n

    def cut(self, k: int) -> None:
        """Drop the first ``k`` rows (zero-copy: a slice)."""
        self.data = self.data.slice(k)
        self.cols = {f: a[k:] for f, a in self.cols.items()}
        if self.dead is not None:
            self.dead = self.dead[k:]
            self.ndead = int(self.dead.sum())


class _Picked:
    """Rows picked from chunks (``parts``: (chunk, row numbers)) as one table and numpy
    columns; changes to their flags and counts are written back to the chunks."""

    def __init__(self, parts: list[tuple[_Chunk, np.ndarray]], fields: Sequence[str]) -> None:
        self.parts = parts
        tables = [c.take(idx) for c, idx in parts]
        self.table = _single(_concat(tables))
        self.cols = {f: np.concatenate([c.cols[f][idx] for c, idx in parts]) for f in fields}
        self.offsets = np.cumsum([0, *(len(idx) for _c, idx in parts)])

    def _locate(self, sel: np.ndarray) -> Iterator[tuple[_Chunk, np.ndarray, np.ndarray]]:
        """Per part: its chunk, the chunk rows of the picked rows ``sel``, and where in
        ``sel`` they are."""
        if not len(sel):
            return
        order = np.argsort(sel, kind="stable")
        ss = sel[order]
        cuts = np.searchsorted(ss, self.offsets)
        for p, (c, idx) in enumerate(self.parts):
            a, b = cuts[p], cuts[p + 1]
            if b > a:
                yield c, idx[ss[a:b] - self.offsets[p]], order[a:b]

    def set(self, field: str, sel: np.ndarray, value: Any) -> None:
        """Set ``field`` of the picked rows ``sel``."""
        for c, rows, _pos in self._locate(sel):
            c.cols[field][rows] = value

    def add(self, field: str, sel: np.ndarray, delta: np.ndarray) -> None:
        """Add ``delta[i]`` to ``field`` of picked row ``sel[i]`` (``sel`` distinct)."""
        for c, rows, pos in self._locate(sel):
            c.cols[field][rows] += delta[pos]


class _SortedBuffer(_Buffer):
    """Buffered rows of one join input: sorted chunks in memory (see the module docstring)
    and the spill runs of rows moved to disk."""

    def __init__(self, fields: Sequence[str], time_field: str | None = None,
                 sort_field: str = "t") -> None:
        self.fields = tuple(fields)
        self.time_field = time_field
        self.sort_field = sort_field
        self.sealed: list[_Chunk] = []
        self.open: list[_Chunk] = []
        self.open_rows = 0
        #: rows held in memory (dead ones included) and their bytes
        self._rows = 0
        self.bytes = 0
        self.runs: list[_Run] = []
        #: rows whose time is below this are gone (dropped lazily, ``expire_below``)
        self.done = MIN_WATERMARK

    # ------------------------------------------------------------------ views

    @property
    def chunks(self) -> list[_Chunk]:
        """Every chunk, sealed ones first (the order masks and row numbers count in)."""
        return [*self.sealed, *self.open]

    @property
    def n(self) -> int:
        """Rows held in memory (rows taken back but not yet compacted included)."""
        return self._rows

    @property
    def table(self) -> pa.Table | None:  # type: ignore[override]
        """Every row held, chunk after chunk (None: none)."""
        chunks = self.chunks
        return _concat([c.data for c in chunks]) if chunks else None

    @property
    def arrays(self) -> dict[str, np.ndarray]:  # type: ignore[override]
        """The numpy columns of every row held (a copy: write through ``_Picked``)."""
        chunks = self.chunks
        return {f: np.concatenate([c.cols[f] for c in chunks]) if chunks
                else np.zeros(0, _DTYPES[f]) for f in self.fields}

    def _positions(self, idx: np.ndarray) -> Iterator[tuple[_Chunk, np.ndarray, np.ndarray]]:
        """Row numbers ``idx`` (over all chunks) per chunk: (chunk, its rows, where in
        ``idx``)."""
        chunks = self.chunks
        offsets = np.cumsum([0, *(c.n for c in chunks)])
        which = np.searchsorted(offsets, idx, "right") - 1
        for k in np.unique(which):
            pos = np.flatnonzero(which == k)
            yield chunks[k], idx[pos] - offsets[k], pos

    def rows(self, idx: np.ndarray) -> pa.Table:
        """Rows ``idx`` (numbers over all chunks), in that order."""
        idx = np.asarray(idx, np.int64)
        parts, where = [], []
        for c, rows, pos in self._positions(idx):
            parts.append(c.data.take(pa.array(rows)))
            where.append(pos)
        if not parts:
            return self.table.slice(0, 0) if self.chunks else pa.table({})
        table = _concat(parts)
        order = np.argsort(np.concatenate(where), kind="stable")
        return table.take(pa.array(order))

    take = rows

    def _live(self, c: _Chunk, idx: np.ndarray | None = None) -> np.ndarray | None:
        return c.live(self.done, self.time_field, idx)

    def live_rows(self) -> Iterator[tuple[pa.Table, dict[str, np.ndarray]]]:
        """Per chunk: its live rows and their numpy columns."""
        for c in self.chunks:
            mask = self._live(c)
            if mask is None:
                if c.n:
                    yield c.data, dict(c.cols)
            elif mask.any():
                yield c.data.filter(pa.array(mask)), {f: a[mask] for f, a in c.cols.items()}

    # ------------------------------------------------------------------ adding

    def _seal_at(self) -> int:
        return min(_SEAL_MAX_ROWS, max(_SEAL_MIN_ROWS, self._rows // _SEAL_FRACTION))

    def append(self, table: pa.Table, **arrays: np.ndarray) -> None:
        if table.num_rows == 0:
            return
        c = _Chunk(table, {f: _writable(np.asarray(arrays[f], _DTYPES[f])) for f in self.fields},
                   False, self.time_field)
        self.open.append(c)
        self.open_rows += c.n
        self._rows += c.n
        self.bytes += c.nbytes
        if self.open_rows >= self._seal_at() or len(self.open) >= _OPEN_MAX_CHUNKS:
            self.seal()

    def _merged(self, chunks: list[_Chunk]) -> _Chunk | None:
        """One chunk sorted by the sort field of the live rows of ``chunks``."""
        tables, cols = [], []
        for c in chunks:
            mask = self._live(c)
            if mask is None:
                tables.append(c.data)
                cols.append(c.cols)
            elif mask.any():
                tables.append(c.data.filter(pa.array(mask)))
                cols.append({f: a[mask] for f, a in c.cols.items()})
        if not tables:
            return None
        if len(tables) > 1:
            order = _runs_order([c[self.sort_field] for c in cols])
            if order is not None:  # sorted runs that do not overlap: no sort, no gather
                tables, cols = [tables[i] for i in order], [cols[i] for i in order]
        data = _single(_concat(tables))
        merged = {f: np.concatenate([c[f] for c in cols]) for f in self.fields}
        key = merged[self.sort_field]
        if len(key) > 1 and not (key[1:] >= key[:-1]).all():
            order = np.argsort(key, kind="stable")
            data = data.take(pa.array(order))
            merged = {f: a[order] for f, a in merged.items()}
        return _Chunk(data, merged, True, self.time_field)

    def seal(self) -> None:
        """Make the open part one sorted chunk; merge the newest sealed chunks while they
        are small (so there are few chunks whatever the batch size)."""
        if not self.open:
            return
        new = self._merged(self.open)
        self.open, self.open_rows = [], 0
        if new is not None:
            self.sealed.append(new)
        target = self._seal_at()
        while len(self.sealed) >= 2 and self.sealed[-1].n + self.sealed[-2].n <= target:
            both = self._merged(self.sealed[-2:])
            self.sealed[-2:] = [both] if both is not None else []
        self._recount()

    def _recount(self) -> None:
        chunks = self.chunks
        self._rows = sum(c.n for c in chunks)
        self.bytes = sum(c.nbytes for c in chunks)

    # ------------------------------------------------------------------ finding rows

    def by_time(self, lo: int, hi: int) -> list[tuple[_Chunk, np.ndarray]]:
        """The live rows whose time is in ``[lo, hi]``: (chunk, row numbers) per chunk."""
        tf = self.time_field
        out = []
        for c in self.chunks:
            if c.tmax < lo or c.tmin > hi or not c.n:
                continue
            t = c.cols[tf]
            if c.sorted and self.sort_field == tf:
                a, b = np.searchsorted(t, lo, "left"), np.searchsorted(t, hi, "right")
                idx = np.arange(a, b, dtype=np.int64)
            else:
                idx = np.flatnonzero((t >= lo) & (t <= hi))
            idx = self._alive_of(c, idx)
            if len(idx):
                out.append((c, idx))
        return out

    def by_hash(self, hashes: np.ndarray) -> list[tuple[_Chunk, np.ndarray]]:
        """The live rows whose key hash is in ``hashes`` (sorted, distinct): (chunk, row
        numbers) per chunk."""
        out = []
        if not len(hashes):
            return out
        for c in self.chunks:
            if not c.n:
                continue
            h = c.cols["h"]
            if c.sorted and self.sort_field == "h":
                if hashes[-1] < h[0] or hashes[0] > h[-1]:
                    continue
                idx = _ranges_to_indices(np.searchsorted(h, hashes, "left"),
                                         np.searchsorted(h, hashes, "right"))
            else:
                idx = np.flatnonzero(np.isin(h, hashes))
            idx = self._alive_of(c, idx)
            if len(idx):
                out.append((c, idx))
        return out

    def _alive_of(self, c: _Chunk, idx: np.ndarray) -> np.ndarray:
        if not len(idx):
            return idx
        mask = self._live(c, idx)
        return idx if mask is None else idx[mask]

    def pick(self, parts: list[tuple[_Chunk, np.ndarray]]) -> _Picked:
        """The rows of ``parts`` as one table (see :class:`_Picked`)."""
        return _Picked(parts, self.fields)

    # ------------------------------------------------------------------ dropping rows

    def expire_prefix(self, thr: int, collect: bool) -> list[tuple[pa.Table, dict[str, np.ndarray]]]:
        """Drop the rows whose time is below ``thr`` (a buffer sorted by time: a prefix of
        each sealed chunk); with ``collect``, return the live ones (table, numpy columns)."""
        tf = self.time_field
        out: list[tuple[pa.Table, dict[str, np.ndarray]]] = []
        changed = False
        for group in (self.sealed, self.open):
            keep = []
            for c in group:
                if c.tmin >= thr:
                    keep.append(c)
                    continue
                changed = True
                t = c.cols[tf]
                if c.sorted and self.sort_field == tf:
                    k = int(np.searchsorted(t, thr, "left"))
                    if collect and k:
                        idx = self._alive_of(c, np.arange(k, dtype=np.int64))
                        if len(idx):
                            out.append((c.take(idx), {f: a[idx] for f, a in c.cols.items()}))
                    c.cut(k)
                else:
                    gone = t < thr
                    if collect:
                        idx = self._alive_of(c, np.flatnonzero(gone))
                        if len(idx):
                            out.append((c.take(idx), {f: a[idx] for f, a in c.cols.items()}))
                    c.filter(~gone)
                if c.n:
                    c.tmin = int(c.cols[tf][0]) if c.sorted and self.sort_field == tf \
                        else int(c.cols[tf].min())
                    self._compact(c)
                    c.measure()
                    keep.append(c)
            group[:] = keep
        if changed:
            self.open_rows = sum(c.n for c in self.open)
            self._recount()
        return out

    def expire_below(self, thr: int) -> None:
        """Drop (lazily) the rows whose time is below ``thr``: chunks with no row left go
        whole, those left with under half their rows live are compacted."""
        if thr <= self.done:
            return
        self.done = thr
        changed = False
        for group in (self.sealed, self.open):
            keep = []
            for c in group:
                if c.tmax < thr:
                    changed = True
                    continue
                if c.tmin < thr:
                    changed |= self._compact(c)
                if c.n:
                    keep.append(c)
            group[:] = keep
        if changed:
            self.open_rows = sum(c.n for c in self.open)
            self._recount()

    def kill(self, c: _Chunk, idx: np.ndarray) -> None:
        """Take back rows ``idx`` (distinct, live) of chunk ``c``."""
        if not len(idx):
            return
        if c.dead is None:
            c.dead = np.zeros(c.n, bool)
        c.dead[idx] = True
        c.ndead += len(idx)
        before = c.nbytes
        self._compact(c)
        self.bytes += c.measure() - before
        if not c.n:
            self._drop_empty()

    def _compact(self, c: _Chunk) -> bool:
        """Copy ``c``'s live rows when they are under half of the rows it holds (its
        dropped rows' memory goes); True when it did."""
        mask = self._live(c)
        live = c.n if mask is None else int(np.count_nonzero(mask))
        if live * 2 >= c.held or (c.held < _COMPACT_MIN_ROWS and live):
            return False
        if mask is None:  # a sliced chunk: copy what is left
            c.data = c.data.take(pa.array(np.arange(c.n, dtype=np.int64)))
            c.cols = {f: a.copy() for f, a in c.cols.items()}
            c.held = c.n
        else:
            c.filter(mask)
        c.bounds(self.time_field)
        c.measure()
        return True

    def _drop_empty(self) -> None:
        self.sealed = [c for c in self.sealed if c.n]
        self.open = [c for c in self.open if c.n]
        self.open_rows = sum(c.n for c in self.open)
        self._recount()

    # ------------------------------------------------------------------ _Buffer interface

    def keep(self, mask: np.ndarray) -> None:
        """Keep only the rows (in memory, numbered chunk after chunk) where ``mask`` is true."""
        if mask.all():
            return
        at = 0
        for c in self.chunks:
            m = mask[at:at + c.n]
            at += c.n
            if not m.all():
                c.filter(m)
                c.bounds(self.time_field)
                c.measure()
        self._drop_empty()

    def measure(self) -> int:
        self.bytes = sum(c.measure() for c in self.chunks)
        return self.bytes

    def clear(self) -> None:
        self.sealed, self.open = [], []
        self.open_rows = self._rows = self.bytes = 0

    def _selected(self, mask: np.ndarray | None
                  ) -> tuple[pa.Table, dict[str, np.ndarray]] | None:
        """The live rows where ``mask`` is true (all: None) and their numpy columns."""
        tables, cols = [], []
        at = 0
        for c in self.chunks:
            sel = self._live(c)
            if mask is not None:
                m = mask[at:at + c.n]
                sel = m if sel is None else sel & m
            at += c.n
            if sel is None:
                if c.n:
                    tables.append(c.data)
                    cols.append(c.cols)
            elif sel.any():
                tables.append(c.data.filter(pa.array(sel)))
                cols.append({f: a[sel] for f, a in c.cols.items()})
        if not tables:
            return None
        return _concat(tables), {f: np.concatenate([c[f] for c in cols]) for f in self.fields}

    def spill(self, mask: np.ndarray, ctx: TaskContext, track_matched: bool) -> _Run | None:
        """Move the rows where ``mask`` is true to a new run (sorted by hash); dead ones go."""
        if not self._rows or not mask.any():
            return None
        got = self._selected(mask)
        run = None
        if got is not None:
            table, arrays = got
            order = np.argsort(arrays["h"], kind="stable")
            writer = _RunWriter(ctx, self.fields, self.time_field, track_matched)
            writer.add(table.take(pa.array(order)), {f: a[order] for f, a in arrays.items()})
            run = writer.finish()
            if run is not None:
                self.runs.append(run)
        self.keep(~mask)
        return run

    def snapshot(self, mask: np.ndarray | None = None) -> pa.Table | None:
        """The live rows (all, or where ``mask``) with the numpy columns as ``__ms_<name>``."""
        got = self._selected(mask)
        if got is None:
            return None
        t, arrays = got
        for f in self.fields:
            t = t.append_column(_field_column(f), pa.array(arrays[f]))
        return t.combine_chunks()
