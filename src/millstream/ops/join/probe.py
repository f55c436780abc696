"""One join's semantics over a build side indexed once: probe batches stream through it.

:class:`JoinLayout` says which columns a join of two schemas outputs (left columns, then
right columns; a key of the same name on both sides once, coalesced for right and outer
joins; other clashes get the suffix). :class:`JoinProbe` holds the build side and its
:class:`~millstream.ops.join.index.JoinIndex`, joins each probe batch (candidate pairs of
equal keys, then the residual condition on those pairs), and at the end emits the build
rows no pair matched, for the joins that keep them. Either side can be the build side.

A residual condition names columns as an inner join of the two sides outputs them: left
columns by their names, right columns by theirs, a right column whose name the left side
already has with the suffix; a key of the same name on both sides (``on=``) is one column.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from millstream.errors import PlanError, SchemaError
from millstream.ops.join.index import JoinIndex, pair_chunks
from millstream.ops.join.keys import common_key_type, key_column, unified_type

#: Join types and their aliases.
JOIN_TYPES = {"inner": "inner", "left": "left", "right": "right", "outer": "outer",
              "full": "outer", "semi": "semi", "anti": "anti"}
#: Bytes of candidate pairs (indices and gathered columns) a probe step materializes at once.
PAIR_BYTES = 64 << 20


def check_how(how: str) -> str:
    """The canonical name of join type ``how`` (``full`` is ``outer``)."""
    if how not in JOIN_TYPES:
        raise PlanError(f"join how={how!r} is not one of {sorted(JOIN_TYPES)}")
    return JOIN_TYPES[how]


def _decoded(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


class JoinLayout:
    """The output columns of a join of ``left`` and ``right`` and where each comes from.

    ``columns``: (field, side, source) with side "l" or "r" (source: a column name) or "k"
    (a coalesced same-named key; source: its position in the keys). ``pair_sources`` maps
    the names a residual condition may use (the inner join's columns) to (side, column).
    """

    def __init__(self, left: pa.Schema, right: pa.Schema, left_on: Sequence[str],
                 right_on: Sequence[str], how: str, suffix: str) -> None:
        for side, schema, keys in (("left", left, left_on), ("right", right, right_on)):
            missing = [k for k in keys if schema.get_field_index(k) < 0]
            if missing:
                raise SchemaError(f"join: {side} side has no key column(s) {missing}; "
                                  f"columns are {schema.names}")
        lt = [left.field(k).type for k in left_on]
        rt = [right.field(k).type for k in right_on]
        #: the types keys are compared as (both sides cast to them)
        self.key_types = [common_key_type(a, b, lk, rk)
                          for a, b, lk, rk in zip(lt, rt, left_on, right_on)]
        shared = {a: i for i, (a, b) in enumerate(zip(left_on, right_on)) if a == b}
        coalesce = how in ("right", "outer")
        self.columns: list[tuple[pa.Field, str, Any]] = []
        pair: list[tuple[str, str, str]] = []
        for f in left:
            pair.append((f.name, "l", f.name))
            if f.name in shared and coalesce:
                i = shared[f.name]
                t = self._coalesced_type(lt[i], rt[i], self.key_types[i])
                self.columns.append((pa.field(f.name, t, metadata=f.metadata), "k", i))
            else:
                self.columns.append((f.with_nullable(True), "l", f.name))
        left_names = set(left.names)
        for f in right:
            if f.name in shared:
                continue
            name = f.name if f.name not in left_names else f.name + suffix
            pair.append((name, "r", f.name))
            if how not in ("semi", "anti"):
                self.columns.append((f.with_name(name).with_nullable(True), "r", f.name))
        self.pair_sources = {name: (side, src) for name, side, src in pair}
        self.schema = pa.schema([f for f, _, _ in self.columns])
        self.pair_schema = pa.schema(
            [pa.field(name, (left if side == "l" else right).field(src).type)
             for name, side, src in pair])

    @staticmethod
    def _coalesced_type(a: pa.DataType, b: pa.DataType, compared: pa.DataType) -> pa.DataType:
        """A coalesced key's type: the two sides' types unified (the compared type when
        they only meet as it, e.g. string and string_view)."""
        t = unified_type(_decoded(a), _decoded(b))
        return compared if t is None else t


def _view_base(t: pa.DataType) -> pa.DataType | None:
    """The type a view column is gathered as (Arrow has no take kernel for views)."""
    if pa.types.is_string_view(t):
        return pa.large_string()
    if pa.types.is_binary_view(t):
        return pa.large_binary()
    return None


def _take(col: pa.Array | pa.ChunkedArray, idx: np.ndarray | None, n: int,
          t: pa.DataType | None = None) -> pa.Array:
    """Rows ``idx`` of a column (all null when ``idx`` is None), as one array of type ``t``
    (None: the column's type, a view column's as its gatherable type)."""
    if idx is None:
        return pa.nulls(n, t or col.type)
    base = _view_base(col.type)
    if base is not None:
        col = col.cast(base)
    out = col.take(pa.array(idx, type=pa.int64()))
    if isinstance(out, pa.ChunkedArray):
        out = out.combine_chunks() if out.num_chunks != 1 else out.chunk(0)
    if t is not None and not out.type.equals(t):
        out = out.cast(t)
    return out


def _columns(table: pa.Table) -> dict[str, pa.Array | pa.ChunkedArray]:
    """The build side's columns, view columns as their gatherable type (cast once)."""
    out: dict[str, pa.Array | pa.ChunkedArray] = {}
    for name, col in zip(table.column_names, table.columns):
        col = col.chunk(0) if col.num_chunks == 1 else col
        base = _view_base(col.type)
        out[name] = col if base is None else col.cast(base)
    return out


class JoinProbe:
    """Joins probe batches against a build side indexed once (see the module docstring).

    ``build_left``: the build side is the left input; then inner and right joins (a
    broadcast left side: the unmatched left rows of a left input that every task holds
    could not be decided by one task), and semi and anti joins when one task sees all the
    right rows of its left rows (a shuffle join whose left side is the smaller): right
    batches only mark the left rows they match, and :meth:`finish` emits the left rows
    matched (semi) or not (anti).
    """

    def __init__(self, left_on: Sequence[str], right_on: Sequence[str], how: str,
                 suffix: str = "_right", condition: Any = None, build_left: bool = False,
                 on_build: Callable[[], None] | None = None) -> None:
        self.how = check_how(how)
        if len(left_on) != len(right_on):
            raise PlanError("join needs as many left keys as right keys")
        if build_left and self.how not in ("inner", "right", "semi", "anti"):
            raise PlanError(f"a left build side serves inner, right, semi and anti joins, "
                            f"not {how}")
        self.left_on, self.right_on = list(left_on), list(right_on)
        self.suffix, self.condition, self.build_left = suffix, condition, build_left
        self.probe_on = self.right_on if build_left else self.left_on
        self.build_on = self.left_on if build_left else self.right_on
        preserve_left = self.how in ("left", "outer")
        preserve_right = self.how in ("right", "outer")
        self.keep_probe = preserve_right if build_left else preserve_left
        self.keep_build = preserve_left if build_left else preserve_right
        #: semi/anti join built on its left side: the output is decided at finish()
        self.semi_build = build_left and self.how in ("semi", "anti")
        self.on_build = on_build
        self.table: pa.Table | None = None
        self.cols: dict[str, Any] = {}
        self.matched: np.ndarray | None = None
        self._indexes: dict[tuple, JoinIndex] = {}
        self._layout: tuple[pa.Schema, JoinLayout] | None = None

    # ------------------------------------------------------------------ build side
    def build(self, table: pa.Table) -> None:
        """The whole build side (a table without columns when it had no schema)."""
        if table.num_columns:
            try:
                table = table.combine_chunks()
            except (pa.ArrowInvalid, pa.ArrowCapacityError):  # pragma: no cover - > 2 GB strings
                pass
        self.table = table
        self.cols = _columns(table)
        if self.keep_build or self.semi_build:
            self.matched = np.zeros(table.num_rows, dtype=bool)

    def _index(self, types: list[pa.DataType]) -> JoinIndex:
        """The index of the build side with keys compared as ``types`` (built once for
        every probe batch whose keys meet the build keys as these types)."""
        key = tuple(types)
        index = self._indexes.get(key)
        if index is None:
            cols = [key_column(self.cols[k], t) for k, t in zip(self.build_on, types)]
            index = self._indexes[key] = JoinIndex(cols, self.table.num_rows)
            if self.on_build is not None:
                self.on_build()
        return index

    # ------------------------------------------------------------------ layout
    def _key_schema(self, keys: Sequence[str], other: Sequence[str],
                    other_schema: pa.Schema) -> pa.Schema:
        return pa.schema([pa.field(k, other_schema.field(o).type) for k, o in zip(keys, other)])

    def _build_schema(self, probe_schema: pa.Schema) -> pa.Schema:
        if self.table is not None and self.table.num_columns:
            return self.table.schema
        # the build side had no rows and no schema: its keys, typed as the probe's
        return self._key_schema(self.build_on, self.probe_on, probe_schema)

    def layout(self, probe_schema: pa.Schema | None) -> JoinLayout:
        """The layout of this join for probe batches of ``probe_schema`` (None: no probe
        batch had a schema; the build side's keys stand in)."""
        if probe_schema is None:
            probe_schema = self._key_schema(self.probe_on, self.build_on, self._build_schema(
                pa.schema([])))
        if self._layout is not None and self._layout[0].equals(probe_schema):
            return self._layout[1]
        build_schema = self._build_schema(probe_schema)
        left, right = ((build_schema, probe_schema) if self.build_left
                       else (probe_schema, build_schema))
        lay = JoinLayout(left, right, self.left_on, self.right_on, self.how, self.suffix)
        self._layout = (probe_schema, lay)
        return lay

    def empty(self, probe_schema: pa.Schema | None) -> pa.RecordBatch:
        """A batch without rows with this join's output columns."""
        schema = self.layout(probe_schema).schema
        return pa.RecordBatch.from_arrays([pa.array([], f.type) for f in schema], schema=schema)

    # ------------------------------------------------------------------ probing
    def _ensure_build(self, probe_schema: pa.Schema) -> None:
        if self.table is None or not self.table.num_columns:
            self.build(self._build_schema(probe_schema).empty_table())

    def _pair_limit(self, batch: pa.RecordBatch) -> int:
        row_bytes = 16 + batch.nbytes // max(1, batch.num_rows)
        if self.table is not None and self.table.num_rows:
            row_bytes += self.table.nbytes // self.table.num_rows
        return max(4096, PAIR_BYTES // row_bytes)

    def probe(self, batch: pa.RecordBatch) -> Iterator[pa.Table]:
        """The joined rows of one probe batch (for inner, semi, anti and the preserved
        probe side: final; the build side's unmatched rows come from :meth:`finish`)."""
        n = batch.num_rows
        if n == 0:
            return
        self._ensure_build(batch.schema)
        lay = self.layout(batch.schema)
        index = self._index(lay.key_types)
        pcols = [key_column(batch.column(k), t) for k, t in zip(self.probe_on, lay.key_types)]
        count, first, check = index.lookup(pcols, n)
        if self.semi_build:
            self._mark(batch, lay, index, count, first, check)
            return
        semi = self.how in ("semi", "anti")
        if semi and check is None and self.condition is None:
            hit = count > 0
        else:
            hit = np.zeros(n, dtype=bool) if (semi or self.keep_probe) else None
            for pi, bi in self._pairs(batch, lay, index, count, first, check):
                if hit is not None:
                    hit[pi] = True
                if self.matched is not None:
                    self.matched[bi] = True
                if not semi and len(pi):
                    yield self._assemble(lay, batch, pi, bi, len(pi))
        if semi:
            rows = np.flatnonzero(hit if self.how == "semi" else ~hit)
            if len(rows) == n:
                yield pa.Table.from_batches([batch])
            elif len(rows):
                yield pa.Table.from_arrays([_take(c, rows, len(rows), c.type) for c in batch.columns],
                                           schema=batch.schema)
        elif self.keep_probe:
            rows = np.flatnonzero(~hit)
            if len(rows):
                yield self._assemble(lay, batch, rows, None, len(rows))

    def _mark(self, batch: pa.RecordBatch, lay: JoinLayout, index: JoinIndex,
              count: np.ndarray, first: np.ndarray, check: Any) -> None:
        """Marks the (left) build rows that rows of a (right) probe batch match."""
        assert self.matched is not None
        if check is None and self.condition is None:
            # every candidate matches: mark the rows of each matched key once, however
            # many probe rows have that key (a key's rows are one run of ``order``)
            rows = np.flatnonzero(count)
            starts, at = np.unique(first[rows], return_index=True)
            sizes = count[rows[at]]
            total = int(sizes.sum())
            if total:
                pos = np.arange(total, dtype=np.int64) + np.repeat(
                    starts - (np.cumsum(sizes) - sizes), sizes)
                self.matched[index.order[pos]] = True
            return
        for _pi, bi in self._pairs(batch, lay, index, count, first, check):
            self.matched[bi] = True

    def _pairs(self, batch: pa.RecordBatch, lay: JoinLayout, index: JoinIndex,
               count: np.ndarray, first: np.ndarray, check: Any
               ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The (probe row, build row) pairs of equal keys that pass the key ``check`` and
        the residual condition, in chunks of a bounded number of pairs."""
        for pi, bi in pair_chunks(count, first, index.order, self._pair_limit(batch)):
            if check is not None:
                keep = check(pi, bi)
                pi, bi = pi[keep], bi[keep]
            if self.condition is not None and len(pi):
                ok = self._condition(lay, batch, pi, bi)
                pi, bi = pi[ok], bi[ok]
            yield pi, bi

    def finish(self, probe_schema: pa.Schema | None, batch_rows: int = 65536
               ) -> Iterator[pa.Table]:
        """The build rows no probe row matched, null-extended (right and outer joins); for
        a semi or anti join built on its left side, the left rows matched or not."""
        if not (self.keep_build or self.semi_build) or self.table is None:
            return
        if not self.table.num_columns:
            return
        if self.semi_build:
            assert self.matched is not None
            rows = np.flatnonzero(self.matched if self.how == "semi" else ~self.matched)
        else:
            rows = (np.flatnonzero(~self.matched) if self.matched is not None
                    else np.arange(self.table.num_rows))
        lay = self.layout(probe_schema)
        for start in range(0, len(rows), batch_rows):
            part = rows[start:start + batch_rows]
            yield self._assemble(lay, None, None, part, len(part))

    # ------------------------------------------------------------------ output
    def _sides(self, probe: pa.RecordBatch | None, pi: np.ndarray | None,
               bi: np.ndarray | None) -> tuple[Any, Any, Any, Any]:
        """(left columns, left rows, right columns, right rows)."""
        pcols = {} if probe is None else dict(zip(probe.schema.names, probe.columns))
        if self.build_left:
            return self.cols, bi, pcols, pi
        return pcols, pi, self.cols, bi

    def _condition(self, lay: JoinLayout, probe: pa.RecordBatch, pi: np.ndarray,
                   bi: np.ndarray) -> np.ndarray:
        """Which pairs satisfy the residual condition (null counts as false)."""
        lcols, li, rcols, ri = self._sides(probe, pi, bi)
        names = sorted(self.condition.columns())
        arrays = []
        for name in names:
            if name not in lay.pair_sources:
                raise SchemaError(f"join condition {self.condition!r}: no column {name!r}; "
                                  f"columns are {list(lay.pair_sources)}")
            side, src = lay.pair_sources[name]
            arrays.append(_take(lcols[src], li, len(pi)) if side == "l"
                          else _take(rcols[src], ri, len(pi)))
        rb = pa.RecordBatch.from_arrays(arrays, names=names) if names else \
            pa.RecordBatch.from_pydict({"__rows": np.zeros(len(pi), np.int8)})
        mask = self.condition.evaluate(rb)
        if not pa.types.is_boolean(mask.type):
            raise SchemaError(f"join condition {self.condition!r} must be boolean, "
                              f"got {mask.type}")
        return np.asarray(mask.fill_null(False), dtype=bool)

    def _assemble(self, lay: JoinLayout, probe: pa.RecordBatch | None, pi: np.ndarray | None,
                  bi: np.ndarray | None, n: int) -> pa.Table:
        lcols, li, rcols, ri = self._sides(probe, pi, bi)
        arrays = []
        for f, side, src in lay.columns:
            if side == "l":
                arrays.append(_take(lcols[src], li, n, f.type) if li is not None
                              else pa.nulls(n, f.type))
            elif side == "r":
                arrays.append(_take(rcols[src], ri, n, f.type) if ri is not None
                              else pa.nulls(n, f.type))
            elif li is not None:  # a coalesced key: the left one where there is a left row
                arrays.append(_take(lcols[self.left_on[src]], li, n, f.type))
            else:
                arrays.append(_take(rcols[self.right_on[src]], ri, n, f.type))
        return pa.Table.from_arrays(arrays, schema=lay.schema)
