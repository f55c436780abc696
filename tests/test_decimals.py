"""Decimals: filters on decimal columns read from Parquet (row-group pruning included), and
decimal arithmetic typed as Spark and DuckDB type it (narrow integer literals, precision
capped at 38 with the scale reduced), checked against DuckDB."""

from __future__ import annotations

import decimal
import os
from decimal import Decimal

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracles import duckdb_connect

import millstream as ms
from millstream.expr import decimals
from millstream.io.files.parquet import ParquetSource

LINEITEM = "/work/data/sf1/lineitem.parquet"


@pytest.fixture(scope="module")
def session():
    ms.init(parallelism=2)
    yield
    ms.shutdown()


def _dec_table(n: int = 400) -> pa.Table:
    vals = [None if i % 17 == 0 else Decimal(i * 37 % 5000 - 900).scaleb(-2) for i in range(n)]
    return pa.table({
        "q": pa.array(vals, pa.decimal128(15, 2)),
        "d": pa.array([Decimal(i % 11).scaleb(-2) for i in range(n)], pa.decimal128(15, 2)),
        "i": pa.array(range(n), pa.int64()),
    })


@pytest.fixture(scope="module")
def dec_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dec") / "q.parquet")
    # sorted by q so that statistics prune row groups
    pq.write_table(_dec_table().sort_by("q"), path, row_group_size=50)
    return path


FILTERS = [
    (ms.col("q") < 24, "q < 24"),
    (ms.col("q") >= -3, "q >= -3"),
    (ms.col("q") == 10, "q = 10"),
    (ms.col("q") != 0, "q <> 0"),
    (ms.col("q") <= 24.5, "q <= 24.5"),
    (ms.col("q").between(1, 5), "q between 1 and 5"),
    (ms.col("q").is_in([1, 24, 7]), "q in (1, 24, 7)"),
    (ms.col("q") * 2 > 10, "q * 2 > 10"),
    (ms.col("q") + ms.col("i") > 100, "q + i > 100"),
    (ms.col("q") * (1 - ms.col("d")) * (1 + ms.col("d")) > 3, "q * (1 - d) * (1 + d) > 3"),
    ((ms.col("q") < 24) & (ms.col("i") % 2 == 0), "q < 24 and i % 2 = 0"),
]


@pytest.mark.parametrize("expr,sql", FILTERS, ids=[s for _, s in FILTERS])
def test_decimal_filters_on_parquet_match_duckdb(session, dec_file, expr, sql):
    """The filter is pushed into the scan (pruning row groups by statistics) and gives
    DuckDB's rows; before, an integer literal against decimal(15,2) failed while pruning."""
    got = [r["i"] for r in ms.read_parquet(dec_file).filter(expr).collect()]
    want = [r[0] for r in duckdb.sql(f"select i from '{dec_file}' where {sql}").fetchall()]
    assert sorted(got) == sorted(want)


def _count(sql: str) -> int:
    return duckdb.sql(sql).fetchall()[0][0]


def test_decimal_filter_prunes_row_groups(session, dec_file):
    src, _, applied = ParquetSource(dec_file).with_pushdown(None, ms.col("q") < -5)
    assert applied
    kept = sum(len(p.row_groups) for s in src.plan_splits(4) for p in s.info.pieces)
    assert 0 < kept < pq.ParquetFile(dec_file).num_row_groups
    got = ms.read_parquet(dec_file).filter(ms.col("q") < -5).select("q").count()
    assert got == _count(f"select count(*) from '{dec_file}' where q < -5")


def test_constructor_filter_typed_against_the_file(session, dec_file):
    got = ms.read_parquet(dec_file, filter=ms.col("q") < 24).count()
    assert got == _count(f"select count(*) from '{dec_file}' where q < 24")
    capped = ms.col("q") * ms.col("q") * ms.col("q") * ms.col("q") * ms.col("q") > 50
    got = ms.read_parquet(dec_file, filter=capped).count()
    # (DuckDB's own typing overflows on this one: count in Python)
    qs = [q for q in pq.read_table(dec_file).column("q").to_pylist() if q is not None]
    assert got == sum(1 for q in qs if q ** 5 > 50)


# ---------------------------------------------------------------------- typing rules


def test_result_types_follow_spark():
    d = pa.decimal128
    assert decimals.result_type("add", d(15, 2), d(1, 0)) == d(16, 2)
    assert decimals.result_type("sub", d(1, 0), d(15, 2)) == d(16, 2)
    assert decimals.result_type("mul", d(15, 2), d(16, 2)) == d(32, 4)
    # capped at 38; the integer digits stay, the scale gives way down to min(scale, 6)
    assert decimals.result_type("mul", d(32, 4), d(16, 2)) == d(38, 6)
    assert decimals.result_type("mul", d(38, 10), d(38, 10)) == d(38, 6)
    assert decimals.result_type("mul", d(38, 2), d(38, 2)) == d(38, 4)
    assert decimals.result_type("add", d(38, 10), d(38, 2)) == d(38, 6)
    assert decimals.result_type("mul", d(10, 2), pa.int64()) == d(30, 2)
    assert decimals.literal_type(1) == d(1, 0)
    assert decimals.literal_type(-1234) == d(4, 0)


def test_integer_literal_is_narrow_and_chains_do_not_overflow():
    t = pa.table({"x": pa.array([Decimal("901.00"), Decimal("-2.50"), None], pa.decimal128(15, 2)),
                  "d": pa.array([Decimal("0.04"), Decimal("0.10"), Decimal("0.00")],
                                pa.decimal128(15, 2))})
    b = t.to_batches()[0]
    assert (1 - ms.col("d")).evaluate(b).type == pa.decimal128(16, 2)
    e = ms.col("x") * (1 - ms.col("d")) * (1 + ms.col("d"))
    out = e.evaluate(b)
    assert out.type == pa.decimal128(38, 6)
    assert out.to_pylist() == [Decimal("901.00") * Decimal("0.96") * Decimal("1.04"),
                               Decimal("-2.50") * Decimal("0.90") * Decimal("1.10"), None]
    # five factors: 6 digits of scale kept, rounded half away from zero
    five = (ms.col("x") * ms.col("d") * ms.col("d") * ms.col("d") * ms.col("d")).evaluate(b)
    assert five.type == pa.decimal128(38, 6)
    exact = Decimal("901.00") * Decimal("0.04") ** 4
    assert five[0].as_py() == exact.quantize(Decimal("0.000001"), rounding=decimal.ROUND_HALF_UP)


def test_decimal_overflow_raises():
    t = pa.table({"x": pa.array([Decimal(10) ** 30], pa.decimal128(38, 0))})
    with pytest.raises(pa.ArrowInvalid):
        (ms.col("x") * ms.col("x")).evaluate(t.to_batches()[0])


_DEC = st.one_of(st.none(), st.decimals(min_value=-10**6, max_value=10**6, places=2,
                                       allow_nan=False, allow_infinity=False))
_OPS = [
    (lambda a, b, c: a * (1 - b) * (1 + c), "a * (1 - b) * (1 + c)"),
    (lambda a, b, c: a + b * c - 7, "a + b * c - 7"),
    (lambda a, b, c: (a - b) * (c + 100) * a, "(a - b) * (c + 100) * a"),
    (lambda a, b, c: a * b * c * 3, "a * b * c * 3"),
]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(st.tuples(_DEC, _DEC, _DEC), min_size=1, max_size=40),
       which=st.integers(0, len(_OPS) - 1))
def test_decimal_arithmetic_matches_duckdb(rows, which):
    fn, sql = _OPS[which]
    t = pa.table({c: pa.array([r[i] for r in rows], pa.decimal128(15, 2))
                  for i, c in enumerate("abc")})
    got = ms.from_arrow(t).select(fn(ms.col("a"), ms.col("b"), ms.col("c")).alias("r")) \
        .to_arrow().column("r").to_pylist()
    con = duckdb_connect()
    con.register("t", t)
    # DuckDB types decimal(15,2) products as decimal(18, .) and overflows where Spark's rules
    # (ours) do not: give it the inputs as decimal(38,2), whose products it keeps exact
    wide = ", ".join(f"{c}::decimal(38,2) as {c}" for c in "abc")
    want = [r[0] for r in con.execute(f"select {sql} from (select {wide} from t)").fetchall()]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            # equal values (DuckDB keeps all digits here: none of these needs rounding)
            assert Decimal(g) == Decimal(w)


@pytest.mark.skipif(not os.path.exists(LINEITEM), reason="TPC-H SF1 data not present")
def test_tpch_charge_sum_matches_duckdb(session):
    price = ms.col("l_extendedprice") * (1 - ms.col("l_discount"))
    got = ms.read_parquet(LINEITEM).group_by("l_returnflag", "l_linestatus").agg(
        ms.sum(price * (1 + ms.col("l_tax"))).alias("charge"),
        ms.sum(price).alias("disc_price"),
    ).to_arrow()
    assert got.schema.field("charge").type == pa.decimal128(38, 6)
    want = duckdb.sql(
        f"select l_returnflag, l_linestatus, sum(l_extendedprice * (1 - l_discount) * "
        f"(1 + l_tax)) charge, sum(l_extendedprice * (1 - l_discount)) disc_price "
        f"from '{LINEITEM}' group by all").fetchall()
    rows = {(r["l_returnflag"], r["l_linestatus"]): (r["charge"], r["disc_price"])
            for r in got.to_pylist()}
    assert rows == {(a, b): (c, d) for a, b, c, d in want}


def test_int64_arithmetic_on_decimals_equals_exact_arithmetic():
    """add/sub/mul of decimal128 arrays (with nulls and slice offsets, and with a scalar)
    whose values fit in 64 bits run on the unscaled integers: the same values and the
    same types as Arrow's decimal kernels and Python's exact decimals."""
    import decimal as D
    import random

    import pyarrow.compute as pc

    from millstream.expr.decimals import arith

    rng = random.Random(7)
    ops = {"add": (lambda x, y: x + y, pc.add_checked),
           "sub": (lambda x, y: x - y, pc.subtract_checked),
           "mul": (lambda x, y: x * y, pc.multiply_checked)}
    with D.localcontext() as ctx:
        ctx.prec = 100
        for _ in range(200):
            n = rng.randint(0, 40)

            def column(n=n):
                s = rng.randint(0, 4)
                p = rng.randint(s + 1, 18)
                vals = [None if rng.random() < 0.2 else
                        D.Decimal(rng.randint(-10 ** (p - 1), 10 ** (p - 1))).scaleb(-s)
                        for _ in range(n + 3)]
                return pa.array(vals, pa.decimal128(p, s)).slice(rng.randint(0, 3), n)

            a, b = column(), column()
            scalar = pa.scalar(D.Decimal("1.5"), pa.decimal128(2, 1))
            for op, (py, kernel) in ops.items():
                got = arith(op, a, b)
                assert got.to_pylist() == [None if x is None or y is None else py(x, y)
                                           for x, y in zip(a.to_pylist(), b.to_pylist())]
                if got.type.precision <= 38 and kernel(a, b).type.precision <= 38:
                    assert got.type == kernel(a, b).type
                got = arith(op, a, scalar)
                assert got.to_pylist() == [None if x is None else py(x, D.Decimal("1.5"))
                                           for x in a.to_pylist()]


def test_decimal_expression_trees_stay_in_int64_and_equal_exact_arithmetic():
    """A tree of decimal add/sub/mul (nulls, integer columns and literals mixed in) is
    computed on unscaled int64 values from leaves to root (``expr.fixed_point``): the
    values and type are those of the operations one by one, and Python's exact decimals
    where the type keeps every digit."""
    import decimal as D
    import random

    from millstream.expr.decimals import arith

    rng = random.Random(11)
    with D.localcontext() as ctx:
        ctx.prec = 100
        for _ in range(60):
            n = rng.randint(1, 30)

            def column(s: int, p: int, n: int = n) -> pa.Array:
                return pa.array([None if rng.random() < 0.15 else
                                 D.Decimal(rng.randint(-10 ** rng.randint(0, p - 1), 10 ** (p - 1)))
                                 .scaleb(-s) for _ in range(n)], pa.decimal128(p, s))

            batch = pa.record_batch({"a": column(2, 15), "b": column(2, 15), "c": column(2, 5),
                                     "i": pa.array([rng.randint(-50, 50) for _ in range(n)],
                                                   pa.int8())})
            e = ms.col("a") * (1 - ms.col("b")) * (ms.col("c") + ms.col("i")) - ms.col("b")
            got = e.evaluate(batch)
            a, b, c, i = (batch.column(k) for k in "abci")
            step = arith("sub", arith("mul", arith("mul", a, arith("sub", pa.scalar(1), b)),
                                      arith("add", c, i)), b)
            assert got.type == step.type
            want = [None if None in (x, y, z, k) else x * (1 - y) * (z + k) - y
                    for x, y, z, k in zip(*(col.to_pylist() for col in (a, b, c, i)))]
            assert got.to_pylist() == step.to_pylist()
            assert got.type == pa.decimal128(38, 6)  # capped, no digit lost: exact
            assert got.to_pylist() == want


def test_repeated_subexpression_is_computed_once_per_batch(monkeypatch):
    """``price * (1 - discount)`` shared by two aggregate inputs (TPC-H Q1) is computed once
    inside shared_subexpressions: 4 decimal operations instead of 6, the same values."""
    from millstream.expr import fixed_point
    from millstream.expr.subexpr import shared_subexpressions

    calls = []
    real = fixed_point.fixed_arith
    monkeypatch.setattr(fixed_point, "fixed_arith", lambda *a: calls.append(a[0]) or real(*a))
    batch = pa.record_batch({"p": pa.array([Decimal("10.00"), Decimal("2.50"), None], pa.decimal128(15, 2)),
                             "d": pa.array([Decimal("0.10"), Decimal("0.00"), Decimal("0.05")], pa.decimal128(15, 2)),
                             "t": pa.array([Decimal("0.02"), Decimal("0.08"), Decimal("0.01")], pa.decimal128(15, 2))})
    rev = ms.col("p") * (1 - ms.col("d"))
    exprs = [rev, (ms.col("p") * (1 - ms.col("d"))) * (1 + ms.col("t"))]
    alone = [e.evaluate(batch) for e in exprs]
    assert len(calls) == 6
    calls.clear()
    with shared_subexpressions(exprs):
        shared = [e.evaluate(batch) for e in exprs]
    assert len(calls) == 4
    assert shared == alone
    assert shared[1].to_pylist() == [Decimal("9.180000"), Decimal("2.700000"), None]
