"""Map-side combining of tumbling and sliding windows (``ops.window.WindowCombiner``).

The combiner turns rows into partial window states before the key exchange; the window
operator after it must give exactly what it gives on raw rows: same windows, same
aggregates, same late rows in the side output.
"""

from __future__ import annotations

import datetime as dt
import pickle

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracles import oracle_fixed
from window_cases import (
    WINDOWS,
    assert_matches,
    check_emission_timing,
    drive,
    make,
    resolve,
    rows_of,
    script_of,
    steps_st,
    to_batch,
)

import millstream as ms
from millstream.core.context import default_context
from millstream.core.time import MIN_WATERMARK
from millstream.errors import MillstreamError
from millstream.expr.aggregates import AggSpec
from millstream.expr.windows import Session, Sliding, Tumbling
from millstream.ops.window import WindowAggregate, WindowCombiner
from millstream.runtime.streaming.wire import decode_batch, encode_batch

FIXED = [w for w in WINDOWS if w[2] is not None]


def combiner_for(window, lateness, watermark=None) -> WindowCombiner:
    op = make(window, lateness=lateness)  # for its resolved specs
    return WindowCombiner(window, ["k"], op.specs, "t", op.allowed_lateness, watermark)


def drive_combined(window_factory, script, lateness, snapshot_at=None):
    """Like ``window_cases.drive``, with a combiner in front of the window operator; its
    batches cross an Arrow IPC round trip, as between tasks."""
    comb = combiner_for(window_factory(), lateness)
    comb.start_watermark(MIN_WATERMARK)  # as a task of the parallel executor does
    op = make(window_factory(), lateness=lateness)
    emitted, late, combined_rows = [], [], 0
    for i, (kind, arg) in enumerate(script):
        if snapshot_at == i:
            state = pickle.loads(pickle.dumps(op.snapshot()))
            op = make(window_factory(), lateness=lateness)
            op.restore(state)
        if kind == "b":
            out = []
            for b in comb.process(to_batch(arg)):
                b = decode_batch(encode_batch(b))
                if b.schema.metadata:
                    combined_rows += b.num_rows
                out += list(op.process(b))
        else:
            comb.on_watermark(arg)
            out = op.on_watermark(arg)
        emitted += [(op.watermark, r) for r in rows_of(out)]
        late += [(r["k"], r["t"], r["v"]) for b in op.take_side_output("late")
                 for r in b.to_pylist()]
    emitted += [(None, r) for r in rows_of(op.finish())]
    late += [(r["k"], r["t"], r["v"]) for b in op.take_side_output("late") for r in b.to_pylist()]
    return emitted, late, combined_rows


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=steps_st, which=st.sampled_from(FIXED), lateness=st.sampled_from([0, 2_500_000]),
       cut=st.integers(0, 20))
def test_combined_windows_match_the_oracle(steps, which, lateness, cut):
    name, assigner, windows_of = which
    script = script_of(steps)
    want, want_late = oracle_fixed(script, windows_of, lateness)
    # arrival order inside a sliding window can change when only some of its rows combine
    skip = ("f",) if name == "sliding" else ()
    for snap in (None, cut):
        emitted, late, _ = drive_combined(assigner, script, lateness, snapshot_at=snap)
        check_emission_timing(emitted)
        assert_matches(resolve(emitted), want, skip=skip)
        assert sorted(late, key=repr) == sorted(want_late, key=repr)


def test_rows_that_could_be_late_pass_unchanged():
    comb = combiner_for(Tumbling("5s"), 0)
    events = [("a", 1_000, 1), ("a", 2_000, 2), ("b", 7_000, 3), ("a", 12_000, None)]
    # not started (the inline executor): rows pass through
    assert [b.num_rows for b in comb.process(to_batch(events))] == [4]
    comb.on_watermark(1_000_000)
    assert [b.num_rows for b in comb.process(to_batch(events))] == [4]
    comb.start_watermark(5_000_000)  # window [0s, 5s) may be late downstream: rows go raw
    out = list(comb.process(to_batch(events)))
    states, raw = out
    assert states.schema.metadata and not raw.schema.metadata
    assert raw.to_pylist() == [{"k": "a", "t": 1_000, "v": 1}, {"k": "a", "t": 2_000, "v": 2}]
    assert states.num_rows == 2  # (b, [5s,10s)) and (a, [10s,15s))
    # a row without event time goes on for the "invalid" side output
    bad = pa.RecordBatch.from_pylist([{"k": "a", "t": None, "v": 1}], schema=to_batch([]).schema)
    assert [b.to_pylist() for b in comb.process(bad)] == [bad.to_pylist()]


def test_sliding_rows_combine_only_when_all_their_windows_live():
    comb = combiner_for(Sliding("6s", "2s"), 0, watermark=5_000_000)
    # t=4.5s lies in [0,6) (live), [2,8) and [4,10): combined; t=1s lies in [-4,2), [-2,4),
    # [0,6): its first window ended before the watermark, so it goes raw
    out = list(comb.process(to_batch([("a", 4_500, 1), ("a", 1_000, 2)])))
    assert [b.num_rows for b in out] == [3, 1]
    assert out[1].to_pylist() == [{"k": "a", "t": 1_000, "v": 2}]


def test_time_zone_survives_combining():
    t0 = dt.datetime(2024, 3, 1, 12, 0, 7, tzinfo=dt.timezone.utc)
    batch = pa.record_batch({"k": ["x", "x"], "t": pa.array([t0, t0], pa.timestamp("ms", "UTC")),
                             "v": [1, 2]})
    comb = WindowCombiner(Tumbling("1m"), ["k"], [AggSpec("sum", "v", "s")], "t",
                          watermark=MIN_WATERMARK)
    op = WindowAggregate(Tumbling("1m"), ["k"], [ms.sum("v").alias("s")], "t")
    op.open(default_context())
    for b in comb.process(batch):
        assert not list(op.process(decode_batch(encode_batch(b))))
    out = pa.Table.from_batches(list(op.finish()))
    assert out.schema.field("window_start").type == pa.timestamp("us", tz="UTC")
    assert out.column("s").to_pylist() == [3]


def test_state_batches_joined_by_the_receiving_task_are_merged():
    """A task joins queued batches of several senders into one: the same key and window
    can then appear twice in one state batch."""
    combs = [combiner_for(Tumbling("5s"), 0, watermark=MIN_WATERMARK) for _ in range(2)]
    parts = [next(iter(c.process(to_batch([("a", 1_000, i), ("b", 2_000, i)]))))
             for i, c in enumerate(combs)]
    joined = pa.Table.from_batches(parts).combine_chunks().to_batches()
    assert len(joined) == 1 and joined[0].num_rows == 4
    op = make(Tumbling("5s"))
    assert not list(op.process(joined[0]))
    got = {(r["k"], r["n"], r["s"]) for r in rows_of(op.finish())}
    assert got == {("a", 2, 1), ("b", 2, 1)}


def test_expired_combined_states_fail_loudly():
    comb = combiner_for(Tumbling("5s"), 0, watermark=MIN_WATERMARK)
    op = make(Tumbling("5s"))
    op.on_watermark(20_000_000)
    (states,) = comb.process(to_batch([("a", 1_000, 1)]))
    with pytest.raises(MillstreamError, match="pre-aggregated window states arrived after"):
        op.process(states)


def test_sessions_do_not_combine():
    with pytest.raises(ms.PlanError, match="only tumbling and sliding"):
        WindowCombiner(Session("3s"), ["k"], [AggSpec("sum", "v", "s")], "t")


# --------------------------------------------------------------------------- in plans


def _events(n: int) -> list[dict]:
    return [{"k": f"k{i % 5}", "t": 1_000 * (i // 3) + (i % 7) * 300, "v": i % 11}
            for i in range(n)]


def _pipeline(items, idle_timeout=None, parts=3):
    ds = ms.from_items(items, num_partitions=parts)
    ds = ds.with_watermark("t", delay="2s", idle_timeout=idle_timeout) if idle_timeout \
        else ds.with_watermark("t", delay="2s")
    return ds.group_by("k").window(ms.tumbling("10s"), on="t").agg(
        ms.sum("v").alias("s"), ms.count().alias("n"), ms.mean("v").alias("m"))


def _canonical(rows) -> list:
    return sorted((str(r["window_start"]), r["k"], r["s"], r["n"], round(r["m"], 9))
                  for r in rows)


def test_plans_combine_before_the_window_exchange_unless_a_source_can_go_idle():
    items = _events(30)
    assert "window combiner" in _pipeline(items).explain(print_plan=False)
    assert "window combiner" not in _pipeline(items, idle_timeout="5s").explain(print_plan=False)
    sessions = ms.from_items(items).with_watermark("t", delay="2s").group_by("k").window(
        ms.session(gap="3s"), on="t").agg(ms.count().alias("n"))
    assert "window combiner" not in sessions.explain(print_plan=False)


def test_streaming_results_equal_batch_and_the_parallel_executor_ships_fewer_rows(executor, tmp_path):
    items = _events(6000)
    want = _canonical(_pipeline(items).collect())
    job = _pipeline(items).start(parallelism=2, executor=executor, max_batch_records=500,
                                 checkpoint_interval="1h")
    assert job.await_termination(120)
    assert _canonical(job.sink.rows()) == want
    ops = job.metrics()["operators"]
    comb = {k: v for k, v in ops.items() if k.startswith("WindowCombiner")}
    assert comb, list(ops)
    rows_in = sum(v["records_in"] for v in comb.values())
    rows_out = sum(v["records_out"] for v in comb.values())
    assert rows_in == len(items)
    if executor == "parallel":
        assert rows_out < rows_in / 5, comb
    else:  # in-process exchanges: the inline executor does not combine
        assert rows_out == rows_in


def test_the_combiner_can_be_turned_off(monkeypatch):
    items = _events(300)
    combined = _canonical(_pipeline(items).collect())
    monkeypatch.setenv("MILLSTREAM_WINDOW_COMBINER", "0")
    assert "window combiner" not in _pipeline(items).explain(print_plan=False)
    assert _canonical(_pipeline(items).collect()) == combined


def test_job_with_late_rows_stopped_and_restarted_counts_every_row_once(executor, tmp_path):
    """Out-of-order rows, allowed lateness (updates) and a stop/restart in the middle, on
    both executors (the parallel one combines): each row is counted in its window's final
    row or reported late, exactly once."""
    import random
    import time

    rnd = random.Random(11)
    n = 12_000
    rows = [{"k": f"k{i % 7}", "t": max(0, i * 10 + rnd.randint(-4_000, 300)), "id": i}
            for i in range(n)]

    def slow(batch):
        time.sleep(0.01)
        return batch

    pipeline = (ms.from_items(rows, num_partitions=3).map_batches(slow)
                .with_watermark("t", delay="1s").group_by("k")
                .window(ms.tumbling("2s"), on="t", allowed_lateness="1s")
                .agg(ms.count().alias("n"), ms.sum("id").alias("s")))
    assert "window combiner" in pipeline.explain(print_plan=False)

    def start():
        return pipeline.start(checkpoint=str(tmp_path / "chk"), checkpoint_interval="50ms",
                              parallelism=2, max_batch_records=100, executor=executor)

    job = start()
    deadline = time.time() + 60
    while job.metrics()["checkpoints"] < 3 and job.is_active and time.time() < deadline:
        time.sleep(0.02)
    assert job.is_active, "the job ended before it could be stopped"
    job.stop()
    first = job.sink.rows()
    job = start()
    assert job.await_termination(120)
    assert job.metrics()["restored_from_epoch"] is not None
    final: dict[tuple, dict] = {}
    for r in [*first, *job.sink.rows()]:  # upsert by key and window
        final[(r["k"], r["window_start"])] = r
    late = job.late_records()  # the restored job holds the committed ones of the first
    assert sum(r["n"] for r in final.values()) + len(late) == n
    assert sum(r["s"] for r in final.values()) + sum(r["id"] for r in late) == n * (n - 1) // 2
    assert len(late) > 0  # the data has rows beyond the watermark delay and the lateness


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(0, 40_000), st.one_of(st.none(),
                                                                  st.integers(-50, 50))),
                     min_size=1, max_size=40),
       size=st.sampled_from(["5s", "20s", "1m"]),
       start=st.sampled_from([MIN_WATERMARK, 10_000_000]))
def test_keyless_states_without_a_grouping_are_the_groupings(rows, size, start):
    """Without keys a batch's rows lie in a window or few: the combiner takes their states
    from Arrow's scalar kernels, typed and valued as the grouping makes them."""
    specs = [AggSpec("count_all", None, "n"), AggSpec("min", ms.col("v"), "lo"),
             AggSpec("max", ms.col("v"), "hi"), AggSpec("sum", ms.col("v"), "s"),
             AggSpec("max", ms.col("d"), "last")]
    schema = pa.schema([("t", pa.int64()), ("v", pa.int64()), ("d", pa.timestamp("ms"))])
    batch = pa.RecordBatch.from_pylist(
        [{"t": t, "v": v, "d": None if v is None else t + 7} for t, v in rows], schema=schema)

    def states(fast: bool) -> tuple[list, list]:
        comb = WindowCombiner(Tumbling(size), [], specs, "t")
        comb.start_watermark(start)  # (rows of windows ending by then go on raw)
        if not fast:
            comb._few_windows = lambda *a: None
        out = comb.process(batch)
        combined = [pa.Table.from_batches([b]).sort_by("__millstream_ws")
                    for b in out if b.schema.metadata]
        return ([(t.schema, t.to_pylist()) for t in combined],
                [b.to_pylist() for b in out if not b.schema.metadata])

    assert states(True) == states(False)


@pytest.mark.parametrize("window", [Tumbling("2s"), Sliding("6s", "2s")])
def test_combined_states_spilled_and_snapshotted_merge_like_raw_rows(tmp_path, window):
    """Combined states go into the window's store as they come (a sliding combiner sends a
    row per pane of a window, several senders' batches may be joined): merged when the
    window is read, also from disk and after a snapshot mid-stream."""
    import random

    rnd = random.Random(5)
    script = []
    for i in range(30):
        base = i * 2_000
        script.append(("b", [(f"k{rnd.randrange(300)}", base + rnd.randrange(-20_000, 20_000),
                              rnd.choice([None, *range(-5, 50)])) for _ in range(400)]))
        if i % 3 == 2:
            script.append(("w", (base - 25_000) * 1000))
    want = resolve(drive(lambda: make(window, lateness="30s"), script)[0])

    def run(limit, snapshot_at=None):
        def new_op():
            op = WindowAggregate(window, ["k"], make(window).specs, "t",
                                 allowed_lateness=30_000_000, state_memory_limit=limit)
            op.open(default_context(spill_dir=str(tmp_path)))
            return op

        comb = WindowCombiner(window, ["k"], make(window).specs, "t", 30_000_000)
        comb.start_watermark(MIN_WATERMARK)
        op, emitted, pending = new_op(), [], []
        for i, (kind, arg) in enumerate(script):
            if snapshot_at == i:
                state = pickle.loads(pickle.dumps(op.snapshot()))
                op = new_op()
                op.restore(state)
            if kind == "b":
                pending += [b for b in comb.process(to_batch(arg)) if b.schema.metadata]
                if len(pending) < 2:
                    continue
                # two batches of states joined into one, as a task joins queued messages
                joined = pa.Table.from_batches(pending).combine_chunks().to_batches()
                pending = []
                out = [r for b in joined for r in op.process(b)]
            else:
                comb.on_watermark(arg)
                out = [*(r for b in pending for r in op.process(b)), *op.on_watermark(arg)]
                pending = []
            emitted += [(op.watermark, r) for r in rows_of(out)]
        emitted += [(None, r) for r in rows_of(op.finish())]
        return resolve(emitted)

    # (arrival order inside a sliding window changes when rows combine: first/last and
    # the order of collected lists may differ, as in test_combined_windows_match_the_oracle)
    # and a mean's float sum may round differently
    order = ("f",) if isinstance(window, Sliding) else ()

    def canon(res: dict) -> dict:
        def value(n: str, v):
            if n == "l":
                return sorted(v, key=repr)
            return round(v, 9) if n == "m" and v is not None else v

        return {k: {n: value(n, v) for n, v in r.items() if n not in order}
                for k, r in res.items()}

    assert canon(run(None)) == canon(want)
    assert canon(run(16 << 10)) == canon(want)
    assert canon(run(16 << 10, snapshot_at=len(script) // 2)) == canon(want)
