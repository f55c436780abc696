"""Accumulators of the changelog aggregate: per key and aggregate, a small picklable Python
value that takes a batch's additions and retractions and gives the current result.

A batch's contribution to every key is computed vectorized first (``prepare``: one Arrow
group-by per aggregate, by the batch's key ids and, where needed, the value); then each
key's accumulator takes its share (``apply``). What each aggregate keeps per key:

* ``count``: the number of non-null values; ``count_all`` needs nothing (the key's row
  count is kept anyway);
* ``sum``, ``mean``: the sum and the count of non-null values (a retraction subtracts;
  the sum restarts at zero when the count does, so float residue never outlives it);
* ``min``, ``max``: with retractions, the value multiset ``{value: count}`` and the current
  extreme (recomputed only when a retraction empties it, so a retracted min is exact);
  on an append-only input, the extreme alone;
* ``count_distinct``: the value multiset (its size is the result);
* ``first``, ``last``, ``collect_list``: the values in arrival order (a retraction
  removes the latest equal value); on an append-only input ``first`` and ``last`` keep
  one value.

Nulls are ignored, as the batch aggregates ignore them; ``min``/``max`` ignore NaN, and
NaN is one distinct value (a picklable marker stands for it in the multisets and lists).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from millstream.core.arrow import normalize_key
from millstream.errors import PlanError, SchemaError
from millstream.expr.aggregates import AggSpec
from millstream.ops.changelog.keyed import KeyedRows


class _NaN:
    """Stands for NaN in multisets and lists: equal to itself after pickling (a float NaN
    is equal to nothing, so it could never be found again to be retracted)."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _NaN)

    def __hash__(self) -> int:
        return 0x7FF8

    def __repr__(self) -> str:
        return "NaN"

    def __reduce__(self) -> tuple:
        return (_NaN, ())


_NAN = _NaN()


def _canon(v: Any) -> Any:
    return _NAN if isinstance(v, float) and v != v else v


def _uncanon(v: Any) -> Any:
    return float("nan") if isinstance(v, _NaN) else v


def evaluate(spec: AggSpec, batch: pa.RecordBatch) -> pa.Array:
    """The values an aggregate reads from ``batch``."""
    try:
        arr = spec.arg.evaluate(batch)
    except AttributeError:
        arr = batch.column(spec.arg)
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if isinstance(arr, pa.Scalar):
        arr = pa.array([arr.as_py()] * batch.num_rows, arr.type)
    return arr


def _per_group(table: pa.Table, column: str, n_groups: int) -> list[Any]:
    """Values of ``column`` of a grouping by ``g``, as a list indexed by group."""
    values = table.column(column).to_pylist()
    g = np.asarray(table.column("g"), dtype=np.int64)
    if len(g) == n_groups and (g == np.arange(n_groups)).all():
        return values  # (groups come out in first-appearance order: usually this)
    out: list[Any] = [None] * n_groups
    for i, v in zip(g.tolist(), values):
        out[i] = v
    return out


class Accumulator:
    """One aggregate's per-key state: ``initial``, ``prepare`` (a batch's contribution per
    key), ``apply`` (one key's contribution) and ``result``."""

    def __init__(self, spec: AggSpec, retracting: bool) -> None:
        self.spec = spec
        self.retracting = retracting

    def initial(self) -> Any:
        return None

    def prepare(self, batch: pa.RecordBatch, signs: np.ndarray, groups: KeyedRows
                ) -> list[Any]:
        """Per group of ``groups``: its contribution (None: nothing)."""
        raise NotImplementedError

    def apply(self, acc: Any, contribution: Any) -> Any:
        raise NotImplementedError

    def result(self, acc: Any, rows: int) -> Any:
        raise NotImplementedError


class CountAll(Accumulator):
    """``count()``: the key's row count, which the operator keeps anyway."""

    def prepare(self, batch: pa.RecordBatch, signs: np.ndarray, groups: KeyedRows
                ) -> list[Any]:
        return [None] * len(groups)

    def apply(self, acc: Any, contribution: Any) -> Any:
        return acc

    def result(self, acc: Any, rows: int) -> Any:
        return rows


class Count(Accumulator):
    """Non-null values."""

    def initial(self) -> Any:
        return 0

    def prepare(self, batch: pa.RecordBatch, signs: np.ndarray, groups: KeyedRows
                ) -> list[Any]:
        arr = evaluate(self.spec, batch)
        valid = np.ones(len(arr), dtype=bool) if arr.null_count == 0 else \
            np.asarray(arr.is_valid(), dtype=bool)
        net = np.bincount(groups.gids[valid], weights=signs[valid], minlength=len(groups))
        return [x or None for x in net.astype(np.int64).tolist()]

    def apply(self, acc: Any, contribution: Any) -> Any:
        return acc + contribution

    def result(self, acc: Any, rows: int) -> Any:
        return acc


class Sum(Accumulator):
    """``sum`` (and ``mean``, with ``average``): the sum and count of non-null values; for
    floats also the counts of NaN, +inf and -inf (kept out of the running sum, so taking
    one back leaves the exact sum of the rest)."""

    def __init__(self, spec: AggSpec, retracting: bool, average: bool = False) -> None:
        super().__init__(spec, retracting)
        self.average = average

    def initial(self) -> Any:
        return [0, 0]

    def prepare(self, batch: pa.RecordBatch, signs: np.ndarray, groups: KeyedRows
                ) -> list[Any]:
        arr = evaluate(self.spec, batch)
        t = arr.type
        if self.average:
            if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
                    or pa.types.is_null(t)):
                raise SchemaError(f"mean({self.spec.name}): column type {t} is not numeric")
            arr = arr.cast(pa.float64())
        elif pa.types.is_unsigned_integer(t) or pa.types.is_boolean(t) or pa.types.is_null(t):
            arr = arr.cast(pa.int64())
        valid = np.ones(len(arr), dtype=bool) if arr.null_count == 0 else \
            np.asarray(arr.is_valid(), dtype=bool)
        n = len(groups)
        gids = groups.gids
        counts = np.bincount(gids[valid], weights=signs[valid], minlength=n)
        if pa.types.is_floating(arr.type):
            return self._floats(arr, valid, signs, gids, counts)
        if (signs < 0).any():
            arr = pc.if_else(pa.array(signs > 0), arr, pc.negate(arr))
        sums = pa.table({"g": pa.array(gids), "v": arr}).group_by("g", use_threads=False) \
            .aggregate([("v", "sum")])
        per = _per_group(sums, "v_sum", n)
        return [None if (not c and not s) else (s or 0, c)
                for s, c in zip(per, counts.astype(np.int64).tolist())]

    @staticmethod
    def _floats(arr: pa.Array, valid: np.ndarray, signs: np.ndarray, gids: np.ndarray,
                counts: np.ndarray) -> list[Any]:
        vals = np.asarray(arr.cast(pa.float64()).fill_null(0.0), dtype=np.float64)
        n = len(counts)
        special = []
        finite = np.isfinite(vals)
        for mask in (np.isnan(vals), vals == np.inf, vals == -np.inf):
            m = mask & valid
            special.append(np.bincount(gids[m], weights=signs[m], minlength=n))
        w = np.where(finite & valid, vals, 0.0) * signs
        sums = np.bincount(gids, weights=w, minlength=n)
        out: list[Any] = []
        for g in range(n):
            part = [float(sums[g]), int(counts[g]), *(int(x[g]) for x in special)]
            out.append(part if any(part) else None)
        return out

    def apply(self, acc: Any, contribution: Any) -> Any:
        if len(contribution) == 2:
            n = acc[1] + contribution[1]
            if n <= 0:  # nothing left: start again from an exact zero
                return [0] * len(acc)
            acc[0] += contribution[0]
            acc[1] = n
            return acc
        if len(acc) < 5:
            acc = [*acc, 0, 0, 0]
        new = [a + c for a, c in zip(acc, contribution)]
        if new[1] <= 0:
            return [0] * len(new)
        return new

    def result(self, acc: Any, rows: int) -> Any:
        s, n = acc[0], acc[1]
        if n <= 0:
            return None
        if len(acc) > 2:
            nan, pinf, ninf = acc[2:5]
            if nan > 0 or (pinf > 0 and ninf > 0):
                return float("nan")
            if pinf > 0 or ninf > 0:
                return float("inf") if pinf > 0 else float("-inf")
        return s / n if self.average else s


class Extreme(Accumulator):
    """``min`` / ``max``: with retractions the value multiset and the current extreme,
    else the extreme alone."""

    def __init__(self, spec: AggSpec, retracting: bool) -> None:
        super().__init__(spec, retracting)
        self.pick = min if spec.func == "min" else max

    def initial(self) -> Any:
        return [None, {}] if self.retracting else None

    def prepare(self, batch: pa.RecordBatch, signs: np.ndarray, groups: KeyedRows
                ) -> list[Any]:
        arr = evaluate(self.spec, batch)
        gid = pa.array(groups.gids)
        if not self.retracting:
            t = pa.table({"g": gid, "v": arr}).group_by("g", use_threads=False) \
                .aggregate([("v", self.spec.func)])
            return _per_group(t, f"v_{self.spec.func}", len(groups))
        keep = pc.is_valid(arr)
        if pa.types.is_floating(arr.type):
            keep = pc.and_(keep, pc.invert(pc.is_nan(arr)))
        return _value_deltas(normalize_key(arr), signs, gid, keep, len(groups))

    def apply(self, acc: Any, contribution: Any) -> Any:
        if not self.retracting:
            return contribution if acc is None else self.pick(acc, contribution)
        cur, counts = acc
        added = []
        for v, d in contribution:
            c = counts.get(v, 0) + d
            if c > 0:
                counts[v] = c
                if d > 0:
                    added.append(v)
            else:
                counts.pop(v, None)
        if cur is not None and cur in counts:
            if added:
                cur = self.pick(cur, self.pick(added))
        else:
            cur = self.pick(counts) if counts else None
        return [cur, counts]

    def result(self, acc: Any, rows: int) -> Any:
        return acc[0] if self.retracting else acc


class CountDistinct(Accumulator):
    """Distinct non-null values: their multiset."""

    def initial(self) -> Any:
        return {}

    def prepare(self, batch: pa.RecordBatch, signs: np.ndarray, groups: KeyedRows
                ) -> list[Any]:
        arr = normalize_key(evaluate(self.spec, batch))
        return _value_deltas(arr, signs, pa.array(groups.gids), pc.is_valid(arr), len(groups))

    def apply(self, acc: Any, contribution: Any) -> Any:
        for v, d in contribution:
            c = acc.get(v, 0) + d
            if c > 0:
                acc[v] = c
            else:
                acc.pop(v, None)
        return acc

    def result(self, acc: Any, rows: int) -> Any:
        return len(acc)


class Ordered(Accumulator):
    """``first``, ``last``, ``collect_list``: the non-null values in arrival order (a
    retraction removes the latest equal value); append-only ``first``/``last`` keep one."""

    def initial(self) -> Any:
        return [] if self._listed else None

    @property
    def _listed(self) -> bool:
        return self.retracting or self.spec.func == "collect_list"

    def prepare(self, batch: pa.RecordBatch, signs: np.ndarray, groups: KeyedRows
                ) -> list[Any]:
        arr = evaluate(self.spec, batch)
        func = self.spec.func
        if not self._listed:  # first/last of an append-only input: Arrow's ordered kernels
            kernel = "min" if pa.types.is_null(arr.type) else func
            t = pa.table({"g": pa.array(groups.gids), "v": arr}) \
                .group_by("g", use_threads=False).aggregate([("v", kernel)])
            return _per_group(t, f"v_{kernel}", len(groups))
        values = arr.to_pylist()
        out: list[Any] = [None] * len(groups)
        for g in range(len(groups)):
            seq = [(_canon(values[r]), int(signs[r])) for r in groups.rows_of(g)
                   if values[r] is not None]
            if seq:
                out[g] = seq
        return out

    def apply(self, acc: Any, contribution: Any) -> Any:
        if not self._listed:
            if self.spec.func == "first":
                return contribution if acc is None else acc
            return contribution
        for v, s in contribution:
            if s > 0:
                acc.append(v)
            else:
                for i in range(len(acc) - 1, -1, -1):
                    if acc[i] == v:
                        del acc[i]
                        break
        return acc

    def result(self, acc: Any, rows: int) -> Any:
        if not self._listed:
            return acc
        func = self.spec.func
        if func == "collect_list":
            return [_uncanon(v) for v in acc]
        if not acc:
            return None
        return _uncanon(acc[0] if func == "first" else acc[-1])


def _value_deltas(arr: pa.Array, signs: np.ndarray, gid: pa.Array, keep: Any, n_groups: int
                  ) -> list[Any]:
    """Per group: [(value, net count change)] of the kept values in the batch."""
    t = pa.table({"g": gid, "v": arr, "s": pa.array(signs.astype(np.int64))}).filter(keep)
    if t.num_rows == 0:
        return [None] * n_groups
    agg = t.group_by(["g", "v"], use_threads=False).aggregate([("s", "sum")])
    out: list[Any] = [None] * n_groups
    for g, v, d in zip(agg.column("g").to_pylist(), agg.column("v").to_pylist(),
                       agg.column("s_sum").to_pylist()):
        if d:
            lst = out[g]
            if lst is None:
                lst = out[g] = []
            lst.append((_canon(v), d))
    return out


def make_accumulator(spec: AggSpec, retracting: bool) -> Accumulator:
    """The accumulator of ``spec`` (``retracting``: the input may take rows back)."""
    f = spec.func
    if f == "count_all":
        return CountAll(spec, retracting)
    if f == "count":
        return Count(spec, retracting)
    if f in ("sum", "mean"):
        return Sum(spec, retracting, average=f == "mean")
    if f in ("min", "max"):
        return Extreme(spec, retracting)
    if f == "count_distinct":
        return CountDistinct(spec, retracting)
    if f in ("first", "last", "collect_list"):
        return Ordered(spec, retracting)
    raise PlanError(f"aggregate {f!r} cannot run on an unbounded stream")
