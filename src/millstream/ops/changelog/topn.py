"""Top-N per group: the first ``n`` rows of each group of ``per`` columns in the order of
``by`` (``Dataset.top_n``; SQL's ``ROW_NUMBER() OVER (PARTITION BY per ORDER BY by) <= n``),
kept up to date as rows come.

After each input batch, every group the batch touched compares its top ``n`` before and
after (several changes within a batch give one change): with a rank column, position by
position: a row that takes another's rank is an update pair (-U the old row at that rank,
+U the new one), a rank that empties is a delete (-D) and a new rank an insert (+I);
without one, the rows that left the top are deletes (-D) and those that entered inserts
(+I). Ties keep arrival order (an earlier row ranks first); nulls sort first ascending
and last descending unless ``nulls_last`` says otherwise, NaN above every number (as the
engine's sorts).

State per group: on an append-only input only its top ``n`` rows (a row below them can
never come back); on a changelog input (``retracting``) every row of the group, sorted,
so a retracted top row is replaced by the next one (a retraction takes back the latest
held copy of its row, as the aggregates do). Spilled and checkpointed by key group.
In batch mode (``final=True``) the top ``n`` of every group are emitted at the end.
"""

from __future__ import annotations

import bisect
from collections import Counter
from decimal import Decimal
from typing import Any

import numpy as np
import pyarrow as pa

from millstream.core.arrow import table_to_batches
from millstream.core.changelog import (
    CHANGE,
    DELETE,
    INSERT,
    UPDATE_AFTER,
    UPDATE_BEFORE,
    is_retraction,
    kinds,
    without_kinds,
)
from millstream.core.sorting import order_indices
from millstream.errors import MillstreamError, PlanError, SchemaError
from millstream.ops.base import Batches
from millstream.ops.changelog.keyed import (
    KeyedChangeOperator,
    _hashable,
    build_batch,
    group_rows,
    merge_schema,
    row_tuples,
)
from millstream.ops.state.store import CHECK_EVERY

_EMPTY: tuple[pa.RecordBatch, ...] = ()
_NUMBERS = (int, float, Decimal)


class _Desc:
    """A value in descending order (for types that cannot be negated)."""

    __slots__ = ("v",)

    def __init__(self, v: Any) -> None:
        self.v = v

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Desc) and self.v == other.v

    def __lt__(self, other: _Desc) -> bool:
        return other.v < self.v

    def __hash__(self) -> int:
        return hash(self.v)

    def __reduce__(self) -> tuple:
        return (_Desc, (self.v,))


def _component(v: Any, desc: bool, nulls_last: bool) -> tuple:
    """One sort column's part of a row's sort key, in output order."""
    if v is None:
        return (3,) if nulls_last else (-1,)
    if isinstance(v, float) and v != v:  # NaN: above every number
        return (0,) if desc else (2,)
    if not desc:
        return (1, v)
    if isinstance(v, _NUMBERS):
        return (1, -v)
    return (1, _Desc(v))


class TopN(KeyedChangeOperator):
    """The first ``n`` rows per group, updated as rows come (see the module docstring)."""

    kind = "TopN"
    accepts_updates = True
    emits_updates = True

    def __init__(self, n: int, by: list[str], descending: list[bool], per: list[str],
                 rank_column: str | None = None, nulls_last: bool | None = None,
                 retracting: bool = False, final: bool = False, name: str | None = None,
                 state_memory_limit: int | None = None) -> None:
        if n < 1:
            raise PlanError(f"top_n: n must be >= 1, got {n}")
        if not by or len(by) != len(descending):
            raise PlanError(f"top_n: {len(by)} order column(s) but {len(descending)} "
                            f"descending flag(s)")
        order = ", ".join(c + (" desc" if d else "") for c, d in zip(by, descending))
        rank = f", rank={rank_column!r}" if rank_column else ""
        super().__init__(per, name or f"TopN({n} by {order} per {list(per)}{rank})",
                         state_memory_limit)
        self.n = int(n)
        self.by = list(by)
        self.descending = [bool(d) for d in descending]
        self.nulls_last = nulls_last
        self.rank_column = rank_column
        self.retracting = retracting
        self.final = final
        self._state = self.store.value_state("top")
        self._schema: pa.Schema | None = None
        self._out: pa.Schema | None = None
        self._order: list[tuple[int, bool, bool]] = []

    def _extra_state(self) -> dict[str, Any]:
        return {"schema": self._schema}

    def _restore_extra(self, states: list[dict[str, Any]]) -> None:
        schemas = [st.get("schema") for st in states if st.get("schema") is not None]
        if schemas:
            self._set_schema(schemas[0])

    def _set_schema(self, schema: pa.Schema) -> None:
        missing = [c for c in self.by if c not in schema.names]
        if missing:
            raise SchemaError(f"{self.name}: no order column(s) {missing}; columns are "
                              f"{schema.names}")
        self._schema = schema
        self._order = [(schema.get_field_index(c), d,
                        d if self.nulls_last is None else bool(self.nulls_last))
                       for c, d in zip(self.by, self.descending)]
        fields = list(schema)
        if self.rank_column:
            fields.append(pa.field(self.rank_column, pa.int64()))
        self._out = pa.schema(fields)

    def _key(self, row: tuple) -> tuple:
        """The sort key of a row (in output order; see :func:`_component`)."""
        order = self._order
        if len(order) == 1:
            i, d, nl = order[0]
            return (_component(row[i], d, nl),)
        return tuple([_component(row[i], d, nl) for i, d, nl in order])

    # ----------------------------------------------------------------- rows

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        if batch.num_rows == 0:
            return _EMPTY
        schema = merge_schema(self._schema, batch)
        if self._schema is None or not schema.equals(self._schema):
            self._set_schema(schema)
        k = kinds(batch)
        retract = is_retraction(k)
        if not self.retracting and CHANGE in batch.schema.names and retract.any():
            raise MillstreamError(f"{self.name}: planned for an append-only input, but "
                                  f"retractions arrived (please report this)")
        data = without_kinds(batch)
        groups = group_rows(data, self.keys)
        if self.retracting:
            chosen = np.arange(data.num_rows, dtype=np.int64)
        else:  # only a batch's own top n of a group can enter the group's top n
            chosen = self._batch_top(data, groups)
        chosen_rows = chosen.tolist()
        tuples = dict(zip(chosen_rows, row_tuples(data.take(pa.array(chosen)))))
        # the rows to take in, per group, in arrival order (others cannot matter)
        wanted = [[] for _ in range(len(groups))]
        gids = groups.gids.tolist()
        retract_list = retract.tolist()
        for r in chosen_rows:
            wanted[gids[r]].append(r)
        out: list[tuple] = []
        out_kinds: list[int] = []
        store, handle, n = self.store, self._state, self.n
        set_key, hashes, sort_key = store.set_current_key, groups.hashes, self._key
        append_only, final = not self.retracting, self.final
        check = CHECK_EVERY
        for i, key in enumerate(groups.keys):
            set_key(key, hashes[i])
            st = handle.value()
            if st is None:
                st = [0, []]
                handle.update(st)
            entries = st[1]
            old = [e[2] for e in entries[:n]]
            for r in wanted[i]:
                row = tuples[r]
                if retract_list[r]:
                    self._remove(entries, row)
                    continue
                entry = (sort_key(row), st[0], row)
                st[0] += 1
                if append_only and len(entries) >= n:
                    if entry >= entries[n - 1]:
                        continue
                    bisect.insort(entries, entry)
                    entries.pop()
                else:
                    bisect.insort(entries, entry)
            if not entries:
                handle.clear()
            if not final:
                new = [e[2] for e in entries[:n]]
                if new != old:
                    self._diff(old, new, out, out_kinds)
            check -= 1
            if not check:
                check = CHECK_EVERY
                store.maintain()
        store.maintain()
        if not out:
            return _EMPTY
        return (build_batch(self._out, out, out_kinds),)

    def _batch_top(self, data: pa.RecordBatch, groups: Any) -> np.ndarray:
        """The rows of each group's own top ``n`` in this batch (stable: ties by arrival)."""
        if data.num_rows <= self.n:
            return np.arange(data.num_rows, dtype=np.int64)
        table = pa.table([pa.array(groups.gids), *(data.column(c) for c in self.by)],
                         names=["__g", *self.by])
        order = np.asarray(order_indices(table, ["__g", *self.by], [False, *self.descending],
                                         self.nulls_last), dtype=np.int64)
        g = groups.gids[order]
        starts = np.searchsorted(g, g, side="left")
        keep = order[(np.arange(len(order)) - starts) < self.n]
        return np.sort(keep)

    @staticmethod
    def _find(entries: list[tuple], key: tuple, row: tuple) -> int:
        """The latest held copy of ``row`` (sort key ``key``), or -1."""
        i = bisect.bisect_left(entries, (key,))
        found = -1
        while i < len(entries) and entries[i][0] == key:
            if entries[i][2] == row:
                found = i
            i += 1
        return found

    def _remove(self, entries: list[tuple], row: tuple) -> None:
        """Take the latest copy of ``row`` out of the group (nothing when it has none)."""
        i = self._find(entries, self._key(row), row)
        if i >= 0:
            del entries[i]

    def _diff(self, old: list[tuple], new: list[tuple], out: list[tuple],
              out_kinds: list[int]) -> None:
        """The changes that turn the top ``old`` into ``new``."""
        if self.rank_column:
            for r in range(max(len(old), len(new))):
                o = old[r] if r < len(old) else None
                w = new[r] if r < len(new) else None
                if o is not None and w is not None:
                    if o != w:
                        out += ((*o, r + 1), (*w, r + 1))
                        out_kinds += (UPDATE_BEFORE, UPDATE_AFTER)
                elif o is not None:
                    out.append((*o, r + 1))
                    out_kinds.append(DELETE)
                elif w is not None:
                    out.append((*w, r + 1))
                    out_kinds.append(INSERT)
            return
        if old == new:
            return
        gone = Counter(_hashable(o) for o in old)
        gone.subtract(_hashable(w) for w in new)
        for o in old:
            h = _hashable(o)
            if gone[h] > 0:
                gone[h] -= 1
                out.append(o)
                out_kinds.append(DELETE)
        came = Counter(_hashable(w) for w in new)
        came.subtract(_hashable(o) for o in old)
        for w in new:
            h = _hashable(w)
            if came[h] > 0:
                came[h] -= 1
                out.append(w)
                out_kinds.append(INSERT)

    def finish(self) -> Batches:
        """Batch mode: the top ``n`` of every group."""
        if not self.final or self._out is None:
            return _EMPTY
        rows: list[tuple] = []
        for key in self.store.keys("top"):
            self.store.set_current_key(key)
            st = self._state.value()
            if st is None:
                continue
            for r, e in enumerate(st[1][:self.n]):
                rows.append((*e[2], r + 1) if self.rank_column else e[2])
        if not rows:
            return _EMPTY
        table = pa.Table.from_batches([build_batch(self._out, rows)])
        return table_to_batches(table, self.ctx.batch_size if self.ctx else 65536)
