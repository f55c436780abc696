"""Per-group row lists and list states of the aggregation (ops/aggregate): the rows of
every group in group order, list states concatenated per key on merge, distinct values
per list (count_distinct's state), and nulls dropped per list (collect_list)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def row_segments(rows: pa.Array | pa.ChunkedArray) -> tuple[pa.Array, np.ndarray]:
    """The row indices of every group in group order, and the group boundaries."""
    if isinstance(rows, pa.ChunkedArray):
        rows = rows.combine_chunks()
    offsets = np.asarray(rows.offsets, dtype=np.int64)
    return pc.list_flatten(rows), offsets - offsets[0]


def regroup_lists(outer: pa.Array) -> pa.Array:
    """list<list<T>> -> list<T>: concatenate the inner lists of every row."""
    outer = outer.fill_null([]) if outer.null_count else outer
    outer_off = np.asarray(outer.offsets)
    inner = outer.values
    inner = inner.fill_null([]) if inner.null_count else inner
    inner_off = np.asarray(inner.offsets)
    new_off = inner_off[outer_off]
    start = int(new_off[0]) if len(new_off) else 0
    vals = inner.values.slice(start, int(new_off[-1]) - start) if len(new_off) else inner.values
    return pa.ListArray.from_arrays(pa.array(new_off - start, type=pa.int32()), vals)


def unique_per_row(lists: pa.Array) -> pa.Array:
    """list<T> -> list<T> with the distinct non-null values of every row."""
    n = len(lists)
    lists = lists.fill_null([]) if lists.null_count else lists
    parents = pc.list_parent_indices(lists)
    values = pc.list_flatten(lists)
    if len(values) == 0:
        return pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, dtype=np.int32)),
                                        values)
    t = pa.table({"g": parents, "v": values})
    u = t.group_by(["g", "v"], use_threads=False).aggregate([]).sort_by("g")
    g = np.asarray(u.column("g"))
    counts = np.bincount(g, minlength=n)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    v = u.column("v").combine_chunks()
    if v.null_count:
        # drop nulls: count distinct ignores them
        keep = pc.is_valid(v)
        gk = np.asarray(pa.array(g).filter(keep))
        counts = np.bincount(gk, minlength=n)
        np.cumsum(counts, out=offsets[1:])
        v = v.filter(keep)
    return pa.ListArray.from_arrays(pa.array(offsets), v)


def drop_nulls_per_list(lists: pa.Array) -> pa.Array:
    """list<T> -> list<T> without null elements (collect_list ignores nulls, like Spark)."""
    n = len(lists)
    lists = lists.fill_null([]) if lists.null_count else lists
    values = pc.list_flatten(lists)
    if values.null_count == 0:
        return lists
    parents = np.asarray(pc.list_parent_indices(lists))
    keep = np.asarray(pc.is_valid(values))
    counts = np.bincount(parents[keep], minlength=n)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), values.filter(pa.array(keep)))
