"""File sources: storage by URI, text/CSV/JSON byte-range splits, bad records, Parquet pushdown."""

from __future__ import annotations

import gzip
import json
import os
import random

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from millstream.core.context import TaskContext
from millstream.errors import BadRecordError, PlanError, StorageError, StorageNotFoundError
from millstream.io import fs as msfs
from millstream.io.files.csv import CsvSource
from millstream.io.files.json import JsonSource
from millstream.io.files.parquet import ParquetSource
from millstream.io.files.text import TextSource


class Pred:
    """A stand-in for millstream.expr.nodes.Expr."""

    def __init__(self, expr: pc.Expression | None, columns: set[str], fn=None):
        self._expr, self._columns, self._fn = expr, columns, fn

    def columns(self) -> set[str]:
        return set(self._columns)

    def to_arrow(self) -> pc.Expression | None:
        return self._expr

    def evaluate(self, batch: pa.RecordBatch) -> pa.Array:
        return self._fn(batch)


def read_all(src, target: int = 4, ctx: TaskContext | None = None, batch_size: int = 7):
    ctx = ctx or TaskContext(batch_size=batch_size)
    rows = []
    for split in src.plan_splits(target):
        for batch in src.read_split(split, ctx):
            assert batch.num_rows <= ctx.batch_size
            rows.extend(batch.to_pylist())
    return rows


def write(path, data: bytes | str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(path, mode, **({} if isinstance(data, bytes) else {"newline": ""})) as f:
        f.write(data)
    return str(path)


# ----------------------------------------------------------------------------------------
# fs: URIs, listing, retries
# ----------------------------------------------------------------------------------------

def test_resolve_local_and_file_uri(tmp_path):
    fs, path = msfs.resolve(str(tmp_path / "x.txt"))
    assert path == str(tmp_path / "x.txt") and msfs.is_local(fs)
    fs2, path2 = msfs.resolve(f"file://{tmp_path}/a%20b")
    assert path2 == f"{tmp_path}/a b" and fs2 is fs  # cached per process
    fs3, path3 = msfs.resolve("s3://bucket/key/part", endpoint_url="http://127.0.0.1:1")
    assert path3 == "bucket/key/part" and type(fs3).__name__ == "S3FileSystem"
    assert msfs.resolve("s3://bucket/other", endpoint_url="http://127.0.0.1:1")[0] is fs3


def test_resolve_fsspec_memory_and_unknown_scheme():
    fs, path = msfs.resolve("memory://mbucket/a/b.txt")
    assert path == "/mbucket/a/b.txt" and msfs.is_object_store(fs)
    msfs.write_bytes(fs, path, b"hi\n")
    assert msfs.read_bytes(fs, path) == b"hi\n"
    assert [e.size for e in msfs.expand("memory://mbucket/a")] == [3]
    with pytest.raises(PlanError, match="no-such-proto"):
        msfs.resolve("no-such-proto://x/y")


@pytest.fixture
def tree(tmp_path):
    for rel in ["a.csv", "b.csv", "sub/c.csv", "sub/deeper/d.csv", "sub/e.txt", "_SUCCESS",
                ".hidden.csv", "_temporary/0/x.csv", "sub/.crc/y.csv", "bb.csv"]:
        write(str(tmp_path / rel), "x\n")
    return tmp_path


def rels(entries, base):
    return [os.path.relpath(e.path, base) for e in entries]


def test_expand_file_dir_and_hidden(tree):
    assert rels(msfs.expand(str(tree / "a.csv")), tree) == ["a.csv"]
    assert rels(msfs.expand(str(tree)), tree) == [
        "a.csv", "b.csv", "bb.csv", "sub/c.csv", "sub/deeper/d.csv", "sub/e.txt"]
    assert all(e.size == 2 for e in msfs.expand(str(tree)))


def test_expand_globs(tree):
    assert rels(msfs.expand(f"{tree}/*.csv"), tree) == ["a.csv", "b.csv", "bb.csv"]
    assert rels(msfs.expand(f"{tree}/?.csv"), tree) == ["a.csv", "b.csv"]
    assert rels(msfs.expand(f"{tree}/[ab].csv"), tree) == ["a.csv", "b.csv"]
    assert rels(msfs.expand(f"{tree}/[!a].csv"), tree) == ["b.csv"]
    assert rels(msfs.expand(f"{tree}/**/*.csv"), tree) == [
        "a.csv", "b.csv", "bb.csv", "sub/c.csv", "sub/deeper/d.csv"]
    assert rels(msfs.expand(f"{tree}/s*"), tree) == ["sub/c.csv", "sub/deeper/d.csv",
                                                     "sub/e.txt"]
    assert rels(msfs.expand(f"{tree}/_SUC*"), tree) == ["_SUCCESS"]  # asked for explicitly


def test_expand_not_found_and_empty_dir(tmp_path):
    with pytest.raises(StorageNotFoundError, match="nothing-here") as info:
        msfs.expand(str(tmp_path / "nothing-here"))
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, StorageError)
    with pytest.raises(FileNotFoundError, match="no files match"):
        msfs.expand(f"{tmp_path}/*.parquet")
    (tmp_path / "empty").mkdir()
    write(str(tmp_path / "empty" / "_SUCCESS"), "")
    assert msfs.expand(str(tmp_path / "empty")) == []


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(msfs, "RETRY_BASE_DELAY", 0.001)


def test_with_retries(fast_retries):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("AWS Error SLOW_DOWN during GetObject operation: Please reduce rate")
        return "ok"

    assert msfs.with_retries(flaky, "reading s3://b/k") == "ok" and len(calls) == 3

    def always():
        raise OSError("When reading s3://b/k: AWS Error [code 503]: Service Unavailable")

    with pytest.raises(StorageError, match=r"reading s3://b/k failed after 5 attempts"):
        msfs.with_retries(always, "reading s3://b/k")

    calls.clear()

    def missing():
        calls.append(1)
        raise FileNotFoundError("nope")

    with pytest.raises(FileNotFoundError):
        msfs.with_retries(missing, "x")
    assert len(calls) == 1


@pytest.mark.parametrize("message,transient", [
    ("Connection reset by peer", True), ("curl error: Timeout was reached", True),
    ("HTTP status 500 InternalError", True), ("ServiceUnavailable", True),
    ("Connection refused", True), ("Access Denied", False), ("Path does not exist", False),
    ("Parquet magic bytes not found in part-00500", False),
])
def test_is_transient(message, transient):
    assert msfs.is_transient(OSError(message)) is transient


# ----------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------

def random_lines(seed: int, n: int) -> list[str]:
    rnd = random.Random(seed)
    alphabet = "ab€ \t\r,\"é"
    lines = []
    for _ in range(n):
        line = "".join(rnd.choice(alphabet) for _ in range(rnd.choice([0, 0, 1, 3, 9, 30])))
        lines.append(line.rstrip("\r"))
    return lines


def join_lines(lines: list[str], seed: int, trailing: bool) -> str:
    rnd = random.Random(seed)
    text = "".join(line + rnd.choice(["\n", "\r\n"]) for line in lines)
    if not trailing:
        text = text[:-2] if text.endswith("\r\n") else text[:-1]
    return text


@pytest.mark.parametrize("trailing", [True, False])
def test_text_every_line_once_for_any_split_size(tmp_path, trailing):
    lines = random_lines(7, 60) + ["last"]
    path = write(str(tmp_path / "t.txt"), join_lines(lines, 3, trailing))
    raw = open(path, "rb").read()
    size = len(raw)
    # Every split size from 1 byte up: split boundaries fall on every byte, including
    # right after '\n', between '\r' and '\n', and inside multibyte characters.
    for split_size in list(range(1, 40)) + [size - 1, size, size + 1]:
        for block in (1, 5, 4096):
            src = TextSource(path, split_size=split_size, block_size=block, with_offsets=True)
            rows = read_all(src)
            assert [r["text"] for r in rows] == lines, (split_size, block)
            for r in rows:
                assert raw[r["offset"]:].startswith(r["text"].encode())
                assert r["offset"] == 0 or raw[r["offset"] - 1:r["offset"]] == b"\n"
                assert r["path"] == path


def test_text_split_planning(tmp_path):
    path = write(str(tmp_path / "big.txt"), "".join(f"line {i}\n" for i in range(1000)))
    size = os.path.getsize(path)
    src = TextSource(path, split_size=1000)
    splits = src.plan_splits(1)
    assert size == 8890 and len(splits) == 9 and splits[0].info.ranges[0].end == 1000
    assert splits[-1].info.ranges[0].start == 8000 and splits[-1].info.ranges[0].end == size
    assert sum(s.size_bytes for s in splits) == size
    # Automatic sizing never goes below the minimum split size: one split here.
    assert len(TextSource(path).plan_splits(64)) == 1
    rows = read_all(src)
    assert [r["text"] for r in rows] == [f"line {i}" for i in range(1000)]


def test_text_small_files_are_packed_and_empty_files_skipped(tmp_path):
    for i in range(20):
        write(str(tmp_path / "d" / f"f{i:02d}.txt"), f"a{i}\nb{i}\n")
    write(str(tmp_path / "d" / "empty.txt"), "")
    src = TextSource(str(tmp_path / "d"))
    splits = src.plan_splits(4)
    assert len(splits) == 1 and len(splits[0].info.ranges) == 20
    assert [r["text"] for r in read_all(src)] == [x for i in range(20) for x in (f"a{i}", f"b{i}")]
    assert len(TextSource(str(tmp_path / "d"), split_size=12).plan_splits(4)) > 1


def test_text_empty_file_unicode_and_empty_lines(tmp_path):
    empty = write(str(tmp_path / "e.txt"), "")
    assert read_all(TextSource(empty)) == []
    assert TextSource(empty).plan_splits(3) == []
    p = write(str(tmp_path / "u.txt"), "héllo wörld\n\n日本語\n\n\n🙂")
    assert [r["text"] for r in read_all(TextSource(p))] == ["héllo wörld", "", "日本語", "", "",
                                                            "🙂"]


def test_text_gzip_is_one_split(tmp_path):
    lines = [f"row {i} ü" for i in range(5000)]
    path = str(tmp_path / "x.txt.gz")
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines))
    src = TextSource(path, split_size=100, block_size=1000, with_offsets=True)
    splits = src.plan_splits(8)
    assert len(splits) == 1 and splits[0].info.ranges[0].compression == "gzip"
    rows = read_all(src, batch_size=1000)
    assert [r["text"] for r in rows] == lines
    assert rows[1]["offset"] == len(lines[0].encode()) + 1  # offsets in the uncompressed text


def test_text_bad_utf8_names_line(tmp_path):
    path = write(str(tmp_path / "bad.txt"), b"ok\nalso ok\nbad \xff here\n")
    with pytest.raises(BadRecordError, match=r"line 3 of .*bad\.txt \(byte offset 11\)"):
        read_all(TextSource(path))
    rows = read_all(TextSource(path, encoding_errors="replace"))
    assert rows[2]["text"] == "bad \ufffd here"
    latin = write(str(tmp_path / "latin.txt"), "caf\xe9\nna\xefve\n".encode("latin-1"))
    assert [r["text"] for r in read_all(TextSource(latin, encoding="latin-1"))] == ["café",
                                                                                  "naïve"]
    with pytest.raises(PlanError):
        TextSource(latin, encoding="utf-16")


def test_text_pushdown_and_describe(tmp_path):
    path = write(str(tmp_path / "t.txt"), "apple\nbanana\ncherry\n")
    src = TextSource(path, with_offsets=True)
    new, cols_ok, pred_ok = src.with_pushdown(
        ["offset"], Pred(pc.starts_with(pc.field("text"), "b"), {"text"}))
    assert cols_ok and pred_ok
    assert read_all(new) == [{"offset": 6}]
    assert new.describe().startswith(f"text {path} (1 files, 20 B) columns=[offset] filter=")
    none, _, applied = src.with_pushdown(None, Pred(None, {"text"}))
    assert not applied and read_all(none)[0]["text"] == "apple"


def test_text_from_fsspec_memory_store():
    fs, path = msfs.resolve("memory://textbucket/dir/part-0.txt")
    msfs.write_bytes(fs, path, b"".join(b"line %d\n" % i for i in range(300)))
    src = TextSource("memory://textbucket/dir", split_size=500)
    assert len(src.plan_splits(4)) > 1
    assert [r["text"] for r in read_all(src)] == [f"line {i}" for i in range(300)]


# ----------------------------------------------------------------------------------------
# CSV
# ----------------------------------------------------------------------------------------

CSV_TEXT = ("id,name,score\n" + "".join(
    f'{i},"name, {i}",{i * 1.5}\r\n' if i % 3 else f"{i},n{i},{i * 1.5}\n" for i in range(200)))


def test_csv_roundtrip_types_and_splits(tmp_path):
    path = write(str(tmp_path / "data.csv"), CSV_TEXT)
    src = CsvSource(path)
    assert src.schema() == pa.schema([("id", pa.int64()), ("name", pa.string()),
                                      ("score", pa.float64())])
    expected = read_all(src)
    assert len(expected) == 200 and expected[1] == {"id": 1, "name": "name, 1", "score": 1.5}
    for split_size in (1, 7, 64, 333, 4096):
        src = CsvSource(path, split_size=split_size, block_size=50)
        assert read_all(src) == expected, split_size


def test_csv_options_projection_and_given_schema(tmp_path):
    path = write(str(tmp_path / "semi.csv"), "1;x;true\n2;y;false\n")
    schema = pa.schema([("a", pa.int32()), ("b", pa.string()), ("c", pa.bool_())])
    src = CsvSource(path, header=False, delimiter=";", schema=schema, columns=["c", "a"])
    assert src.schema().names == ["c", "a"]
    assert read_all(src) == [{"c": True, "a": 1}, {"c": False, "a": 2}]
    auto = CsvSource(path, header=False, delimiter=";")
    assert auto.schema().names == ["f0", "f1", "f2"]


def test_csv_multiline_mode(tmp_path):
    path = write(str(tmp_path / "ml.csv"), 'a,b\n1,"two\nlines"\n2,x\n')
    src = CsvSource(path, multiline=True, split_size=3)
    assert len(src.plan_splits(4)) == 1
    assert read_all(src) == [{"a": 1, "b": "two\nlines"}, {"a": 2, "b": "x"}]


def bad_csv(tmp_path) -> str:
    good = "".join(f"{i},v{i}\n" for i in range(100))
    text = "a,b\n" + good + "oops\n" + good + '7,"open\n' + "8,w,extra\n" + "x,notanint\n"
    return write(str(tmp_path / "bad.csv"), text)


def test_csv_bad_record_error_names_file_line_offset(tmp_path):
    path = bad_csv(tmp_path)
    raw = open(path, "rb").read()
    for split_size in (None, 300):  # a split in the middle of the file: line is file-relative
        src = CsvSource(path, split_size=split_size, block_size=64)
        with pytest.raises(BadRecordError) as info:
            read_all(src)
        err = info.value
        assert err.path == path and err.line == 102 and err.record == "oops"
        assert err.offset == raw.index(b"oops")
        message = str(err)
        assert f"{path}, line 102 (byte offset {err.offset})" in message
        assert "'oops'" in message and 'on_bad_records="skip"' in message


def test_csv_bad_records_skip_and_dead_letter(tmp_path):
    path = bad_csv(tmp_path)
    for split_size in (None, 97):
        ctx = TaskContext(batch_size=1000)
        src = CsvSource(path, on_bad_records="skip", split_size=split_size, infer_bytes=200)
        rows = read_all(src, ctx=ctx)
        assert len(rows) == 200 and rows[0] == {"a": 0, "b": "v0"}
        assert ctx.counters[("millstream", "bad_records_skipped")] == 4

    dead = tmp_path / "dead"
    ctx = TaskContext(stage_id=2, partition=5, attempt=1)
    rows = read_all(CsvSource(path, on_bad_records=str(dead), infer_bytes=200), ctx=ctx)
    assert len(rows) == 200
    assert ctx.counters[("millstream", "bad_records_dead_lettered")] == 4
    assert os.listdir(dead) == ["bad-s2-p5-a1.jsonl"]
    records = [json.loads(line) for line in open(dead / "bad-s2-p5-a1.jsonl")]
    assert [r["line"] for r in records] == [102, 203, 204, 205]
    assert [r["record"] for r in records] == ["oops", '7,"open', "8,w,extra", "x,notanint"]
    raw = open(path, "rb").read()
    assert all(raw[r["offset"]:].startswith(r["record"].encode()) for r in records)
    assert all(r["path"] == path and r["reason"] for r in records)
    assert "unterminated" in records[1]["reason"] or "columns" in records[1]["reason"]
    assert "int64" in records[3]["reason"]


def test_csv_header_only_and_directory(tmp_path):
    write(str(tmp_path / "d" / "p1.csv"), "a,b\n1,2\n")
    write(str(tmp_path / "d" / "p2.csv"), "a,b\n3,4\n")
    write(str(tmp_path / "d" / "_SUCCESS"), "")
    assert read_all(CsvSource(str(tmp_path / "d"))) == [{"a": 1, "b": 2}, {"a": 3, "b": 4}]
    only = write(str(tmp_path / "h.csv"), "a,b\n")
    src = CsvSource(only)
    assert src.schema().names == ["a", "b"] and read_all(src) == []


# ----------------------------------------------------------------------------------------
# JSON lines
# ----------------------------------------------------------------------------------------

def test_json_roundtrip_splits_and_nested(tmp_path):
    records = [{"id": i, "name": f"n{i} ✓", "tags": ["x"] * (i % 3), "sub": {"v": i * 0.5}}
               for i in range(150)]
    path = write(str(tmp_path / "a.jsonl"),
                 "".join(json.dumps(r, ensure_ascii=False) + ("\r\n" if i % 2 else "\n")
                         for i, r in enumerate(records)))
    src = JsonSource(path)
    assert src.schema().field("sub").type == pa.struct([("v", pa.float64())])
    for split_size in (None, 1, 50, 999):
        assert read_all(JsonSource(path, split_size=split_size, block_size=128)) == records


def test_json_schema_is_consistent_across_splits(tmp_path):
    # Inferred from the first block; later records missing fields or adding new ones.
    lines = [json.dumps({"a": i, "b": f"s{i}"}) for i in range(50)]
    lines += [json.dumps({"a": i}) for i in range(50, 100)]
    lines += [json.dumps({"a": i, "b": "late", "c": True}) for i in range(100, 150)]
    path = write(str(tmp_path / "s.jsonl"), "\n".join(lines) + "\n")
    src = JsonSource(path, split_size=200, infer_bytes=300)
    schemas = {b.schema for sp in src.plan_splits(4) for b in src.read_split(sp, TaskContext())}
    assert schemas == {pa.schema([("a", pa.int64()), ("b", pa.string())])}
    rows = read_all(src)
    assert [r["a"] for r in rows] == list(range(150)) and rows[60]["b"] is None


def test_json_field_null_in_sample_is_read_as_text(tmp_path):
    path = write(str(tmp_path / "n.jsonl"),
                 '{"a":1,"x":null}\n{"a":2,"x":"s"}\n{"a":3,"x":5}\n{"a":4,"x":[1,2]}\n')
    src = JsonSource(path, infer_bytes=10, split_size=20)
    assert src.schema() == pa.schema([("a", pa.int64()), ("x", pa.string())])
    assert [r["x"] for r in read_all(src)] == [None, "s", "5", "[1, 2]"]


def test_json_bad_records(tmp_path):
    lines = [json.dumps({"a": i}) for i in range(30)]
    lines[10] = '{"a": 10'
    lines[20] = '[1, 2]'
    lines[25] = '{"a": "text"}'
    path = write(str(tmp_path / "b.jsonl"), "\n".join(lines))
    with pytest.raises(BadRecordError, match=r"b\.jsonl, line 11 \(byte offset \d+\)"):
        read_all(JsonSource(path, split_size=100))
    ctx = TaskContext()
    rows = read_all(JsonSource(path, on_bad_records="skip"), ctx=ctx)
    assert [r["a"] for r in rows] == [i for i in range(30) if i not in (10, 20, 25)]
    assert ctx.counters[("millstream", "bad_records_skipped")] == 3
    dead = tmp_path / "dl"
    src = JsonSource(path, on_bad_records=str(dead), split_size=60)
    splits = src.plan_splits(4)
    assert len(splits) > 3
    found = []
    for split in splits:  # one task per split, each with its own dead-letter file
        ctx = TaskContext(stage_id=1, partition=split.index)
        list(src.read_split(split, ctx))
        name = dead / f"bad-s1-p{split.index}-a0.jsonl"
        if ctx.counters:
            found += [json.loads(x) for x in open(name)]
        else:
            assert not name.exists()
    assert [(r["line"], r["record"]) for r in found] == [(11, '{"a": 10'), (21, "[1, 2]"),
                                                         (26, '{"a": "text"}')]
    assert "inferred" in found[2]["reason"]


# ----------------------------------------------------------------------------------------
# Parquet
# ----------------------------------------------------------------------------------------

@pytest.fixture
def parquet_dir(tmp_path):
    base = tmp_path / "pq"
    for day in ("2024-01-01", "2024-01-02"):
        for part in range(2):
            n0 = part * 100 + (0 if day.endswith("1") else 1000)
            table = pa.table({"id": pa.array(range(n0, n0 + 100), pa.int64()),
                              "v": [f"v{i}" for i in range(n0, n0 + 100)],
                              "x": [i * 0.5 for i in range(100)]})
            os.makedirs(base / f"day={day}", exist_ok=True)
            pq.write_table(table, str(base / f"day={day}" / f"part-{part}.parquet"),
                           row_group_size=10)
    write(str(base / "_SUCCESS"), "")
    return base


def test_parquet_splits_are_row_groups(parquet_dir):
    src = ParquetSource(str(parquet_dir), split_size=1)
    splits = src.plan_splits(4)
    assert len(splits) == 40  # 4 files x 10 row groups, one per split at this size
    assert src.schema().names == ["id", "v", "x", "day"]
    rows = read_all(src)
    assert len(rows) == 400 and {r["day"] for r in rows} == {"2024-01-01", "2024-01-02"}
    grouped = ParquetSource(str(parquet_dir)).plan_splits(3)
    assert len(grouped) == 1 and sum(len(p.row_groups) for p in grouped[0].info.pieces) == 40
    assert src.describe() == f"parquet {parquet_dir} (4 files, 40 row groups)"
    assert src.estimated_size_bytes() == sum(
        os.path.getsize(parquet_dir / d / f) for d in os.listdir(parquet_dir)
        if d.startswith("day") for f in os.listdir(parquet_dir / d))


def test_parquet_projection_and_pushdown_prune_row_groups(parquet_dir):
    src = ParquetSource(str(parquet_dir), split_size=1)
    pred = Pred((pc.field("id") >= 1155) & (pc.field("id") < 1172), {"id"})
    new, cols_applied, pred_applied = src.with_pushdown(["v"], pred)
    assert cols_applied and pred_applied
    splits = new.plan_splits(4)
    # Only row groups [1150, 1160), [1160, 1170), [1170, 1180) can match.
    assert len(splits) == 3
    assert [r["v"] for r in read_all(new)] == [f"v{i}" for i in range(1155, 1172)]
    assert new.schema() == pa.schema([("v", pa.string())])
    assert new.describe() == (f"parquet {parquet_dir} (4 files, 3 of 40 row groups) columns=[v] "
                              f"filter=((id >= 1155) and (id < 1172))")


def test_parquet_partition_filter_and_constructor_filter(parquet_dir):
    src = ParquetSource(str(parquet_dir), columns=["id", "day"],
                        filter=pc.field("day") == "2024-01-02", split_size=1)
    splits = src.plan_splits(4)
    assert len(splits) == 20
    rows = read_all(src)
    assert len(rows) == 200 and {r["day"] for r in rows} == {"2024-01-02"}
    # A predicate without an Arrow form is not pushed.
    _, _, applied = src.with_pushdown(None, Pred(None, {"id"}))
    assert not applied
    # ... but given to the constructor it is evaluated after the scan.
    post = ParquetSource(str(parquet_dir), columns=["id"],
                         filter=Pred(None, {"x"}, lambda b: pc.equal(b.column("x"), 49.5)))
    assert sorted(r["id"] for r in read_all(post)) == [99, 199, 1099, 1199]


def test_parquet_single_file_glob_and_errors(parquet_dir, tmp_path):
    one = str(parquet_dir / "day=2024-01-01" / "part-0.parquet")
    assert len(read_all(ParquetSource(one))) == 100
    assert len(read_all(ParquetSource(f"{parquet_dir}/*/part-1.parquet"))) == 200
    with pytest.raises(StorageNotFoundError):
        ParquetSource(str(tmp_path / "missing")).plan_splits(2)
    from millstream.errors import SchemaError
    with pytest.raises(SchemaError, match="nope"):
        ParquetSource(one).with_pushdown(["nope"], None)


# ----------------------------------------------------------------------------------------
# Recovery internals and shipping sources to workers
# ----------------------------------------------------------------------------------------

def test_bad_line_search_does_not_trust_the_prescreen():
    import pyarrow.csv as pacsv

    from millstream.io.files.badrecords import parse_with_recovery
    from millstream.io.files.csv import fast_nonempty_lines

    data = b"".join(b"%d,x\n" % i if i % 7 else b"%d\n" % i for i in range(1, 60))
    options = pacsv.ReadOptions(column_names=["a", "b"])

    def parse(buf):
        return pacsv.read_csv(pa.BufferReader(buf), read_options=options)

    results = []
    for prescreen in (None, lambda line: True, lambda line: False,
                      lambda line: line.endswith(b"x")):  # flags exactly the good lines
        bad: list[int] = []
        tables = parse_with_recovery(data, parse, lambda lo, hi, why, bad=bad: bad.append(lo),
                                     expected_rows=fast_nonempty_lines, prescreen=prescreen)
        rows = pa.concat_tables(tables).column("a").to_pylist()
        results.append((rows, bad))
    assert all(r == results[0] for r in results)
    assert results[0][0] == [i for i in range(1, 60) if i % 7]
    assert [data[lo:].split(b"\n")[0] for lo in results[0][1]] == [b"%d" % i
                                                                   for i in range(7, 60, 7)]


def test_sources_shipped_before_planning(tmp_path):
    import pickle

    path = write(str(tmp_path / "n.jsonl"), '{"a":1,"x":null}\n{"a":2,"x":7}\n')
    driver = JsonSource(path, infer_bytes=10)
    worker = pickle.loads(pickle.dumps(driver))  # shipped before the driver planned
    splits = driver.plan_splits(2)
    rows = [r for s in splits for b in worker.read_split(s, TaskContext()) for r in b.to_pylist()]
    assert rows == [{"a": 1, "x": None}, {"a": 2, "x": "7"}]


def test_parquet_source_pickles_after_planning(parquet_dir):
    import pickle

    src = ParquetSource(str(parquet_dir), columns=["id"])
    splits = src.plan_splits(2)
    copy = pickle.loads(pickle.dumps(src))
    assert copy._dataset is None
    assert sum(b.num_rows for s in splits for b in copy.read_split(s, TaskContext())) == 400


def test_parquet_scan_resumes_after_transient_error(fast_retries):
    from millstream.io.files.parquet_read import resumable

    fs, _ = msfs.resolve("memory://resume/x")
    batches = [pa.record_batch({"a": list(range(i * 3, i * 3 + 3))}) for i in range(4)]
    failures = [2, 3]  # fail after two batches, then (on the retry) after three

    def make():
        fail_at = failures.pop(0) if failures else None
        for i, b in enumerate(batches):
            if i == fail_at:
                raise OSError("AWS Error NETWORK_CONNECTION during GetObject: connection reset")
            yield b

    out = [v for b in resumable(fs, make, "reading x") for v in b.column("a").to_pylist()]
    assert out == list(range(12))


def test_csv_and_json_gzip(tmp_path):
    csv_path = str(tmp_path / "a.csv.gz")
    with gzip.open(csv_path, "wt") as f:
        f.write("a,b\n" + "".join(f"{i},x{i}\n" for i in range(1000)))
    src = CsvSource(csv_path, split_size=100)
    assert len(src.plan_splits(4)) == 1
    assert [r["a"] for r in read_all(src)] == list(range(1000))
    json_path = str(tmp_path / "a.jsonl.gz")
    with gzip.open(json_path, "wt") as f:
        f.write("".join(json.dumps({"a": i}) + "\n" for i in range(1000)) + "{bad\n")
    with pytest.raises(BadRecordError, match=r"a\.jsonl\.gz, line 1001"):
        read_all(JsonSource(json_path))


def test_string_view_columns_read_as_strings(tmp_path):
    """Files and frames with string_view columns (Polars, tpchgen) sort, group and join."""
    t = pa.table({"k": pa.array(["b", "a", "b", None], pa.string_view()),
                  "v": [1, 2, 3, 4]})
    pq.write_table(t, tmp_path / "v.parquet")
    import millstream as ms

    for ds in (ms.read_parquet(str(tmp_path / "v.parquet")), ms.from_arrow(t)):
        assert ds.schema.field("k").type == pa.string()
        assert ds.sort("k").collect()[1:] == [{"k": "a", "v": 2}, {"k": "b", "v": 1},
                                              {"k": "b", "v": 3}]
        assert sorted(ds.group_by("k").agg(ms.sum("v").alias("s")).collect(),
                      key=lambda r: (r["k"] is None, r["k"] or "")) == \
            [{"k": "a", "s": 2}, {"k": "b", "s": 4}, {"k": None, "s": 4}]
        assert ds.join(ds.select("k"), on="k").count() == 5
