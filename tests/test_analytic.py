"""Analytic window functions (``f(...).over(...)``) checked against DuckDB's ``OVER (...)``.

Random data with nulls and ties (hypothesis) for every function and frame kind; several
partitions and layouts; functions sharing a partitioning share one shuffle; a partition
larger than the memory budget spills and stays exact; ``Dataset.schema`` equals the
result's; explain shows the Window node; streaming jobs refuse window functions clearly.
The session (two workers) comes from ``conftest.py``.
"""

from __future__ import annotations

import datetime as dt
import math
from decimal import Decimal

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracles import duckdb_connect

import millstream as ms
from millstream.core.context import TaskContext
from millstream.expr.analytic import Frame
from millstream.ops.analytic import AnalyticWindow
from millstream.ops.analytic.kernels import range_reduce


# ----------------------------------------------------------------------------- helpers
def duck(query: str, **tables: pa.Table) -> pa.Table:
    con = duckdb_connect()
    try:
        for name, t in tables.items():
            con.register(name, t)
        return con.sql(query).to_arrow_table()
    finally:
        con.close()


def close(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, float) or isinstance(b, float):
        a, b = float(a), float(b)
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    return a == b


def check_columns(got: pa.Table, want: pa.Table, columns: list[str], key: str = "id") -> None:
    """Columns equal row by row, rows matched by ``key``."""
    assert got.num_rows == want.num_rows
    g, w = got.sort_by(key), want.sort_by(key)
    for c in columns:
        gv, wv = g.column(c).to_pylist(), w.column(c).to_pylist()
        bad = [(i, x, y) for i, (x, y) in enumerate(zip(gv, wv)) if not close(x, y)]
        assert not bad, f"column {c}: first differences (row, got, want) {bad[:5]}"


def spills() -> int:
    return ms.last_job_stats().counters.get(("millstream", "spills"), 0)


def sql_bound(b, start: bool) -> str:
    if b is None:
        return "UNBOUNDED PRECEDING" if start else "UNBOUNDED FOLLOWING"
    if isinstance(b, dt.timedelta):
        micros = abs(b) // dt.timedelta(microseconds=1)
        text = f"INTERVAL {micros} MICROSECONDS"
        return "CURRENT ROW" if not micros else \
            f"{text} {'PRECEDING' if b < dt.timedelta(0) else 'FOLLOWING'}"
    if b == 0:
        return "CURRENT ROW"
    return f"{abs(b)} {'PRECEDING' if b < 0 else 'FOLLOWING'}"


def sql_over(partition: list[str], order: list[str], desc: bool, nulls_last: bool | None,
             frame: Frame | None) -> str:
    parts = []
    if partition:
        parts.append("PARTITION BY " + ", ".join(partition))
    if order:
        last = desc if nulls_last is None else nulls_last
        parts.append("ORDER BY " + ", ".join(
            f"{c} {'DESC' if desc else 'ASC'} NULLS {'LAST' if last else 'FIRST'}" for c in order))
    if frame is not None:
        parts.append(f"{frame.kind.upper()} BETWEEN {sql_bound(frame.start, True)} AND "
                     f"{sql_bound(frame.end, False)}")
    return "OVER (" + " ".join(parts) + ")"


# ----------------------------------------------------------------------------- random cases
# (name, millstream function of the value column, SQL text, needs a total order, framed)
def _cases(vcol: str):
    return {
        "row_number": (lambda: ms.row_number(), "row_number()", True, False),
        "rank": (lambda: ms.rank(), "rank()", False, False),
        "dense_rank": (lambda: ms.dense_rank(), "dense_rank()", False, False),
        "percent_rank": (lambda: ms.percent_rank(), "percent_rank()", False, False),
        "cume_dist": (lambda: ms.cume_dist(), "cume_dist()", False, False),
        "ntile": (lambda: ms.ntile(3), "ntile(3)", True, False),
        "lag": (lambda: ms.lag(vcol), f"lag({vcol})", True, False),
        "lag2": (lambda: ms.lag(vcol, 2, default=-1), f"lag({vcol}, 2, -1)", True, False),
        "lead": (lambda: ms.lead(vcol), f"lead({vcol})", True, False),
        "lead3": (lambda: ms.lead(vcol, 3), f"lead({vcol}, 3)", True, False),
        "sum": (lambda: ms.col(vcol).sum(), f"sum({vcol})", False, True),
        "mean": (lambda: ms.mean(vcol), f"avg({vcol})", False, True),
        "min": (lambda: ms.min(vcol), f"min({vcol})", False, True),
        "max": (lambda: ms.col(vcol).max(), f"max({vcol})", False, True),
        "count": (lambda: ms.count(vcol), f"count({vcol})", False, True),
        "count_all": (lambda: ms.count(), "count(*)", False, True),
        "first_value": (lambda: ms.first_value(vcol), f"first_value({vcol})", True, True),
        "last_value": (lambda: ms.last_value(vcol), f"last_value({vcol})", True, True),
        "first_nn": (lambda: ms.first_value(vcol, ignore_nulls=True),
                     f"first_value({vcol} IGNORE NULLS)", True, True),
        "last_nn": (lambda: ms.last_value(vcol, ignore_nulls=True),
                    f"last_value({vcol} IGNORE NULLS)", True, True),
        "nth_value": (lambda: ms.nth_value(vcol, 2), f"nth_value({vcol}, 2)", True, True),
    }


CASES = _cases("v")
bound = st.one_of(st.none(), st.integers(-3, 3))


@st.composite
def frames(draw, allow_range: bool):
    kind = draw(st.sampled_from(["default", "rows"] + (["range"] if allow_range else [])))
    if kind == "default":
        return None
    start, end = draw(bound), draw(bound)
    if start is not None and end is not None and start > end:
        start, end = end, start
    return ms.rows(start, end) if kind == "rows" else ms.range_between(start, end)


@st.composite
def tables(draw):
    n = draw(st.integers(0, 60))
    k = draw(st.lists(st.one_of(st.none(), st.integers(0, 3)), min_size=n, max_size=n))
    o = draw(st.lists(st.one_of(st.none(), st.integers(-4, 4)), min_size=n, max_size=n))
    floats = draw(st.booleans())
    val = st.integers(-50, 50).map(lambda x: x / 4) if floats else st.integers(-1000, 1000)
    v = draw(st.lists(st.one_of(st.none(), val), min_size=n, max_size=n))
    return pa.table({"id": pa.array(range(n), pa.int64()), "k": pa.array(k, pa.int64()),
                     "o": pa.array(o, pa.int64()),
                     "v": pa.array(v, pa.float64() if floats else pa.int64())})


@st.composite
def window_cases(draw):
    picks = draw(st.lists(st.sampled_from(sorted(CASES)), min_size=1, max_size=5))
    out = []
    for name in picks:
        make, text, total, framed = CASES[name]
        partition = draw(st.sampled_from([["k"], [], ["k", "o"]]))
        desc = draw(st.booleans())
        nulls_last = draw(st.sampled_from([None, True, False]))
        frame = draw(frames(allow_range=not total)) if framed else None
        order = ["o", "id"] if total or (frame is not None and frame.kind == "rows") else ["o"]
        if not framed and not total and draw(st.booleans()):
            order = []  # ranking without order: every row is a peer
        out.append((name, make, text, partition, order, desc, nulls_last, frame))
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=tables(), cases=window_cases(), parts=st.integers(1, 3))
def test_every_function_and_frame_against_duckdb(data, cases, parts):
    exprs, selects = [], []
    for i, (name, make, text, partition, order, desc, nulls_last, frame) in enumerate(cases):
        out = f"w{i}_{name}"
        exprs.append(make().over(partition_by=partition, order_by=order, descending=desc,
                                 nulls_last=nulls_last, frame=frame).alias(out))
        selects.append(f"{text} {sql_over(partition, order, desc, nulls_last, frame)} AS {out}")
    ds = ms.from_arrow(data, num_partitions=parts).with_columns(*exprs)
    got = ds.to_arrow(shuffle_partitions=parts + 1)
    assert got.schema == ds.schema
    want = duck(f"SELECT id, {', '.join(selects)} FROM data", data=data)
    check_columns(got, want, [f"w{i}_{c[0]}" for i, c in enumerate(cases)])


# ----------------------------------------------------------------------------- layouts
def _mixed(n: int, seed: int, keys: int = 50) -> pa.Table:
    rng = np.random.default_rng(seed)
    k = rng.integers(0, keys, n).astype(object)
    k[rng.random(n) < 0.05] = None
    o = rng.integers(0, 30, n).astype(object)
    o[rng.random(n) < 0.05] = None
    v = rng.integers(-100, 100, n).astype(object)
    v[rng.random(n) < 0.1] = None
    return pa.table({"id": np.arange(n), "k": pa.array(list(k), pa.int64()),
                     "o": pa.array(list(o), pa.int64()), "v": pa.array(list(v), pa.int64()),
                     "f": rng.normal(0, 1e3, n), "s": [f"s{x}" for x in rng.integers(0, 99, n)]})


MIXED = _mixed(20_000, 3)
LAYOUT_EXPRS = [
    (ms.row_number().over(partition_by="k", order_by=["o", "id"]).alias("rn"),
     "row_number() OVER (PARTITION BY k ORDER BY o NULLS FIRST, id) AS rn"),
    (ms.rank().over(partition_by="k", order_by="o", descending=True).alias("rk"),
     "rank() OVER (PARTITION BY k ORDER BY o DESC NULLS LAST) AS rk"),
    (ms.sum("v").over(partition_by="k", order_by="o").alias("run"),
     "sum(v) OVER (PARTITION BY k ORDER BY o NULLS FIRST) AS run"),
    (ms.col("f").sum().over(partition_by="k", order_by=["o", "id"], frame=ms.rows(-5, 5)).alias("fs"),
     "sum(f) OVER (PARTITION BY k ORDER BY o NULLS FIRST, id ROWS BETWEEN 5 PRECEDING AND 5 FOLLOWING) AS fs"),
    (ms.max("s").over(partition_by="k", order_by="o", frame=ms.range_between(-3, 2)).alias("ms"),
     "max(s) OVER (PARTITION BY k ORDER BY o NULLS FIRST RANGE BETWEEN 3 PRECEDING AND 2 FOLLOWING) AS ms"),
    (ms.lead("v", 2).over(partition_by="k", order_by=["o", "id"]).alias("ld"),
     "lead(v, 2) OVER (PARTITION BY k ORDER BY o NULLS FIRST, id) AS ld"),
    (ms.mean("f").over("k").alias("avg_all"), "avg(f) OVER (PARTITION BY k) AS avg_all"),
]


@pytest.mark.parametrize("parts,shuffle", [(1, 1), (3, 2), (4, 5)])
def test_results_do_not_depend_on_the_layout(parts, shuffle):
    ds = ms.from_arrow(MIXED, num_partitions=parts).with_columns(*[e for e, _ in LAYOUT_EXPRS])
    got = ds.to_arrow(shuffle_partitions=shuffle, batch_size=1000)
    want = duck(f"SELECT id, {', '.join(s for _, s in LAYOUT_EXPRS)} FROM t", t=MIXED)
    check_columns(got, want, ["rn", "rk", "run", "fs", "ms", "ld", "avg_all"])
    assert ms.last_job_stats().stages[-1]["tasks"] == shuffle


def test_no_partition_keys_is_one_partition():
    ds = ms.from_arrow(MIXED, num_partitions=3).select(
        "id", ms.row_number().over(order_by="id").alias("rn"),
        ms.sum("v").over(order_by="id", frame=ms.rows(None, 0)).alias("run"),
        ms.count().over().alias("n"))
    got = ds.to_arrow(shuffle_partitions=4)
    want = duck("SELECT id, row_number() OVER (ORDER BY id) AS rn, sum(v) OVER (ORDER BY id "
                "ROWS UNBOUNDED PRECEDING) AS run, count(*) OVER () AS n FROM t", t=MIXED)
    check_columns(got, want, ["rn", "run", "n"])
    assert got.column_names == ["id", "rn", "run", "n"]


# ----------------------------------------------------------------------------- sharing
def test_functions_with_one_partitioning_share_one_shuffle():
    ds = ms.from_arrow(MIXED, num_partitions=2).with_columns(
        ms.row_number().over("k", order_by=["o", "id"]).alias("rn"),
        ms.sum("v").over("k", order_by=["o", "id"]).alias("run"),   # same sort as rn
        ms.rank().over("k", order_by="f").alias("rf"),             # same shuffle, own sort
        ms.count().over("s").alias("per_s"))                       # another partitioning
    text = ds.explain(print_plan=False)
    physical = text.split("== Physical plan ==")[1]
    assert physical.count("window partition exchange") == 2
    assert physical.count("-> Window partition_by=['k']") == 2  # two sorts after one shuffle
    # a later with_columns over the same partition keys reuses the partitioning
    more = ds.filter(ms.col("rn") > 1).with_columns(
        ms.lag("v").over("s", order_by="id").alias("prev"))
    assert more.explain(print_plan=False).split("== Physical plan ==")[1].count(
        "window partition exchange") == 2
    got = more.to_arrow()
    want = duck("""SELECT * FROM (SELECT *, row_number() OVER (PARTITION BY k ORDER BY o NULLS FIRST, id) AS rn,
        sum(v) OVER (PARTITION BY k ORDER BY o NULLS FIRST, id) AS run,
        rank() OVER (PARTITION BY k ORDER BY f) AS rf, count(*) OVER (PARTITION BY s) AS per_s
        FROM t) WHERE rn > 1""", t=MIXED)
    check_columns(got, want, ["rn", "run", "rf", "per_s"])
    prev = duck("SELECT id, lag(v) OVER (PARTITION BY s ORDER BY id) AS prev FROM w", w=want)
    check_columns(got, prev, ["prev"])


def test_reuse_is_refused_when_a_key_column_changes():
    ds = ms.from_arrow(MIXED).with_columns(ms.rank().over("k", order_by="o").alias("r"))
    again = ds.with_columns((ms.col("k") + 1).alias("k")).with_columns(
        ms.rank().over("k", order_by="o").alias("r2"))
    phys = again.explain(print_plan=False).split("== Physical plan ==")[1]
    assert phys.count("window partition exchange") == 2


# ----------------------------------------------------------------------------- expressions
def test_window_expressions_inside_expressions_and_with_plain_columns():
    ds = ms.from_arrow(MIXED, num_partitions=2)
    got = ds.select(
        "id",
        (ms.col("v") - ms.mean("v").over("k")).alias("dev"),
        ms.when(ms.row_number().over("k", order_by="id") == 1, "first").otherwise("rest").alias("pos"),
        ms.lag("v").over(ms.col("k") % 2, order_by=ms.col("id") * -1).alias("lg"),
    ).to_arrow()
    assert got.column_names == ["id", "dev", "pos", "lg"]
    want = duck("""SELECT id, v - avg(v) OVER (PARTITION BY k) AS dev,
        CASE WHEN row_number() OVER (PARTITION BY k ORDER BY id) = 1 THEN 'first' ELSE 'rest' END AS pos,
        lag(v) OVER (PARTITION BY k % 2 ORDER BY id * -1) AS lg FROM t""", t=MIXED)
    check_columns(got, want, ["dev", "pos", "lg"])
    # with_columns: mixed with a plain expression, replacing a column the window reads
    ds2 = ds.with_columns((ms.col("v") * 2).alias("v2"),
                          ms.sum("v").over("k").alias("v"))
    got2 = ds2.to_arrow()
    assert got2.column_names == [*MIXED.column_names, "v2"]
    assert got2.schema == ds2.schema
    want2 = duck("SELECT id, v * 2 AS v2, sum(v) OVER (PARTITION BY k) AS v FROM t", t=MIXED)
    check_columns(got2, want2, ["v2", "v"])


def test_filter_on_a_window_function_is_qualify():
    ds = ms.from_arrow(MIXED, num_partitions=2)
    top = ds.filter(ms.row_number().over("k", order_by=["v", "id"], descending=True) <= 3)
    got = top.to_arrow()
    assert got.schema == ds.schema == top.schema
    want = duck("SELECT * FROM t QUALIFY row_number() OVER (PARTITION BY k ORDER BY v DESC "
                "NULLS LAST, id DESC) <= 3", t=MIXED)
    check_columns(got, want, MIXED.column_names)


def test_errors_are_plan_errors_when_the_query_is_built():
    ds = ms.from_arrow(MIXED)
    with pytest.raises(ms.PlanError, match="over"):
        ds.with_columns(ms.row_number())
    with pytest.raises(ms.PlanError, match="over"):
        ds.select(ms.sum("v"))
    with pytest.raises(ms.PlanError, match="exactly one order key"):
        ms.sum("v").over("k", order_by=["o", "id"], frame=ms.range_between(-1, 1))
    with pytest.raises(ms.PlanError, match="frame"):
        ms.rank().over("k", order_by="o", frame=ms.rows(-1, 1))
    with pytest.raises(ms.PlanError, match="ROWS frame bound"):
        ms.rows(-1.5, 0)
    with pytest.raises(ms.PlanError, match="not a window function"):
        ms.collect_list("v").over("k")
    with pytest.raises(ms.SchemaError, match="nope"):
        _ = ds.with_columns(ms.rank().over("nope", order_by="o").alias("r")).schema
    with pytest.raises(ms.SchemaError, match="nope"):
        _ = ds.with_columns(ms.rank().over("k", order_by="nope").alias("r")).schema
    with pytest.raises(ms.SchemaError, match="numeric or temporal"):
        _ = ds.with_columns(ms.sum("v").over("k", order_by="s",
                                             frame=ms.range_between(-1, 0))).schema
    with pytest.raises(ms.SchemaError, match="not numeric"):
        _ = ds.with_columns(ms.mean("s").over("k").alias("m")).schema


# ----------------------------------------------------------------------------- types
def test_types_and_schema_match_the_result():
    n = 400
    rng = np.random.default_rng(5)
    base = dt.datetime(2024, 1, 1)
    ts = [base + dt.timedelta(minutes=int(m)) for m in rng.integers(0, 600, n)]
    t = pa.table({
        "id": np.arange(n),
        "k": pa.array([f"key{i % 7}" for i in range(n)], pa.string()),
        "ts": pa.array(ts, pa.timestamp("us")),
        "d": pa.array([x.date() for x in ts], pa.date32()),
        "price": pa.array([Decimal(int(x)) / 100 for x in rng.integers(0, 10**6, n)],
                          pa.decimal128(15, 2)),
        "s": pa.array([None if i % 11 == 0 else f"s{x}" for i, x in
                       enumerate(rng.integers(0, 50, n))], pa.string()),
        "b": pa.array([bool(x) for x in rng.integers(0, 2, n)]),
        "small": pa.array(rng.integers(-100, 100, n), pa.int32()),
    })
    hour = dt.timedelta(hours=1)
    ds = ms.from_arrow(t, num_partitions=2).with_columns(
        ms.sum("price").over("k", order_by="ts", frame=ms.range_between(-hour, 0)).alias("p1h"),
        ms.mean("price").over("k").alias("pmean"),
        ms.count().over("k", order_by="ts", frame=ms.range_between("-30m", "30m")).alias("n1h"),
        ms.min("s").over("k", order_by=["ts", "id"], frame=ms.rows(-3, 3)).alias("smin"),
        ms.max("ts").over("k", order_by="d", frame=ms.range_between(-1, 0)).alias("tsmax"),
        ms.lag("d", 1, default=dt.date(2000, 1, 1)).over("k", order_by=["ts", "id"]).alias("dprev"),
        ms.first_value("k").over(order_by="id").alias("k0"),
        ms.sum("small").over("k", order_by=["ts", "id"]).alias("ssum"),
        ms.max("b").over("k").alias("bmax"),
        ms.percent_rank().over("k", order_by="price").alias("pr"),
    )
    got = ds.to_arrow()
    for a, b in zip(got.schema, ds.schema):
        assert a == b, (a, b)
    assert got.schema == ds.schema
    assert got.schema.field("p1h").type == pa.decimal128(38, 2)
    want = duck("""SELECT id,
        sum(price) OVER (PARTITION BY k ORDER BY ts RANGE BETWEEN INTERVAL 1 HOUR PRECEDING AND CURRENT ROW) AS p1h,
        avg(price) OVER (PARTITION BY k) AS pmean,
        count(*) OVER (PARTITION BY k ORDER BY ts RANGE BETWEEN INTERVAL 30 MINUTE PRECEDING AND INTERVAL 30 MINUTE FOLLOWING) AS n1h,
        min(s) OVER (PARTITION BY k ORDER BY ts, id ROWS BETWEEN 3 PRECEDING AND 3 FOLLOWING) AS smin,
        max(ts) OVER (PARTITION BY k ORDER BY d RANGE BETWEEN 1 PRECEDING AND CURRENT ROW) AS tsmax,
        lag(d, 1, DATE '2000-01-01') OVER (PARTITION BY k ORDER BY ts, id) AS dprev,
        first_value(k) OVER (ORDER BY id) AS k0,
        sum(small) OVER (PARTITION BY k ORDER BY ts, id) AS ssum,
        max(b) OVER (PARTITION BY k) AS bmax,
        percent_rank() OVER (PARTITION BY k ORDER BY price) AS pr FROM t""", t=t)
    check_columns(got, want, ["p1h", "pmean", "n1h", "smin", "tsmax", "dprev", "k0", "ssum",
                              "bmax", "pr"])


def test_nan_decimals_and_float_order_keys():
    """NaN is the largest number (min/max, order keys: its own peer group, outside every
    other row's RANGE frame); decimal sums stay exact, also beyond 18 digits."""
    rng = np.random.default_rng(13)
    n = 300
    f = rng.integers(-20, 20, n) / 4
    f[rng.random(n) < 0.1] = np.nan
    fo = rng.integers(-10, 10, n) / 2
    fo[rng.random(n) < 0.1] = np.nan
    t = pa.table({
        "id": np.arange(n), "k": rng.integers(0, 3, n),
        "f": pa.array(f, mask=rng.random(n) < 0.1),
        "fo": pa.array(fo, mask=rng.random(n) < 0.1),
        "d": pa.array([None if i % 9 == 0 else Decimal(int(x)) / 100
                       for i, x in enumerate(rng.integers(-10**6, 10**6, n))], pa.decimal128(15, 2)),
        "w": pa.array([Decimal(int(x)) * 10**25 + 1 for x in rng.integers(-999, 999, n)],
                      pa.decimal128(38, 0)),
    })
    for desc in (False, True):
        ds = ms.from_arrow(t, num_partitions=2).with_columns(
            ms.min("f").over("k", order_by=["id"], frame=ms.rows(-3, 3)).alias("fmin"),
            ms.max("f").over("k", order_by=["id"], frame=ms.rows(-3, 3)).alias("fmax"),
            ms.sum("d").over("k", order_by="fo", descending=desc,
                             frame=ms.range_between(-1.5, 0.5)).alias("dsum"),
            ms.count().over("k", order_by="fo", descending=desc,
                            frame=ms.range_between(None, -0.5)).alias("before"),
            ms.sum("w").over("k", order_by="id", frame=ms.rows(-2, 2)).alias("wsum"),
            ms.mean("d").over("k", order_by="id").alias("dmean"),
        )
        got = ds.to_arrow()
        assert got.schema == ds.schema
        o = sql_over(["k"], ["fo"], desc, None, None)[:-1]
        want = duck(f"""SELECT id,
            min(f) OVER (PARTITION BY k ORDER BY id ROWS BETWEEN 3 PRECEDING AND 3 FOLLOWING) AS fmin,
            max(f) OVER (PARTITION BY k ORDER BY id ROWS BETWEEN 3 PRECEDING AND 3 FOLLOWING) AS fmax,
            sum(d) {o} RANGE BETWEEN 1.5 PRECEDING AND 0.5 FOLLOWING) AS dsum,
            count(*) {o} RANGE BETWEEN UNBOUNDED PRECEDING AND 0.5 PRECEDING) AS before,
            sum(w) OVER (PARTITION BY k ORDER BY id ROWS BETWEEN 2 PRECEDING AND 2 FOLLOWING) AS wsum,
            avg(d) OVER (PARTITION BY k ORDER BY id) AS dmean FROM t""", t=t)
        check_columns(got, want, ["fmin", "fmax", "dsum", "before", "wsum", "dmean"])


def test_float_frames_keep_small_values_next_to_huge_ones():
    """Sliding sums are not differences of running totals (which would lose the 1.0s)."""
    v = [1e20, 1.0, 1.0, 1.0, -1e20, 1.0, 1.0]
    t = pa.table({"id": list(range(len(v))), "v": v})
    got = ms.from_arrow(t).with_columns(
        ms.sum("v").over(order_by="id", frame=ms.rows(0, 1)).alias("s")).to_arrow()
    assert got.sort_by("id").column("s").to_pylist() == [1e20, 2.0, 2.0, -1e20 + 1, -1e20, 2.0, 1.0]


def test_range_reduce_matches_a_loop():
    rng = np.random.default_rng(9)
    vals = rng.integers(-50, 50, 500)
    lo = rng.integers(0, 500, 500)
    hi = np.minimum(500, lo + rng.integers(0, 80, 500))
    for op, ident, py in ((np.add, 0, sum), (np.minimum, 10**9, min), (np.maximum, -10**9, max)):
        got = range_reduce(vals, lo, hi, op, ident)
        want = [py(vals[a:b].tolist(), start=0) if py is sum else
                (py(vals[a:b].tolist()) if b > a else ident) for a, b in zip(lo, hi)]
        assert got.tolist() == want


# ----------------------------------------------------------------------------- memory
SPILL_N = 300_000


@pytest.fixture(scope="module")
def one_big_partition():
    rng = np.random.default_rng(21)
    k = rng.integers(0, 3, SPILL_N)
    k[rng.random(SPILL_N) < 0.8] = 1  # one partition of ~250k rows
    return pa.table({"id": np.arange(SPILL_N), "k": k, "o": rng.integers(0, 5000, SPILL_N),
                     "v": rng.integers(-1000, 1000, SPILL_N),
                     "pad": pa.array([f"padding-{i % 977}-{i}" for i in range(SPILL_N)])})


def test_a_partition_larger_than_the_memory_budget_spills_and_stays_exact(one_big_partition):
    t = one_big_partition
    ds = ms.from_arrow(t, num_partitions=2).with_columns(
        ms.row_number().over("k", order_by=["o", "id"]).alias("rn"),
        ms.sum("v").over("k", order_by="o").alias("run"),
        ms.lag("v", 3).over("k", order_by=["o", "id"]).alias("lg"),
        ms.max("v").over("k", order_by="o", frame=ms.range_between(-10, 10)).alias("mx"),
        ms.dense_rank().over("k", order_by="o").alias("dr"),
    )
    got = ds.to_arrow(memory_limit="16MB", shuffle_partitions=2)
    assert spills() > 0
    assert got.schema == ds.schema
    want = duck("""SELECT id, row_number() OVER (PARTITION BY k ORDER BY o, id) AS rn,
        sum(v) OVER (PARTITION BY k ORDER BY o) AS run,
        lag(v, 3) OVER (PARTITION BY k ORDER BY o, id) AS lg,
        max(v) OVER (PARTITION BY k ORDER BY o RANGE BETWEEN 10 PRECEDING AND 10 FOLLOWING) AS mx,
        dense_rank() OVER (PARTITION BY k ORDER BY o) AS dr FROM t""", t=t)
    check_columns(got, want, ["rn", "run", "lg", "mx", "dr"])
    assert got.column("pad").to_pylist()[:3] == \
        t.take(got.column("id").slice(0, 3)).column("pad").to_pylist()


def test_operator_spills_one_partition_through_a_file():
    """The operator alone, with a tiny budget: the one partition goes through a spill file,
    its function inputs stay in memory, and the rows come back whole and in order."""
    n = 50_000
    t = pa.table({"id": np.arange(n), "v": np.arange(n) % 7,
                  "pad": pa.array([f"{i:020d}" for i in range(n)])})
    fn = ms.sum("v").over(order_by="id", frame=ms.rows(-1, 1)).resolve("s", ["id"])
    op = AnalyticWindow([], [fn])
    ctx = TaskContext(memory_budget=1 << 20, batch_size=4096)
    op.open(ctx)
    out = []
    for b in t.to_batches(max_chunksize=5000):
        out += list(op.process(b))
    out += list(op.finish())
    op.close()
    assert ctx.counters.get(("millstream", "spills"), 0) >= 2  # the sort and the partition
    res = pa.Table.from_batches(out)
    v = np.arange(n) % 7
    want = v + np.append(v[1:], 0) + np.append(0, v[:-1])
    assert res.column("id").to_pylist() == list(range(n))
    assert res.column("s").to_pylist() == want.tolist()
    assert res.column("pad").to_pylist()[-1] == f"{n - 1:020d}"


# ----------------------------------------------------------------------------- plans
def test_explain_shows_the_window_node_and_empty_inputs_keep_the_schema():
    ds = ms.from_arrow(MIXED).with_columns(ms.rank().over("k", order_by="o").alias("r"))
    text = ds.explain(print_plan=False)
    assert "Window partition_by=['k'] [rank() over (order by o) as \"r\"]" in text
    assert "window partition exchange" in text
    empty = ms.from_arrow(MIXED.slice(0, 0)).with_columns(
        ms.rank().over("k", order_by="o").alias("r"), ms.sum("f").over("k").alias("sf"))
    got = empty.to_arrow()
    assert got.num_rows == 0 and got.schema == empty.schema


def test_a_streaming_job_refuses_window_functions():
    schema = pa.schema([("k", pa.int64()), ("v", pa.int64())])
    ds = ms.from_generator(lambda i: {"k": i % 3, "v": i}, schema=schema).with_columns(
        ms.row_number().over("k", order_by="v").alias("rn"))
    assert ds.schema.names == ["k", "v", "rn"]
    with pytest.raises(ms.PlanError, match="Window"):
        ds.start()


def test_with_columns_keeps_the_order_of_the_expressions():
    ds = ms.from_arrow(MIXED).with_columns(
        ms.count().over("k").alias("a"), ms.count().over("s").alias("b"),
        ms.rank().over("k", order_by="o").alias("c"), ms.count().over("k").alias("d"))
    got = ds.to_arrow()
    assert got.column_names == [*MIXED.column_names, "a", "b", "c", "d"]
    assert got.schema == ds.schema
    want = duck("SELECT id, count(*) OVER (PARTITION BY k) AS a, count(*) OVER (PARTITION BY s) "
                "AS b, rank() OVER (PARTITION BY k ORDER BY o NULLS FIRST) AS c FROM t", t=MIXED)
    check_columns(got, want, ["a", "b", "c"])
    assert got.column("a").to_pylist() == got.column("d").to_pylist()
