"""Sort orders on Arrow data: sort keys with SQL's null and NaN placement, range boundaries
from a key sample, and the range partition of every row (a global sort's shuffle)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from millstream.errors import SchemaError

_PER_KEY_NULLS = tuple(int(x) for x in pa.__version__.split(".")[:1]) >= (25,)




def sort_keys(by: list[str], descending: list[bool], nulls_last: bool | None = None) -> list[tuple]:
    """pyarrow sort keys; nulls first when ascending and last when descending unless told."""
    out = []
    for c, d in zip(by, descending):
        last = d if nulls_last is None else nulls_last
        if _PER_KEY_NULLS:
            out.append((c, "descending" if d else "ascending", "at_end" if last else "at_start"))
        else:
            out.append((c, "descending" if d else "ascending"))
    return out


def _sort_kwargs(descending: list[bool], nulls_last: bool | None) -> dict:
    if _PER_KEY_NULLS:
        return {}
    last = (descending[0] if descending else False) if nulls_last is None else nulls_last
    return {"null_placement": "at_end" if last else "at_start"}


def order_indices(table: pa.Table | pa.RecordBatch, by: list[str], descending: list[bool],
                  nulls_last: bool | None = None) -> pa.Array:
    """Stable sort permutation of ``table`` by ``by``, with SQL's NaN order.

    Arrow places NaN next to the nulls; SQL engines (DuckDB, Spark, Polars) order NaN above
    every other number. A float key is therefore preceded by an ``is_nan`` key sorted the
    same way, which moves NaN past the numbers and leaves the nulls where they were.
    """
    cols, names, keys, desc = [], [], [], []
    for i, (c, d) in enumerate(zip(by, descending)):
        arr = table.column(c)
        if pa.types.is_string_view(arr.type) or pa.types.is_binary_view(arr.type):
            # Arrow cannot sort view types (Parquet files may hold them); the large types sort
            arr = arr.cast(pa.large_string() if pa.types.is_string_view(arr.type)
                           else pa.large_binary())
        if pa.types.is_floating(arr.type):
            cols.append(pc.is_nan(arr))
            names.append(f"__nan{i}")
            desc.append(d)
            keys.append(f"__nan{i}")
        cols.append(arr)
        names.append(f"__key{i}")
        desc.append(d)
        keys.append(f"__key{i}")
    t = pa.table(cols, names=names)
    if t.num_rows == 0:
        return pa.array([], pa.uint64())
    sk = sort_keys(keys, desc, nulls_last)
    if not _PER_KEY_NULLS:
        # pyarrow < 25 has one null placement for all keys: that of the first column
        return pc.sort_indices(t, sort_keys=sk, **_sort_kwargs(descending, nulls_last))
    return pc.sort_indices(t, sort_keys=sk)


def check_sort_columns(table: pa.Table | pa.RecordBatch, by: list[str]) -> None:
    for c in by:
        if c not in table.schema.names:
            raise SchemaError(f"sort: no column {c!r}; columns are {table.schema.names}")


def range_partition_ids(batch: pa.RecordBatch, boundaries: pa.Table, by: list[str],
                        descending: list[bool], nulls_last: bool | None) -> np.ndarray:
    """Partition of every row given sorted boundary rows: the number of boundaries <= row."""
    n = batch.num_rows
    if boundaries.num_rows == 0 or n == 0:
        return np.zeros(n, dtype=np.int64)
    check_sort_columns(batch, by)
    keys = pa.table([batch.column(c) for c in by], names=by)
    bnd = boundaries.select(by)
    try:
        bnd = bnd.cast(keys.schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        keys = keys.cast(bnd.schema)
    both = pa.concat_tables([bnd, keys])
    mark = np.concatenate([np.ones(bnd.num_rows, dtype=np.int64), np.zeros(n, dtype=np.int64)])
    order = np.asarray(order_indices(both, by, descending, nulls_last))
    # boundaries come first in the concatenation and the sort is stable, so a row equal to
    # a boundary sorts after it and goes to the upper partition
    cum = np.cumsum(mark[order])
    pid_sorted = cum  # boundaries seen up to and including this position
    out = np.empty(bnd.num_rows + n, dtype=np.int64)
    out[order] = pid_sorted
    return out[bnd.num_rows:]


def choose_boundaries(sample: pa.Table, by: list[str], descending: list[bool], nulls_last: bool | None,
                      num_partitions: int) -> pa.Table:
    """``num_partitions - 1`` boundary rows taken at even quantiles of a key sample."""
    if sample.num_rows == 0 or num_partitions <= 1:
        return sample.select(by).slice(0, 0)
    s = sample.select(by)
    s = s.take(order_indices(s, by, descending, nulls_last))
    idx = [min(s.num_rows - 1, (i * s.num_rows) // num_partitions) for i in range(1, num_partitions)]
    return s.take(pa.array(idx, type=pa.int64()))
