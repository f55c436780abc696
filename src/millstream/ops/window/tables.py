"""The window operators' state tables: hidden column names, Arrow table helpers, and the
interface of the state holders an operator delegates to (panes, sessions, global panes).

State is kept as Arrow tables of partial aggregation states (the ``_AggCore`` algebra of
``ops.aggregate``), never a Python object per event.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from millstream.core.arrow import normalize_key
from millstream.core.hashing import partition_ids

_EMPTY: tuple[pa.RecordBatch, ...] = ()

# Internal column names of the state tables.
_WS = "__millstream_ws"
_WE = "__millstream_we"
_ROW = "__millstream_row"
#: Schema metadata key marking a batch of pre-aggregated window states (its value: the
#: time zone of the event-time column, or empty)
_COMBINED = b"millstream.window_states"
_RESERVED = ("window_start", "window_end", "is_update", "is_retraction")


def _col_numpy(table: pa.Table, name: str) -> np.ndarray:
    return np.asarray(table.column(name).combine_chunks() if table.num_rows else [],
                      dtype=np.int64)


def _concat(tables: list[pa.Table]) -> pa.Table:
    if len(tables) == 1:
        return tables[0]
    return pa.concat_tables(tables, promote_options="permissive")


def _split_by_value(table: pa.Table, values: np.ndarray, copy: bool = False
                    ) -> Iterable[tuple[int, pa.Table]]:
    """(value, rows) groups of a table by an int64 column, in ascending value order.

    The groups are slices of one reordered table, which they keep alive together; with
    ``copy`` each is a table of its own (for groups kept apart for long, e.g. restored
    state that spills piece by piece)."""
    if table.num_rows == 0:
        return
    order = np.argsort(values, kind="stable")
    sv = values[order]
    bounds = np.flatnonzero(np.diff(sv)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(sv)]])
    if copy:
        for s, e in zip(starts, ends):
            yield int(sv[s]), table.take(pa.array(order[s:e]))
        return
    ordered = table.take(pa.array(order)) if len(starts) > 1 else table
    for s, e in zip(starts, ends):
        yield int(sv[s]), ordered.slice(int(s), int(e - s)) if len(starts) > 1 else ordered


def _with_flags(table: pa.Table, names: tuple[str, str], fired: Any, touched: int) -> pa.Table:
    """Set the two hidden flag columns (int8) of a state table."""
    n = table.num_rows
    for name, v in zip(names, (fired, touched)):
        arr = pa.array(np.broadcast_to(np.asarray(v, dtype=np.int8), (n,)).copy(), pa.int8())
        i = table.schema.get_field_index(name)
        table = table.set_column(i, name, arr) if i >= 0 else table.append_column(name, arr)
    return table


def _set_cols(table: pa.Table, cols: dict[str, np.ndarray]) -> pa.Table:
    """Replace (or add) int columns of a table with numpy arrays (int8 stays int8)."""
    for name, values in cols.items():
        i = table.schema.get_field_index(name)
        typ = table.schema.field(name).type if i >= 0 else pa.from_numpy_dtype(values.dtype)
        arr = pa.array(values, typ)
        table = table.set_column(i, name, arr) if i >= 0 else table.append_column(name, arr)
    return table


def _bucket_ids(table: pa.Table | pa.RecordBatch, keys: list[str], num_buckets: int
                ) -> np.ndarray:
    """The hash bucket (of the key columns) of every row."""
    if num_buckets == 1:
        return np.zeros(table.num_rows, dtype=np.int64)
    cols = [normalize_key(table.column(k)) for k in keys]
    return partition_ids(cols, table.num_rows, num_buckets)


def _key_ids(table: pa.Table, keys: list[str]) -> np.ndarray:
    """A dense id per distinct key (nulls equal, as in grouping) for every row."""
    n = table.num_rows
    if not keys:
        return np.zeros(n, dtype=np.int64)
    kt = pa.table({**{k: normalize_key(table.column(k)) for k in keys},
                   "__row": pa.array(np.arange(n, dtype=np.int64))})
    g = kt.group_by(keys, use_threads=False).aggregate([("__row", "list")])
    lists = g.column("__row_list").combine_chunks()
    ids = np.empty(n, dtype=np.int64)
    ids[np.asarray(pc.list_flatten(lists))] = np.asarray(pc.list_parent_indices(lists))
    return ids


class WindowState:
    """What a window operator keeps between batches, as state tables: its operator adds
    events and fires through it, and snapshots and restores what it holds."""

    #: arrival counter of the events (sessions number them; it travels in snapshots)
    seq: int = 0

    def process(self, batch: pa.RecordBatch, t: np.ndarray) -> list[pa.Table]:
        """Add events with valid times ``t`` (µs); result rows of windows fired already."""
        raise NotImplementedError

    def fire(self, old: int, w: int) -> list[pa.Table]:
        """The watermark moved from ``old`` to ``w``: result rows of what fires now."""
        raise NotImplementedError

    def finish(self, w: int) -> list[pa.Table]:
        """End of input at watermark ``w``: result rows of everything not yet fired."""
        raise NotImplementedError

    def state_tables(self) -> list[pa.Table]:
        """Every state table, in memory or on disk (spilled state stays spilled)."""
        raise NotImplementedError

    def iter_state_tables(self) -> Iterator[pa.Table]:
        """``state_tables()`` one table at a time."""
        yield from self.state_tables()

    def has_spills(self) -> bool:
        """True when part of the state is on disk."""
        return False

    def load(self, table: pa.Table) -> None:
        """Put a snapshot's state table (not empty) in place."""
        raise NotImplementedError

    def add(self, table: pa.Table) -> None:
        """Add one key group's state table to what is restored already (disjoint keys)."""
        self.load(table)

    def drop(self) -> None:
        """Delete the spill files."""

    def close(self) -> None:
        """Release the state (memory and spill files)."""
        self.drop()
