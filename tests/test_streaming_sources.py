"""Streaming sources and sinks: directory watch (exactly once, across restores, partial
files, errors) and a transactional Kafka sink in a streaming job with a crash."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from services.kafka import kafka_missing
from streams import read_ids as _read_ids
from streams import wait_until as _wait

import millstream as ms
from millstream.errors import PlanError, SimulatedCrash, StorageNotFoundError
from millstream.io.files.stream_sink import FileStreamSink
from millstream.io.files.watch import WatchSource
from millstream.runtime.checkpoint import CheckpointStore
from millstream.testing import CollectingSink


def _write_json(directory: Path, name: str, ids: range, atomic: bool = True) -> None:
    """Write rows {id, k, ts} as JSON lines; atomic: under a hidden name, then renamed."""
    text = "".join(json.dumps({"id": i, "k": f"k{i % 3}", "ts": i * 1000}) + "\n" for i in ids)
    target = directory / name
    if atomic:
        tmp = directory / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, target)
    else:
        target.write_text(text)


def _watch(directory: Path, **options) -> ms.Dataset:
    return ms.read_json(str(directory), watch=True, poll_interval="20ms", **options)


def test_files_added_while_running_are_processed_exactly_once(executor, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    _write_json(src, "a.json", range(0, 50))
    _write_json(src, "_ignored.json", range(1000, 1010))
    job = _watch(src).select("id", "k").start(
        checkpoint=str(tmp_path / "chk"), checkpoint_interval="20ms",
        sink=FileStreamSink(str(out)), max_batch_records=16, executor=executor)
    try:
        assert _wait(lambda: len(_read_ids(out)) == 50)
        _write_json(src, "b.json", range(50, 120))
        (src / "sub").mkdir()
        _write_json(src / "sub", "c.json", range(120, 130))
        _write_json(src, ".hidden.json", range(2000, 2010))
        assert _wait(lambda: len(_read_ids(out)) == 130)
    finally:
        job.stop()
    assert Counter(_read_ids(out)) == Counter(range(130))
    position = job.metrics()["positions"][("_Stream", 0)]
    assert position["done"] == ("a.json", "b.json", "sub/c.json")
    assert position["current"] is None


def _checkpointed(chk: str, name: str) -> bool:
    """Whether the newest complete checkpoint under ``chk`` has read file ``name`` whole."""
    latest = CheckpointStore(chk).latest()
    return latest is not None and any(name in (pos or {}).get("done", ())
                                      for pos in latest[1]["positions"].values())


@pytest.mark.parametrize("point", ["during_epoch", "before_checkpoint", "after_checkpoint",
                                   "after_commit"])
def test_crash_and_restore_keeps_exactly_once(point, executor, tmp_path):
    src, out, chk = tmp_path / "in", tmp_path / "out", str(tmp_path / "chk")
    src.mkdir()
    for n in range(3):
        _write_json(src, f"f{n}.json", range(n * 40, n * 40 + 40))
    first = _watch(src).select("id").start(
        checkpoint=chk, sink=FileStreamSink(str(out)), checkpoint_interval=0,
        max_batch_records=15, _fault=(2, point), executor=executor)
    # more files once the first ones are checkpointed (or the job crashed on them): epoch 2
    # has rows to read even where the source read the first files in one epoch
    assert _wait(lambda: not first.is_active or _checkpointed(chk, "f2.json"), 20)
    for n in range(3, 5):
        _write_json(src, f"f{n}.json", range(n * 40, n * 40 + 40))
    with pytest.raises(SimulatedCrash):
        first.await_termination(20)
    second = _watch(src).select("id").start(
        checkpoint=chk, sink=FileStreamSink(str(out)), checkpoint_interval=0,
        max_batch_records=15, stop_at_end=True, executor=executor)
    assert second.await_termination(20)
    assert second.metrics()["restored_from_epoch"] is not None
    assert Counter(_read_ids(out)) == Counter(range(200))


@pytest.mark.executor_gap(
    "parallel", "the crash must come while a.json is half read, but the parallel source task "
    "reads a file's batches ahead of the checkpoint barriers: whether epoch 2 starts inside "
    "the file depends on speed")
def test_files_added_between_crash_and_restart(executor, tmp_path):
    src, out, chk = tmp_path / "in", tmp_path / "out", str(tmp_path / "chk")
    src.mkdir()
    _write_json(src, "a.json", range(0, 60))
    ds = _watch(src).select("id")
    first = ds.start(checkpoint=chk, sink=FileStreamSink(str(out)), checkpoint_interval=0,
                     max_batch_records=25, _fault=(2, "during_epoch"), executor=executor)
    with pytest.raises(SimulatedCrash):
        first.await_termination(20)
    assert first.metrics()["positions"][("_Stream", 0)]["current"][0] == "a.json"
    _write_json(src, "b.json", range(60, 100))
    second = ds.start(checkpoint=chk, sink=FileStreamSink(str(out)), checkpoint_interval=0,
                      max_batch_records=25, stop_at_end=True, executor=executor)
    assert second.await_termination(20)
    assert second.metrics()["restored_from_epoch"] == 1
    assert Counter(_read_ids(out)) == Counter(range(100))


def test_event_time_windows_match_the_batch_result(executor, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for n in range(4):
        _write_json(src, f"f{n}.json", range(n * 70, n * 70 + 70))

    def windows(ds: ms.Dataset) -> ms.Dataset:
        return (ds.with_watermark("ts", "1m").group_by("k").window(ms.tumbling("1m"))
                .agg(ms.count().alias("n"), ms.sum("id").alias("ids")))

    batch = windows(ms.read_json(str(src))).collect()
    job = windows(_watch(src)).start(checkpoint_interval=0, stop_at_end=True,
                                     max_batch_records=30, executor=executor)
    assert job.await_termination(20)
    key = lambda r: (r["k"], r["window_start"])  # noqa: E731
    assert sorted(job.sink.rows(), key=key) == sorted(batch, key=key)
    assert sum(r["n"] for r in batch) == 280


def test_partially_written_files_are_not_read_early(executor, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    job = ms.read_json(str(src), watch=True, poll_interval="150ms").select("id").start(
        sink=CollectingSink(), checkpoint_interval="20ms", executor=executor)
    try:
        path = src / "growing.json"
        with path.open("w") as f:  # a writer appending more often than poll_interval
            for i in range(40):
                f.write(json.dumps({"id": i, "k": "a", "ts": i}) + "\n")
                f.flush()
                time.sleep(0.02)
            f.write('{"id": 40, "k": "a", ')  # half a record, completed soon after
            f.flush()
            time.sleep(0.03)
            f.write('"ts": 40}\n')
        assert job.metrics()["records_in"] == 0, "the file was read while being written"
        assert _wait(lambda: len(job.sink.rows()) == 41)
    finally:
        job.stop()
    assert sorted(r["id"] for r in job.sink.rows()) == list(range(41))


def test_csv_text_and_parquet_directories(executor, tmp_path):
    for fmt in ("csv", "text", "parquet"):
        d = tmp_path / fmt
        d.mkdir()
    (tmp_path / "csv" / "a.csv").write_text("id,name\n1,x\n2,y\n")
    (tmp_path / "text" / "a.txt").write_text("one\ntwo\nthree\n")
    pq.write_table(pa.table({"id": [1, 2, 3, 4], "v": [1.0, 2.0, 3.0, 4.0]}),
                   tmp_path / "parquet" / "a.parquet")
    opts = {"watch": True, "poll_interval": "10ms"}
    runs = {"csv": ms.read_csv(str(tmp_path / "csv"), **opts),
            "text": ms.read_text(str(tmp_path / "text"), **opts),
            "parquet": ms.read_parquet(str(tmp_path / "parquet"), columns=["id"], **opts)}
    got = {}
    for fmt, ds in runs.items():
        job = ds.start(checkpoint_interval=0, stop_at_end=True, executor=executor)
        assert job.await_termination(20)
        got[fmt] = job.sink.rows()
    assert got["csv"] == [{"id": 1, "name": "x"}, {"id": 2, "name": "y"}]
    assert [r["text"] for r in got["text"]] == ["one", "two", "three"]
    assert got["parquet"] == [{"id": i} for i in (1, 2, 3, 4)]


def test_errors_are_clear(executor, tmp_path):
    with pytest.raises(PlanError, match="unknown format 'xml'"):
        WatchSource("xml", str(tmp_path))
    with pytest.raises(PlanError, match="not a glob"):
        ms.read_json(str(tmp_path / "*.json"), watch=True)
    with pytest.raises(PlanError, match="unbounded"):
        ms.read_json(str(tmp_path), watch=True).collect()
    missing = ms.read_json(str(tmp_path / "nope"), watch=True).start(checkpoint_interval=0,
                                                                     executor=executor)
    with pytest.raises(StorageNotFoundError, match="no such directory"):
        missing.await_termination(10)
    (tmp_path / "f.json").write_text("{}\n")
    single = ms.read_json(str(tmp_path / "f.json"), watch=True).start(checkpoint_interval=0,
                                                                      executor=executor)
    with pytest.raises(PlanError, match="is a file"):
        single.await_termination(10)


# ------------------------------------------------------------------------- Kafka sink

kafka = pytest.mark.skipif(kafka_missing() is not None, reason=f"no Kafka: {kafka_missing()}")


def _kafka_windows_job(broker, topic: str, out_topic: str, sink, chk: str, **options):
    """Kafka -> 1-minute windows per key -> ``sink``, ending once the input is read."""
    ds = (ms.read_kafka(topic, broker.bootstrap_servers).select("id", "k", "ts")
          .with_watermark("ts", "1h").group_by("k").window(ms.tumbling("1m"))
          .agg(ms.count().alias("n"), ms.sum("id").alias("ids")))
    return ds.start(checkpoint=chk, sink=sink, checkpoint_interval=0, stop_at_end=True,
                    max_batch_records=40, **options)


def _kafka_input(broker, n: int = 300) -> tuple[str, dict]:
    import uuid

    topic = f"w-{uuid.uuid4().hex[:10]}"
    broker.create_topic(topic, 2)
    rows = [{"id": i, "k": f"k{i % 3}", "ts": i * 1000} for i in range(n)]
    for p in range(2):
        broker.produce(topic, [r for r in rows if r["id"] % 2 == p], partition=p)
    expected: dict = {}
    for r in rows:
        acc = expected.setdefault((r["k"], r["ts"] // 60_000), [0, 0])
        acc[0] += 1
        acc[1] += r["id"]
    return topic, expected


def _kafka_output(broker, topic: str) -> Counter:
    """(key, minute, n, ids) of every record of ``topic``."""
    import datetime as dt

    from millstream.io.kafka import KafkaSource

    source = KafkaSource(topic, broker.bootstrap_servers, format="raw")
    got: Counter = Counter()
    for p in source.partitions():
        with source.open_reader(p, 0) as reader:
            while True:
                batch, _ = reader.poll_batch(1000, 2.0)
                if batch is None:
                    if reader.caught_up:
                        break
                    continue
                for value in batch.column("value").to_pylist():
                    r = json.loads(value)
                    start = dt.datetime.fromisoformat(r["window_start"])
                    minute = int((start - dt.datetime(1970, 1, 1)).total_seconds()) // 60
                    got[(r["k"], minute, r["n"], r["ids"])] += 1
    return got


def _as_counter(expected: dict) -> Counter:
    return Counter({(k, m, n, ids): 1 for (k, m), (n, ids) in expected.items()})


@kafka
@pytest.mark.kafka
def test_kafka_to_windows_to_transactional_kafka_sink(broker, tmp_path):
    from millstream.io.kafka import KafkaSink

    topic, expected = _kafka_input(broker)
    out = f"{topic}-out"
    broker.create_topic(out, 1)
    sink = KafkaSink(out, broker.bootstrap_servers, key="k", transactional_id=f"{out}-tx")
    job = _kafka_windows_job(broker, topic, out, sink, str(tmp_path / "chk"))
    assert job.await_termination(60)
    assert sink.mode == "transactional"
    assert _kafka_output(broker, out) == _as_counter(expected)  # every window exactly once


@kafka
@pytest.mark.kafka
@pytest.mark.parametrize("point", ["during_epoch", "after_commit", "after_checkpoint"])
def test_kafka_sink_crash_and_restore(point, broker, tmp_path):
    """A crashed job restarted (a new KafkaSink, as after a process kill) with its checkpoint.

    A transaction dies with its producer, so the restart restores the last checkpoint whose
    commit was recorded and replays the epochs after it; the new producer fences the old one.
    """
    from millstream.io.kafka import KafkaSink

    topic, expected = _kafka_input(broker)
    out = f"{topic}-out"
    broker.create_topic(out, 1)
    chk = str(tmp_path / "chk")

    def sink() -> KafkaSink:
        return KafkaSink(out, broker.bootstrap_servers, key="k", transactional_id=f"{out}-tx")

    first = _kafka_windows_job(broker, topic, out, sink(), chk, _fault=(3, point))
    with pytest.raises(SimulatedCrash):
        first.await_termination(120)
    second = _kafka_windows_job(broker, topic, out, sink(), chk)
    # every window is emitted by the restored job's last epoch: until it ends nothing is visible
    assert second.await_termination(120), "the restored job did not finish"
    got = _kafka_output(broker, out)
    # Tansu shows records of aborted transactions to read_committed readers (a broker
    # quirk, see test_kafka.py), so duplicates of a replayed epoch cannot be excluded here
    assert set(got) == set(_as_counter(expected))


@kafka
@pytest.mark.kafka
def test_an_idle_kafka_partition_does_not_hold_the_watermark_back(executor, broker, tmp_path):
    import time
    import uuid

    topic = f"idle-{uuid.uuid4().hex[:10]}"
    broker.create_topic(topic, 2)
    rows = [{"id": i, "k": "a", "ts": i * 1000} for i in range(200)]  # 3m20s of event time
    broker.produce(topic, rows, partition=0)  # partition 1 never gets a record

    def job(idle):
        return (ms.read_kafka(topic, broker.bootstrap_servers).select("id", "k", "ts")
                .with_watermark("ts", "0s", idle_timeout=idle).group_by("k")
                .window(ms.tumbling("1m")).agg(ms.count().alias("n"))
                .start(checkpoint_interval="50ms", parallelism=2, executor=executor))

    with_idle = job("300ms")
    deadline = time.time() + 30
    while len(with_idle.sink.rows()) < 3 and time.time() < deadline:
        time.sleep(0.05)
    with_idle.stop()
    assert sorted(r["n"] for r in with_idle.sink.rows()) == [60, 60, 60]
    without = job(None)
    time.sleep(2)
    without.stop()
    assert without.sink.rows() == []  # the empty partition holds the watermark back
