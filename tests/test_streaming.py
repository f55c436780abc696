"""The streaming runtime on both executors: windows vs a Python oracle, batch == streaming,
process functions with state and timers across restores, exactly-once file output under
crashes."""

from __future__ import annotations

import os
import random
import time
from collections import Counter, defaultdict

import pyarrow.parquet as pq
import pytest
from oracles import (
    arrivals,
    arrivals_script,
    micros,
    oracle_fixed,
    row_key,
    sorted_rows,
    tumbling_windows,
)
from services.kafka import kafka_missing
from streams import CountWithTimeout, events, filled_source

import millstream as ms
from millstream.core.time import VirtualClock
from millstream.io.files.stream_sink import FileStreamSink
from millstream.runtime.checkpoint import CheckpointStore
from millstream.runtime.streaming.epochs import FAULT_POINTS
from millstream.testing import CollectingSink, TestSource

MIN = 60_000  # one minute in ms (event times are epoch ms ints)


def _events(seed: int, n_items: int = 30, per_item: int = 8, keys: str = "abc"):
    return events(seed, n_items, per_item, keys)


def _tumbling(ds, delay="10s"):
    return (ds.with_watermark("ts", delay).group_by("k").window(ms.tumbling("1m"))
            .agg(ms.sum("v").alias("s"), ms.count().alias("n")))


def _tumbling_oracle(arrivals):
    """{(k, window start µs): (sum, count)} and the late rows of a 1-minute tumbling window
    over ``arrivals`` (rows with the watermark each meets)."""
    script = arrivals_script(arrivals, "k", "ts", "v")
    contents, late = oracle_fixed(script, tumbling_windows(MIN * 1000), 0)
    return ({(k, ws): (a["s"], a["n"]) for (k, ws, _we), a in contents.items()},
            [{"k": k, "ts": t, "v": v} for k, t, v in late])


def _windows(rows) -> dict:
    return {(r["k"], micros(r["window_start"])): (r["s"], r["n"]) for r in rows}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_tumbling_window_matches_oracle_with_out_of_order_and_late(seed, feed, tmp_path):
    items = _events(seed)
    f = feed()
    job = f.start(_tumbling(f.source(items, time_column="ts", delay_ms=10_000).dataset()),
                  checkpoint=str(tmp_path / "chk"), checkpoint_interval=0)
    assert job.await_termination(30)
    expected, late = _tumbling_oracle(f.arrivals())
    rows = job.sink.rows()
    assert len(rows) == len(expected)  # each window emitted exactly once
    assert _windows(rows) == expected
    assert sorted(map(row_key, job.late_records())) == sorted(map(row_key, late))
    assert late, "the data should contain late events"
    assert job.metrics()["late_records"] == len(late)


@pytest.mark.parametrize("window", [ms.tumbling("1m"), ms.sliding("2m", every="30s"),
                                    ms.session(gap="5s")])
def test_bounded_pipeline_same_in_batch_and_streaming(window, executor, tmp_path):
    items = _events(7, n_items=12)
    # a delay larger than any disorder: nothing is late, so both modes must agree
    ds = (filled_source(items, partitions=2).dataset().with_watermark("ts", "10m")
          .group_by("k").window(window).agg(ms.sum("v").alias("s"), ms.count().alias("n")))
    batch = ds.collect()
    job = ds.start(checkpoint=str(tmp_path / "chk"), checkpoint_interval=0, executor=executor)
    assert job.await_termination(30)
    assert job.late_records() == []
    assert sorted_rows(job.sink.rows()) == sorted_rows(batch)
    assert batch


def test_unkeyed_window_and_stateless_stages(executor):
    items = _events(11, n_items=10)
    ds = (filled_source(items).dataset().filter(ms.col("v") > 2).with_watermark("ts", "10m")
          .window(ms.tumbling("1m")).agg(ms.sum("v").alias("s")))
    job = ds.start(checkpoint_interval=0, executor=executor)
    assert job.await_termination(30)
    assert sorted_rows(job.sink.rows()) == sorted_rows(ds.collect())


def _process_ds(src):
    return src.dataset().with_watermark("ts", "5s").group_by("k").process(CountWithTimeout)


@pytest.mark.parametrize("epoch,point", [(6, "during_epoch"), (9, "after_checkpoint"),
                                         (13, "before_checkpoint")])
def test_keyed_process_state_and_timers_survive_restore(epoch, point, feed, tmp_path):
    items = _events(5, n_items=20, keys="abcd")
    f = feed()
    plain = f.start(_process_ds(f.source(items)), checkpoint_interval=0)
    assert plain.await_termination(30)
    expected = sorted_rows(plain.sink.rows())
    assert expected and plain.side_output("nines")
    sink, f = CollectingSink(), feed()
    job = f.crash_and_restore(_process_ds(f.source(items)), checkpoint=str(tmp_path / "chk"),
                              sink=sink, crash_epoch=epoch, point=point, checkpoint_interval=0)
    assert job.metrics()["restored_from_epoch"] is not None
    assert sorted_rows(sink.rows()) == expected
    assert sorted_rows(job.side_output("nines")) == sorted_rows(plain.side_output("nines"))
    # batch mode runs it too: timers fire only at the end of input, so one count per key
    batch = _process_ds(filled_source(items)).collect()
    assert Counter(r["k"] for r in batch) == Counter("abcd")
    assert sum(r["n"] for r in batch) == sum(r["n"] for r in expected) == sum(map(len, items))


def _read_dir(path) -> list[dict]:
    files = sorted(p for p in path.glob("*.parquet"))
    rows = []
    for f in files:
        rows.extend(pq.read_table(f).to_pylist())
    return rows


#: executor -> rows of the uninterrupted job of the crash cases (the same job in each case)
_UNINTERRUPTED: dict[str, list[dict]] = {}


@pytest.mark.parametrize("point", FAULT_POINTS)
@pytest.mark.parametrize("epoch", [2, 7])
def test_crash_after_epoch_gives_exactly_the_uninterrupted_file_output(point, epoch, executor,
                                                                       feed, tmp_path):
    items = _events(3, n_items=12)
    expected = _UNINTERRUPTED.get(executor)
    if expected is None:  # run once per executor in this test process
        ref_dir = tmp_path / "ref"
        f = feed()
        ref = f.start(_tumbling(f.source(items).dataset()), sink=str(ref_dir),
                      checkpoint_interval=0)
        assert ref.await_termination(30)
        expected = _UNINTERRUPTED[executor] = sorted_rows(_read_dir(ref_dir))
    assert expected
    out, f = tmp_path / "out", feed()
    f.crash_and_restore(_tumbling(f.source(items).dataset()), checkpoint=str(tmp_path / "chk"),
                        sink=FileStreamSink(str(out)), crash_epoch=epoch, point=point,
                        checkpoint_interval=0)
    assert sorted_rows(_read_dir(out)) == expected
    assert not list((out / "_staging").glob("*/*")), "no staged leftovers after the end"
    # and the Dataset API reads the committed output, skipping staging
    assert len(ms.read_parquet(str(out)).collect()) == len(expected)


def _wait(cond, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_stop_takes_a_final_checkpoint_and_restart_continues(executor, tmp_path):
    items = _events(9, n_items=10)
    src = filled_source(items[:5], close=False)
    chk, sink = str(tmp_path / "chk"), CollectingSink()
    job = _tumbling(src.dataset()).start(checkpoint=chk, sink=sink, checkpoint_interval="1h",
                                         executor=executor)
    _wait(lambda: job.metrics()["positions"].get(("_TestStream", 0)) == 5, "5 items read")
    job.stop()
    assert not job.is_active
    assert CheckpointStore(chk).latest()[1]["positions"] == {(0, 0, 0): 5}
    for rows in items[5:]:
        src.add(rows)
    src.close()
    job2 = _tumbling(src.dataset()).start(checkpoint=chk, sink=sink, checkpoint_interval=0,
                                          executor=executor)
    assert job2.await_termination(30)
    # every row is in its window's one row or reported late (the restarted job holds the
    # late rows the first one committed); which rows are late depends on when the parallel
    # executor's tasks see the watermark move, so the oracle takes the job's late rows
    late = Counter(map(row_key, job2.late_records()))
    assert sum(late.values()) == job2.metrics()["late_records"]
    on_time = []
    for r in (r for rows in items for r in rows):
        if late[row_key(r)]:
            late[row_key(r)] -= 1
        else:
            on_time.append(r)
    assert not +late, "late rows that are not in the input"
    expected, _ = _tumbling_oracle([(0, r, -(2**63)) for r in on_time])
    assert _windows(sink.rows()) == expected
    if executor == "inline":  # rounds: exactly the rows the plain-Python model finds late
        everything, model_late = _tumbling_oracle(
            arrivals([(0, "ts", 10_000, [(rows, None) for rows in items])], "rounds"))
        assert _windows(sink.rows()) == everything
        assert sorted(map(row_key, job2.late_records())) == sorted(map(row_key, model_late))


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


def test_idle_partition_does_not_hold_back_the_watermark(executor):
    clock = VirtualClock(0)
    src = TestSource(partitions=2)
    src.add([{"k": "a", "ts": 1_000, "v": 1}], partition=1)  # partition 1 then goes quiet
    src.add([{"k": "a", "ts": 1_000, "v": 1}], partition=0)
    ds = (src.dataset().with_watermark("ts", "0s", idle_timeout="10s").group_by("k")
          .window(ms.tumbling("1m")).agg(ms.count().alias("n")))
    job = ds.start(sink=CollectingSink(), checkpoint_interval=0, clock=clock, executor=executor)
    _wait(lambda: job.metrics()["records_in"] == 2, "the first rows to be read")
    src.add([{"k": "a", "ts": 120_000, "v": 1}], partition=0)
    _wait(lambda: job.metrics()["records_in"] == 3, "the third row to be read")
    time.sleep(0.3)
    assert job.sink.rows() == []  # partition 1 is not idle yet: window [0, 1m) stays open
    clock.advance(11_000_000)
    src.add([{"k": "a", "ts": 121_000, "v": 1}], partition=0)
    _wait(lambda: job.sink.rows(), "the window [0, 1m) to fire")
    assert [r["n"] for r in job.sink.rows()] == [2]
    job.stop()


def test_when_every_partition_is_idle_the_largest_watermark_counts(executor):
    """Partition 0 went quiet first (at 3 min of event time), partition 1 later (at 10 s):
    once both are idle, the watermark is the larger one (Flink's rule), not held at 10 s."""
    clock = VirtualClock(0)
    src = TestSource(partitions=2)
    ds = (src.dataset().with_watermark("ts", "0s", idle_timeout="10s").group_by("k")
          .window(ms.tumbling("1m")).agg(ms.count().alias("n")))
    job = ds.start(sink=CollectingSink(), checkpoint_interval=0, clock=clock, executor=executor)

    def wait_read(n):
        _wait(lambda: job.metrics()["records_in"] >= n, f"{n} rows to be read")

    src.add([{"k": "a", "ts": t * 1_000, "v": 1} for t in (1, 70, 130, 180)], partition=0)
    wait_read(4)
    clock.advance(5_000_000)
    src.add([{"k": "a", "ts": 10_000, "v": 1}], partition=1)
    wait_read(5)
    clock.advance(6_000_000)  # partition 0 idle (11 s), partition 1 not yet (6 s)
    time.sleep(0.2)
    assert job.sink.rows() == []  # watermark 10 s: no window closed
    clock.advance(5_000_000)  # both idle
    _wait(lambda: len(job.sink.rows()) >= 3, "three windows to fire")
    job.stop()
    assert [r["n"] for r in job.sink.rows()] == [2, 1, 1]  # [0,1m) [1m,2m) [2m,3m)


def test_generator_source_bounded_and_rate_limited(executor, tmp_path):
    ds = (ms.from_generator(lambda i: {"k": i % 3, "ts": i * 1000, "v": 1}, count=300,
                            partitions=2)
          .with_watermark("ts", "1m").group_by("k").window(ms.tumbling("1m"))
          .agg(ms.sum("v").alias("s")))
    job = ds.start(checkpoint=str(tmp_path / "chk"), checkpoint_interval=0, max_batch_records=50,
                   executor=executor)
    assert job.await_termination(30)
    assert sorted_rows(job.sink.rows()) == sorted_rows(ds.collect())
    assert sum(r["s"] for r in job.sink.rows()) == 300
    started = time.monotonic()
    live = ms.from_generator(lambda i: {"i": i}, rate=200).start(checkpoint_interval="50ms",
                                                                 executor=executor)
    _wait(lambda: len(live.sink.rows()) >= 20, "20 generated rows")
    live.stop()
    elapsed = time.monotonic() - started
    got = [r["i"] for r in live.sink.rows()]
    # in order, none missing, and no faster than 200 rows/s (a burst of one second at most)
    assert got == list(range(len(got))) and 20 <= len(got) <= 200 * (elapsed + 1)


def test_unsupported_streaming_plans_fail_clearly():
    # (a non-windowed aggregate runs on a stream now: a changelog, see test_changelog.py)
    src = filled_source(_events(1, n_items=2))
    with pytest.raises(ms.PlanError, match="Sort .* cannot run on an unbounded stream.*top_n"):
        src.dataset().sort("ts").start()
    with pytest.raises(ms.PlanError, match="Window .* cannot run on an unbounded stream"):
        src.dataset().with_columns(ms.lag("ts").over(partition_by="k", order_by="ts")
                                   .alias("prev")).start()


# ------------------------------------------------------------------------------ Kafka

kafka = pytest.mark.skipif(kafka_missing() is not None, reason=f"no Kafka: {kafka_missing()}")


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


@pytest.mark.ray_streaming
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
