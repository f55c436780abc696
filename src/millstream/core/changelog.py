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
