"""Cardinality and size estimates (plan/stats.py): from Parquet footers, in-memory tables and
ranges, through filters, projections, aggregates, joins, unions and limits."""

from __future__ import annotations

import datetime as dt
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import millstream as ms
from millstream.plan.optimizer import optimize
from millstream.plan.stats import Estimator, estimate

SF1 = "/work/data/sf1"


def est(ds, opt: bool = False):
    node = optimize(ds._node) if opt else ds._node
    return estimate(node)


@pytest.fixture(scope="module")
def pq_path(tmp_path_factory):
    """1000 rows in 4 row groups: x = 0..999 (unique), g = x % 10, s a 3-value string,
    n null in every 4th row."""
    path = str(tmp_path_factory.mktemp("stats") / "t.parquet")
    xs = list(range(1000))
    table = pa.table({"x": xs, "g": [x % 10 for x in xs], "s": [["a", "bb", "ccc"][x % 3] for x in xs],
                      "n": [None if x % 4 == 0 else x for x in xs],
                      "d": [dt.date(2020, 1, 1) + dt.timedelta(days=x % 100) for x in xs]})
    pq.write_table(table, path, row_group_size=250)
    return path


def test_parquet_footer_statistics(pq_path):
    st = ms.read_parquet(pq_path)._node.source.statistics()
    assert st.num_rows == 1000
    x = st.columns["x"]
    assert (x.min, x.max, x.null_count) == (0, 999, 0)
    assert st.columns["n"].null_count == 250
    assert st.columns["d"].min == dt.date(2020, 1, 1)
    assert st.columns["s"].distinct_count == 3  # from the small dictionary pages


def test_scan_estimate_from_parquet(pq_path):
    e = est(ms.read_parquet(pq_path))
    assert e.rows == 1000
    assert e.ndv("x") == 1000 and e.ndv("g") == 10 and e.ndv("d") == 100
    assert e.columns["n"].null_fraction == pytest.approx(0.25)
    assert e.bytes == pytest.approx(e.rows * e.width)
    assert e.width >= 8 + 8 + 8 + 4  # the fixed-width columns at least


def test_filter_selectivity(pq_path):
    ds = ms.read_parquet(pq_path)
    col = ms.col
    assert est(ds.filter(col("x") < 250)).rows == pytest.approx(250, rel=0.05)
    assert est(ds.filter(col("x") >= 900)).rows == pytest.approx(100, rel=0.05)
    assert est(ds.filter(col("x").between(100, 299))).rows == pytest.approx(200, rel=0.05)
    assert est(ds.filter(col("g") == 3)).rows == pytest.approx(100)  # 1/NDV
    assert est(ds.filter(col("g") == 42)).rows == 1  # outside min/max: (at least one row)
    assert est(ds.filter(col("g").is_in([1, 2, 3]))).rows == pytest.approx(300)
    assert est(ds.filter(col("n").is_null())).rows == pytest.approx(250)
    assert est(ds.filter(col("d") < dt.date(2020, 2, 20))).rows == pytest.approx(500, rel=0.05)
    # unknown predicates get default fractions, never more rows than the input
    e = est(ds.filter(col("s").str.contains("b")))
    assert 0 < e.rows < 1000
    # the filter narrows what follows: the group count of g after g == 3 is one
    assert est(ds.filter(col("g") == 3).group_by("g").agg(ms.count().alias("c"))).rows == 1


def test_filters_pushed_into_the_scan_still_count(pq_path):
    ds = ms.read_parquet(pq_path).filter(ms.col("x") < 100)
    node = optimize(ds._node)
    assert "filter=" in node.tree()  # pushed into the scan ...
    assert estimate(node).rows == pytest.approx(100, rel=0.05)  # ... and still applied


def test_in_memory_sources():
    t = pa.table({"k": [i % 7 for i in range(700)], "v": list(range(700))})
    e = est(ms.from_arrow(t))
    assert e.rows == 700 and e.ndv("k") == 7 and e.ndv("v") == 700
    assert est(ms.range(0, 1000, 2)).rows == 500
    assert est(ms.range(0, 1000, 2)).ndv("id") == 500


def test_aggregates_joins_unions_limits():
    a = ms.from_arrow(pa.table({"k": [i % 100 for i in range(10_000)], "x": list(range(10_000))}))
    b = ms.from_arrow(pa.table({"k": list(range(100)), "y": list(range(100))}))
    c = ms.from_arrow(pa.table({"k": [i % 50 for i in range(1000)], "z": list(range(1000))}))
    # groups <= min(rows, product of key NDVs)
    assert est(a.group_by("k").agg(ms.sum("x").alias("s"))).rows == 100
    assert est(a.group_by("k", "x").agg(ms.count().alias("n"))).rows == 10_000
    assert est(a.agg(ms.count().alias("n"))).rows == 1
    assert est(a.select("k").distinct()).rows == 100
    # |L| * |R| / max(NDV): a foreign-key join keeps the many side's rows
    assert est(a.join(b, on="k")).rows == pytest.approx(10_000)
    assert est(a.join(c, on="k")).rows == pytest.approx(10_000 * 1000 / 100)
    # semi and anti joins are bounded by the left side
    semi = est(a.join(c, on="k", how="semi")).rows
    anti = est(a.join(c, on="k", how="anti")).rows
    assert semi == pytest.approx(5000) and anti <= 10_000 and semi <= 10_000
    assert est(a.join(b, on="k", how="left")).rows >= 10_000
    # joined columns: key NDV at most both sides'; others carried (a clash gets the suffix)
    j = est(a.join(c, on="k"))
    assert j.ndv("k") == 50 and "z" in j.columns
    assert "x_right" in est(a.join(a, on="k")).columns
    assert est(a.union(b, c)).rows == 11_100
    assert est(a.limit(10)).rows == 10
    # projections carry statistics through renames; computed columns get widths
    p = est(a.select(ms.col("k").alias("kk"), (ms.col("x") * 2).alias("x2")))
    assert p.ndv("kk") == 100 and p.columns["x2"].ndv is None and p.width > 0


def test_unknown_rows_have_no_estimate():
    a = ms.from_items([{"x": 1}, {"x": 2}])
    assert est(a.flat_map(lambda r: [r, r])) is None
    assert est(a.flat_map(lambda r: [r, r]).group_by("x").agg(ms.count().alias("n"))) is None
    assert est(a.map(lambda r: r)).rows == 2  # a map keeps the row count


def test_estimator_memoizes_per_node():
    e = Estimator()
    node = ms.range(0, 10)._node
    assert e.estimate(node) is e.estimate(node)


@pytest.mark.skipif(not os.path.isdir(SF1), reason="no TPC-H SF1 data")
def test_tpch_sf1_estimates():
    def t(name):
        return ms.read_parquet(os.path.join(SF1, f"{name}.parquet"))

    li, orders, cust = t("lineitem"), t("orders"), t("customer")
    assert est(li).rows == 6_001_215
    shipped = est(li.filter(ms.col("l_shipdate") > dt.date(1995, 3, 15))).rows
    assert 0.4 < shipped / 6_001_215 < 0.65  # true: 0.54
    # lineitem -> orders is a foreign-key join: about lineitem's rows
    assert est(orders.join(li, left_on="o_orderkey", right_on="l_orderkey")).rows == \
        pytest.approx(6_001_215, rel=0.5)
    # the composite foreign key of lineitem into partsupp
    ps = t("partsupp")
    both = est(li.join(ps, left_on=["l_partkey", "l_suppkey"],
                       right_on=["ps_partkey", "ps_suppkey"])).rows
    assert both == pytest.approx(6_001_215, rel=0.5)
    # a low-cardinality string key: few groups (true: 4)
    groups = est(li.group_by("l_returnflag", "l_linestatus").agg(ms.count().alias("n"))).rows
    assert groups < 100
    seg = est(cust.filter(ms.col("c_mktsegment") == "BUILDING")).rows
    assert 10_000 < seg < 60_000  # true: 30k


def _stats(path):
    return ms.read_parquet(path)._node.source.statistics()


def test_footer_statistics_are_read_again_when_a_file_changes(tmp_path, monkeypatch):
    """Settled local files' statistics are cached across scans; a rewrite (another size,
    or the same size with the modification time set back) is seen, and a file changed
    within the settling time is not cached at all (its times may not move on the next
    write)."""
    from millstream.io.files import parquet_footer, parquet_stats

    monkeypatch.setattr(parquet_stats, "_CACHE", {})
    reads = []
    real = parquet_stats._read_statistics
    monkeypatch.setattr(parquet_stats, "_read_statistics",
                        lambda source: reads.append(1) or real(source))
    path = str(tmp_path / "t.parquet")
    pq.write_table(pa.table({"x": [1, 2, 3]}), path)
    assert _stats(path).columns["x"].max == 3 and _stats(path).columns["x"].max == 3
    assert len(reads) == 2  # just written: not cached
    now = parquet_footer._now
    monkeypatch.setattr(parquet_footer, "_now", lambda: now() + 10 * 10**9)  # 10 s later
    assert _stats(path).columns["x"].max == 3 and _stats(path).columns["x"].max == 3
    assert len(reads) == 3  # settled: read once
    size, mtime = os.stat(path).st_size, os.stat(path).st_mtime_ns
    pq.write_table(pa.table({"x": [7, 8, 9]}), path)  # the same size, times set back
    os.utime(path, ns=(mtime, mtime))
    assert os.stat(path).st_size == size
    assert _stats(path).columns["x"].max == 9  # (the change time moved)
    pq.write_table(pa.table({"x": list(range(100))}), path)  # another size
    assert _stats(path).num_rows == 100
    assert len(reads) == 5
