"""Batch joins: the build side indexed once per task, residual conditions on every join
type, joins on a condition alone (nested loops), cross joins, and their schemas and
plans; DuckDB is the oracle (random data with nulls through hypothesis where it fits)."""

from __future__ import annotations

import datetime as dt
import decimal
import random

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracles import duckdb_connect

import millstream as ms
from millstream.core.context import TaskContext
from millstream.errors import PlanError, SchemaError
from millstream.expr.nodes import col
from millstream.ops.join import BUILDS_COUNTER, HashJoin, JoinIndex, join_tables
from millstream.ops.join import probe as join_probe
from millstream.ops.join.index import pair_chunks
from millstream.ops.stream_join import BroadcastTableJoin

HOWS = ["inner", "left", "right", "outer", "semi", "anti"]
SQL_JOIN = {"inner": "JOIN", "left": "LEFT JOIN", "right": "RIGHT JOIN",
            "outer": "FULL OUTER JOIN"}


def _pairs_sql(how: str, keys: list[str], cond: str | None) -> str:
    """(lid, rid) of a join of l and r in DuckDB (lid alone for semi and anti)."""
    on = " AND ".join([f"l.{k} = r.{k}" for k in keys] + ([cond] if cond else [])) or "true"
    if how in ("semi", "anti"):
        neg = "NOT " if how == "anti" else ""
        return f"SELECT l.lid FROM l WHERE {neg}EXISTS (SELECT 1 FROM r WHERE {on})"
    return f"SELECT l.lid, r.rid FROM l {SQL_JOIN[how]} r ON {on}"


def duck(query: str, **tables: pa.Table) -> list[tuple]:
    con = duckdb_connect()
    try:
        for name, t in tables.items():
            con.register(name, t)
        return sorted(con.execute(query).fetchall(), key=repr)
    finally:
        con.close()


def pairs(table: pa.Table, how: str) -> list[tuple]:
    """(lid, rid) of a join result (lid alone for semi and anti), sorted."""
    if how in ("semi", "anti"):
        return sorted(((v,) for v in table.column("lid").to_pylist()), key=repr)
    return sorted(zip(table.column("lid").to_pylist(), table.column("rid").to_pylist()),
                  key=repr)


# ----------------------------------------------------------------------------- data

STRS = ["a", "b", "cc", "", "Ü"]


def _side(rng: random.Random, n: int, idname: str, other: str, nulls: float = 0.15
          ) -> pa.Table:
    def maybe(v):
        return None if rng.random() < nulls else v

    floats = [0.0, -0.0, 1.5, float("nan"), 2.0, -3.25]
    return pa.table({
        "k": pa.array([maybe(rng.randrange(6)) for _ in range(n)], pa.int64()),
        "s": pa.array([maybe(rng.choice(STRS)) for _ in range(n)], pa.string()),
        "f": pa.array([maybe(rng.choice(floats)) for _ in range(n)], pa.float64()),
        other: pa.array([maybe(rng.randrange(-5, 10)) for _ in range(n)], pa.int64()),
        idname: pa.array(range(n), pa.int64()),
    })


def tables(seed: int = 1, nl: int = 60, nr: int = 40) -> tuple[pa.Table, pa.Table]:
    rng = random.Random(seed)
    return _side(rng, nl, "lid", "x"), _side(rng, nr, "rid", "y")


CONDITIONS = {
    "lt": (col("x") < col("y"), "l.x < r.y"),
    "ne": (col("x") != col("y"), "l.x <> r.y"),
    "arith": ((col("x") + col("y")) % 3 == 0, "(l.x + r.y) % 3 = 0"),
    # a right column whose name the left side has too carries the suffix
    "clash": (col("s") != col("s_right"), "l.s <> r.s"),
}
KEYSETS = [["k"], ["s"], ["f"], ["k", "s"]]


# ----------------------------------------------------------------------------- build once


class _CountingIndex(JoinIndex):
    built = 0

    def __init__(self, *args, **kwargs):
        type(self).built += 1
        super().__init__(*args, **kwargs)


def _run(op, inputs: dict[int, list[pa.RecordBatch]], ctx: TaskContext) -> pa.Table:
    op.open(ctx)
    out: list[pa.RecordBatch] = []
    for port in op.input_order:
        for b in inputs.get(port, []):
            out += list(op.process(b, port))
        out += list(op.end_input(port))
    out += list(op.finish())
    op.close()
    return pa.Table.from_batches(out)


@pytest.mark.parametrize("how", HOWS)
def test_hash_join_indexes_the_build_side_once_per_task(how, tmp_path, monkeypatch):
    """100 probe batches, one index of the build side (the old operator hashed the whole
    build side again for every probe batch)."""
    monkeypatch.setattr(join_probe, "JoinIndex", _CountingIndex)
    _CountingIndex.built = 0
    left, right = tables(seed=5, nl=2000, nr=1000)
    ctx = TaskContext(spill_dir=str(tmp_path))
    got = _run(HashJoin(["k", "s"], ["k", "s"], how),
               {1: right.to_batches(max_chunksize=100), 0: left.to_batches(max_chunksize=20)},
               ctx)
    assert _CountingIndex.built == 1
    assert ctx.counters[BUILDS_COUNTER] == 1
    assert pairs(got, how) == duck(_pairs_sql(how, ["k", "s"], None), l=left, r=right)


@pytest.mark.parametrize("how", ["inner", "semi", "outer"])
def test_shuffle_join_builds_one_index_per_task(how):
    rng = np.random.default_rng(6)
    left = pa.table({"k": rng.integers(0, 8000, 20000), "lid": np.arange(20000)})
    right = pa.table({"k": rng.integers(0, 8000, 5000), "rid": np.arange(5000)})
    out = ms.from_arrow(left, num_partitions=4).join(
        ms.from_arrow(right, num_partitions=2), on="k", how=how, broadcast=False)
    got = out.to_arrow(shuffle_partitions=3, batch_size=128)
    builds = ms.last_job_stats().counters.get(BUILDS_COUNTER, 0)
    assert 1 <= builds <= 3  # one per join task (a task without probe rows builds none)
    assert pairs(got, how) == duck(_pairs_sql(how, ["k"], None), l=left, r=right)


@settings(max_examples=80, deadline=None)
@given(data=st.data(), span=st.sampled_from([3, 1000, 10**6, 2**40, 2**62]),
       ncols=st.integers(1, 3), nb=st.integers(0, 60), npr=st.integers(0, 60))
def test_join_index_finds_exactly_the_equal_keys(data, span, ncols, nb, npr):
    """Direct tables (small ranges), hash tables (wide ranges, several columns, mixed
    radix overflowing into hashes): every lookup equals a Python dict's."""
    value = st.one_of(st.none(), st.integers(-span, span))
    brows = [tuple(data.draw(value) for _ in range(ncols)) for _ in range(nb)]
    prows = [tuple(data.draw(st.one_of(value, st.sampled_from(brows or [(0,) * ncols]).map(
        lambda r, i=i: r[i]))) for i in range(ncols)) for _ in range(npr)]
    cols = [pa.array([r[i] for r in brows], pa.int64()) for i in range(ncols)]
    index = JoinIndex(cols, nb)
    pcols = [pa.array([r[i] for r in prows], pa.int64()) for i in range(ncols)]
    count, first, check = index.lookup(pcols, npr)
    got = set()
    for pi, bi in pair_chunks(count, first, index.order, 7):
        if check is not None:
            keep = check(pi, bi)
            pi, bi = pi[keep], bi[keep]
        got |= set(zip(pi.tolist(), bi.tolist()))
    want = {(i, j) for i, p in enumerate(prows) for j, b in enumerate(brows)
            if None not in p and p == b}
    assert got == want


@pytest.mark.parametrize("filter_bytes", [1, 1 << 23], ids=["bits", "bytes"])
@pytest.mark.parametrize("direct_min", [1, 1 << 21], ids=["hash-table", "direct-table"])
def test_join_index_membership_bitmap_agrees_with_the_tables(direct_min, filter_bytes,
                                                             monkeypatch):
    """Sparse exact keys get a bitmap tested before the tables: its lookups equal the
    tables' own, for probe keys inside and outside the range, nulls and repeated build
    keys; once nearly every probe row passes it, it is no longer tested."""
    from millstream.ops.join import index as join_index

    monkeypatch.setattr(join_index, "_DIRECT_MIN", direct_min)
    monkeypatch.setattr(join_index, "_FILTER_BYTES", filter_bytes)
    monkeypatch.setattr(join_index, "_FILTER_TRIAL", 1000)
    rng = np.random.default_rng(7)
    build = rng.choice(100_000, 2_000, replace=False) * 3 - 5_000
    build = np.concatenate([build, build[:300]])  # keys with two build rows
    index = JoinIndex([pa.array(build)], len(build))
    plain = JoinIndex([pa.array(build)], len(build))
    assert index.present is not None and index.direct == (direct_min > 1)
    assert (index.present.dtype == np.bool_) == (filter_bytes > 1)
    plain.present = None
    probe = rng.integers(-10_000, 310_000, 5_000).tolist() + [None, int(build[0])]
    arr = pa.array(probe, pa.int64())
    count, first, _ = index.lookup([arr], len(probe))
    want_count, want_first, _ = plain.lookup([arr], len(probe))
    assert count.tolist() == want_count.tolist() and count.sum() > 0
    assert (first[count > 0] == want_first[want_count > 0]).all()
    assert index._tested == len(probe)  # tested by the bitmap
    every = pa.array(np.repeat(build, 3))  # every probe row matches: the bitmap only costs
    for _ in range(3):
        index.lookup([every], len(every))
    assert index._tested < len(probe) + 3 * len(every)


@pytest.mark.parametrize("build", [["a", "bb", "ccc", "bb", None], ["a", "b", "cc", "b", "dd"]],
                         ids=["distinct-hashes", "colliding-build-keys"])
@pytest.mark.parametrize("how", HOWS)
def test_hash_collisions_never_join(build, how, monkeypatch):
    """With a hash that collides (a string's length), equal hashes of different keys are
    told apart: per probe row when the build keys' hashes are distinct, per pair when two
    build keys collide."""
    from millstream.ops.join import keys as join_keys

    monkeypatch.setattr(join_keys, "hash_bytes", lambda arr: np.asarray(
        pa.compute.binary_length(arr).fill_null(0), dtype=np.uint64))
    probe = ["a", "x", "bb", "yy", "zzz", None, "b", "dd"]
    left = pa.table({"s": probe, "lid": range(len(probe))})
    right = pa.table({"s": build, "rid": range(len(build))})
    got = join_tables(left, right, ["s"], ["s"], how)
    assert pairs(got, how) == duck(_pairs_sql(how, ["s"], None), l=left, r=right)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.one_of(st.none(), st.text(max_size=20), st.binary(max_size=20)
                                 .map(lambda b: b.decode("latin-1"))), max_size=40),
       cut=st.integers(0, 5))
def test_string_key_hashes_depend_on_the_value_only(values, cut):
    from millstream.ops.join.keys import hash_bytes

    arr = pa.array(values + values, pa.large_string())
    h = hash_bytes(arr)
    n = len(values)
    assert np.array_equal(h[:n], h[n:])
    assert np.array_equal(hash_bytes(arr.slice(min(cut, n))), h[min(cut, n):])
    seen: dict[str | None, int] = {}
    for v, x in zip(values, h[:n].tolist()):
        assert seen.setdefault(v if v else "", x) == x  # null hashes as ""


def test_pair_chunks_split_rows_with_many_matches():
    rng = np.random.default_rng(3)
    count = rng.integers(0, 9, 50)
    count[[3, 17]] = [40, 0]
    first = rng.integers(0, 10, 50)
    order = np.arange(60) * 10
    whole = list(pair_chunks(count, first, order, 10_000))
    assert len(whole) == 1
    for limit in (1, 3, 7, 64):
        chunks = list(pair_chunks(count, first, order, limit))
        assert all(len(p) <= limit for p, _ in chunks)
        assert np.array_equal(np.concatenate([p for p, _ in chunks]), whole[0][0])
        assert np.array_equal(np.concatenate([b for _, b in chunks]), whole[0][1])


# ----------------------------------------------------------------------------- residual conditions


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), how=st.sampled_from(HOWS),
       keys=st.sampled_from(KEYSETS + [[]]), cond=st.sampled_from([None, *CONDITIONS]),
       nl=st.integers(0, 40), nr=st.integers(0, 30))
def test_join_tables_match_duckdb(seed, how, keys, cond, nl, nr):
    left, right = tables(seed, nl, nr)
    if not keys and cond is None:
        cond = "lt"
    if cond == "clash" and "s" in keys:
        cond = "ne"
    expr, text = CONDITIONS[cond] if cond else (None, None)
    got = join_tables(left, right, keys, keys, how, condition=expr)
    assert pairs(got, how) == duck(_pairs_sql(how, keys, text), l=left, r=right)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), how=st.sampled_from(HOWS),
       keys=st.sampled_from(KEYSETS), cond=st.sampled_from(list(CONDITIONS)),
       broadcast=st.sampled_from([None, True, False]))
def test_dataset_joins_with_a_condition_match_duckdb(seed, how, keys, cond, broadcast):
    left, right = tables(seed, 50, 30)
    if cond == "clash" and "s" in keys:
        cond = "ne"
    expr, text = CONDITIONS[cond]
    ds = ms.from_arrow(left, num_partitions=3).join(
        ms.from_arrow(right, num_partitions=2), on=keys, how=how, condition=expr,
        broadcast=broadcast)
    got = ds.to_arrow(shuffle_partitions=3)
    assert pairs(got, how) == duck(_pairs_sql(how, keys, text), l=left, r=right)


@pytest.mark.parametrize("how", HOWS)
def test_condition_with_left_on_right_on_and_outer_null_extension(how):
    left = pa.table({"a": [1, 1, 2, None, 3], "x": [5, 1, 7, 2, 0], "lid": range(5)})
    right = pa.table({"b": [1, 1, 2, 2, None], "y": [3, 4, 9, 1, 0], "rid": range(5)})
    ds = ms.from_arrow(left, num_partitions=2).join(
        ms.from_arrow(right), left_on="a", right_on="b", how=how,
        condition=col("x") > col("y"), broadcast=False)
    got = ds.to_arrow(shuffle_partitions=2)
    q = _pairs_sql(how, [], "l.a = r.b AND l.x > r.y")
    assert pairs(got, how) == duck(q, l=left, r=right)
    if how == "left":  # lid 1 has key matches, but no pair with x > y: null-extended
        rows = {r["lid"]: r for r in got.to_pylist()}
        assert rows[1]["rid"] is None and rows[1]["b"] is None


# ----------------------------------------------------------------------------- TPC-H Q21/Q22


def _lineitem(seed: int = 7, orders: int = 300) -> pa.Table:
    rng = random.Random(seed)
    rows = []
    day = dt.date(1995, 1, 1)
    for o in range(1, orders + 1):
        for line in range(rng.randint(1, 6)):
            commit = day + dt.timedelta(days=rng.randrange(30))
            rows.append({"l_orderkey": o, "l_linenumber": line,
                         "l_suppkey": rng.randrange(1, 8),
                         "l_commitdate": commit,
                         "l_receiptdate": commit + dt.timedelta(days=rng.randrange(-5, 6))})
    return pa.Table.from_pylist(rows)


@pytest.mark.parametrize("broadcast", [None, False])
def test_q21_exists_and_not_exists_with_a_residual_condition(broadcast):
    li = _lineitem()
    data = ms.from_arrow(li, num_partitions=3)
    late = col("l_receiptdate") > col("l_commitdate")
    other = col("l_suppkey_right") != col("l_suppkey")
    l1 = data.filter(late)
    l2 = data.select("l_orderkey", "l_suppkey")
    l3 = data.filter(late).select("l_orderkey", "l_suppkey")
    got = (l1.join(l2, on="l_orderkey", how="semi", condition=other, broadcast=broadcast)
           .join(l3, on="l_orderkey", how="anti", condition=other, broadcast=broadcast)
           .select("l_orderkey", "l_linenumber", "l_suppkey")).to_arrow(shuffle_partitions=4)
    want = duck("""
        SELECT l1.l_orderkey, l1.l_linenumber, l1.l_suppkey FROM li l1
        WHERE l1.l_receiptdate > l1.l_commitdate
          AND EXISTS (SELECT * FROM li l2 WHERE l2.l_orderkey = l1.l_orderkey
                      AND l2.l_suppkey <> l1.l_suppkey)
          AND NOT EXISTS (SELECT * FROM li l3 WHERE l3.l_orderkey = l1.l_orderkey
                          AND l3.l_suppkey <> l1.l_suppkey
                          AND l3.l_receiptdate > l3.l_commitdate)""", li=li)
    assert sorted(map(tuple, (r.values() for r in got.to_pylist())), key=repr) == want
    assert 0 < len(want) < li.num_rows


def test_q22_not_exists():
    rng = random.Random(8)
    cust = pa.table({"c_custkey": range(200),
                     "c_acctbal": [round(rng.uniform(-100, 900), 2) for _ in range(200)]})
    orders = pa.table({"o_custkey": [rng.randrange(300) for _ in range(500)],
                       "o_totalprice": [round(rng.uniform(0, 1000), 2) for _ in range(500)]})
    c, o = ms.from_arrow(cust, num_partitions=2), ms.from_arrow(orders, num_partitions=2)
    got = c.join(o, left_on="c_custkey", right_on="o_custkey", how="anti").to_arrow()
    want = duck("SELECT c_custkey FROM c WHERE NOT EXISTS "
                "(SELECT * FROM o WHERE o_custkey = c_custkey)", c=cust, o=orders)
    assert sorted(((v,) for v in got.column("c_custkey").to_pylist()), key=repr) == want
    got = c.join(o, left_on="c_custkey", right_on="o_custkey", how="anti",
                 condition=col("o_totalprice") > col("c_acctbal"),
                 broadcast=False).to_arrow(shuffle_partitions=3)
    want = duck("SELECT c_custkey FROM c WHERE NOT EXISTS (SELECT * FROM o WHERE "
                "o_custkey = c_custkey AND o_totalprice > c_acctbal)", c=cust, o=orders)
    assert sorted(((v,) for v in got.column("c_custkey").to_pylist()), key=repr) == want


# ----------------------------------------------------------------------------- condition only, cross


@pytest.mark.parametrize("broadcast", [None, True, False])
@pytest.mark.parametrize("how", HOWS)
def test_join_on_a_range_condition_alone(how, broadcast):
    left, right = tables(seed=11, nl=70, nr=25)
    cond = (col("x") >= col("y")) & (col("x") < col("y") + 3)
    ds = ms.from_arrow(left, num_partitions=3).join(ms.from_arrow(right, num_partitions=2),
                                                    how=how, condition=cond,
                                                    broadcast=broadcast)
    got = ds.to_arrow(shuffle_partitions=3)
    want = duck(_pairs_sql(how, [], "l.x >= r.y AND l.x < r.y + 3"), l=left, r=right)
    assert pairs(got, how) == want
    assert got.schema == ds.schema
    text = ds.explain(print_plan=False)
    assert "condition=" in text and "nested loop" in text


def test_condition_only_joins_pick_a_broadcast_side_the_join_type_allows():
    big = ms.from_arrow(tables(seed=1, nl=3000, nr=1)[0], num_partitions=2)
    small = ms.from_arrow(tables(seed=2, nl=1, nr=20)[1])
    cond = col("x") < col("y")

    def plan(ds):
        return ds.explain(print_plan=False).split("== Physical")[-1]

    assert "(broadcast nested loop;" in plan(big.join(small, how="left", condition=cond))
    assert "(broadcast left nested loop;" in plan(small.join(big, how="inner", condition=cond))
    assert "(broadcast left nested loop;" in plan(small.join(big, how="right", condition=cond))
    assert "one partition" in plan(small.join(big, how="outer", condition=cond))
    assert "one partition" in plan(small.join(big, how="left", condition=cond,
                                              broadcast=False))


@pytest.mark.parametrize("form", ["cross_join", "how"])
def test_cross_join(form):
    left = pa.table({"a": [1, 2, None], "v": ["x", "y", "z"]})
    right = pa.table({"b": [10, 20], "v": ["p", "q"]})
    lds, rds = ms.from_arrow(left, num_partitions=2), ms.from_arrow(right)
    ds = lds.cross_join(rds) if form == "cross_join" else lds.join(rds, how="cross")
    got = ds.to_arrow()
    assert got.column_names == ["a", "v", "b", "v_right"]
    assert ds.schema == got.schema
    want = duck("SELECT l.a, l.v, r.b, r.v FROM l CROSS JOIN r", l=left, r=right)
    assert sorted(map(tuple, (r.values() for r in got.to_pylist())), key=repr) == want
    text = ds.explain(print_plan=False)
    assert "Join cross" in text and "broadcast" in text
    # the smaller side goes to the other's tasks
    assert "broadcast left" in rds.cross_join(ms.from_arrow(
        pa.table({"z": range(5000)}), num_partitions=2)).explain(print_plan=False)


def test_cross_join_with_many_pairs_in_bounded_chunks(monkeypatch):
    monkeypatch.setattr(join_probe, "PAIR_BYTES", 1)  # chunks of 4096 pairs
    left = pa.table({"i": range(300)})
    right = pa.table({"j": range(70)})
    got = ms.from_arrow(left, num_partitions=2).cross_join(ms.from_arrow(right)).filter(
        col("i") % 7 == col("j") % 5).to_arrow()
    want = duck("SELECT i, j FROM l, r WHERE i % 7 = j % 5", l=left, r=right)
    assert sorted(zip(got.column("i").to_pylist(), got.column("j").to_pylist()),
                  key=repr) == want
    full = join_tables(left, right, [], [], "inner")
    assert full.num_rows == 300 * 70


def test_join_arguments_are_checked():
    a, b = ms.from_items([{"k": 1, "x": 1}]), ms.from_items([{"k": 1, "y": 2}])
    with pytest.raises(PlanError, match="cross join"):
        a.join(b, on="k", how="cross")
    with pytest.raises(PlanError, match="cross join"):
        a.join(b, how="cross", condition=col("x") < col("y"))
    with pytest.raises(PlanError, match="condition="):
        a.join(b)
    with pytest.raises(PlanError, match="expression"):
        a.join(b, on="k", condition="x < y")
    with pytest.raises(SchemaError, match="nope"):
        _ = a.join(b, on="k", condition=col("nope") > 1).schema
    with pytest.raises(SchemaError, match="boolean"):
        _ = a.join(b, on="k", condition=col("x") + col("y")).schema


# ----------------------------------------------------------------------------- schemas, keys, spilling


def test_schemas_of_the_new_join_forms_match_the_results():
    left, right = tables(seed=3, nl=30, nr=20)
    lds, rds = ms.from_arrow(left, num_partitions=2), ms.from_arrow(right, num_partitions=2)
    cond = col("x") < col("y")
    plans = [lds.cross_join(rds), lds.join(rds, how="outer", condition=cond),
             lds.join(rds, on="k", how="right", condition=cond, broadcast=False),
             lds.join(rds, on=["k", "s"], how="semi", condition=col("f") != col("f_right")),
             lds.join(rds, on="k", how="outer", condition=cond, suffix="_r").filter(
                 col("s_r").is_not_null())]
    for ds in plans:
        static = ds._node.checked_schema()
        got = ds.to_arrow(shuffle_partitions=2)
        assert static.names == got.schema.names
        assert [f.type for f in static] == [f.type for f in got.schema]


KEY_TYPES = {
    "int32-int64": (pa.int32(), pa.int64(), [1, 2, 3, None], [2, 3, 3, 4, None]),
    "int-float": (pa.int64(), pa.float64(), [1, 2, 5, None], [1.0, 2.5, 5.0, None]),
    "string-large_string": (pa.string(), pa.large_string(), ["a", "b", None, ""],
                            ["b", "", "b", None]),
    "string_view-string": (pa.string_view(), pa.string(), ["a", "b", "c"], ["c", "a", "x"]),
    "dictionary-string": (pa.dictionary(pa.int32(), pa.string()), pa.string(),
                          ["a", "b", "a", None], ["a", "z"]),
    "decimals": (pa.decimal128(15, 2), pa.decimal128(16, 3),
                 [decimal.Decimal("1.50"), decimal.Decimal("2.25"), None],
                 [decimal.Decimal("1.500"), decimal.Decimal("2.250"), decimal.Decimal("3")]),
    "dates": (pa.date32(), pa.date32(), [dt.date(2024, 1, d) for d in (1, 2, 3)],
              [dt.date(2024, 1, d) for d in (2, 3, 3)]),
    "timestamps": (pa.timestamp("s"), pa.timestamp("ms"),
                   [dt.datetime(2024, 1, 1, 0, 0, s) for s in (1, 2)],
                   [dt.datetime(2024, 1, 1, 0, 0, 2), dt.datetime(2024, 1, 1, 0, 0, 2, 5000)]),
}


@pytest.mark.parametrize("how", ["inner", "outer", "anti"])
@pytest.mark.parametrize("name", list(KEY_TYPES))
def test_keys_of_different_types_meet(name, how, tmp_path):
    lt, rt, lv, rv = KEY_TYPES[name]
    left = pa.table({"k": pa.array(lv).cast(lt) if pa.types.is_dictionary(lt)
                     else pa.array(lv, lt), "lid": range(len(lv))})
    right = pa.table({"k": pa.array(rv, rt), "rid": range(len(rv))})
    want = sorted(((i, j) for i, a in enumerate(lv) for j, b in enumerate(rv)
                   if a is not None and b is not None and a == b), key=repr)
    if how == "outer":
        hit_l = {i for i, _ in want}
        hit_r = {j for _, j in want}
        want += [(i, None) for i in range(len(lv)) if i not in hit_l]
        want += [(None, j) for j in range(len(rv)) if j not in hit_r]
    elif how == "anti":
        want = [(i,) for i in range(len(lv)) if i not in {i for i, _ in want}]
    want = sorted(want, key=repr)
    assert pairs(join_tables(left, right, ["k"], ["k"], how), how) == want
    if name == "string_view-string":
        return  # core.hashing.split_by_partition cannot take string_view rows (no kernel)
    # spilled into buckets: both sides' keys land in the same bucket
    ctx = TaskContext(spill_dir=str(tmp_path))
    op = HashJoin(["k"], ["k"], how)
    op._limit = lambda: 0
    got = _run(op, {1: right.to_batches(max_chunksize=1), 0: left.to_batches(max_chunksize=2)},
               ctx)
    assert ctx.counters[("millstream", "spills")] == 1
    assert pairs(got, how) == want


@pytest.mark.parametrize("how", HOWS)
def test_grace_hash_join_with_a_condition(how, tmp_path):
    left, right = tables(seed=12, nl=1200, nr=800)
    ctx = TaskContext(spill_dir=str(tmp_path), batch_size=500)
    op = HashJoin(["k"], ["k"], how, condition=col("x") <= col("y"))
    op._limit = lambda: 1 << 12
    got = _run(op, {1: right.to_batches(max_chunksize=100),
                    0: left.to_batches(max_chunksize=250)}, ctx)
    assert ctx.counters[("millstream", "spills")] == 1
    assert 1 < ctx.counters[BUILDS_COUNTER] <= 16  # one index per bucket
    assert pairs(got, how) == duck(_pairs_sql(how, ["k"], "l.x <= r.y"), l=left, r=right)


def test_stream_table_join_with_a_condition_indexes_the_table_once(monkeypatch):
    monkeypatch.setattr(join_probe, "JoinIndex", _CountingIndex)
    _CountingIndex.built = 0
    table = pa.table({"k": [0, 0, 1], "p": [1, 5, 2]})
    op = BroadcastTableJoin(["k"], ["k"], "left", table=table, condition=col("i") > col("p"))
    op.open(TaskContext())
    out = []
    for i in range(0, 30, 3):
        out += op.process(pa.RecordBatch.from_pydict({"k": [j % 3 for j in range(i, i + 3)],
                                                      "i": list(range(i, i + 3))}))
    assert _CountingIndex.built == 1
    got = sorted((r["i"], r["p"]) for b in out for r in b.to_pylist())
    want = sorted([(i, p) for i in range(30) for k, p in ((0, 1), (0, 5), (1, 2))
                   if i % 3 == k and i > p]
                  + [(i, None) for i in range(30)
                     if not any(i % 3 == k and i > p for k, p in ((0, 1), (0, 5), (1, 2)))])
    assert got == want


def test_streaming_job_joins_a_table_with_a_condition():
    stream = ms.from_generator(lambda i: {"k": i % 3, "i": i}, count=12)
    table = ms.from_items([{"k": 0, "p": 1}, {"k": 0, "p": 6}, {"k": 1, "p": 5}])
    job = stream.join(table, on="k", how="semi", condition=col("i") > col("p")).start(
        executor="inline", checkpoint_interval=0)
    assert job.await_termination(60)
    want = [i for i in range(12) if any(i % 3 == k and i > p for k, p in ((0, 1), (0, 6),
                                                                            (1, 5)))]
    assert sorted(r["i"] for r in job.sink.rows()) == want


@pytest.mark.parametrize("how", HOWS)
def test_view_columns_are_carried_through_joins(how):
    """Arrow has no take kernel for string_view (TPC-H Parquet files hold them): views are
    gathered as large strings and come out as views."""
    left = pa.table({"k": [1, 2, 3, None], "a": pa.array(["x", None, "zz", "w"], pa.string_view()),
                     "lid": range(4)})
    right = pa.table({"k": [2, 3, 3, 5], "b": pa.array(["p", "q", None, "r"], pa.string_view()),
                      "rid": range(4)})
    got = join_tables(left, right, ["k"], ["k"], how, condition=col("a") != col("b"))
    assert got.schema.field("a").type == pa.string_view()
    if how not in ("semi", "anti"):
        assert got.schema.field("b").type == pa.string_view()
    plain = {n: pa.table([c.cast(pa.string()) if c.type == pa.string_view() else c
                          for c in t.columns], names=t.column_names)
             for n, t in (("l", left), ("r", right))}
    assert pairs(got, how) == duck(_pairs_sql(how, ["k"], "l.a <> r.b"), **plain)
    assert got.schema == join_tables(left.slice(0, 0), right, ["k"], ["k"], how).schema


@pytest.mark.parametrize("how", ["inner", "left", "semi", "anti"])
def test_columns_are_pruned_below_a_join_with_a_condition(how, tmp_path):
    """A residual condition reads some columns of each side (by the inner join's names: a
    right column the left also has carries the suffix): those and the keys reach the scans,
    nothing else, and the suffixed name still means the right side's column."""
    import pyarrow.parquet as pq

    rng = random.Random(3)
    left = pa.table({"k": [rng.randrange(20) for _ in range(300)],
                     "x": [rng.randrange(5) for _ in range(300)],
                     "a": list(range(300)), "junk": ["l" * 30] * 300})
    right = pa.table({"k": [rng.randrange(20) for _ in range(80)],
                      "x": [rng.randrange(5) for _ in range(80)],
                      "b": list(range(80)), "junk2": ["r" * 30] * 80})
    pq.write_table(left, tmp_path / "l.parquet")
    pq.write_table(right, tmp_path / "r.parquet")
    lds = ms.read_parquet(str(tmp_path / "l.parquet"))
    rds = ms.read_parquet(str(tmp_path / "r.parquet"))
    ds = lds.join(rds, on="k", how=how, condition=col("x") < col("x_right"))
    ds = ds.select("a", "b") if how in ("inner", "left") else ds.select("a")
    plan = ds.explain(print_plan=False).split("== Rules applied")[0]
    assert "columns=[k,x,a]" in plan, plan
    if how in ("inner", "left"):
        assert "columns=[k,x,b]" in plan, plan
        want = duck(f"select l.a, r.b from l {how} join r on l.k = r.k and l.x < r.x",
                    l=left, r=right)
        got = [(r["a"], r["b"]) for r in ds.collect()]
    else:
        assert "columns=[k,x]" in plan, plan
        exists = "exists" if how == "semi" else "not exists"
        want = duck(f"select a from l where {exists} (select 1 from r where r.k = l.k "
                    f"and l.x < r.x)", l=left, r=right)
        got = [(r["a"],) for r in ds.collect()]
    assert sorted(got, key=repr) == want
    assert how != "left" or any(b is None for _, b in got)  # (unmatched rows were there)


# ----------------------------------------------------------------------------- left-built semi/anti


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), how=st.sampled_from(["semi", "anti"]),
       keys=st.sampled_from(KEYSETS), cond=st.sampled_from([None, *CONDITIONS]),
       nl=st.integers(0, 40), nr=st.integers(0, 60), spill=st.booleans())
def test_semi_and_anti_joins_built_on_the_left_side_match_duckdb(seed, how, keys, cond, nl,
                                                                   nr, spill, tmp_path_factory):
    """The left side indexed, the right side streamed through it marking left rows (also
    spilled into buckets): the same rows as DuckDB's EXISTS / NOT EXISTS."""
    left, right = tables(seed, nl, nr)
    if cond == "clash" and "s" in keys:
        cond = "ne"
    expr, text = CONDITIONS[cond] if cond else (None, None)
    op = HashJoin(keys, keys, how, condition=expr, build_left=True)
    assert op.input_order == (0, 1)
    if spill:
        op._limit = lambda: 0
    ctx = TaskContext(spill_dir=str(tmp_path_factory.mktemp("spill")))
    # an empty side is one empty batch with its schema, as a shuffle read gives it
    got = _run(op, {0: left.to_batches(max_chunksize=7) or [_empty(left)],
                    1: right.to_batches(max_chunksize=5) or [_empty(right)]}, ctx)
    assert got.schema.names == left.schema.names
    assert pairs(got, how) == duck(_pairs_sql(how, keys, text), l=left, r=right)


def _empty(t: pa.Table) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist([], schema=t.schema)


def test_build_left_is_for_semi_and_anti_joins_only():
    with pytest.raises(PlanError):
        HashJoin(["k"], ["k"], "inner", build_left=True)


@pytest.mark.parametrize("how", ["semi", "anti"])
def test_shuffled_semi_join_indexes_its_smaller_left_side(how, tmp_path):
    """A semi/anti join whose left side is estimated much smaller than its right side
    builds the left side (the explain says so) and gives the same rows."""
    import pyarrow.parquet as pq

    rng = np.random.default_rng(3)
    small = pa.table({"k": rng.integers(0, 3000, 200), "lid": np.arange(200)})
    big = pa.table({"k": rng.integers(0, 3000, 20_000), "y": rng.integers(0, 9, 20_000)})
    pq.write_table(small, tmp_path / "small.parquet")
    pq.write_table(big, tmp_path / "big.parquet")
    ds = ms.read_parquet(str(tmp_path / "small.parquet")).join(
        ms.read_parquet(str(tmp_path / "big.parquet")), on="k", how=how,
        condition=col("y") != 3, broadcast=False)
    assert "builds the left side" in ds.explain(print_plan=False)
    got = ds.to_arrow()
    want = duck(_pairs_sql(how, ["k"], "r.y <> 3"), l=small, r=big)
    assert pairs(got, how) == want


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("cond", [None, "lt"])
def test_a_task_indexes_its_smaller_side(how, cond, tmp_path, monkeypatch):
    """A shuffle join task whose left rows are fewer than half its right rows indexes the
    left side (inner, right, semi, anti; left and outer joins keep the right build), with
    the same rows as DuckDB either way."""
    sizes: list[int] = []

    class _Sized(JoinIndex):
        def __init__(self, key_cols, num_rows):
            sizes.append(num_rows)
            super().__init__(key_cols, num_rows)

    monkeypatch.setattr(join_probe, "JoinIndex", _Sized)
    expr, text = CONDITIONS[cond] if cond else (None, None)
    for nl, nr, small_left in ((30, 400, True), (400, 30, False)):
        sizes.clear()
        left, right = tables(seed=nl, nl=nl, nr=nr)
        ctx = TaskContext(spill_dir=str(tmp_path))
        got = _run(HashJoin(["k"], ["k"], how, condition=expr),
                   {1: right.to_batches(max_chunksize=50), 0: left.to_batches(max_chunksize=7)},
                   ctx)
        indexed_left = how in ("inner", "right", "semi", "anti") and small_left
        assert sizes == [nl if indexed_left else nr]
        assert pairs(got, how) == duck(_pairs_sql(how, ["k"], text), l=left, r=right)
        assert got.schema.names == join_tables(left, right, ["k"], ["k"], how,
                                               condition=expr).schema.names


@pytest.mark.parametrize("how", ["inner", "semi", "anti", "right"])
def test_a_worker_indexes_a_broadcast_side_once_for_its_tasks(how):
    """Eight probe tasks against one broadcast side: each worker process indexes it once
    (it used to be once per task), with the same rows."""
    rng = np.random.default_rng(8)
    big = pa.table({"k": rng.integers(0, 500, 8000), "lid": np.arange(8000)})
    small = pa.table({"k": rng.integers(0, 500, 300), "rid": np.arange(300)})
    if how == "right":  # the small side broadcast is the left one
        ds = ms.from_arrow(small.rename_columns(["k", "lid"]), num_partitions=1).join(
            ms.from_arrow(big.rename_columns(["k", "rid"]), num_partitions=8), on="k",
            how=how)
        left, right = small.rename_columns(["k", "lid"]), big.rename_columns(["k", "rid"])
    else:
        ds = ms.from_arrow(big, num_partitions=8).join(ms.from_arrow(small), on="k", how=how,
                                                       broadcast=True)
        left, right = big, small
    assert "broadcast" in ds.explain(print_plan=False)
    got = ds.to_arrow()
    builds = ms.last_job_stats().counters.get(BUILDS_COUNTER, 0)
    assert 1 <= builds < 8
    assert pairs(got, how) == duck(_pairs_sql(how, ["k"], None), l=left, r=right)


def test_broadcast_sides_are_cached_by_their_files(tmp_path):
    from millstream.core.shuffle import BlockRef
    from millstream.ops.join.hash_join import _BuiltSides

    path = tmp_path / "block.arrow"
    path.write_bytes(b"x" * 10)
    ref = BlockRef(str(path), 1, 10)
    first = _BuiltSides.key([ref], "right", "inner")
    assert first == _BuiltSides.key([ref], "right", "inner")
    assert first != _BuiltSides.key([ref], "right", "semi")
    path.write_bytes(b"y" * 12)  # the block written again: indexed again
    assert first != _BuiltSides.key([ref], "right", "inner")

    class _Handle:  # a runner's own block handle: not cached
        def read(self):
            return iter(())

    assert _BuiltSides.key([_Handle()], "right") is None
