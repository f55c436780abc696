"""Bad data never passes silently: undecodable text, files of another format, broken or
drifting Parquet/CSV/JSON files, unknown on_bad_records values, map_batches results that
are no table, and dead letters written exactly once by streaming jobs."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import millstream as ms
from millstream.errors import (
    BadRecordError,
    PlanError,
    SchemaError,
    StorageError,
    TaskError,
    UserFunctionError,
)
from millstream.io.files.stream_sink import FileStreamSink
from millstream.testing import crash_and_restore


def _dead_letters(directory: Path) -> list[dict]:
    """Every committed dead letter of a directory (staging excluded)."""
    return [json.loads(line) for f in sorted(directory.glob("*.jsonl"))
            for line in f.read_text(encoding="utf-8").splitlines()]


def _ids(out: Path) -> list[int]:
    """The ids a FileStreamSink committed."""
    return [i for f in sorted(out.glob("*.parquet")) for i in pq.read_table(f)["id"].to_pylist()]


def _wait(cond, timeout: float = 30.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


# ----------------------------------------------------------------------------- encodings

JSON_BAD_UTF8 = b'{"a": 1, "s": "ok"}\n{"a": 2, "s": "bad \xff\xfe here"}\n{"a": 3, "s": "fine"}\n'
CSV_BAD_UTF8 = b"a,s\n1,ok\n2,bad \xff here\n3,fine\n"


def test_invalid_utf8_in_json_is_a_bad_record_naming_file_line_and_offset(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(JSON_BAD_UTF8)
    ds = ms.read_json(str(path))
    for action in (ds.count, ds.collect, lambda: ds.write_parquet(str(tmp_path / "out"))):
        with pytest.raises(BadRecordError) as info:
            action()
        err = info.value
        assert (err.path, err.line, err.offset) == (str(path), 2, 20)
        assert "invalid UTF-8" in str(err) and "encoding_errors" in str(err)
    assert not (tmp_path / "out").exists()
    assert ms.read_json(str(path), on_bad_records="skip").collect() == [
        {"a": 1, "s": "ok"}, {"a": 3, "s": "fine"}]
    dead = tmp_path / "dead"
    assert ms.read_json(str(path), on_bad_records=str(dead)).count() == 2
    [letter] = _dead_letters(dead)
    assert (letter["line"], letter["offset"]) == (2, 20)
    assert "invalid UTF-8" in letter["reason"]


def test_invalid_utf8_in_csv_is_not_a_binary_column(tmp_path):
    path = tmp_path / "x.csv"
    path.write_bytes(CSV_BAD_UTF8)
    ds = ms.read_csv(str(path))
    assert ds.schema.field("s").type == pa.string()
    with pytest.raises(BadRecordError) as info:
        ds.collect()
    assert (info.value.line, info.value.offset) == (3, 9)
    assert [r["a"] for r in ms.read_csv(str(path), on_bad_records="skip").collect()] == [1, 3]
    multiline = ms.read_csv(str(path), multiline=True)
    with pytest.raises(BadRecordError, match=r"x\.csv, line 3 \(byte offset 15\)"):
        multiline.collect()


@pytest.mark.parametrize("reader", ["csv", "json", "text"])
def test_encoding_errors_replace_and_ignore(reader, tmp_path):
    data = {"csv": CSV_BAD_UTF8, "json": JSON_BAD_UTF8,
            "text": b"ok\nbad \xff here\nfine\n"}[reader]
    path = tmp_path / f"x.{reader}"
    path.write_bytes(data)
    read = getattr(ms, f"read_{reader}")
    column = "text" if reader == "text" else "s"
    replaced = [r[column] for r in read(str(path), encoding_errors="replace").collect()]
    ignored = [r[column] for r in read(str(path), encoding_errors="ignore").collect()]
    assert len(replaced) == 3 and "\ufffd" in replaced[1] and "bad" in replaced[1]
    assert ignored[1] == "bad  here"
    if reader == "csv":
        assert ms.read_csv(str(path), multiline=True, encoding_errors="ignore").collect()[1] \
            == {"a": 2, "s": "bad  here"}
    with pytest.raises(PlanError, match="encoding_errors must be one of"):
        read(str(path), encoding_errors="surrogateescape")


def test_latin1_input_is_transcoded(tmp_path):
    csv_path = tmp_path / "l.csv"
    csv_path.write_bytes("name,city\nJos\xe9,K\xf6ln\nZo\xeb,Sm\xe5land\n".encode("latin-1"))
    json_path = tmp_path / "l.jsonl"
    json_path.write_bytes('{"name": "Jos\xe9"}\n{"name": "Zo\xeb"}\n'.encode("latin-1"))
    assert ms.read_csv(str(csv_path), encoding="latin-1").collect() == [
        {"name": "José", "city": "Köln"}, {"name": "Zoë", "city": "Småland"}]
    assert ms.read_csv(str(csv_path), encoding="latin-1", multiline=True).collect()[1] == {
        "name": "Zoë", "city": "Småland"}
    assert [r["name"] for r in ms.read_json(str(json_path), encoding="latin-1").collect()] == [
        "José", "Zoë"]
    with pytest.raises(BadRecordError, match="line 2"):  # read as UTF-8 it does not decode
        ms.read_csv(str(csv_path)).collect()


def test_bad_lines_in_a_large_file_are_found_in_every_split(tmp_path):
    lines = [json.dumps({"id": i, "s": f"v{i}"}).encode() for i in range(20_000)]
    bad = {123, 9_999, 19_998}
    for i in bad:
        lines[i] = f'{{"id": {i}, "s": "x\xff"}}'.encode("latin-1")
    path = tmp_path / "big.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    dead = tmp_path / "dead"
    ds = ms.read_json(str(path), on_bad_records=str(dead), split_size=64 << 10,
                      block_size=16 << 10)
    assert ds.count() == 20_000 - len(bad)
    letters = _dead_letters(dead)
    assert sorted(r["line"] for r in letters) == sorted(i + 1 for i in bad)
    starts = {i + 1: sum(len(x) + 1 for x in lines[:i]) for i in bad}
    assert {r["line"]: r["offset"] for r in letters} == starts


# ------------------------------------------------------------------ formats and schemas

def _mixed(tmp_path: Path) -> Path:
    d = tmp_path / "mixed"
    d.mkdir()
    (d / "a.csv").write_text("x,y\n1,2\n3,4\n")
    pq.write_table(pa.table({"x": [5], "y": [6]}), d / "b.parquet")
    return d


def test_a_directory_of_mixed_formats_is_refused_naming_the_other_files(tmp_path):
    d = _mixed(tmp_path)
    with pytest.raises(PlanError, match=r"b\.parquet \(Parquet\).*\*\.csv"):
        ms.read_csv(str(d)).collect()
    with pytest.raises(PlanError, match=r"a\.csv \(CSV\).*\*\.parquet"):
        ms.read_parquet(str(d)).collect()
    with pytest.raises(PlanError, match=r"b\.parquet"):
        ms.read_text(str(d)).collect()
    # a glob that selects one format, or a file named explicitly, reads fine
    assert ms.read_csv(str(d / "*.csv")).count() == 2
    assert ms.read_parquet(str(d / "*.parquet")).collect() == [{"x": 5, "y": 6}]
    assert len(ms.read_text(str(d / "a.csv")).collect()) == 3
    (d / "c.txt").write_text("x,y\n7,8\n")  # plain text and names without extension: CSV
    (d / "part-00000").write_text("x,y\n9,10\n")
    assert ms.read_csv(str(d / "[ac]*")).count() == 3
    assert ms.read_csv(str(d / "part-*")).count() == 1
    job = ms.read_csv(str(d), watch=True, poll_interval="10ms").start(checkpoint_interval=0)
    with pytest.raises(PlanError, match=r"watch=True\): .*b\.parquet"):
        job.await_termination(20)


def test_truncated_or_foreign_parquet_is_a_storage_error_at_planning(tmp_path):
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"x": list(range(100)), "y": ["a"] * 100}), good)
    d = tmp_path / "d"
    d.mkdir()
    data = good.read_bytes()
    (d / "1.parquet").write_bytes(data)
    (d / "2.parquet").write_bytes(data[: len(data) // 2])
    (tmp_path / "part-0").write_text("x,y\n1,2\n")  # not Parquet, no extension to tell
    for uri, name in ((d, "2.parquet"), (tmp_path / "part-0", "part-0")):
        with pytest.raises(StorageError, match=rf"{name} \(\d+ bytes\) is not a readable "
                                               rf"Parquet file") as info:
            ms.read_parquet(str(uri)).collect()
        assert not isinstance(info.value, TaskError)
    with pytest.raises(StorageError, match="truncated"):
        ms.read_parquet(str(d)).count()


def _drift(tmp_path: Path) -> Path:
    d = tmp_path / "drift"
    d.mkdir()
    pq.write_table(pa.table({"x": pa.array([1, 2], pa.int64()), "y": ["a", "b"]}), d / "p1.parquet")
    pq.write_table(pa.table({"x": [1.5], "z": [True]}), d / "p2.parquet")
    pq.write_table(pa.table({"x": pa.array([7], pa.int32()), "y": ["c"]}), d / "p3.parquet")
    return d


def test_parquet_files_with_different_schemas_are_a_schema_error_naming_them(tmp_path):
    d = _drift(tmp_path)
    with pytest.raises(SchemaError) as info:
        ms.read_parquet(str(d)).collect()
    text = str(info.value)
    assert "column 'x' is double in" in text and "p2.parquet" in text
    assert "column 'y' is missing from" in text and "column 'z'" in text
    assert "union_by_name=True" in text
    assert "p3.parquet" not in text  # int32 widens into int64 without loss
    # the columns read are what must agree
    assert sorted(r["y"] or "" for r in ms.read_parquet(str(d / "p[13].parquet"),
                                                        columns=["y"]).collect()) == ["a", "b", "c"]


def test_parquet_union_by_name(tmp_path):
    d = _drift(tmp_path)
    rows = ms.read_parquet(str(d), union_by_name=True).collect()
    assert sorted(rows, key=lambda r: r["x"]) == [
        {"x": 1.0, "y": "a", "z": None}, {"x": 1.5, "y": None, "z": True},
        {"x": 2.0, "y": "b", "z": None}, {"x": 7.0, "y": "c", "z": None}]
    assert ms.read_parquet(str(d), union_by_name=True).schema.field("x").type == pa.float64()
    pq.write_table(pa.table({"x": ["text"]}), d / "p4.parquet")
    with pytest.raises(SchemaError, match=r"column 'x' has types that cannot be unified: "
                                          r"int64 in .*p1\.parquet.*string in .*p4\.parquet"):
        ms.read_parquet(str(d), union_by_name=True).collect()


def test_csv_headers_must_agree_unless_union_by_name(tmp_path):
    d = tmp_path / "csv"
    d.mkdir()
    (d / "a.csv").write_text("id,name\n1,x\n2,y\n")
    (d / "b.csv").write_text("name,id,extra\nz,3,true\n")
    with pytest.raises(SchemaError, match=r"b\.csv has \['name', 'id', 'extra'\]"):
        ms.read_csv(str(d)).collect()
    ds = ms.read_csv(str(d), union_by_name=True, split_size=8)
    assert ds.schema == pa.schema([("id", pa.int64()), ("name", pa.string()),
                                   ("extra", pa.bool_())])
    assert sorted(ds.collect(), key=lambda r: r["id"]) == [
        {"id": 1, "name": "x", "extra": None}, {"id": 2, "name": "y", "extra": None},
        {"id": 3, "name": "z", "extra": True}]
    assert sorted(r["extra"] is True for r in ds.select("extra").collect()) == [False, False, True]
    (d / "c.csv").write_text("id\nnot-a-number\n")
    with pytest.raises(SchemaError, match=r"column 'id' .*int64 in .*a\.csv.*string in .*c\.csv"):
        ms.read_csv(str(d), union_by_name=True).collect()


def test_json_union_by_name_sees_fields_of_every_file(tmp_path):
    d = tmp_path / "json"
    d.mkdir()
    (d / "a.jsonl").write_text("".join(json.dumps({"id": i}) + "\n" for i in range(3)))
    (d / "b.jsonl").write_text('{"id": 3.5, "tag": "new"}\n')
    assert ms.read_json(str(d), infer_bytes=10).columns == ["id"]  # the first file's fields
    rows = ms.read_json(str(d), union_by_name=True, infer_bytes=10).collect()
    assert sorted(rows, key=lambda r: r["id"]) == [
        {"id": 0.0, "tag": None}, {"id": 1.0, "tag": None}, {"id": 2.0, "tag": None},
        {"id": 3.5, "tag": "new"}]
    (d / "c.jsonl").write_text('{"id": "three"}\n')
    with pytest.raises(SchemaError, match=r"column 'id'.*c\.jsonl"):
        ms.read_json(str(d), union_by_name=True, infer_bytes=10).collect()


# ------------------------------------------------------------------------ on_bad_records

def test_unknown_on_bad_records_values_are_errors_listing_the_allowed_ones(tmp_path,
                                                                         monkeypatch):
    path = tmp_path / "x.csv"
    path.write_text("a\n1\n")
    for value, hint in (("ignore", 'pass "skip"'), ("drop", 'pass "skip"'),
                        ("Skip", 'lower case: "skip"'), ("failfast", 'pass "error"'),
                        ("bad", "./bad"), (3, "")):
        with pytest.raises(PlanError, match='"error".*"skip".*"/".*ms.dead_letter') as info:
            ms.read_csv(str(path), on_bad_records=value)
        assert hint in str(info.value)
    with pytest.raises(PlanError, match="on_bad_records"):
        ms.read_json(str(tmp_path), watch=True, on_bad_records="ignore")
    from millstream.io.kafka import KafkaSource

    with pytest.raises(PlanError, match="on_bad_records"):
        KafkaSource("t", "127.0.0.1:1", options={"on_bad_records": "ignore"})
    assert not (tmp_path / "ignore").exists()
    # the dead-letter forms
    (tmp_path / "y.csv").write_text("a,b\n1,2\n3\n")
    monkeypatch.chdir(tmp_path)
    for where, directory in (("./rel", "rel"), (Path("p"), "p"), (ms.dead_letter("d"), "d"),
                             (str(tmp_path / "abs"), "abs")):
        assert ms.read_csv("y.csv", on_bad_records=where).count() == 1
        assert [r["line"] for r in _dead_letters(tmp_path / directory)] == [3]


# ------------------------------------------------------------------------- map_batches

def _three(table):
    return [1, 2, 3]


@pytest.mark.parametrize("fn,what", [
    (_three, r"_three .*returned a list of 3 values that are not all rows.*int 1"),
    (lambda t: None, r"returned None"),
    (lambda t: {"n": t.num_rows}, r"column 'n' is a int 1000, not a list"),
    (lambda t: {"a": [1, 2], "b": [1]}, r"different lengths: a: 2, b: 1"),
    (lambda t: t.to_pandas()["id"], r"returned a pandas Series"),
    (lambda t: 42, r"returned a int 42"),
])
def test_map_batches_results_that_are_no_table_are_user_function_errors(fn, what):
    with pytest.raises(UserFunctionError, match=what) as info:
        ms.range(1000, num_partitions=1).map_batches(fn).count()
    assert "accepted: a pyarrow Table/RecordBatch" in str(info.value)
    assert len(info.value.attempts) == 1  # it would fail the same way again


def test_map_batches_may_change_the_number_of_rows():
    ds = ms.range(1000, num_partitions=2)
    assert ds.map_batches(lambda t: t.slice(0, 3)).count() == 6
    assert ds.map_batches(lambda t: [{"n": t.num_rows}]).collect() == [{"n": 500}, {"n": 500}]
    assert ds.map_batches(lambda t: {"n": [t.num_rows]}).count() == 2
    assert ds.map_batches(lambda t: t.slice(0, 0)).collect() == []
    assert ds.map_batches(lambda t: t.slice(0, 0)).schema == pa.schema([("id", pa.int64())])


# ------------------------------------------------------------ streaming dead letters

def _malformed_file(directory: Path, n: int = 3000, every: int = 10, pad: int = 0) -> set[int]:
    """``n`` JSON lines, every ``every``-th one (300 of 3000) malformed (and ``pad`` bytes
    longer); their line numbers."""
    lines, bad = [], set()
    for i in range(n):
        if i % every == 7 % every:
            lines.append(f'{{"id": {i}, broken{"." * pad}\n')
            bad.add(i + 1)
        else:
            lines.append(json.dumps({"id": i}) + "\n")
    tmp = directory / ".a.json.tmp"
    tmp.write_text("".join(lines))
    os.replace(tmp, directory / "a.json")
    return bad


def _slowly(table):
    time.sleep(0.01)
    return table


@pytest.mark.parametrize("executor", ["inline", "parallel"])
def test_dead_letters_of_a_stopped_and_resumed_stream_are_written_exactly_once(executor,
                                                                              tmp_path):
    src, out, dead, chk = tmp_path / "in", tmp_path / "out", tmp_path / "dead", tmp_path / "chk"
    src.mkdir()
    bad = _malformed_file(src)
    ds = ms.read_json(str(src), watch=True, poll_interval="20ms", on_bad_records=str(dead),
                      schema=pa.schema([("id", pa.int64())]), block_size=4096)
    ds = ds.map_batches(_slowly)  # so that a stop lands in the middle of the file

    def start():
        return ds.start(checkpoint=str(chk), checkpoint_interval="30ms", executor=executor,
                        sink=FileStreamSink(str(out)), max_batch_records=100)

    first = start()
    try:
        assert _wait(lambda: first.metrics()["records_in"] >= 900)
    finally:
        first.stop()
    assert first.metrics()["records_in"] < 2700, "the first run read everything"
    assert 0 < len(_dead_letters(dead)) < len(bad)
    rest = 3000 - len(bad) - first.metrics()["records_in"]  # (stop checkpoints what was read)
    second = start()
    try:
        assert _wait(lambda: second.metrics()["records_in"] >= rest)
        time.sleep(0.2)  # a few more checkpoints: nothing more may appear
    finally:
        second.stop()
    letters = _dead_letters(dead)
    assert Counter(r["line"] for r in letters) == Counter(bad)  # each bad line once
    assert all(r["path"].endswith("a.json") and r["reason"] for r in letters)
    assert Counter(_ids(out)) == Counter(i for i in range(3000) if i + 1 not in bad)
    assert not list((dead / "_staging").glob("*")), "staged dead letters left behind"


@pytest.mark.parametrize("watch", [True, False])
@pytest.mark.parametrize("point", ["during_epoch", "before_checkpoint", "after_checkpoint",
                                   "after_commit"])
def test_dead_letters_exactly_once_across_crashes(point, watch, tmp_path):
    src, out, dead = tmp_path / "in", tmp_path / "out", tmp_path / "dead"
    src.mkdir()
    # dead letters long enough that a crashed run has written some of them out
    bad = _malformed_file(src, n=1000, every=10, pad=400)
    ds = ms.read_json(str(src) if watch else str(src / "a.json"), watch=watch,
                      on_bad_records=str(dead), schema=pa.schema([("id", pa.int64())]),
                      block_size=16384, **({"poll_interval": "10ms"} if watch else {}))
    crash_and_restore(ds, checkpoint=str(tmp_path / "chk"), sink=FileStreamSink(str(out)),
                      crash_epoch=12, point=point, checkpoint_interval=0,
                      max_batch_records=50, stop_at_end=True, executor="inline", timeout=30)
    assert Counter(r["line"] for r in _dead_letters(dead)) == Counter(bad)
    assert Counter(_ids(out)) == Counter(i for i in range(1000) if i + 1 not in bad)
