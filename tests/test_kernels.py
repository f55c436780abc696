"""Per-partition kernels chosen for speed must give the answers of the plain ones: the ASCII
fast paths of ``str.split()`` (Python's ``str.split`` is the oracle) and of ``str.lower()``
/ ``str.upper()`` (Arrow's Unicode kernels are), Arrow's line splitting of
text chunks (the numpy one is the oracle), and filters that keep every row."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from hypothesis import given, settings
from hypothesis import strategies as st

import millstream as ms
from millstream.expr.strings import _only_ascii_spaces, _split_whitespace
from millstream.io.files import lines as L
from millstream.ops.narrow import FilterExpr

_ALPHABET = ["a", "B", "é", "€", "“", " ", "  ", "\t", "\n", "\r", "\x0b", "\x0c", "\x1c",
             "\x1f", "\u00a0", "\u0085", "\u1680", "\u2003", "\u2028", "\u205f", "\u3000",
             "\u2019", "xyz"]
_texts = st.lists(st.one_of(st.none(), st.lists(st.sampled_from(_ALPHABET), max_size=12)
                            .map("".join)), max_size=30)


@settings(max_examples=300, deadline=None)
@given(texts=_texts)
def test_split_on_whitespace_is_pythons_split(texts):
    arr = pa.array(texts, pa.string())
    got = _split_whitespace(arr, len(arr)).to_pylist()
    assert got == [None if t is None else t.split() for t in texts]
    # the same through the expression, on a slice (offsets not at 0)
    b = pa.record_batch({"s": pa.array(["pad", *texts], pa.string())}).slice(1)
    expr = ms.col("s").str.split()
    assert expr.evaluate(b).to_pylist() == [None if t is None else t.split() for t in texts]


@settings(max_examples=200, deadline=None)
@given(texts=_texts, cut=st.integers(0, 3), chunks=st.integers(1, 3))
def test_lower_and_upper_match_the_unicode_kernels(texts, cut, chunks):
    """All-ASCII strings take the ASCII kernels; a slice whose buffer holds other bytes
    outside it, and chunked columns, still give the Unicode kernels' answers."""
    padded = ["ÀÉ", "Ünï", "x", *texts][3 - cut:]
    arr = pa.array(padded, pa.string()).slice(cut)  # (non-ASCII bytes outside the slice)
    parts = np.array_split(np.arange(len(arr)), chunks)
    batch = pa.record_batch({"s": arr})
    table = pa.table({"s": pa.chunked_array([arr.take(pa.array(ix, pa.int64())) for ix in parts],
                                            pa.string())})
    for method, oracle in (("lower", pc.utf8_lower), ("upper", pc.utf8_upper)):
        want = oracle(arr).to_pylist()
        expr = getattr(ms.col("s").str, method)()
        assert expr.evaluate(batch).to_pylist() == want
        assert ms.from_arrow(table).select(expr.alias("r")).to_arrow() \
            .column("r").to_pylist() == want


def test_ascii_spaces_are_told_apart_from_unicode_ones():
    assert _only_ascii_spaces(pa.array(["déjà vu", "“quoted” – dash", "tab\there"]))
    for odd in ("a\u00a0b", "a\u2003b", "a\x1cb", "x\u3000", "\u0085"):
        assert not _only_ascii_spaces(pa.array(["fine", odd]))


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(st.text(alphabet=st.sampled_from(["a", "é", " ", "x", "\t"]),
                              max_size=10), min_size=1, max_size=20),
       crlf=st.booleans())
def test_arrow_line_splitting_matches_the_numpy_one(lines, crlf):
    data = ("\r\n" if crlf else "\n").join(lines).encode() + (b"\r\n" if crlf else b"\n")
    got, starts = L.split_lines(data)
    want_starts, want_ends = L.line_bounds(data)
    assert starts.tolist() == want_starts.tolist()
    assert got.to_pylist() == [data[a:b] for a, b in zip(want_starts, want_ends)]


def test_a_filter_that_keeps_every_row_passes_the_batch_on():
    b = pa.record_batch({"x": [1, 2, 3]})
    op = FilterExpr(ms.col("x") > 0)
    assert op.process(b)[0] is b
    out = FilterExpr(ms.col("x") > 1).process(b)[0]
    assert out.column(0).to_pylist() == [2, 3]
    nulls = pa.record_batch({"x": pa.array([1, None, 3])})
    assert FilterExpr(ms.col("x") > 0).process(nulls)[0].num_rows == 2


def test_word_count_pipeline_matches_python(tmp_path):
    rng = np.random.default_rng(1)
    words = np.array(["the", "The", "THE", "éclair", "Éclair", "naïve", "a", "b", "ç"])
    text = "\n".join(" ".join(rng.choice(words, rng.integers(0, 12))) for _ in range(3000))
    path = tmp_path / "t.txt"
    path.write_text(text + "\n", encoding="utf-8")
    ms.init(parallelism=2)
    try:
        got = (ms.read_text(str(path)).select(ms.col("text").str.lower().str.split().alias("w"))
               .explode("w").filter(ms.col("w") != "").group_by("w").agg(ms.count().alias("n"))
               .to_arrow())
    finally:
        ms.shutdown()
    want: dict[str, int] = {}
    for w in text.lower().split():
        want[w] = want.get(w, 0) + 1
    assert dict(zip(got.column("w").to_pylist(), got.column("n").to_pylist())) == want
    assert pc.sum(got.column("n")).as_py() == len(text.split())


def _as_dictionaries(values: list, pieces: int, rng: np.random.Generator) -> pa.ChunkedArray:
    """``values`` as dictionary chunks, each with a dictionary of its own (shuffled, with
    unused entries), as Parquet pages give them."""
    chunks = []
    for part in np.array_split(np.arange(len(values)), pieces):
        vals = [values[i] for i in part]
        distinct = sorted({v for v in vals if v is not None} | {"unused"})
        rng.shuffle(distinct)
        pos = {v: i for i, v in enumerate(distinct)}
        codes = pa.array([None if v is None else pos[v] for v in vals], pa.int32())
        chunks.append(pa.DictionaryArray.from_arrays(codes, pa.array(distinct)))
    return pa.chunked_array(chunks)


@settings(max_examples=60, deadline=None)
@given(keys=st.lists(st.one_of(st.none(), st.sampled_from(["a", "b", "c", "dd", ""])),
                     min_size=1, max_size=60),
       pieces=st.integers(1, 4))
def test_grouping_on_dictionary_codes_matches_grouping_the_values(keys, pieces):
    from millstream.expr.aggregates import AggSpec
    from millstream.ops.agg_keys import dictionary_keys
    from millstream.ops.aggregate import _AggCore

    rng = np.random.default_rng(len(keys))
    pieces = min(pieces, len(keys))
    v = pa.array(rng.integers(0, 10, len(keys)))
    other = pa.array(rng.choice(["x", "y"], len(keys)))
    plain = pa.table({"k": pa.array(keys, pa.string()), "o": other, "v": v})
    coded = pa.table({"k": _as_dictionaries(keys, pieces, rng),
                      "o": _as_dictionaries(other.to_pylist(), pieces, rng), "v": v})
    specs = [AggSpec("sum", ms.col("v"), "s"), AggSpec("mean", ms.col("v"), "m"),
             AggSpec("count_all", None, "n")]
    core = _AggCore(["k", "o"], specs)
    assert dictionary_keys(coded, core.keys, specs) == ["k", "o"]
    got = core.partial(coded)
    assert got.schema == core.partial(plain).schema  # plain string keys, as decoded ones
    got = core.finalize(core.merge(got)).sort_by([("k", "ascending"), ("o", "ascending")])
    want = core.finalize(core.merge(core.partial(plain)))
    want = want.sort_by([("k", "ascending"), ("o", "ascending")])
    assert got.to_pylist() == want.to_pylist()
    # an aggregate of a key reads its values: that key is not grouped on codes
    distinct_k = [AggSpec("count_distinct", ms.col("k"), "d")]
    assert dictionary_keys(coded, ["k", "o"], distinct_k) == ["o"]


def test_a_group_by_reads_small_dictionary_keys_of_parquet_as_codes(tmp_path):
    """String keys stored as small Parquet dictionaries reach the group-by as dictionaries
    (with nulls, over row groups whose dictionaries differ); a key with a big dictionary, or
    a scan with a filter, reads plain strings; the answers are the plain ones."""
    import pyarrow.parquet as pq

    from millstream.io.files.parquet import ParquetSource

    rng = np.random.default_rng(7)
    n = 40_000
    small = rng.choice(["id001", "id002", "id003", None], n)
    small[: n // 2] = np.where(small[: n // 2] == "id003", "id004", small[: n // 2])
    big = np.array([f"key{i:08d}" for i in rng.integers(0, 30_000, n)])
    t = pa.table({"s": pa.array(small, pa.string()), "b": pa.array(big), "v": rng.integers(0, 9, n)})
    path = tmp_path / "g.parquet"
    pq.write_table(t, path, row_group_size=10_000)
    src = ParquetSource(str(path), columns=["s", "b", "v"]).for_aggregation(["s", "b", "v"])
    infos = [sp.info for sp in src.plan_splits(2)]
    assert infos and all(i.dictionary_columns == ("s",) for i in infos)
    filtered = ParquetSource(str(path), filter=ms.col("v") > 2).for_aggregation(["s"])
    assert all(sp.info.dictionary_columns == () for sp in filtered.plan_splits(2))
    df = t.to_pandas()
    ms.init(parallelism=2)
    try:
        got = ms.read_parquet(str(path)).group_by("s").agg(ms.sum("v").alias("v")).to_arrow()
        two = (ms.read_parquet(str(path)).group_by("s", "b").agg(ms.count().alias("n"))
               .to_arrow())
    finally:
        ms.shutdown()
    want = df.groupby("s", dropna=False)["v"].sum()
    assert got.schema.field("s").type == pa.string()
    assert {r["s"]: r["v"] for r in got.to_pylist()} == \
        {(None if k != k else k): int(x) for k, x in want.items()}
    assert two.num_rows == len(df.groupby(["s", "b"], dropna=False))
    assert pc.sum(two.column("n")).as_py() == n


def test_a_scan_read_for_a_group_by_gives_large_batches_within_its_budget(tmp_path):
    import pyarrow.parquet as pq

    from millstream.core.context import TaskContext
    from millstream.io.files.parquet import ParquetSource

    n = 200_000
    path = tmp_path / "w.parquet"
    pq.write_table(pa.table({"k": np.arange(n) % 7, "v": np.arange(n)}), path,
                   row_group_size=n)
    plain = ParquetSource(str(path))
    grouped = plain.for_aggregation(["k"])
    ctx = TaskContext(batch_size=1000, memory_budget=1 << 30)
    (split,) = grouped.plan_splits(1)
    sizes = [b.num_rows for b in grouped.read_split(split, ctx)]
    assert sizes == [n]  # one batch of the row group, not 200 of 1000 rows
    assert max(b.num_rows for b in plain.read_split(plain.plan_splits(1)[0], ctx)) == 1000
    small = TaskContext(batch_size=1000, memory_budget=8 << 20)  # the budget caps a batch
    sizes = [b.num_rows for b in grouped.read_split(split, small)]
    assert sum(sizes) == n and 1000 <= max(sizes) < n


def test_the_combiner_takes_dictionary_and_plain_keys_in_one_task():
    """Batches whose keys are dictionaries and batches whose keys are plain strings (two
    files read differently) are grouped apart and merged by the final step."""
    from millstream.expr.aggregates import AggSpec
    from millstream.ops.aggregate import FinalAggregate, PartialAggregate

    specs = [AggSpec("sum", ms.col("v"), "s")]
    part, final = PartialAggregate(["k"], specs), FinalAggregate(["k"], specs)
    keys = ["a", "b", None, "a"]
    coded = pa.record_batch({"k": pa.array(keys).dictionary_encode(), "v": [1, 2, 3, 4]})
    plain = pa.record_batch({"k": pa.array(keys, pa.string()), "v": [10, 20, 30, 40]})
    out = []
    for b in (coded, plain, coded, plain):
        out += list(part.process(b))
    out += list(part.finish())
    for b in out:
        assert b.schema.field("k").type == pa.string()
        final.process(b)
    got = pa.Table.from_batches(list(final.finish()))
    assert dict(zip(got.column("k").to_pylist(), got.column("s").to_pylist())) == \
        {"a": 2 * (5 + 50), "b": 2 * (2 + 20), None: 2 * (3 + 30)}



@settings(max_examples=80, deadline=None)
@given(keys=st.lists(st.one_of(st.none(), st.sampled_from(["ab", "cd", "é", "zz", "a\x00"])),
                     min_size=1, max_size=50),
       cut=st.integers(0, 50), pad=st.booleans())
def test_grouping_strings_of_one_length_matches_grouping_them_as_strings(keys, cut, pad):
    """Keys whose values all take the same bytes are grouped as fixed-size binary (over
    sliced chunks, with nulls); the states and results are those of the string grouping.
    A null that takes no bytes, or one value of another length, keeps the string path."""
    from millstream.expr.aggregates import AggSpec
    from millstream.ops.agg_keys import fixed_width_keys
    from millstream.ops.aggregate import _AggCore

    n = len(keys)
    # nulls over two bytes like the values (as Arrow's take/filter leave them), or none
    if pad:
        data = b"".join(b"??" if k is None else k.encode() for k in keys)
        offsets = pa.py_buffer(np.arange(n + 1, dtype=np.int32) * 2)
        valid = pa.array([k is not None for k in keys])
        arr = pa.Array.from_buffers(pa.string(), n, [valid.buffers()[1], offsets,
                                                     pa.py_buffer(data)],
                                    null_count=keys.count(None), offset=0)
    else:
        arr = pa.array(keys, pa.string())
    cut = min(cut, n)
    chunks = [c for c in (arr.slice(0, cut), arr.slice(cut)) if len(c)]
    v = pa.array(np.arange(n))
    table = pa.table({"k": pa.chunked_array(chunks, pa.string()), "v": v})
    specs = [AggSpec("sum", ms.col("v"), "s"), AggSpec("count_all", None, "c")]
    core = _AggCore(["k"], specs)
    fixed = fixed_width_keys(table, ["k"], specs)
    assert bool(fixed) == (pad or None not in keys)
    got = core.partial(table)
    assert got.schema.field("k").type == pa.string()
    got = core.finalize(core.merge(got)).to_pylist()
    want: dict = {}
    for k, x in zip(keys, range(n)):
        s, c = want.get(k, (0, 0))
        want[k] = (s + x, c + 1)
    assert {r["k"]: (r["s"], r["c"]) for r in got} == want
    assert len(got) == len(want)


@settings(max_examples=60, deadline=None)
@given(keys=st.lists(st.integers(-50, 50), min_size=2, max_size=300), cut=st.integers(0, 300),
       ktype=st.sampled_from([pa.int64(), pa.int32()]), data=st.data())
def test_grouping_keys_in_runs_matches_arrows_grouping(keys, cut, ktype, data):
    """One integer key in order (or in two ascending runs): numpy segment sums give
    Arrow's groups, schema and sums (decimals, integers, counts); what they do not cover
    (unordered keys, nulls, floats) is left to Arrow."""
    import decimal

    from millstream.ops.agg_runs import group_runs

    ordered = sorted(keys)
    cut = min(cut, len(ordered))
    k = ordered[cut:] + ordered[:cut]  # two ascending runs
    n = len(k)
    cents = data.draw(st.lists(st.integers(-10**12, 10**12), min_size=n, max_size=n))
    t = pa.table({"k": pa.array(k, ktype),
                  "d": pa.array([decimal.Decimal(c).scaleb(-2) for c in cents],
                                pa.decimal128(15, 2)),
                  "i": pa.array([c % 1000 for c in cents], pa.int32()),
                  "f": [float(c) for c in cents]})
    aggs = [("d", "sum"), ("i", "sum"), ([], "count_all"),
            ("i", "count", pc.CountOptions("only_valid"))]
    got = group_runs(t, ["k"], aggs)
    want = t.group_by(["k"], use_threads=False).aggregate(aggs)
    descents = sum(a > b for a, b in zip(k, k[1:]))
    if descents * 64 > n:  # too many runs for a merge to pay: left to Arrow
        assert got is None
        got = group_runs(t.sort_by("k"), ["k"], aggs)
    assert got is not None and got.schema == want.schema
    assert got.sort_by("k").equals(want.sort_by("k"))
    assert group_runs(t, ["k"], [("f", "sum")]) is None
    with_null = t.set_column(1, "d", pa.array([None] + t.column("d").to_pylist()[1:],
                                              pa.decimal128(15, 2)))
    assert group_runs(with_null, ["k"], [("d", "sum")]) is None


def test_grouping_unordered_keys_is_left_to_arrow():
    from millstream.ops.agg_runs import group_runs

    t = pa.table({"k": [3, 1, 2, 1, 3, 2, 0, 5] * 10, "v": list(range(80))})
    assert group_runs(t, ["k"], [("v", "sum")]) is None
    assert group_runs(t.sort_by("k"), ["k"], [("v", "sum")]).column("v_sum").to_pylist() == \
        [sum(v for kk, v in zip(t["k"].to_pylist(), range(80)) if kk == key)
         for key in [0, 1, 2, 3, 5]]
