"""Tests of the column-expression layer against plain-Python results."""

from __future__ import annotations

import datetime
import math
import pickle

import cloudpickle
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from millstream import expr as E
from millstream.errors import PlanError, SchemaError
from millstream.expr.conditional import when
from millstream.expr.nodes import AggExpr, Expr, col, lit, to_expr

INTS = [3, -7, None, 0, 12, -1]
INTS2 = [2, 2, 5, None, -5, 0]
FLOATS = [1.5, -2.25, None, 0.0, 7.0, -0.5]
STRS = ["Hello", "  straße ", None, "", "ÜNÏ cødé", "a,b,,c"]
BOOLS_A = [True, True, True, False, False, False, None, None, None]
BOOLS_B = [True, False, None, True, False, None, True, False, None]


def batch(**cols) -> pa.RecordBatch:
    return pa.record_batch(cols)


B = pa.record_batch(
    {
        "i": pa.array(INTS, pa.int64()),
        "j": pa.array(INTS2, pa.int64()),
        "i32": pa.array(INTS, pa.int32()),
        "f": pa.array(FLOATS, pa.float64()),
        "s": pa.array(STRS, pa.string()),
    }
)


def ev(expr: Expr, b: pa.RecordBatch = B) -> list:
    out = expr.evaluate(b)
    assert isinstance(out, pa.Array)
    assert len(out) == b.num_rows
    return out.to_pylist()


def py1(f, xs):
    return [None if x is None else f(x) for x in xs]


def py2(f, xs, ys):
    return [None if x is None or y is None else f(x, y) for x, y in zip(xs, ys)]


def same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if isinstance(w, float) and isinstance(g, float) and math.isnan(w):
            assert math.isnan(g)
        else:
            assert g == w, (got, want)


# --------------------------------------------------------------------------- arithmetic


@pytest.mark.parametrize(
    "expr, f",
    [
        (col("i") + col("j"), lambda x, y: x + y),
        (col("i") - col("j"), lambda x, y: x - y),
        (col("i") * col("j"), lambda x, y: x * y),
        (col("i") // col("j"), lambda x, y: None if y == 0 else x // y),
        (col("i") % col("j"), lambda x, y: None if y == 0 else x % y),
        (col("i") ** col("j"), lambda x, y: float(x) ** y if x != 0 or y >= 0 else math.inf),
    ],
)
def test_int_binary_ops(expr, f):
    assert ev(expr) == py2(f, INTS, INTS2)


def test_int_types_and_true_division():
    assert (col("i") // col("j")).evaluate(B).type == pa.int64()
    assert (col("i32") % 3).evaluate(B).type == pa.int64()
    assert (col("i") ** 2).evaluate(B).type == pa.float64()
    got = ev(col("i") / col("j"))
    want = [1.5, -3.5, None, None, -2.4, -math.inf]
    same(got, want)
    assert (col("i") / col("j")).evaluate(B).type == pa.float64()
    assert ev(col("i") / 2) == py1(lambda x: x / 2, INTS)


@pytest.mark.parametrize("k", [3, -3, 2.5, -0.75])
def test_float_floordiv_mod_python_semantics(k):
    assert ev(col("f") // k) == py1(lambda x: x // k, FLOATS)
    same(ev(col("f") % k), py1(lambda x: x % k, FLOATS))
    assert ev(col("i") % k) == py1(lambda x: x % k, INTS)
    assert ev(col("i") // k) == py1(lambda x: x // k, INTS)


def test_reflected_operators():
    assert ev(1 + col("i")) == py1(lambda x: 1 + x, INTS)
    assert ev(10 - col("i")) == py1(lambda x: 10 - x, INTS)
    assert ev(2 * col("f")) == py1(lambda x: 2 * x, FLOATS)
    assert ev(100 // col("j")) == py1(lambda y: None if y == 0 else 100 // y, INTS2)
    assert ev(100 % col("j")) == py1(lambda y: None if y == 0 else 100 % y, INTS2)
    assert ev(2 ** col("j")) == py1(lambda y: 2.0**y, INTS2)
    assert ev(3 / col("f")) == py1(lambda y: math.copysign(math.inf, y) if y == 0 else 3 / y, FLOATS)
    assert ev(True & (col("i") > 0)) == py1(lambda x: x > 0, INTS)


def test_unary_abs_round():
    assert ev(-col("i")) == py1(lambda x: -x, INTS)
    assert ev(+col("i")) == INTS
    assert ev(col("f").abs()) == py1(abs, FLOATS)
    assert ev(abs(col("i"))) == py1(abs, INTS)
    vals = [0.5, 1.5, 2.5, -0.5, 1.25, None, 3.14159]
    b = batch(x=pa.array(vals))
    assert ev(col("x").round(), b) == py1(lambda x: float(round(x)), vals)
    assert ev(col("x").round(2), b) == py1(lambda x: round(x, 2), [0.5, 1.5, 2.5, -0.5, 1.25, None, 3.14159])
    assert ev(col("i").round(-1)) == py1(lambda x: round(x, -1), INTS)


def test_overflow_is_an_error():
    b = batch(x=pa.array([2**62], pa.int64()))
    with pytest.raises(pa.ArrowInvalid):
        (col("x") * 4).evaluate(b)


def test_null_arithmetic_and_literal_null():
    assert ev(col("i") + lit(None)) == [None] * B.num_rows
    assert ev(col("i") // lit(None)) == [None] * B.num_rows
    assert ev(lit(None) + lit(None)) == [None] * B.num_rows


# --------------------------------------------------------------------------- comparison, logic


@pytest.mark.parametrize(
    "expr, f",
    [
        (col("i") == col("j"), lambda x, y: x == y),
        (col("i") != col("j"), lambda x, y: x != y),
        (col("i") < col("j"), lambda x, y: x < y),
        (col("i") <= col("j"), lambda x, y: x <= y),
        (col("i") > col("j"), lambda x, y: x > y),
        (col("i") >= col("j"), lambda x, y: x >= y),
    ],
)
def test_comparisons(expr, f):
    assert ev(expr) == py2(f, INTS, INTS2)


def test_comparisons_with_literals_and_strings():
    assert ev(col("i") > 0) == py1(lambda x: x > 0, INTS)
    assert ev(0 < col("i")) == py1(lambda x: 0 < x, INTS)
    assert ev(col("s") == "") == py1(lambda x: x == "", STRS)
    assert ev(col("s") >= "ÜNÏ") == py1(lambda x: x >= "ÜNÏ", STRS)
    assert ev(col("i") == None) == [None] * B.num_rows  # noqa: E711 - SQL semantics
    assert ev(col("i32") == col("i")) == py1(lambda x: True, INTS)


def kleene_and(a, b):
    if a is False or b is False:
        return False
    if a is None or b is None:
        return None
    return True


def kleene_or(a, b):
    if a is True or b is True:
        return True
    if a is None or b is None:
        return None
    return False


def test_kleene_logic():
    b = batch(a=pa.array(BOOLS_A, pa.bool_()), b=pa.array(BOOLS_B, pa.bool_()))
    assert ev(col("a") & col("b"), b) == [kleene_and(x, y) for x, y in zip(BOOLS_A, BOOLS_B)]
    assert ev(col("a") | col("b"), b) == [kleene_or(x, y) for x, y in zip(BOOLS_A, BOOLS_B)]
    assert ev(~col("a"), b) == py1(lambda x: not x, BOOLS_A)
    assert ev(col("a") ^ col("b"), b) == py2(lambda x, y: x != y, BOOLS_A, BOOLS_B)
    assert ev(col("a") & lit(None), b) == [kleene_and(x, None) for x in BOOLS_A]
    assert ev(lit(None) | col("b"), b) == [kleene_or(None, y) for y in BOOLS_B]


def test_bool_raises_and_hash_by_identity():
    e = col("a") > 1
    with pytest.raises(TypeError, match="&"):
        bool(e)
    with pytest.raises(TypeError):
        if col("a") == 1:
            pass
    with pytest.raises(TypeError):
        _ = 0 < col("a") < 3
    d = {e: 1, col("a"): 2}
    assert d[e] == 1
    assert len({col("a"), col("a")}) == 2


# --------------------------------------------------------------------------- nulls, membership, cast


def test_null_functions():
    assert ev(col("i").is_null()) == [x is None for x in INTS]
    assert ev(col("i").is_not_null()) == [x is not None for x in INTS]
    assert ev(col("i").fill_null(0)) == [0 if x is None else x for x in INTS]
    assert col("i32").fill_null(0).evaluate(B).type == pa.int32()
    assert ev(col("s").fill_null("?")) == ["?" if x is None else x for x in STRS]
    assert ev(col("i").fill_null(col("j"))) == [y if x is None else x for x, y in zip(INTS, INTS2)]
    nan = batch(x=pa.array([math.nan, None, 1.0]))
    assert ev(col("x").is_null(), nan) == [False, True, False]


def test_is_in_and_between():
    assert ev(col("i").is_in([3, 0, 99])) == py1(lambda x: x in (3, 0, 99), INTS)
    assert ev(col("i32").is_in({3, -1})) == py1(lambda x: x in (3, -1), INTS)
    assert ev(col("i").is_in([3, None])) == py1(lambda x: x == 3, INTS)
    assert ev(col("i").is_in([])) == py1(lambda x: False, INTS)
    assert ev(col("s").is_in(["", "Hello"])) == py1(lambda x: x in ("", "Hello"), STRS)
    assert ev(col("i").between(-1, 3)) == py1(lambda x: -1 <= x <= 3, INTS)
    assert ev(col("f").between(col("i"), 10)) == py2(lambda x, y: y <= x <= 10, FLOATS, INTS)
    with pytest.raises(PlanError):
        col("s").is_in("abc")


@pytest.mark.parametrize(
    "dtype, want",
    [
        ("float64", pa.float64()),
        ("int32", pa.int32()),
        ("string", pa.string()),
        ("str", pa.string()),
        (pa.int16(), pa.int16()),
        (float, pa.float64()),
    ],
)
def test_cast(dtype, want):
    out = col("i").cast(dtype).evaluate(B)
    assert out.type == want
    conv = {pa.float64(): float, pa.string(): str}.get(want, int)
    assert out.to_pylist() == py1(conv, INTS)


def test_cast_strings_and_temporal():
    b = batch(s=["1", "-2", None], d=["2024-01-02", None, "1999-12-31"])
    assert ev(col("s").cast("int64"), b) == [1, -2, None]
    assert ev(col("d").cast("date32"), b) == [datetime.date(2024, 1, 2), None, datetime.date(1999, 12, 31)]
    ts = col("d").cast("timestamp[us]").evaluate(b)
    assert ts.type == pa.timestamp("us")
    assert ev(lit(1).cast("bool"), b) == [True] * 3


def test_parse_type():
    assert E.parse_type("timestamp[ms, tz=UTC]") == pa.timestamp("ms", tz="UTC")
    assert E.parse_type("timestamp[us, tz=Europe/Paris]") == pa.timestamp("us", tz="Europe/Paris")
    assert E.parse_type("decimal(10, 2)") == pa.decimal128(10, 2)
    assert E.parse_type("large_string") == pa.large_string()
    assert E.parse_type("double") == pa.float64()
    assert E.parse_type("duration[s]") == pa.duration("s")
    with pytest.raises(PlanError, match="unknown data type"):
        E.parse_type("nope")


# --------------------------------------------------------------------------- strings


@pytest.mark.parametrize(
    "expr, f",
    [
        (col("s").str.lower(), str.lower),
        # Arrow maps case one code point at a time: "ß" upper-cases to "ẞ", not "SS"
        (col("s").str.upper(), lambda x: "".join("ẞ" if c == "ß" else c.upper() for c in x)),
        (col("s").str.strip(), str.strip),
        (col("s").str.lstrip(), str.lstrip),
        (col("s").str.rstrip(), str.rstrip),
        (col("s").str.strip("He "), lambda x: x.strip("He ")),
        (col("s").str.len(), len),
        (col("s").str.contains("ß"), lambda x: "ß" in x),
        (col("s").str.contains("."), lambda x: "." in x),
        (col("s").str.contains(r"^\s+s", regex=True), lambda x: x.lstrip() != x and x.lstrip().startswith("s")),
        (col("s").str.starts_with("Hel"), lambda x: x.startswith("Hel")),
        (col("s").str.ends_with("dé"), lambda x: x.endswith("dé")),
        (col("s").str.replace("l", "L"), lambda x: x.replace("l", "L")),
        (col("s").str.replace("l", "L", n=1), lambda x: x.replace("l", "L", 1)),
        (col("s").str.replace(r"[aeiouß]", "_", regex=True), lambda x: "".join("_" if c in "aeiouß" else c for c in x)),
        (col("s").str.split(), str.split),
        (col("s").str.split(","), lambda x: x.split(",")),
        (col("s").str.split(" "), lambda x: x.split(" ")),
        (col("s").str.slice(1), lambda x: x[1:]),
        (col("s").str.slice(1, 3), lambda x: x[1:4]),
        (col("s").str.slice(-3), lambda x: x[-3:]),
        (col("s").str.slice(-3, 2), lambda x: x[-3:][:2]),
        (col("s").str.slice(-2, 5), lambda x: x[-2:][:5]),
        (col("s").str.slice(0, 0), lambda x: ""),
    ],
)
def test_string_functions(expr, f):
    assert ev(expr) == py1(f, STRS)


def test_string_len_type_and_concat():
    assert col("s").str.len().evaluate(B).type == pa.int64()
    assert ev(col("s").str.concat("|", col("s"))) == py1(lambda x: x + "|" + x, STRS)
    assert ev(col("s").str.concat(col("i"))) == py2(lambda x, y: x + str(y), STRS, INTS)
    assert ev(lit("x").str.concat(lit("y"))) == ["xy"] * B.num_rows
    with pytest.raises(PlanError):
        col("s").str.split("")


def test_whitespace_split_edge_cases():
    vals = ["", " ", "  a  b  ", "\ta\nb\r\nc ", "x", None, "ü ö"]
    b = batch(s=vals)
    out = col("s").str.split().evaluate(b)
    assert out.type == pa.list_(pa.string())
    assert out.to_pylist() == py1(str.split, vals)
    sliced = b.slice(2, 3)
    assert ev(col("s").str.split(), sliced) == py1(str.split, vals[2:5])
    assert ev(lit("a b").str.split(), b) == [["a", "b"]] * len(vals)


# --------------------------------------------------------------------------- dates and times

TS = [
    datetime.datetime(2024, 1, 7, 13, 45, 30, 123000),
    None,
    datetime.datetime(1999, 12, 31, 23, 59, 59),
    datetime.datetime(2024, 2, 29, 0, 0, 0),
]
DATES = [None if t is None else t.date() for t in TS]
TB = pa.record_batch({"t": pa.array(TS, pa.timestamp("us")), "d": pa.array(DATES, pa.date32())})


@pytest.mark.parametrize(
    "name, f",
    [
        ("year", lambda t: t.year),
        ("month", lambda t: t.month),
        ("day", lambda t: t.day),
        ("hour", lambda t: t.hour),
        ("minute", lambda t: t.minute),
        ("second", lambda t: t.second),
        ("millisecond", lambda t: t.microsecond // 1000),
        ("day_of_week", lambda t: t.weekday()),
        ("day_of_year", lambda t: t.timetuple().tm_yday),
    ],
)
def test_datetime_fields(name, f):
    assert ev(getattr(col("t").dt, name)(), TB) == py1(f, TS)


def test_date_fields():
    assert ev(col("d").dt.year(), TB) == py1(lambda d: d.year, DATES)
    assert ev(col("d").dt.day_of_week(), TB) == py1(lambda d: d.weekday(), DATES)


@pytest.mark.parametrize(
    "every, f",
    [
        ("1h", lambda t: t.replace(minute=0, second=0, microsecond=0)),
        ("1d", lambda t: t.replace(hour=0, minute=0, second=0, microsecond=0)),
        ("day", lambda t: t.replace(hour=0, minute=0, second=0, microsecond=0)),
        ("1m", lambda t: t.replace(second=0, microsecond=0)),
        ("15m", lambda t: t.replace(minute=t.minute // 15 * 15, second=0, microsecond=0)),
        ("1s", lambda t: t.replace(microsecond=0)),
        ("1mo", lambda t: t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)),
        ("1y", lambda t: datetime.datetime(t.year, 1, 1)),
        ("1w", lambda t: datetime.datetime.combine(t.date() - datetime.timedelta(days=t.weekday()), datetime.time())),
    ],
)
def test_truncate(every, f):
    assert ev(col("t").dt.truncate(every), TB) == py1(f, TS)


def test_truncate_bad_interval():
    for bad in ["", "abc", "0h", "1 fortnight", 5]:
        with pytest.raises(PlanError):
            col("t").dt.truncate(bad)


# --------------------------------------------------------------------------- when


def test_when_otherwise():
    e = when(col("i") > 0, "pos").when(col("i") < 0, "neg").otherwise("zero")
    want = py1(lambda x: "pos" if x > 0 else "neg" if x < 0 else "zero", INTS)
    want[2] = "zero"  # null condition counts as false
    assert ev(e) == want
    no_else = when(col("i") > 0, col("i"))
    assert ev(no_else) == [x if x is not None and x > 0 else None for x in INTS]
    mixed = when(col("i") > 0, col("f")).otherwise(0)
    assert mixed.evaluate(B).type == pa.float64()
    assert ev(when(lit(None), 1).otherwise(2)) == [2] * B.num_rows
    assert ev(when(lit(True), 1)) == [1] * B.num_rows
    bools = batch(flag=pa.array([True, None, False]))
    assert ev(when("flag", "y").otherwise("n"), bools) == ["y", "n", "n"]
    with pytest.raises(PlanError):
        e.when(col("i") > 1, 1)
    with pytest.raises(PlanError):
        e.otherwise(1)


def test_when_type_error_is_schema_error():
    with pytest.raises(SchemaError, match="compatible"):
        when(col("i") > 0, 1).otherwise("x").evaluate(B)


# --------------------------------------------------------------------------- literals, empty batches


def test_literals_broadcast():
    assert ev(lit(5)) == [5] * B.num_rows
    assert ev(lit("ü")) == ["ü"] * B.num_rows
    assert ev(lit(None)) == [None] * B.num_rows
    assert lit(1, "int8").evaluate(B).type == pa.int8()
    assert ev(lit(2) * lit(3)) == [6] * B.num_rows
    assert ev(lit(datetime.date(2024, 1, 1))) == [datetime.date(2024, 1, 1)] * B.num_rows
    assert ev(lit(pa.scalar(7, pa.int16()))) == [7] * B.num_rows
    with pytest.raises(PlanError):
        lit(object())


@pytest.mark.parametrize(
    "expr",
    [
        col("i") + 1,
        col("i") // col("j"),
        col("f") % 2.0,
        col("i") / col("j"),
        lit(3),
        col("s").str.split(),
        col("s").str.len(),
        when(col("i") > 0, "a").otherwise("b"),
        col("i").is_in([1]),
        col("s").str.concat("x"),
        col("i").cast("string"),
    ],
)
def test_empty_batch(expr):
    empty = B.slice(0, 0)
    out = expr.evaluate(empty)
    assert isinstance(out, pa.Array) and len(out) == 0
    assert out.type == expr.evaluate(B).type
    assert expr.output_type(B.schema) == out.type


# --------------------------------------------------------------------------- names, columns, repr


def test_output_name():
    assert col("a").output_name == "a"
    assert lit(1).output_name == "literal"
    assert (col("a") + col("b")).output_name == "a"
    assert (lit(1) + col("b")).output_name == "b"
    assert (lit(1) + lit(2)).output_name == "literal"
    assert (col("a") + 1).alias("z").output_name == "z"
    assert (col("a").alias("x") * 2).output_name == "x"
    assert col("s").str.lower().output_name == "s"
    assert col("a").cast("int32").output_name == "a"
    assert when(col("c") > 1, col("v")).otherwise(0).output_name == "v"
    assert when(col("c") > 1, "x").otherwise("y").output_name == "c"


def test_columns():
    e = when(col("a") > 1, col("b").str.concat(col("c"))).otherwise(col("d").fill_null(col("e")))
    assert e.columns() == {"a", "b", "c", "d", "e"}
    assert lit(1).columns() == set()
    assert (col("x") + 1).alias("y").columns() == {"x"}


def test_repr():
    assert repr((col("a") + lit(1)).alias("b")) == '(col("a") + lit(1)).alias("b")'
    assert repr(col("a") + 1) == '(col("a") + lit(1))'
    assert repr(~(col("a") > 1)) == '~(col("a") > lit(1))'
    assert repr(-col("a")) == '-col("a")'
    assert repr(col("s").str.contains("x", regex=True)) == 'col("s").str.contains("x", regex=True)'
    assert repr(col("s").str.contains("x")) == 'col("s").str.contains("x")'
    assert repr(col("a").is_in([1, 2])) == 'col("a").is_in([1, 2])'
    assert repr(col("a").cast("int64")) == 'col("a").cast("int64")'
    assert repr(col("t").dt.truncate("1h")) == 'col("t").dt.truncate("1h")'
    assert repr(col("a").round(2)) == 'col("a").round(2)'
    assert repr(when(col("a") > 1, 1).otherwise(lit(None))) == (
        'when((col("a") > lit(1)), lit(1)).otherwise(lit(None))'
    )
    assert repr(lit("x")) == 'lit("x")'
    assert repr(lit(1, "int8")) == 'lit(1, "int8")'


def test_to_expr():
    assert repr(to_expr("a")) == 'col("a")'
    assert repr(to_expr(1)) == "lit(1)"
    e = col("a")
    assert to_expr(e) is e


# --------------------------------------------------------------------------- errors


def test_unknown_column_schema_error():
    with pytest.raises(SchemaError) as info:
        (col("nope") + 1).evaluate(B)
    msg = str(info.value)
    assert "'nope'" in msg
    for name in B.schema.names:
        assert name in msg
    assert isinstance(info.value, ValueError)


def test_duplicate_column_is_ambiguous():
    b = pa.RecordBatch.from_arrays([pa.array([1]), pa.array([2])], names=["a", "a"])
    with pytest.raises(SchemaError, match="ambiguous"):
        col("a").evaluate(b)


def test_type_mismatch_is_schema_error():
    with pytest.raises(SchemaError, match=r"col\(\"s\"\)"):
        (col("s") + 1).evaluate(B)
    with pytest.raises(SchemaError):
        (col("s") // 2).evaluate(B)
    with pytest.raises(SchemaError):
        col("i").str.lower().evaluate(B)
    with pytest.raises(SchemaError):
        (col("i") & col("j")).evaluate(B)


# --------------------------------------------------------------------------- to_arrow

TABLE = pa.Table.from_batches([B])

FILTERS = [
    col("i") > 0,
    col("i") == col("j"),
    (col("i") + col("j")) >= 1,
    (col("i") - 1) * 2 < 0,
    col("i") / 2 > 1,
    col("i") ** 2 > 10,
    -col("i") > 0,
    col("f").abs() >= 1.5,
    col("f").round() == 2,
    (col("i") > 0) & (col("f") > 0),
    (col("i") > 0) | col("f").is_null(),
    ~(col("i") > 0),
    (col("i") > 0) ^ (col("j") > 0),
    col("i").is_null(),
    col("i").is_not_null(),
    col("i").fill_null(0) == 0,
    col("i").is_in([3, 12]),
    ~col("i").is_in([3, 12]),
    ~col("i").is_in([]),
    col("i").between(-1, 3),
    col("i").cast("float64") > 2.5,
    col("i").cast("string") == "3",
    col("s").str.lower() == "hello",
    col("s").str.upper().str.contains("STRAẞ"),
    col("s").str.strip() == "straße",
    col("s").str.lstrip().str.starts_with("s"),
    col("s").str.rstrip("e ").str.ends_with("aß"),
    col("s").str.len() > 4,
    col("s").str.contains("l+", regex=True),
    col("s").str.starts_with("Hel"),
    col("s").str.ends_with("dé"),
    col("s").str.replace("l", "") == "Heo",
    col("s").str.slice(1, 2) == "el",
    col("s").str.slice(-3) == "odé",
    col("s").str.concat("!") == "Hello!",
    col("s").str.concat(col("i")) == "Hello3",
    when(col("i") > 0, "pos").when(col("i") < 0, "neg").otherwise("zero") == "neg",
    when(col("i") > 0, col("f")).otherwise(0) > 1,
    ~when(col("i") > 0, True),
    col("i") == lit(None),
    (col("i") > 0) & lit(None),
    lit(True),
    (col("i") > 0).alias("x"),
]


@pytest.mark.parametrize("expr", FILTERS, ids=[repr(e) for e in FILTERS])
def test_to_arrow_filter_matches_evaluate(expr):
    arrow = expr.to_arrow()
    assert isinstance(arrow, pc.Expression), expr
    mask = expr.evaluate(B)
    want = TABLE.filter(pc.fill_null(mask, False))
    assert TABLE.filter(arrow).to_pylist() == want.to_pylist()


def test_to_arrow_on_dates():
    tbl = pa.Table.from_batches([TB])
    for expr in [col("t").dt.year() == 2024, col("t").dt.truncate("1d") == lit(datetime.datetime(2024, 1, 7)),
                 col("d").dt.day_of_week() == 6, col("t") > lit(datetime.datetime(2000, 1, 1))]:
        want = tbl.filter(pc.fill_null(expr.evaluate(TB), False))
        assert tbl.filter(expr.to_arrow()).to_pylist() == want.to_pylist()


def test_to_arrow_in_parquet_dataset_scan(tmp_path):
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    pq.write_table(TABLE, tmp_path / "part.parquet", row_group_size=2)
    dataset = ds.dataset(tmp_path, format="parquet")
    for expr in [col("i") > 0, col("s").str.starts_with("Hel") | col("i").is_in([0]),
                 when(col("i") > 0, "p").otherwise("n") == "n"]:
        got = dataset.to_table(filter=expr.to_arrow(), columns=sorted(expr.columns()))
        want = TABLE.filter(pc.fill_null(expr.evaluate(B), False)).select(sorted(expr.columns()))
        assert got.to_pylist() == want.to_pylist()


def test_to_arrow_none_when_inexpressible():
    assert (col("i") // 2).to_arrow() is None
    assert ((col("i") % 2) == 0).to_arrow() is None
    assert (col("s").str.split().is_null() & (col("i") > 0)).to_arrow() is None
    assert when(col("i") % 2 == 0, 1).to_arrow() is None
    assert col("s").str.split(",").to_arrow() is not None


# --------------------------------------------------------------------------- pickling

PICKLED = [
    (col("i") + 1).alias("b"),
    col("s").str.replace("a", "b", regex=True).str.split(),
    when(col("i") > 0, "x").when(col("i").is_in([0]), "y").otherwise(lit(None)),
    col("i").cast(pa.float32()) // 2,
    col("t").dt.truncate("15m"),
    col("i").between(1, 3) & ~col("f").is_null(),
    lit(datetime.date(2024, 1, 1)),
]


@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps], ids=["pickle", "cloudpickle"])
def test_pickle_round_trip(dumps):
    for e in PICKLED:
        back = pickle.loads(dumps(e))
        assert repr(back) == repr(e)
        assert back.output_name == e.output_name
        assert back.columns() == e.columns()
        if "t" not in e.columns():
            assert back.evaluate(B).equals(e.evaluate(B))
    a = E.sum(col("i") * 2).alias("total")
    back = pickle.loads(dumps(a))
    assert (back.func, back.name, repr(back.arg)) == ("sum", "total", repr(a.arg))
    assert pickle.loads(dumps(E.count())).arg is None


# --------------------------------------------------------------------------- aggregates


def test_aggregate_descriptors():
    cases = [
        (E.sum("a"), "sum", "a"),
        (E.mean(col("a")), "mean", "a"),
        (E.avg("a"), "mean", "a"),
        (E.min("a"), "min", "a"),
        (E.max("a"), "max", "a"),
        (E.count("a"), "count", "a"),
        (E.count_distinct("a"), "count_distinct", "a"),
        (E.first("a"), "first", "a"),
        (E.last("a"), "last", "a"),
        (E.collect_list("a"), "collect_list", "a"),
        (col("a").sum(), "sum", "a"),
        (col("a").mean(), "mean", "a"),
        (col("a").min(), "min", "a"),
        (col("a").max(), "max", "a"),
        (col("a").count(), "count", "a"),
        (col("a").count_distinct(), "count_distinct", "a"),
        (col("a").first(), "first", "a"),
        (col("a").last(), "last", "a"),
        (col("a").collect_list(), "collect_list", "a"),
        ((col("a") * col("b")).sum(), "sum", "a"),
        (E.sum(col("a").alias("x")), "sum", "x"),
    ]
    for agg, func, name in cases:
        assert isinstance(agg, AggExpr)
        assert agg.func == func
        assert agg.name == name
        assert isinstance(agg.arg, Expr)
    for c in (E.count(), E.count("*")):
        assert (c.func, c.arg, c.name) == ("count_all", None, "count")
        assert c.columns() == set()
    total = E.sum("a").alias("total")
    assert (total.func, total.name, repr(total)) == ("sum", "total", 'col("a").sum().alias("total")')
    assert repr(E.count()) == "count()"
    assert repr(E.mean("a")) == 'col("a").mean()'
    assert (col("a") + col("b")).sum().columns() == {"a", "b"}
    with pytest.raises(PlanError):
        AggExpr("no_such_aggregate", col("a"))
    with pytest.raises(PlanError):
        E.sum(3)
