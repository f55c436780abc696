"""Exact quantiles (``median``, ``quantile``): the state of a group is the list of its
non-null values (as ``count_distinct``'s is its distinct values), so it grows with the group;
``approx_quantile`` (``tdigest``) keeps a bounded sketch instead.

The result interpolates between the two values around rank ``q * (n - 1)`` of the sorted
values, as numpy's ``method=`` names it: "linear" (the default; DuckDB's ``quantile_cont``,
Spark's ``percentile``), "lower", "higher", "midpoint", "nearest" (halves to even); or
"discrete", SQL's ``percentile_disc`` (DuckDB's ``quantile_disc``, numpy's "inverted_cdf"):
the value at rank ``ceil(q * n) - 1``. NaN sorts after every number (as in DuckDB).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from millstream.ops.agg_states.base import (
    StateAgg,
    flatten_lists,
    group_ids,
    lengths,
    list_of,
    numeric_f64,
)


def _drop_nulls(values: pa.Array, offsets: np.ndarray) -> tuple[pa.Array, np.ndarray]:
    if not values.null_count:
        return values, offsets
    valid = np.asarray(pc.is_valid(values), dtype=bool)
    counts = np.bincount(group_ids(offsets)[valid], minlength=len(offsets) - 1)
    new = np.zeros(len(offsets), dtype=np.int64)
    np.cumsum(counts, out=new[1:])
    return values.filter(pa.array(valid)), new


class ExactQuantile(StateAgg):
    """``quantile(q, interpolation)``, or ``median`` (q = 0.5, linear)."""

    states = ("values",)

    def __init__(self, median: bool) -> None:
        self.median = median

    def prepare(self, arr: pa.Array, spec: Any) -> pa.Array:
        return numeric_f64(arr, spec)

    def partial(self, values: pa.Array, offsets: np.ndarray, spec: Any) -> list[pa.Array]:
        values, offsets = _drop_nulls(values, offsets)
        return [list_of(offsets, values)]

    def merge(self, states: list[pa.Array], offsets: np.ndarray, spec: Any) -> list[pa.Array]:
        values, inner = flatten_lists(states[0], offsets)
        return [list_of(inner, values)]

    def finalize(self, states: list[pa.Array], spec: Any) -> pa.Array:
        q = 0.5 if self.median else spec.params["q"]
        how = "linear" if self.median else spec.params.get("interpolation", "linear")
        lists = states[0]
        if isinstance(lists, pa.ChunkedArray):
            lists = lists.combine_chunks()
        lists = lists.fill_null([]) if lists.null_count else lists
        offsets = np.asarray(lists.offsets, dtype=np.int64)
        offsets = offsets - offsets[0]
        values = np.asarray(pc.list_flatten(lists).to_numpy(zero_copy_only=False),
                            dtype=np.float64)
        return quantiles_of_segments(values, offsets, q, how)


def quantiles_of_segments(values: np.ndarray, offsets: np.ndarray, q: float,
                          how: str) -> pa.Array:
    """The q-quantile of every segment of ``values`` (null for empty segments)."""
    n = lengths(offsets)
    out = np.full(len(n), np.nan)
    ok = n > 0
    if ok.any():
        g = group_ids(offsets)
        order = np.lexsort((values, g))  # by group, then value (NaN last)
        v = values[order]
        pos = q * (n[ok] - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.ceil(pos).astype(np.int64)
        base = offsets[:-1][ok]
        a, b = v[base + lo], v[base + hi]
        frac = pos - lo
        if how == "linear":
            with np.errstate(invalid="ignore"):
                res = np.where(frac == 0, a, a + (b - a) * frac)
        elif how == "lower":
            res = a
        elif how == "higher":
            res = b
        elif how == "discrete":
            idx = np.maximum(np.ceil(q * n[ok]).astype(np.int64) - 1, 0)
            res = v[base + idx]
        elif how == "midpoint":
            res = np.where(lo == hi, a, (a + b) / 2)
        else:  # nearest, halves to even as numpy
            near = np.round(pos).astype(np.int64)
            res = v[base + near]
        out[ok] = res
    return pa.array(out, pa.float64(), mask=~ok)
