"""The broadcast-or-shuffle choice from estimates anywhere in the plan (after aggregates and
filters too), and adaptive execution: a shuffle join whose side turns out small at run
time becomes a broadcast join; the other side is then never shuffled."""

from __future__ import annotations

import pyarrow as pa
import pytest
from oracles import duckdb_connect

import millstream as ms
from millstream.runtime import actions
from millstream.runtime.session import effective_settings

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


def explain(ds, **options) -> str:
    return actions.explain(ds._node, effective_settings(options))


@pytest.fixture(scope="module")
def tables():
    n = 60_000
    big = pa.table({"k": [i % 1000 for i in range(n)], "x": list(range(n)),
                    "pad": [f"row {i:08d} of the big table" for i in range(n)]})
    other = pa.table({"k": [i % 1000 for i in range(n)], "y": [i % 97 for i in range(n)],
                      "z": list(range(n))})
    return big, other


THRESHOLD = 256 << 10  # both tables are over it; a few thousand rows are under


def test_broadcast_after_an_aggregate_from_estimates(tables):
    big, other = tables
    per_k = ms.from_arrow(other).group_by("y").agg(ms.count().alias("n"))  # 97 groups
    q = ms.from_arrow(big).join(per_k, left_on="k", right_on="y")
    text = explain(q, broadcast_threshold=THRESHOLD)
    assert "(broadcast;" in text and "shuffle hash" not in text
    got = q.collect(broadcast_threshold=THRESHOLD)
    want = sql("SELECT k, x, n FROM big JOIN (SELECT y, count(*) AS n FROM other GROUP BY y) "
               "ON k = y", big=big, other=other)
    assert tuples(got, ["k", "x", "n"]) == want


def test_broadcast_after_a_filter_from_estimates(tables):
    big, other = tables
    q = ms.from_arrow(big).join(ms.from_arrow(other).filter(col("z") < 500), on="k")
    text = explain(q, broadcast_threshold=THRESHOLD)
    assert "(broadcast;" in text and "~500 rows" in text
    # without the filter, both sides are over the threshold: a shuffle join
    assert "shuffle hash" in explain(ms.from_arrow(big).join(ms.from_arrow(other), on="k"),
                                     broadcast_threshold=THRESHOLD)


def _python_filtered(other: pa.Table, keep: int):
    """``other`` through a Python filter: the estimate cannot see how few rows it keeps."""
    return ms.from_arrow(other, num_partitions=2).filter(lambda r: r["z"] < keep)


def test_adaptive_switch_to_broadcast(tables):
    big, other = tables
    right = _python_filtered(other, 300).select("k", "z")  # estimated narrower than big
    q = ms.from_arrow(big, num_partitions=3).join(right, on="k")
    text = explain(q, broadcast_threshold=THRESHOLD)
    assert "shuffle hash" in text and "adaptive: may switch to broadcast" in text
    got = q.collect(broadcast_threshold=THRESHOLD, shuffle_partitions=3)
    stats = ms.last_job_stats()
    purposes = [s["purpose"] for s in stats.stages]
    # the right side (estimated smaller) ran first; measured small, the left side was
    # never shuffled: it is joined against the right side's map output task by task
    assert purposes[0] == "join right side"
    assert "join left side" not in purposes
    assert any("adaptive: switched to broadcast" in n for n in stats.notes)
    assert "adaptive: switched to broadcast" in stats.explain()
    want = sql("SELECT k, x, z FROM big JOIN other USING (k) WHERE z < 300", big=big,
               other=other)
    assert tuples(got, ["k", "x", "z"]) == want


@pytest.mark.parametrize("how", ["inner", "right"])
def test_adaptive_switch_broadcasts_a_small_left_side(tables, how):
    big, other = tables
    left = _python_filtered(other, 200).select("k", "z")
    q = left.join(ms.from_arrow(big, num_partitions=2), on="k", how=how)
    got = q.collect(broadcast_threshold=THRESHOLD)
    stats = ms.last_job_stats()
    purposes = [s["purpose"] for s in stats.stages]
    assert "join right side" not in purposes
    assert any("left side measured" in n for n in stats.notes)
    on = "USING (k)" if how == "inner" else "ON l.k = b.k"
    key = "k" if how == "inner" else "b.k AS k"
    want = sql(f"SELECT {key}, z, x FROM (SELECT k, z FROM other WHERE z < 200) l "
               f"{how.upper()} JOIN big b {on}", big=big, other=other)
    assert tuples(got, ["k", "z", "x"]) == want


def test_adaptive_keeps_the_shuffle_when_both_sides_are_big(tables):
    big, _ = tables
    keys = pa.table({"k": list(range(60_000)), "w": ["some padding text"] * 60_000})
    right = ms.from_arrow(keys, num_partitions=2).filter(lambda r: r["k"] % 2 == 0)
    got = ms.from_arrow(big, num_partitions=2).join(right, on="k") \
        .collect(broadcast_threshold=THRESHOLD)
    stats = ms.last_job_stats()
    purposes = [s["purpose"] for s in stats.stages]
    assert "join left side" in purposes and "join right side" in purposes
    assert not any("switched" in n for n in stats.notes)
    assert len(got) == 500 * 60


def test_forced_shuffle_is_not_switched(tables):
    big, other = tables
    q = ms.from_arrow(big).join(_python_filtered(other, 100), on="k", broadcast=False)
    assert "adaptive" not in explain(q, broadcast_threshold=THRESHOLD)
    q.collect(broadcast_threshold=THRESHOLD)
    assert not ms.last_job_stats().notes
