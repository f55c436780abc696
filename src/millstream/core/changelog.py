"""Changelog rows: streams that carry changes, not only appends (Flink's RowKind).

A batch of a changelog stream has a hidden ``int8`` column :data:`CHANGE` whose value says
what each row is: :data:`INSERT` (+I), :data:`UPDATE_BEFORE` (-U, the old version of a
row being replaced), :data:`UPDATE_AFTER` (+U, its new version) or :data:`DELETE` (-D).
A batch without the column is all inserts, so append-only streams (the cheap default)
carry nothing extra. Operators that emit updates (non-windowed aggregates, regular
joins, deduplication, Top-N) add the column; operators that take updates read it.

At the user's edge (``ms.sink(fn)``, collecting sinks, file sinks written with
``changelog=True``) the kind is the visible column :data:`VISIBLE` with Flink's short
names ("+I", "-U", "+U", "-D").

Sinks say what they take with a ``changelog_mode`` attribute: :data:`APPEND` (the
default when absent: inserts only), :data:`RETRACT` (every change, the kinds shown as
:data:`VISIBLE`) or :data:`UPSERT` (rows keyed by the sink's ``upsert_keys``: the last
change of a key wins, a retraction deletes it; :func:`upserts` computes that view of a
batch). :func:`materialize` applies a changelog to get the rows it leaves.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

#: The hidden column of a changelog batch: the kind of every row (int8).
CHANGE = "__ms_change"
#: The column a user sees instead (string: "+I", "-U", "+U", "-D").
VISIBLE = "change"

INSERT, UPDATE_BEFORE, UPDATE_AFTER, DELETE = 0, 1, 2, 3
#: Flink's short names of the kinds, by kind.
NAMES = ("+I", "-U", "+U", "-D")

#: What a sink takes (its ``changelog_mode``): inserts only, every change, or upserts by key.
APPEND, RETRACT, UPSERT = "append", "retract", "upsert"
MODES = (APPEND, RETRACT, UPSERT)


def is_changelog(schema: pa.Schema) -> bool:
    """Whether batches of ``schema`` carry change kinds."""
    return CHANGE in schema.names


def kinds(batch: pa.RecordBatch | pa.Table) -> np.ndarray:
    """The kind of every row (all :data:`INSERT` for an append-only batch)."""
    if CHANGE not in batch.schema.names:
        return np.zeros(batch.num_rows, dtype=np.int8)
    col = batch.column(CHANGE)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return np.asarray(col.fill_null(INSERT), dtype=np.int8)


def with_kinds(batch: pa.RecordBatch | pa.Table, values: np.ndarray | int
               ) -> pa.RecordBatch | pa.Table:
    """``batch`` with its kinds set (an int sets every row), as the last column."""
    n = batch.num_rows
    arr = pa.array(np.full(n, values, dtype=np.int8) if isinstance(values, int)
                   else np.asarray(values, dtype=np.int8), pa.int8())
    if CHANGE in batch.schema.names:
        i = batch.schema.get_field_index(CHANGE)
        return batch.set_column(i, CHANGE, arr)
    return batch.append_column(CHANGE, arr)


def is_retraction(values: np.ndarray) -> np.ndarray:
    """Rows that take something back (-U, -D)."""
    return (values == UPDATE_BEFORE) | (values == DELETE)


def without_kinds(batch: pa.RecordBatch | pa.Table) -> pa.RecordBatch | pa.Table:
    """The data columns only."""
    if CHANGE not in batch.schema.names:
        return batch
    return batch.drop_columns([CHANGE]) if isinstance(batch, pa.Table) else \
        batch.drop_columns([CHANGE])


def to_visible(batch: pa.RecordBatch | pa.Table) -> pa.RecordBatch | pa.Table:
    """The user's view: the hidden kind column as :data:`VISIBLE` strings (+I, -U, +U, -D);
    an append-only batch is returned as it is."""
    if CHANGE not in batch.schema.names:
        return batch
    names = pa.array(NAMES, pa.string())
    visible = pc.take(names, pa.array(kinds(batch).astype(np.int32)))
    data = without_kinds(batch)
    return data.append_column(VISIBLE, visible)


def from_visible(batch: pa.RecordBatch | pa.Table) -> pa.RecordBatch | pa.Table:
    """A user's changelog (a :data:`VISIBLE` column of +I/-U/+U/-D) as engine rows."""
    if VISIBLE not in batch.schema.names:
        return batch
    col = batch.column(VISIBLE)
    index = pc.index_in(col, value_set=pa.array(NAMES, pa.string()))
    if index.null_count:
        bad = pc.filter(col, pc.is_null(index)).to_pylist()[:3]
        from millstream.errors import SchemaError

        raise SchemaError(f"column {VISIBLE!r}: change kinds are {', '.join(NAMES)}, got "
                          f"{bad}")
    i = batch.schema.get_field_index(VISIBLE)
    data = batch.remove_column(i)
    return with_kinds(data, np.asarray(index, dtype=np.int8))


def signs(values: np.ndarray) -> np.ndarray:
    """+1 for rows that add (+I, +U), -1 for rows that take back (-U, -D), as int8."""
    return np.where(is_retraction(values), -1, 1).astype(np.int8)


def sink_mode(sink: object) -> str:
    """What ``sink`` takes: its ``changelog_mode`` (append when it declares nothing)."""
    mode = getattr(sink, "changelog_mode", APPEND)
    return mode if mode in MODES else APPEND


def _kinds_of(table: pa.Table) -> np.ndarray:
    """Kinds of a table with hidden or visible kinds (all inserts with neither)."""
    if CHANGE in table.schema.names:
        return kinds(table)
    if VISIBLE in table.schema.names:
        return kinds(from_visible(table))
    return np.zeros(table.num_rows, dtype=np.int8)


def _data(table: pa.Table) -> pa.Table:
    data = without_kinds(table)
    if VISIBLE in data.schema.names:
        data = data.drop_columns([VISIBLE])
    return data


#: stands for NaN in row keys (a float NaN equals nothing, not even itself)
_NAN_KEY = ("NaN",)


def _hashable(v: object) -> object:
    if isinstance(v, float) and v != v:
        return _NAN_KEY
    if isinstance(v, list):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, dict):
        return tuple((k, _hashable(x)) for k, x in v.items())
    return v


def materialize(table: pa.Table | pa.RecordBatch, keys: list[str] | None = None) -> pa.Table:
    """The rows a changelog leaves (its final state), without the kinds.

    ``table`` holds changes in order, with hidden (:data:`CHANGE`) or visible
    (:data:`VISIBLE`) kinds. Without ``keys`` a change adds (+I, +U) or removes (-U, -D)
    one copy of its row (a multiset; rows in the order they were added); with ``keys`` the
    last change of each key wins (an upsert view: a retraction deletes the key's row;
    rows in the order of their keys' last changes).
    """
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    k = _kinds_of(table)
    data = _data(table)
    rows = data.to_pylist()
    if keys is not None:
        latest: dict[object, int | None] = {}
        for i, (row, kind) in enumerate(zip(rows, k)):
            key = tuple(_hashable(row[c]) for c in keys)
            latest.pop(key, None)  # (insertion order: where the key's row now is)
            latest[key] = None if kind in (UPDATE_BEFORE, DELETE) else i
        keep = [i for i in latest.values() if i is not None]
    else:
        held: dict[object, list[int]] = {}
        for i, (row, kind) in enumerate(zip(rows, k)):
            key = tuple(_hashable(v) for v in row.values())
            if kind in (UPDATE_BEFORE, DELETE):
                copies = held.get(key)
                if copies:
                    copies.pop()
            else:
                held.setdefault(key, []).append(i)
        keep = sorted(i for copies in held.values() for i in copies)
    return data.take(pa.array(keep, pa.int64()))


def upserts(batch: pa.RecordBatch | pa.Table, keys: list[str]) -> pa.Table:
    """An upsert sink's view of a batch of changes: the last change of each key, as an
    :data:`UPDATE_AFTER` (write the row) or a :data:`DELETE` (remove the key), in the
    order of those last changes; the hidden kinds say which."""
    table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
    k = kinds(table)
    n = table.num_rows
    if n == 0:
        return with_kinds(without_kinds(table), 0)
    idx = pa.table({**{f"__k{i}": table.column(c) for i, c in enumerate(keys)},
                    "__row": pa.array(np.arange(n, dtype=np.int64))})
    last = idx.group_by([f"__k{i}" for i in range(len(keys))], use_threads=False) \
        .aggregate([("__row", "max")]).column("__row_max")
    rows = np.sort(np.asarray(last, dtype=np.int64))
    out = without_kinds(table).take(pa.array(rows))
    return with_kinds(out, np.where(is_retraction(k[rows]), DELETE, UPDATE_AFTER))
