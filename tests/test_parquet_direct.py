"""Parquet splits read directly (io.files.parquet_read: filter columns first, small string
dictionaries by code) give the rows the pyarrow.dataset scan gives, nulls included; filters
on string_view columns go into the scan; cached footers are never used for a rewritten file."""

from __future__ import annotations

import datetime as dt
import os
import random
from decimal import Decimal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import millstream as ms
from millstream.core.context import TaskContext
from millstream.io.files import parquet as pmod
from millstream.io.files import parquet_footer, parquet_read
from millstream.io.files.parquet import ParquetSource

col, lit = ms.col, ms.lit


def _table(n: int = 3000, seed: int = 1, view: bool = False) -> pa.Table:
    rnd = random.Random(seed)

    def maybe(v):
        return None if rnd.random() < 0.1 else v

    s = pa.string_view() if view else pa.string()
    return pa.table({
        "k": pa.array(range(n), pa.int64()),
        "q": pa.array([maybe(Decimal(rnd.randint(100, 5000)).scaleb(-2)) for _ in range(n)],
                      pa.decimal128(15, 2)),
        "d": pa.array([maybe(dt.date(1994, 1, 1) + dt.timedelta(days=rnd.randint(0, 700)))
                       for _ in range(n)], pa.date32()),
        "mode": pa.array([maybe(rnd.choice(["AIR", "AIR REG", "MAIL", "SHIP", "TRUCK"]))
                          for _ in range(n)], s),
        "note": pa.array([maybe(f"note {rnd.randint(0, 10**9)}") for _ in range(n)], s),
        "x": pa.array([maybe(rnd.uniform(-1, 1)) for _ in range(n)], pa.float64()),
    })


PREDICATES = [
    None,
    col("q") < 24,
    (col("d") >= lit(dt.date(1994, 6, 1))) & (col("d") < lit(dt.date(1995, 1, 1)))
    & col("q").between(Decimal("5"), Decimal("7.5")),
    col("mode").is_in(["AIR", "AIR REG"]) & (col("q") <= Decimal("30.005")),
    (col("mode") == "MAIL") | ((col("x") > 0.5) & (col("mode") != "SHIP")),
    col("k") > 10**6,  # nothing left in any row group
    (col("k") < 700) & (col("note") != "note 1"),  # only the first row groups
    ~(col("mode") == "AIR") & col("x").is_not_null(),
    lit(False), lit(True) & (col("k") < 10),
]


def _read(src: ParquetSource, columns, predicate) -> pa.Table:
    new, _, _ = src.with_pushdown(columns, predicate)
    batches = [b for sp in new.plan_splits(3) for b in new.read_split(sp, TaskContext())]
    schema = new.schema()
    return pa.Table.from_batches(batches, schema=schema) if batches else schema.empty_table()


def _rows(t: pa.Table) -> list:
    return sorted(t.to_pylist(), key=lambda r: r["k"])


@pytest.mark.parametrize("view", [False, True])
@pytest.mark.parametrize("i", range(len(PREDICATES)))
def test_direct_read_equals_the_scan(tmp_path, monkeypatch, view: bool, i: int) -> None:
    path = str(tmp_path / "t.parquet")
    pq.write_table(_table(view=view), path, row_group_size=500)
    predicate = PREDICATES[i]
    columns = ["k", "q", "mode", "note"]
    direct = _read(ParquetSource(path), columns, predicate)
    monkeypatch.setattr(pmod, "piece_reader", lambda *a, **k: None)
    scanned = _read(ParquetSource(path), columns, predicate)
    assert direct.schema == scanned.schema
    assert _rows(direct) == _rows(scanned)
    # and the rows a filter over the table in memory keeps
    table = _table(view=False)
    if predicate is not None:
        table = table.filter(pa.array(predicate.evaluate(table.to_batches()[0])),
                             null_selection_behavior="drop")
    assert [r["k"] for r in _rows(direct)] == table["k"].to_pylist()


def test_direct_path_is_taken_and_skips_empty_row_groups(tmp_path, monkeypatch) -> None:
    path = str(tmp_path / "t.parquet")
    pq.write_table(_table(), path, row_group_size=500)
    calls: list[tuple[int, tuple[str, ...]]] = []
    real = pq.ParquetFile.read_row_group

    def spy(self, i, columns=None, **kw):
        calls.append((i, tuple(columns or ())))
        return real(self, i, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    out = _read(ParquetSource(path), ["k", "note"], col("k") < 700)
    assert out.num_rows == 700
    # row groups 0 and 1 hold k < 1000 (the rest are pruned by statistics or by the mask)
    note_reads = sorted(i for i, cols in calls if "note" in cols)
    assert note_reads == [0, 1], calls


def test_small_dictionaries_are_read_as_codes(tmp_path) -> None:
    path = str(tmp_path / "t.parquet")
    pq.write_table(_table(view=True), path, row_group_size=500)
    src, _, _ = ParquetSource(path).with_pushdown(["k", "mode"], col("mode") == "MAIL")
    assert "row_filter" in src.describe()  # (a view column's filter went into the scan)
    info = src.plan_splits(1)[0].info
    plan = parquet_read.direct_plan(["k", "mode"], info.schema, src._pushed, 1024, 1 << 28)
    piece = info.pieces[0]
    from millstream.io import fs as msfs

    reader = parquet_read.piece_reader(msfs.resolve(path)[0], plan, piece, info.schema)
    assert reader is not None
    out = pa.Table.from_batches(list(reader()))
    assert out.schema.field("mode").type == pa.string()  # decoded for the rows kept
    assert set(out["mode"].to_pylist()) == {"MAIL"}


def test_end_to_end_with_nulls(tmp_path) -> None:
    path = str(tmp_path / "t.parquet")
    table = _table(view=True)
    pq.write_table(table, path, row_group_size=400)
    pred = col("mode").is_in(["AIR", "SHIP"]) & (col("q") < 30)
    got = (ms.read_parquet(path).filter(pred).select("k", "mode", "q").to_arrow()
           .sort_by("k"))
    plain = table.cast(pa.schema([f.with_type(pa.string()) if f.type == pa.string_view() else f
                                  for f in table.schema]))
    want = ms.from_arrow(plain).filter(pred).select("k", "mode", "q").to_arrow().sort_by("k")
    assert got.to_pylist() == want.to_pylist()


# ---------------------------------------------------------------- footer cache

def _write(path: str, values: list[int]) -> None:
    pq.write_table(pa.table({"v": pa.array(values, pa.int64())}), path,
                   compression="none", use_dictionary=False, write_statistics=True)


def test_rewritten_file_within_the_same_second_is_read_anew(tmp_path) -> None:
    """A file rewritten at once (same size, its modification time set back) gives the
    new rows: a footer is never cached for a file that changed within the last seconds."""
    parquet_footer.clear()
    path = str(tmp_path / "f.parquet")
    _write(path, [1, 2, 3])
    st = os.stat(path)
    assert ms.read_parquet(path).to_arrow()["v"].to_pylist() == [1, 2, 3]
    _write(path, [7, 8, 9])
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size
    assert ms.read_parquet(path).to_arrow()["v"].to_pylist() == [7, 8, 9]
    meta, _ = parquet_footer.local_footer(path)
    assert meta.row_group(0).column(0).statistics.min == 7


def test_cached_footer_is_reused_until_the_file_changes(tmp_path, monkeypatch) -> None:
    parquet_footer.clear()
    path = str(tmp_path / "f.parquet")
    _write(path, [1, 2, 3])
    later = parquet_footer._now() + 10 * 10**9  # read as if ten seconds later
    monkeypatch.setattr(parquet_footer, "_now", lambda: later)
    first, _ = parquet_footer.local_footer(path)
    assert parquet_footer.local_footer(path)[0] is first  # cached
    st = os.stat(path)
    _write(path, [7, 8, 9])  # same size; the modification time set back
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    meta, _ = parquet_footer.local_footer(path)
    assert meta is not first
    assert meta.row_group(0).column(0).statistics.min == 7


def test_coarse_timestamps_never_serve_a_stale_footer(tmp_path, monkeypatch) -> None:
    """On a filesystem whose times have one-second resolution, a same-size rewrite within
    that second looks unchanged: the footer read before it must not have been cached."""
    parquet_footer.clear()

    def coarse(st):
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns // 10**9,
                st.st_ctime_ns // 10**9)

    monkeypatch.setattr(parquet_footer, "_identity", coarse)
    path = str(tmp_path / "f.parquet")
    _write(path, [1, 2, 3])
    st = os.stat(path)
    assert parquet_footer.local_footer(path)[0].row_group(0).column(0).statistics.min == 1
    _write(path, [7, 8, 9])
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    if coarse(os.stat(path)) != coarse(st):
        pytest.skip("the rewrite crossed a second boundary")
    assert parquet_footer.local_footer(path)[0].row_group(0).column(0).statistics.min == 7


def test_a_filter_without_columns_still_counts_rows(tmp_path) -> None:
    schema = pa.schema([("k", pa.int64()), ("s", pa.string())])
    plan = parquet_read.direct_plan(["s"], schema, [lit(False)], 1024, 1 << 28)
    assert plan is not None and plan.filter_columns == ("s",)
    assert parquet_read.direct_plan([], schema, [lit(False)], 1024, 1 << 28) is None


def test_binary_columns_and_widened_integers(tmp_path, monkeypatch) -> None:
    """Files whose integer column is int32 in one and int64 in another, and a small binary
    dictionary column filtered on: the direct read gives the scan's rows and types."""
    d = tmp_path / "ds"
    d.mkdir()
    codes = [b"a", b"b", None, b"c"]
    pq.write_table(pa.table({"n": pa.array(range(400), pa.int64()),
                             "b": pa.array([codes[i % 4] for i in range(400)], pa.binary())}),
                   str(d / "a.parquet"), row_group_size=100)
    pq.write_table(pa.table({"n": pa.array(range(400, 800), pa.int32()),
                             "b": pa.array([codes[i % 4] for i in range(400)], pa.binary())}),
                   str(d / "b.parquet"), row_group_size=100)
    pred = (col("b") == b"b") | (col("n") > 790)
    direct = _read(ParquetSource(str(d)), ["n", "b"], pred)
    monkeypatch.setattr(pmod, "piece_reader", lambda *a, **k: None)
    scanned = _read(ParquetSource(str(d)), ["n", "b"], pred)
    assert direct.schema == scanned.schema
    key = lambda r: r["n"]  # noqa: E731
    assert sorted(direct.to_pylist(), key=key) == sorted(scanned.to_pylist(), key=key)
    assert direct.num_rows == 200 + 9 - 2  # (793 and 797 are both)


def test_few_rows_per_row_group_are_gathered_into_batches(tmp_path) -> None:
    path = str(tmp_path / "g.parquet")
    pq.write_table(pa.table({"k": pa.array(range(2000), pa.int64()),
                             "m": pa.array([i % 20 for i in range(2000)], pa.int64())}),
                   path, row_group_size=100)
    src, _, _ = ParquetSource(path).with_pushdown(["k"], col("m") == 3)
    (split,) = src.plan_splits(1)
    sizes = [b.num_rows for b in src.read_split(split, TaskContext(batch_size=60))]
    assert sum(sizes) == 100
    assert len(sizes) < 20 and max(sizes) <= 60  # (5 rows in each of 20 row groups)
