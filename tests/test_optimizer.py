"""The optimizer pushes filters and projections into scans without changing results."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

import millstream as ms


def _parquet(tmp_path):
    path = tmp_path / "t"
    path.mkdir()
    for i in range(4):
        ids = list(range(i * 1000, (i + 1) * 1000))
        pq.write_table(pa.table({"id": ids, "g": [v % 10 for v in ids], "s": [str(v) for v in ids]}),
                       path / f"part-{i}.parquet", row_group_size=250)
    return str(path)


def test_filter_moves_below_with_columns_into_the_scan(tmp_path):
    ds = (ms.read_parquet(_parquet(tmp_path)).with_columns(x=ms.col("id") * 2)
          .filter(ms.col("g") == 3).filter(ms.col("x") > 10))
    optimized = ds.explain(print_plan=False).split("== Optimized plan ==")[1].split("== Physical")[0]
    assert "(g == 3)" in optimized.split("filter=")[1]   # pushed into the Parquet scan
    # depends on x = id * 2: rewritten through with_columns, it reaches the scan too
    assert "(multiply_checked(id, 2) > 10)" in optimized.split("filter=")[1]
    assert "Filter(" not in optimized
    assert sorted(r["id"] for r in ds.collect()) == [i for i in range(4000) if i % 10 == 3 and i * 2 > 10]


def test_projection_reaches_the_scan(tmp_path):
    ds = ms.read_parquet(_parquet(tmp_path)).select("s", (ms.col("id") + 1).alias("next"))
    assert "columns=[id,s]" in ds.explain(print_plan=False)
    rows = ds.collect()
    assert len(rows) == 4000 and rows[0].keys() == {"s", "next"}


def test_filter_on_a_produced_column_is_not_moved(tmp_path):
    ds = ms.read_parquet(_parquet(tmp_path)).with_columns(g=ms.col("g") + 100).filter(ms.col("g") == 103)
    assert ds.count() == 400


def test_user_code_search_visits_each_expression_once(monkeypatch):
    """An expression's arguments are its children and a field of it: judging them once per
    path took time exponential in the depth (a 16-deep conjunction: ~10^5 visits)."""
    from millstream.expr.udf import PythonFunction
    from millstream.plan import user_code
    from millstream.plan.logical import Node

    calls = []
    real = user_code.has_user_code

    def counting(value, skip, *args):
        calls.append(1)
        return real(value, skip, *args)

    monkeypatch.setattr(user_code, "has_user_code", counting)
    pred = ms.col("c0") > 0
    for i in range(1, 16):
        pred = pred & (ms.col(f"c{i}") > i)
    assert not user_code.has_user_code(pred, Node)
    assert len(calls) < 1000
    udf = PythonFunction("f", lambda x: x, (ms.col("c0"),), pa.bool_())
    assert user_code.has_user_code(pred & udf, Node)  # still found at the top of a deep tree
    assert user_code.has_user_code(udf & pred, Node)
