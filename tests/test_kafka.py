"""The Kafka connector against a real Kafka-compatible broker (Tansu) started on loopback.

One broker for the module (``tests/services/kafka.py``); every test uses its own topics.
Exactly-once accounting is by (partition, offset): the offsets the producer's delivery
reports gave each record are compared with the ``_partition``/``_offset`` columns read
back. Known broker quirks (wrong ListOffsets ends, aborted transactions visible to
``read_committed``) are described in the service module.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

import millstream as ms
from millstream.core.context import TaskContext
from millstream.errors import BadRecordError, PlanError
from millstream.io.kafka import (  # no client import until a client is made
    KafkaClientError,
    KafkaEndNotReachedError,
    KafkaNotInstalledError,
    KafkaSink,
    KafkaSource,
    KafkaStateError,
)

try:  # tests/ is on sys.path under pytest's default (prepend) import mode
    from services.kafka import TansuBroker, kafka_missing
except ImportError:  # pragma: no cover - tests/ imported as a package
    from tests.services.kafka import TansuBroker, kafka_missing

_MISSING = kafka_missing()

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.skipif(_MISSING is not None, reason=f"no Kafka broker: {_MISSING}"),
]


# ----------------------------------------------------------------------------------------
# Fixtures and helpers (the module's broker: ``broker`` in conftest.py)
# ----------------------------------------------------------------------------------------

@pytest.fixture
def topic(broker):
    """A fresh 3-partition topic."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    broker.create_topic(name, 3)
    return name


def produce_json(broker: TansuBroker, topic: str, ids: range, partitions: int = 3
                 ) -> dict[tuple[int, int], int]:
    """Produce {"id", "name", "score"} for each id to partition id % partitions;
    returns (partition, offset) -> id from the delivery reports."""
    where: dict[tuple[int, int], int] = {}
    for p in range(partitions):
        mine = [i for i in ids if i % partitions == p]
        values = [{"id": i, "name": f"n{i}", "score": i / 2} for i in mine]
        got = broker.produce(topic, values, partition=p, keys=[f"k{i}" for i in mine])
        where.update(zip(got, mine))
    return where


def drain(reader: Any, max_records: int = 1000) -> list[pa.RecordBatch]:
    """Poll until the reader reports the end of its partition (every acked record read)."""
    out = []
    deadline = time.monotonic() + 20
    while True:
        assert time.monotonic() < deadline, "reader never caught up"
        batch, _ = reader.poll_batch(max_records, timeout_s=0.5)
        if batch is not None and batch.num_rows:
            out.append(batch)
        if reader.caught_up:
            return out


def rows_of(batches: list[pa.RecordBatch]) -> list[dict[str, Any]]:
    return [row for b in batches for row in b.to_pylist()]


def assert_exactly(rows: list[dict[str, Any]], expected: dict[tuple[int, int], int]) -> None:
    """Every expected (partition, offset) exactly once, with its id, and nothing else."""
    seen = Counter((r["_partition"], r["_offset"]) for r in rows)
    dups = {k: n for k, n in seen.items() if n > 1}
    assert not dups, f"duplicates: {sorted(dups)[:10]}"
    assert set(seen) == set(expected), (
        f"missing {sorted(set(expected) - set(seen))[:10]}, "
        f"unexpected {sorted(set(seen) - set(expected))[:10]}")
    for r in rows:
        assert r["id"] == expected[(r["_partition"], r["_offset"])]


# ----------------------------------------------------------------------------------------
# Source: streaming readers
# ----------------------------------------------------------------------------------------

def test_readers_read_every_record_once(broker, topic):
    expected = produce_json(broker, topic, range(900))
    source = KafkaSource(topic, broker.bootstrap_servers)
    assert source.partitions() == [0, 1, 2]
    starts = source.start_offsets()
    assert starts == {0: 0, 1: 0, 2: 0}
    rows = []
    for p in source.partitions():
        with source.open_reader(p, starts[p]) as reader:
            rows += rows_of(drain(reader, max_records=128))
            assert reader.next_offset == 300
    assert_exactly(rows, expected)
    schema = source.full_schema()
    assert schema.field("id").type == pa.int64()
    assert schema.field("score").type == pa.float64()
    assert schema.field("_topic").type == pa.string()
    assert schema.field("_partition").type == pa.int32()
    assert schema.field("_offset").type == pa.int64()
    assert schema.field("_timestamp").type == pa.timestamp("ms")
    assert schema.field("_key").type == pa.binary()
    first = min(rows, key=lambda r: (r["_partition"], r["_offset"]))
    assert first["_topic"] == topic and first["_key"] == f"k{first['id']}".encode()
    assert first["_timestamp"] is not None


def test_resume_from_saved_offsets_gives_the_rest_exactly(broker, topic):
    expected = produce_json(broker, topic, range(600))
    source = KafkaSource(topic, broker.bootstrap_servers)
    starts = source.start_offsets()
    first: list[dict[str, Any]] = []
    saved: dict[int, int] = {}
    for p in source.partitions():  # a checkpoint part-way: 2 polls of 37 records each
        with source.open_reader(p, starts[p]) as reader:
            for _ in range(2):
                batch, saved[p] = reader.poll_batch(37, timeout_s=5)
                first += batch.to_pylist()
    assert saved == {0: 74, 1: 74, 2: 74}
    # Records written after the checkpoint are part of "the rest" too.
    expected.update(produce_json(broker, topic, range(600, 630)))
    rest: list[dict[str, Any]] = []
    for p, offset in saved.items():
        with source.open_reader(p, offset) as reader:
            rest += rows_of(drain(reader))
    assert {(r["_partition"], r["_offset"]) for r in first}.isdisjoint(
        {(r["_partition"], r["_offset"]) for r in rest})
    assert_exactly(first + rest, expected)


def test_raw_format(broker, topic):
    sent = broker.produce(topic, [b"\x00\x01binary", b"text", None], partition=1,
                          keys=[b"k1", None, b"k3"])
    source = KafkaSource(topic, broker.bootstrap_servers, format="raw")
    assert source.full_schema().names == ["key", "value", "_topic", "_partition", "_offset",
                                          "_timestamp"]
    with source.open_reader(1, 0) as reader:
        rows = rows_of(drain(reader))
    assert [(r["_partition"], r["_offset"]) for r in rows] == sent
    assert [r["value"] for r in rows] == [b"\x00\x01binary", b"text", None]
    assert [r["key"] for r in rows] == [b"k1", None, b"k3"]


def test_explicit_schema_and_tombstones(broker, topic):
    schema = pa.schema([("id", pa.int32()), ("name", pa.string())])
    broker.produce(topic, [{"id": 1, "name": "a", "extra": True}, None, {"id": 3}],
                   partition=2, keys=[b"a", b"gone", b"c"])
    source = KafkaSource(topic, broker.bootstrap_servers, schema=schema)
    with source.open_reader(2, 0) as reader:
        rows = rows_of(drain(reader))
    assert [(r["id"], r["name"], r["_key"]) for r in rows] == [
        (1, "a", b"a"), (None, None, b"gone"), (3, None, b"c")]
    assert source.full_schema().field("id").type == pa.int32()


def test_start_latest_and_committed(broker, topic):
    produce_json(broker, topic, range(30))
    latest = KafkaSource(topic, broker.bootstrap_servers, start="latest")
    starts = latest.start_offsets()
    assert starts == {0: 10, 1: 10, 2: 10}  # measured, not the broker's ListOffsets
    new = produce_json(broker, topic, range(30, 36))
    rows = []
    for p, offset in starts.items():
        with latest.open_reader(p, offset) as reader:
            rows += rows_of(drain(reader))
    assert_exactly(rows, new)

    group = f"g-{uuid.uuid4().hex[:8]}"
    committed = KafkaSource(topic, broker.bootstrap_servers, start="committed",
                            group_id=group)
    assert committed.start_offsets() == {0: 0, 1: 0, 2: 0}  # nothing committed: earliest
    committed.commit_offsets({0: 5, 2: 12})
    assert committed.committed_offsets() == {0: 5, 1: None, 2: 12}
    assert committed.start_offsets() == {0: 5, 1: 0, 2: 12}
    with pytest.raises(PlanError, match="group_id"):
        KafkaSource(topic, broker.bootstrap_servers, start="committed")


# ----------------------------------------------------------------------------------------
# Source: bad records
# ----------------------------------------------------------------------------------------

BAD = [b'{"id": 1, "name": "a"}', b'{"id": 2, "name": ', b'[1, 2]', b'{"id": "x"}',
       b"", b'{\n  "id": 6,\n  "name": "pretty"\n}', b'{"id": 7, "name": "g"}']


def test_bad_json_raises_naming_topic_partition_offset(broker, topic):
    offsets = [o for _, o in broker.produce(topic, BAD, partition=1)]
    schema = pa.schema([("id", pa.int64()), ("name", pa.string())])
    source = KafkaSource(topic, broker.bootstrap_servers, schema=schema)
    with source.open_reader(1, 0) as reader, pytest.raises(BadRecordError) as info:
        drain(reader)
    err = info.value
    assert err.offset == offsets[1]
    assert err.topic == topic and err.partition == 1
    assert f"kafka topic {topic!r} partition 1 offset {offsets[1]}" in str(err)
    assert '{"id": 2, "name": ' in str(err)
    # the hint is what works: a keyword of read_kafka (options= as well)
    assert 'read_kafka(..., on_bad_records="skip")' in str(err)
    assert "options={" not in str(err)
    ends = {0: 0, 1: offsets[-1] + 1, 2: 0}
    for options in ({"on_bad_records": "skip"}, {"options": {"on_bad_records": "skip"}}):
        rows = ms.read_kafka(topic, broker.bootstrap_servers, schema=schema, end_offsets=ends,
                             **options).collect()
        assert sorted(r["id"] for r in rows) == [1, 6, 7]
    misspelt = KafkaSource(topic, broker.bootstrap_servers, options={"on_bad_record": "skip"})
    with pytest.raises(PlanError, match=r"Did you mean Millstream's 'on_bad_records'\? Pass it "
                                        r"as a keyword: read_kafka\(\.\.\., on_bad_records="):
        misspelt.partitions()


def test_bad_json_skip_and_dead_letter(broker, topic, tmp_path):
    offsets = [o for _, o in broker.produce(topic, BAD, partition=0)]
    schema = pa.schema([("id", pa.int64()), ("name", pa.string())])
    source = KafkaSource(topic, broker.bootstrap_servers, schema=schema,
                         options={"on_bad_records": "skip"})
    ctx = TaskContext()
    with source.open_reader(0, 0, ctx=ctx) as reader:
        rows = rows_of(drain(reader))
        assert reader.next_offset == offsets[-1] + 1
    assert [(r["id"], r["name"]) for r in rows] == [(1, "a"), (6, "pretty"), (7, "g")]
    assert ctx.counters[("millstream", "bad_records_skipped")] == 4

    dead = tmp_path / "dead"
    source = KafkaSource(topic, broker.bootstrap_servers, schema=schema,
                         options={"on_bad_records": str(dead)})
    with source.open_reader(0, 0) as reader:
        rows = rows_of(drain(reader))
    assert [r["id"] for r in rows] == [1, 6, 7]
    records = [json.loads(line) for f in sorted(Path(dead).glob("*.jsonl"))
               for line in f.read_text().splitlines()]
    assert [r["offset"] for r in records] == [offsets[i] for i in (1, 2, 3, 4)]
    assert {r["path"] for r in records} == {f"kafka://{topic}/0"}
    assert records[0]["record"] == '{"id": 2, "name": '
    assert all(r["reason"] for r in records)


@pytest.mark.parametrize("point", ["during_epoch", "after_checkpoint"])
def test_streaming_dead_letters_are_committed_with_checkpoints_exactly_once(point, broker, topic,
                                                                           tmp_path):
    from millstream.io.files.stream_sink import FileStreamSink
    from millstream.testing import crash_and_restore

    pad = "." * 400  # dead letters long enough that the crashed run wrote some out
    values = [json.dumps({"id": i}).encode() if i % 10 != 3
              else f'{{"id": {i}, broken{pad}'.encode() for i in range(600)]
    offsets = [o for _, o in broker.produce(topic, values, partition=0)]
    bad = {offsets[i] for i in range(600) if i % 10 == 3}
    dead = tmp_path / "dead"
    ds = ms.read_kafka(topic, broker.bootstrap_servers, on_bad_records=str(dead),
                       schema=pa.schema([("id", pa.int64())])).select("id")
    crash_and_restore(ds, checkpoint=str(tmp_path / "chk"), sink=FileStreamSink(str(tmp_path / "out")),
                      crash_epoch=10, point=point, checkpoint_interval=0, max_batch_records=40,
                      stop_at_end=True, executor="inline", timeout=60)
    letters = [json.loads(line) for f in sorted(dead.glob("*.jsonl"))
               for line in f.read_text().splitlines()]
    assert Counter(r["offset"] for r in letters) == Counter(bad)


# ----------------------------------------------------------------------------------------
# Sink
# ----------------------------------------------------------------------------------------

def read_back(broker: TansuBroker, topic: str) -> list[dict[str, Any]]:
    source = KafkaSource(topic, broker.bootstrap_servers, format="raw")
    rows = []
    for p in source.partitions():
        with source.open_reader(p, 0) as reader:
            rows += rows_of(drain(reader))
    return rows


def test_sink_writes_rows_with_keys(broker, topic):
    sink = KafkaSink(topic, broker.bootstrap_servers, key="user")
    assert sink.mode == "idempotent"
    users = [f"u{i % 7}" for i in range(200)]
    table = pa.table({"user": users, "n": list(range(200)),
                      "at": pa.array([1_700_000_000_000 + i for i in range(200)],
                                     pa.timestamp("ms"))})
    sink.begin(1)
    assert sink.write(table.slice(0, 120)) == 120
    assert sink.write(table.slice(120).to_batches()[0]) == 80
    handle = sink.pre_commit(1)
    assert handle.records == 200 and handle.mode == "idempotent"
    sink.commit(handle)
    sink.close()
    rows = read_back(broker, topic)
    assert len(rows) == 200
    values = [json.loads(r["value"]) for r in rows]
    assert sorted(v["n"] for v in values) == list(range(200))
    for r, v in zip(rows, values):
        assert r["key"] == v["user"].encode()
    assert values[0]["at"].startswith("2023-11-14 22:13:20")  # ISO text, as write_json
    partition_of: dict[bytes, set[int]] = {}
    for r in rows:
        partition_of.setdefault(r["key"], set()).add(r["_partition"])
    assert all(len(ps) == 1 for ps in partition_of.values())  # one key, one partition
    assert len({p for ps in partition_of.values() for p in ps}) > 1


def test_transactional_sink_commit_and_abort(broker, topic):
    sink = KafkaSink(topic, broker.bootstrap_servers, format="raw", key="k",
                     transactional_id=f"tx-{uuid.uuid4().hex[:8]}")
    assert sink.mode == "transactional"  # Tansu accepts transactions
    with pytest.raises(KafkaStateError):
        sink.write(pa.table({"value": [b"x"]}))
    for epoch in (1, 2):
        sink.begin(epoch)
        sink.write(pa.table({"k": ["a", "b"], "value": [f"e{epoch}-a", f"e{epoch}-b"]}))
        handle = sink.pre_commit(epoch)
        assert handle.mode == "transactional" and handle.records == 2
        with pytest.raises(KafkaStateError):
            sink.begin(epoch + 1)  # the previous epoch is not committed yet
        sink.commit(handle)
    sink.begin(3)
    sink.write(pa.table({"k": ["a"], "value": ["e3-a"]}))
    sink.abort(sink.pre_commit(3))
    sink.begin(4)
    sink.write(pa.table({"k": ["c"], "value": ["e4-c"]}))
    sink.commit(sink.pre_commit(4))
    sink.close()
    values = Counter(r["value"] for r in read_back(broker, topic))
    committed = [b"e1-a", b"e1-b", b"e2-a", b"e2-b", b"e4-c"]
    assert all(values[v] == 1 for v in committed), values
    # Tansu shows aborted records even to read_committed consumers (a broker quirk), so
    # the aborted epoch's absence is not asserted; it must appear at most once.
    assert values[b"e3-a"] <= 1
    assert set(values) <= {*committed, b"e3-a"}


def test_retired_instances_fence_a_leftover_producer(broker, topic):
    """After a restart at a lower parallelism, the coordinator retires the sink instances
    no task owns any more: a producer of the earlier run still holding an open
    transaction under one of those ids can no longer commit it."""
    import confluent_kafka as ck

    base = f"tx-{uuid.uuid4().hex[:8]}"
    zombie = ck.Producer({"bootstrap.servers": broker.bootstrap_servers,
                          "transactional.id": f"{base}-2", "enable.idempotence": True})
    zombie.init_transactions(10)
    zombie.begin_transaction()
    zombie.produce(topic, b"from a process of the earlier run")
    assert zombie.flush(10) == 0
    KafkaSink(topic, broker.bootstrap_servers, format="raw",
              transactional_id=base).retire_instances([2])
    with pytest.raises(ck.KafkaException):
        zombie.commit_transaction(3)
    # the retired id is usable again by a later run that scales back up
    later = KafkaSink(topic, broker.bootstrap_servers, format="raw",
                      transactional_id=base).for_subtask(2)
    later.begin(1)
    later.write(pa.table({"value": [b"later"]}))
    later.commit(later.pre_commit(1))
    later.close()
    assert b"later" in {r["value"] for r in read_back(broker, topic)}


def test_sink_falls_back_to_idempotent_without_transactions(broker, topic, monkeypatch):
    import confluent_kafka

    class NoTransactions(confluent_kafka.Producer):
        """A producer whose broker 'does not support' transactions."""

        def init_transactions(self, *args: Any) -> None:
            raise confluent_kafka.KafkaException(confluent_kafka.KafkaError(
                confluent_kafka.KafkaError._UNSUPPORTED_FEATURE, "no transactions here"))

    monkeypatch.setattr(confluent_kafka, "Producer", NoTransactions)
    strict = KafkaSink(topic, broker.bootstrap_servers, transactional_id="tx-strict",
                       options={"require_transactions": True})
    with pytest.raises(KafkaClientError, match="refused transactions"):
        strict.open()
    sink = KafkaSink(topic, broker.bootstrap_servers, format="raw", transactional_id="tx-fb")
    assert sink.mode == "idempotent"
    assert "no transactions here" in sink.fallback_reason
    sink.begin(7)
    sink.write(pa.table({"value": [b"v1", b"v2"]}))
    handle = sink.pre_commit(7)
    assert handle.mode == "idempotent" and handle.transactional_id is None
    sink.commit(handle)
    sink.close()
    assert sorted(r["value"] for r in read_back(broker, topic)) == [b"v1", b"v2"]


def test_sink_pickles_without_its_producer(broker, topic):
    import cloudpickle

    sink = KafkaSink(topic, broker.bootstrap_servers, key="id")
    assert sink.mode == "idempotent"
    clone = cloudpickle.loads(cloudpickle.dumps(sink))
    assert clone._producer is None and clone.topic == topic
    sink.close()


# ----------------------------------------------------------------------------------------
# Batch: the bounded Source interface
# ----------------------------------------------------------------------------------------

def bounded_dataset(source: KafkaSource) -> Any:
    from millstream.api.dataset import Dataset
    from millstream.plan.logical import Scan

    return Dataset(Scan(source))


def test_bounded_read_with_explicit_end_offsets(broker, topic):
    expected = produce_json(broker, topic, range(300))  # offsets 0..99 per partition
    ends = {0: 60, 1: 100, 2: 0}
    source = KafkaSource(topic, broker.bootstrap_servers,
                         options={"end_offsets": ends})
    produce_json(broker, topic, range(300, 330))  # beyond the ends: never read
    table = bounded_dataset(source).to_arrow()
    want = {k: v for k, v in expected.items() if k[1] < ends[k[0]]}
    assert_exactly(table.to_pylist(), want)
    assert table.num_rows == 160
    total = bounded_dataset(source).select("id").count()
    assert total == 160


def test_bounded_read_measures_ends_past_wrong_watermarks(broker, topic):
    expected = produce_json(broker, topic, range(90))
    source = KafkaSource(topic, broker.bootstrap_servers)
    splits = source.plan_splits(4)
    assert [(s.info.partition, s.info.start, s.info.end) for s in splits] == [
        (0, 0, 30), (1, 0, 30), (2, 0, 30)]
    # Tansu answers ListOffsets with (base offset of the last batch) + 1.
    assert source.watermarks_trusted is False
    rows = bounded_dataset(source).filter(lambda r: r["id"] % 2 == 0).collect()
    assert_exactly(rows, {k: v for k, v in expected.items() if v % 2 == 0})


def test_bounded_read_past_the_end_fails_clearly(broker, topic):
    broker.produce(topic, [{"id": 1}], partition=0)
    source = KafkaSource(topic, broker.bootstrap_servers,
                         options={"end_offsets": {0: 5, 1: 0, 2: 0}, "end_timeout_s": 1})
    split = source.plan_splits(1)[0]
    with pytest.raises(KafkaEndNotReachedError, match=r"stopped at offset 1, before the "
                                                      r"planned end 5"):
        list(source.read_split(split, TaskContext()))


# ----------------------------------------------------------------------------------------
# Errors without a broker
# ----------------------------------------------------------------------------------------

def test_unknown_topic_and_bad_options(broker):
    source = KafkaSource(f"missing-{uuid.uuid4().hex[:8]}", broker.bootstrap_servers)
    with pytest.raises(KafkaClientError, match="not found"):
        source.partitions()
    with pytest.raises(PlanError, match="end_offsets"):
        KafkaSource("x", broker.bootstrap_servers, options={"end_offsets": {0: -1}})
    with pytest.raises(PlanError, match="format"):
        KafkaSource("x", broker.bootstrap_servers, format="avro")
    bad = KafkaSource("x", broker.bootstrap_servers, options={"no.such.setting": 1})
    with pytest.raises(PlanError, match="bad consumer settings"):
        bad.partitions()


def test_missing_client_library_names_the_extra(monkeypatch):
    import millstream.io.kafka.client as mk

    monkeypatch.setitem(sys.modules, "confluent_kafka", None)
    with pytest.raises(KafkaNotInstalledError, match=r"pip install 'millstream\[kafka\]'"):
        mk._ck()


def test_read_kafka_public_api(broker, topic):
    expected = produce_json(broker, topic, range(45))
    ds = ms.read_kafka(topic, broker.bootstrap_servers, end_offsets={0: 15, 1: 15, 2: 15})
    rows = ds.collect()
    assert_exactly(rows, expected)
    counts = ds.group_by("_partition").agg(ms.count().alias("n")).collect()
    assert sorted(r["n"] for r in counts) == [15, 15, 15]


# ----------------------------------------------------------------------------------------
# No broker at all
# ----------------------------------------------------------------------------------------

NO_BROKER_JOB = """
import millstream as ms

readings = ms.read_kafka("sensors", bootstrap_servers="127.0.0.1:{port}")
per_minute = (readings.with_watermark("ts", delay="5s")
              .group_by("device").window(ms.tumbling("1m"), on="ts")
              .agg(ms.mean("temp").alias("avg_temp"), ms.count().alias("n")))
job = per_minute.start(checkpoint="chk", sink="out")
job.await_termination()
"""


def test_no_broker_listening_gives_one_clear_error(tmp_path):
    import socket
    import subprocess

    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = str(Path(__file__).resolve().parents[1] / "src")
    proc = subprocess.run([sys.executable, "-c", NO_BROKER_JOB.format(port=port)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": src})
    assert proc.returncode == 1
    err = proc.stderr
    assert err.count("Traceback") == 1, err
    assert err.count("no Kafka broker reachable") == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("millstream.io.kafka.client.KafkaClientError: no Kafka broker "
                           f"reachable at 127.0.0.1:{port}"), err
    assert "rdkafka" not in err and "%3|" not in err, err


def test_no_broker_in_batch_mode_is_the_same_error():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(KafkaClientError, match="no Kafka broker reachable"):
        ms.read_kafka("t", bootstrap_servers=f"127.0.0.1:{port}").count()
