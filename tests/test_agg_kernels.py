"""The aggregation kernels chosen for speed give the answers of the plain path: dense-code
grouping (ops/agg_dense) against Arrow's hash grouping, and decimal sums and means taken
over unscaled int64 values (ops/agg_keys.Unscaled) against exact decimal arithmetic."""

from __future__ import annotations

import decimal
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import millstream as ms
from millstream.core.arrow import normalize_key
from millstream.expr.aggregates import AggSpec
from millstream.ops.agg_dense import group_dense
from millstream.ops.aggregate import _AggCore

_VALID = pc.CountOptions("only_valid")
_ALL = pc.CountOptions("all")


def _arrow(table: pa.Table, keys: list[str], aggs: list[tuple]) -> pa.Table:
    for k in keys:
        i = table.schema.get_field_index(k)
        table = table.set_column(i, k, normalize_key(table.column(i)))
    return table.group_by(keys, use_threads=False).aggregate(aggs)


def _rows(t: pa.Table, keys: list[str]) -> dict:
    out = {}
    for r in t.to_pylist():
        key = tuple(r.pop(k) for k in keys)
        assert key not in out
        out[key] = r
    return out


def _same(got: pa.Table, want: pa.Table, keys: list[str]) -> None:
    assert got.schema == want.schema
    g, w = _rows(got, keys), _rows(want, keys)
    assert g.keys() == w.keys()
    for key, row in w.items():
        for name, value in row.items():
            other = g[key][name]
            if isinstance(value, float) and isinstance(other, float):
                if math.isnan(value):
                    assert math.isnan(other), (key, name)
                else:  # float sums add per block then across blocks
                    assert other == pytest.approx(value, rel=1e-12, abs=1e-9), (key, name)
            else:
                assert other == value, (key, name)


def _chunked(arr: pa.Array, cuts: list[int]) -> pa.ChunkedArray:
    bounds = sorted({0, len(arr), *[c % (len(arr) + 1) for c in cuts]})
    return pa.chunked_array([arr.slice(a, b - a) for a, b in zip(bounds, bounds[1:])],
                            arr.type)


_KEY_TYPES = {
    "int64": lambda v: pa.array(v, pa.int64()),
    "int8": lambda v: pa.array(v, pa.int8()),
    "uint32": lambda v: pa.array([None if x is None else x + 50 for x in v], pa.uint32()),
    "string": lambda v: pa.array([None if x is None else chr(65 + x % 40) for x in v]),
    "string_view": lambda v: pa.array([None if x is None else chr(65 + x % 40) for x in v],
                                      pa.string_view()),
    "two_bytes": lambda v: pa.array([None if x is None else f"{x % 7}{x % 2}" for x in v]),
    "binary1": lambda v: pa.array([None if x is None else bytes([x % 200]) for x in v],
                                  pa.binary(1)),
}


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n=st.integers(2, 150), ktype=st.sampled_from(sorted(_KEY_TYPES)),
       two=st.booleans(), nulls=st.booleans(), cuts=st.lists(st.integers(0, 150), max_size=3))
def test_dense_grouping_matches_arrows(data, n, ktype, two, nulls, cuts):
    """Keys of every coded type (one or two, with nulls), sums of integers, decimals and
    floats (NaN, infinities, nulls), counts of values and of rows, in several chunks."""
    key = st.one_of(st.none(), st.integers(-20, 20)) if nulls else st.integers(-20, 20)
    if ktype not in ("int64", "int8"):
        key = key.map(lambda x: None if x is None else abs(x))
    k1 = data.draw(st.lists(key, min_size=n, max_size=n))
    k2 = data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    ints = data.draw(st.lists(st.one_of(st.none(), st.integers(-10**6, 10**6)),
                              min_size=n, max_size=n))
    floats = data.draw(st.lists(st.one_of(
        st.none(), st.floats(-1e6, 1e6), st.sampled_from([math.nan, math.inf, -math.inf, -0.0])),
        min_size=n, max_size=n))
    cents = data.draw(st.lists(st.integers(-10**12, 10**12), min_size=n, max_size=n))
    cols = {
        "k": _chunked(_KEY_TYPES[ktype](k1), cuts),
        "k2": _chunked(pa.array(k2, pa.int32()), cuts),
        "i": _chunked(pa.array(ints, pa.int64()), cuts),
        "j": _chunked(pa.array([0 if x is None else x % 100 for x in ints], pa.int32()), cuts),
        "f": _chunked(pa.array(floats, pa.float64()), cuts),
        "d": _chunked(pa.array([decimal.Decimal(c).scaleb(-2) for c in cents],
                               pa.decimal128(15, 2)), cuts),
        "e": _chunked(pa.array([decimal.Decimal(c).scaleb(-6) for c in cents],
                               pa.decimal128(38, 6)), cuts),
    }
    t = pa.table(cols)
    keys = ["k", "k2"] if two else ["k"]
    aggs = [("i", "sum"), ("j", "sum"), ("f", "sum"), ("d", "sum"), ("e", "sum"),
            ("i", "count", _VALID), ("f", "count"), ("j", "count", _ALL), ([], "count_all")]
    got = group_dense(t, keys, aggs, min_codes=1)
    if ktype in ("string", "two_bytes") and None in k1:
        assert got is None  # a null string takes no bytes: left to Arrow
        return
    assert got is not None
    _same(got, _arrow(t, keys, aggs), keys)
    # sums alone (groups found from a sum of positive values: no row counts)
    pos = [("j", "sum")] if not nulls else [("d", "sum")]
    t2 = t.set_column(t.schema.get_field_index("j"), "j",
                      pc.add(t.column("j"), pa.scalar(1000, pa.int32())))
    got = group_dense(t2, keys, pos, min_codes=1)
    assert got is not None
    _same(got, _arrow(t2, keys, pos), keys)


def test_dense_grouping_of_many_codes_and_its_limits():
    rng = np.random.default_rng(7)
    n = 300_000
    t = pa.table({"k": rng.integers(1, 100_001, n), "v": rng.integers(-5, 6, n),
                  "f": rng.random(n)})
    aggs = [("v", "sum"), ("f", "sum"), ("v", "count", _VALID)]
    got = group_dense(t, ["k"], aggs)  # 1e5 codes: dense by default
    assert got is not None and got.num_rows == len(np.unique(t.column("k")))
    _same(got, _arrow(t, ["k"], aggs), ["k"])
    assert group_dense(t.slice(0, 1000), ["k"], aggs) is None  # few rows: codes too many
    assert group_dense(t, ["k"], [("v", "min")]) is None  # not a sum or count
    few = pa.table({"k": rng.integers(0, 100, 1000), "v": rng.integers(0, 5, 1000)})
    assert group_dense(few, ["k"], [("v", "sum")]) is None  # few codes: left to Arrow
    wide = pa.table({"k": [0, 10**9], "v": [1, 2]})
    assert group_dense(wide, ["k"], [("v", "sum")], min_codes=1) is None
    assert group_dense(pa.table({"k": ["abc", "d"], "v": [1, 2]}), ["k"], [("v", "sum")],
                       min_codes=1) is None  # strings of other widths


def test_dense_sums_near_int64_limits_are_exact_or_left_to_arrow():
    # |values| * rows above 2**53: summed in two halves, exactly
    big = 2**50 + 12345
    t = pa.table({"k": pa.array([0, 1, 0, 1, 0] * 40, pa.int64()),
                  "v": pa.array([big, -big + 7, big - 3, 5, -1] * 40, pa.int64())})
    got = group_dense(t, ["k"], [("v", "sum")], min_codes=1)
    assert got is not None
    assert _rows(got, ["k"]) == {(0,): {"v_sum": 40 * (2 * big - 4)},
                                 (1,): {"v_sum": 40 * (-big + 12)}}
    # sums that might leave int64: left to Arrow (which sums decimals in 128 bits)
    huge = decimal.Decimal(9 * 10**17)
    d = pa.table({"k": pa.array([0] * 20, pa.int64()),
                  "d": pa.array([huge] * 20, pa.decimal128(38, 0))})
    assert group_dense(d, ["k"], [("d", "sum")], min_codes=1) is None
    core = _AggCore(["k"], [AggSpec("sum", ms.col("d"), "s")])
    assert core.finalize(core.merge(core.partial(d))).column("s").to_pylist() == [huge * 20]
    # a decimal beyond 64 bits
    wide = pa.table({"k": pa.array([0, 0], pa.int64()),
                     "d": pa.array([decimal.Decimal(2**70), decimal.Decimal(1)],
                                   pa.decimal128(38, 0))})
    assert group_dense(wide, ["k"], [("d", "sum")], min_codes=1) is None


def test_dense_grouping_of_all_null_values_and_keys():
    t = pa.table({"k": pa.array([None, None, None], pa.int64()),
                  "v": pa.array([None, None, None], pa.int64()),
                  "f": pa.array([None, 1.5, None], pa.float64())})
    aggs = [("v", "sum"), ("f", "sum"), ("v", "count", _VALID), ([], "count_all")]
    got = group_dense(t, ["k"], aggs, min_codes=1)
    assert got is not None
    _same(got, _arrow(t, ["k"], aggs), ["k"])
    assert got.column("v_sum").to_pylist() == [None]


_PRICE = pa.decimal128(15, 2)


def _lineitem(prices: list[int], discounts: list[int], taxes: list[int]) -> pa.Table:
    n = len(prices)
    return pa.table({
        "k": pa.array([i % 3 for i in range(n)], pa.int64()),
        "p": pa.array([decimal.Decimal(x).scaleb(-2) for x in prices], _PRICE),
        "d": pa.array([decimal.Decimal(x).scaleb(-2) for x in discounts], _PRICE),
        "t": pa.array([None if i % 7 == 3 else decimal.Decimal(x).scaleb(-2)
                       for i, x in enumerate(taxes)], _PRICE),
    })


def _exact(t: pa.Table, fn) -> dict[int, list]:
    out: dict[int, list] = {}
    for r in t.to_pylist():
        out.setdefault(r["k"], []).append(fn(r))
    return out


@settings(max_examples=40, deadline=None)
@given(data=st.data(), n=st.integers(1, 60), scale=st.sampled_from([10**4, 10**12]))
def test_decimal_sums_and_means_over_unscaled_values_are_exact(data, n, scale):
    """``sum(p * (1 - d) * (1 + t))`` and ``mean(p)`` on decimal(15, 2): the unscaled int64
    path gives the exact decimal sums (and at 10**12 the products' sums leave int64, so the
    decimal128 path takes them) and means within a rounding of the exact ones."""
    vals = st.lists(st.integers(-scale, scale), min_size=n, max_size=n)
    t = _lineitem(data.draw(vals), data.draw(st.lists(st.integers(0, 10), min_size=n,
                                                      max_size=n)), data.draw(vals))
    col = ms.col
    rev = col("p") * (1 - col("d"))
    specs = [AggSpec("sum", rev, "rev"), AggSpec("sum", rev * (1 + col("t")), "charge"),
             AggSpec("sum", col("p"), "sp"), AggSpec("mean", col("p"), "mp"),
             AggSpec("mean", rev, "mrev"), AggSpec("count_all", None, "n")]
    core = _AggCore(["k"], specs)
    half = n // 2
    states = pa.concat_tables([core.partial(t.slice(0, half)), core.partial(t.slice(half))])
    got = {r["k"]: r for r in core.finalize(core.merge(states)).to_pylist()}
    one = decimal.Decimal(1)
    charges = _exact(t, lambda r: None if r["t"] is None
                     else r["p"] * (one - r["d"]) * (one + r["t"]))
    for k, revs in _exact(t, lambda r: r["p"] * (one - r["d"])).items():
        prices = [p for p in _exact(t, lambda r: r["p"])[k]]
        assert got[k]["rev"] == sum(revs)
        ch = [c for c in charges[k] if c is not None]
        assert got[k]["charge"] == (sum(ch) if ch else None)
        assert got[k]["sp"] == sum(prices)
        # each partial's sum is exact, then a float64: the partials add as floats
        for name, vals in (("mp", prices), ("mrev", revs)):
            tol = 4e-16 * float(sum(abs(v) for v in vals)) / len(vals)
            assert got[k][name] == pytest.approx(float(sum(vals)) / len(vals), rel=1e-15,
                                                 abs=tol)
        assert got[k]["n"] == len(prices)


def test_mean_of_decimals_sums_them_exactly():
    # 0.1 summed as float64 ten million times drifts; summed as decimals it is exact
    t = pa.table({"k": pa.array([1] * 10 + [2], pa.int64()),
                  "v": pa.array([decimal.Decimal("0.10")] * 10 + [decimal.Decimal("3.33")],
                                pa.decimal128(15, 2))})
    got = {r["k"]: r["m"] for r in ms.from_arrow(t, num_partitions=2).group_by("k")
           .agg(ms.mean("v").alias("m")).collect()}
    assert got == {1: 0.1, 2: 3.33}


def test_sums_and_means_of_decimal_columns_with_nulls_in_chunks():
    vals = [None if i % 5 == 2 else decimal.Decimal(i * 7919 % 1000 - 500).scaleb(-2)
            for i in range(40)]
    arr = pa.array(vals, _PRICE)
    col = pa.chunked_array([arr.slice(0, 13), arr.slice(13, 1), arr.slice(14)])
    t = pa.table({"k": pa.array([i % 4 for i in range(40)], pa.int64()), "v": col})
    core = _AggCore(["k"], [AggSpec("sum", ms.col("v"), "s"), AggSpec("mean", ms.col("v"), "m")])
    got = {r["k"]: r for r in core.finalize(core.merge(core.partial(t))).to_pylist()}
    for k in range(4):
        mine = [v for i, v in enumerate(vals) if i % 4 == k and v is not None]
        assert got[k]["s"] == sum(mine)
        assert got[k]["m"] == pytest.approx(float(sum(mine)) / len(mine), rel=1e-15)
    empty = t.set_column(1, "v", pa.chunked_array([pa.array([None] * 40, _PRICE)]))
    out = core.finalize(core.merge(core.partial(empty))).to_pylist()
    assert [(r["s"], r["m"]) for r in out] == [(None, None)] * 4
