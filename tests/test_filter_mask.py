"""expr.filter_mask: the fast filter masks give exactly the rows the plain evaluation keeps
(true; null and false dropped), on every column type they take a fast path for, with
nulls, fractional and out-of-range literals, dictionaries, and AND/OR/NOT trees."""

from __future__ import annotations

import datetime as dt
import itertools
import random
from decimal import Decimal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import millstream as ms
from millstream.errors import SchemaError
from millstream.expr import filter_mask as fm
from millstream.expr.filter_mask import NotBoolean, filter_mask
from millstream.ops.narrow import FilterExpr

col, lit = ms.col, ms.lit


def _batch(n: int = 400, seed: int = 7) -> pa.RecordBatch:
    rnd = random.Random(seed)

    def maybe(v):
        return None if rnd.random() < 0.15 else v

    words = ["AIR", "AIR REG", "MAIL", "SHIP", "TRUCK", "", "RAIL"]
    base = dt.date(1994, 1, 1)
    ints = [maybe(rnd.randint(-5, 30)) for _ in range(n)]
    strs = [maybe(rnd.choice(words)) for _ in range(n)]
    return pa.RecordBatch.from_pydict({
        "i64": pa.array(ints, pa.int64()),
        "i32": pa.array([maybe(rnd.randint(-5, 30)) for _ in range(n)], pa.int32()),
        "i8": pa.array([maybe(rnd.randint(-100, 100)) for _ in range(n)], pa.int8()),
        "u16": pa.array([maybe(rnd.randint(0, 60000)) for _ in range(n)], pa.uint16()),
        "f64": pa.array([maybe(rnd.choice([rnd.uniform(-5, 30), float("nan"), 0.1, 3.0]))
                         for _ in range(n)], pa.float64()),
        "f32": pa.array([maybe(rnd.uniform(-5, 30)) for _ in range(n)], pa.float32()),
        "d": pa.array([maybe(base + dt.timedelta(days=rnd.randint(-400, 400)))
                       for _ in range(n)], pa.date32()),
        "d2": pa.array([maybe(base + dt.timedelta(days=rnd.randint(-400, 400)))
                        for _ in range(n)], pa.date32()),
        "ts": pa.array([maybe(dt.datetime(2024, 1, 1) + dt.timedelta(seconds=rnd.randint(0, 10**6)))
                        for _ in range(n)], pa.timestamp("us")),
        "q": pa.array([maybe(Decimal(rnd.randint(0, 5000)).scaleb(-2)) for _ in range(n)],
                      pa.decimal128(15, 2)),
        "q2": pa.array([maybe(Decimal(rnd.randint(0, 5000)).scaleb(-2)) for _ in range(n)],
                       pa.decimal128(15, 2)),
        "big": pa.array([maybe(Decimal(rnd.randint(-10**6, 10**6)).scaleb(-3)) for _ in range(n)],
                        pa.decimal128(38, 3)),
        "s": pa.array(strs, pa.string()),
        "sv": pa.array(strs, pa.string_view()),
        "sd": pa.array(strs, pa.string()).dictionary_encode(),
        "b": pa.array([maybe(rnd.random() < 0.5) for _ in range(n)], pa.bool_()),
    })


LEAVES = [
    col("i64") < 10, col("i64") >= 10, col("i64") == 3, col("i64") != 3, 10 > col("i64"),
    col("i64") < 2**62, col("i64") > -(2**62), col("i64") == 2**62,
    col("i32") <= 7, col("i32") > 2**40, col("i8") < 300, col("i8") >= -128, col("u16") > -1,
    col("u16") < 30000, col("i64") < 10.5, col("i64") < lit(None, pa.int64()),
    col("f64") < 10, col("f64") >= 0.1, col("f64") != 3.0, col("f64") == 0.1,
    col("f32") < 0.1, col("f32") > 3,
    col("d") >= lit(dt.date(1994, 1, 1)), col("d") < lit(dt.date(1995, 1, 1)),
    col("d") == lit(dt.date(1994, 3, 1)), col("d") < col("d2"), col("d2") >= col("d"),
    col("ts") > lit(dt.datetime(2024, 1, 5)), col("ts") <= lit(dt.datetime(2024, 1, 3, 4, 5, 6)),
    col("q") < 24, col("q") <= Decimal("24"), col("q") >= Decimal("0.05"),
    col("q") > Decimal("10.005"), col("q") < Decimal("10.005"), col("q") <= Decimal("10.005"),
    col("q") >= Decimal("10.005"), col("q") == Decimal("10.005"), col("q") != Decimal("10.005"),
    col("q") == Decimal("12.50"), col("q").between(Decimal("0.05"), Decimal("0.07")),
    col("q") < Decimal("1e30"), col("q") > Decimal("-1e25"), col("q") < col("q2"),
    col("q") < 1.5, col("big") > Decimal("1.5"), col("big") <= 20,
    col("s") == "AIR", col("s") != "AIR", col("s") < "MAIL", col("s") == "",
    col("s").is_in(["AIR", "AIR REG"]), col("s").is_in([]),
    col("sv") == "SHIP", col("sv").is_in(["MAIL", "RAIL"]), col("sv") >= "RAIL",
    col("sd") == "SHIP", col("sd") != "SHIP", col("sd").is_in(["MAIL", "TRUCK", "nope"]),
    col("sd") > "B", lit("AIR") == col("s"),
    col("b"), col("i64").is_null(), col("i64").is_in([1, 2, 3]),
    (col("i64") + 1) < 5, col("s").str.starts_with("A"),
]


def _plain(expr, batch):
    # (Arrow compares no string_view with a string, nor takes is_in on a dictionary: the
    # plain path sees them as strings)
    batch = batch.cast(pa.schema([f.with_type(pa.string()) if f.type == pa.string_view()
                                  or pa.types.is_dictionary(f.type) else f
                                  for f in batch.schema]))
    out = expr.evaluate(batch)
    return pc.fill_null(out, False).to_numpy(zero_copy_only=False)


@pytest.mark.parametrize("i", range(len(LEAVES)))
def test_leaf_masks_equal_the_plain_evaluation(i: int) -> None:
    batch = _batch()
    expr = LEAVES[i]
    assert np.array_equal(filter_mask(expr, batch), _plain(expr, batch)), repr(expr)


def test_trees_equal_the_plain_evaluation() -> None:
    batch = _batch(seed=11)
    rnd = random.Random(3)
    for _ in range(300):
        a, b, c = (rnd.choice(LEAVES) for _ in range(3))
        shape = rnd.randrange(5)
        expr = [(a & b) | c, a | (b & ~c), ~(a & b), (a | b) & (c | a), a & b & c][shape]
        assert np.array_equal(filter_mask(expr, batch), _plain(expr, batch)), repr(expr)


def test_sliced_and_nullable_arrays() -> None:
    batch = _batch(seed=5).slice(37, 150)
    for expr in LEAVES:
        assert np.array_equal(filter_mask(expr, batch), _plain(expr, batch)), repr(expr)


def test_dictionary_with_null_codes() -> None:
    codes = pa.array([0, None, 1, 2, None, 0], pa.int32())
    arr = pa.DictionaryArray.from_arrays(codes, pa.array(["a", "b", None]))
    batch = pa.RecordBatch.from_arrays([arr], names=["x"])
    for expr in (col("x") == "a", col("x") != "a", col("x").is_in(["a", "b"])):
        assert np.array_equal(filter_mask(expr, batch), _plain(expr, batch)), repr(expr)


def test_fast_paths_are_taken() -> None:
    """The leaves above that have fast paths use them (else this module earns nothing)."""
    batch = _batch()
    for expr in (col("q") < 24, col("d") < col("d2"), col("sd").is_in(["AIR"]),
                 col("f64") >= 0.1, col("i8") < 300):
        assert fm._leaf(expr, batch) is not None, repr(expr)
    for expr in (col("big") > 1, col("f32") < 0.1, col("q") < 1.5):
        assert fm._leaf(expr, batch) is None, repr(expr)


def test_not_boolean_and_null_literal() -> None:
    batch = _batch()
    with pytest.raises(NotBoolean):
        filter_mask(col("i64"), batch)
    with pytest.raises(NotBoolean):
        filter_mask(lit(None), batch)
    expr = (col("i64") < 3) & lit(None)
    assert np.array_equal(filter_mask(expr, batch), _plain(expr, batch))
    with pytest.raises(SchemaError, match="must be boolean"):
        FilterExpr(col("i64")).process(batch)


def test_filter_operator_keeps_the_plain_rows() -> None:
    batch = _batch(seed=9)
    batch = batch.drop_columns(["sv"])  # (Arrow 26 cannot filter a string_view column)
    batch = batch.append_column("idx", pa.array(range(batch.num_rows)))
    leaves = [e for e in LEAVES if "sv" not in e.columns()]
    for a, b in itertools.islice(itertools.combinations(leaves, 2), 0, None, 17):
        expr = a | b
        out = FilterExpr(expr).process(batch)[0]
        want = batch.filter(pa.array(_plain(expr, batch)))
        assert out.schema == batch.schema  # (NaNs make equals() false: compare the rows' ids)
        assert out["idx"].to_pylist() == want["idx"].to_pylist(), repr(expr)
