"""A small sort runs in one task, a large one stays range-partitioned.

The planner sorts in one task when the plan bounds the rows for sure (a global aggregate,
a limit, a group-by by keys of few values per the statistics); otherwise the scheduler
decides from what the sort's input stage reads (the group-by's last step and the sort
then run in one task) or, once that stage ran, from its output (the range shuffle is
skipped). ``small_sort_rows``/``small_sort_bytes`` set the threshold; explain() and the
job's notes say which path was taken. Top-k's partial step is fused the same way.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import millstream as ms
from millstream.plan import logical as L
from millstream.plan.bounds import row_bound

col = ms.col


def stages() -> list[tuple[str, int]]:
    return [(s["purpose"], s["tasks"]) for s in ms.last_job_stats().stages]


def notes() -> str:
    return "\n".join(ms.last_job_stats().notes)


def keyed(n: int, keys: int, parts: int = 4) -> ms.Dataset:
    """``n`` rows over ``keys`` string keys, whose number the planner cannot bound (a
    flat_map may give any number of rows)."""
    t = pa.table({"i": list(range(n)), "v": [(i * 7919) % 1000 for i in range(n)]})
    return ms.from_arrow(t, num_partitions=parts).flat_map(
        lambda r: [{"k": f"key{r['i'] % keys:04d}", "v": r["v"]}])


def test_sort_after_a_small_group_by_runs_in_the_group_bys_last_task(runner):
    ds = keyed(20_000, 37).group_by("k").agg(ms.sum("v").alias("s")).sort("k")
    assert "adaptive: one task when its input measures" in ds.explain(print_plan=False)
    got = ds.collect(shuffle_partitions=4)
    assert [r["k"] for r in got] == sorted(f"key{i:04d}" for i in range(37))
    # the group-by's map side, then its last step and the sort in one task: no sampling,
    # no range shuffle
    assert stages() == [("group-by map side", 4), ("result", 1)]
    assert "adaptive: sort in one task, fused with its input stage" in notes()
    assert "all in one task" in ms.last_job_stats().plan


def test_same_answer_on_both_paths():
    ds = keyed(5000, 300).group_by("k").agg(ms.sum("v").alias("s"), ms.count().alias("n")) \
        .sort(["s", "k"], descending=[True, False])
    small = ds.collect(shuffle_partitions=3)
    assert stages()[-1] == ("result", 1)
    ranged = ds.collect(shuffle_partitions=3, small_sort_rows=0)
    assert ("sort range partition", 3) in stages() and stages()[-1] == ("result", 3)
    assert small == ranged and len(small) == 300
    assert [(r["s"], r["k"]) for r in small] == sorted(
        ((r["s"], r["k"]) for r in small), key=lambda x: (-x[0], x[1]))


def test_a_small_sort_input_not_fed_by_a_shuffle_skips_the_range_shuffle(runner):
    # a flat_map may multiply rows: the input stage runs on its own, then its measured
    # output (small) is sorted in one task without the range shuffle
    src = ms.from_items([{"x": (i * 31) % 997} for i in range(2000)], num_partitions=3)
    ds = src.flat_map(lambda r: [r, {"x": -r["x"]}]).sort("x")
    got = [r["x"] for r in ds.collect(shuffle_partitions=3)]
    assert got == sorted([(i * 31) % 997 for i in range(2000)]
                         + [-((i * 31) % 997) for i in range(2000)])
    assert stages() == [("sort input", 3), ("result", 1)]
    assert "adaptive: sort in one task (input measured 4000 rows" in notes()
    assert "sort range partition" in notes() and "not run" in notes()


def test_the_threshold_is_a_setting():
    ds = keyed(3000, 3000).group_by("k").agg(ms.count().alias("n")).sort("k")
    ds.collect(shuffle_partitions=3, small_sort_rows=1000)
    assert ("sort range partition", 3) in stages() and stages()[-1] == ("result", 3)
    assert "adaptive: sort range-partitioned (input measured 3000 rows" in notes()
    ds.collect(shuffle_partitions=3, small_sort_bytes=1000)  # rows within, bytes over
    assert stages()[-1] == ("result", 3)
    ds.collect(shuffle_partitions=3, small_sort_rows=5000)
    assert stages()[-1] == ("result", 1)


def test_a_large_sort_stays_range_partitioned_and_ordered_across_partitions():
    n = 1_200_000
    rng = np.random.default_rng(11)
    t = pa.table({"x": rng.integers(-10**9, 10**9, n), "y": rng.random(n)})
    ds = ms.from_arrow(t, num_partitions=4).sort("x", descending=True)
    batches = list(ds.iter_batches(shuffle_partitions=4))
    assert ("sort range partition", 4) in stages() and stages()[-1] == ("result", 4)
    assert "adaptive: sort range-partitioned (input measured 1200000 rows" in notes()
    xs = np.concatenate([b.column("x").to_numpy() for b in batches])
    assert len(xs) == n and np.array_equal(xs, np.sort(t.column("x").to_numpy())[::-1])
    # the partitions hold consecutive ranges: batches never overlap
    bounds = [(b.column("x")[0].as_py(), b.column("x")[-1].as_py()) for b in batches]
    assert all(a[1] >= b[0] for a, b in zip(bounds, bounds[1:]))


# ------------------------------------------------------------------ the planner's bound

@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    path = tmp_path_factory.mktemp("small_sort") / "facts.parquet"
    n = 30_000
    pq.write_table(pa.table({"nation": [i % 25 for i in range(n)],
                             "name": [f"n{i % 25:02d}" for i in range(n)],
                             "v": list(range(n))}), str(path))
    return str(path)


def test_a_group_by_of_keys_with_few_values_is_sorted_in_one_task_by_plan(facts):
    ds = ms.read_parquet(facts).group_by("nation").agg(ms.sum("v").alias("s")) \
        .sort("s", descending=True)
    text = ds.explain(print_plan=False)
    # nation's values are 0..24 per the file's statistics (+ a null group): 26 at most
    assert "(one task: at most 26 rows by the plan's statistics)" in text
    assert "sampling" not in text and "range(" not in text
    got = ds.collect(shuffle_partitions=3)
    assert [r["nation"] for r in got] == list(range(24, -1, -1))
    assert [p for p, _ in stages()] == ["group-by map side", "result"]


def test_a_global_aggregate_and_a_limit_are_bounded_for_sure(facts):
    glob = ms.read_parquet(facts).agg(ms.sum("v").alias("s")).sort("s")
    assert "one task: at most 1 rows" in glob.explain(print_plan=False)
    assert glob.collect() == [{"s": sum(range(30_000))}]
    lim = ms.read_parquet(facts).limit(50).sort("v", descending=True)
    assert "one task: at most 50 rows" in lim.explain(print_plan=False)
    assert [r["v"] for r in lim.collect()] == sorted((r["v"] for r in lim.collect()),
                                                     reverse=True)
    # a string key's values are not bounded by a value range, only by the rows (30000):
    # under a lower threshold, decided at run time
    by_name = ms.read_parquet(facts).group_by("name").agg(ms.count().alias("c")).sort("name")
    assert "one task: at most 30000 rows" in by_name.explain(print_plan=False)
    assert "adaptive: one task when" in by_name.explain(print_plan=False,
                                                       small_sort_rows=20_000)
    got = by_name.collect(shuffle_partitions=3, small_sort_rows=20_000)
    assert [r["name"] for r in got] == [f"n{i:02d}" for i in range(25)]
    assert stages()[-1] == ("result", 1)
    assert "fused with its input stage (input measured" in notes()


def test_row_bounds(facts):
    scan = ms.read_parquet(facts)
    assert row_bound(scan._node) == 30_000
    assert row_bound(scan.filter(col("v") > 3).limit(7)._node) == 7
    two = scan.group_by("nation", "v").agg(ms.count().alias("c"))._node
    assert row_bound(two) == 30_000  # 26 * 30001 groups, but at most the rows
    # a Python map keeps the rows but may change every value: bounded by the rows only
    assert row_bound(scan.map(lambda r: r).group_by("nation").agg(ms.count())._node) == 30_000
    assert row_bound(scan.group_by("nation").agg(ms.count())._node) == 26
    assert row_bound(scan.flat_map(lambda r: [r]).group_by("nation").agg(ms.count())._node) \
        is None
    other = ms.read_parquet(facts).select(col("nation").alias("n2"), "name")
    inner = scan.join(other, left_on="nation", right_on="n2")
    assert row_bound(inner.group_by("n2").agg(ms.count())._node) == 26
    outer = scan.join(other, left_on="nation", right_on="n2", how="outer")
    assert isinstance(outer._node, L.Join)
    assert row_bound(outer.group_by("n2").agg(ms.count())._node) is None


# ------------------------------------------------------------------ top-k, empty input

def test_top_k_after_a_small_group_by_runs_in_one_task():
    ds = keyed(20_000, 500).group_by("k").agg(ms.sum("v").alias("s")) \
        .sort(["s", "k"], descending=[True, False]).limit(5)
    got = ds.collect(shuffle_partitions=4)
    assert stages() == [("group-by map side", 4), ("result", 1)]
    assert "adaptive: top-k in one task, fused with its input stage" in notes()
    full = keyed(20_000, 500).group_by("k").agg(ms.sum("v").alias("s")).collect()
    assert got == sorted(full, key=lambda r: (-r["s"], r["k"]))[:5]
    ds.collect(shuffle_partitions=4, small_sort_rows=0)
    assert ("top-k", 4) in stages()


def test_top_k_of_a_one_task_input_is_one_stage(facts):
    ds = ms.read_parquet(facts).sort("v", descending=True).limit(3)
    assert [r["v"] for r in ds.collect()] == [29_999, 29_998, 29_997]
    assert stages() == [("result", 1)]
    assert "its input stage runs in one task" in notes()


def test_an_empty_sort_input_keeps_its_columns():
    ds = keyed(100, 5).filter(col("v") < 0).group_by("k").agg(ms.count().alias("n")).sort("k")
    t = ds.to_arrow(shuffle_partitions=3)
    assert t.num_rows == 0 and t.column_names == ["k", "n"]
    assert stages()[-1] == ("result", 1)


def test_a_join_that_may_multiply_rows_is_not_fused():
    # 2000 groups (few rows measured) crossed with 100 rows: 200000 rows to sort, too many
    # for one task; the input stage runs on its own and the sort stays range-partitioned
    agg = keyed(6000, 2000).group_by("k").agg(ms.count().alias("n"))
    small = ms.from_arrow(pa.table({"j": list(range(100))}))
    ds = agg.cross_join(small).sort(["j", "k"], descending=[True, False])
    assert "broadcast" in ds.explain(print_plan=False)
    got = ds.to_arrow(shuffle_partitions=3)
    assert "fused" not in notes()
    assert [p for p, _ in stages()][-3:] == ["sort input", "sort range partition", "result"]
    assert stages()[-1] == ("result", 3)
    assert got.num_rows == 200_000
    assert got.column("j").to_pylist()[:2000] == [99] * 2000
    assert got.column("k").to_pylist()[:3] == ["key0000", "key0001", "key0002"]
    assert got.column("j").to_pylist()[-1] == 0
