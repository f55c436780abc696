"""ms.sql: tables given by keyword, registered or named by path; statements (EXPLAIN, views,
COPY, INSERT); Python functions; dialects; the plan it builds; errors with their place and
wording; the ``millstream sql`` command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import millstream as ms
from millstream.plan import logical as L

T = pa.table({"k": [1, 2, 2, None], "a": [10, 20, 30, 40], "s": ["x", "y", None, "x"]})
U = pa.table({"k": [1, 2, 5], "name": ["one", "two", "five"]})
SRC = Path(__file__).resolve().parent.parent / "src"


def norm(items: list[tuple]) -> list[tuple]:
    return sorted(items, key=lambda r: tuple((v is not None, str(v)) for v in r))


def rows(ds: ms.Dataset) -> list[tuple]:
    return norm([tuple(r.values()) for r in ds.collect()])


# ----------------------------------------------------------------------------- tables
def test_tables_by_keyword_are_datasets_arrow_pandas_polars():
    pd = pytest.importorskip("pandas")
    pl = pytest.importorskip("polars")
    q = "select t.k, sum(a) s, u.name from t join u on t.k = u.k group by t.k, u.name"
    want = [(1, 10, "one"), (2, 50, "two")]
    assert rows(ms.sql(q, t=T, u=U)) == norm(want)
    assert rows(ms.sql(q, t=ms.from_arrow(T), u=U.to_pandas())) == norm(want)
    assert rows(ms.sql(q, t=pl.from_arrow(T), u=pd.DataFrame(U.to_pydict()))) == norm(want)


def test_the_result_is_a_lazy_dataset_over_the_same_plan():
    ds = ms.from_arrow(T).filter(ms.col("a") > 10)
    out = ms.sql("select s, count(*) n from ds group by s", ds=ds)
    assert isinstance(out, ms.Dataset)
    assert out.columns == ["s", "n"]

    def scans(node):
        return [node] if isinstance(node, L.Scan) else [s for c in node.children for s in scans(c)]

    assert scans(out._node)[0] is scans(ds._node)[0]  # the query extends the Dataset's plan
    assert rows(out) == norm([(None, 1), ("x", 1), ("y", 1)])


def test_register_unregister_and_paths_in_from(tmp_path):
    pq.write_table(T, tmp_path / "t.parquet")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "a.json").write_text('{"level": "ERROR", "n": 1}\n'
                                                '{"level": "INFO", "n": 2}\n')
    ms.register("sqltest_t", ms.from_arrow(T))
    try:
        assert ms.sql("select count(*) c from SQLTEST_T").collect() == [{"c": 4}]
    finally:
        ms.unregister("sqltest_t")
    with pytest.raises(ms.SQLError, match="unknown table 'sqltest_t'"):
        ms.sql("select * from sqltest_t")
    assert rows(ms.sql(f"select n from '{tmp_path}/logs/*.json' where level = 'ERROR'")) == norm([(1,)])
    assert ms.sql(f"select sum(a) s from read_parquet('{tmp_path}/t.parquet')").collect() == \
        [{"s": 100}]
    ms.register("sqltest_p", str(tmp_path / "t.parquet"))
    try:
        assert ms.sql("select max(a) m from sqltest_p").collect() == [{"m": 40}]
    finally:
        ms.unregister("sqltest_p")


def test_a_cte_used_twice_is_one_node():
    out = ms.sql("with x as (select k, sum(a) s from t group by k) "
                 "select x1.k, x1.s, x2.s s2 from x x1 join x x2 on x1.k = x2.k", t=T)
    aggs = []

    def walk(node):
        if isinstance(node, L.Aggregate):
            aggs.append(node)
        for c in node.children:
            walk(c)

    walk(out._node)
    assert len(aggs) == 2 and aggs[0] is aggs[1]
    assert rows(out) == norm([(1, 10, 10), (2, 50, 50)])


# ----------------------------------------------------------------------------- statements
def test_explain_views_copy_insert(tmp_path):
    plan = ms.sql("explain select k, count(*) from t where a > 10 group by k", t=T).collect()
    assert "== Optimized plan ==" in plan[0]["plan"] and "Aggregate" in plan[0]["plan"]
    assert ms.sql("create temp view sqltest_v as select k, a from t where a > 15", t=T) is None
    try:
        assert rows(ms.sql("select sum(a) s from sqltest_v")) == norm([(90,)])
        with pytest.raises(ms.SQLError, match="exists; use CREATE OR REPLACE VIEW"):
            ms.sql("create view sqltest_v as select 1", t=T)
        ms.sql("create or replace view sqltest_v as select 1 as one")
        assert ms.sql("select * from sqltest_v").collect() == [{"one": 1}]
    finally:
        ms.sql("drop view sqltest_v")
    out = tmp_path / "out"
    ms.sql(f"copy (select k, a from t where k is not null) to '{out}' (format parquet)", t=T)
    assert sorted(pq.read_table(out).to_pydict()["a"]) == [10, 20, 30]
    ms.register("sqltest_sink", str(out), format="parquet")
    try:
        ms.sql("insert into sqltest_sink select k, a from t where k is null", t=T)
        assert sorted(pq.read_table(out).to_pydict()["a"]) == [10, 20, 30, 40]
        with pytest.raises(ms.SQLError, match="registered by path"):
            ms.sql("insert into t select * from t", t=T)
    finally:
        ms.unregister("sqltest_sink")


def test_several_statements_run_in_order():
    out = ms.sql("create or replace view sqltest_w as select 2 as x; select x * 21 y from "
                 "sqltest_w")
    try:
        assert out.collect() == [{"y": 42}]
    finally:
        ms.unregister("sqltest_w")


# ----------------------------------------------------------------------------- functions
def test_python_functions_scalar_vectorized_and_aggregate():
    import pyarrow.compute as pc

    ms.register_function("sqltest_twice", lambda x: None if x is None else 2 * x,
                         return_type="int64")
    ms.register_function("sqltest_shout", lambda arr: pc.utf8_upper(arr),
                         return_type=pa.string(), vectorized=True)
    ms.register_function("sqltest_spread", lambda xs: max(xs) - min(xs) if xs else None,
                         return_type="int64", kind="aggregate")
    try:
        out = ms.sql("select k, sqltest_twice(sum(a)) tw, sqltest_spread(a) sp, "
                     "max(sqltest_shout(s)) sh from t group by k", t=T)
        assert out.schema.field("tw").type == pa.int64()
        assert rows(out) == norm([(1, 20, 0, "X"), (2, 100, 10, "Y"), (None, 80, 0, "X")])
        with pytest.raises(ms.SQLError, match=r"unknown function sqltest_twic\(\) "
                                              r"\(did you mean sqltest_twice\(\)\?\)"):
            ms.sql("select sqltest_twic(a) from t", t=T)
    finally:
        for name in ("sqltest_twice", "sqltest_shout", "sqltest_spread"):
            ms.unregister_function(name)


def test_dialects():
    # Spark: backquoted names, and ascending sorts put nulls first
    out = ms.sql("select `k` from t order by k", dialect="spark", t=T).collect()
    assert [r["k"] for r in out] == [None, 1, 2, 2]
    out = ms.sql("select k from t order by k", t=T).collect()  # DuckDB: nulls last
    assert [r["k"] for r in out] == [1, 2, 2, None]
    with pytest.raises(ms.SQLError, match="unknown SQL dialect 'nosuch'"):
        ms.sql("select 1", dialect="nosuch")


# ----------------------------------------------------------------------------- errors
def _error(query: str, **tables) -> ms.SQLError:
    with pytest.raises(ms.SQLError) as info:
        ms.sql(query, **tables)
    return info.value


def test_syntax_error_has_line_column_and_caret():
    e = _error("select k,\n       a +\n  from t", t=T)
    assert (e.line, e.column) == (3, 3)
    assert str(e).splitlines()[-2:] == ["      from t", "      ^^^^"]
    e = _error("select k frm t where", t=T)
    assert e.line == 1 and "syntax error" in str(e)
    e = _error("select 'abc from t", t=T)
    assert (e.line, e.column) == (1, 8) and "never closed" in str(e)


def test_unknown_column_names_the_closest_and_what_is_there():
    e = _error("select k, aa\nfrom t", t=T)
    assert (e.line, e.column) == (1, 11)
    assert e.reason == "unknown column 'aa' (did you mean 'a'?); columns here: k, a, s"
    assert str(e).splitlines()[-1] == "              ^^"
    e = _error("select t.nme from u t", u=U)
    assert "table 't' has no column 'nme' (did you mean t.name?)" in str(e)
    e = _error("select x.k from t", t=T)
    assert "unknown table 'x' in x.k" in str(e) and "tables here: t" in str(e)


def test_unknown_table_names_the_closest_and_how_to_add_one():
    e = _error("select * from tt", t=T, u=U)
    assert e.reason.startswith("unknown table 'tt' (did you mean 't'?); tables: t, u")
    assert "ms.register('tt', data)" in e.reason
    assert (e.line, e.column) == (1, 15)


def test_ambiguous_and_grouping_errors():
    e = _error("select k from t join u on t.k = u.k", t=T, u=U)
    assert "column 'k' is ambiguous" in str(e) and "t.k" in str(e)
    e = _error("select k, a from t group by k", t=T)
    assert "column a must appear in GROUP BY or be used in an aggregate function" in str(e)
    assert e.column == 11
    e = _error("select k from t where sum(a) > 1", t=T)
    assert "aggregate functions are not allowed in WHERE; use HAVING" in str(e)


def test_unsupported_constructs_are_named():
    assert "unknown function nosuchfn()" in str(_error("select nosuchfn(a) from t", t=T))
    assert "TRY_CAST is not supported" in str(_error("select try_cast(a as int) from t", t=T))
    assert "WITH RECURSIVE is not supported" in str(_error(
        "with recursive r as (select 1 x) select * from r"))
    assert "LATERAL is not supported" in str(_error(
        "select * from t, lateral (select t.a) x", t=T))
    assert "INTERSECT ALL is not supported" in str(_error(
        "select k from t intersect all select k from u", t=T, u=U))


# ----------------------------------------------------------------------------- command line
def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(SRC) + ":" + ":".join(p for p in sys.path if p),
           "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "millstream.cli.main", "sql", *args,
                           "--parallelism", "1"], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


def test_cli_prints_writes_and_explains(tmp_path):
    pq.write_table(T, tmp_path / "t.parquet")
    query = f"select k, sum(a) as total from '{tmp_path}/t.parquet' group by k order by k"
    out = _cli(query)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1] == "|   k|total|"
    assert "|null|   40|" in out.stdout
    (tmp_path / "q.sql").write_text("select count(*) as n from t")
    out = _cli("-f", str(tmp_path / "q.sql"), "--table", f"t={tmp_path}/t.parquet",
               "-o", str(tmp_path / "res.parquet"))
    assert out.returncode == 0, out.stderr
    assert pq.read_table(tmp_path / "res.parquet").to_pydict() == {"n": [4]}
    out = _cli(query, "--explain")
    assert out.returncode == 0 and "== Physical plan ==" in out.stdout
    out = _cli("select nope from t", "--table", f"t={tmp_path}/t.parquet")
    assert out.returncode == 1
    assert "unknown column 'nope'" in out.stderr and "^^^^" in out.stderr
