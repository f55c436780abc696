"""Aggregates whose partial states Arrow's hash kernels cannot merge: variance and standard
deviation (count, mean, M2), exact quantiles (the values), HyperLogLog distinct counts and
t-digest quantiles (mergeable sketches).

Each is a :class:`StateAgg`: the hash aggregation (``ops.aggregate._AggCore``) groups the rows
(or the partial states) with Arrow and hands every aggregate its input *in group order*:
one array whose rows of a group are contiguous, and the group boundaries (``offsets``,
``len = groups + 1``). The aggregate computes its states per group with numpy over those
segments. Merging is associative and commutative, so the map-side combiner, the final merge,
spilled buckets and streaming windows (which use the same algebra) all agree.
"""

from __future__ import annotations

from millstream.ops.agg_states.base import StateAgg
from millstream.ops.agg_states.hll import HyperLogLog
from millstream.ops.agg_states.moments import Moments
from millstream.ops.agg_states.quantiles import ExactQuantile
from millstream.ops.agg_states.tdigest import TDigest

#: the aggregate functions computed by a StateAgg, by name
STATE_AGGS: dict[str, StateAgg] = {
    "std": Moments(sqrt=True),
    "var": Moments(sqrt=False),
    "median": ExactQuantile(median=True),
    "quantile": ExactQuantile(median=False),
    "approx_count_distinct": HyperLogLog(),
    "approx_quantile": TDigest(),
}

__all__ = ["STATE_AGGS", "StateAgg"]
