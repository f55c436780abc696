"""The Kafka sink with updating results, against the Tansu broker: upsert mode (the key
columns as the record key, the row as the value, a tombstone for a deleted key; the
topic read back and compacted by hand equals a plain-Python oracle), several key columns
as a JSON key, retract mode (every change with its kind in the value), and the refusal of
updates by a sink that takes appends only."""

from __future__ import annotations

import json
import random
import time
import uuid
from collections import Counter, defaultdict
from typing import Any

import pyarrow as pa
import pytest

import millstream as ms
from millstream.errors import PlanError
from millstream.io.kafka import KafkaSink, KafkaSource
from millstream.testing import TestSource

try:  # tests/ is on sys.path under pytest's default (prepend) import mode
    from services.kafka import kafka_missing
except ImportError:  # pragma: no cover - tests/ imported as a package
    from tests.services.kafka import kafka_missing

_MISSING = kafka_missing()

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.skipif(_MISSING is not None, reason=f"no Kafka broker: {_MISSING}"),
]

SCHEMA = pa.schema([("id", pa.int64()), ("cat", pa.string()), ("g", pa.int64()),
                    ("v", pa.int64())])


@pytest.fixture
def topic(broker):
    name = f"up-{uuid.uuid4().hex[:10]}"
    broker.create_topic(name, 3)
    return name


def _events(seed: int, n: int, ids: int = 40, cats: int = 6) -> list[dict]:
    rng = random.Random(seed)
    # ids that leave category "gone" for good: its row is deleted at the end
    rows = [{"id": 500 + i, "cat": "gone", "g": 0, "v": 1} for i in range(3)]
    rows += [{"id": rng.randrange(ids), "cat": f"c{rng.randrange(cats)}",
              "g": rng.randrange(2), "v": rng.randint(-5, 50)} for _ in range(n)]
    rows += [{"id": 500 + i, "cat": "c0", "g": 0, "v": 2} for i in range(3)]
    return rows


def _source(rows: list[dict]) -> TestSource:
    src = TestSource(schema=SCHEMA)
    for i in range(0, len(rows), 25):
        src.add(rows[i:i + 25])
    src.close()
    return src


def _latest_per_id(rows: list[dict]) -> list[dict]:
    last = {}
    for r in rows:
        last[r["id"]] = r
    return list(last.values())


def _oracle(rows: list[dict], keys: tuple[str, ...]) -> dict[tuple, dict]:
    out: dict[tuple, dict] = {}
    for r in _latest_per_id(rows):
        k = tuple(r[c] for c in keys)
        o = out.setdefault(k, {**{c: r[c] for c in keys}, "total": 0, "n": 0})
        o["total"] += r["v"]
        o["n"] += 1
    return out


def _records(broker, topic: str) -> list[dict[str, Any]]:
    """Every record of the topic, in offset order within each partition."""
    source = KafkaSource(topic, broker.bootstrap_servers, format="raw")
    rows: list[dict[str, Any]] = []
    for p in source.partitions():
        with source.open_reader(p, 0) as reader:
            deadline = time.monotonic() + 20
            while True:
                assert time.monotonic() < deadline, "reader never caught up"
                b, _ = reader.poll_batch(1000, 0.5)
                if b is not None:
                    rows += b.to_pylist()
                if reader.caught_up:
                    break
    return sorted(rows, key=lambda r: (r["_partition"], r["_offset"]))


def _run(ds: ms.Dataset, sink: KafkaSink, executor: str = "inline") -> None:
    job = ds.start(sink=sink, executor=executor, checkpoint_interval="30ms", parallelism=2)
    assert job.await_termination(120)


def test_upsert_sink_with_tombstones(broker, topic, executor):
    rows = _events(1, 600)
    ds = (_source(rows).dataset().drop_duplicates("id", keep="last").group_by("cat")
          .agg(ms.sum("v").alias("total"), ms.count().alias("n")))
    _run(ds, KafkaSink(topic, broker.bootstrap_servers, key="cat", changelog="upsert",
                       transactional_id=f"tx-{uuid.uuid4().hex[:8]}"), executor)
    records = _records(broker, topic)
    table: dict[bytes, dict | None] = {}
    partitions: dict[bytes, set[int]] = defaultdict(set)
    for r in records:
        table[r["key"]] = None if r["value"] is None else json.loads(r["value"])
        partitions[r["key"]].add(r["_partition"])
    assert all(len(ps) == 1 for ps in partitions.values())  # a key stays in its partition
    assert table[b"gone"] is None                            # deleted: a tombstone last
    compacted = {k.decode(): v for k, v in table.items() if v is not None}
    want = {k[0]: v for k, v in _oracle(rows, ("cat",)).items()}
    assert compacted == want
    for key, value in table.items():
        if value is not None:
            assert value["cat"] == key.decode()


def test_upsert_sink_with_a_key_of_two_columns(broker, topic):
    rows = _events(2, 400)
    ds = (_source(rows).dataset().drop_duplicates("id", keep="last").group_by("cat", "g")
          .agg(ms.sum("v").alias("total"), ms.count().alias("n")))
    _run(ds, KafkaSink(topic, broker.bootstrap_servers, key=["cat", "g"], changelog="upsert"))
    table: dict[tuple, dict | None] = {}
    for r in _records(broker, topic):
        k = json.loads(r["key"])
        assert set(k) == {"cat", "g"}
        table[(k["cat"], k["g"])] = None if r["value"] is None else json.loads(r["value"])
    assert {k: v for k, v in table.items() if v is not None} == _oracle(rows, ("cat", "g"))
    assert table[("gone", 0)] is None


def test_retract_sink_writes_every_change_with_its_kind(broker, topic):
    rows = _events(3, 300)
    ds = (_source(rows).dataset().drop_duplicates("id", keep="last").group_by("cat")
          .agg(ms.sum("v").alias("total"), ms.count().alias("n")))
    _run(ds, KafkaSink(topic, broker.bootstrap_servers, key="cat", changelog="retract"))
    held: dict[str, Counter] = defaultdict(Counter)
    kinds = Counter()
    for r in _records(broker, topic):
        v = json.loads(r["value"])
        kinds[v["change"]] += 1
        row = (v["total"], v["n"])
        if v["change"] in ("+I", "+U"):
            held[v["cat"]][row] += 1
        else:
            assert held[v["cat"]][row] > 0, f"{v} retracts a row that is not there"
            held[v["cat"]][row] -= 1
    final = {c: next(iter(+rows_)) for c, rows_ in held.items() if +rows_}
    want = {k[0]: (v["total"], v["n"]) for k, v in _oracle(rows, ("cat",)).items()}
    assert final == want
    assert kinds["-U"] and kinds["+U"] and kinds["-D"]


def test_a_sink_without_changelog_refuses_updates(broker, topic):
    ds = _source(_events(4, 50)).dataset().group_by("cat").agg(ms.count().alias("n"))
    with pytest.raises(PlanError, match="KafkaSink takes appends only"):
        ds.start(sink=KafkaSink(topic, broker.bootstrap_servers, key="cat"))
    with pytest.raises(PlanError, match="needs the key column"):
        KafkaSink(topic, broker.bootstrap_servers, changelog="upsert")
    with pytest.raises(PlanError, match=r"keyed by \['g'\]"):
        ds.start(sink=KafkaSink(topic, broker.bootstrap_servers, key="g", changelog="upsert"))
    # an append-only result in upsert mode: the last row per key wins
    plain = _source([{"id": i, "cat": f"c{i % 3}", "g": 0, "v": i} for i in range(30)])
    _run(plain.dataset().select("cat", "v"),
         KafkaSink(topic, broker.bootstrap_servers, key="cat", changelog="upsert"))
    last = {}
    for r in _records(broker, topic):
        last[r["key"]] = json.loads(r["value"])["v"]
    assert last == {b"c0": 27, b"c1": 28, b"c2": 29}
