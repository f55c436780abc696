"""The streaming runtime: windows vs a Python oracle, batch == streaming, process functions
with state and timers across restores, exactly-once file output under crashes."""

from __future__ import annotations

import os
import random
from collections import Counter, defaultdict

import pyarrow.parquet as pq
import pytest

import millstream as ms
from millstream.core.time import VirtualClock
from millstream.io.files.stream_sink import FileStreamSink
from millstream.ops.state.process import KeyedProcessFunction
from millstream.runtime.checkpoint import CheckpointStore
from millstream.runtime.streaming.epochs import FAULT_POINTS
from millstream.testing import CollectingSink, TestSource, crash_and_restore

MIN = 60_000  # one minute in ms (event times are epoch ms ints)


def _events(seed: int, n_items: int = 30, per_item: int = 8, keys: str = "abc"):
    rng = random.Random(seed)
    items, t = [], 0
    for _ in range(n_items):
        rows = []
        for _ in range(per_item):
            t += rng.randint(0, 4000)
            jitter = rng.choice([0, 0, 0, rng.randint(0, 20_000), rng.randint(0, 200_000)])
            rows.append({"k": rng.choice(keys), "ts": max(0, t - jitter), "v": rng.randint(1, 9)})
        items.append(rows)
    return items


def _source(items, close: bool = True, partitions: int = 1) -> TestSource:
    src = TestSource(partitions=partitions)
    for i, rows in enumerate(items):
        src.add(rows, partition=i % partitions)
    if close:
        src.close()
    return src


def _key(row: dict) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in row.items()))


def _tumbling_oracle(items, size_ms: int, delay_ms: int):
    """Plain Python: one item per round, watermark = max ts - delay after each round."""
    wm = None
    sums: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    late = []
    max_ts = None
    for rows in items:
        for r in rows:
            start = r["ts"] // size_ms * size_ms
            if wm is not None and (start + size_ms) * 1000 <= wm:
                late.append(r)
                continue
            acc = sums[(r["k"], start)]
            acc[0] += r["v"]
            acc[1] += 1
        max_ts = max([max_ts or 0] + [r["ts"] for r in rows])
        wm = max(wm or -(2**63), (max_ts - delay_ms) * 1000)
    out = {(k, s * 1000): (v[0], v[1]) for (k, s), v in sums.items()}
    return out, late


def _windows(rows) -> dict:
    import datetime as dt

    epoch = dt.datetime(1970, 1, 1)
    return {(r["k"], (r["window_start"] - epoch) // dt.timedelta(microseconds=1)): (r["s"], r["n"])
            for r in rows}


def _tumbling(ds, delay="10s"):
    return (ds.with_watermark("ts", delay).group_by("k").window(ms.tumbling("1m"))
            .agg(ms.sum("v").alias("s"), ms.count().alias("n")))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_tumbling_window_matches_oracle_with_out_of_order_and_late(seed, tmp_path):
    items = _events(seed)
    job = _tumbling(_source(items).dataset()).start(checkpoint=str(tmp_path / "chk"),
                                                    checkpoint_interval=0)
    assert job.await_termination(30)
    expected, late = _tumbling_oracle(items, MIN, 10_000)
    rows = job.sink.rows()
    assert len(rows) == len(expected)  # each window emitted exactly once
    assert _windows(rows) == expected
    assert sorted(map(_key, job.late_records())) == sorted(map(_key, late))
    assert late, "the data should contain late events"
    assert job.metrics()["late_records"] == len(late)


def _sorted(rows):
    return sorted(rows, key=_key)


@pytest.mark.parametrize("window", [ms.tumbling("1m"), ms.sliding("2m", every="30s"),
                                    ms.session(gap="5s")])
def test_bounded_pipeline_same_in_batch_and_streaming(window, tmp_path):
    items = _events(7, n_items=12)
    # a delay larger than any disorder: nothing is late, so both modes must agree
    ds = (_source(items, partitions=2).dataset().with_watermark("ts", "10m")
          .group_by("k").window(window).agg(ms.sum("v").alias("s"), ms.count().alias("n")))
    batch = ds.collect()
    job = ds.start(checkpoint=str(tmp_path / "chk"), checkpoint_interval=0)
    assert job.await_termination(30)
    assert job.late_records() == []
    assert _sorted(job.sink.rows()) == _sorted(batch)
    assert batch


def test_unkeyed_window_and_stateless_stages(tmp_path):
    items = _events(11, n_items=10)
    ds = (_source(items).dataset().filter(ms.col("v") > 2).with_watermark("ts", "10m")
          .window(ms.tumbling("1m")).agg(ms.sum("v").alias("s")))
    job = ds.start(checkpoint_interval=0)
    assert job.await_termination(30)
    assert _sorted(job.sink.rows()) == _sorted(ds.collect())


class CountWithTimeout(KeyedProcessFunction):
    """Counts per key; 30 s of event time after the last event, emits the count and clears."""

    def open(self, ctx):
        self.count = ctx.get_state("count", 0)
        self.last = ctx.get_state("last", None)

    def process_element(self, row, ctx):
        self.count.update(self.count.value() + 1)
        if self.last.value() is not None:
            ctx.timer_service().delete_event_time_timer(self.last.value() + 30_000_000)
        self.last.update(ctx.timestamp)
        ctx.timer_service().register_event_time_timer(ctx.timestamp + 30_000_000)
        if row["v"] == 9:
            ctx.output("nines", row)

    def on_timer(self, timestamp, ctx):
        n = self.count.value()
        self.count.clear()
        self.last.clear()
        return {"k": ctx.key, "n": n, "at": timestamp}


def _process_ds(src):
    return src.dataset().with_watermark("ts", "5s").group_by("k").process(CountWithTimeout)


def test_keyed_process_state_and_timers_survive_restore(tmp_path):
    items = _events(5, n_items=20, keys="abcd")
    plain = _process_ds(_source(items)).start(checkpoint_interval=0)
    assert plain.await_termination(30)
    expected = _sorted(plain.sink.rows())
    assert expected and plain.side_output("nines")
    for epoch, point in [(6, "during_epoch"), (9, "after_checkpoint"), (13, "before_checkpoint")]:
        sink = CollectingSink()
        job = crash_and_restore(_process_ds(_source(items)),
                                checkpoint=str(tmp_path / f"chk-{epoch}"), sink=sink,
                                crash_epoch=epoch, point=point, checkpoint_interval=0)
        assert job.metrics()["restored_from_epoch"] is not None
        assert _sorted(sink.rows()) == expected, (epoch, point)
        assert _sorted(job.side_output("nines")) == _sorted(plain.side_output("nines"))
    # batch mode runs it too: timers fire only at the end of input, so one count per key
    batch = _process_ds(_source(items)).collect()
    assert Counter(r["k"] for r in batch) == Counter("abcd")
    assert sum(r["n"] for r in batch) == sum(r["n"] for r in expected) == sum(map(len, items))


def _read_dir(path) -> list[dict]:
    files = sorted(p for p in path.glob("*.parquet"))
    rows = []
    for f in files:
        rows.extend(pq.read_table(f).to_pylist())
    return rows


@pytest.mark.parametrize("point", FAULT_POINTS)
@pytest.mark.parametrize("epoch", [2, 7])
def test_crash_after_epoch_gives_exactly_the_uninterrupted_file_output(point, epoch, tmp_path):
    items = _events(3, n_items=12)
    ref_dir = tmp_path / "ref"
    ref = _tumbling(_source(items).dataset()).start(sink=str(ref_dir), checkpoint_interval=0)
    assert ref.await_termination(30)
    expected = _sorted(_read_dir(ref_dir))
    assert expected
    out = tmp_path / "out"
    crash_and_restore(_tumbling(_source(items).dataset()), checkpoint=str(tmp_path / "chk"),
                      sink=FileStreamSink(str(out)), crash_epoch=epoch, point=point,
                      checkpoint_interval=0)
    assert _sorted(_read_dir(out)) == expected
    assert not list((out / "_staging").glob("*/*")), "no staged leftovers after the end"
    # and the Dataset API reads the committed output, skipping staging
    assert len(ms.read_parquet(str(out)).collect()) == len(expected)


def test_stop_takes_a_final_checkpoint_and_restart_continues(tmp_path):
    items = _events(9, n_items=10)
    src = _source(items[:5], close=False)
    chk, sink = str(tmp_path / "chk"), CollectingSink()
    job = _tumbling(src.dataset()).start(checkpoint=chk, sink=sink, checkpoint_interval="1h")
    import time

    deadline = time.time() + 20
    while job.metrics()["positions"].get(("_TestStream", 0)) != 5 and time.time() < deadline:
        time.sleep(0.01)
    job.stop()
    assert not job.is_active
    assert CheckpointStore(chk).latest()[1]["positions"] == {(0, 0, 0): 5}
    for rows in items[5:]:
        src.add(rows)
    src.close()
    job2 = _tumbling(src.dataset()).start(checkpoint=chk, sink=sink, checkpoint_interval=0)
    assert job2.await_termination(30)
    expected, _ = _tumbling_oracle(items, MIN, 10_000)
    assert _windows(sink.rows()) == expected


def test_incomplete_or_corrupt_checkpoints_are_ignored(tmp_path):
    store = CheckpointStore(str(tmp_path))
    store.write(1, {"x": 1})
    store.write(2, {"x": 2})
    (tmp_path / "chk-0000000003").mkdir()  # no _COMPLETE
    (tmp_path / "chk-0000000003" / "state-zz.pkl").write_bytes(b"junk")
    assert store.latest() == (2, {"x": 2})
    state = next((tmp_path / "chk-0000000002").glob("state-*.pkl"))
    state.write_bytes(state.read_bytes()[:-1] + b"!")  # corrupt: checksum mismatch
    assert store.latest() == (1, {"x": 1})


def test_idle_partition_does_not_hold_back_the_watermark(tmp_path):
    clock = VirtualClock(0)
    src = TestSource(partitions=2)
    src.add([{"k": "a", "ts": 1_000, "v": 1}], partition=1)  # partition 1 then goes quiet
    src.add([{"k": "a", "ts": 1_000, "v": 1}], partition=0)
    ds = (src.dataset().with_watermark("ts", "0s", idle_timeout="10s").group_by("k")
          .window(ms.tumbling("1m")).agg(ms.count().alias("n")))
    job = ds.start(sink=CollectingSink(), checkpoint_interval=0, clock=clock)
    import time

    src.add([{"k": "a", "ts": 120_000, "v": 1}], partition=0)
    time.sleep(0.3)
    assert job.sink.rows() == []  # partition 1 is not idle yet: window [0, 1m) stays open
    clock.advance(11_000_000)
    src.add([{"k": "a", "ts": 121_000, "v": 1}], partition=0)
    deadline = time.time() + 10
    while not job.sink.rows() and time.time() < deadline:
        time.sleep(0.02)
    assert [r["n"] for r in job.sink.rows()] == [2]
    job.stop()


def test_when_every_partition_is_idle_the_largest_watermark_counts(tmp_path):
    """Partition 0 went quiet first (at 3 min of event time), partition 1 later (at 10 s):
    once both are idle, the watermark is the larger one (Flink's rule), not held at 10 s."""
    import time

    clock = VirtualClock(0)
    src = TestSource(partitions=2)
    ds = (src.dataset().with_watermark("ts", "0s", idle_timeout="10s").group_by("k")
          .window(ms.tumbling("1m")).agg(ms.count().alias("n")))
    job = ds.start(sink=CollectingSink(), checkpoint_interval=0, clock=clock)

    def wait_read(n):
        deadline = time.time() + 10
        while job.metrics()["records_in"] < n and time.time() < deadline:
            time.sleep(0.01)

    src.add([{"k": "a", "ts": t * 1_000, "v": 1} for t in (1, 70, 130, 180)], partition=0)
    wait_read(4)
    clock.advance(5_000_000)
    src.add([{"k": "a", "ts": 10_000, "v": 1}], partition=1)
    wait_read(5)
    clock.advance(6_000_000)  # partition 0 idle (11 s), partition 1 not yet (6 s)
    time.sleep(0.2)
    assert job.sink.rows() == []  # watermark 10 s: no window closed
    clock.advance(5_000_000)  # both idle
    deadline = time.time() + 10
    while len(job.sink.rows()) < 3 and time.time() < deadline:
        time.sleep(0.02)
    job.stop()
    assert [r["n"] for r in job.sink.rows()] == [2, 1, 1]  # [0,1m) [1m,2m) [2m,3m)


def test_generator_source_bounded_and_rate_limited(tmp_path):
    ds = (ms.from_generator(lambda i: {"k": i % 3, "ts": i * 1000, "v": 1}, count=300,
                            partitions=2)
          .with_watermark("ts", "1m").group_by("k").window(ms.tumbling("1m"))
          .agg(ms.sum("v").alias("s")))
    job = ds.start(checkpoint=str(tmp_path / "chk"), checkpoint_interval=0, max_batch_records=50)
    assert job.await_termination(30)
    assert _sorted(job.sink.rows()) == _sorted(ds.collect())
    assert sum(r["s"] for r in job.sink.rows()) == 300
    live = ms.from_generator(lambda i: {"i": i}, rate=200).start(checkpoint_interval="50ms")
    import time

    time.sleep(0.5)
    live.stop()
    got = [r["i"] for r in live.sink.rows()]
    assert got == list(range(len(got))) and 20 <= len(got) <= 200


def test_unsupported_streaming_plans_fail_clearly():
    # (a non-windowed aggregate runs on a stream now: a changelog, see test_changelog.py)
    src = _source(_events(1, n_items=2))
    with pytest.raises(ms.PlanError, match="Sort .* cannot run on an unbounded stream.*top_n"):
        src.dataset().sort("ts").start()
    with pytest.raises(ms.PlanError, match="Window .* cannot run on an unbounded stream"):
        src.dataset().with_columns(ms.lag("ts").over(partition_by="k", order_by="ts")
                                   .alias("prev")).start()


# ------------------------------------------------------------------------------ Kafka

def _kafka_missing() -> str | None:
    try:
        import confluent_kafka  # noqa: F401

        try:
            from services.kafka import TansuNotFoundError, find_tansu
        except ImportError:  # pragma: no cover
            from tests.services.kafka import TansuNotFoundError, find_tansu
        find_tansu()
    except (ImportError, TansuNotFoundError) as exc:
        return str(exc)
    return None


_KAFKA_MISSING = _kafka_missing()
kafka = pytest.mark.skipif(_KAFKA_MISSING is not None, reason=f"no Kafka: {_KAFKA_MISSING}")


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    try:
        from services.kafka import TansuBroker
    except ImportError:  # pragma: no cover
        from tests.services.kafka import TansuBroker
    server = TansuBroker.start(tmp_path_factory.mktemp("kafka"))
    yield server
    server.stop()


def _produce(broker, n: int, partitions: int = 3) -> tuple[str, list[dict]]:
    import uuid

    topic = f"s-{uuid.uuid4().hex[:10]}"
    broker.create_topic(topic, partitions)
    rows = [{"id": i, "k": f"k{i % 5}", "ts": i * 700} for i in range(n)]
    for p in range(partitions):
        broker.produce(topic, [r for r in rows if r["id"] % partitions == p], partition=p)
    return topic, rows


@kafka
@pytest.mark.kafka
def test_kafka_window_to_files_end_to_end(broker, tmp_path):
    topic, rows = _produce(broker, 600)
    out = tmp_path / "out"
    ds = (ms.read_kafka(topic, broker.bootstrap_servers).select("id", "k", "ts")
          .with_watermark("ts", "1h").group_by("k").window(ms.tumbling("1m"))
          .agg(ms.count().alias("n"), ms.sum("id").alias("ids")))
    job = ds.start(checkpoint=str(tmp_path / "chk"), sink=FileStreamSink(str(out)),
                   checkpoint_interval="20ms", stop_at_end=True, max_batch_records=50)
    assert job.await_termination(60)
    got = _read_dir(out)
    expected: dict = defaultdict(lambda: [0, 0])
    for r in rows:
        acc = expected[(r["k"], r["ts"] // MIN)]
        acc[0] += 1
        acc[1] += r["id"]
    import datetime as dt

    minute = dt.timedelta(minutes=1)
    epoch = dt.datetime(1970, 1, 1)
    assert {(r["k"], (r["window_start"] - epoch) // minute): [r["n"], r["ids"]]
            for r in got} == dict(expected)
    assert len(got) == len(expected)


def _newest(chk) -> int:
    """The newest checkpoint epoch under ``chk`` (0 when none)."""
    return max((int(p.name[4:]) for p in chk.glob("chk-*")), default=0)


_KILL_SCRIPT = r'''
import sys
import time
import millstream as ms
from millstream.io.files.stream_sink import FileStreamSink
topic, servers, out, chk = sys.argv[1:5]
def slow(batch):
    time.sleep(0.01)
    return batch
job = (ms.read_kafka(topic, servers).select("id", "ts").map_batches(slow)
       .start(checkpoint=chk, sink=FileStreamSink(out), checkpoint_interval="30ms",
              stop_at_end=True, max_batch_records=10))
job.await_termination()
print("DONE", flush=True)
'''


@kafka
@pytest.mark.kafka
@pytest.mark.slow
def test_sigkill_at_random_points_gives_every_record_exactly_once(broker, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    topic, rows = _produce(broker, 3000)
    script = tmp_path / "job.py"
    script.write_text(_KILL_SCRIPT)
    out, chk = tmp_path / "out", tmp_path / "chk"
    args = [sys.executable, str(script), topic, broker.bootstrap_servers, str(out), str(chk)]
    rng = random.Random(42)
    kills = 0
    for _ in range(4):
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        before = _newest(chk)
        deadline = time.time() + 30
        while proc.poll() is None and time.time() < deadline and _newest(chk) <= before:
            time.sleep(0.02)  # wait until this run checkpointed once, then kill at random
        time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    proc = subprocess.run(args, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    ids = [r["id"] for r in _read_dir(out)]
    assert kills >= 2
    assert Counter(ids) == Counter(r["id"] for r in rows)  # every record, exactly once


@pytest.mark.parametrize("executor", ["parallel", "inline"])
def test_metrics_report_operators_watermark_and_checkpoints(executor, tmp_path):
    rows = [{"k": f"k{i % 3}", "ts": 1_000 * i} for i in range(300)]
    ds = (ms.from_items(rows, num_partitions=2).with_watermark("ts", "0s")
          .group_by("k").window(ms.tumbling("10s"), on="ts").agg(ms.count().alias("n")))
    job = ds.start(checkpoint=str(tmp_path / "chk"), checkpoint_interval=0, executor=executor)
    assert job.await_termination(60)
    m = job.metrics()
    ops = m["operators"]
    window = next(v for k, v in ops.items() if k.startswith("WindowAggregate"))
    combiner = next(v for k, v in ops.items() if k.startswith("WindowCombiner"))
    # rows reach the window operator as they are or combined into partial window states
    assert combiner["records_in"] == 300 and window["records_in"] == combiner["records_out"]
    assert window["records_out"] == sum(r["n"] > 0 for r in job.sink.rows()) == 90
    assert m["checkpoints"] >= 1 and m["last_checkpoint_bytes"] > 0
    assert all(v["state_bytes"] >= 0 for v in ops.values())
    assert m["last_checkpoint_seconds"] >= 0
    assert m["records_in"] == 300


@kafka
@pytest.mark.kafka
@pytest.mark.slow
def test_task_processes_killed_at_random_give_every_record_exactly_once(broker, tmp_path):
    """Kafka -> keyed exchange -> files on the parallel executor; task processes (sources,
    exchange consumers, sinks) SIGKILLed at random points; the job restores each time."""
    import signal
    import time

    topic, rows = _produce(broker, 3000)
    out, chk = tmp_path / "out", tmp_path / "chk"

    def slow(batch):
        time.sleep(0.01)
        return batch

    job = (ms.read_kafka(topic, broker.bootstrap_servers).select("id", "k", "ts")
           .map_batches(slow).repartition(2, "k")
           .start(checkpoint=str(chk), sink=FileStreamSink(str(out)), checkpoint_interval="30ms",
                  stop_at_end=True, max_batch_records=10, parallelism=2, max_restarts=10))
    rng = random.Random(7)
    kills = 0
    for _ in range(4):
        before = job.metrics()["checkpoints"]
        deadline = time.time() + 30
        while job.is_active and time.time() < deadline and job.metrics()["checkpoints"] <= before:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
        pids = job.host_pids()
        if not job.is_active or not pids:
            break
        os.kill(rng.choice(pids), signal.SIGKILL)
        kills += 1
    assert job.await_termination(180)
    assert kills >= 2 and job.metrics()["restarts"] >= 2
    ids = [r["id"] for r in _read_dir(out)]
    assert Counter(ids) == Counter(r["id"] for r in rows)  # every record, exactly once
