"""The statistical and approximate aggregates (std, var, median, quantile, any_value,
approx_count_distinct, approx_quantile) and expressions over aggregates inside ``agg``.

Oracles: DuckDB on the same rows, numpy, exact counts. Mergeability is checked on the state
algebra itself (random splits merged in random orders must give the answer of the whole) and
end to end: many partitions and small batches (combiner + final merge), and streaming windows
on the parallel executor (combiner before the window exchange).
"""

from __future__ import annotations

import math
import random

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracles import duckdb_connect

import millstream as ms
from millstream.errors import PlanError, SchemaError
from millstream.expr.aggregates import AggSpec
from millstream.ops.agg_states import hll
from millstream.ops.aggregate import _AggCore


@pytest.fixture(scope="module", autouse=True)
def session():
    ms.init(parallelism=2)
    yield
    ms.shutdown()


def _close(a, b, rel=1e-9, abs_=1e-9):
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


def _duck(t: pa.Table, sql: str) -> dict:
    con = duckdb_connect()
    con.register("t", t)
    return {r[0]: r[1:] for r in con.execute(sql).fetchall()}


# ---------------------------------------------------------------------- exact aggregates

_rows = st.lists(st.tuples(st.integers(0, 4),
                           st.one_of(st.none(), st.floats(-1e6, 1e6, allow_nan=False)),
                           st.one_of(st.none(), st.integers(-50, 50))),
                 min_size=0, max_size=120)


def _table(rows) -> pa.Table:
    return pa.table({"k": pa.array([r[0] for r in rows], pa.int64()),
                     "x": pa.array([r[1] for r in rows], pa.float64()),
                     "i": pa.array([r[2] for r in rows], pa.int64())})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=_rows, q=st.floats(0, 1), parts=st.integers(1, 5), batch=st.sampled_from([3, 7, 1000]))
def test_statistics_match_duckdb(rows, q, parts, batch):
    t = _table(rows)
    got = ms.from_arrow(t, num_partitions=parts).group_by("k").agg(
        ms.std("x").alias("sd"), ms.var("x", ddof=0).alias("vp"), ms.col("i").var().alias("vi"),
        ms.std("i", ddof=0).alias("sdp"), ms.median("x").alias("med"),
        ms.quantile("x", q).alias("qc"), ms.quantile("i", q, "discrete").alias("qd"),
        ms.median("i").alias("medi"),
    ).to_arrow(batch_size=batch)
    want = _duck(t, f"""select k, stddev_samp(x), var_pop(x), var_samp(i), stddev_pop(i),
                     median(x), quantile_cont(x, {q!r}), quantile_disc(i, {q!r}), median(i)
                     from t group by k""")
    assert sorted(got.column("k").to_pylist()) == sorted(want)
    for r in got.to_pylist():
        w = want[r["k"]]
        vals = [r[c] for c in ("sd", "vp", "vi", "sdp", "med", "qc", "qd", "medi")]
        for g, e in zip(vals, w):
            assert _close(g, None if e is None else float(e), rel=1e-7, abs_=1e-6), (r, w)


def test_interpolations_match_numpy():
    rng = np.random.default_rng(3)
    x = rng.normal(size=101)
    t = pa.table({"x": x})
    methods = {"linear": "linear", "lower": "lower", "higher": "higher",
               "midpoint": "midpoint", "nearest": "nearest", "discrete": "inverted_cdf"}
    for how, numpy_name in methods.items():
        for q in (0.0, 0.1, 0.333, 0.5, 0.9, 1.0):
            got = ms.from_arrow(t).agg(ms.quantile("x", q, how).alias("v")).collect()[0]["v"]
            assert got == pytest.approx(float(np.quantile(x, q, method=numpy_name))), (how, q)


def test_variance_is_numerically_stable():
    """Large offsets and many merges: Chan's merge keeps the digits that the sums of
    squares would lose."""
    rng = np.random.default_rng(5)
    x = 1e9 + rng.random(30_000)
    got = ms.from_arrow(pa.table({"x": x}), num_partitions=7).agg(
        ms.var("x").alias("v")).collect(batch_size=500)[0]["v"]
    assert got == pytest.approx(np.var(x, ddof=1), rel=1e-6)


def test_any_value_picks_a_non_null_value_of_the_group():
    t = pa.table({"k": [1, 1, 1, 2, 2, 3], "v": [None, "a", "b", None, None, "z"]})
    rows = {r["k"]: r["v"] for r in
            ms.from_arrow(t, num_partitions=3).group_by("k").agg(ms.any_value("v")).collect()}
    assert rows[1] in ("a", "b") and rows[2] is None and rows[3] == "z"
    assert ms.from_arrow(t).agg(ms.col("v").any_value()).collect()[0]["v"] in ("a", "b", "z")


def test_global_aggregates_of_no_rows():
    t = pa.table({"x": pa.array([], pa.float64())})
    row = ms.from_arrow(t).agg(
        ms.std("x").alias("sd"), ms.median("x").alias("m"), ms.any_value("x").alias("a"),
        ms.approx_count_distinct("x").alias("n"), ms.approx_quantile("x", 0.5).alias("q"),
    ).collect()
    assert row == [{"sd": None, "m": None, "a": None, "n": 0, "q": None}]


def test_bad_arguments_fail_when_the_query_is_built():
    t = pa.table({"s": ["a", "b"], "x": [1.0, 2.0]})
    with pytest.raises(SchemaError, match="not numeric"):
        _ = ms.from_arrow(t).agg(ms.std("s")).schema
    with pytest.raises(PlanError, match="q must be"):
        ms.quantile("x", 1.5)
    with pytest.raises(PlanError, match="interpolation"):
        ms.quantile("x", 0.5, "cubic")
    with pytest.raises(PlanError, match="ddof"):
        ms.std("x", ddof=-1)
    assert ms.from_arrow(t).agg(ms.std("x").alias("sd"), ms.median("x")).schema == pa.schema(
        [("sd", pa.float64()), ("x", pa.float64())])


# ---------------------------------------------------------------------- the state algebra


_SPECS = [AggSpec("std", ms.col("x"), "sd"), AggSpec("var", ms.col("x"), "vp", {"ddof": 0}),
          AggSpec("median", ms.col("x"), "med"),
          AggSpec("quantile", ms.col("x"), "q3", {"q": 0.3}),
          AggSpec("approx_count_distinct", ms.col("i"), "acd"),
          AggSpec("approx_quantile", ms.col("x"), "aq", {"q": 0.5}),
          AggSpec("any_value", ms.col("i"), "av"), AggSpec("count", ms.col("x"), "n")]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=_rows, seed=st.integers(0, 10**6))
def test_states_merge_in_any_order_to_the_answer_of_the_whole(rows, seed):
    """Partial states of random pieces, merged pairwise in a random order (as combiners,
    spilled buckets and windows do), give what one partial of all rows gives."""
    t = _table(rows)
    core = _AggCore(["k"], _SPECS)
    whole = core.finalize(core.merge(core.partial(t))).sort_by("k")
    rnd = random.Random(seed)
    cuts = sorted(rnd.sample(range(t.num_rows + 1), min(4, t.num_rows + 1)))
    pieces = [t.slice(a, b - a) for a, b in zip([0, *cuts], [*cuts, t.num_rows])]
    states = [core.partial(p) for p in pieces]
    while len(states) > 1:
        a = states.pop(rnd.randrange(len(states)))
        b = states.pop(rnd.randrange(len(states)))
        states.append(core.merge(pa.concat_tables([a, b])))
    merged = core.finalize(core.merge(states[0])).sort_by("k")
    assert merged.column("k").equals(whole.column("k"))
    for name in ("sd", "vp", "med", "q3", "acd", "n"):
        for g, w in zip(merged.column(name).to_pylist(), whole.column(name).to_pylist()):
            assert _close(g, w, rel=1e-9, abs_=1e-7), name
    # the sketch: the same digest up to the order of merging, so close, not equal
    for g, w in zip(merged.column("aq").to_pylist(), whole.column("aq").to_pylist()):
        assert (g is None) == (w is None)


# ---------------------------------------------------------------------- HyperLogLog


@pytest.mark.parametrize("n", [0, 1, 2, 10, 100, 1_000, 10_000, 100_000, 1_000_000])
def test_approx_count_distinct_is_within_the_documented_error(n):
    """Standard error 1.04/sqrt(4096) = 1.6%: every cardinality within 5% (3 sigma); tiny
    ones exactly (no two values share a register)."""
    rng = np.random.default_rng(n)
    values = rng.permutation(n * 3)[:n].astype(np.int64)
    rep = np.repeat(values, 2) if n else values  # duplicates do not count
    t = pa.table({"v": rep})
    got = ms.from_arrow(t, num_partitions=3).agg(ms.approx_count_distinct("v").alias("n")) \
        .collect()[0]["n"]
    if n <= 10:
        assert got == n
    else:
        assert abs(got - n) <= max(2, 0.05 * n), (got, n)


def test_approx_count_distinct_of_strings_and_the_mean_error():
    errors = []
    for seed in range(20):
        n = 20_000 + 1000 * seed
        words = pa.array([f"w{seed}-{i}" for i in range(n)])
        codes = hll.codes_of(words)
        state = hll.compact(np.zeros(n, dtype=np.int64), codes, 1)
        est = ms.from_arrow(pa.table({"w": words})).agg(ms.approx_count_distinct("w")) \
            .collect()[0]["w"]
        offsets = np.asarray(state.offsets)
        assert est == round(hll.estimate(offsets, np.asarray(state.values))[0])
        errors.append((est - n) / n)
    assert abs(np.mean(errors)) < 0.01  # unbiased
    assert np.sqrt(np.mean(np.square(errors))) < 0.025  # about 1.6%


def test_hll_of_a_union_is_the_merge_of_the_parts():
    rng = np.random.default_rng(9)
    a = pa.table({"k": np.zeros(5000, dtype=np.int64), "v": rng.integers(0, 10**9, 5000)})
    b = pa.table({"k": np.zeros(7000, dtype=np.int64), "v": rng.integers(0, 10**9, 7000)})
    core = _AggCore(["k"], [AggSpec("approx_count_distinct", ms.col("v"), "n")])
    merged = core.merge(pa.concat_tables([core.partial(a), core.partial(b)]))
    whole = core.partial(pa.concat_tables([a, b]))
    assert merged.column(1).to_pylist() == whole.column(1).to_pylist()


# ---------------------------------------------------------------------- t-digest


def _rank_error(values: np.ndarray, estimate: float, q: float) -> float:
    s = np.sort(values)
    lo = np.searchsorted(s, estimate, side="left") / len(s)
    hi = np.searchsorted(s, estimate, side="right") / len(s)
    return 0.0 if lo <= q <= hi else min(abs(lo - q), abs(hi - q))


@pytest.mark.parametrize("dist", ["uniform", "normal", "lognormal", "ties"])
def test_approx_quantile_rank_error_within_one_percent_after_many_merges(dist):
    rng = np.random.default_rng(17)
    n = 200_000
    x = {"uniform": rng.random(n), "normal": rng.normal(size=n),
         "lognormal": rng.lognormal(0, 2, n), "ties": rng.integers(0, 50, n).astype(float)}[dist]
    qs = [0.001, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999]
    ds = ms.from_arrow(pa.table({"x": x}), num_partitions=8)
    row = ds.agg(*[ms.approx_quantile("x", q).alias(f"q{i}") for i, q in enumerate(qs)]) \
        .collect(batch_size=4096)[0]
    for i, q in enumerate(qs):
        err = _rank_error(x, row[f"q{i}"], q)
        assert err <= 0.01, (dist, q, err)
        if q in (0.001, 0.999):
            assert err <= 0.001, (dist, q, err)


def test_approx_quantile_is_exact_on_few_values():
    rng = np.random.default_rng(2)
    x = rng.normal(size=150)
    t = pa.table({"x": x})
    for q in (0.0, 0.2, 0.5, 0.77, 1.0):
        got = ms.from_arrow(t).agg(ms.approx_quantile("x", q).alias("v")).collect()[0]["v"]
        assert got == pytest.approx(float(np.quantile(x, q)), rel=1e-9), q


def test_approx_quantile_per_group_matches_duckdb_within_rank_error():
    rng = np.random.default_rng(4)
    n = 60_000
    t = pa.table({"k": rng.integers(0, 30, n), "x": rng.exponential(10, n)})
    got = ms.from_arrow(t, num_partitions=4).group_by("k").agg(
        ms.approx_quantile("x", 0.9).alias("p90")).collect()
    x, k = t.column("x").to_numpy(), t.column("k").to_numpy()
    for r in got:
        assert _rank_error(x[k == r["k"]], r["p90"], 0.9) <= 0.01


# ---------------------------------------------------------------------- expressions over aggregates


def test_expressions_over_aggregates_match_duckdb():
    rng = np.random.default_rng(8)
    n = 5000
    t = pa.table({"k": rng.integers(0, 7, n), "a": rng.integers(0, 100, n),
                  "b": rng.integers(1, 100, n), "x": rng.normal(size=n)})
    ds = ms.from_arrow(t, num_partitions=3).group_by("k").agg(
        (ms.sum("a") / ms.sum("b")).alias("ratio"), ms.count().alias("n"),
        (ms.max("x") - ms.min("x")).alias("range"),
        (ms.mean("x") * 100).round(2).alias("pct"),
        ms.when(ms.count() > 700, "big").otherwise("small").alias("size"),
        (ms.col("k") * 10 + ms.sum("a") % 7).alias("mixed"),
        ms.sum("a"),
    )
    assert ds.columns == ["k", "ratio", "n", "range", "pct", "size", "mixed", "a"]
    plan = ds.explain(print_plan=False)
    assert "Aggregate" in plan and "Project" in plan
    want = _duck(t, """select k, sum(a) / sum(b), count(*), max(x) - min(x), round(avg(x) * 100, 2),
                       case when count(*) > 700 then 'big' else 'small' end,
                       k * 10 + sum(a) % 7, sum(a) from t group by k""")
    rows = ds.collect()
    assert len(rows) == len(want)
    for r in rows:
        w = want[r["k"]]
        assert r["ratio"] == pytest.approx(w[0])
        assert r["n"] == w[1] and r["size"] == w[4] and r["mixed"] == w[5] and r["a"] == w[6]
        assert r["range"] == pytest.approx(w[2])
        assert r["pct"] == pytest.approx(w[3], abs=0.011)


def test_expressions_over_aggregates_global_and_computed_keys():
    t = pa.table({"t": [1, 2, 3, 4, 5, 6], "v": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]})
    row = ms.from_arrow(t).agg((ms.sum("v") / ms.count()).alias("avg"),
                               (ms.std("v") / ms.mean("v")).alias("cv")).collect()
    assert row[0]["avg"] == 3.5
    assert row[0]["cv"] == pytest.approx(np.std([1, 2, 3, 4, 5, 6], ddof=1) / 3.5)
    even = (ms.col("t") % 2).alias("odd")
    rows = ms.from_arrow(t).group_by(even).agg((ms.col("odd") * 100 + ms.count()).alias("c"),
                                               ms.sum("v")).sort("odd").collect()
    assert rows == [{"odd": 0, "c": 3, "v": 12.0}, {"odd": 1, "c": 103, "v": 9.0}]


def test_equal_aggregates_are_computed_once():
    t = pa.table({"k": [1, 1, 2], "a": [1, 2, 3]})
    ds = ms.from_arrow(t).group_by("k").agg(
        ms.sum("a").alias("s"), (ms.sum("a") * 2).alias("s2"), (ms.sum("a") + 1).alias("s3"))
    text = ds.explain(print_plan=False)
    agg_line = next(line for line in text.splitlines() if "Aggregate keys" in line)
    assert agg_line.count("sum(") == 1
    assert ds.sort("k").collect() == [{"k": 1, "s": 3, "s2": 6, "s3": 4},
                                      {"k": 2, "s": 3, "s2": 6, "s3": 4}]


def test_misuse_of_aggregates_is_reported_when_the_query_is_built():
    t = pa.table({"k": [1], "a": [1], "b": [2]})
    ds = ms.from_arrow(t)
    with pytest.raises(SchemaError, match="outside an aggregate"):
        ds.group_by("k").agg(ms.sum("a") + ms.col("b"))
    with pytest.raises(PlanError, match="do not nest"):
        ms.sum(ms.sum("a"))
    with pytest.raises(PlanError, match="aggregate"):
        ds.select(ms.sum("a") * 2)
    with pytest.raises(PlanError, match="aggregate"):
        ds.group_by("k").agg(ms.col("a") * 2)
    with pytest.raises(PlanError, match="duplicate"):
        ds.group_by("k").agg(ms.sum("a"), ms.sum("a") * 2)
    with pytest.raises(PlanError, match="is an aggregate"):
        ms.sum("a").evaluate(t.to_batches()[0])


# ---------------------------------------------------------------------- streaming windows


def _events(n: int) -> list[dict]:
    return [{"k": f"k{i % 5}", "t": 1_000 * (i // 3) + (i % 7) * 300, "v": (i * 7919) % 101}
            for i in range(n)]


def _windowed(items):
    return (ms.from_items(items, num_partitions=3).with_watermark("t", delay="2s")
            .group_by("k").window(ms.tumbling("10s"), on="t").agg(
                ms.std("v").alias("sd"), ms.median("v").alias("med"),
                ms.approx_count_distinct("v").alias("acd"),
                ms.approx_quantile("v", 0.5).alias("aq"),
                (ms.max("v") - ms.min("v")).alias("range"), ms.count().alias("n")))


def _oracle(items):
    groups: dict = {}
    for r in items:
        start = r["t"] // 10_000 * 10_000
        groups.setdefault((start, r["k"]), []).append(r["v"])
    return groups


def test_new_aggregates_in_streaming_windows_match_batch_and_the_oracle(tmp_path):
    items = _events(3000)
    batch = _windowed(items).collect()
    assert _windowed(items).columns == ["window_start", "window_end", "k", "sd", "med", "acd",
                                        "aq", "range", "n"]
    job = _windowed(items).start(parallelism=2, executor="parallel", max_batch_records=200,
                                 checkpoint_interval="1h")
    assert job.await_termination(120)
    streamed = job.sink.rows()
    oracle = _oracle(items)

    def canon(rows):
        out = {}
        for r in rows:
            start = int(r["window_start"].timestamp() * 1000) if hasattr(
                r["window_start"], "timestamp") else r["window_start"]
            out[(start, r["k"])] = r
        return out

    for rows in (batch, streamed):
        got = canon(rows)
        assert len(got) == len(oracle)
        for key, vals in oracle.items():
            r = got[key]
            v = np.array(vals, dtype=float)
            assert r["n"] == len(vals) and r["range"] == v.max() - v.min()
            assert r["sd"] == pytest.approx(np.std(v, ddof=1) if len(v) > 1 else None)
            assert r["med"] == pytest.approx(np.median(v))
            assert r["acd"] == len(set(vals))
            assert r["aq"] == pytest.approx(np.median(v))


def test_std_and_var_of_a_group_with_nan_or_infinity_are_nan_as_numpy():
    """A NaN or an infinity among a group's values makes its variance NaN (numpy, DuckDB),
    not 0.0 or a huge number, also when partial states from several partitions merge."""
    for vals in ([1.0, float("nan"), 3.0, 4.0], [1.0, float("inf"), 2.0, 5.0]):
        rows = [{"k": 1, "v": v} for v in vals] + [{"k": 2, "v": float(i)} for i in range(4)]
        got = {r["k"]: r for r in ms.from_items(rows, num_partitions=3).group_by("k").agg(
            ms.std("v").alias("s"), ms.var("v", ddof=0).alias("p")).collect()}
        assert math.isnan(got[1]["s"]) and math.isnan(got[1]["p"])
        assert got[2]["p"] == pytest.approx(np.var([0.0, 1.0, 2.0, 3.0]))


def test_mean_of_integers_sums_them_exactly():
    # integer partial sums are exact, then cast: 2**53 + 1 + 1 is not rounded to 2**53 on
    # the way (summed as floats, each + 1 is lost); values whose sum could overflow int64
    # are summed as floats, as before
    t = pa.table({"k": [1, 1, 1, 2, 2, 3, 3], "v": pa.array([2**53, 1, 1, 7, None, -5, 4], pa.int64()),
                  "w": pa.array([1, 2, 3, 4, 5, 6, 7], pa.int32())})
    got = {r["k"]: r for r in ms.from_arrow(t, num_partitions=2).group_by("k")
           .agg(ms.mean("v").alias("v"), ms.mean("w").alias("w")).collect()}
    assert got[1]["v"] == (2**53 + 2) / 3 and got[2]["v"] == 7.0 and got[3]["v"] == -0.5
    assert [got[k]["w"] for k in (1, 2, 3)] == [2.0, 4.5, 6.5]
    core = _AggCore(["k"], [AggSpec("mean", ms.col("v"), "v")])
    big = pa.table({"k": [1, 1], "v": pa.array([2**40, 3 * 2**40], pa.int64())})
    many = pa.concat_tables([big] * 5000)  # 10,000 rows x 3 * 2**40 > 2**53: float sums
    states = core.partial(many)
    assert states.schema.field(core.state_cols[0][0]).type == pa.float64()
    assert core.finalize(core.merge(states)).column("v").to_pylist() == [2.0 * 2**40]
