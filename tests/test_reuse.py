"""Common sub-plan reuse (plan/rules/reuse.py, the planner, the streaming layout) and a sort
that reads its input once: a sub-plan used twice runs once, in batch and in streaming;
results equal DuckDB's."""

from __future__ import annotations

import datetime as dt
import os

import pyarrow as pa
import pytest
from oracles import duckdb_connect

import millstream as ms
from millstream.plan import logical as L
from millstream.plan.fingerprint import Fingerprints
from millstream.plan.optimizer import optimize, optimize_traced

col = ms.col


def sql(query: str, **tables: pa.Table) -> list[tuple]:
    con = duckdb_connect()
    try:
        for name, t in tables.items():
            con.register(name, t)
        return sorted(con.sql(query).fetchall())
    finally:
        con.close()


def tuples(rows: list[dict], cols: list[str]) -> list[tuple]:
    return sorted(tuple(r[c] for c in cols) for r in rows)


def counted(path: str, fn):
    """``fn`` that also counts its calls in a file (tasks run in worker processes)."""
    def wrapped(*args):
        with open(path, "a") as f:
            f.write(".")
        return fn(*args)
    return wrapped


def calls(path: str) -> int:
    return os.path.getsize(path) if os.path.exists(path) else 0


def purposes() -> list[str]:
    return [s["purpose"] for s in ms.last_job_stats().stages]


# ----------------------------------------------------------------------------- fingerprints

def test_fingerprints_equal_subplans_built_apart(tmp_path):
    path = str(tmp_path / "t.parquet")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"k": [1, 2, 3], "v": [4, 5, 6]}), path)

    def agg(ds):
        return ds.filter(col("v") > 4).group_by("k").agg(ms.sum("v").alias("s"))

    fps = Fingerprints()
    a, b = agg(ms.read_parquet(path)), agg(ms.read_parquet(path))
    assert a._node is not b._node and fps.of(a._node) == fps.of(b._node)
    # different parameters, different functions, different caches: not equal
    assert fps.of(agg(ms.read_parquet(path, columns=["k", "v"]))._node) != fps.of(a._node)
    f1, f2 = (lambda r: r), (lambda r: r)
    src = ms.read_parquet(path)
    assert fps.of(src.map(f1)._node) == fps.of(src.map(f1)._node)
    assert fps.of(src.map(f1)._node) != fps.of(src.map(f2)._node)
    assert fps.of(src.cache()._node) != fps.of(src.cache()._node)
    assert fps.of(src.filter(col("v") > 4)._node) != fps.of(src.filter(col("v") > 5)._node)
    assert fps.of(src.filter(col("v") > 4)._node) != fps.of(src.filter(col("v") > 4.0)._node)


def test_rule_marks_subplans_used_twice():
    base = ms.range(0, 1000).with_columns((col("id") % 7).alias("k"))
    agg = base.group_by("k").agg(ms.count().alias("n"))
    q = agg.join(agg.agg(ms.max("n").alias("m")), left_on="n", right_on="m")
    node, fired = optimize_traced(q._node)
    assert "reuse_subplans" in fired
    shared = [n for n in _walk(node) if isinstance(n, L.Shared)]
    assert shared and all(s is shared[0] for s in shared) and shared[0].uses == 2
    assert optimize(node) is node or "Shared" in optimize(node).tree()  # a fixed point
    assert "Shared #1 (used 2 times)" in q.explain(print_plan=False)


def _walk(node):
    out = [node]
    for c in node.children:
        out.extend(_walk(c))
    return out


# ----------------------------------------------------------------------------- batch

def test_batch_subplan_runs_once(tmp_path):
    """A generator-fed aggregate used by both sides of a join (TPC-H Q15's shape: a view
    joined with its own maximum): the generator runs once per row, not twice."""
    path = str(tmp_path / "calls")
    gen = counted(path, lambda i: {"k": i % 10, "v": i})
    revenue = ms.from_generator(gen, count=1000, partitions=2) \
        .group_by("k").agg(ms.sum("v").alias("total"))
    best = revenue.agg(ms.max("total").alias("top"))
    got = revenue.join(best, left_on="total", right_on="top").collect()
    assert calls(path) == 1000
    assert [(r["k"], r["total"]) for r in got] == [(9, sum(range(9, 1000, 10)))]
    assert sum("shared sub-plan" in p for p in purposes()) == 1
    # the view's map side and the maximum's: not the view's twice
    assert sum(p == "group-by map side" for p in purposes()) == 2


def test_batch_subplan_equal_to_duckdb():
    t = pa.table({"g": [i % 13 for i in range(5000)], "x": [i % 101 for i in range(5000)],
                  "y": [float(i % 17) for i in range(5000)]})
    ds = ms.from_arrow(t, num_partitions=3)
    per_g = ds.group_by("g").agg(ms.sum("x").alias("sx"), ms.mean("y").alias("my"))
    avg = per_g.agg(ms.mean("sx").alias("avg_sx"))
    one = ms.lit(1).alias("one")
    above = per_g.with_columns(one).join(avg.with_columns(one), on="one") \
        .filter(col("sx") > col("avg_sx"))
    got = above.collect()
    assert sum("shared sub-plan" in p for p in purposes()) == 1
    want = sql("WITH p AS (SELECT g, sum(x) AS sx, avg(y) AS my FROM t GROUP BY g) "
               "SELECT g, sx FROM p, (SELECT avg(sx) AS a FROM p) WHERE sx > a", t=t)
    assert tuples(got, ["g", "sx"]) == want


def test_cheap_shared_scan_is_read_again_not_materialized():
    t = pa.table({"k": list(range(100)), "v": list(range(100))})
    ds = ms.from_arrow(t)
    q = ds.filter(col("k") < 10).union(ds.filter(col("k") >= 90))
    assert len(q.collect()) == 20
    assert not any("shared" in p for p in purposes())


# ----------------------------------------------------------------------------- streaming

@pytest.mark.parametrize("executor", ["inline", "parallel"])
def test_streaming_source_read_once_for_two_branches(tmp_path, executor):
    path = str(tmp_path / "calls")
    src = ms.from_generator(counted(path, lambda i: {"k": i % 10, "v": i}), count=1000,
                            partitions=2)
    evens = src.filter(col("v") % 2 == 0)
    odds = src.filter(col("v") % 2 == 1).with_columns((col("v") * 10).alias("v"))
    job = evens.union(odds).start(executor=executor, checkpoint_interval=0, parallelism=2)
    assert job.await_termination(120)
    rows = job.sink.rows()
    assert calls(path) == 1000
    assert sorted(r["v"] for r in rows) == sorted(i if i % 2 == 0 else 10 * i
                                                  for i in range(1000))


def test_streaming_shared_source_keeps_event_time_per_partition(tmp_path):
    """Both branches window the same source by event time: each gets every row once and
    nothing is late (the shared source feeds each branch partition by partition)."""
    path = str(tmp_path / "calls")
    start = dt.datetime(2024, 1, 1)
    src = ms.from_generator(counted(path, lambda i: {
        "k": i % 3, "ts": start + dt.timedelta(milliseconds=i), "v": 1}),
        count=600, partitions=2).with_watermark("ts", "0s")
    a = src.group_by("k").window(ms.tumbling("100ms")).agg(ms.count().alias("n"))
    b = src.window(ms.tumbling("200ms")).agg(ms.sum("v").alias("n")) \
        .with_columns(ms.lit(-1).alias("k"))
    # (columns named: ``a.columns`` would read the generator to learn its schema)
    job = a.union(b.select("window_start", "window_end", "k", "n")).start(
        executor="inline", checkpoint_interval=0, parallelism=2)
    assert job.await_termination(120)
    rows = job.sink.rows()
    assert calls(path) == 600
    assert sum(r["n"] for r in rows if r["k"] >= 0) == 600
    assert sum(r["n"] for r in rows if r["k"] == -1) == 600


# ----------------------------------------------------------------------------- sort

@pytest.mark.parametrize("small_sort_rows", [0, 100_000], ids=["range-partitioned", "one-task"])
def test_sort_after_group_by_computes_the_aggregate_once(tmp_path, small_sort_rows):
    path = str(tmp_path / "calls")
    t = pa.table({"k": [i % 50 for i in range(2000)], "v": list(range(2000))})
    agg = ms.from_arrow(t, num_partitions=3).group_by("k").agg(ms.sum("v").alias("s")) \
        .map(counted(path, lambda r: r))
    got = agg.sort("s", descending=True).collect(shuffle_partitions=3,
                                                 small_sort_rows=small_sort_rows)
    assert calls(path) == 50  # the rows after the aggregate went through once
    assert [r["k"] for r in got] == sorted(range(50), key=lambda k: -sum(range(k, 2000, 50)))
    assert sum(p == "group-by map side" for p in purposes()) == 1
    assert "sort sample" not in purposes()
    if small_sort_rows:  # the aggregate's last step and the sort in one task
        assert purposes() == ["group-by map side", "result"]
    else:
        assert "sort input" in purposes()


def test_sort_of_a_generator_reads_it_once(tmp_path):
    path = str(tmp_path / "calls")
    src = ms.from_generator(counted(path, lambda i: {"x": (i * 7919) % 1000}), count=1000,
                            partitions=2)
    got = [r["x"] for r in src.sort("x").collect(shuffle_partitions=4)]
    assert got == sorted((i * 7919) % 1000 for i in range(1000))
    assert calls(path) == 1000


def test_a_shared_subplan_reads_the_columns_its_consumers_need(tmp_path):
    """TPC-H Q11's shape: a join used by two aggregates is shared, and its scans read the
    union of the columns the two consumers read (not every column), still once."""
    import pyarrow.parquet as pq

    n = 3000
    facts = pa.table({"k": [i % 50 for i in range(n)], "g": [i % 7 for i in range(n)],
                      "x": list(range(n)), "note": ["n" * 40] * n, "y": [1.5] * n})
    dims = pa.table({"k": list(range(50)), "keep": [i % 3 != 0 for i in range(50)],
                     "label": ["l" * 40] * 50})
    pq.write_table(facts, tmp_path / "facts.parquet")
    pq.write_table(dims, tmp_path / "dims.parquet")
    joined = ms.read_parquet(str(tmp_path / "facts.parquet")).join(
        ms.read_parquet(str(tmp_path / "dims.parquet")).filter(col("keep")), on="k")
    per_g = joined.group_by("g").agg(ms.sum("x").alias("sx"))
    total = joined.agg(ms.sum("y").alias("sy"))
    ds = per_g.cross_join(total)
    text = ds.explain(print_plan=False)
    optimized = text.split("== Optimized plan ==")[1].split("== Rules applied")[0]
    assert optimized.count("Shared #") == 2
    assert "columns=[k,g,x,y]" in optimized and "note" not in optimized.split("columns=")[1]
    assert "columns=[k] filter=keep" in optimized
    got = ds.collect()
    assert sum("shared sub-plan" in p for p in purposes()) == 1
    want = sql("WITH j AS (SELECT f.* FROM f JOIN d ON f.k = d.k WHERE d.keep) "
               "SELECT g, sum(x), (SELECT sum(y) FROM j) FROM j GROUP BY g", f=facts, d=dims)
    assert tuples(got, ["g", "sx", "sy"]) == want
