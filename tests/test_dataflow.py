"""The parallel streaming executor: tasks in worker processes, backpressure, restarts
(and, where a test is about the job rather than its processes, the inline executor too)."""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import pytest
from faults import HeldRows, wait_for
from streams import read_ids as _read_ids
from streams import wait_until as _wait

import millstream as ms
from millstream.io.files.stream_sink import FileStreamSink
from millstream.io.stream_sinks import CollectingSink
from millstream.runtime.streaming.job import StreamingJob


def _rows(n: int, keys: int = 5) -> list[dict]:
    return [{"id": i, "k": f"k{i % keys}", "ts": 1_000 * i, "v": i % 97} for i in range(n)]


def _windows(ds):
    return (ds.with_watermark("ts", "0s").group_by("k").window(ms.tumbling("10s"), on="ts")
            .agg(ms.count().alias("n"), ms.sum("v").alias("s")))


def _key(rows):
    return sorted((r["k"], r["window_start"], r["n"], r["s"]) for r in rows)




@pytest.mark.parametrize("parallelism", [1, 3])
def test_windows_match_batch_and_tasks_run_in_other_processes(parallelism, tmp_path):
    rows = _rows(3000)
    pipeline = _windows(ms.from_items(rows, num_partitions=2))
    job = pipeline.start(checkpoint=str(tmp_path / "chk"), checkpoint_interval="50ms",
                         parallelism=parallelism, max_batch_records=200)
    assert job.executor == "parallel"
    pids = []
    assert _wait(lambda: bool(pids.extend(job.host_pids()) or pids), 30)
    assert job.await_termination(60)
    assert os.getpid() not in pids
    assert _key(job.sink.rows()) == _key(pipeline.collect())
    m = job.metrics()
    assert m["records_in"] == 3000 and m["checkpoints"] >= 1 and m["restarts"] == 0
    window = next(v for k, v in m["operators"].items() if k.startswith("WindowAggregate"))
    combiner = [v for k, v in m["operators"].items() if k.startswith("WindowCombiner")]
    # rows become partial window states before the exchange (far fewer reach the window)
    assert sum(v["records_in"] for v in combiner) == 3000
    assert 0 < window["records_in"] <= sum(v["records_out"] for v in combiner) < 3000
    assert window["state_bytes"] >= 0 and m["last_checkpoint_seconds"] is not None


def _keyed_file_job(rows: list[dict], tmp_path) -> tuple[StreamingJob, Any, HeldRows]:
    """Start a keyed job writing files (checkpoints every 50 ms) on the first half of
    ``rows``; returns the job, its output directory and the source (``release()`` feeds
    the rest and ends it)."""
    out = tmp_path / "out"
    held = HeldRows(rows, partitions=2, chunk=40)
    ds = held.dataset().select("id", "k")
    job = ds.repartition(2, "k").start(checkpoint=str(tmp_path / "chk"), executor="parallel",
                                       checkpoint_interval="50ms", sink=FileStreamSink(str(out)),
                                       parallelism=2)
    return job, out, held


def _kill_a_task_mid_job(rows: list[dict], tmp_path) -> tuple[StreamingJob, Any]:
    """Start a keyed job writing files; SIGKILL a task of its last stage once the rows fed
    first are read and checkpointed (the job cannot have ended: half its input is held
    back); then feed the rest and wait for the job to end. Returns the job and its output
    directory."""
    job, out, held = _keyed_file_job(rows, tmp_path)
    held.wait_until_checkpointed(job)
    os.kill(job.host_pids()[-1], signal.SIGKILL)
    held.release()
    assert job.await_termination(120)
    return job, out


def test_a_killed_task_host_restarts_from_the_checkpoint_exactly_once(tmp_path):
    rows = _rows(4000)
    job, out = _kill_a_task_mid_job(rows, tmp_path)
    m = job.metrics()
    assert m["restarts"] == 1 and m["restored_from_epoch"] is not None
    assert Counter(_read_ids(out)) == Counter(r["id"] for r in rows)


def test_a_host_lost_while_restarting_is_one_more_restart(tmp_path, monkeypatch):
    """A host that dies while the job starts again (a Ray actor placed on a node being
    removed) is one more restart from the checkpoint, not a failed job."""
    from millstream.errors import WorkerLostError
    from millstream.runners.local import LocalRunner

    real, calls = LocalRunner.start_stream_hosts, []

    def flaky(self, payloads, inbox_capacity):
        calls.append(len(payloads))
        if len(calls) == 2:
            raise WorkerLostError("a task host died while starting (injected by the test)")
        return real(self, payloads, inbox_capacity)

    monkeypatch.setattr(LocalRunner, "start_stream_hosts", flaky)
    rows = _rows(3000)
    job, out = _kill_a_task_mid_job(rows, tmp_path)
    assert len(calls) == 3 and job.metrics()["restarts"] == 2
    assert Counter(_read_ids(out)) == Counter(r["id"] for r in rows)


def test_a_task_that_lost_a_peer_restarts_the_job(tmp_path, monkeypatch):
    """A task whose send failed because the peer's host is gone (a Ray actor on a lost
    node) reports WorkerLostError: the coordinator restarts from the checkpoint instead of
    failing the job with it."""
    from millstream.errors import WorkerLostError
    from millstream.runners.local import LocalRunner

    real, injected = LocalRunner.start_stream_hosts, []

    def hosts_whose_task_loses_a_peer(self, payloads, inbox_capacity):
        hosts = real(self, payloads, inbox_capacity)
        poll = hosts.poll

        def poll_and_inject(timeout):
            msgs = poll(timeout)
            if not injected and any(m[0] == "ack" for m in msgs):
                injected.append(1)  # what a task's failed send reports
                msgs = [*msgs, ("error", 0, "WorkerLostError: a streaming task's peer was "
                                "lost (injected)", "", WorkerLostError("peer lost"))]
            return msgs

        hosts.poll = poll_and_inject
        return hosts

    monkeypatch.setattr(LocalRunner, "start_stream_hosts", hosts_whose_task_loses_a_peer)
    rows = _rows(3000)
    job, out, held = _keyed_file_job(rows, tmp_path)
    wait_for(lambda: injected, 60, "the injected peer loss")
    held.release()
    assert job.await_termination(120)
    assert injected and job.metrics()["restarts"] == 1
    assert Counter(_read_ids(out)) == Counter(r["id"] for r in rows)


def test_a_slow_consumer_slows_the_source_down(tmp_path):
    """Bounded inboxes: the source never runs far ahead of what the consumer took."""
    n = 12_000
    rows = _rows(n)

    def slow(batch):
        time.sleep(0.02)
        return batch

    ds = ms.from_items(rows, num_partitions=1).repartition(1, "k").map_batches(slow)
    job = ds.start(parallelism=1, max_batch_records=50, inbox_capacity=2,
                   checkpoint_interval="1h")
    lags = []
    while job.is_active:
        m = job.metrics()
        ops = m["operators"]
        taken = sum(v["records_in"] for k, v in ops.items() if "slow" in k or "map_batches" in k)
        if m["records_in"]:
            lags.append(m["records_in"] - taken)
        time.sleep(0.05)
    assert job.await_termination(60)
    assert len(job.sink.rows()) == n
    assert len(lags) > 20
    # the consumer takes 50 rows per 20 ms (about 5 s in all); an unbounded inbox would let
    # the source read all 12 000 rows at once. Bounded: a few messages in the inbox and the
    # pipe, plus what metrics reported a quarter second apart by two processes can differ
    assert max(lags) <= 3_000, lags


def test_a_task_error_fails_the_job_with_the_users_exception(executor, tmp_path):
    def bad(row):
        if row["id"] == 123:
            raise ValueError("bad row 123")
        return row

    job = ms.from_items(_rows(500)).map(bad).start(parallelism=2, executor=executor)
    with pytest.raises(ms.UserFunctionError, match="bad row 123") as info:
        job.await_termination(60)
    assert isinstance(info.value.original, ValueError) and "'id': 123" in str(info.value)
    assert "in streaming task stage" in str(info.value)
    # the user's own frame, with its file and line (not cloudpickle's <dynamic-code>)
    assert f'File "{__file__}"' in info.value.user_traceback
    assert 'raise ValueError("bad row 123")' in info.value.user_traceback


def test_stop_takes_a_final_checkpoint_and_a_restart_continues_exactly_once(executor, tmp_path):
    out, chk = tmp_path / "out", tmp_path / "chk"

    def start():
        return (ms.from_generator(lambda i: {"id": i}, rate=4000, partitions=2)
                .start(checkpoint=str(chk), checkpoint_interval="50ms",
                       sink=FileStreamSink(str(out)), parallelism=2, executor=executor))

    job = start()
    assert _wait(lambda: len(_read_ids(out)) > 200)
    job.stop()
    first = _read_ids(out)
    job = start()
    assert _wait(lambda: len(_read_ids(out)) > len(first) + 200)
    job.stop()
    ids = _read_ids(out)
    assert len(ids) == len(set(ids))
    assert set(first) <= set(ids)


class _RetiringSink(FileStreamSink):
    """A file sink that records which instances the coordinator retires."""

    retired: list[list[int]] = []

    def retire_instances(self, indices) -> None:
        _RetiringSink.retired.append(list(indices))


def test_a_restart_at_lower_parallelism_retires_the_extra_sink_instances(executor, tmp_path):
    import json

    chk = tmp_path / "chk"
    _RetiringSink.retired = []

    def run(parallelism: int) -> None:
        job = (ms.from_generator(lambda i: {"id": i, "k": i % 5, "ts": i}, rate=4000,
                                 partitions=2)
               .with_watermark("ts", "0s").group_by("k")
               .window(ms.tumbling("1s"), on="ts").agg(ms.count().alias("n"))
               .start(checkpoint=str(chk), checkpoint_interval="50ms",
                      sink=_RetiringSink(str(tmp_path / "out")), parallelism=parallelism,
                      executor=executor))
        assert _wait(lambda: job.metrics()["checkpoints"] >= 2, 60)
        job.stop()

    run(3)
    assert _RetiringSink.retired == []
    assert json.loads((chk / "_job.json").read_text())["sink_instances"] == 3
    run(2)  # instance 2 of the first run has no task any more
    assert _RetiringSink.retired == [[2]]
    run(2)
    assert _RetiringSink.retired == [[2]]  # retired once
    assert json.loads((chk / "_job.json").read_text())["sink_instances"] == 2


def test_rescaled_restore_of_a_job(executor, tmp_path):
    rows = _rows(2000, keys=17)
    src = tmp_path / "in"
    src.mkdir()
    import json

    (src / "a.json").write_text("".join(json.dumps(r) + "\n" for r in rows[:1000]))
    chk = tmp_path / "chk"
    pipeline = _windows(ms.read_json(str(src), watch=True))
    job = pipeline.start(checkpoint=str(chk), checkpoint_interval="50ms", parallelism=2,
                         executor=executor)
    assert _wait(lambda: job.metrics()["records_in"] == 1000)
    assert _wait(lambda: job.metrics()["checkpoints"] >= 1)
    job.stop()
    first = job.sink.rows()
    (src / "b.json").write_text("".join(json.dumps(r) + "\n" for r in rows[1000:]))
    job2 = pipeline.start(checkpoint=str(chk), checkpoint_interval="50ms", parallelism=3,
                          stop_at_end=True, executor=executor)
    assert _wait(lambda: job2.metrics()["records_in"] >= 1000)
    job2.stop()
    # windows closed in the first run, plus the rest: together the batch result except the
    # windows still open at the end (no watermark passes them on an unbounded source)
    got = _key(first + job2.sink.rows())
    expected = _key(_windows(ms.from_items(rows)).collect())
    assert len(set(got)) == len(got)
    assert set(got) <= set(expected) and len(got) >= len(expected) - 17


_ORPHAN_SCRIPT = r'''
import sys, time
import millstream as ms
job = ms.from_generator(lambda i: {"id": i}, rate=1000).start(parallelism=2)
while not job.host_pids():
    time.sleep(0.05)
print(" ".join(map(str, job.host_pids())), flush=True)
time.sleep(60)
'''


def test_task_hosts_end_when_the_driver_is_killed(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(_ORPHAN_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE)
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert pids
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    def gone() -> bool:
        for pid in pids:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            return False
        return True

    assert _wait(gone, 15)


def test_executor_choice_and_errors():
    from millstream.testing import TestSource

    src = TestSource().close()
    job = src.dataset().start()
    assert job.executor == "inline"  # a test source prefers this process (deterministic)
    assert job.await_termination(30)
    job = src.dataset().start(executor="parallel")  # and runs in task processes when asked
    assert job.executor == "parallel" and job.await_termination(30)
    with pytest.raises(ms.PlanError, match="executor must be one of"):
        ms.from_items([{"a": 1}]).start(executor="threads")

    class InProcess(TestSource):
        """A source that can only be read in this process."""

        in_process_only = True

    with pytest.raises(ms.PlanError, match="executor='inline'"):
        StreamingJob(InProcess().close().dataset()._node, sink=CollectingSink(),
                     executor="parallel")


def test_checkpoints_are_incremental_for_large_keyed_state(tmp_path):
    """Key groups whose state did not change since the last checkpoint are not written
    again; a restore from such a checkpoint gives the exact result."""
    import json

    src, chk = tmp_path / "in", tmp_path / "chk"
    src.mkdir()
    hour = 3_600_000

    def write(name, rows):
        (src / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    first = [{"k": f"key-{i:06d}", "ts": 1_000 + i} for i in range(30_000)]
    write("a.json", first)
    pipeline = (ms.read_json(str(src), watch=True).with_watermark("ts", "0s").group_by("k")
                .window(ms.tumbling("1h"), on="ts").agg(ms.count().alias("n")))

    def start():
        return pipeline.start(checkpoint=str(chk), checkpoint_interval="50ms", parallelism=1,
                              key_groups=4)

    def settle():  # until no more checkpoints come (the one after the last input is in)
        done = -1
        while job.metrics()["checkpoints"] != done:
            done = job.metrics()["checkpoints"]
            time.sleep(0.5)

    def blobs():
        return {p.name: p.stat().st_size for p in (chk / "shared").iterdir()}

    job = start()
    assert _wait(lambda: job.metrics()["records_in"] == 30_000)
    settle()
    before = blobs()
    full = sum(before.values())
    window = next(v for k, v in job.metrics()["operators"].items() if k.startswith("WindowAggregate"))
    assert window["state_bytes"] > 200_000  # 30 000 open windows
    write("b.json", [{"k": "key-000007", "ts": 2_000}] * 5)  # one key: one key group changes
    assert _wait(lambda: job.metrics()["records_in"] == 30_005)
    settle()
    job.stop()
    new = {n: size for n, size in blobs().items() if n not in before}
    assert full > 200_000 and 0 < sum(new.values()) < full / 2, (full, new)
    assert list((chk / "shared").iterdir())
    job = start()  # restores from the incremental checkpoint
    write("c.json", [{"k": "key-000001", "ts": 3 * hour}])  # moves the watermark past 1h
    assert _wait(lambda: len(job.sink.rows()) >= 30_000)
    job.stop()
    counts = {r["k"]: r["n"] for r in job.sink.rows()}
    want = Counter(r["k"] for r in first)
    want["key-000007"] += 5
    assert counts == dict(want)


def test_keyed_state_larger_than_the_task_memory_limit(executor, tmp_path):
    """20 000 keys of state under a 256 KB per-task budget: state spills, results exact."""
    from millstream.ops.state.descriptors import ValueStateDescriptor
    from millstream.ops.state.process import KeyedProcessFunction

    class Totals(KeyedProcessFunction):
        def open(self, ctx):
            self.total = ctx.get_state(ValueStateDescriptor("total", 0))
            self.pad = ctx.get_state(ValueStateDescriptor("pad", ""))

        def process_element(self, row, ctx):
            self.total.update(self.total.value() + row["v"])
            self.pad.update("x" * 64)  # some bytes per key
            if row["last"]:
                yield {"k": ctx.key, "total": self.total.value()}

    n_keys = 20_000
    rows = [{"k": f"key{i % n_keys}", "v": i, "last": i >= 2 * n_keys} for i in range(3 * n_keys)]
    job = (ms.from_items(rows, num_partitions=1).group_by("k").process(Totals())  # key order
           .start(executor=executor, memory_limit="256KB", parallelism=2,
                  checkpoint=str(tmp_path / "chk"), checkpoint_interval="200ms"))
    assert job.await_termination(120)
    want = Counter()
    for r in rows:
        want[r["k"]] += r["v"]
    assert {r["k"]: r["total"] for r in job.sink.rows()} == dict(want)
    assert job.metrics()["counters"].get("millstream.state_spills", 0) > 0  # it did spill
    with pytest.raises(ms.PlanError, match="memory_limit"):
        ms.from_items(rows[:3]).start(executor=executor, memory_limit="-1")


def test_spilled_window_state_survives_checkpoints_and_a_killed_task(tmp_path):
    """Window state far over the task budget spills; checkpoints take it a key group at a
    time; a killed task restores from them; the windows are exact."""
    rows = [{"k": f"key{i % 4_000}", "t": (i // 4_000) * 1_000, "v": i} for i in range(48_000)]

    def slow(batch):
        time.sleep(0.04)
        return batch

    pipeline = (ms.from_items(rows, num_partitions=2).map_batches(slow)
                .with_watermark("t", "1h").group_by("k")  # every window open to the end
                .window(ms.tumbling("1s"), on="t")
                .agg(ms.sum("v").alias("s"), ms.collect_list("v").alias("l")))
    job = pipeline.start(memory_limit="256KB", parallelism=2, max_batch_records=500,
                         checkpoint=str(tmp_path / "chk"), checkpoint_interval="100ms")
    assert _wait(lambda: job.metrics()["checkpoints"] >= 2
                 and job.metrics()["counters"].get("millstream.state_spills", 0) > 0, 60)
    assert job.is_active, "the job ended before a task could be killed"
    os.kill(job.host_pids()[-1], signal.SIGKILL)  # a window task
    assert job.await_termination(120)
    assert job.metrics()["restarts"] == 1
    epoch = datetime.datetime(1970, 1, 1)  # the int (ms) time column gives naive windows
    got = {(r["k"], (r["window_start"] - epoch).total_seconds()): (r["s"], sorted(r["l"]))
           for r in job.sink.rows()}
    want: dict[tuple, tuple[int, list[int]]] = {}
    for r in rows:
        key = (r["k"], r["t"] // 1_000)
        s, lst = want.get(key, (0, []))
        want[key] = (s + r["v"], [*lst, r["v"]])
    assert got == {k: (s, sorted(lst)) for k, (s, lst) in want.items()}


def test_a_checkpoint_that_does_not_complete_in_time_fails_the_attempt(tmp_path):
    def stuck(batch):
        time.sleep(3)  # longer than the checkpoint timeout, every time
        return batch

    job = (ms.from_items(_rows(200), num_partitions=1).map_batches(stuck)
           .start(checkpoint=str(tmp_path / "chk"), checkpoint_interval="10ms",
                  checkpoint_timeout="500ms", max_restarts=1, parallelism=1,
                  max_batch_records=50))
    with pytest.raises(ms.errors.MillstreamError,
                       match=r"checkpoint \d+ did not complete within 0.5s.*gave up after 1"):
        job.await_termination(60)
    assert job.metrics()["restarts"] == 1


def test_generators_may_make_whole_batches_and_the_task_budget_follows_the_machine():
    import pyarrow as pa

    from millstream.runtime.session import get_session

    def batch(i):
        return pa.record_batch({"id": list(range(i * 100, i * 100 + 100))})

    ds = ms.from_generator(batch, count=20, partitions=2)
    assert ds.count() == 2000  # count counts batches
    for executor in ("inline", "parallel"):
        job = ds.filter(ms.col("id") % 2 == 0).start(executor=executor, parallelism=2)
        assert job.await_termination(60)
        assert sorted(r["id"] for r in job.sink.rows()) == list(range(0, 2000, 2))
    # no memory_limit: the session's limit shared by the job's tasks (not a fixed 256 MiB)
    from millstream.runtime.streaming.layout import task_budget

    limit = get_session().settings.resolved_memory_limit()
    assert task_budget(None, 4)["memory_budget"] == max(64 << 20, limit // 4)
