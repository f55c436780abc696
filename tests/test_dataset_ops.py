"""Every Dataset operator checked against DuckDB SQL or plain Python on the same data.

The data has nulls, unicode strings, ints/floats/strings/bools, empty inputs and skewed
keys; the layout (source partitions, shuffle partitions) is varied so that results are
seen not to depend on it. The session (two workers) comes from ``conftest.py``.
"""

from __future__ import annotations

import os
import random
import tempfile

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from oracles import duckdb_rows as sql
from oracles import ordered, same_rows

import millstream as ms
from millstream.core.context import TaskContext
from millstream.core.hashing import hash_array, hash_columns, partition_ids
from millstream.core.shuffle import read_block
from millstream.expr.aggregates import AggSpec
from millstream.expr.nodes import col
from millstream.ops.aggregate import FinalAggregate, PartialAggregate
from millstream.ops.join import HashJoin, join_tables
from millstream.ops.sort import Sort
from millstream.runtime.session import get_session

# (source partitions, shuffle partitions)
LAYOUTS = [(1, 1), (3, 2), (4, 5)]
LAYOUT_IDS = [f"src{a}-shuf{b}" for a, b in LAYOUTS]

STRINGS = [None, "a", "b", "ß", "日本語", "", "émoji 🎉", "Zz", "a "]


# ----------------------------------------------------------------------------- helpers


def make_rows(n: int, seed: int, skew: bool = False) -> list[dict]:
    rnd = random.Random(seed)
    rows = []
    for i in range(n):
        if skew:
            k = 0 if rnd.random() < 0.9 else rnd.choice([None, 1, 2, 3, 4])
        else:
            k = rnd.choice([None, 1, 2, 3, 4, 5, 6, 7])
        rows.append({
            "id": i,
            "k": k,
            "s": rnd.choice(STRINGS),
            "i": rnd.choice([None, -5, 0, 1, 2, 3, 10**12]),
            "f": rnd.choice([None, -1.5, 0.0, 2.25, 1e10, 0.1]),
            "b": rnd.choice([None, True, False]),
        })
    return rows


ROWS = make_rows(300, seed=1)
TABLE = pa.Table.from_pylist(ROWS)
SKEWED = make_rows(2000, seed=2, skew=True)


def result_tasks() -> int:
    """Number of tasks of the last job's final stage."""
    return ms.last_job_stats().stages[-1]["tasks"]


def spills() -> int:
    return ms.last_job_stats().counters.get(("millstream", "spills"), 0)


# ----------------------------------------------------------------------------- narrow


@pytest.mark.parametrize("parts", [1, 3])
def test_map_rows(parts):
    ds = ms.from_items(ROWS, num_partitions=parts)
    got = ds.map(lambda r: {"id": r["id"], "x": None if r["i"] is None else r["i"] * 2,
                            "t": (r["s"] or "") + "!", "nb": r["b"] is None}).collect()
    want = [{"id": r["id"], "x": None if r["i"] is None else r["i"] * 2, "t": (r["s"] or "") + "!",
             "nb": r["b"] is None} for r in ROWS]
    same_rows(got, want)


def test_map_scalar_result_goes_to_value_column():
    got = ms.from_items(ROWS, num_partitions=2).map(lambda r: r["id"] * 3).collect()
    same_rows(got, [{"value": r["id"] * 3} for r in ROWS])


def test_map_rows_with_varying_keys():
    def fn(r):
        out = {"id": r["id"]}
        if r["id"] % 3 == 1:
            out["extra"] = f"x{r['id']}"  # a key the first row of a batch does not have
        if r["id"] % 5 == 2:
            out["n"] = r["id"] * 1.5
        return out

    got = ms.from_items(ROWS, num_partitions=3).map(fn).collect()
    want = [{"id": r["id"], "extra": None, "n": None, **fn(r)} for r in ROWS]
    same_rows(got, want)
    got = ms.from_items(ROWS[:50], num_partitions=2).flat_map(lambda r: [fn(r), {"other": r["id"]}]).collect()
    assert sum(r["extra"] is not None for r in got) == sum(1 for r in ROWS[:50] if r["id"] % 3 == 1)
    assert sum(r["other"] is not None for r in got) == 50


def test_map_preserves_partition_order_without_shuffle():
    got = ms.from_items(ROWS, num_partitions=3).map(lambda r: {"id": r["id"]}).collect()
    assert [r["id"] for r in got] == [r["id"] for r in ROWS]


@pytest.mark.parametrize("parts", [1, 4])
def test_flat_map(parts):
    def fn(r):
        return [{"id": r["id"], "j": j, "s": r["s"]} for j in range(r["id"] % 3)]

    got = ms.from_items(ROWS, num_partitions=parts).flat_map(fn).collect()
    same_rows(got, [x for r in ROWS for x in fn(r)])


def test_flat_map_to_nothing():
    ds = ms.from_items(ROWS, num_partitions=3).flat_map(lambda r: [])
    assert ds.collect() == []
    assert ds.count() == 0


FILTERS = [
    (col("i") > 0, "i > 0"),
    ((col("i") >= 0) & col("s").is_not_null(), "i >= 0 AND s IS NOT NULL"),
    ((col("k") == 3) | (col("f") < 0), "k = 3 OR f < 0"),
    (col("b"), "b"),
    (~col("b"), "NOT b"),
    (col("s") == "日本語", "s = '日本語'"),
    (col("s").is_null() | (col("k").is_in([1, 2])), "s IS NULL OR k IN (1, 2)"),
    (col("i") > 10**15, "i > 1000000000000000"),
]


@pytest.mark.parametrize("expr,where", FILTERS, ids=[w for _, w in FILTERS])
def test_filter_expr_matches_sql(expr, where):
    got = ms.from_items(ROWS, num_partitions=3).filter(expr).collect()
    want = sql(f"SELECT * FROM t WHERE {where}", t=TABLE)
    same_rows(got, want)


def test_filter_function():
    def pred(r):
        return r["s"] is not None and len(r["s"]) > 1

    got = ms.from_items(ROWS, num_partitions=4).filter(pred).collect()
    same_rows(got, [r for r in ROWS if pred(r)])
    assert ms.from_items(ROWS, num_partitions=2).filter(lambda r: False).collect() == []


def test_where_is_filter():
    got = ms.from_items(ROWS, num_partitions=2).where(col("k") == 1).collect()
    same_rows(got, [r for r in ROWS if r["k"] == 1])


def _arrow_fn(t: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    return t.append_column("z", pc.multiply(t.column("id"), 2)).filter(pc.greater(t.column("id"), 10))


def _pandas_fn(df):
    df = df[df["id"] > 10].copy()
    df["z"] = df["id"] * 2
    return df


def _polars_fn(df):
    import polars as pl

    return df.filter(pl.col("id") > 10).with_columns((pl.col("id") * 2).alias("z"))


@pytest.mark.parametrize("fmt,fn", [("pyarrow", _arrow_fn), ("pandas", _pandas_fn), ("polars", _polars_fn)])
def test_map_batches(runner, fmt, fn):
    got = ms.from_items(ROWS, num_partitions=3).map_batches(fn, batch_format=fmt).collect()
    want = [dict(r, z=r["id"] * 2) for r in ROWS if r["id"] > 10]
    if fmt == "pandas":
        # pandas turns nullable ints into floats (and NaN back into null): compare as numbers
        for r in got:
            r["i"] = None if r["i"] is None else int(r["i"])
            r["k"] = None if r["k"] is None else int(r["k"])
    same_rows(got, want)


def test_map_batches_kwargs_and_dict_result():
    def fn(t, factor):
        return {"id": t.column("id"), "y": [v * factor for v in t.column("id").to_pylist()]}

    got = ms.from_items(ROWS, num_partitions=2).map_batches(fn, factor=5).collect()
    same_rows(got, [{"id": r["id"], "y": r["id"] * 5} for r in ROWS])


def test_select_and_with_columns_match_sql():
    ds = ms.from_items(ROWS, num_partitions=3)
    got = ds.select(
        "id",
        (col("i") + col("k")).alias("a"),
        (col("i") * 2 - 1).alias("m"),
        (col("f") * 2.0).alias("g"),
        col("s").str.upper().alias("up"),
        col("s").str.len().alias("n"),
        col("i").fill_null(-1).alias("fi"),
        (col("k") > 3).alias("gt"),
        (col("b") & (col("k") > 2)).alias("andb"),
        (col("b") | (col("k") > 2)).alias("orb"),
        ms.when(col("k") > 4, "big").when(col("k") > 1, "mid").otherwise("small").alias("c"),
        col("k").is_in([1, 5]).alias("isin"),
    ).collect()
    want = sql("""
        SELECT id, i + k AS a, i * 2 - 1 AS m, f * 2.0 AS g, upper(s) AS up, length(s) AS n,
               coalesce(i, -1) AS fi, k > 3 AS gt, b AND k > 2 AS andb, b OR k > 2 AS orb,
               CASE WHEN k > 4 THEN 'big' WHEN k > 1 THEN 'mid' ELSE 'small' END AS c,
               k IN (1, 5) AS isin
        FROM t""", t=TABLE)
    same_rows(got, want)

    got = ds.with_columns(k2=col("k") * 10, s=col("s").str.lower()).with_column("one", ms.lit(1)).collect()
    want = sql("SELECT id, k, lower(s) AS s, i, f, b, k * 10 AS k2, 1 AS one FROM t", t=TABLE)
    same_rows(got, want)
    assert list(got[0]) == ["id", "k", "s", "i", "f", "b", "k2", "one"]


def test_select_keyword_names_drop_rename():
    ds = ms.from_items(ROWS, num_partitions=2)
    got = ds.select("id", twice=col("id") * 2).collect()
    same_rows(got, [{"id": r["id"], "twice": r["id"] * 2} for r in ROWS])
    got = ds.drop("f", "b").rename({"s": "text"}).collect()
    same_rows(got, [{"id": r["id"], "k": r["k"], "text": r["s"], "i": r["i"]} for r in ROWS])


def test_explode(runner):
    rows = [{"id": i, "l": (None if i % 5 == 0 else [j if j % 4 else None for j in range(i % 4)]),
             "s": STRINGS[i % len(STRINGS)]} for i in range(60)]
    got = ms.from_items(rows, num_partitions=3).explode("l").collect()
    want = [{"id": r["id"], "l": x, "s": r["s"]} for r in rows for x in (r["l"] or [])]
    same_rows(got, want)
    # split + explode (word count)
    text = [{"line": "the quick  brown fox"}, {"line": "the lazy dög"}, {"line": None}, {"line": ""}]
    got = (ms.from_items(text, num_partitions=2).select(col("line").str.split().alias("w"))
           .explode("w").group_by("w").agg(ms.count().alias("n")).collect())
    same_rows(got, [{"w": "the", "n": 2}, {"w": "quick", "n": 1}, {"w": "brown", "n": 1},
                    {"w": "fox", "n": 1}, {"w": "lazy", "n": 1}, {"w": "dög", "n": 1}])


# ----------------------------------------------------------------------------- aggregation

AGG_SQL = """
    SELECT {keys}, sum(i) AS si, avg(f) AS af, min(s) AS mins, max(s) AS maxs, min(i) AS mini,
           max(f) AS maxf, max(b) AS maxb, count(*) AS n, count(s) AS ns,
           count(DISTINCT s) AS ds, coalesce(list_sort(list(s) FILTER (WHERE s IS NOT NULL)), []) AS ls
    FROM t GROUP BY {keys}"""


def _aggs():
    return [ms.sum("i").alias("si"), ms.mean("f").alias("af"), ms.min("s").alias("mins"),
            ms.max("s").alias("maxs"), ms.min("i").alias("mini"), ms.max("f").alias("maxf"),
            ms.max("b").alias("maxb"), ms.count().alias("n"), ms.count("s").alias("ns"),
            ms.count_distinct("s").alias("ds"), ms.collect_list("s").alias("ls")]


def _sort_lists(rows, name="ls"):
    for r in rows:
        r[name] = sorted(r[name])
    return rows


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("keys", [["k"], ["s"], ["b"], ["k", "b"]], ids=lambda k: "+".join(k))
def test_group_by_matches_sql(keys, layout):
    parts, shuffle = layout
    got = ms.from_items(ROWS, num_partitions=parts).group_by(*keys).agg(*_aggs()).collect(
        shuffle_partitions=shuffle)
    want = sql(AGG_SQL.format(keys=", ".join(keys)), t=TABLE)
    same_rows(_sort_lists(got), want)


def test_group_by_skewed_key(runner):
    t = pa.Table.from_pylist(SKEWED)
    for shuffle in (1, 3, 8):
        got = ms.from_items(SKEWED, num_partitions=4).group_by("k").agg(*_aggs()).collect(
            shuffle_partitions=shuffle)
        same_rows(_sort_lists(got), sql(AGG_SQL.format(keys="k"), t=t))


def test_group_by_named_aggregates_and_expression_argument(runner):
    ds = ms.from_items(ROWS, num_partitions=3)
    got = ds.group_by("k").agg(total=ms.sum(col("i") * 2), avg_id=ms.avg("id")).collect()
    same_rows(got, sql("SELECT k, sum(i * 2) AS total, avg(id) AS avg_id FROM t GROUP BY k", t=TABLE))
    got = ds.group_by("s").count().collect()
    same_rows(got, sql('SELECT s, count(*) AS "count" FROM t GROUP BY s', t=TABLE))


def test_group_by_computed_key_with_alias():
    got = (ms.from_items(ROWS, num_partitions=3).group_by((col("id") % 4).alias("m"))
           .agg(ms.sum("id").alias("sid"), ms.count().alias("n")).collect(shuffle_partitions=3))
    same_rows(got, sql("SELECT id % 4 AS m, sum(id) AS sid, count(*) AS n FROM t GROUP BY m", t=TABLE))


def test_group_by_computed_key_does_not_clobber_aggregated_column():
    got = (ms.from_items(ROWS, num_partitions=2).group_by(col("id") % 4)
           .agg(ms.sum("id").alias("sid")).collect())
    want = sql("SELECT id % 4 AS id, sum(id) AS sid FROM t GROUP BY id % 4", t=TABLE)
    same_rows(got, want)


def test_group_by_without_aggregates_is_distinct_keys():
    got = ms.from_items(ROWS, num_partitions=3).group_by("k", "b").agg().collect()
    same_rows(got, sql("SELECT DISTINCT k, b FROM t", t=TABLE))


def test_first_is_a_value_of_its_group(runner):
    got = ms.from_items(SKEWED, num_partitions=4).group_by("k").agg(
        ms.first("s").alias("fs"), ms.first("id").alias("fid")).collect(shuffle_partitions=3)
    groups: dict = {}
    for r in SKEWED:
        groups.setdefault(r["k"], []).append(r)
    assert {r["k"] for r in got} == set(groups)
    for r in got:
        members = groups[r["k"]]
        assert r["fs"] in {m["s"] for m in members}
        assert r["fid"] in {m["id"] for m in members}
    # one partition, one shuffle partition: the first row of each group in input order
    got = ms.from_items(SKEWED, num_partitions=1).group_by("k").agg(
        ms.first("id").alias("fid")).collect(shuffle_partitions=1)
    assert {r["k"]: r["fid"] for r in got} == {k: v[0]["id"] for k, v in groups.items()}


def test_collect_list_drops_nulls():
    rows = [{"k": 1, "v": None}, {"k": 1, "v": 2}, {"k": 2, "v": None}, {"k": 1, "v": 1}, {"k": 3, "v": 5}]
    got = ms.from_items(rows, num_partitions=3).group_by("k").agg(ms.collect_list("v").alias("l")).collect(
        shuffle_partitions=2)
    assert {r["k"]: sorted(r["l"]) for r in got} == {1: [1, 2], 2: [], 3: [5]}


@pytest.mark.parametrize("parts", [1, 4])
def test_global_agg_non_empty(parts):
    got = ms.from_items(ROWS, num_partitions=parts).agg(*_aggs()).collect()
    want = sql(AGG_SQL.replace("{keys}, ", "").replace("GROUP BY {keys}", ""), t=TABLE)
    same_rows(_sort_lists(got), want)


@pytest.mark.parametrize("source", ["filtered", "empty_items", "empty_arrow"])
def test_global_agg_on_empty_input(runner, source):
    if source == "filtered":
        ds = ms.from_items(ROWS, num_partitions=3).filter(col("id") < 0)
    elif source == "empty_items":
        ds = ms.from_items([])
    else:
        ds = ms.from_arrow(TABLE.slice(0, 0))
    aggs = [ms.count().alias("n"), ms.count_distinct("s").alias("ds"), ms.collect_list("s").alias("ls")]
    if source != "empty_items":
        aggs += [ms.sum("i").alias("si"), ms.mean("f").alias("af"), ms.min("s").alias("mins"),
                 ms.max("i").alias("maxi"), ms.count("s").alias("ns")]
    got = ds.agg(*aggs).collect()
    want = {"n": 0, "ds": 0, "ls": []}
    if source != "empty_items":
        want.update(si=None, af=None, mins=None, maxi=None, ns=0)
    assert got == [want]
    assert ds.count() == 0


def test_group_by_on_empty_input_has_no_rows():
    ds = ms.from_items(ROWS, num_partitions=2).filter(col("id") < 0)
    assert ds.group_by("k").agg(ms.sum("i")).collect() == []


def test_aggregate_after_aggregate(runner):
    got = (ms.from_items(ROWS, num_partitions=3).group_by("k", "s").agg(ms.count().alias("n"))
           .group_by("k").agg(ms.sum("n").alias("total"), ms.count().alias("groups"))
           .collect(shuffle_partitions=3))
    want = sql("SELECT k, sum(n) AS total, count(*) AS groups FROM "
               "(SELECT k, s, count(*) AS n FROM t GROUP BY k, s) GROUP BY k", t=TABLE)
    same_rows(got, want)


# ----------------------------------------------------------------------------- joins

LEFT_ROWS = [{"k": k, "lid": i, "v": f"l{i}", "s": STRINGS[i % len(STRINGS)]}
             for i, k in enumerate([1, 2, 2, None, 3, 5, None, 7, 7, 7, 8, 0])]
RIGHT_ROWS = [{"k": k, "rid": i, "v": f"r{i}", "w": float(i) / 2}
              for i, k in enumerate([2, 2, None, 3, 4, 7, 9, None, 0, 0])]
LT, RT = pa.Table.from_pylist(LEFT_ROWS), pa.Table.from_pylist(RIGHT_ROWS)
SQL_JOIN = {"inner": "JOIN", "left": "LEFT JOIN", "right": "RIGHT JOIN", "outer": "FULL OUTER JOIN"}


def _join_sql(how: str) -> str:
    if how == "semi":
        return "SELECT * FROM l WHERE EXISTS (SELECT 1 FROM r WHERE r.k = l.k)"
    if how == "anti":
        return "SELECT * FROM l WHERE NOT EXISTS (SELECT 1 FROM r WHERE r.k = l.k)"
    key = "coalesce(l.k, r.k)" if how in ("right", "outer") else "l.k"
    return (f"SELECT {key} AS k, l.lid, l.v, l.s, r.rid, r.v AS v_right, r.w "
            f"FROM l {SQL_JOIN[how]} r ON l.k = r.k")


HOWS = ["inner", "left", "right", "outer", "semi", "anti"]


@pytest.mark.parametrize("broadcast", [True, False], ids=["broadcast", "shuffle"])
@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("layout", [(1, 1), (3, 4)], ids=["src1-shuf1", "src3-shuf4"])
def test_join_matches_sql(how, broadcast, layout):
    parts, shuffle = layout
    left = ms.from_items(LEFT_ROWS, num_partitions=parts)
    right = ms.from_items(RIGHT_ROWS, num_partitions=2)
    out = left.join(right, on="k", how=how, broadcast=broadcast)
    got = out.collect(shuffle_partitions=shuffle)
    want = sql(_join_sql(how), l=LT, r=RT)
    same_rows(got, want)
    cols = ["k", "lid", "v", "s"] if how in ("semi", "anti") else ["k", "lid", "v", "s", "rid", "v_right", "w"]
    assert list(got[0]) == cols


def test_join_full_is_outer():
    a = ms.from_items(LEFT_ROWS, num_partitions=2).join(ms.from_items(RIGHT_ROWS), on="k", how="full").collect()
    same_rows(a, sql(_join_sql("outer"), l=LT, r=RT))


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("broadcast,shuffle", [(True, 3), (False, 3), (False, 8)],
                         ids=["broadcast", "shuffle3", "shuffle8"])
def test_join_left_on_right_on(runner, how, broadcast, shuffle):
    right_rows = [{"rk": r["k"], "rid": r["rid"], "v": r["v"], "k": -1} for r in RIGHT_ROWS]
    rt = pa.Table.from_pylist(right_rows)
    got = ms.from_items(LEFT_ROWS, num_partitions=3).join(
        ms.from_items(right_rows, num_partitions=2), left_on="k", right_on="rk", how=how,
        broadcast=broadcast).collect(shuffle_partitions=shuffle)
    if how == "semi":
        q = "SELECT * FROM l WHERE EXISTS (SELECT 1 FROM r WHERE r.rk = l.k)"
    elif how == "anti":
        q = "SELECT * FROM l WHERE NOT EXISTS (SELECT 1 FROM r WHERE r.rk = l.k)"
    else:
        q = (f"SELECT l.k, l.lid, l.v, l.s, r.rk, r.rid, r.v AS v_right, r.k AS k_right "
             f"FROM l {SQL_JOIN[how]} r ON l.k = r.rk")
    same_rows(got, sql(q, l=LT, r=rt))


@pytest.mark.parametrize("how", ["inner", "left", "outer", "anti"])
def test_join_on_two_keys(runner, how):
    left = [{"a": i % 3, "b": STRINGS[i % 4], "x": i} for i in range(40)]
    right = [{"a": i % 4, "b": STRINGS[i % 3], "y": i} for i in range(30)]
    lt, rt = pa.Table.from_pylist(left), pa.Table.from_pylist(right)
    got = ms.from_items(left, num_partitions=3).join(ms.from_items(right, num_partitions=2), on=["a", "b"],
                                                     how=how).collect(shuffle_partitions=4)
    if how == "anti":
        q = "SELECT * FROM l WHERE NOT EXISTS (SELECT 1 FROM r WHERE r.a = l.a AND r.b = l.b)"
    else:
        ka = "coalesce(l.a, r.a)" if how == "outer" else "l.a"
        kb = "coalesce(l.b, r.b)" if how == "outer" else "l.b"
        q = f"SELECT {ka} AS a, {kb} AS b, l.x, r.y FROM l {SQL_JOIN[how]} r ON l.a = r.a AND l.b = r.b"
    same_rows(got, sql(q, l=lt, r=rt))


def test_join_custom_suffix_and_int_float_keys():
    left = [{"k": i, "v": i} for i in range(10)]
    right = [{"k": float(i), "v": -i} for i in range(5, 15)]
    got = ms.from_items(left, num_partitions=2).join(ms.from_items(right, num_partitions=3), on="k",
                                                     suffix="_r", broadcast=False).collect(shuffle_partitions=3)
    same_rows(got, [{"k": i, "v": i, "v_r": -i} for i in range(5, 10)])


@pytest.mark.parametrize("broadcast", [True, False], ids=["broadcast", "shuffle"])
@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("empty", ["left", "right", "both"])
def test_join_with_empty_side(runner, how, broadcast, empty):
    lt = LT.slice(0, 0) if empty in ("left", "both") else LT
    rt = RT.slice(0, 0) if empty in ("right", "both") else RT
    # empty by a filter (the schema travels with the empty result)
    left = ms.from_items(LEFT_ROWS, num_partitions=3)
    right = ms.from_items(RIGHT_ROWS, num_partitions=2)
    if empty in ("left", "both"):
        left = left.filter(col("lid") < 0)
    if empty in ("right", "both"):
        right = right.filter(col("rid") < 0)
    got = left.join(right, on="k", how=how, broadcast=broadcast).collect(shuffle_partitions=3)
    same_rows(got, sql(_join_sql(how), l=lt, r=rt))


def test_join_skewed_keys(runner):
    left = [{"k": r["k"], "id": r["id"]} for r in SKEWED]
    right = [{"k": k, "tag": f"t{j}"} for j, k in enumerate([0, 0, 0, 1, 2, None, 9])]
    lt, rt = pa.Table.from_pylist(left), pa.Table.from_pylist(right)
    for bc in (True, False):
        for how in ("inner", "left", "outer"):
            got = ms.from_items(left, num_partitions=4).join(ms.from_items(right), on="k", how=how,
                                                             broadcast=bc).collect(shuffle_partitions=3)
            key = "coalesce(l.k, r.k)" if how == "outer" else "l.k"
            want = sql(f"SELECT {key} AS k, l.id, r.tag FROM l {SQL_JOIN[how]} r ON l.k = r.k", l=lt, r=rt)
            same_rows(got, want)


def test_join_default_broadcast_and_explain():
    left = ms.from_items(LEFT_ROWS, num_partitions=2)
    right = ms.from_items(RIGHT_ROWS)
    assert "broadcast" in left.join(right, on="k").explain(print_plan=False).lower()
    text = left.join(right, on="k", broadcast=False).explain(print_plan=False)
    assert "shuffle hash" in text and "join left side" in text and "join right side" in text


def test_join_then_aggregate(runner):
    got = (ms.from_items(LEFT_ROWS, num_partitions=3).join(ms.from_items(RIGHT_ROWS), on="k", how="left",
                                                            broadcast=False)
           .group_by("k").agg(ms.count().alias("n"), ms.sum("w").alias("sw")).collect(shuffle_partitions=2))
    want = sql("SELECT l.k, count(*) AS n, sum(r.w) AS sw FROM l LEFT JOIN r ON l.k = r.k GROUP BY l.k",
               l=LT, r=RT)
    same_rows(got, want)


# ----------------------------------------------------------------------------- sort


def _order(cols, desc, nulls_last=None):
    out = []
    for c, d in zip(cols, desc):
        last = d if nulls_last is None else nulls_last
        out.append(f"{c} {'DESC' if d else 'ASC'} NULLS {'LAST' if last else 'FIRST'}")
    return ", ".join(out)


SORTS = [
    (["k"], [False], None),
    (["k"], [True], None),
    (["s", "i"], [False, True], None),
    (["b", "f", "s"], [True, False, True], None),
    (["i", "k"], [False, False], True),
    (["s"], [True], False),
    (["f"], [False], None),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("by,desc,nulls_last", SORTS, ids=[f"{'+'.join(b)}-{d}-{n}" for b, d, n in SORTS])
def test_sort_matches_sql(by, desc, nulls_last, layout):
    parts, shuffle = layout
    # id breaks ties, so the expected order is total
    ds = ms.from_items(ROWS, num_partitions=parts).sort(by + ["id"], descending=desc + [False],
                                                        nulls_last=nulls_last)
    # (small_sort_rows=0: the range-partitioned path, which 300 rows would not take)
    got = ds.collect(shuffle_partitions=shuffle, small_sort_rows=0)
    order = _order(by, desc, nulls_last) + ", id"
    ordered(got, sql(f"SELECT * FROM t ORDER BY {order}", t=TABLE), by + ["id"])
    assert result_tasks() == shuffle


def test_sort_is_globally_ordered_across_partitions(runner):
    n = 20000
    rng = np.random.default_rng(5)
    t = pa.table({"x": rng.integers(-10**6, 10**6, n), "y": rng.random(n)})
    batches = list(ms.from_arrow(t, num_partitions=4).sort("x").iter_batches(
        shuffle_partitions=4, small_sort_rows=0))  # (range-partitioned although small)
    assert result_tasks() == 4
    assert len(batches) >= 4
    xs = [v for b in batches for v in b.column("x").to_pylist()]
    assert xs == sorted(t.column("x").to_pylist())
    # each batch comes from one range partition: their ranges do not overlap
    ranges = [(b.column("x")[0].as_py(), b.column("x")[-1].as_py()) for b in batches]
    assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))


def test_sort_skewed_key_and_strings(runner):
    t = pa.Table.from_pylist(SKEWED)
    got = ms.from_items(SKEWED, num_partitions=4).sort(["k", "s", "id"], descending=[False, True, True]).collect(
        shuffle_partitions=4)
    ordered(got, sql(f"SELECT * FROM t ORDER BY {_order(['k', 's', 'id'], [False, True, True])}", t=t),
            ["k", "s", "id"])


def test_sort_empty_and_all_null(runner):
    ds = ms.from_items(ROWS, num_partitions=2)
    assert ds.filter(col("id") < 0).sort("k").collect(shuffle_partitions=3) == []
    rows = [{"a": None, "id": i} for i in range(20)]
    got = ms.from_items(rows, num_partitions=3).select(col("a").cast("int64"), "id").sort(
        ["a", "id"]).collect(shuffle_partitions=3)
    assert [r["id"] for r in got] == list(range(20))


def test_order_by_alias_and_after_aggregate():
    got = (ms.from_items(ROWS, num_partitions=3).group_by("s").agg(ms.count().alias("n"))
           .order_by(["n", "s"], descending=[True, False]).collect(shuffle_partitions=2))
    want = sql(f"SELECT s, count(*) AS n FROM t GROUP BY s ORDER BY {_order(['n', 's'], [True, False])}",
               t=TABLE)
    ordered(got, want, ["n", "s"])


# ----------------------------------------------------------------------------- distinct, union, limit


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_distinct(runner, layout):
    parts, shuffle = layout
    ds = ms.from_items(ROWS, num_partitions=parts)
    same_rows(ds.select("k", "b").distinct().collect(shuffle_partitions=shuffle),
              sql("SELECT DISTINCT k, b FROM t", t=TABLE))
    same_rows(ds.select("s").distinct().collect(shuffle_partitions=shuffle),
              sql("SELECT DISTINCT s FROM t", t=TABLE))
    doubled = ds.union(ds).distinct().collect(shuffle_partitions=shuffle)
    same_rows(doubled, ROWS)


def test_distinct_empty():
    assert ms.from_items(ROWS).filter(col("id") < 0).distinct().collect() == []


def test_union():
    a = ms.from_items(ROWS[:100], num_partitions=2)
    b = ms.from_items(ROWS[100:], num_partitions=3)
    same_rows(a.union(b).collect(), ROWS)
    same_rows(a.union(a, b).collect(), ROWS[:100] * 2 + ROWS[100:])
    assert a.union(b).count() == len(ROWS)
    # columns are matched by name; missing columns become null; ints widen to floats
    got = ms.from_items([{"x": 1, "y": "a"}]).union(ms.from_items([{"y": "b", "x": 2.5, "z": True}])).collect()
    same_rows(got, [{"x": 1.0, "y": "a", "z": None}, {"x": 2.5, "y": "b", "z": True}])


def test_union_then_group_by(runner):
    a = ms.from_items(ROWS, num_partitions=2)
    got = a.union(a.filter(col("k") == 1)).group_by("k").agg(ms.count().alias("n")).collect(shuffle_partitions=3)
    want = sql("SELECT k, count(*) AS n FROM (SELECT k FROM t UNION ALL SELECT k FROM t WHERE k = 1) GROUP BY k",
               t=TABLE)
    same_rows(got, want)


@pytest.mark.parametrize("parts", [1, 4])
def test_limit(parts):
    ds = ms.from_items(ROWS, num_partitions=parts)
    got = ds.limit(17).collect()
    assert len(got) == 17
    ids = [r["id"] for r in ROWS]
    # in partition order: the first 17 rows
    assert [r["id"] for r in got] == ids[:17]
    assert ds.limit(0).collect() == []
    assert len(ds.limit(10_000).collect()) == len(ROWS)
    assert ds.filter(col("k") == 1).limit(5).collect() == [r for r in ROWS if r["k"] == 1][:5]


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_sort_then_limit_is_top_n(runner, layout):
    parts, shuffle = layout
    ds = ms.from_items(ROWS, num_partitions=parts)
    got = ds.sort(["f", "id"], descending=[True, False]).limit(25).collect(shuffle_partitions=shuffle)
    want = sql(f"SELECT * FROM t ORDER BY {_order(['f', 'id'], [True, False])} LIMIT 25", t=TABLE)
    ordered(got, want, ["f", "id"])
    assert ds.sort("id", descending=True).take(3, shuffle_partitions=shuffle) == \
        sorted(ROWS, key=lambda r: -r["id"])[:3]


def test_limit_after_union_and_group_by(runner):
    a = ms.from_items(ROWS, num_partitions=2)
    assert len(a.union(a, a).limit(650).collect()) == 650
    assert len(a.group_by("s").agg(ms.count()).limit(3).collect()) == 3


# ----------------------------------------------------------------------------- repartition, cache


@pytest.mark.parametrize("n", [1, 3, 7])
def test_repartition_round_robin(n):
    ds = ms.from_items(ROWS, num_partitions=2).repartition(n)
    same_rows(ds.collect(), ROWS)
    assert result_tasks() == n


def _partitions(ds: ms.Dataset, **options) -> list[list[dict]]:
    """The rows of every partition of ``ds`` (materialized through the cache)."""
    c = ds.cache()
    c.count(**options)
    blocks = get_session().cache[c._node.cache_id]
    parts = [[r for b in read_block(ref) for r in b.to_pylist()] for ref in blocks]
    c.unpersist()
    return parts


@pytest.mark.parametrize("n", [2, 5])
def test_repartition_by_key(runner, n):
    parts = _partitions(ms.from_items(SKEWED, num_partitions=3).repartition(n, by="k"))
    assert len(parts) == n
    same_rows([r for p in parts for r in p], SKEWED)
    where = {}
    for i, p in enumerate(parts):
        for r in p:
            assert where.setdefault(r["k"], i) == i, f"key {r['k']} in two partitions"
    # two keys
    parts = _partitions(ms.from_items(ROWS, num_partitions=3).repartition(n, by=["k", "b"]))
    seen = {}
    for i, p in enumerate(parts):
        for r in p:
            assert seen.setdefault((r["k"], r["b"]), i) == i


def test_repartition_then_group_by_and_sort(runner):
    ds = ms.from_items(ROWS, num_partitions=1).repartition(4)
    same_rows(ds.group_by("k").agg(ms.sum("i").alias("si")).collect(shuffle_partitions=3),
              sql("SELECT k, sum(i) AS si FROM t GROUP BY k", t=TABLE))
    ordered(ds.sort("id").collect(), ROWS, ["id"])


def _counting_map(directory: str):
    def fn(row):
        fd, _ = tempfile.mkstemp(dir=directory)
        os.close(fd)
        return {"id": row["id"], "k": row["k"], "sq": row["id"] * row["id"]}
    return fn


def test_cache_reuses_materialized_partitions(runner, tmp_path):
    calls = tmp_path / "calls"
    calls.mkdir()
    cached = ms.from_items(ROWS, num_partitions=3).map(_counting_map(str(calls))).cache()
    assert cached.count() == len(ROWS)
    assert len(os.listdir(calls)) == len(ROWS)
    assert any("cache" in s["purpose"] for s in ms.last_job_stats().stages)
    # later actions read the cached partitions: the map function does not run again
    got = cached.filter(col("k") == 2).collect()
    same_rows(got, [{"id": r["id"], "k": r["k"], "sq": r["id"] ** 2} for r in ROWS if r["k"] == 2])
    agg = cached.group_by("k").agg(ms.sum("sq").alias("s")).collect()
    same_rows(agg, sql("SELECT k, sum(id * id) AS s FROM t GROUP BY k", t=TABLE))
    assert not any("cache" in s["purpose"] for s in ms.last_job_stats().stages)
    assert len(os.listdir(calls)) == len(ROWS)
    assert "cached dataset" in cached.explain(print_plan=False)
    # unpersist: the next action computes again
    cached.unpersist()
    assert cached.count() == len(ROWS)
    assert len(os.listdir(calls)) == 2 * len(ROWS)
    assert cached.cache() is cached


def test_cache_used_twice_in_one_job(runner, tmp_path):
    calls = tmp_path / "calls"
    calls.mkdir()
    cached = ms.from_items(ROWS, num_partitions=2).map(_counting_map(str(calls))).cache()
    got = cached.join(cached.select("id", twice=col("sq") * 2), on="id", broadcast=False).collect()
    assert len(got) == len(ROWS)
    assert all(r["twice"] == 2 * r["sq"] for r in got)
    assert len(os.listdir(calls)) == len(ROWS)


# ----------------------------------------------------------------------------- actions


def test_count_take_first(runner):
    ds = ms.from_items(ROWS, num_partitions=3)
    assert ds.count() == len(ROWS)
    assert ds.count(shuffle_partitions=1) == len(ROWS)
    assert ds.filter(col("k") == 4).count() == sum(r["k"] == 4 for r in ROWS)
    assert ms.from_items([]).count() == 0
    assert ds.take(4) == ROWS[:4]
    assert ds.first() == ROWS[0]
    assert ds.filter(col("id") < 0).first() is None
    assert ds.filter(col("id") < 0).take(3) == []


def test_show(capsys):
    ms.from_items(ROWS, num_partitions=2).select("id", "s").show(3)
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert "| id" in lines[1] and "s" in lines[1]
    assert len(lines) == 3 + 4  # 3 rows, header, 3 separators
    assert "null" in out or ROWS[0]["s"] in out


def test_iter_batches_and_to_arrow(runner):
    ds = ms.from_items(ROWS, num_partitions=4)
    batches = list(ds.iter_batches())
    assert batches and all(isinstance(b, pa.RecordBatch) and b.num_rows for b in batches)
    same_rows([r for b in batches for r in b.to_pylist()], ROWS)
    t = ds.to_arrow()
    assert isinstance(t, pa.Table) and t.num_rows == len(ROWS)
    assert t.schema.names == ["id", "k", "s", "i", "f", "b"]
    assert list(ds.filter(col("id") < 0).iter_batches()) == []


def test_to_pandas_and_polars():
    import pandas as pd

    ds = ms.from_items(ROWS, num_partitions=3)
    df = ds.to_pandas()
    assert isinstance(df, pd.DataFrame)
    assert list(df.columns) == ["id", "k", "s", "i", "f", "b"]
    assert len(df) == len(ROWS)
    assert df["id"].tolist() == [r["id"] for r in ROWS]
    pl_df = ds.to_polars()
    assert pl_df.shape == (len(ROWS), 6)
    # and back again
    same_rows(ms.from_pandas(df[["id", "s"]]).collect(), [{"id": r["id"], "s": r["s"]} for r in ROWS])
    same_rows(ms.from_polars(pl_df).collect(), ROWS)


def test_explain_mentions_stages_and_pushdown():
    ds = ms.from_items(ROWS, num_partitions=2)
    sorted_sums = (ds.select("k", "i", x=col("f") * 2).filter(col("x") > 0).group_by("k")
                   .agg(ms.sum("i")).sort("k"))
    # (small_sort_rows=0: the range-partitioned sort, which these 8 groups would not take)
    text = sorted_sums.explain(print_plan=False, small_sort_rows=0)
    for part in ("== Logical plan ==", "== Optimized plan ==", "== Physical plan ==", "Stage",
                 "partial aggregate", "shuffle write", "hash(k)", "range(k)", "columns=['k', 'i', 'f']"):
        assert part in text, part
    assert text.count("Stage ") >= 3
    assert "Sort k (one task: at most 8 rows" in sorted_sums.explain(print_plan=False)


def test_explain_prints(capsys):
    text = ms.from_items(ROWS).filter(col("k") > 1).explain()
    assert capsys.readouterr().out.strip() == text.strip()


# ----------------------------------------------------------------------------- spilling

SPILL_N = 300_000


@pytest.fixture(scope="module")
def big():
    rng = np.random.default_rng(11)
    k = rng.integers(0, 100_000, SPILL_N)
    k[rng.random(SPILL_N) < 0.3] = 7  # one hot key
    s = pa.array([f"värde-{i % 7919}-{i % 13}" for i in range(SPILL_N)])
    return pa.table({"k": k, "v": rng.integers(-1000, 1000, SPILL_N), "s": s})


def test_group_by_spills_under_tiny_memory_limit(runner, big):
    got = (ms.from_arrow(big, num_partitions=2).group_by("k")
           .agg(ms.sum("v").alias("sv"), ms.count().alias("n"), ms.count_distinct("s").alias("cd"),
                ms.mean("v").alias("m"), ms.max("s").alias("mx"))
           .to_arrow(memory_limit="16MB", shuffle_partitions=3))
    assert spills() > 0
    want = pa.table(duckdb.sql("SELECT k, sum(v)::BIGINT AS sv, count(*) AS n, count(DISTINCT s) AS cd, "
                               "avg(v) AS m, max(s) AS mx FROM big GROUP BY k").to_arrow_table())
    g, w = got.sort_by("k"), want.sort_by("k")
    assert g.num_rows == w.num_rows
    for c in ("k", "sv", "n", "cd", "mx"):
        assert g.column(c).to_pylist() == w.column(c).to_pylist(), c
    assert np.allclose(g.column("m").to_numpy(), w.column("m").to_numpy())


def test_join_spills_under_tiny_memory_limit(runner, big):
    rng = np.random.default_rng(12)
    rtab = pa.table({"k": np.arange(0, 150_000), "w": rng.integers(0, 10, 150_000),
                      "t": pa.array([f"t{i}" for i in range(150_000)])})
    for how in ("inner", "outer"):
        got = ms.from_arrow(big, num_partitions=2).join(ms.from_arrow(rtab, num_partitions=2), on="k", how=how,
                                                        broadcast=False).to_arrow(memory_limit="16MB")
        assert spills() > 0
        key = "coalesce(big.k, right_t.k)" if how == "outer" else "big.k"
        want = duckdb.sql(f"SELECT count(*), sum({key}), sum(v), sum(w), count(t), count(s) FROM big "
                          f"{SQL_JOIN[how]} rtab AS right_t ON big.k = right_t.k").fetchall()[0]
        assert got.num_rows == want[0]
        summary = (got.num_rows, got.column("k").to_numpy().sum(),
                   int(np.nansum(got.column("v").to_numpy(zero_copy_only=False))),
                   int(np.nansum(got.column("w").to_numpy(zero_copy_only=False))),
                   got.num_rows - got.column("t").null_count, got.num_rows - got.column("s").null_count)
        assert summary == tuple(int(x) for x in want)


def test_sort_spills_under_tiny_memory_limit(runner, big):
    got = ms.from_arrow(big, num_partitions=2).sort(["s", "v", "k"], descending=[True, False, False]).to_arrow(
        memory_limit="16MB", shuffle_partitions=3)
    assert spills() > 0
    want = big.sort_by([("s", "descending"), ("v", "ascending"), ("k", "ascending")])
    assert got.column("s").to_pylist() == want.column("s").to_pylist()
    assert got.column("v").to_pylist() == want.column("v").to_pylist()


# Operator level: force the grace-hash and external-merge paths with a tiny budget.


def _run_operator(op, inputs: dict[int, list[pa.RecordBatch]], limit: int, ctx: TaskContext) -> pa.Table:
    op.open(ctx)
    op._limit = lambda: limit
    out: list[pa.RecordBatch] = []
    for port in op.input_order if op.num_inputs > 1 else (0,):
        for b in inputs[port]:
            out += list(op.process(b, port))
        out += list(op.end_input(port))
    out += list(op.finish())
    op.close()
    return pa.Table.from_batches(out) if out else pa.table({})


@pytest.fixture
def tiny_ctx(tmp_path):
    return TaskContext(spill_dir=str(tmp_path), memory_budget=1 << 20, batch_size=1000)


def _op_table(n=20000, seed=3):
    rnd = random.Random(seed)
    return pa.table({"a": [rnd.choice([None, 1, 2, 3, 4, 5]) for _ in range(n)],
                     "s": [rnd.choice(STRINGS) for _ in range(n)],
                     "k": [7 if rnd.random() < 0.5 else rnd.randrange(3000) for _ in range(n)],
                     "i": list(range(n))})


@pytest.mark.parametrize("by,desc,nulls_last", [(["a", "s"], [False, True], None), (["s", "a"], [True, False], True),
                                                (["a"], [True], False)])
def test_sort_operator_external_merge(tiny_ctx, by, desc, nulls_last):
    t = _op_table()
    got = _run_operator(Sort(by, desc, nulls_last), {0: t.to_batches(max_chunksize=997)}, 1 << 14, tiny_ctx)
    assert tiny_ctx.counters[("millstream", "spills")] > 5
    order = _order(by, desc, nulls_last) + ", i"
    want = sql(f"SELECT * FROM t ORDER BY {order}", t=t)
    ordered(got.to_pylist(), want, by)
    assert sorted(got.column("i").to_pylist()) == list(range(t.num_rows))


def test_aggregate_operators_grace_hash(tiny_ctx):
    t = _op_table()
    specs = [AggSpec("sum", col("i"), "si"), AggSpec("count_all", None, "n"),
             AggSpec("count_distinct", col("s"), "cd"), AggSpec("collect_list", col("s"), "cl"),
             AggSpec("mean", col("a"), "m"), AggSpec("min", col("s"), "mn"), AggSpec("max", col("a"), "mx"),
             AggSpec("count", col("a"), "ca")]
    states = _run_operator(PartialAggregate(["k"], specs), {0: t.to_batches(max_chunksize=500)}, 1 << 13,
                           tiny_ctx)
    tiny_ctx.counters.clear()
    got = _run_operator(FinalAggregate(["k"], specs), {0: states.to_batches(max_chunksize=300)}, 1 << 13,
                        tiny_ctx)
    assert tiny_ctx.counters[("millstream", "spills")] >= 1
    want = sql("SELECT k, sum(i) AS si, count(*) AS n, count(DISTINCT s) AS cd, "
               "coalesce(list_sort(list(s) FILTER (WHERE s IS NOT NULL)), []) AS cl, avg(a) AS m, "
               "min(s) AS mn, max(a) AS mx, count(a) AS ca FROM t GROUP BY k", t=t)
    same_rows(_sort_lists(got.to_pylist(), "cl"), want)


@pytest.mark.parametrize("how", HOWS)
def test_join_operator_grace_hash(tiny_ctx, how):
    rnd = random.Random(4)
    n = 10000
    t = pa.table({"a": [None if rnd.random() < 0.05 else rnd.randrange(500) for _ in range(n)],
                  "s": [rnd.choice(STRINGS) for _ in range(n)], "i": list(range(n))})
    r = pa.table({"a": [None if rnd.random() < 0.05 else rnd.randrange(600) for _ in range(3000)],
                  "s": [rnd.choice(["p", "q"]) for _ in range(3000)], "j": list(range(3000))})
    got = _run_operator(HashJoin(["a"], ["a"], how), {0: t.to_batches(max_chunksize=1000),
                                                       1: r.to_batches(max_chunksize=100)}, 1 << 12, tiny_ctx)
    assert tiny_ctx.counters[("millstream", "spills")] == 1
    want = join_tables(t, r, ["a"], ["a"], how)
    assert got.column_names == want.column_names
    same_rows(got.to_pylist(), want.to_pylist())


# ----------------------------------------------------------------------------- key normalization


def test_negative_zero_groups_and_joins_with_zero(runner):
    rows = [{"x": v, "id": i} for i, v in enumerate([0.0, -0.0, float("nan"), 1.0, None, float("nan"), -0.0])]
    ds = ms.from_items(rows, num_partitions=3)
    got = {("nan" if r["x"] != r["x"] else r["x"]): r["n"]
           for r in ds.group_by("x").agg(ms.count().alias("n")).collect(shuffle_partitions=3)}
    assert got == {0.0: 3, "nan": 2, 1.0: 1, None: 1}  # as DuckDB: -0.0 = 0.0, NaN = NaN
    assert len(ds.select("x").distinct().collect(shuffle_partitions=2)) == 4
    assert ds.agg(ms.count_distinct("x").alias("cd")).collect() == [{"cd": 3}]
    right = ms.from_items([{"x": 0.0, "w": "zero"}, {"x": 1, "w": "one"}])
    for bc in (True, False):
        j = ds.join(right, on="x", broadcast=bc).collect(shuffle_partitions=3)
        assert sorted(r["id"] for r in j) == [0, 1, 3, 6]


def test_categorical_keys_join_and_group_with_strings():
    import pandas as pd

    pdf = pd.DataFrame({"k": pd.Categorical([f"key{i % 10}" for i in range(100)]), "v": range(100)})
    left = ms.from_pandas(pdf, num_partitions=3)
    right = ms.from_items([{"k": f"key{i}", "w": i} for i in range(5, 15)], num_partitions=2)
    for how in ("inner", "right", "outer"):
        got = left.join(right, on="k", how=how, broadcast=False).collect(shuffle_partitions=4)
        want = {"inner": 50, "right": 55, "outer": 105}[how]
        assert len(got) == want
        assert all(r["k"] is not None for r in got)
    got = left.group_by("k").agg(ms.count().alias("n")).collect(shuffle_partitions=3)
    assert sorted((r["k"], r["n"]) for r in got) == [(f"key{i}", 10) for i in range(10)]


# ----------------------------------------------------------------------------- empty results keep their schema

SCHEMA = pa.schema([("k", pa.int64()), ("v", pa.int64()), ("s", pa.string())])


def _empty(parts: int = 2) -> ms.Dataset:
    return ms.from_arrow(pa.Table.from_pylist([], schema=SCHEMA), num_partitions=parts)


def test_empty_results_keep_schema(runner):
    assert _empty().group_by("k").agg(ms.sum("v").alias("sv"), ms.collect_list("s").alias("l"),
                                      ms.mean("v").alias("m")).to_arrow().schema == pa.schema(
        [("k", pa.int64()), ("sv", pa.int64()), ("l", pa.list_(pa.string())), ("m", pa.float64())])
    assert _empty().sort("k").to_arrow().schema == SCHEMA
    assert _empty().distinct().to_arrow().schema == SCHEMA
    assert _empty().filter(col("k") > 1).to_arrow().schema == SCHEMA
    assert ms.from_items(ROWS, num_partitions=3).limit(0).to_arrow().schema == TABLE.schema
    right = ms.from_items([{"k": 1, "w": 2.0}])
    for bc in (True, False):
        t = _empty().join(right, on="k", broadcast=bc).to_arrow(shuffle_partitions=3)
        assert t.num_rows == 0 and t.schema.names == ["k", "v", "s", "w"]
    # a global aggregate over no rows types its nulls from the input
    g = _empty().agg(ms.sum("v").alias("a"), ms.min("s").alias("b"), ms.first("s").alias("f")).to_arrow()
    assert g.schema.types == [pa.int64(), pa.string(), pa.string()]


def test_empty_group_by_then_outer_join_names_columns_right():
    right = ms.from_items([{"k": 1, "r": 5, "v": 7}])
    for bc in (True, False):
        got = (_empty().group_by("k", "v").agg(ms.count().alias("n"))
               .join(right, on="k", how="outer", broadcast=bc).collect(shuffle_partitions=2))
        assert got == [{"k": 1, "v": None, "n": None, "r": 5, "v_right": 7}]
        got = (_empty().sort("k").join(right, on="k", how="right", broadcast=bc)
               .collect(shuffle_partitions=2))
        assert got == [{"k": 1, "v": None, "s": None, "r": 5, "v_right": 7}]
        # an inner join without matches, then an outer join
        none = ms.from_items([{"k": 99, "x": 1}])
        got = (ms.from_items([{"k": 1, "v": 1, "s": "a"}]).join(none, on="k", broadcast=bc)
               .join(right, on="k", how="outer", broadcast=bc).collect(shuffle_partitions=2))
        assert got == [{"k": 1, "v": None, "s": None, "x": None, "r": 5, "v_right": 7}]


def test_aggregates_of_all_null_columns(runner):
    # the second aggregate reads null-typed columns: Arrow's hash_distinct crashed the worker
    # (SIGSEGV) and hash_first has no kernel for them
    g = _empty().agg(ms.sum("v").alias("a"), ms.min("s").alias("b"), ms.first("s").alias("f"))
    got = g.agg(ms.sum("a").alias("x"), ms.first("f").alias("y"), ms.count_distinct("b").alias("z"),
                ms.collect_list("a").alias("l"), ms.count("b").alias("c")).collect()
    assert got == [{"x": None, "y": None, "z": 0, "l": [], "c": 0}]
    rows = [{"g": i % 3, "x": None} for i in range(12)]
    got = ms.from_items(rows, num_partitions=3).group_by("g").agg(
        ms.first("x").alias("f"), ms.count_distinct("x").alias("cd"), ms.sum("x").alias("s"),
        ms.max("x").alias("mx"), ms.count("x").alias("c"), ms.count().alias("n")).collect(shuffle_partitions=2)
    assert sorted(got, key=lambda r: r["g"]) == [
        {"g": g, "f": None, "cd": 0, "s": None, "mx": None, "c": 0, "n": 4} for g in range(3)]


# ----------------------------------------------------------------------------- NaN order


def _float_rows(n=400, seed=9):
    rnd = random.Random(seed)
    vals = [None, float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1.5, -2.5, 1e300, 3.0]
    return [{"id": i, "x": rnd.choice(vals), "y": rnd.choice(vals[:6])} for i in range(n)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("desc,nulls_last", [([False, False], None), ([True, False], None),
                                             ([False, True], True), ([True, True], False)])
def test_sort_orders_nan_like_sql(runner, layout, desc, nulls_last):
    """NaN sorts above every number (DuckDB, Spark, Polars); nulls go where they are told."""
    parts, shuffle = layout
    rows = _float_rows()
    got = ms.from_items(rows, num_partitions=parts).sort(["x", "y", "id"], descending=desc + [False],
                                                         nulls_last=nulls_last).collect(shuffle_partitions=shuffle)
    want = sql(f"SELECT * FROM t ORDER BY {_order(['x', 'y'], desc, nulls_last)}, id",
               t=pa.Table.from_pylist(rows))
    # -0.0 and 0.0 are equal keys: compare them as one value
    ordered(got, want, ["id"])


def test_sort_operator_external_merge_with_nan(tiny_ctx):
    rows = _float_rows(20000, seed=10)
    t = pa.Table.from_pylist(rows)
    got = _run_operator(Sort(["x", "id"], [True, False]), {0: t.to_batches(max_chunksize=997)}, 1 << 14,
                        tiny_ctx)
    assert tiny_ctx.counters[("millstream", "spills")] > 5
    want = sql(f"SELECT * FROM t ORDER BY {_order(['x', 'id'], [True, False])}", t=t)
    ordered(got.to_pylist(), want, ["id"])


# ----------------------------------------------------------------------------- hashing


def test_hash_is_by_value_whatever_the_layout(runner):
    rnd = random.Random(8)
    words = [None if rnd.random() < 0.05 else "".join(rnd.choice("abcäö日x ") for _ in range(rnd.randrange(0, 40)))
             for _ in range(30000)]  # > 128 KiB of text: the chunked path
    arr = pa.array(words, pa.string())
    h = hash_array(arr)
    assert (h == hash_array(arr.cast(pa.large_string()))).all()
    assert (h == hash_array(pa.chunked_array([arr.slice(0, 12345), arr.slice(12345)]))).all()
    assert (h[777:20777] == hash_array(arr.slice(777, 20000))).all()
    for i in rnd.sample(range(len(words)), 200):
        assert h[i] == hash_array(pa.array([words[i]]))[0]
    same = [i for i, w in enumerate(words) if w == words[0]]
    assert len({int(h[i]) for i in same}) == 1
    nulls = [i for i, w in enumerate(words) if w is None]
    assert len({int(h[i]) for i in nulls}) == 1
    # numbers: int widths and integral floats meet; -0.0 meets 0.0
    assert (hash_array(pa.array([1, 2, None, -7], pa.int32())) == hash_array(pa.array([1, 2, None, -7]))).all()
    assert (hash_array(pa.array([1.0, -0.0, 3.0])) == hash_array(pa.array([1, 0, 3]))).all()
    assert (hash_array(pa.array(["a", "b"]).dictionary_encode()) == hash_array(pa.array(["a", "b"]))).all()
    pids = partition_ids([arr], len(arr), 7)
    assert pids.min() >= 0 and pids.max() == 6
    assert len(hash_columns([arr, pa.array(range(len(arr)))], len(arr))) == len(arr)


def _reference_string_hash(value: bytes | None) -> int:
    """The string hash, one byte at a time: sum of (byte + 1) * weight[pos % 64] *
    (1 + pos // 64), xor length * M2, splitmix64-finalized (all modulo 2**64)."""
    from millstream.core.hashing import _M1, _M2, _NULL_HASH, _positions

    mask = (1 << 64) - 1
    if value is None:
        return int(_NULL_HASH)
    weights = [int(w) for w in _positions()]
    if value:
        x = sum((b + 1) * weights[p % 64] * (1 + p // 64) for p, b in enumerate(value)) & mask
        x ^= (len(value) * int(_M2)) & mask
    else:
        x = 0
    x ^= x >> 30
    x = (x * int(_M1)) & mask
    x ^= x >> 27
    x = (x * int(_M2)) & mask
    return x ^ (x >> 31)


@pytest.mark.parametrize("case", ["ids", "words", "long", "repeated", "empty"])
def test_string_hash_values_do_not_change(case):
    # shuffles place keys by these values in every process: each way of computing them
    # (uniform short keys, mixed lengths, long strings, through a dictionary) gives the same
    rnd = random.Random(5)
    values = {
        "ids": [f"id{rnd.randrange(10**9):010d}" for _ in range(3000)],
        "words": ["".join(rnd.choice("abcé日 ") for _ in range(rnd.randrange(1, 20)))
                  for _ in range(3000)],
        "long": ["x" * rnd.randrange(60, 150) + str(i) for i in range(500)],
        "repeated": [rnd.choice(["a", "bb", "ccc", None]) for _ in range(3000)],
        "empty": ["", None, "", "a"] * 100,
    }[case]
    got = hash_array(pa.array(values, pa.string()))
    want = [_reference_string_hash(None if v is None else v.encode()) for v in values]
    assert [int(h) for h in got] == want


@pytest.mark.parametrize("num_partitions", [3, 300, 70000])
def test_split_by_partition_keeps_row_order_within_partitions(num_partitions):
    from millstream.core.hashing import split_by_partition

    rng = np.random.default_rng(num_partitions)
    n = 50_000
    pids = rng.integers(0, num_partitions, n)
    batch = pa.record_batch({"row": np.arange(n)})
    parts = split_by_partition(batch, pids, num_partitions)
    assert [p for p, _ in parts] == sorted(set(pids.tolist()))
    for p, part in parts:
        assert part.column(0).to_numpy().tolist() == np.flatnonzero(pids == p).tolist()


@pytest.mark.parametrize("target", [0, 2])
def test_split_by_partition_passes_a_batch_bound_for_one_partition_whole(target):
    from millstream.core.hashing import split_by_partition

    batch = pa.record_batch({"row": np.arange(1000), "s": [str(i) for i in range(1000)]})
    parts = split_by_partition(batch, np.full(1000, target), 3)
    assert len(parts) == 1 and parts[0][0] == target
    assert parts[0][1] is batch  # no gather of rows that all stay together


def test_integer_hash_values_do_not_change():
    # keyed state is placed by these values: every integer width, with and without nulls,
    # hashes as splitmix64 of the value (nulls: the null hash)
    from millstream.core.hashing import _M1, _M2, _NULL_HASH

    mask = (1 << 64) - 1

    def ref(v):
        if v is None:
            return int(_NULL_HASH)
        x = v & mask
        x ^= x >> 30
        x = (x * int(_M1)) & mask
        x ^= x >> 27
        x = (x * int(_M2)) & mask
        return x ^ (x >> 31)

    values = [0, 1, -1, 2**40 + 3, -(2**62), 12345]
    for t in (pa.int64(), pa.int32(), pa.int16()):
        vals = [v for v in values if pa.types.is_int64(t) or abs(v) < 2**15]
        for with_null in (False, True):
            vs = [*vals, None] if with_null else vals
            got = hash_array(pa.array(vs, t))
            assert [int(h) for h in got] == [ref(v) for v in vs]
    sliced = pa.array(values, pa.int64()).slice(2, 3)
    assert [int(h) for h in hash_array(sliced)] == [ref(v) for v in values[2:5]]


def test_join_and_distinct_on_long_string_keys():
    rnd = random.Random(21)
    keys = ["ключ-" + "x" * rnd.randrange(50, 200) + str(i % 3000) for i in range(20000)]
    left = pa.table({"k": keys, "i": list(range(20000))})
    half = sorted(set(keys))[::2]
    right = pa.table({"k": half, "j": list(range(len(half)))})
    got = ms.from_arrow(left, num_partitions=3).join(ms.from_arrow(right, num_partitions=2), on="k",
                                                     broadcast=False).to_arrow(shuffle_partitions=4)
    want = sql("SELECT count(*) AS n, sum(i) AS si, sum(j) AS sj FROM l JOIN r ON l.k = r.k", l=left, r=right)[0]
    assert (got.num_rows, sum(got.column("i").to_pylist()), sum(got.column("j").to_pylist())) == \
        (want["n"], want["si"], want["sj"])
    assert ms.from_arrow(left, num_partitions=3).select("k").distinct().count(shuffle_partitions=5) == len(set(keys))


# ----------------------------------------------------------------------------- all-null (null-typed) columns

NULL_ROWS = [{"k": None, "v": None, "s": None, "i": i} for i in range(6)]


def test_null_typed_columns_through_wide_operators(runner):
    ds = ms.from_items(NULL_ROWS, num_partitions=2)  # k, v, s are all None: Arrow's null type
    assert ds.filter(col("v") > 3).collect() == []
    assert [r["i"] for r in ds.sort(["v", "i"]).collect(shuffle_partitions=2)] == list(range(6))
    assert ds.group_by("k").agg(ms.sum("v").alias("sv"), ms.count_distinct("s").alias("c")).collect() == \
        [{"k": None, "sv": None, "c": 0}]
    right = ms.from_items([{"k": 1, "z": 2}])
    for how in ("left", "right", "outer"):
        for bc in (True, False):
            got = ds.join(right, on="k", how=how, broadcast=bc).collect(shuffle_partitions=2)
            want = {"left": 6, "right": 1, "outer": 7}[how]
            assert len(got) == want, (how, bc)
            if how != "left":
                assert {"k": 1, "v": None, "s": None, "i": None, "z": 2} in got


def test_outer_join_key_keeps_the_wider_type():
    left = ms.from_arrow(pa.table({"k": pa.array([1, 2], pa.int32()), "x": [1, 2]}))
    right = ms.from_arrow(pa.table({"k": pa.array([2**40, 1], pa.int64()), "y": [5, 6]}))
    got = left.join(right, on="k", how="outer", broadcast=False).collect(shuffle_partitions=2)
    same_rows(got, [{"k": 1, "x": 1, "y": 6}, {"k": 2, "x": 2, "y": None}, {"k": 2**40, "x": None, "y": 5}])


def test_expressions_on_null_typed_columns():
    got = ms.from_items(NULL_ROWS, num_partitions=2).with_columns(
        u=col("s").str.upper(), n=col("s").str.len(), f=col("v").fill_null(1)).collect()
    assert [(r["u"], r["n"], r["f"]) for r in got] == [(None, None, 1)] * 6
