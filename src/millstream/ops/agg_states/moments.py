"""Variance and standard deviation: the states are count, mean and M2 (the sum of squared
deviations from the mean) per group; partial states come from Arrow's hash kernels (which
merge batches stably), and merging uses Chan et al.'s parallel formula over the segments,
``M2 = sum(M2_i) + sum(n_i * (mean_i - mean)^2)`` with ``mean = sum(n_i * mean_i) / n``:
no cancellation between large sums of squares."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from millstream.ops.agg_states.base import StateAgg, f64, lengths, numeric_f64, seg_sum


class Moments(StateAgg):
    """``var`` (or ``std`` with ``sqrt``): M2 / (n - ddof), null when n <= ddof."""

    states = ("n", "mean", "m2")

    def __init__(self, sqrt: bool) -> None:
        self.sqrt = sqrt

    def prepare(self, arr: pa.Array, spec: Any) -> pa.Array:
        return numeric_f64(arr, spec)

    def acero_partial(self, arg: str) -> list[tuple]:
        return [(arg, "count", pc.CountOptions("only_valid")), (arg, "mean"),
                (arg, "variance", pc.VarianceOptions(ddof=0))]

    def from_acero(self, arrays: list[pa.Array]) -> list[pa.Array]:
        n, mean, var = arrays
        m2 = pc.fill_null(pc.multiply(var, pc.cast(n, pa.float64())), 0.0)
        return [pc.cast(n, pa.int64()), pc.fill_null(mean, 0.0), m2]

    def merge(self, states: list[pa.Array], offsets: np.ndarray, spec: Any) -> list[pa.Array]:
        n_i = np.nan_to_num(f64(states[0]))
        mean_i = np.nan_to_num(f64(states[1]))
        m2_i = np.nan_to_num(f64(states[2]))
        n = seg_sum(n_i, offsets)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(n > 0, seg_sum(n_i * mean_i, offsets) / np.where(n > 0, n, 1), 0.0)
        dev = mean_i - np.repeat(mean, lengths(offsets))
        m2 = seg_sum(m2_i, offsets) + seg_sum(n_i * dev * dev, offsets)
        return [pa.array(n.astype(np.int64)), pa.array(mean), pa.array(m2)]

    def finalize(self, states: list[pa.Array], spec: Any) -> pa.Array:
        ddof = spec.params.get("ddof", 1)
        n = np.nan_to_num(f64(states[0]))
        m2 = np.maximum(np.nan_to_num(f64(states[2])), 0.0)
        ok = n > ddof
        with np.errstate(invalid="ignore", divide="ignore"):
            var = m2 / np.where(ok, n - ddof, 1.0)
        out = np.sqrt(var) if self.sqrt else var
        return pa.array(out, pa.float64(), mask=~ok)
