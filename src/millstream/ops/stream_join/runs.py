"""Spill runs: buffered rows of one join input moved to disk.

A run is an uncompressed Arrow IPC file of segments (record batches sorted by key hash,
the buffer's numpy columns stored as ``__ms_<name>`` columns), memory-mapped for reading:
a probe binary-searches the mapped hash column and touches only the pages it needs.
Memory keeps a few numbers per segment and what may change after the move: the "matched"
bit of outer interval joins, the match count (``n``) of outer regular joins, and a "dead"
bit per row once one is taken back (a retraction). :class:`_RunWriter` writes a run; the
hash-range helpers let merges, firings and snapshots read runs a hash range at a time.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa

from millstream.core.context import TaskContext
from millstream.core.spill import SpillFile
from millstream.core.time import MAX_WATERMARK, MIN_WATERMARK

#: Rows of one segment of a spill run at most (a segment is one record batch, sorted by hash).
_SEGMENT_MAX_BYTES = 64 << 20
#: Bytes the in-memory index of a spill run costs beyond its matched-flag bits (Python
#: and Arrow objects: the run, its file, per segment the mapped batch and column views).
_RUN_OVERHEAD = 2048
_SEGMENT_OVERHEAD = 3072
_COLUMN_OVERHEAD = 512
_U64_SPAN = 1 << 64
#: Numpy columns a run keeps in memory, not in its file (they change after the move).
_MEMORY_FIELDS = ("m", "n")


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _field_column(name: str) -> str:
    return f"__ms_{name}"


def _ranges_to_indices(starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """Every index of the half-open ranges ``[starts[i], stops[i])``, in order."""
    counts = stops - starts
    keep = counts > 0
    if not keep.all():
        starts, counts = starts[keep], counts[keep]
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    offsets = np.cumsum(counts) - counts
    return np.repeat(starts - offsets, counts) + np.arange(total, dtype=np.int64)


def _get_bits(bits: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Flags ``idx`` of a little-endian packed bit array."""
    return ((bits[idx >> 3] >> (idx & 7).astype(np.uint8)) & 1).astype(bool)


def _set_bits(bits: np.ndarray, idx: np.ndarray) -> None:
    """Set flags ``idx`` of a little-endian packed bit array."""
    if len(idx):
        np.bitwise_or.at(bits, idx >> 3, np.left_shift(np.uint8(1), (idx & 7).astype(np.uint8)))


def _hash_bounds(parts: int) -> list[int]:
    """``parts + 1`` boundaries splitting the uint64 hash space into equal ranges."""
    return [i * _U64_SPAN // parts for i in range(parts + 1)]


def _range_slice(h: np.ndarray, lo: int, hi: int) -> tuple[int, int]:
    """Positions of sorted hashes ``h`` in ``[lo, hi)`` (``hi`` may be 2**64)."""
    a = 0 if lo == 0 else int(np.searchsorted(h, np.uint64(lo), "left"))
    b = len(h) if hi >= _U64_SPAN else int(np.searchsorted(h, np.uint64(hi), "left"))
    return a, b


class _Segment:
    """One record batch of a spill run, memory-mapped, its rows sorted by key hash."""

    __slots__ = ("data", "h", "cols", "offset", "rows", "nbytes", "h_lo", "h_hi")

    def __init__(self, batch: pa.RecordBatch, fields: Sequence[str], offset: int) -> None:
        names = [_field_column(f) for f in fields if f not in _MEMORY_FIELDS]
        #: the rows' own columns (user and hidden key columns), zero-copy from the mapping
        self.data = batch.drop_columns(names)
        #: the numpy columns (``h``, times, ``seq``), zero-copy views of the mapping
        self.cols = {f: np.asarray(batch.column(_field_column(f))) for f in fields
                     if f not in _MEMORY_FIELDS}
        self.h: np.ndarray = self.cols["h"]
        self.offset = offset
        self.rows = batch.num_rows
        self.nbytes = self.data.nbytes
        self.h_lo, self.h_hi = int(self.h[0]), int(self.h[-1])

    def lookup(self, hashes: np.ndarray) -> np.ndarray:
        """Positions of the rows whose hash is in ``hashes`` (sorted, distinct), in order."""
        if not len(hashes) or int(hashes[-1]) < self.h_lo or int(hashes[0]) > self.h_hi:
            return np.zeros(0, np.int64)
        return _ranges_to_indices(np.searchsorted(self.h, hashes, "left"),
                                  np.searchsorted(self.h, hashes, "right"))

    def take(self, idx: np.ndarray) -> pa.Table:
        """Rows ``idx`` (copied out of the mapping)."""
        return pa.Table.from_batches([self.data.take(pa.array(idx, pa.int64()))])


class _Run:
    """Rows of one join input moved to disk by one spill (or merge).

    An uncompressed Arrow IPC stream file of segments (record batches, each sorted by key
    hash, with the numpy columns as ``__ms_<name>`` columns), memory-mapped: reading a
    column or probing hashes touches only the pages it needs, and the pages are the
    kernel's cache, not the task's heap. In memory: a few numbers per segment, and what
    changes after the spill: one bit per row for the interval join's "matched" flags, the
    regular join's match counts (``counts``, field ``n``), and a "dead" bit per row once a
    row is taken back (``kill``).
    ``done``: rows whose time (the buffer's ``time_field``) is below it were dropped.
    """

    __slots__ = ("file", "segs", "rows", "nbytes", "time_field", "lo", "hi", "done", "bits",
                 "counts", "dead", "dead_rows", "index_bytes", "_finalizer", "__weakref__")

    def __init__(self, file: SpillFile, fields: Sequence[str], time_field: str | None,
                 bits: np.ndarray | None, counts: np.ndarray | None = None) -> None:
        self.file = file
        # the file goes with the run even when the operator is dropped without close()
        self._finalizer = weakref.finalize(self, _unlink, file.path)
        with pa.memory_map(file.path) as mm:
            batches = list(pa.ipc.open_stream(mm))
        self.segs: list[_Segment] = []
        at = 0
        for b in batches:
            if b.num_rows:
                self.segs.append(_Segment(b, fields, at))
                at += b.num_rows
        self.rows = at
        self.nbytes = sum(s.nbytes for s in self.segs)
        self.time_field = time_field
        if time_field is not None and self.segs:
            self.lo = min(int(s.cols[time_field].min()) for s in self.segs)
            self.hi = max(int(s.cols[time_field].max()) for s in self.segs)
        else:
            self.lo, self.hi = MIN_WATERMARK, MAX_WATERMARK
        self.done = MIN_WATERMARK
        self.bits = bits
        self.counts = counts
        #: packed bits of the rows taken back (None: none yet), and how many
        self.dead: np.ndarray | None = None
        self.dead_rows = 0
        #: bytes this run keeps in memory
        self.index_bytes = (_RUN_OVERHEAD + sum(
            _SEGMENT_OVERHEAD + _COLUMN_OVERHEAD * (s.data.num_columns + len(s.cols))
            for s in self.segs)
            + (bits.nbytes if bits is not None else 0)
            + (counts.nbytes if counts is not None else 0))

    def alive(self, seg: _Segment, a: int = 0, b: int | None = None) -> np.ndarray | None:
        """Mask of the segment's rows ``a:b`` not dropped yet (None: all)."""
        mask = None
        if self.time_field is not None and self.done > self.lo:
            mask = seg.cols[self.time_field][a:b] >= self.done
        if self.dead_rows:
            stop = seg.rows if b is None else b
            gone = _get_bits(self.dead, seg.offset + np.arange(a, stop, dtype=np.int64))
            mask = ~gone if mask is None else mask & ~gone
        return mask

    def alive_at(self, seg: _Segment, idx: np.ndarray) -> np.ndarray | None:
        """Mask of rows ``idx`` of ``seg`` not dropped yet (None: all)."""
        mask = None
        if self.time_field is not None and self.done > self.lo:
            mask = seg.cols[self.time_field][idx] >= self.done
        if self.dead_rows:
            gone = _get_bits(self.dead, seg.offset + idx)
            mask = ~gone if mask is None else mask & ~gone
        return mask

    def kill(self, seg: _Segment, idx: np.ndarray) -> None:
        """Drop rows ``idx`` of ``seg`` (distinct, alive): they were taken back."""
        if not len(idx):
            return
        if self.dead is None:
            self.dead = np.zeros((self.rows + 7) // 8, np.uint8)
            self.index_bytes += self.dead.nbytes
        _set_bits(self.dead, seg.offset + idx)
        self.dead_rows += len(idx)

    @property
    def all_dead(self) -> bool:
        """Whether every row was taken back or dropped by time."""
        return self.dead_rows >= self.rows or (self.time_field is not None
                                               and self.hi < self.done)

    def count(self, seg: _Segment, idx: np.ndarray) -> np.ndarray:
        """The match counts (field ``n``) of rows ``idx`` of ``seg``."""
        if self.counts is None:
            return np.zeros(len(idx), np.int64)
        return self.counts[seg.offset + idx]

    def add_count(self, seg: _Segment, idx: np.ndarray, delta: np.ndarray) -> None:
        """Add ``delta`` to the match counts of rows ``idx`` (distinct) of ``seg``."""
        if self.counts is not None and len(idx):
            self.counts[seg.offset + idx] += delta

    def matched(self, seg: _Segment, idx: np.ndarray) -> np.ndarray:
        """The matched flags of rows ``idx`` of ``seg``."""
        if self.bits is None:
            return np.zeros(len(idx), bool)
        return _get_bits(self.bits, seg.offset + idx)

    def set_matched(self, seg: _Segment, idx: np.ndarray) -> None:
        """Flag rows ``idx`` of ``seg`` as matched."""
        if self.bits is not None:
            _set_bits(self.bits, seg.offset + idx)

    def live_rows(self, fields: Sequence[str], lo: int = 0, hi: int = _U64_SPAN
                  ) -> Iterator[tuple[pa.Table, dict[str, np.ndarray]]]:
        """Per segment: its rows not dropped yet whose hash is in ``[lo, hi)``, and their
        numpy columns ``fields`` (``m``: the matched flags)."""
        for seg in self.segs:
            a, b = _range_slice(seg.h, lo, hi)
            if b <= a:
                continue
            mask = self.alive(seg, a, b)
            if mask is None:
                idx = np.arange(a, b, dtype=np.int64)
                table = pa.Table.from_batches([seg.data.slice(a, b - a)])
            else:
                idx = a + np.flatnonzero(mask)
                if not len(idx):
                    continue
                table = seg.take(idx)
            yield table, {f: self.matched(seg, idx) if f == "m" else
                          self.count(seg, idx) if f == "n" else seg.cols[f][idx]
                          for f in fields}

    def snapshot_parts(self, fields: Sequence[str]) -> Iterator[tuple[pa.Table, np.ndarray]]:
        """Per segment: the live rows with every numpy column as ``__ms_<name>``, and their hashes."""
        for t, cols in self.live_rows(fields):
            for f in fields:
                t = t.append_column(_field_column(f), pa.array(cols[f]))
            yield t, cols["h"]

    def delete(self) -> None:
        """Delete the file (mapped pages still referenced stay valid until released)."""
        self.segs = []
        self.bits = self.counts = self.dead = None
        self.file.delete()
        self._finalizer.detach()


class _RunWriter:
    """Writes the segments of a new spill run; ``finish()`` maps it."""

    def __init__(self, ctx: TaskContext, fields: Sequence[str], time_field: str | None,
                 track_matched: bool) -> None:
        self.file = SpillFile(ctx, "join-state", compression=None)
        self.fields = tuple(fields)
        self.time_field = time_field
        self.track = track_matched
        self._m: list[np.ndarray] = []
        self._n: list[np.ndarray] | None = [] if "n" in self.fields else None
        self.rows = 0

    def add(self, table: pa.Table, arrays: dict[str, np.ndarray]) -> None:
        """Append rows (sorted by ``arrays["h"]``) as one or more segments."""
        n = table.num_rows
        if n == 0:
            return
        per = max(1, int(n * _SEGMENT_MAX_BYTES // max(1, table.nbytes)))
        for s in range(0, n, per):
            part = table.slice(s, per)
            for f in self.fields:
                if f not in _MEMORY_FIELDS:
                    part = part.append_column(_field_column(f), pa.array(arrays[f][s:s + per]))
            self.file.write(part.combine_chunks().to_batches()[0])
        if self.track:
            self._m.append(np.asarray(arrays["m"], bool))
        if self._n is not None:
            self._n.append(np.asarray(arrays["n"], np.int64))
        self.rows += n

    def finish(self) -> _Run | None:
        """The run written (None when it has no rows)."""
        self.file.close()
        if self.rows == 0:
            self.file.delete()
            return None
        bits = None
        if self.track:
            bits = np.packbits(np.concatenate(self._m), bitorder="little")
        counts = np.concatenate(self._n) if self._n is not None else None
        return _Run(self.file, self.fields, self.time_field, bits, counts)
