"""Driver-side streaming sinks: a function per committed epoch (``ms.sink``) and the console."""

from __future__ import annotations

import io
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import millstream as ms
from millstream.core.arrow import format_table
from millstream.errors import PlanError, SimulatedCrash, StreamingError
from millstream.io.stream_sinks import CallbackSink, ConsoleSink, make_sink

SCHEMA = pa.schema([("k", pa.string()), ("ts", pa.int64()), ("v", pa.int64())])


def _items(seed: int = 3, n_items: int = 12, per_item: int = 5):
    rng = random.Random(seed)
    items, n = [], 0
    for i in range(n_items):
        rows = []
        for _ in range(per_item):
            rows.append({"k": rng.choice("abc"), "ts": i * 1000, "v": n})
            n += 1
        items.append(rows)
    return items


def _ds(f, items):
    """The items from the feed ``f`` (paced on the parallel executor: an epoch per item, as
    inline rounds give), rows with v % 3 == 0 left out."""
    return f.source(items, SCHEMA).dataset().filter(ms.col("v") % 3 != 0)


def _expected(items):
    return sorted(r["v"] for rows in items for r in rows if r["v"] % 3 != 0)


class Recorder:
    """Keeps every call: (epoch, values)."""

    def __init__(self, fail_on_epoch: int | None = None) -> None:
        self.calls: list[tuple[int, list[int]]] = []
        self.fail_on_epoch = fail_on_epoch

    def __call__(self, table: pa.Table, epoch: int) -> None:
        if epoch == self.fail_on_epoch:
            self.fail_on_epoch = None
            raise RuntimeError("downstream is down")
        assert isinstance(table, pa.Table)
        self.calls.append((epoch, table.column("v").to_pylist()))

    def values(self) -> list[int]:
        return sorted(v for _e, vs in self.calls for v in vs)


def test_sink_function_gets_each_committed_epoch_once_in_order(feed):
    items = _items()
    rec, f = Recorder(), feed()
    job = f.start(_ds(f, items), sink=ms.sink(rec), checkpoint_interval=0)
    assert job.await_termination(120)
    epochs = [e for e, _ in rec.calls]
    assert epochs == sorted(set(epochs)) and len(epochs) > 1
    assert all(vs for _e, vs in rec.calls)  # epochs without rows are skipped
    assert rec.values() == _expected(items)


def test_one_argument_function_and_plain_callable_as_sink(feed):
    items = _items(4)
    tables: list[pa.Table] = []
    f = feed(paced=False)
    job = f.start(_ds(f, items), sink=tables.append, checkpoint_interval=0)
    assert job.await_termination(120)
    assert isinstance(job.sink, CallbackSink)
    assert sorted(v for t in tables for v in t.column("v").to_pylist()) == _expected(items)


@pytest.mark.ray_streaming
def test_restart_after_a_recorded_commit_continues_with_the_next_epoch(feed, tmp_path):
    """The epoch's commit (the call) was recorded before the crash: the restarted job goes on
    with the next epoch, and nothing was delivered twice; the rows never went into the
    checkpoint."""
    items = _items(5)
    chk, f = str(tmp_path / "chk"), feed()
    ds = _ds(f, items)
    first_rec = Recorder()
    first = f.start(ds, sink=ms.sink(first_rec), checkpoint=chk, checkpoint_interval=0,
                    _fault=(4, "after_commit"))
    with pytest.raises(SimulatedCrash):  # (a generous bound: it returns once the job ends;
        first.await_termination(120)      # on Ray under two burners 30 s was too short)
    second_rec = Recorder()  # a new process
    second = f.start(ds, sink=ms.sink(second_rec), checkpoint=chk, checkpoint_interval=0)
    assert second.await_termination(120)
    assert [e for e, _ in first_rec.calls][-1] == 4
    assert second_rec.calls[0][0] == 5  # epoch 4's commit was recorded: not again
    delivered = dict(first_rec.calls)
    delivered.update(dict(second_rec.calls))  # what an fn idempotent per epoch keeps
    assert sorted(v for vs in delivered.values() for v in vs) == _expected(items)


@pytest.mark.parametrize("point", ["before_checkpoint", "after_checkpoint"])
def test_crash_before_the_call_loses_nothing(point, feed, tmp_path):
    items = _items(6)
    rec = Recorder()
    sink = ms.sink(rec)  # the same sink object across the restart (one process)
    chk, f = str(tmp_path / "chk"), feed()
    ds = _ds(f, items)
    first = f.start(ds, sink=sink, checkpoint=chk, checkpoint_interval=0, _fault=(5, point))
    with pytest.raises(SimulatedCrash):
        first.await_termination(120)
    second = f.start(ds, sink=sink, checkpoint=chk, checkpoint_interval=0)
    assert second.await_termination(120)
    assert rec.values() == _expected(items)  # exactly once here: no epoch called twice
    assert len({e for e, _ in rec.calls}) == len(rec.calls)


def test_a_failing_function_fails_the_job_and_the_restart_delivers_the_epoch(feed, tmp_path):
    items = _items(7)
    chk, f = str(tmp_path / "chk"), feed()
    ds = _ds(f, items)
    rec = Recorder(fail_on_epoch=3)
    job = f.start(ds, sink=ms.sink(rec), checkpoint=chk, checkpoint_interval=0)
    with pytest.raises(StreamingError, match="epoch 3.*downstream is down"):
        job.await_termination(120)
    job2 = f.start(ds, sink=ms.sink(rec), checkpoint=chk, checkpoint_interval=0)
    assert job2.await_termination(120)
    assert rec.values() == _expected(items)


def test_skip_empty_false_calls_for_epochs_without_rows():
    sink = CallbackSink(lambda t, e: calls.append((e, t.num_rows)), skip_empty=False)
    calls: list[tuple[int, int]] = []
    sink.begin(1)
    sink.write(pa.table({"v": pa.array([], pa.int64())}))
    sink.commit(sink.pre_commit(1))
    sink.begin(2)
    sink.write(pa.table({"v": [1, 2]}))
    handle = sink.pre_commit(2)
    sink.commit(handle)
    sink.commit(handle)  # a repeated commit in the same process is not delivered again
    assert calls == [(1, 0), (2, 2)]


def test_console_sink_prints_committed_rows(feed):
    items = _items(8, n_items=3, per_item=30)
    out, f = io.StringIO(), feed()
    job = f.start(_ds(f, items).select("k", "v"), sink=ms.console(num_rows=5, file=out),
                  checkpoint_interval=0)
    assert job.await_termination(120)
    text = out.getvalue()
    assert text.count("Epoch: ") == 3
    assert "only showing top 5 rows" in text
    block = text.split("Epoch: ")[1].splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in block
             if line.startswith("|")]
    assert cells[0] == ["k", "v"]
    first = [r for r in items[0] if r["v"] % 3 != 0][:5]
    assert cells[1:] == [[r["k"], str(r["v"])] for r in first]


def test_console_by_name_and_to_stdout(feed, capsys):
    f = feed()
    job = f.start(_ds(f, _items(9, n_items=2)), sink="console", checkpoint_interval=0)
    assert job.await_termination(120)
    assert isinstance(job.sink, ConsoleSink)
    assert "Epoch: 1" in capsys.readouterr().out


def test_format_table_layout():
    t = pa.table({"name": ["a" * 30, None], "n": [1, 22]})
    assert format_table(t, truncate=True).splitlines() == [
        "+--------------------+---+",
        "|                name|  n|",
        "+--------------------+---+",
        "|aaaaaaaaaaaaaaaaa...|  1|",
        "|                null| 22|",
        "+--------------------+---+",
    ]
    assert "a" * 30 in format_table(t, truncate=False)


def test_driver_sinks_are_not_parallel_and_bad_sinks_are_refused():
    for s in (ms.sink(print), ms.console(), make_sink(print), make_sink("console")):
        assert not hasattr(s, "for_subtask")
    with pytest.raises(PlanError, match="lacks"):
        make_sink(object())
    with pytest.raises(PlanError, match="function"):
        ms.sink(42)
    with pytest.raises(PlanError, match="num_rows"):
        ms.console(num_rows=0)


@pytest.mark.parametrize("executor", ["inline", "parallel"])
def test_an_immediate_sink_gets_rows_before_any_checkpoint(executor, tmp_path):
    """delivery="immediate": every output batch reaches fn as soon as it is made, in the task
    that made it, with no checkpoint to wait for (here: none in an hour)."""
    import os
    import time
    import uuid

    out = tmp_path / "got"
    out.mkdir()

    def deliver(table):  # runs in a worker process on the parallel executor
        name = uuid.uuid4().hex
        pq.write_table(table, out / f".{name}.tmp")
        os.rename(out / f".{name}.tmp", out / f"{name}.parquet")  # whole files only

    src = ms.from_generator(lambda i: {"id": i, "t": time.time()}, rate=2000)
    job = src.start(sink=ms.sink(deliver, delivery="immediate"), executor=executor,
                    checkpoint_interval="1h", max_batch_delay="5ms")
    try:
        deadline = time.monotonic() + 60
        def done() -> list[str]:
            return [f for f in os.listdir(out) if f.endswith(".parquet")]

        while len(done()) < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        got = pa.concat_tables([pq.read_table(out / f) for f in done()])
        assert got.num_rows > 0 and job.metrics()["checkpoints"] == 0
    finally:
        job.stop()
    with pytest.raises(ms.PlanError, match="delivery must be"):
        ms.sink(print, delivery="soon")


def test_kafka_sink_is_a_public_constructor():
    """``ms.kafka_sink`` builds the Kafka sink (no broker is contacted until a job runs)."""
    from millstream.io.kafka import KafkaSink

    sink = ms.kafka_sink("prices", "127.0.0.1:1", key="category", changelog="upsert")
    assert isinstance(sink, KafkaSink)
    with pytest.raises(ms.PlanError, match="topic"):
        ms.kafka_sink("", "127.0.0.1:1")
