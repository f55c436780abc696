"""Plan quality: for each optimizer rule a query whose ``explain()`` shows it applied, with
the same rows with and without the optimizer (and DuckDB's, on the same data); a random
pipeline test compares the optimizer on and off; build-time schema errors."""

from __future__ import annotations

import math
import os
import traceback

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracles import duckdb_connect

import millstream as ms
from millstream.errors import PlanError, SchemaError
from millstream.plan import logical as L
from millstream.plan.optimizer import optimize_traced
from millstream.testing import TestSource

col, lit = ms.col, ms.lit

EXAMPLES = int(os.environ.get("MILLSTREAM_PROPERTY_EXAMPLES", "25"))

ORDERS = pa.table({
    "o_id": list(range(1, 41)),
    "o_cust": [i % 7 for i in range(40)],
    "o_price": [float(i * 13 % 50) for i in range(40)],
    "o_status": ["F" if i % 3 else "O" for i in range(40)],
    "o_note": [None if i % 5 == 0 else f"n{i}" for i in range(40)],
})
LINES = pa.table({
    "l_order": [i % 45 for i in range(120)],
    "l_qty": [i % 11 for i in range(120)],
    "l_price": [float(i % 17) * 1.5 for i in range(120)],
    "l_flag": ["A" if i % 4 else "R" for i in range(120)],
    "l_note": [f"x{i % 9}" for i in range(120)],
})
CUST = pa.table({"c_id": list(range(6)), "c_name": [f"c{i}" for i in range(6)],
                 "c_nation": [i % 2 for i in range(6)]})


# ------------------------------------------------------------------------------- helpers

def plan_parts(ds: ms.Dataset, **options) -> dict[str, str]:
    """The sections of explain(): logical, optimized, rules, physical."""
    text = ds.explain(print_plan=False, **options)
    out = {}
    for name, key in (("Logical plan", "logical"), ("Optimized plan", "optimized"),
                      ("Rules applied", "rules"), ("Physical plan", "physical")):
        section = text.split(f"== {name} ==")[1]
        out[key] = section.split("\n== ")[0].strip()
    return out


def fired(ds: ms.Dataset) -> list[str]:
    return [r.strip() for r in plan_parts(ds)["rules"].split(",")]


def norm(v):
    if isinstance(v, float):
        return None if math.isnan(v) else round(v, 6)
    if isinstance(v, list):
        return tuple(norm(x) for x in v)
    return v


def bag(rows: list[dict]) -> list:
    return sorted((tuple(sorted((k, norm(v)) for k, v in r.items())) for r in rows), key=repr)


def duck(query: str, **tables: pa.Table) -> list[dict]:
    """Rows of a DuckDB query over Arrow tables (the oracle)."""
    con = duckdb_connect()
    try:
        for name, t in tables.items():
            con.register(name, t)
        cur = con.execute(query)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]
    finally:
        con.close()


def same_with_and_without(ds: ms.Dataset, ordered: bool = False) -> list[dict]:
    """The rows with the optimizer, checked equal to those without it."""
    on, off = ds.collect(), ds.collect(optimizer=False)
    if ordered:
        assert [[norm(v) for v in r.values()] for r in on] == \
            [[norm(v) for v in r.values()] for r in off]
    else:
        assert bag(on) == bag(off)
    if on and off:
        assert list(on[0]) == list(off[0])
    assert ds.to_arrow().schema.names == ds.to_arrow(optimizer=False).schema.names
    return on


def orders(parts: int = 2) -> ms.Dataset:
    return ms.from_arrow(ORDERS, num_partitions=parts)


def lines(parts: int = 3) -> ms.Dataset:
    return ms.from_arrow(LINES, num_partitions=parts)


def cust() -> ms.Dataset:
    return ms.from_arrow(CUST, num_partitions=1)


def children_under(tree: str, node: str) -> list[str]:
    """The lines of the plan tree one level under the first line starting with ``node``."""
    lines_ = tree.splitlines()
    for i, line in enumerate(lines_):
        if line.strip().startswith(node):
            depth = len(line) - len(line.lstrip())
            out = []
            for nxt in lines_[i + 1:]:
                d = len(nxt) - len(nxt.lstrip())
                if d <= depth:
                    break
                if d == depth + 2:
                    out.append(nxt.strip())
            return out
    raise AssertionError(f"no {node} in\n{tree}")


# ------------------------------------------------------------------------------- settings

def test_rules_can_be_turned_off_per_action_and_by_name():
    ds = orders().sort("o_price").limit(3)
    assert "topk" in fired(ds)
    assert plan_parts(ds, optimizer=False)["rules"] == "(none)"
    assert "TopK" not in plan_parts(ds, disabled_rules=["topk"])["optimized"]
    with pytest.raises(PlanError, match="unknown optimizer rule"):
        ds.explain(print_plan=False, disabled_rules=["no_such_rule"])


def test_optimizer_off_for_the_session():
    try:
        ms.init(parallelism=2, progress=False, optimizer=False)
        ds = orders().filter(col("o_id") > 30).select("o_id")
        assert plan_parts(ds)["rules"] == "(none)"
        assert sorted(r["o_id"] for r in ds.collect()) == list(range(31, 41))
    finally:
        ms.init(parallelism=2, progress=False)


# ------------------------------------------------------------------------------- folding

def test_constants_are_folded_and_trivial_filters_removed():
    ds = (orders().filter((col("o_price") > lit(10) * 2) & lit(True) & ~~(col("o_id") > 3))
          .select("o_id", (col("o_id") + (lit(2) - 1)).alias("next")))
    parts = plan_parts(ds)
    assert "constant_folding" in fired(ds)
    assert "lit(20)" in parts["optimized"] and "lit(True)" not in parts["optimized"]
    assert "~~" not in parts["optimized"] and "~" not in parts["optimized"]
    assert '(col("o_id") + lit(1)).alias("next")' in parts["optimized"]
    got = same_with_and_without(ds)
    want = duck("select o_id, o_id + 1 as next from o where o_price > 20 and o_id > 3", o=ORDERS)
    assert bag(got) == bag(want)


def test_always_true_filter_disappears_and_always_false_is_empty():
    ds = orders().filter(lit(1) < lit(2))
    assert "Filter" not in plan_parts(ds)["optimized"]
    assert len(same_with_and_without(ds)) == 40
    empty = orders().filter(col("o_id").is_not_null() & (lit("a") == lit("b"))).select("o_id")
    parts = plan_parts(empty)
    assert "Scan empty" in parts["optimized"] and "Filter" not in parts["optimized"]
    assert same_with_and_without(empty) == []
    assert empty.to_arrow().schema == empty.to_arrow(optimizer=False).schema


def test_self_comparison_keeps_null_semantics():
    t = pa.table({"a": [1, None, 3], "f": [1.0, float("nan"), None]})
    ds = ms.from_arrow(t).filter(col("a") == col("a"))
    assert "is_not_null" in plan_parts(ds)["optimized"]
    assert bag(same_with_and_without(ds)) == bag([{"a": 1, "f": 1.0}, {"a": 3, "f": None}])
    floats = ms.from_arrow(t).filter(col("f") == col("f"))  # NaN != NaN: not rewritten
    assert "is_not_null" not in plan_parts(floats)["optimized"]
    assert same_with_and_without(floats) == [{"a": 1, "f": 1.0}]


# ------------------------------------------------------------------------------- predicates

def test_filter_after_join_reaches_both_inputs():
    ds = (orders().join(lines(), left_on="o_id", right_on="l_order")
          .filter((col("o_id") < 20) & (col("l_qty") > 3) & (col("o_status") == "F")))
    parts = plan_parts(ds)
    assert "predicate_pushdown" in fired(ds)
    under = children_under(parts["optimized"], "Join")
    assert all(u.startswith("Filter(") for u in under), parts["optimized"]
    assert 'col("o_id") < lit(20)' in under[0] and 'col("o_status") == lit("F")' in under[0]
    # the key condition is carried to the other side through the equi-join keys
    assert 'col("l_order") < lit(20)' in under[1] and 'col("l_qty") > lit(3)' in under[1]
    got = same_with_and_without(ds)
    want = duck("select * from o join l on o_id = l_order "
                "where o_id < 20 and l_qty > 3 and o_status = 'F'", o=ORDERS, l=LINES)
    assert bag(got) == bag(want)


def test_conjuncts_common_to_every_branch_of_an_or_are_pushed_alone():
    """TPC-H Q19's shape: ``(a & x) | (a & y)`` is ``a & (x | y)``; ``a`` (one side's
    columns) goes below the join alone, and here the rest too (``o_id`` is the other
    side's ``l_order`` through the join keys), so nothing stays above the join."""
    common = col("o_status") == "F"
    ds = (orders().join(lines(), left_on="o_id", right_on="l_order")
          .filter((common & (col("l_qty") > 3) & (col("o_id") < 10))
                  | ((col("l_qty") < 2) & common)))
    parts = plan_parts(ds)
    under = children_under(parts["optimized"], "Join")
    assert 'col("o_status") == lit("F")' in under[0], parts["optimized"]
    assert parts["optimized"].startswith("Join")
    assert '|' in under[1] and 'col("l_order") < lit(10)' in under[1]
    got = same_with_and_without(ds)
    want = duck("select * from o join l on o_id = l_order where (o_status = 'F' and "
                "l_qty > 3 and o_id < 10) or (l_qty < 2 and o_status = 'F')",
                o=ORDERS, l=LINES)
    assert bag(got) == bag(want)


def _filters(tree: str) -> list[str]:
    """The filter lines of a plan tree."""
    return [t.strip() for t in tree.splitlines() if t.strip().startswith("Filter(")]


def test_a_disjunction_over_both_sides_filters_each_side_by_its_own_parts():
    """TPC-H Q7's shape: ``(a1 & b1) | (a2 & b2)`` with ``a`` from one input and ``b``
    from the other stays above the join, and each input gets ``a1 | a2`` / ``b1 | b2``."""
    pred = (((col("o_status") == "F") & (col("l_flag") == "R"))
            | ((col("o_status") == "O") & (col("l_flag") == "A") & (col("l_qty") > 5)))
    ds = orders().join(lines(), left_on="o_id", right_on="l_order").filter(pred)
    parts = plan_parts(ds)
    assert "disjunction_sides" in fired(ds)
    filters = _filters(parts["optimized"])
    # the original above the join, and one filter of each input's own columns below it
    assert any("o_" in f and "l_" in f for f in filters), parts["optimized"]
    assert any('col("o_status") == lit("O")' in f and "l_" not in f for f in filters)
    assert any('col("l_qty") > lit(5)' in f and "o_" not in f for f in filters)
    got = same_with_and_without(ds)
    want = duck("select * from o join l on o_id = l_order where (o_status = 'F' and "
                "l_flag = 'R') or (o_status = 'O' and l_flag = 'A' and l_qty > 5)",
                o=ORDERS, l=LINES)
    assert bag(got) == bag(want)


def test_a_disjunction_never_filters_the_side_an_outer_join_pads():
    """Above a left join, a disjunction implies a filter on the left input only: filtering
    the right input would null-pad rows the filter above then judges differently."""
    pred = ((col("o_status") == "F") & col("l_flag").is_null()) | \
        ((col("o_status") == "O") & col("l_qty").is_null())
    ds = orders().join(lines(), left_on="o_id", right_on="l_order", how="left").filter(pred)
    filters = _filters(plan_parts(ds)["optimized"])
    assert not any("l_" in f and "o_" not in f for f in filters), filters
    assert any("o_" in f and "l_" not in f for f in filters), filters
    got = same_with_and_without(ds)
    want = duck("select * from o left join l on o_id = l_order where (o_status = 'F' and "
                "l_flag is null) or (o_status = 'O' and l_qty is null)", o=ORDERS, l=LINES)
    assert bag(got) == bag(want)


def test_a_branch_without_a_part_on_a_side_implies_nothing_there():
    pred = ((col("o_status") == "F") & (col("l_flag") == "R")) | (col("l_qty") > 9)
    ds = orders().join(lines(), left_on="o_id", right_on="l_order").filter(pred)
    filters = _filters(plan_parts(ds)["optimized"])
    assert not any("o_" in f and "l_" not in f for f in filters), filters
    assert any("l_" in f and "o_" not in f for f in filters)  # l_flag = 'R' or l_qty > 9
    got = same_with_and_without(ds)
    want = duck("select * from o join l on o_id = l_order where (o_status = 'F' and "
                "l_flag = 'R') or l_qty > 9", o=ORDERS, l=LINES)
    assert bag(got) == bag(want)


def test_implied_filters_on_two_scans_of_one_file_reach_a_fixed_point(tmp_path):
    """Two scans of one Parquet file each get an implied filter that the source cannot
    take (string_view values): the rules stop (they used to push into the merged scans
    again on every pass, up to the pass limit)."""
    nation = pa.table({"n_key": pa.array([0, 1, 2, 3]),
                       "n_name": pa.array(["FR", "DE", "US", "CN"], pa.string_view())})
    pq.write_table(nation, tmp_path / "nation.parquet")
    facts = pa.table({"a": [0, 1, 2, 3, 1], "b": [1, 0, 3, 2, 0], "v": [1, 2, 3, 4, 5]})
    n1 = ms.read_parquet(str(tmp_path / "nation.parquet")).rename(
        {"n_key": "k1", "n_name": "name1"})
    n2 = ms.read_parquet(str(tmp_path / "nation.parquet")).rename(
        {"n_key": "k2", "n_name": "name2"})
    ds = (ms.from_arrow(facts).join(n1, left_on="a", right_on="k1")
          .join(n2, left_on="b", right_on="k2")
          .filter(((col("name1") == "FR") & (col("name2") == "DE"))
                  | ((col("name1") == "DE") & (col("name2") == "FR"))))
    rules = fired(ds)
    assert "disjunction_sides" in rules
    assert len(rules) < 12, rules
    assert sorted(ds.to_arrow().column("v").to_pylist()) == [1, 2, 5]


def test_a_semi_join_moves_below_a_join_that_multiplies_rows():
    """TPC-H Q18's shape: orders joined with their lines, then kept where the order is
    in a small set: the semi join runs on the orders before the join, not on its output."""
    big = lines().group_by("l_order").agg(ms.sum("l_qty").alias("q")).filter(col("q") > 20)
    for how in ("semi", "anti"):
        ds = (orders().join(lines(), left_on="o_id", right_on="l_order")
              .join(big.rename({"l_order": "b_order"}), left_on="o_id", right_on="b_order",
                    how=how))
        parts = plan_parts(ds)
        assert "semi_join_pushdown" in fired(ds), parts["optimized"]
        assert parts["optimized"].startswith("Join inner"), parts["optimized"]
        got = same_with_and_without(ds)
        neg = "not " if how == "anti" else ""
        want = duck("select * from o join l on o_id = l_order where o_id "
                    f"{neg}in (select l_order from l group by l_order having sum(l_qty) > 20)",
                    o=ORDERS, l=LINES)
        assert bag(got) == bag(want)


def test_a_semi_join_stays_above_a_join_that_filters_rows():
    """Below a join that keeps few rows (lines of one customer's orders), the semi join
    would have more rows to probe: it stays (TPC-H Q21's EXISTS)."""
    ds = (lines().join(orders().filter(col("o_cust") == 3), left_on="l_order",
                       right_on="o_id")
          .join(lines().rename({"l_order": "x_order", "l_qty": "x_qty", "l_price": "x_price",
                                "l_flag": "x_flag", "l_note": "x_note"}),
                left_on="l_order", right_on="x_order", how="semi",
                condition=col("x_qty") != col("l_qty")))
    assert "semi_join_pushdown" not in fired(ds)
    got = same_with_and_without(ds)
    want = duck("select * from l join o on l_order = o_id where o_cust = 3 and exists "
                "(select 1 from l x where x.l_order = l.l_order and x.l_qty <> l.l_qty)",
                o=ORDERS, l=LINES)
    assert bag(got) == bag(want)


def test_filter_through_select_aliases_and_with_columns():
    ds = (orders().select(col("o_id").alias("id"), (col("o_price") * 2).alias("p2"), "o_cust")
          .with_columns(big=col("p2") > 40)
          .filter((col("id") > 5) & col("big") & (col("o_cust") != 3)))
    parts = plan_parts(ds)
    assert parts["optimized"].splitlines()[0].startswith("WithColumns")
    assert "Filter(" in parts["optimized"].splitlines()[2]  # under the select
    assert 'col("o_id") > lit(5)' in parts["optimized"]
    got = same_with_and_without(ds)
    want = duck("select o_id as id, o_price * 2 as p2, o_cust, o_price * 2 > 40 as big from o "
                "where o_id > 5 and o_price * 2 > 40 and o_cust <> 3", o=ORDERS)
    assert bag(got) == bag(want)


def test_filter_on_group_keys_goes_below_the_aggregate():
    ds = (lines().group_by("l_flag", "l_qty").agg(ms.sum("l_price").alias("total"))
          .filter((col("l_qty") >= 5) & (col("total") > 10)))
    tree = plan_parts(ds)["optimized"]
    assert tree.splitlines()[0].startswith("Filter((col(\"total\")")
    assert 'Filter((col("l_qty") >= lit(5)))' in children_under(tree, "Aggregate")[0]
    got = same_with_and_without(ds)
    want = duck("select l_flag, l_qty, sum(l_price) as total from l group by l_flag, l_qty "
                "having l_qty >= 5 and sum(l_price) > 10", l=LINES)
    assert bag(got) == bag(want)


def test_filter_on_an_expression_key_goes_below_group_by():
    ds = lines().group_by((col("l_qty") % 4).alias("m")).agg(ms.count().alias("n")) \
        .filter(col("m") == 1)
    tree = plan_parts(ds)["optimized"]
    assert tree.splitlines()[0].startswith("Rename")
    assert "Filter" in tree.split("Aggregate")[1]
    assert same_with_and_without(ds) == duck(
        "select l_qty % 4 as m, count(*) as n from l group by m having m = 1", l=LINES)


def test_filter_goes_into_every_union_input_and_below_sort_distinct_repartition():
    a = orders().select("o_id", "o_cust")
    b = orders().select(col("o_cust").alias("o_id"), col("o_id").alias("o_cust"))
    ds = a.union(b).sort("o_id").distinct().repartition(3).filter(col("o_id") > 30)
    tree = plan_parts(ds)["optimized"]
    assert tree.splitlines()[0].startswith("Repartition")
    assert tree.count("Filter(") == 2  # one per union input
    got = same_with_and_without(ds)
    want = duck("select distinct * from (select o_id, o_cust from o union all "
                "select o_cust, o_id from o) where o_id > 30", o=ORDERS)
    assert bag(got) == bag(want)


def test_filter_never_goes_below_a_limit_a_cache_or_a_map():
    base = orders(1)
    for ds in (base.limit(10).filter(col("o_id") > 5),
               base.cache().filter(col("o_id") > 5),
               base.map(lambda r: r).filter(col("o_id") > 5)):
        tree = plan_parts(ds)["optimized"]
        assert tree.splitlines()[0].startswith("Filter"), tree
        same_with_and_without(ds)


def test_outer_join_becomes_inner_when_the_filter_rejects_its_nulls():
    ds = orders().join(lines(), left_on="o_id", right_on="l_order", how="left") \
        .filter(col("l_qty") > 5)
    tree = plan_parts(ds)["optimized"]
    assert "outer_join_to_inner" in fired(ds)
    assert "Join inner" in tree
    assert any(c.startswith("Filter") for c in children_under(tree, "Join"))  # (either side)
    got = same_with_and_without(ds)
    assert bag(got) == bag(duck("select * from o left join l on o_id = l_order where l_qty > 5",
                                o=ORDERS, l=LINES))
    # is_null keeps the padded rows: the join stays a left join, the filter above it
    kept = orders().join(lines(), left_on="o_id", right_on="l_order", how="left") \
        .filter(col("l_qty").is_null())
    assert "Join left" in plan_parts(kept)["optimized"]
    got = same_with_and_without(kept)
    assert sorted(r["o_id"] for r in got) == [r["o_id"] for r in duck(
        "select o_id from o left join l on o_id = l_order where l_qty is null order by o_id",
        o=ORDERS, l=LINES)]


def test_full_outer_join_narrows_by_side():
    o = orders().select("o_id", "o_price")
    li = lines().select("l_order", "l_qty")
    one = o.join(li, left_on="o_id", right_on="l_order", how="outer").filter(col("o_price") > 20)
    assert "Join left" in plan_parts(one)["optimized"]
    both = o.join(li, left_on="o_id", right_on="l_order", how="outer") \
        .filter((col("o_price") > 20) & (col("l_qty") < 4))
    assert "Join inner" in plan_parts(both)["optimized"]
    for ds, where in ((one, "o_price > 20"), (both, "o_price > 20 and l_qty < 4")):
        got = same_with_and_without(ds)
        want = duck("select o_id, o_price, l_order, l_qty from o full join l on o_id = l_order "
                    f"where {where}", o=ORDERS, l=LINES)
        assert bag(got) == bag(want)


def test_equalities_across_a_join_become_keys():
    o = orders().select("o_id", "o_cust", (col("o_id") % 3).alias("v"))
    li = lines().select("l_order", (col("l_qty") % 3).alias("v"), "l_qty")
    ds = o.join(li, left_on="o_id", right_on="l_order").filter(col("v") == col("v_right"))
    tree = plan_parts(ds)["optimized"]
    assert "infer_join_keys" in fired(ds)
    assert "left_on=['o_id', 'v'] right_on=['l_order', 'v']" in tree
    got = same_with_and_without(ds)
    assert list(got[0]) == ["o_id", "o_cust", "v", "l_order", "v_right", "l_qty"]
    want = duck("select o.*, l.l_order, l.v as v_right, l.l_qty from "
                "(select o_id, o_cust, o_id % 3 as v from o) o join "
                "(select l_order, l_qty % 3 as v, l_qty from l) l "
                "on o_id = l_order and o.v = l.v", o=ORDERS, l=LINES)
    assert bag(got) == bag(want)


def test_filters_into_parquet_scans_split_by_what_arrow_can_do(tmp_path):
    pq.write_table(LINES, tmp_path / "l.parquet", row_group_size=20)
    ds = ms.read_parquet(str(tmp_path / "l.parquet")).filter(
        (col("l_qty") > 4) & ((col("l_order") % 7) == 1))
    tree = plan_parts(ds)["optimized"]
    assert "filter=(l_qty > 4)" in tree      # into the scan
    assert 'Filter(((col("l_order") % lit(7)) == lit(1)))' in tree   # no Arrow form: stays
    got = same_with_and_without(ds)
    assert bag(got) == bag(duck("select * from l where l_qty > 4 and l_order % 7 = 1", l=LINES))


# ------------------------------------------------------------------------------- columns

def test_projection_is_pruned_through_joins_into_the_scans(tmp_path):
    pq.write_table(ORDERS, tmp_path / "o.parquet")
    pq.write_table(LINES, tmp_path / "l.parquet")
    o, li = ms.read_parquet(str(tmp_path / "o.parquet")), ms.read_parquet(str(tmp_path / "l.parquet"))
    ds = (o.join(li, left_on="o_id", right_on="l_order")
          .join(ms.read_parquet(str(tmp_path / "o.parquet")).select("o_id", "o_status"),
                on="o_id")
          .group_by("o_status").agg(ms.sum("l_price").alias("rev")))
    tree = plan_parts(ds)["optimized"]
    assert "projection_into_scan" in fired(ds)
    assert "columns=[o_id,o_status]" in tree
    assert tree.count("columns=") == 3
    assert "l_qty" not in tree and "o_note" not in tree
    got = same_with_and_without(ds)
    want = duck("select o2.o_status, sum(l_price) as rev from o join l on o_id = l_order "
                "join o o2 on o.o_id = o2.o_id group by o2.o_status", o=ORDERS, l=LINES)
    assert bag(got) == bag(want)


def test_projection_goes_above_a_cached_side_and_unused_aggregates_go():
    cached = lines().with_columns(extra=col("l_qty") * 2).cache()
    ds = (orders().join(cached, left_on="o_id", right_on="l_order")
          .group_by("o_cust").agg(ms.sum("extra").alias("e"), ms.max("l_note").alias("unused"))
          .select("o_cust", "e"))
    tree = plan_parts(ds)["optimized"]
    assert "projection_pruning" in fired(ds)
    assert 'Project(col("l_order"), col("extra"))' in tree  # above the cache, below the join
    assert "unused" not in tree.split("Aggregate")[1].splitlines()[0]
    same_with_and_without(ds)


def test_a_right_column_keeps_its_suffixed_name_when_the_left_one_is_unused():
    o = orders().select("o_id", col("o_price").alias("price"))
    li = lines().select("l_order", col("l_price").alias("price"))
    ds = o.join(li, left_on="o_id", right_on="l_order").select("o_id", "price_right")
    got = same_with_and_without(ds)
    assert list(got[0]) == ["o_id", "price_right"]


# ------------------------------------------------------------------------------- limits

@pytest.mark.parametrize("desc,nulls_last", [(False, None), (True, None), (True, False),
                                             (False, True)])
def test_sort_limit_is_a_top_k_with_the_sort_order(desc, nulls_last):
    t = pa.table({"k": [3, None, 1, 3, float("nan"), 2, None, 1, 3, 0.5] * 7,
                  "i": list(range(70))})
    ds = ms.from_arrow(t, num_partitions=4).sort("k", descending=desc, nulls_last=nulls_last) \
        .limit(13)
    parts = plan_parts(ds)
    assert "TopK 13 by k" in parts["optimized"] and "Sort" not in parts["optimized"]
    assert "partial top-13" in parts["physical"] and "sample" not in parts["physical"]
    same_with_and_without(ds, ordered=True)


def test_top_k_after_a_group_by_matches_duckdb():
    ds = (lines().group_by("l_order").agg(ms.sum("l_price").alias("rev"))
          .sort(["rev", "l_order"], descending=[True, False]).limit(5))
    assert "TopK 5" in plan_parts(ds)["optimized"]
    got = same_with_and_without(ds, ordered=True)
    want = duck("select l_order, sum(l_price) as rev from l group by l_order "
                "order by rev desc, l_order limit 5", l=LINES)
    assert [(r["l_order"], norm(r["rev"])) for r in got] == \
        [(r["l_order"], norm(r["rev"])) for r in want]


def test_limit_moves_down_to_scans_sorts_and_union_inputs():
    ds = ms.range(1_000_000).select((col("id") * 2).alias("x")).limit(5)
    tree = plan_parts(ds)["optimized"]
    assert "limit_pushdown" in fired(ds)
    assert "range(0, 5, 1)" in tree
    assert [r["x"] for r in same_with_and_without(ds, ordered=True)] == [0, 2, 4, 6, 8]
    u = orders().sort("o_price", descending=True).union(ms.range(100).select(
        col("id").alias("o_id"))).limit(3)
    tree = plan_parts(u)["optimized"]
    assert "TopK 3" in tree and "range(0, 3, 1)" in tree
    same_with_and_without(u, ordered=True)
    top_then_select = orders().sort("o_price").limit(4).select("o_id")
    assert plan_parts(top_then_select)["optimized"].splitlines()[1].strip().startswith("TopK 4")
    zero = orders().limit(0)
    assert "Scan empty" in plan_parts(zero)["optimized"]
    assert same_with_and_without(zero) == []


# ------------------------------------------------------------------------------- streaming

def test_streaming_plans_keep_filters_above_watermarks():
    src = TestSource(schema=pa.schema([("k", pa.int64()), ("t", pa.timestamp("us")),
                                       ("v", pa.int64())]))
    stream = ms.Dataset(L.Scan(src)).with_watermark("t", "1s").filter(col("v") > 3) \
        .select("k", "t")
    from millstream.plan.compile import streaming_settings

    node, _ = optimize_traced(stream._node, streaming_settings(2))
    tree = node.tree()
    assert tree.index("Filter") < tree.index("WithWatermark")  # above it, as written
    never = ms.Dataset(L.Scan(src)).filter(lit(False))
    node, _ = optimize_traced(never._node, streaming_settings(2))
    assert isinstance(node, L.Filter) and isinstance(node.child, L.Scan)  # the source stays
    top = ms.Dataset(L.Scan(src)).sort("v").limit(3)
    node, rules = optimize_traced(top._node, streaming_settings(2))
    assert "topk" not in rules and "limit_pushdown" not in rules


def test_stream_table_join_filters_reach_the_table():
    table = ms.from_arrow(CUST)
    stream = ms.from_arrow(ORDERS, num_partitions=2)
    ds = stream.join(table, left_on="o_cust", right_on="c_id", how="left") \
        .filter((col("c_nation") == 1) & (col("o_price") > 10))
    from millstream.plan.compile import streaming_settings

    node, rules = optimize_traced(ds._node, streaming_settings(2))
    assert "outer_join_to_inner" in rules
    join = node if isinstance(node, L.Join) else node.children[0]
    assert isinstance(join, L.Join) and join.how == "inner"
    job = ds.start(checkpoint_interval=0, executor="inline")
    assert job.await_termination(30)
    want = duck("select * from o left join c on o_cust = c_id where c_nation = 1 and "
                "o_price > 10", o=ORDERS, c=CUST)
    assert bag(job.sink.rows()) == bag(want)


# ------------------------------------------------------------------------------- TPC-H-like

def test_a_query_written_as_sql_reads_gets_its_filters_placed():
    """Q3-like: joins first, filters after, as the SQL reads."""
    ds = (cust().join(orders(), left_on="c_id", right_on="o_cust")
          .join(lines(), left_on="o_id", right_on="l_order")
          .filter((col("c_nation") == 1) & (col("o_status") == "F") & (col("l_flag") == "A"))
          .group_by("o_id", "o_status")
          .agg((ms.sum("l_price")).alias("revenue"))
          .sort(["revenue", "o_id"], descending=[True, False]).limit(10))
    tree = plan_parts(ds)["optimized"]
    for cond in ('col("c_nation") == lit(1)', 'col("o_status") == lit("F")',
                 'col("l_flag") == lit("A")'):
        line = next(x for x in tree.splitlines() if cond in x)
        assert "Scan" in tree.splitlines()[tree.splitlines().index(line) + 1], tree
    assert "TopK 10" in tree
    got = same_with_and_without(ds, ordered=True)
    want = duck("select o_id, o_status, sum(l_price) as revenue from c join o on c_id = o_cust "
                "join l on o_id = l_order where c_nation = 1 and o_status = 'F' and "
                "l_flag = 'A' group by o_id, o_status order by revenue desc, o_id limit 10",
                c=CUST, o=ORDERS, l=LINES)
    assert [(r["o_id"], norm(r["revenue"])) for r in got] == \
        [(r["o_id"], norm(r["revenue"])) for r in want]


# ------------------------------------------------------------------------------- random pipelines

LEFT = pa.schema([("k", pa.int64()), ("a", pa.int64()), ("s", pa.string())])
RIGHT = pa.schema([("k", pa.int64()), ("b", pa.int64()), ("a", pa.int64())])
small = st.one_of(st.none(), st.integers(-5, 5))
left_rows = st.lists(st.fixed_dictionaries({"k": st.one_of(st.none(), st.integers(0, 4)),
                                            "a": small,
                                            "s": st.one_of(st.none(), st.sampled_from(
                                                ["x", "y", "xy"]))}), max_size=30)
right_rows = st.lists(st.fixed_dictionaries({"k": st.one_of(st.none(), st.integers(0, 4)),
                                             "b": small, "a": small}), max_size=12)


def _int_columns(ds: ms.Dataset) -> list[str]:
    return [f.name for f in ds.schema if pa.types.is_integer(f.type)]


def _predicate(data, ds: ms.Dataset):
    ints = _int_columns(ds)
    strs = [f.name for f in ds.schema if pa.types.is_string(f.type)]
    choices = []
    if ints:
        choices.append(lambda: getattr(col(data.draw(st.sampled_from(ints))),
                                       data.draw(st.sampled_from(["__gt__", "__le__",
                                                                  "__eq__", "__ne__"])))(
            data.draw(st.integers(-3, 3))))
        choices.append(lambda: col(data.draw(st.sampled_from(ints))).is_null())
        choices.append(lambda: col(data.draw(st.sampled_from(ints))).is_not_null())
    if len(ints) > 1:
        choices.append(lambda: col(data.draw(st.sampled_from(ints))) <=
                       col(data.draw(st.sampled_from(ints))))
        choices.append(lambda: col(data.draw(st.sampled_from(ints))) ==
                       col(data.draw(st.sampled_from(ints))))
    if strs:
        choices.append(lambda: col(data.draw(st.sampled_from(strs))) == data.draw(
            st.sampled_from(["x", "y"])))
    pick = data.draw(st.sampled_from(choices))
    p = pick()
    if data.draw(st.booleans()):
        p = p & data.draw(st.sampled_from(choices))()
    if data.draw(st.booleans()):
        p = p | lit(False) if data.draw(st.booleans()) else ~p
    return p


def _step(data, ds: ms.Dataset, right: ms.Dataset) -> ms.Dataset:
    cols = ds.columns
    ints = _int_columns(ds)
    ops = ["filter", "filter", "select", "with_columns"]
    if "k" in cols:
        ops += ["join", "group_by"]
    ops += ["distinct", "union", "sort_limit", "rename_drop"]
    op = data.draw(st.sampled_from(ops))
    if op == "filter":
        return ds.filter(_predicate(data, ds))
    if op == "select":
        keep = data.draw(st.lists(st.sampled_from(cols), min_size=1, unique=True))
        extra = []
        if ints and data.draw(st.booleans()):
            extra = [(col(data.draw(st.sampled_from(ints))) + lit(1)).alias("c1")]
        if "c1" in keep:
            extra = []
        return ds.select(*keep, *extra)
    if op == "with_columns":
        if not ints:
            return ds
        name = data.draw(st.sampled_from(["w", ints[0]]))
        return ds.with_columns(**{name: col(data.draw(st.sampled_from(ints))) * 2})
    if op == "join":
        how = data.draw(st.sampled_from(["inner", "left", "right", "outer", "semi", "anti"]))
        clash = [c for c in right.columns if c != "k" and c + "_right" in cols]
        if clash:
            return ds
        return ds.join(right, on="k", how=how)
    if op == "group_by":
        others = [c for c in ints if c not in ("k", "n", "total")]
        keys = ["k"] + (others[:1] if data.draw(st.booleans()) else [])
        aggs = [ms.count().alias("n")]
        vals = [c for c in ints if c not in keys]
        if vals:
            aggs.append(ms.sum(vals[0]).alias("total"))
        return ds.group_by(*keys).agg(*aggs)
    if op == "distinct":
        return ds.distinct()
    if op == "rename_drop":
        victim = data.draw(st.sampled_from(cols))
        if data.draw(st.booleans()) and len(cols) > 1:
            return ds.drop(victim)
        return ds.rename({victim: victim + "_r"}) if victim + "_r" not in cols else ds
    if op == "union":
        return ds.union(ds.filter(_predicate(data, ds)))
    by = list(cols)
    return ds.sort(by, descending=data.draw(st.booleans())).limit(data.draw(st.integers(0, 8)))


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(left=left_rows, right=right_rows, data=st.data(), parts=st.integers(1, 3))
def test_random_pipelines_give_the_same_rows_with_and_without_the_optimizer(left, right, data,
                                                                            parts):
    ds = ms.from_arrow(pa.Table.from_pylist(left, schema=LEFT), num_partitions=parts)
    rds = ms.from_arrow(pa.Table.from_pylist(right, schema=RIGHT), num_partitions=1)
    for _ in range(data.draw(st.integers(1, 5))):
        ds = _step(data, ds, rds)
    on = ds.to_arrow()
    off = ds.to_arrow(optimizer=False)
    assert on.schema.names == off.schema.names
    assert [f.type for f in on.schema] == [f.type for f in off.schema]
    assert bag(on.to_pylist()) == bag(off.to_pylist())


def test_a_replaced_column_keeps_its_place_when_a_column_after_it_is_dropped():
    """Found by the test above: pruning read no ``k`` for a ``with_columns`` that replaces
    it, which then added ``k`` last."""
    t = pa.table({"k": [1, 2], "a": [3, 4], "s": ["x", "y"]})
    ds = (ms.from_arrow(t).with_columns(w=col("k") * 2).with_columns(k=col("a") * 2)
          .drop("w"))
    assert ds.columns == ["k", "a", "s"]
    assert ds.to_arrow().schema.names == ["k", "a", "s"]
    assert ds.to_arrow().to_pylist() == ds.to_arrow(optimizer=False).to_pylist() == [
        {"k": 6, "a": 3, "s": "x"}, {"k": 8, "a": 4, "s": "y"}]


# ------------------------------------------------------------------------------- errors

def _frames(exc_info) -> list[str]:
    return [f.filename for f in traceback.extract_tb(exc_info.tb)]


def test_group_by_an_unknown_column_fails_when_built_at_the_users_line():
    with pytest.raises(SchemaError) as info:
        orders().group_by("o_cst")
    msg = str(info.value)
    assert "group_by" in msg and "'o_cst'" in msg and "o_cust" in msg
    assert "did you mean 'o_cust'" in msg
    assert __file__ in msg  # where the user called it
    frames = _frames(info)
    assert frames[0] == __file__
    assert len([f for f in frames if "millstream" in f and f != __file__]) <= 3


@pytest.mark.parametrize("build,words", [
    (lambda d: d.filter(col("o_status") > 1), ["filter", "o_status", "string"]),
    (lambda d: d.select((col("o_status") + 1).alias("x")), ["select", "o_status"]),
    (lambda d: d.with_columns(y=col("o_status") * 2), ["with_columns", "o_status"]),
    (lambda d: d.filter(col("o_id") + 1), ["filter", "boolean"]),
    (lambda d: d.group_by("o_cust").agg(ms.sum("o_status")), ["agg", "sum", "string"]),
    (lambda d: d.agg(ms.mean("o_note")), ["agg", "mean", "o_note"]),
    (lambda d: d.join(lines(), left_on="o_status", right_on="l_qty"), ["join", "cast"]),
    (lambda d: d.join(lines(), left_on="o_id", right_on="l_ordr"), ["join", "l_ordr", "l_order"]),
    (lambda d: d.sort("o_prce"), ["sort", "o_prce", "o_price"]),
    (lambda d: d.explode("o_id"), ["explode", "not a list"]),
    (lambda d: d.group_by(col("o_nte").str.len()), ["group_by", "o_nte"]),
    (lambda d: d.select("o_id").filter(col("o_cust") > 1), ["filter", "o_cust", "o_id"]),
])
def test_schema_mistakes_fail_when_built(build, words):
    with pytest.raises(SchemaError) as info:
        build(orders())
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_after_a_python_function_checks_wait_for_the_job():
    mapped = orders().map(lambda r: {"a": r["o_id"]})
    ds = mapped.select("nope")  # the columns are unknown here: nothing is guessed
    with pytest.raises(SchemaError, match="nope"):
        ds.collect()


# ------------------------------------------------------------------------------- fixed point

def test_optimized_plans_are_a_fixed_point():
    from millstream.plan.physical import PlannerSettings

    settings_ = PlannerSettings(4, 10 << 20, lambda _cid: None)
    q3 = (cust().join(orders(), left_on="c_id", right_on="o_cust")
          .join(lines(), left_on="o_id", right_on="l_order")
          .filter((col("c_nation") == 1) & (col("l_flag") == "A") & (col("o_id") == col("l_qty")))
          .group_by("o_id").agg(ms.sum("l_price").alias("rev")).sort("rev").limit(3))
    plans = [
        q3,
        orders().join(lines(), left_on="o_id", right_on="l_order", how="outer")
        .filter((col("o_price") > 1) & (col("l_qty") > 1)).select("o_id", "l_qty"),
        orders().sort("o_id").union(orders()).limit(5).select("o_id"),
        orders().filter(lit(False)).union(orders().filter(col("o_id") == col("o_id"))),
    ]
    for ds in plans:
        node, rules = optimize_traced(ds._node, settings_)
        assert rules, ds._node.tree()
        again, more = optimize_traced(node, settings_)
        assert more == [] and again is node, (more, node.tree())
