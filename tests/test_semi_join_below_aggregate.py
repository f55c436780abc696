"""The semi_join_below_aggregate rule: an aggregate joined on its group keys with a small
side aggregates only the rows of the groups that side has (TPC-H Q17's shape)."""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pytest

import millstream as ms

col = ms.col
RULE = "semi_join_below_aggregate"


@pytest.fixture(scope="module")
def tables():
    n = 40_000
    lines = pa.table({"pk": [i % 2000 for i in range(n)], "q": [float(i % 50) for i in range(n)]})
    parts = pa.table({"p_pk": list(range(2000)), "brand": [f"B{i % 40}" for i in range(2000)]})
    return lines, parts


def query(lines: pa.Table, parts: pa.Table):
    avg = (ms.from_arrow(lines, num_partitions=2).group_by("pk")
           .agg(ms.mean("q").alias("avg_q"), ms.count().alias("n")).rename({"pk": "spk"}))
    few = ms.from_arrow(parts).filter(col("brand") == "B7")
    return avg.join(few, left_on="spk", right_on="p_pk").select("spk", "avg_q", "n", "brand")


def rows(got):
    return sorted((r["spk"], r["avg_q"], r["n"], r["brand"]) for r in got)


def test_semi_join_goes_below_the_aggregate_and_results_stay(tables):
    lines, parts = tables
    q = query(lines, parts)
    text = q.explain(print_plan=False)
    rules = text.split("== Rules applied ==")[1].split("\n== ")[0]
    assert RULE in rules
    optimized = text.split("== Optimized plan ==")[1].split("\n== ")[0]
    # the semi join with the filtered parts is the aggregate's input now
    assert optimized.index("Aggregate") < optimized.index("Join semi")
    physical = text.split("== Physical plan ==")[1]
    assert "Join semi left_on=['pk'] right_on=['p_pk'] (broadcast" in physical
    got = rows(q.collect())
    off = q.explain(print_plan=False, disabled_rules=[RULE])
    assert "Join semi" not in off
    assert rows(q.collect(disabled_rules=[RULE])) == got
    want = sorted(duckdb.sql(
        "SELECT pk, avg(q), count(*), brand FROM lines JOIN parts ON pk = p_pk "
        "WHERE brand = 'B7' GROUP BY pk, brand").fetchall())
    assert got == want and len(got) == 50


def test_no_semi_join_when_the_other_side_is_not_small(tables):
    lines, parts = tables
    avg = ms.from_arrow(lines).group_by("pk").agg(ms.sum("q").alias("s"))
    q = avg.join(ms.from_arrow(parts), left_on="pk", right_on="p_pk")  # every part
    assert RULE not in q.explain(print_plan=False).split("== Rules applied ==")[1]
