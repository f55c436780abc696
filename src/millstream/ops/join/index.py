"""The build side of a join, indexed once: rows grouped by key code, so that each probe
batch finds its matching build rows with numpy lookups (no re-hashing of the build side).

Codes come from :class:`~millstream.ops.join.keys.KeyEncoder`. A dense range of exact
codes (the usual integer keys) is looked up directly in per-code tables; any other codes
in an open-addressing hash table (linear probing, vectorized over the probe rows). A join
without keys (a cross join, a nested loop over a condition) is one group holding every
build row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from millstream.ops.join.keys import KeyEncoder

#: Which candidate pairs (probe rows, build rows) have equal keys.
PairCheck = Callable[[np.ndarray, np.ndarray], np.ndarray]

#: A direct offsets table (4 bytes a slot) is used while it has at most this many slots
#: per build row, or at most ``_DIRECT_MIN`` slots.
_DIRECT_PER_ROW = 16
_DIRECT_MIN = 1 << 21
#: exact codes over a span of at most this many values, of which at most one in
#: ``_FILTER_SPARSE`` is a build key, get a membership bitmap (one bit a value: 8 MB at
#: most) tested before the tables: a lookup in the (much larger) tables misses the CPU's
#: caches once per probe row, the bitmap's mostly not, and most probe rows of a selective
#: join find nothing (TPC-H Q3: 147k build keys over a span of 6M, 3.2M probe rows, ~10%
#: matching; lookups about 3x cheaper)
_FILTER_MAX_SPAN = 1 << 26
_FILTER_SPARSE = 4
#: up to this span the membership map has a byte a code, not a bit
_FILTER_BYTES = 1 << 23
#: the bitmap is no longer tested once this many probe rows have been and at least one in
#: ``_FILTER_MIN_MISS`` of them was not filtered out (it would only add work)
_FILTER_TRIAL = 200_000
_FILTER_MIN_MISS = 4


class JoinIndex:
    """Build rows grouped by the code of their key; built once, probed many times."""

    def __init__(self, key_cols: Sequence[pa.Array], num_rows: int) -> None:
        self.num_rows = num_rows
        self.encoder: KeyEncoder | None = None
        self.direct = False
        self.pure = True  # all build rows of a code have equal keys
        #: one bit per exact code present (see ``_FILTER_MAX_SPAN``), or None
        self.present: np.ndarray | None = None
        self._tested = 0  # probe rows tested against ``present``, and how many passed
        self._passed = 0
        if not key_cols:  # no keys: every build row matches every probe row
            self.order = np.arange(num_rows, dtype=np.int64)
            return
        enc = self.encoder = KeyEncoder(key_cols)
        codes = enc.build_codes
        rows = (np.flatnonzero(enc.build_valid) if enc.build_valid is not None
                else np.arange(num_rows, dtype=np.int64))
        if enc.build_valid is not None:
            codes = codes[rows]
        self.direct = enc.exact and enc.span <= max(_DIRECT_PER_ROW * len(rows), _DIRECT_MIN)
        if self.direct and enc.span < 2**31:
            codes = codes.astype(np.int32)  # sorts several times faster than int64
        sort = _argsort(codes)
        if sort is None:  # already in code order (a side read sorted by its key)
            self.order = rows
        else:
            self.order = rows[sort]  # build rows by code
            codes = codes[sort]
        starts = np.flatnonzero(codes[1:] != codes[:-1]) + 1
        starts = np.concatenate([np.zeros(min(1, len(codes)), np.int64), starts])
        counts = np.diff(np.append(starts, len(codes))).astype(np.int64)
        if enc.exact and len(codes) and enc.span <= _FILTER_MAX_SPAN \
                and len(starts) * _FILTER_SPARSE <= enc.span:
            marks = np.zeros(enc.span, dtype=bool)
            marks[codes[starts]] = True
            # a byte a code while that is small (one lookup, no bit arithmetic), else a bit
            self.present = marks if enc.span <= _FILTER_BYTES else \
                np.packbits(marks, bitorder="little")
        if self.direct:
            # per code: its first position in ``order`` and its number of rows; only the
            # slots of present codes are written (the zeroed pages of absent ones are
            # never touched), so no pass over the whole span
            idx = np.int32 if len(rows) < 2**31 else np.int64
            present = codes[starts]
            self.first = np.zeros(enc.span, dtype=idx)
            self.count = np.zeros(enc.span, dtype=idx)
            self.first[present] = starts
            self.count[present] = counts
        else:
            self.table = _HashTable(codes[starts], starts, counts)
            if not enc.exact and len(codes):
                # hashed codes: when every build row of a code has the same key (no two
                # build keys collide), a probe row is checked once, against one of them
                rep = np.repeat(self.order[starts], counts)
                self.pure = bool(enc.verify(enc.build_cols, enc.build_atoms, self.order,
                                            rep).all())

    def lookup(self, probe_cols: Sequence[pa.Array], n: int
               ) -> tuple[np.ndarray, np.ndarray, PairCheck | None]:
        """For each of ``n`` probe rows: how many build rows match and where they start in
        :attr:`order`; and None when all those candidates have equal keys, else a function
        telling which candidate pairs (probe rows, build rows) do (after a hash collision
        between two build keys)."""
        enc = self.encoder
        if enc is None:
            return (np.full(n, len(self.order), dtype=np.int64), np.zeros(n, dtype=np.int64),
                    None)
        code, valid, probe_atoms = enc.encode(probe_cols)
        if self.present is not None and (self._tested < _FILTER_TRIAL or
                                         self._passed * _FILTER_MIN_MISS < self._tested):
            return self._filtered_lookup(code, valid, n)
        if self.direct:
            ok = (code >= 0) & (code < enc.span)
            if valid is not None:
                ok &= valid
            pos = np.where(ok, code, 0) if not ok.all() else code
            first = self.first[pos].astype(np.int64)
            count = self.count[pos].astype(np.int64)
            if not ok.all():
                count[~ok] = 0
            return count, first, None
        count, first = self.table.find(code, valid)
        if enc.exact:
            return count, first, None
        if not self.pure:
            return count, first, lambda pi, bi: enc.verify(probe_cols, probe_atoms, pi, bi)
        rows = np.flatnonzero(count)
        if len(rows):
            same = enc.verify(probe_cols, probe_atoms, rows, self.order[first[rows]])
            count[rows[~same]] = 0
        return count, first, None


    def _filtered_lookup(self, code: np.ndarray, valid: np.ndarray | None, n: int
                         ) -> tuple[np.ndarray, np.ndarray, PairCheck | None]:
        """:meth:`lookup` of exact codes, the tables read only for the probe rows whose
        code is in :attr:`present`."""
        present = self.present
        # exact codes of valid rows (keys not null, every atom inside the build side's
        # range) lie in [0, span)
        pos = code if valid is None else np.where(valid, code, 0)
        if present.dtype == np.bool_:  # type: ignore[union-attr]
            hit = present[pos]  # type: ignore[index]
        else:
            hit = ((present[pos >> 3] >> (pos & 7).astype(np.uint8)) & 1).view(bool)  # type: ignore[index]
        rows = np.flatnonzero(hit if valid is None else hit & valid)
        self._tested += n
        self._passed += len(rows)
        count = np.zeros(n, dtype=np.int64)
        first = np.zeros(n, dtype=np.int64)
        if len(rows):
            sub = code[rows]
            if self.direct:
                count[rows] = self.count[sub]
                first[rows] = self.first[sub]
            else:
                count[rows], first[rows] = self.table.find(sub, None)
        return count, first, None


def _argsort(codes: np.ndarray) -> np.ndarray | None:
    """The order that sorts ``codes`` (None: they are sorted already): a merge of runs
    (stable) when the codes are mostly ascending already (a side read from files sorted
    or clustered by the key, shuffle outputs concatenated in map order), else numpy's
    default sort."""
    n = len(codes)
    if n < 2:
        return None
    descents = np.count_nonzero(codes[1:] < codes[:-1])
    if descents == 0:
        return None
    if descents * 64 < n:
        return np.argsort(codes, kind="stable")
    return np.argsort(codes)


class _HashTable:
    """Distinct int64 codes -> (count, first) of their build rows, by open addressing with
    linear probing. Built without a probing loop: codes sorted by home slot take the
    first free slot from their home on (a running maximum), the table grown past its end
    instead of wrapping, with an empty slot last; lookups probe all rows at once, in
    numpy rounds (most rows settle at their home slot)."""

    def __init__(self, codes: np.ndarray, first: np.ndarray, counts: np.ndarray) -> None:
        n = len(codes)
        cap = 16
        while cap < 2 * n:
            cap *= 2
        self.mask = np.uint64(cap - 1)
        home = self._home(codes)
        by_home = np.argsort(home.astype(np.int32) if cap < 2**31 else home)
        rank = np.arange(n, dtype=np.int64)
        slot = np.maximum.accumulate(home[by_home] - rank) + rank if n else rank
        size = max(cap, int(slot[-1]) + 2) if n else cap
        #: per slot: the number of build rows of its code (0: empty), the code, the first row
        self.count = np.zeros(size, dtype=np.int64)
        self.code = np.zeros(size, dtype=np.int64)
        self.first = np.zeros(size, dtype=np.int64)
        self.count[slot] = counts[by_home]
        self.code[slot] = codes[by_home]
        self.first[slot] = first[by_home]

    def _home(self, codes: np.ndarray) -> np.ndarray:
        h = codes.view(np.uint64)
        with np.errstate(over="ignore"):
            h = (h ^ (h >> np.uint64(31))) * np.uint64(0x9E3779B97F4A7C15)
            h = h ^ (h >> np.uint64(29))
        return (h & self.mask).view(np.int64)

    def find(self, codes: np.ndarray, valid: np.ndarray | None
             ) -> tuple[np.ndarray, np.ndarray]:
        """(count, first) of each code's build rows ((0, 0) where absent or not valid)."""
        slot = self._home(codes)
        count = self.count[slot]
        hit = (count > 0) & (self.code[slot] == codes)
        more = (count > 0) & ~hit
        if valid is not None:
            hit &= valid
            more &= valid
        found = np.where(hit, slot, len(self.count) - 1)  # the last slot is empty
        active = np.flatnonzero(more)
        slot = slot[active]
        while len(active):
            slot += 1
            count = self.count[slot]
            hit = (count > 0) & (self.code[slot] == codes[active])
            found[active[hit]] = slot[hit]
            more = (count > 0) & ~hit
            active, slot = active[more], slot[more]
        return self.count[found], self.first[found]


def pair_chunks(count: np.ndarray, first: np.ndarray, order: np.ndarray, max_pairs: int
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Candidate pairs (probe rows, build rows) of a lookup, at most ``max_pairs`` at a
    time (a row with many matches is split across chunks), probe rows ascending."""
    total = int(count.sum())
    if total == 0:
        return
    n = len(count)
    if total <= max_pairs:
        pi = np.repeat(np.arange(n, dtype=np.int64), count)
        excl = np.cumsum(count) - count
        bpos = np.arange(total, dtype=np.int64) + np.repeat(first - excl, count)
        yield pi, order[bpos]
        return
    cum = np.cumsum(count)
    excl = cum - count
    t0 = 0
    while t0 < total:
        t1 = min(total, t0 + max_pairs)
        r0 = int(np.searchsorted(cum, t0, side="right"))
        r1 = int(np.searchsorted(cum, t1 - 1, side="right")) + 1
        lc = count[r0:r1].copy()
        lf = first[r0:r1].copy()
        skip = t0 - int(excl[r0])
        lc[-1] = t1 - int(excl[r1 - 1])  # the last row ends at t1
        lc[0] -= skip  # the first row starts at t0
        lf[0] += skip
        m = t1 - t0
        pi = np.repeat(np.arange(r0, r1, dtype=np.int64), lc)
        lexcl = np.cumsum(lc) - lc
        bpos = np.arange(m, dtype=np.int64) + np.repeat(lf - lexcl, lc)
        yield pi, order[bpos]
        t0 = t1
