"""The state algebra of the aggregates in this package (:class:`StateAgg`) and the numpy
helpers they share over group segments (see the package docstring)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from millstream.errors import SchemaError


class StateAgg:
    """One aggregate function's state algebra over group segments (see the module docstring)."""

    #: names of the state columns (suffixes; the core prefixes them per aggregate)
    states: tuple[str, ...] = ("s",)

    def prepare(self, arr: pa.Array, spec: Any) -> pa.Array:
        """The input as the states consume it (checked and cast); SchemaError when unfit."""
        return arr

    def acero_partial(self, arg: str) -> list[tuple] | None:
        """Arrow hash aggregations that compute the partial states directly (in ``states``
        order), or None to compute them with :meth:`partial` over segments."""
        return None

    def from_acero(self, arrays: list[pa.Array]) -> list[pa.Array]:
        """The states from the results of :meth:`acero_partial`."""
        return arrays

    def partial(self, values: pa.Array, offsets: np.ndarray, spec: Any) -> list[pa.Array]:
        """States of each group from its raw values (``values`` in group order)."""
        raise NotImplementedError

    def merge(self, states: list[pa.Array], offsets: np.ndarray, spec: Any) -> list[pa.Array]:
        """States of each group from the partial states of its rows (in group order)."""
        raise NotImplementedError

    def finalize(self, states: list[pa.Array], spec: Any) -> pa.Array:
        """The result of each group from its merged states."""
        raise NotImplementedError

    def empty(self, spec: Any) -> pa.Array:
        """The one-row result of a global aggregation over no rows."""
        return pa.array([None], pa.float64())


def numeric_f64(arr: pa.Array, spec: Any) -> pa.Array:
    """A numeric (or all-null) input as float64; SchemaError for anything else."""
    t = arr.type
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
            or pa.types.is_null(t)):
        raise SchemaError(f"{spec.func}({spec.name}): column type {t} is not numeric")
    return arr.cast(pa.float64()) if t != pa.float64() else arr


def lengths(offsets: np.ndarray) -> np.ndarray:
    """Rows per group."""
    return np.diff(offsets)


def group_ids(offsets: np.ndarray) -> np.ndarray:
    """The group of every row of a grouped array."""
    return np.repeat(np.arange(len(offsets) - 1, dtype=np.int64), lengths(offsets))


def seg_sum(x: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Sum of every group's segment (0 for empty groups)."""
    out = np.zeros(len(offsets) - 1, dtype=np.float64)
    nonempty = np.flatnonzero(lengths(offsets) > 0)
    if len(nonempty):
        out[nonempty] = np.add.reduceat(x, offsets[:-1][nonempty])
    return out


def list_of(offsets: np.ndarray, values: pa.Array) -> pa.Array:
    """A list array: group i holds ``values[offsets[i]:offsets[i+1]]``."""
    off = pa.array(offsets.astype(np.int64 if offsets[-1] > 2**31 - 1 else np.int32))
    if off.type == pa.int64():
        return pa.LargeListArray.from_arrays(off, values)
    return pa.ListArray.from_arrays(off, values)


def flatten_lists(lists: pa.Array | pa.ChunkedArray, offsets: np.ndarray
                  ) -> tuple[pa.Array, np.ndarray]:
    """The values of list rows that come in group order, and the new group boundaries."""
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    if lists.null_count:
        lists = lists.fill_null([])
    inner = np.asarray(lists.offsets) if len(lists) else np.zeros(1, dtype=np.int64)
    inner = inner - inner[0]
    values = pc.list_flatten(lists)
    return values, inner[offsets]


def f64(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A float64 column as numpy (nulls as NaN)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=np.float64)
