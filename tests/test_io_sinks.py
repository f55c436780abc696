"""File sinks: layout, modes, atomic commit, abort, partition_by, empty output, object stores."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from millstream.core.context import TaskContext
from millstream.errors import OutputExistsError, PlanError, SchemaError
from millstream.io import fs as msfs
from millstream.io.files.csv import CsvSource
from millstream.io.files.json import JsonSource
from millstream.io.files.json_encoding import encode_json_lines
from millstream.io.files.parquet import ParquetSource
from millstream.io.files.sinks import CsvSink, JsonSink, ParquetSink

DATA = pa.table({
    "day": ["mon", "tue", "mon", None, "tue", "mon"],
    "n": pa.array([1, 2, 3, 4, 5, 6], pa.int64()),
    "s": ["a", "b,c", 'q"uote', "é", None, "x\ny"],
})


def run_job(sink, parts: list[pa.Table], job_id: str = "job1", stage: int = 3,
            attempt: int = 0) -> list[list[str]]:
    """Drive a sink like the engine: prepare, one write per partition, commit."""
    sink.prepare(job_id)
    messages = []
    for p, table in enumerate(parts):
        ctx = TaskContext(job_id=job_id, stage_id=stage, partition=p, attempt=attempt)
        batches = table.to_batches(max_chunksize=2) or [
            pa.RecordBatch.from_pylist([], schema=table.schema)]  # a zero-row batch: the schema
        messages.append(sink.write_partition(iter(batches), ctx))
    sink.commit(messages)
    return messages


def listing(root) -> list[str]:
    out = []
    for dirpath, _, files in os.walk(root):
        out += [os.path.relpath(os.path.join(dirpath, f), root) for f in files]
    return sorted(out)


def read_rows(src) -> list[dict]:
    return [r for sp in src.plan_splits(4) for b in src.read_split(sp, TaskContext())
            for r in b.to_pylist()]


def test_parquet_sink_layout_and_roundtrip(tmp_path):
    out = tmp_path / "out"
    messages = run_job(ParquetSink(str(out)), [DATA.slice(0, 3), DATA.slice(3)])
    assert messages == [["attempt-s3-p0-a0/part-00000-job1.parquet"],
                        ["attempt-s3-p1-a0/part-00001-job1.parquet"]]
    assert listing(out) == ["_SUCCESS", "part-00000-job1.parquet", "part-00001-job1.parquet"]
    assert sorted(os.listdir(tmp_path)) == ["out"]  # staging removed, it was a sibling
    assert pq.read_metadata(out / "part-00000-job1.parquet").row_group(0).column(0) \
        .compression == "ZSTD"
    assert read_rows(ParquetSource(str(out))) == DATA.to_pylist()


def test_staging_is_a_sibling_not_under_target(tmp_path):
    out = tmp_path / "out"
    sink = ParquetSink(str(out))
    sink.prepare("jobX")
    assert sink.staging == str(tmp_path / ".out.staging-jobX")
    assert os.path.isdir(sink.staging) and not out.exists()
    sink.write_partition(iter(DATA.to_batches()), TaskContext(partition=0))
    assert not out.exists()  # nothing visible before commit
    sink.abort()
    assert sorted(os.listdir(tmp_path)) == []


def test_mode_error_overwrite_append(tmp_path):
    out = tmp_path / "out"
    run_job(ParquetSink(str(out)), [DATA], job_id="j1")
    with pytest.raises(OutputExistsError, match="already exists"):
        ParquetSink(str(out)).prepare("j2")
    run_job(ParquetSink(str(out), mode="append"), [DATA.slice(0, 2)], job_id="j2")
    assert listing(out) == ["_SUCCESS", "part-00000-j1.parquet", "part-00000-j2.parquet"]
    assert len(read_rows(ParquetSource(str(out)))) == 8
    run_job(ParquetSink(str(out), mode="overwrite"), [DATA.slice(0, 1)], job_id="j3")
    assert listing(out) == ["_SUCCESS", "part-00000-j3.parquet"]
    assert read_rows(ParquetSource(str(out))) == DATA.slice(0, 1).to_pylist()
    assert sorted(os.listdir(tmp_path)) == ["out"]
    # An existing empty directory is fine for mode="error".
    (tmp_path / "empty").mkdir()
    run_job(ParquetSink(str(tmp_path / "empty")), [DATA], job_id="j4")
    assert listing(tmp_path / "empty") == ["_SUCCESS", "part-00000-j4.parquet"]
    with pytest.raises(PlanError):
        ParquetSink(str(out), mode="upsert")


def test_abort_leaves_target_untouched(tmp_path):
    out = tmp_path / "out"
    run_job(ParquetSink(str(out)), [DATA], job_id="old")
    before = listing(out)
    sink = ParquetSink(str(out), mode="overwrite")
    sink.prepare("new")
    sink.write_partition(iter(DATA.to_batches()), TaskContext(partition=0))
    sink.abort()
    assert listing(out) == before and sorted(os.listdir(tmp_path)) == ["out"]
    fresh = tmp_path / "fresh"
    sink = JsonSink(str(fresh))
    sink.prepare("j")
    sink.write_partition(iter(DATA.to_batches()), TaskContext(partition=0))
    sink.abort()
    assert not fresh.exists() and sorted(os.listdir(tmp_path)) == ["out"]


def test_only_committed_attempts_are_published(tmp_path):
    out = tmp_path / "out"
    sink = ParquetSink(str(out))
    sink.prepare("j")
    lost = sink.write_partition(iter(DATA.slice(0, 1).to_batches()),
                                TaskContext(partition=0, attempt=0))
    won = sink.write_partition(iter(DATA.slice(0, 2).to_batches()),
                               TaskContext(partition=0, attempt=1))
    other = sink.write_partition(iter(DATA.slice(2).to_batches()), TaskContext(partition=1))
    assert lost != won
    sink.commit([won, other])
    assert listing(out) == ["_SUCCESS", "part-00000-j.parquet", "part-00001-j.parquet"]
    assert read_rows(ParquetSource(str(out))) == DATA.to_pylist()
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_partition_by_layout(tmp_path):
    out = tmp_path / "out"
    run_job(ParquetSink(str(out), partition_by="day"), [DATA.slice(0, 3), DATA.slice(3)])
    assert listing(out) == [
        "_SUCCESS",
        "day=__HIVE_DEFAULT_PARTITION__/part-00001-job1.parquet",
        "day=mon/part-00000-job1.parquet", "day=mon/part-00001-job1.parquet",
        "day=tue/part-00000-job1.parquet", "day=tue/part-00001-job1.parquet",
    ]
    assert pq.read_schema(out / "day=mon" / "part-00000-job1.parquet").names == ["n", "s"]
    rows = read_rows(ParquetSource(str(out)))
    assert sorted((r["n"], r["day"]) for r in rows) == sorted(
        zip(DATA["n"].to_pylist(), DATA["day"].to_pylist()))
    csv_out = tmp_path / "csv"
    run_job(CsvSink(str(csv_out), partition_by=["day"]), [DATA])
    # "x\ny" holds a line break: such CSV files must be read with multiline=True.
    rows = read_rows(CsvSource(str(csv_out), multiline=True))
    assert sorted((r["n"], r["day"], r["s"]) for r in rows if r["day"]) == [
        (1, "mon", "a"), (2, "tue", "b,c"), (3, "mon", 'q"uote'), (5, "tue", ""),
        (6, "mon", "x\ny")]
    assert [r["day"] for r in rows if r["n"] == 4] == [None]
    with pytest.raises(PlanError, match="_hidden"):
        ParquetSink(str(tmp_path / "x"), partition_by="_hidden")
    with pytest.raises(SchemaError, match="nope"):
        run_job(ParquetSink(str(tmp_path / "y"), partition_by="nope"), [DATA])


def test_many_partitions_roll_over_open_files(tmp_path):
    out = tmp_path / "out"
    table = pa.table({"k": [i % 5 for i in range(50)], "v": list(range(50))})
    run_job(ParquetSink(str(out), partition_by="k", max_open_files=2), [table])
    files = listing(out)
    assert "k=0/part-00000-job1.parquet" in files and "k=0/part-00000-job1-c1.parquet" in files
    rows = read_rows(ParquetSource(str(out)))
    assert sorted(r["v"] for r in rows) == list(range(50))
    assert all(r["k"] == r["v"] % 5 for r in rows)


def test_empty_output(tmp_path):
    schema = pa.schema([("a", pa.int64()), ("b", pa.string())])
    empty = pa.Table.from_batches([], schema)
    out = tmp_path / "pq"
    run_job(ParquetSink(str(out)), [empty, empty])
    assert listing(out) == ["_SUCCESS", "part-00000-job1.parquet"]
    assert pq.read_schema(out / "part-00000-job1.parquet") == schema
    src = ParquetSource(str(out))
    assert src.schema() == schema and read_rows(src) == []
    jout = tmp_path / "json"
    run_job(JsonSink(str(jout)), [])
    assert listing(jout) == ["_SUCCESS"]
    # A schema given to the sink is enough even when no batch arrives at all.
    sout = tmp_path / "schema"
    sink = ParquetSink(str(sout), schema=schema)
    sink.prepare("j")
    sink.commit([sink.write_partition(iter([]), TaskContext())])
    assert pq.read_schema(sout / "part-00000-j.parquet") == schema
    # Empty partitions next to non-empty ones write no files.
    mixed = tmp_path / "mixed"
    run_job(ParquetSink(str(mixed)), [empty, DATA, empty])
    assert listing(mixed) == ["_SUCCESS", "part-00001-job1.parquet"]


def test_csv_and_json_sinks_roundtrip(tmp_path):
    flat = DATA.drop_columns(["s"]).append_column("s", pa.array(["a", "b,c", 'q"uote', "é",
                                                                  None, "z"]))
    run_job(CsvSink(str(tmp_path / "csv")), [flat.slice(0, 4), flat.slice(4)])
    assert listing(tmp_path / "csv") == ["_SUCCESS", "part-00000-job1.csv",
                                         "part-00001-job1.csv"]
    rows = read_rows(CsvSource(str(tmp_path / "csv")))
    assert [r["n"] for r in rows] == [1, 2, 3, 4, 5, 6] and rows[2]["s"] == 'q"uote'
    run_job(JsonSink(str(tmp_path / "json")), [DATA])
    assert listing(tmp_path / "json") == ["_SUCCESS", "part-00000-job1.json"]
    assert read_rows(JsonSource(str(tmp_path / "json"))) == DATA.to_pylist()
    nested = pa.table({"l": [[1, 2], None], "m": [{"x": 1.0}, {"x": None}]})
    with pytest.raises(SchemaError, match="nested"):
        run_job(CsvSink(str(tmp_path / "nested")), [nested])


def test_encode_json_lines_matches_json_module():
    import datetime
    table = pa.table({
        "i": [1, None], "f": [1.0, float("nan")], "g": [2.5e20, -0.0], "b": [True, None],
        "s": ['he said "hi"\\\n\t', "\x01ctl"], "d": [datetime.date(2024, 1, 2), None],
        "l": [[1, 2], []], "st": [{"a": "x"}, None], "bin": [b"\x00\xff", None],
        "dict": pa.array(["u", "v"]).dictionary_encode(),
    })
    lines = encode_json_lines(table).to_pybytes().decode().splitlines()
    assert [json.loads(x) for x in lines] == [
        {"i": 1, "f": 1.0, "g": 2.5e20, "b": True, "s": 'he said "hi"\\\n\t', "d": "2024-01-02",
         "l": [1, 2], "st": {"a": "x"}, "bin": "AP8=", "dict": "u"},
        {"i": None, "f": None, "g": -0.0, "b": None, "s": "\x01ctl", "d": None, "l": [],
         "st": None, "bin": None, "dict": "v"},
    ]
    assert lines[0].startswith('{"i":1,"f":1.0,')


def test_object_store_commit_by_copy(monkeypatch):
    """memory:// (fsspec) has no atomic rename: files are copied, _SUCCESS comes last."""
    uri = "memory://sinkbucket/tables/t1"
    fs, root = msfs.resolve(uri)
    seen = []
    real_write_bytes = msfs.write_bytes

    def spy(fs_, path, data):
        if path.endswith("_SUCCESS"):
            seen.append(sorted(e.path for e in msfs.list_dir(fs_, root, recursive=True)
                               if e.type.name == "File"))
        return real_write_bytes(fs_, path, data)

    monkeypatch.setattr(msfs, "write_bytes", spy)
    run_job(ParquetSink(uri, partition_by="day"), [DATA.slice(0, 3), DATA.slice(3)], job_id="a")
    assert len(seen) == 1 and len(seen[0]) == 5  # every data file was there before _SUCCESS
    assert read_rows(ParquetSource(uri)) and msfs.exists(fs, f"{root}/_SUCCESS")
    run_job(ParquetSink(uri, mode="overwrite"), [DATA.slice(0, 2)], job_id="b")
    names = sorted(e.path[len(root) + 1:] for e in msfs.list_dir(fs, root, recursive=True)
                   if e.type.name == "File")
    assert names == ["_SUCCESS", "part-00000-b.parquet"]
    assert read_rows(ParquetSource(uri)) == DATA.slice(0, 2).to_pylist()
    staging = [e.path for e in msfs.list_dir(fs, "/sinkbucket/tables") if "staging" in e.path]
    assert staging == []
    with pytest.raises(OutputExistsError):
        ParquetSink(uri).prepare("c")
