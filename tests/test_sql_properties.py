"""Each SQL construct against DuckDB on random tables (hypothesis), nulls included: the same
query text through ``ms.sql`` and DuckDB gives the same rows (in order where the query
orders them completely)."""

from __future__ import annotations

import datetime as dt
import decimal
import math

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracles import duckdb_connect

import millstream as ms

duckdb = pytest.importorskip("duckdb")

T = pa.schema([("k", pa.int64()), ("a", pa.int64()), ("b", pa.float64()), ("s", pa.string()),
               ("d", pa.date32())])
U = pa.schema([("k", pa.int64()), ("v", pa.int64()), ("w", pa.string())])

ints = st.one_of(st.none(), st.integers(-10, 10))
halves = st.one_of(st.none(), st.integers(-20, 20).map(lambda x: x / 2))
words = st.one_of(st.none(), st.text("abAB ", max_size=5))
dates = st.one_of(st.none(), st.dates(dt.date(2019, 11, 1), dt.date(2021, 3, 1)))
keys = st.one_of(st.none(), st.integers(0, 4))
t_rows = st.lists(st.fixed_dictionaries({"k": keys, "a": ints, "b": halves, "s": words,
                                         "d": dates}), max_size=25)
u_rows = st.lists(st.fixed_dictionaries({"k": keys, "v": ints, "w": words}), max_size=12)

#: (query, ordered): ordered queries sort by every output column, so the order is known
QUERIES = [
    # projections, arithmetic, comparisons
    ("select a, b, s from t where a > 2", False),
    ("select a + k, a * 2 - k, -a, a / 2.0, a // 3, a % 3 from t", False),
    ("select a, k, a = k, a <> k, a < k, a >= k, a is distinct from k from t", False),
    ("select a between -2 and 5, a not between 0 and 3, a in (1, 2, 3), a not in (1, 2) "
     "from t", False),
    ("select a in (1, null), a not in (1, null) from t", False),
    ("select (a > 0) and (b > 0), (a > 0) or (b > 0), not (a > 0), a is null, b is not null "
     "from t", False),
    ("select coalesce(a, k, 0), nullif(a, k), coalesce(s, 'none') from t", False),
    ("select case when a > 0 then 'pos' when a < 0 then 'neg' else 'zero' end, "
     "case k when 1 then 'one' when 2 then 'two' end from t", False),
    ("select cast(b as integer), cast(a as double), cast(a as varchar), cast(k as bigint) "
     "from t", False),
    # strings
    ("select s, upper(s), lower(s), length(s), s || 'x', concat(s, '-', s) from t", False),
    ("select substring(s, 2, 2), replace(s, 'a', 'z'), trim(s), ltrim(s), rtrim(s), "
     "left(s, 2), right(s, 1), reverse(s) from t", False),
    ("select position('b' in s), lpad(s, 4, '*'), rpad(s, 3, '.'), split_part(s, 'b', 1) "
     "from t", False),
    ("select s from t where s like 'a%' or s like '%B_' or s ilike 'b%'", False),
    ("select s from t where s not like '%a%'", False),
    ("select regexp_matches(s, '^a.b'), regexp_replace(s, 'a+', 'X', 'g') from t", False),
    # math
    ("select abs(a), round(b), round(b, 1), ceil(b), floor(b), sign(a), greatest(a, k), "
     "least(a, k) from t", False),
    ("select sqrt(abs(b)), power(b, 2), exp(k), ln(abs(b) + 1) from t", False),
    # dates
    ("select d + interval 3 day, d - interval 1 month, d + interval '1' year, "
     "d - date '2020-01-01' from t", False),
    ("select extract(year from d), extract(month from d), extract(day from d), "
     "extract(dow from d), extract(doy from d), extract(quarter from d) from t", False),
    ("select d from t where d >= '2020-06-01' and d < date '2020-06-01' + interval 2 month",
     False),
    # aggregates
    ("select k, count(*), count(a), sum(a), min(b), max(s), avg(b) from t group by k", False),
    ("select count(*), sum(a), min(d), max(d) from t", False),
    ("select k, count(distinct s), count(distinct a) from t group by k", False),
    ("select k, sum(a) filter (where b > 0), count(*) filter (where s is null) from t "
     "group by k", False),
    ("select k, sum(a) from t group by k having count(*) > 1 and sum(a) is not null", False),
    ("select k + 1 as kk, count(*) from t group by kk", False),
    ("select sum(distinct a), count(distinct a) from t", False),
    ("select extract(year from d) y, count(*) from t group by 1", False),
    ("select distinct k, s from t", False),
    ("select k, a, count(*) from t group by rollup (k, a)", False),
    ("select k, s, sum(a) from t group by cube (k, s)", False),
    ("select k, a, count(*), grouping(k, a) from t group by grouping sets ((k), (a), ())",
     False),
    # order, limit, offset
    ("select k, a, b, s, d from t order by a desc nulls first, k, b, s, d", True),
    ("select k, a, b, s, d from t order by k nulls first, a desc nulls last, b, s, d limit 4",
     True),
    ("select k, a, b, s, d from t order by a, k, b, s, d limit 3 offset 2", True),
    # joins
    ("select t.a, u.v from t join u on t.k = u.k", False),
    ("select t.a, u.v from t left join u on t.k = u.k", False),
    ("select t.a, u.v, u.w from t right join u on t.k = u.k", False),
    ("select t.a, u.v from t full join u on t.k = u.k", False),
    ("select t.a, u.v from t join u on t.k = u.k and u.v > t.a", False),
    ("select t.k, t.a, u.v from t, u where t.k = u.k and t.a < u.v", False),
    ("select k, a, v from t join u using (k)", False),
    ("select t.a, u.v from t cross join u where t.a = 1", False),
    ("select t.a, u.v from t left join u on t.k = u.k and u.v > 0", False),
    # subqueries
    ("select a from t where b > (select avg(b) from t)", False),
    ("select k, (select max(v) from u where u.k = t.k) from t", False),
    ("select k, (select count(*) from u where u.k = t.k) from t", False),
    ("select a from t where exists (select * from u where u.k = t.k)", False),
    ("select a from t where not exists (select * from u where u.k = t.k and u.v > 0)", False),
    ("select a from t where k in (select k from u where v > 0)", False),
    ("select a from t where k not in (select k from u)", False),
    ("select a from t where k not in (select k from u where k is not null)", False),
    ("select a, k in (select k from u) from t", False),
    ("select a from t where a > 5 or k in (select k from u)", False),
    ("select x.k, x.n from (select k, count(*) n from t group by k) x where x.n > 1", False),
    # CTEs, set operations
    ("with x as (select k, sum(a) s from t group by k) "
     "select a.k, a.s, b.s from x a join x b on a.k = b.k", False),
    ("select k from t union all select k from u", False),
    ("select k from t union select k from u", False),
    ("select k, s from t intersect select k, w from u", False),
    ("select k from t except select k from u", False),
    # window functions
    ("select k, a, b, s, d, row_number() over (partition by k order by a, b, s, d) from t",
     False),
    ("select k, a, rank() over (order by a), dense_rank() over (partition by k order by a) "
     "from t", False),
    ("select k, a, b, sum(a) over (partition by k order by a, b, s, d rows between 1 preceding "
     "and current row) from t", False),
    ("select k, a, b, lag(a) over (partition by k order by a, b, s, d), "
     "lead(a, 1, 0) over (partition by k order by a, b, s, d) from t", False),
    ("select k, a, sum(a) over (partition by k), count(*) over (), max(b) over (partition by k "
     "order by a) from t", False),
    ("select k, sum(a), rank() over (order by sum(a) desc) from t group by k", False),
    ("select k, a, b, s, d from t qualify row_number() over (partition by k order by a, b, s, d)"
     " = 1", False),
]


def _value(v):
    if isinstance(v, decimal.Decimal):
        v = float(v)
    if isinstance(v, float):
        return None if math.isnan(v) else round(v, 9)
    if isinstance(v, dt.datetime) and v.time() == dt.time(0) and v.tzinfo is None:
        return v.date()
    return v


def _rows(table: pa.Table) -> list[tuple]:
    columns = [c.to_pylist() for c in table.columns]  # (names may repeat: no dicts)
    return [tuple(_value(v) for v in row) for row in zip(*columns)]


def _sort(rows: list[tuple]) -> list[tuple]:
    return sorted(rows, key=lambda r: tuple((v is None, str(type(v)), str(v)) for v in r))


def _check(query: str, ordered: bool, t: list[dict], u: list[dict]) -> None:
    tt = pa.Table.from_pylist(t, schema=T)
    uu = pa.Table.from_pylist(u, schema=U)
    got = ms.sql(query, t=tt, u=uu).to_arrow(shuffle_partitions=1)
    con = duckdb_connect()
    con.register("t", tt)
    con.register("u", uu)
    want = con.sql(query).to_arrow_table()
    g, w = _rows(got), _rows(want)
    if not ordered:
        g, w = _sort(g), _sort(w)
    assert g == w, f"{query}\n  got  {g[:5]}\n  want {w[:5]}"


@pytest.mark.parametrize("query,ordered", QUERIES, ids=[q[:60] for q, _ in QUERIES])
@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck),
          derandomize=True)
@given(t=t_rows, u=u_rows)
def test_sql_matches_duckdb(query, ordered, t, u):
    _check(query, ordered, t, u)
