"""Runner-independent Dataset and MapReduce behaviour, run on every runner.

One suite, not a copy per runner: every test takes the ``runner`` fixture (parametrized
over ``["local", "ray"]`` in ``runners_fixture.py``, given to every module by
``conftest.py``) and checks its result against plain Python on the same data. The
Dataset-operation, join, sort, cache and MapReduce suites (``test_dataset_ops``,
``test_mapreduce``, ``test_properties``) run a representative part of themselves on both
runners the same way.
"""

from __future__ import annotations

import os
import random
from collections import Counter

import pyarrow.parquet as pq
import pytest

import millstream as ms
from millstream.runtime.session import get_session

RNG = random.Random(7)
ROWS = [{"id": i, "k": RNG.choice([None, 0, 1, 2, 3, 4]), "s": RNG.choice(["a", "b", "ß", "日本", None]),
         "x": RNG.choice([None, 1.5, -2.0, 3.25, 10.0])} for i in range(2000)]


def _ds(partitions: int = 4) -> ms.Dataset:
    """ROWS as a dataset of ``partitions`` partitions."""
    return ms.from_items(ROWS, num_partitions=partitions)


def test_group_by_agg(runner):
    got = {r["k"]: r for r in _ds().group_by("k").agg(
        ms.count().alias("n"), ms.sum("x").alias("sx"), ms.min("id").alias("lo"),
        ms.max("id").alias("hi"), ms.count_distinct("s").alias("ds")).collect()}
    groups: dict = {}
    for r in ROWS:
        groups.setdefault(r["k"], []).append(r)
    assert set(got) == set(groups)
    for k, rows in groups.items():
        xs = [r["x"] for r in rows if r["x"] is not None]
        assert got[k]["n"] == len(rows)
        assert got[k]["sx"] == pytest.approx(sum(xs))
        assert (got[k]["lo"], got[k]["hi"]) == (min(r["id"] for r in rows), max(r["id"] for r in rows))
        assert got[k]["ds"] == len({r["s"] for r in rows if r["s"] is not None})
    assert _ds().count() == len(ROWS)


@pytest.mark.parametrize("broadcast", [False, True])
@pytest.mark.parametrize("how", ["inner", "left"])
def test_join_shuffle_and_broadcast(runner, broadcast, how):
    dim = ms.from_items([{"k": k, "name": f"k{k}"} for k in (0, 1, 2, 9)], num_partitions=2)
    got = _ds().join(dim, on="k", how=how, broadcast=broadcast).select("id", "name").collect()
    names = {0: "k0", 1: "k1", 2: "k2"}
    want = [(r["id"], names.get(r["k"])) for r in ROWS
            if how == "left" or r["k"] in names]
    assert sorted((r["id"], r["name"]) for r in got) == sorted(want)


def test_sort_distinct_limit(runner):
    got = _ds().filter(ms.col("x").is_not_null()).sort(["x", "id"], descending=[True, False]).collect()
    want = sorted((r for r in ROWS if r["x"] is not None), key=lambda r: (-r["x"], r["id"]))
    assert [r["id"] for r in got] == [r["id"] for r in want]
    assert sorted(r["s"] or "" for r in _ds().select("s").distinct().collect()) == \
        sorted({r["s"] or "" for r in ROWS})
    top = _ds().sort("id", descending=True).limit(5).collect()
    assert [r["id"] for r in top] == [1999, 1998, 1997, 1996, 1995]
    assert len(_ds().limit(7).collect()) == 7


def _counting_map(calls_file: str):
    """A map function that appends a line to ``calls_file`` per call."""

    def fn(row):
        with open(calls_file, "a") as f:
            f.write("x\n")
        return {"id": row["id"], "k": row["k"], "sq": row["id"] * row["id"]}
    return fn


def test_cache_reused_across_actions(runner, tmp_path):
    calls = tmp_path / "calls.txt"
    cached = _ds(3).map(_counting_map(str(calls))).cache()
    assert cached.count() == len(ROWS)
    got = {r["k"]: r["s"] for r in cached.group_by("k").agg(ms.sum("sq").alias("s")).collect()}
    want: Counter = Counter()
    for r in ROWS:
        want[r["k"]] += r["id"] * r["id"]
    assert got == dict(want)
    assert not any("cache" in s["purpose"] for s in ms.last_job_stats().stages)
    assert calls.read_text().count("x") == len(ROWS)
    cached.unpersist()
    assert get_session().cache.get(cached._node.cache_id) is None


def test_write_parquet_partitioned(runner, tmp_path):
    out = str(tmp_path / "out")
    _ds().filter(ms.col("k").is_not_null()).write_parquet(out, partition_by="k")
    assert os.path.exists(os.path.join(out, "_SUCCESS"))
    table = pq.read_table(out)
    assert sorted(table.column("id").to_pylist()) == [r["id"] for r in ROWS if r["k"] is not None]
    back = {r["id"]: r["s"] for r in ms.read_parquet(out).collect()}
    assert back == {r["id"]: r["s"] for r in ROWS if r["k"] is not None}


def test_mapreduce_word_count(runner, tmp_path):
    path = tmp_path / "in.txt"
    rng = random.Random(3)
    lines = [" ".join(rng.choice(["map", "reduce", "shuffle", "Arrow", "ray"])
                      for _ in range(rng.randint(0, 9))) for _ in range(3000)]
    path.write_text("\n".join(lines) + "\n")
    ds = ms.mapreduce(str(path), lambda _k, line: ((w.lower(), 1) for w in line.split()),
                      lambda w, ones: [(w, sum(ones))], combiner=lambda w, ones: [(w, sum(ones))],
                      num_reducers=3, split_size=8_000)
    got = {r["key"]: r["value"] for r in ds.collect()}
    assert got == dict(Counter(w.lower() for line in lines for w in line.split()))


def test_user_function_error(runner):
    def boom(row):
        if row["id"] == 1234:
            raise KeyError("no 1234")
        return row

    with pytest.raises(ms.UserFunctionError) as info:
        _ds().map(boom).collect(max_task_attempts=2)
    assert "no 1234" in str(info.value) and len(info.value.attempts) == 2
    assert isinstance(info.value.original, KeyError)
