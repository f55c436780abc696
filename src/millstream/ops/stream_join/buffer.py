"""The buffered rows of one input of a keyed stream join (:class:`_Buffer`).

An Arrow table plus aligned numpy columns in memory (event time or window bounds, matched
flag, key hash, arrival number), and the spill runs of the rows moved to disk; it lays
its rows out for snapshots (the numpy columns as ``__ms_<name>`` columns), whole or
split by key group, and loads them back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from millstream.core.context import TaskContext
from millstream.errors import PlanError, SchemaError
from millstream.ops.stream_join.runs import _field_column, _Run, _RunWriter

#: dtype of each numpy column a buffer may keep: event time, matched flag, key hash,
#: window start and end, arrival number, match count
_DTYPES = {"t": np.int64, "m": np.bool_, "h": np.uint64, "ws": np.int64, "we": np.int64,
           "seq": np.int64, "n": np.int64}


def _concat(tables: list[pa.Table]) -> pa.Table:
    """Rows of one input as one table (None entries skipped; types promoted)."""
    tables = [t for t in tables if t is not None]
    if len(tables) == 1:
        return tables[0]
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise SchemaError(f"stream join: batches of one input disagree on column types: {exc}; "
                          f"cast the columns to one type before the join") from exc


class _Buffer:
    """Buffered rows of one join input: an Arrow table plus aligned numpy columns in
    memory, and the spill runs of rows moved to disk."""

    def __init__(self, fields: Sequence[str], time_field: str | None = None) -> None:
        self.fields = tuple(fields)
        self.time_field = time_field
        self.table: pa.Table | None = None
        self.arrays = {f: np.zeros(0, _DTYPES[f]) for f in self.fields}
        #: bytes of ``table`` and ``arrays``
        self.bytes = 0
        self._keeps = 0
        self.runs: list[_Run] = []

    def __getstate__(self) -> dict[str, Any]:
        if self.runs:
            raise PlanError("a stream join whose state spilled to disk cannot be pickled; "
                            "snapshot() it instead")
        return dict(self.__dict__)

    @property
    def n(self) -> int:
        """Rows in memory."""
        return 0 if self.table is None else self.table.num_rows

    def append(self, table: pa.Table, **arrays: np.ndarray) -> None:
        if table.num_rows == 0:
            return
        self.table = table if self.table is None else _concat([self.table, table])
        if self.table.column(0).num_chunks > 64:
            self.table = self.table.combine_chunks()
        added = table.nbytes
        for f in self.fields:
            a = np.asarray(arrays[f], _DTYPES[f])
            self.arrays[f] = np.concatenate([self.arrays[f], a])
            added += a.nbytes
        self.bytes += added

    def keep(self, mask: np.ndarray) -> None:
        """Keep only the rows (in memory) where ``mask`` is true."""
        if self.table is None or mask.all():
            return
        if not mask.any():
            self.clear()
            return
        n = len(mask)
        self.table = self.table.filter(pa.array(mask))
        for f in self.fields:
            self.arrays[f] = self.arrays[f][mask]
        # in proportion to the rows kept (measuring is O(chunks x columns)); measured
        # exactly every 32 calls, and when a spill decision depends on it
        self._keeps += 1
        if self._keeps % 32:
            self.bytes = self.bytes * self.table.num_rows // n
        else:
            self.measure()

    def measure(self) -> int:
        """Measure (and return) the bytes of the rows in memory exactly."""
        self.bytes = (0 if self.table is None else self.table.nbytes) + \
            sum(a.nbytes for a in self.arrays.values())
        return self.bytes

    def rows(self, idx: np.ndarray) -> pa.Table:
        """Rows ``idx`` in memory."""
        return self.table.take(pa.array(idx, pa.int64()))

    take = rows

    def clear(self) -> None:
        """Forget the rows in memory (runs stay)."""
        self.table = None
        self.arrays = {f: np.zeros(0, _DTYPES[f]) for f in self.fields}
        self.bytes = 0

    def drop_runs(self, keep: Callable[[_Run], bool] | None = None) -> None:
        """Delete the spill runs (those for which ``keep`` is false)."""
        stay = []
        for r in self.runs:
            if keep is not None and keep(r):
                stay.append(r)
            else:
                r.delete()
        self.runs = stay

    def reset(self) -> None:
        """Forget every row, in memory and on disk."""
        self.clear()
        self.drop_runs()

    @property
    def index_bytes(self) -> int:
        """Bytes the runs keep in memory."""
        return sum(r.index_bytes for r in self.runs)

    def spill(self, mask: np.ndarray, ctx: TaskContext, track_matched: bool) -> _Run | None:
        """Move the rows where ``mask`` is true to a new run (sorted by hash)."""
        if self.table is None or not mask.any():
            return None
        if mask.all():
            table, arrays = self.table, self.arrays
        else:
            table = self.table.filter(pa.array(mask))
            arrays = {f: a[mask] for f, a in self.arrays.items()}
        order = np.argsort(arrays["h"], kind="stable")
        writer = _RunWriter(ctx, self.fields, self.time_field, track_matched)
        writer.add(table.take(pa.array(order)), {f: a[order] for f, a in arrays.items()})
        run = writer.finish()
        if run is not None:
            self.runs.append(run)
        self.keep(~mask)
        return run

    def snapshot(self, mask: np.ndarray | None = None) -> pa.Table | None:
        """The rows in memory (all, or where ``mask``) with the numpy columns as ``__ms_<name>``."""
        if self.table is None:
            return None
        t, arrays = self.table, self.arrays
        if mask is not None:
            if not mask.any():
                return None
            t = t.filter(pa.array(mask))
            arrays = {f: a[mask] for f, a in arrays.items()}
        for f in self.fields:
            t = t.append_column(_field_column(f), pa.array(arrays[f]))
        return t.combine_chunks()

    def snapshot_all(self) -> pa.Table | None:
        """Every row, in memory and spilled, as ``snapshot()`` lays them out."""
        parts = [t for r in self.runs for t, _h in r.snapshot_parts(self.fields)]
        mem = self.snapshot()
        if mem is not None:
            parts.append(mem)
        if not parts:
            return None
        return _concat(parts).combine_chunks()

    def snapshot_groups(self, key_groups: int) -> dict[int, pa.Table]:
        """``snapshot_all()`` split by key group (hash mod ``key_groups``)."""
        return _join_groups(self.group_pieces(key_groups))

    def group_pieces(self, key_groups: int) -> Iterator[tuple[int, pa.Table]]:
        """Every row (spilled runs first, then memory) as ``snapshot()`` lays them out, in
        pieces of one key group each: a run part (or the rows in memory) at a time."""
        for r in self.runs:
            for t, h in r.snapshot_parts(self.fields):
                yield from _split_groups(t, h, key_groups)
        for g, mask in self.groups(key_groups).items():
            part = self.snapshot(mask)
            if part is not None:
                yield g, part

    def load(self, tables: list[pa.Table | None]) -> None:
        """Replace the contents with snapshot tables."""
        self.reset()
        tables = [t for t in tables if t is not None and t.num_rows]
        if tables:
            self.add_snapshot(_concat(tables))

    def add_snapshot(self, t: pa.Table) -> None:
        """Add the rows of a snapshot table to those held."""
        arrays = {f: np.asarray(t.column(_field_column(f)).combine_chunks(), _DTYPES[f])
                  for f in self.fields}
        self.append(t.drop_columns([_field_column(f) for f in self.fields]), **arrays)

    def groups(self, key_groups: int) -> dict[int, np.ndarray]:
        """Row masks per key group (by the ``h`` column) of the rows in memory."""
        if not self.n:
            return {}
        g = (self.arrays["h"] % np.uint64(key_groups)).astype(np.int64)
        return {int(x): g == x for x in np.unique(g)}


def _split_groups(table: pa.Table, h: np.ndarray, key_groups: int
                  ) -> Iterator[tuple[int, pa.Table]]:
    """``table``'s rows per key group of their hashes ``h``."""
    g = (h % np.uint64(key_groups)).astype(np.int64)
    order = np.argsort(g, kind="stable")
    gs = g[order]
    cuts = np.flatnonzero(np.diff(gs)) + 1
    starts = np.concatenate([[0], cuts])
    stops = np.concatenate([cuts, [len(gs)]])
    table = table.take(pa.array(order))
    for a, b in zip(starts, stops):
        yield int(gs[a]), table.slice(int(a), int(b - a))


def _join_groups(pieces: Iterable[tuple[int, pa.Table]]) -> dict[int, pa.Table]:
    """One table per key group of ``(group, rows)`` pieces."""
    tables: dict[int, list[pa.Table]] = {}
    for g, part in pieces:
        tables.setdefault(g, []).append(part)
    return {g: ps[0] if len(ps) == 1 else _concat(ps).combine_chunks()
            for g, ps in tables.items()}
