"""Accumulators of the changelog aggregate for the statistical aggregates (see
:mod:`~millstream.ops.changelog.accumulators` for the protocol and the simple ones):

* ``std``, ``var``: the count, sum and sum of squares of the finite values, kept *exactly*:
  every value is an integer over a power-of-two scale (a float is a dyadic fraction), so a
  retraction subtracts exactly what its insertion added and the state after any sequence
  of changes equals that of the values held; the variance ``(n·Σx² − (Σx)²) / (n·(n −
  ddof))`` is then computed from exact integers and rounded once. (Running float moments
  lose everything when a large value is taken back from small ones: 1e12 then 1, 2, 3,
  minus 1e12.) NaN and infinities are counted apart: while one is held the result is NaN,
  as the batch aggregate gives.
* ``median``, ``quantile``: the value multiset ``{value: count}`` exactly as ``min``/``max``
  keep it with retractions (the same per-batch deltas and updates), plus its distinct
  values in sorted order; the result walks the counts to the ranks it needs and
  interpolates by the batch aggregate's rules (NaN sorts last).
* ``approx_count_distinct``, ``approx_quantile``: the batch aggregate's sketch per key
  (HyperLogLog registers, a t-digest), taking each batch's values. A sketch cannot take
  a value back, so these run on append-only input only; the planner refuses them over a
  changelog (``plan/updates.py``) and names the exact aggregate to use.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from millstream.core.arrow import normalize_key
from millstream.expr.aggregates import AggSpec
from millstream.ops.agg_states import hll
from millstream.ops.agg_states.base import numeric_f64
from millstream.ops.agg_states.quantiles import quantile_of_sorted
from millstream.ops.agg_states.tdigest import compress
from millstream.ops.changelog.accumulators import (
    NAN,
    Accumulator,
    apply_counts,
    evaluate,
    value_deltas,
)
from millstream.ops.changelog.keyed import KeyedRows

#: aggregates whose per-key state is a sketch that cannot take values back, with the
#: exact aggregate that can
SKETCHES = {"approx_count_distinct": "count_distinct",
            "approx_quantile": "quantile (or median)"}


def _scaled(vals: np.ndarray) -> tuple[list[int], int]:
    """Finite floats as integers over one scale: ``vals[i] == ints[i] / 2**k``, exactly."""
    m, e = np.frexp(vals)  # vals = m * 2**e, 0.5 <= |m| < 1 (0 for 0)
    mant = (m * 2.0 ** 53).astype(np.int64)  # exact: 53 significant bits
    k = max(0, int((53 - e).max()))  # the fraction bits the smallest needs
    return [x << s for x, s in zip(mant.tolist(), (e - 53 + k).tolist())], k


class Moments(Accumulator):
    """``std`` / ``var``: state ``[n, Σx·2^k, Σx²·2^2k, k, non-finite count]`` of the
    finite values (see the module docstring)."""

    def __init__(self, spec: AggSpec, retracting: bool) -> None:
        super().__init__(spec, retracting)
        self.sqrt = spec.func == "std"
        self.ddof = int(spec.params.get("ddof", 1))

    def initial(self) -> Any:
        return [0, 0, 0, 0, 0]

    def prepare(self, batch: pa.RecordBatch, signs: np.ndarray, groups: KeyedRows
                ) -> list[Any]:
        arr = numeric_f64(evaluate(self.spec, batch), self.spec)
        vals = np.asarray(arr.to_numpy(zero_copy_only=False), dtype=np.float64)
        valid = np.ones(len(vals), dtype=bool) if arr.null_count == 0 else \
            np.asarray(arr.is_valid(), dtype=bool)
        finite = valid & np.isfinite(vals)
        n_groups = len(groups)
        gids = groups.gids
        counts = np.bincount(gids[finite], weights=signs[finite], minlength=n_groups)
        odd = valid & ~finite
        others = np.bincount(gids[odd], weights=signs[odd], minlength=n_groups)
        s1 = [0] * n_groups
        s2 = [0] * n_groups
        k = 0
        if finite.any():
            ints, k = _scaled(vals[finite])
            for g, x, s in zip(gids[finite].tolist(), ints, signs[finite].tolist()):
                if s > 0:
                    s1[g] += x
                    s2[g] += x * x
                else:
                    s1[g] -= x
                    s2[g] -= x * x
        out: list[Any] = []
        for g, (n, o) in enumerate(zip(counts.astype(np.int64).tolist(),
                                       others.astype(np.int64).tolist())):
            part = [n, s1[g], s2[g], k, o]
            out.append(part if (n or o or s1[g] or s2[g]) else None)
        return out

    def apply(self, acc: Any, contribution: Any) -> Any:
        n, a1, a2, ka, odd = acc
        dn, c1, c2, kc, dodd = contribution
        k = max(ka, kc)
        a1, a2 = a1 << (k - ka), a2 << 2 * (k - ka)
        c1, c2 = c1 << (k - kc), c2 << 2 * (k - kc)
        n, s1, s2 = n + dn, a1 + c1, a2 + c2
        if n <= 0:  # nothing finite held: the sums are exactly zero again
            return [0, 0, 0, 0, odd + dodd]
        return [n, s1, s2, k, odd + dodd]

    def result(self, acc: Any, rows: int) -> Any:
        n, s1, s2, k, odd = acc
        if n + odd <= self.ddof:
            return None
        if odd > 0:
            return float("nan")
        num = n * s2 - s1 * s1  # n² · (population variance) · 2^2k, exactly, >= 0
        try:
            var = num / ((n * (n - self.ddof)) << 2 * k)  # (ints: rounded once)
        except OverflowError:
            var = math.inf
        return math.sqrt(var) if self.sqrt else var


class Quantile(Accumulator):
    """``median``, ``quantile``: state ``[n, {value: count}, sorted distinct values]`` (NaN
    counted in the multiset, kept out of the sorted list; it sorts last)."""

    def __init__(self, spec: AggSpec, retracting: bool) -> None:
        super().__init__(spec, retracting)
        median = spec.func == "median"
        self.q = 0.5 if median else float(spec.params["q"])
        self.how = "linear" if median else spec.params.get("interpolation", "linear")

    def initial(self) -> Any:
        return [0, {}, []]

    def prepare(self, batch: pa.RecordBatch, signs: np.ndarray, groups: KeyedRows
                ) -> list[Any]:
        arr = normalize_key(numeric_f64(evaluate(self.spec, batch), self.spec))
        return value_deltas(arr, signs, pa.array(groups.gids), pc.is_valid(arr), len(groups))

    def apply(self, acc: Any, contribution: Any) -> Any:
        n, counts, ordered = acc
        before = {v for v, _ in contribution if v in counts}
        apply_counts(counts, contribution)
        for v, d in contribution:
            n += d
            if v == NAN:
                continue
            held, was = v in counts, v in before
            if held and not was:
                insort(ordered, v)
            elif was and not held:
                del ordered[bisect_left(ordered, v)]
        acc[0] = n
        return acc

    def result(self, acc: Any, rows: int) -> Any:
        n, counts, ordered = acc
        if n <= 0:
            return None
        cache: dict[int, float] = {}

        def at(rank: int) -> float:
            if rank not in cache:
                seen = 0
                for v in ordered:
                    seen += counts[v]
                    if seen > rank:
                        cache[rank] = v
                        break
                else:
                    cache[rank] = math.nan
            return cache[rank]

        return quantile_of_sorted(at, n, self.q, self.how)


class DistinctSketch(Accumulator):
    """``approx_count_distinct`` on an append-only input: the batch aggregate's
    HyperLogLog registers per key, as ``{register: rank}`` with the histogram of ranks
    (so a batch's codes update it in a few dict operations, and the estimate is Ertl's,
    computed as :func:`~millstream.ops.agg_states.hll.estimate` computes it, from the
    histogram)."""

    def initial(self) -> Any:
        return [{}, [0] * (hll.Q + 2)]

    def prepare(self, batch: pa.RecordBatch, signs: np.ndarray, groups: KeyedRows
                ) -> list[Any]:
        arr = evaluate(self.spec, batch)
        valid = np.ones(len(arr), dtype=bool) if arr.null_count == 0 else \
            np.asarray(arr.is_valid(), dtype=bool)
        if pa.types.is_null(arr.type) or not valid.any():
            return [None] * len(groups)
        values = arr if valid.all() else arr.filter(pa.array(valid))
        lists = hll.compact(groups.gids[valid], hll.codes_of(values), len(groups))
        return [c or None for c in lists.to_pylist()]

    def apply(self, acc: Any, contribution: Any) -> Any:
        regs, hist = acc
        for code in contribution:
            reg, rank = code >> _RANK_BITS, code & _RANK_MASK
            old = regs.get(reg, 0)
            if rank > old:
                regs[reg] = rank
                hist[rank] += 1
                if old:
                    hist[old] -= 1
        return acc

    def result(self, acc: Any, rows: int) -> Any:
        regs, hist = acc
        m, q = hll.M, hll.Q
        z = m * _tau(1.0 - hist[q + 1] / m)
        for k in range(q, 0, -1):
            z = 0.5 * (z + hist[k])
        z = z + m * _sigma((m - len(regs)) / m)
        return 0 if math.isinf(z) else round(hll._ALPHA_INF * m * m / z)


_RANK_BITS = hll._RANK_BITS
_RANK_MASK = (1 << _RANK_BITS) - 1


def _sigma(x: float) -> float:
    """Ertl's sigma, as ``hll._sigma`` computes it for one value."""
    if x >= 1.0:
        return math.inf
    z, y, xx = x, 1.0, x
    for _ in range(64):
        xx = xx * xx
        z = z + xx * y
        y = y + y
    return z


def _tau(x: float) -> float:
    """Ertl's tau, as ``hll._tau`` computes it for one value."""
    if x <= 0.0 or x >= 1.0:
        return 0.0
    z, y, xx = 1.0 - x, 1.0, x
    for _ in range(64):
        xx = math.sqrt(xx)
        y = y * 0.5
        z = z - (1.0 - xx) ** 2 * y
    return z / 3.0


class QuantileSketch(Accumulator):
    """``approx_quantile`` on an append-only input: a t-digest per key, as the batch
    aggregate's (``ops/agg_states/tdigest.py``: the same compression and interpolation),
    with the values of the last batches pending until there are enough to compress (a
    result reads the digest and the pending values together)."""

    #: pending values compressed into the digest at once
    PENDING = 256

    def initial(self) -> Any:
        return [np.empty(0), np.empty(0), math.inf, -math.inf, []]

    def prepare(self, batch: pa.RecordBatch, signs: np.ndarray, groups: KeyedRows
                ) -> list[Any]:
        arr = numeric_f64(evaluate(self.spec, batch), self.spec)
        vals = np.asarray(arr.to_numpy(zero_copy_only=False), dtype=np.float64)[groups.rows]
        out: list[Any] = []
        for g in range(len(groups)):
            part = vals[groups.offsets[g]:groups.offsets[g + 1]]
            part = part[~np.isnan(part)]  # (nulls are NaN here; NaN is ignored too)
            out.append(part if len(part) else None)
        return out

    def apply(self, acc: Any, contribution: Any) -> Any:
        acc[2] = min(acc[2], float(contribution.min()))
        acc[3] = max(acc[3], float(contribution.max()))
        acc[4].extend(contribution.tolist())
        if len(acc[4]) >= self.PENDING:
            acc[0], acc[1] = self._centroids(acc)
            acc[4] = []
        return acc

    @staticmethod
    def _merged(acc: Any) -> tuple[np.ndarray, np.ndarray]:
        """The centroids and the pending values (weight 1), sorted by mean."""
        m = np.concatenate((acc[0], np.asarray(acc[4], dtype=np.float64)))
        w = np.concatenate((acc[1], np.ones(len(acc[4]))))
        order = np.argsort(m, kind="stable")
        return m[order], w[order]

    @classmethod
    def _centroids(cls, acc: Any) -> tuple[np.ndarray, np.ndarray]:
        """The digest with the pending values compressed in."""
        m, w = cls._merged(acc)
        _, m, w = compress(np.zeros(len(m), dtype=np.int64), m, w, 1)
        return m, w

    def result(self, acc: Any, rows: int) -> Any:
        if not len(acc[0]) and not acc[4]:
            return None
        m, w = self._merged(acc) if acc[4] else (acc[0], acc[1])
        # quantile_of_digests for one digest (its points: the minimum, the centroids'
        # centres, the maximum; interpolated at the rank of q), without its grouping
        total = w.sum()
        xs = np.concatenate(([0.5], np.cumsum(w) - w / 2, [total - 0.5]))
        ys = np.concatenate(([acc[2]], m, [acc[3]]))
        order = np.argsort(xs, kind="stable")
        return float(np.interp(self.spec.params["q"] * (total - 1.0) + 0.5, xs[order],
                               ys[order]))
