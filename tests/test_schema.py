"""Every logical node knows its output schema: ``Dataset.schema`` (derived from the plan,
without running a job) equals the schema of the rows ``to_arrow()`` returns, names and
types, for a broad set of plans; a missing column is a SchemaError naming it."""

from __future__ import annotations

import datetime as dt
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import millstream as ms
from millstream.errors import SchemaError
from millstream.plan import logical as L
from millstream.testing import TestSource

T0 = dt.datetime(2024, 1, 1)

ROWS = [{"k": i % 3, "s": f"s{i % 4}", "v": i, "f": i / 2, "b": i % 2 == 0,
         "xs": list(range(i % 3)), "t": T0 + dt.timedelta(seconds=7 * i),
         "k32": i % 3} for i in range(40)]
BASE_SCHEMA = pa.schema([("k", pa.int64()), ("s", pa.string()), ("v", pa.int64()),
                         ("f", pa.float64()), ("b", pa.bool_()), ("xs", pa.list_(pa.int64())),
                         ("t", pa.timestamp("us")), ("k32", pa.int32())])


def base(parts: int = 2) -> ms.Dataset:
    return ms.from_arrow(pa.Table.from_pylist(ROWS, schema=BASE_SCHEMA), num_partitions=parts)


def other() -> ms.Dataset:
    rows = [{"k": i, "s": f"r{i}", "w": i * 10.0, "k32": i} for i in range(4)]
    schema = pa.schema([("k", pa.int64()), ("s", pa.string()), ("w", pa.float64()),
                        ("k32", pa.int32())])
    return ms.from_arrow(pa.Table.from_pylist(rows, schema=schema), num_partitions=2)


def assert_same(ds: ms.Dataset) -> None:
    static = ds._node.checked_schema()
    assert static is not None, f"no static schema for {ds._node.label()}"
    got = ds.to_arrow().schema
    assert static.names == got.names, (static, got)
    assert [f.type for f in static] == [f.type for f in got], (static, got)


def narrow_plans() -> dict[str, ms.Dataset]:
    col = ms.col
    d = base()
    return {
        "scan": d,
        "select": d.select("s", (col("v") * 2).alias("v2"), (col("f") + col("v")).alias("fv"),
                           col("v").cast("int32").alias("c"), ms.lit(1).alias("one"),
                           (col("v") > 3).alias("gt"), col("s").str.upper().alias("up"),
                           col("t").dt.year().alias("y"), col("s").str.len().alias("n"),
                           ms.when(col("v") > 5, "big").otherwise("small").alias("w"),
                           (col("v") / 3).alias("div"), (col("v") // 3).alias("fdiv")),
        "with_columns": d.with_columns(v=col("v").cast("float32"), z=col("k") + 1,
                                       s2=col("s").str.split("s")),
        "filter": d.filter((col("v") > 3) & col("b")),
        "filter_fn": d.filter(lambda r: r["v"] > 3),
        "drop_rename": d.drop("xs", "nope", strict=False).rename({"s": "name", "absent": "x"},
                                                             strict=False),
        "explode": d.explode("xs"),
        "sort_limit": d.sort(["k", "v"], descending=[True, False]).limit(7),
        "repartition": d.repartition(3, by="k").repartition(2),
        "cache": d.select("k", "v").cache(),
        "union": d.select("k", "v").union(d.select("v", "k")),
        "union_widen": d.select(col("k32").alias("a")).union(d.select(col("v").alias("a"))),
        "range": ms.range(10).with_columns(sq=col("id") * col("id")),
        "watermark": d.with_watermark("t", "5s").filter(col("v") > 0),
    }


def wide_plans() -> dict[str, ms.Dataset]:
    col = ms.col
    d = base()
    return {
        "agg": d.group_by("k", "s").agg(ms.sum("v"), ms.mean("v").alias("m"),
                                        ms.min("s").alias("mn"), ms.max("t").alias("mx"),
                                        ms.count("v").alias("c"), ms.count().alias("n"),
                                        ms.count_distinct("s").alias("cd"),
                                        ms.first("f").alias("fst"),
                                        ms.collect_list("v").alias("vs"),
                                        ms.sum("k32").alias("s32"), ms.sum("f").alias("sf")),
        "agg_count_fast": d.group_by("s").agg(ms.count()),
        "agg_expr_key": d.group_by((col("v") % 5).alias("m5")).agg(ms.sum("f")),
        "agg_global": d.agg(ms.sum("v"), ms.count().alias("n"), ms.mean("f")),
        "group_count": d.group_by("k").count(),
        "distinct": d.select("k", "s").distinct(),
        "count_distinct_join": d.join(other(), on="k", how="inner"),
        "join_left": d.join(other(), on="k", how="left", broadcast=False),
        "join_right": d.join(other(), on="k", how="right", broadcast=False),
        "join_outer": d.join(other(), on="k", how="outer", broadcast=False),
        "join_semi": d.join(other(), on="k", how="semi"),
        "join_anti": d.join(other(), on="k", how="anti", broadcast=False),
        "join_names": d.join(other(), left_on="v", right_on="k", suffix="_o"),
        "join_types": d.join(other(), left_on="k32", right_on="k", how="outer",
                             broadcast=False),
        "join_broadcast": d.join(other(), on=["k", "s"], broadcast=True),
        "join_widen_key": d.select(col("k32").alias("k"), "v").join(other(), on="k",
                                                                     how="outer",
                                                                     broadcast=False),
    }


def window_plans() -> dict[str, ms.Dataset]:
    d = base().with_watermark("t", "1s")
    tz = ms.from_arrow(pa.table({"k": [1, 2, 1], "v": [1, 2, 3], "t": pa.array(
        [0, 60_000_000, 120_000_000], pa.timestamp("us", tz="UTC"))}))
    return {
        "tumbling": d.group_by("k").window(ms.tumbling("1m")).agg(ms.sum("v"), ms.count()),
        "sliding": d.window(ms.sliding("1m", "20s")).agg(ms.mean("f").alias("m")),
        "session": d.group_by("s").window(ms.session("20s"), allowed_lateness="10s")
                    .agg(ms.collect_list("v").alias("vs")),
        "tumbling_late": d.group_by("k").window(ms.tumbling("30s"), allowed_lateness="5s")
                          .agg(ms.max("v")),
        "global": d.group_by("k").window(ms.global_window(ms.count_trigger(3))).agg(ms.sum("v")),
        "global_acc": d.group_by("k").window(ms.global_window(accumulate=True))
                       .agg(ms.min("s").alias("m")),
        "tz": tz.with_watermark("t").group_by("k").window(ms.tumbling("1m")).agg(ms.sum("v")),
    }


def stream_join_plans() -> dict[str, ms.Dataset]:
    left = base().with_watermark("t", "1s")
    rschema = pa.schema([("k", pa.int32()), ("t", pa.timestamp("us")), ("w", pa.float64()),
                         ("v", pa.int64())])
    right = ms.from_arrow(pa.Table.from_pylist(
        [{"k": i % 3, "t": T0 + dt.timedelta(seconds=5 * i), "w": i * 1.5, "v": i}
         for i in range(20)], schema=rschema)).with_watermark("t", "1s")
    return {
        "interval": left.interval_join(right, on="k", between=("-10s", "10s")),
        "interval_outer": left.interval_join(right, on="k", between=("0s", "10s"), how="outer"),
        "interval_names": left.interval_join(right, left_on="v", right_on="v",
                                             between=("-1m", "1m"), how="right", suffix="_r"),
        "window_join": left.window_join(right, on="k", window=ms.tumbling("30s"), how="left"),
        "interval_widen_key": right.interval_join(left, on="k", between=("0s", "10s"),
                                                  how="outer"),
        "latest": left.join_latest(right.select("k", "w", "v"), on="k", how="left"),
    }


@pytest.mark.parametrize("name", list(narrow_plans()))
def test_narrow_and_exchange_schemas_match_the_result(name):
    assert_same(narrow_plans()[name])


@pytest.mark.parametrize("name", list(wide_plans()))
def test_aggregate_and_join_schemas_match_the_result(name):
    assert_same(wide_plans()[name])


@pytest.mark.parametrize("name", list(window_plans()))
def test_window_schemas_match_the_result(name):
    assert_same(window_plans()[name])


@pytest.mark.parametrize("name", list(stream_join_plans()))
def test_stream_join_schemas_match_the_result(name):
    assert_same(stream_join_plans()[name])


def test_process_function_with_output_schema():
    schema = pa.schema([("k", pa.int64()), ("total", pa.int64())])

    def running(row, ctx):
        st = ctx.get_state("total", 0)
        st.update(st.value() + row["v"])
        yield {"k": row["k"], "total": st.value()}

    ds = base().group_by("k").process(running, output_schema=schema)
    assert_same(ds)
    assert base().group_by("k").process(running)._node.schema is None


def test_file_sources(tmp_path):
    pq.write_table(pa.Table.from_pylist(ROWS, schema=BASE_SCHEMA), tmp_path / "a.parquet")
    (tmp_path / "c.csv").write_text("id,name,x\n1,a,1.5\n2,b,\n")
    (tmp_path / "j.json").write_text("\n".join(json.dumps({"a": i, "b": [i], "c": "x"})
                                               for i in range(5)) + "\n")
    (tmp_path / "t.txt").write_text("one two\nthree\n")
    part = tmp_path / "part"
    for day in (1, 2):
        (part / f"day={day}").mkdir(parents=True)
        pq.write_table(pa.table({"v": [day, day * 2]}), part / f"day={day}" / "p.parquet")
    plans = [
        ms.read_parquet(str(tmp_path / "a.parquet")).select("k", "t"),
        ms.read_parquet(str(tmp_path / "a.parquet")).filter(ms.col("v") > 3)
          .group_by("s").agg(ms.sum("f")),
        ms.read_parquet(str(part)),
        ms.read_csv(str(tmp_path / "c.csv")),
        ms.read_json(str(tmp_path / "j.json")).explode("b"),
        ms.read_text(str(tmp_path / "t.txt")).with_columns(n=ms.col("text").str.len()),
        ms.read_text(str(tmp_path / "t.txt"), with_offsets=True),
    ]
    for ds in plans:
        assert_same(ds)


def test_schema_needs_no_job_when_the_plan_tells():
    before = ms.last_job_stats()
    ds = wide_plans()["agg"].join(other(), on="k").sort("k")
    assert ds.schema.names[:2] == ["k", "s"]
    assert ds.columns == ds.schema.names
    assert ms.last_job_stats() is before


def test_python_functions_hide_the_schema_until_a_sample_runs():
    ds = base().map(lambda r: {"k": r["k"], "twice": r["v"] * 2.0})
    assert ds._node.schema is None
    assert ds.schema == pa.schema([("k", pa.int64()), ("twice", pa.float64())])
    assert ds.columns == ["k", "twice"]
    batches = base().map_batches(lambda t: t.select(["s"]))
    assert batches.schema.names == ["s"]
    pairs = ms.mapreduce(base(), lambda _k, row: [(row["s"], 1)], lambda k, vs: [(k, sum(vs))])
    assert pairs.columns == ["key", "value"]


def test_missing_columns_raise_a_schema_error_naming_them():
    d = base()
    cases = {
        "nope": lambda: d.select("k", "nope"),
        "missing_key": lambda: d.group_by("missing_key").agg(ms.sum("v")),
        "gone": lambda: d.filter(ms.col("gone") > 1).select("k"),
        "absent": lambda: d.join(other(), left_on="absent", right_on="k"),
        "when_col": lambda: d.with_watermark("t").group_by("k")
                             .window(ms.tumbling("1m"), on="when_col").agg(ms.sum("v")),
        "zz": lambda: d.sort("zz"),
    }
    for name, build in cases.items():
        with pytest.raises(SchemaError, match=name):  # when the transformation is built
            build()
    node = L.Project(d._node, (ms.col("nope"),))
    assert node.schema is None  # the property itself never raises
    with pytest.raises(SchemaError, match="nope"):
        node.checked_schema()


def test_unbounded_source_without_schema_is_not_run():
    src = TestSource()
    with pytest.raises(SchemaError, match="only known once it runs"):
        ms.Dataset(L.Scan(src)).map(lambda r: r).schema  # noqa: B018
    known = TestSource(schema=pa.schema([("a", pa.int64())]))
    assert ms.Dataset(L.Scan(known)).with_columns(b=ms.col("a") + 1).columns == ["a", "b"]
