"""Broadcast stream joins: an interval or window join whose one input is small (a window
aggregate without keys: a row per window) gets that input whole in every join task, and
the other input stays in the tasks that made its rows (Nexmark q7's shape). Results on
both executors against plain-Python oracles, across a crash, a restore at another
parallelism and a SIGKILLed task slot; the plans; the operator's checkpoint split."""

from __future__ import annotations

import os
import signal
from collections import defaultdict

import pyarrow as pa
import pytest
from faults import HeldRows
from oracles import sorted_rows
from streams import in_order_events

import millstream as ms
from millstream.core.context import default_context
from millstream.errors import PlanError, SimulatedCrash
from millstream.ops.stream_join import BROADCAST_GROUP, IntervalJoin, JoinKeys
from millstream.plan.compile import explain_plan, streaming_settings
from millstream.runtime.checkpoint import CheckpointStore
from millstream.testing import CollectingSink

MINUTE = 60_000
SCHEMA = pa.schema([("k", pa.string()), ("ts", pa.int64()), ("v", pa.int64())])


def _items(seed: int, n_items: int = 30, per_item: int = 8) -> list[list[dict]]:
    """Items of rows {k, ts (ms, moving forward), v}; several rows share a window's
    largest ``v`` now and then (few distinct values)."""
    return in_order_events(seed, n_items, per_item, "abcdef", max_v=12)


def _rows(items: list[list[dict]]) -> list[dict]:
    return [r for it in items for r in it]


def _highest(ds: ms.Dataset) -> ms.Dataset:
    """The largest ``v`` of each one-minute window: one row per window."""
    return ds.window(ms.tumbling("1m")).agg(ms.max("v").alias("maxv")).select("maxv",
                                                                              "window_end")


def _q7(src: ms.Dataset, how: str = "inner") -> ms.Dataset:
    """The rows whose ``v`` is the largest of their window (Nexmark q7's shape); ``how``
    "left": every row, with the window's end where it is the largest."""
    ds = src.with_watermark("ts", "5s")
    return (ds.select("k", "ts", "v")
            .interval_join(_highest(ds), left_on="v", right_on="maxv", between=("0s", "1m"),
                           right_time="window_end", how=how)
            .select("k", "ts", "v", "window_end"))


def _q7_oracle(rows: list[dict], how: str = "inner") -> list[dict]:
    best: dict[int, int] = {}
    for r in rows:
        w = r["ts"] // MINUTE
        best[w] = max(best.get(w, r["v"]), r["v"])
    out = []
    for r in rows:
        ends = [(w + 1) * MINUTE for w, m in best.items()
                if m == r["v"] and r["ts"] <= (w + 1) * MINUTE <= r["ts"] + MINUTE]
        out += [{**r, "window_end": e} for e in ends]
        if how == "left" and not ends:
            out.append({**r, "window_end": None})
    return out


def _canon(rows: list[dict]) -> list[dict]:
    """Window ends as epoch ms (the job gives timestamps)."""
    out = []
    for r in rows:
        e = r["window_end"]
        if e is not None and not isinstance(e, int):
            e = int(pa.scalar(e, pa.timestamp("us")).cast(pa.int64()).as_py()) // 1000
        out.append({**r, "window_end": e})
    return sorted_rows(out)


def _window_join(src: ms.Dataset) -> ms.Dataset:
    """Each row with the largest ``v`` of its one-minute window (a window join)."""
    ds = src.with_watermark("ts", "5s")
    highest = (ds.window(ms.tumbling("1m")).agg(ms.max("v").alias("maxv"))
               .select("maxv", (ms.col("window_end").cast(pa.int64()) - 1).cast(pa.timestamp("us"))
                       .alias("t"),
                       ms.lit(1).alias("one")))
    return (ds.with_columns(one=ms.lit(1))
            .window_join(highest, on="one", window=ms.tumbling("1m"), right_time="t")
            .select("k", "ts", "v", "maxv"))


def _window_join_oracle(rows: list[dict]) -> list[dict]:
    best: dict[int, int] = defaultdict(int)
    for r in rows:
        best[r["ts"] // MINUTE] = max(best[r["ts"] // MINUTE], r["v"])
    return [{**r, "maxv": best[r["ts"] // MINUTE]} for r in rows]


# ----------------------------------------------------------------------------- plans


def _physical(ds: ms.Dataset) -> str:
    return explain_plan(ds._node, streaming_settings(2)).split("== Physical plan ==")[1]


def test_the_small_side_is_broadcast_and_the_other_stays_in_its_tasks():
    src = ms.from_items(_rows(_items(1)))
    plan = _physical(_q7(src))
    assert "(small: broadcast)" in plan and "=> broadcast to every consumer task" in plan
    assert "(right input broadcast)" in plan
    # the large side: forwarded, never hashed by the join key
    assert "hash(__ms_jk0)" not in plan
    # a left join keeps its left (outer) side in place: still broadcast
    assert "(right input broadcast)" in _physical(_q7(src, "left"))
    # the small side is outer, or neither side is known to be small: both keyed
    for ds in (_q7(src, "right"), _q7(src, "outer"),
               src.with_watermark("ts", "5s").interval_join(
                   src.with_watermark("ts", "5s").group_by("k").window(ms.tumbling("1m"))
                   .agg(ms.max("v").alias("maxv")), left_on="v", right_on="maxv",
                   between=("0s", "1m"), right_time="window_end")):
        plan = _physical(ds)
        assert "broadcast" not in plan and "hash(__ms_jk0)" in plan


def test_a_broadcast_input_cannot_be_an_outer_side():
    with pytest.raises(PlanError, match="right input of a outer join cannot be broadcast"):
        IntervalJoin(["k"], ["k"], 0, 10, "lt", "rt", how="outer", broadcast=1)
    with pytest.raises(PlanError, match="broadcast must be"):
        IntervalJoin(["k"], ["k"], 0, 10, "lt", "rt", broadcast=2)


# ----------------------------------------------------------------------------- results


@pytest.mark.parametrize(("how", "parallelism", "partitions"),
                         [("inner", 2, 2), ("left", 3, 2), ("inner", 2, 1), ("inner", 2, 3)])
def test_broadcast_interval_join_matches_the_oracle(how, parallelism, partitions, feed,
                                                    tmp_path):
    """(The join runs as many tasks as the forwarded side has: its source's partitions.)"""
    items = _items(2)
    f = feed(paced=False)
    ds = _q7(f.source(items, SCHEMA, partitions).dataset(), how)
    job = f.start(ds, checkpoint=str(tmp_path / "chk"), checkpoint_interval=0,
                  parallelism=parallelism)
    assert job.await_termination(60)
    want = _q7_oracle(_rows(items), how)
    assert _canon(job.sink.rows()) == _canon(want)
    assert not job.late_records()
    # batch mode (no broadcast there) agrees; a left join's tasks that see no row of the
    # small side still pad with its columns (they are known from the plan)
    assert _canon(_q7(ms.from_items(_rows(items)), how).collect()) == _canon(want)


def test_broadcast_window_join_matches_the_oracle(feed, tmp_path):
    items = _items(3)
    f = feed(paced=False)
    ds = _window_join(f.source(items, SCHEMA, 2).dataset())
    assert "(right input broadcast)" in _physical(ds)
    job = f.start(ds, checkpoint=str(tmp_path / "chk"), checkpoint_interval=0, parallelism=2)
    assert job.await_termination(60)
    assert sorted_rows(job.sink.rows()) == sorted_rows(_window_join_oracle(_rows(items)))


def test_broadcast_join_restarts_from_a_checkpoint(feed, tmp_path):
    items = _items(4)
    sink, f = CollectingSink(), feed()  # paced: epoch 6 comes before the end
    ds = _q7(f.source(items, SCHEMA, 2).dataset())
    f.crash_and_restore(ds, checkpoint=str(tmp_path / "chk"), sink=sink, crash_epoch=6,
                        point="after_checkpoint", checkpoint_interval=0, parallelism=2)
    assert _canon(sink.rows()) == _canon(_q7_oracle(_rows(items)))


@pytest.mark.parametrize(("before", "after"), [(2, 3), (3, 1)])
def test_broadcast_join_restored_at_another_parallelism(before, after, feed, tmp_path):
    items = _items(5, n_items=36)
    chk, sink, f = str(tmp_path / "chk"), CollectingSink(), feed()
    ds = _q7(f.source(items, SCHEMA, 2).dataset())
    first = f.start(ds, checkpoint=chk, sink=sink, checkpoint_interval=0, parallelism=before,
                    _fault=(12, "after_checkpoint"))
    with pytest.raises(SimulatedCrash):
        first.await_termination(60)
    state = CheckpointStore(chk).latest()[1]
    assert state["parallelism"] == before
    joins = [(k, groups) for k, groups in state["keyed"].items() if BROADCAST_GROUP in groups]
    assert len(joins) == 1, "the join's state should hold its broadcast input"
    (_key, groups), = joins
    # the broadcast rows once (partition 0's; a window's row is dropped once the watermark
    # passes its end: often none are left), the other input's rows by key group
    assert len(groups[BROADCAST_GROUP]) == 1
    assert groups[BROADCAST_GROUP][0]["sides"][0] is None
    assert any(st["sides"][0] is not None and st["sides"][0].num_rows
               for g, sts in groups.items() if g != BROADCAST_GROUP for st in sts)
    second = f.start(ds, checkpoint=chk, sink=sink, checkpoint_interval=0, parallelism=after)
    assert second.await_termination(60)
    assert second.metrics()["restored_from_epoch"] == 11
    assert _canon(sink.rows()) == _canon(_q7_oracle(_rows(items)))


def test_a_killed_task_slot_of_a_broadcast_join_restarts_from_the_checkpoint(tmp_path):
    """SIGKILL of a slot process of the parallel executor while the job runs (half the
    input is held back, so the kill lands in the middle); the result is still right."""
    rows = _rows(_items(6, n_items=60, per_item=20))
    held = HeldRows(rows, partitions=2, chunk=20)
    sink = CollectingSink()
    job = _q7(held.dataset()).start(checkpoint=str(tmp_path / "chk"), executor="parallel",
                                    parallelism=2, sink=sink, checkpoint_interval="50ms")
    held.wait_until_checkpointed(job)
    os.kill(job.host_pids()[-1], signal.SIGKILL)
    held.release()
    assert job.await_termination(120)
    assert job.metrics()["restarts"] == 1
    assert _canon(sink.rows()) == _canon(_q7_oracle(rows))


# ----------------------------------------------------------------------------- operator level


def _op(partition: int) -> IntervalJoin:
    op = IntervalJoin(["k"], ["k"], 0, 10_000_000, "lt", "rt", broadcast=1)
    op.open(default_context(partition=partition))
    return op


def _keyed(side: str, rows: list[dict], time: str) -> pa.RecordBatch:
    batch = pa.RecordBatch.from_pylist(rows, pa.schema([("k", pa.string()),
                                                         (time, pa.timestamp("us"))]))
    (out,) = JoinKeys(["k"], side).process(batch)
    return out


def test_only_partition_0_checkpoints_and_reports_the_broadcast_input():
    right = _keyed("right", [{"k": "a", "rt": 5_000_000}, {"k": "b", "rt": 6_000_000}], "rt")
    late = _keyed("right", [{"k": "c", "rt": 1_000_000}], "rt")
    ops = [_op(0), _op(1)]
    for i, op in enumerate(ops):
        op.process(_keyed("left", [{"k": "ab"[i], "lt": 4_000_000}], "lt"), 0)
        op.process(right, 1)
        op.on_watermark(2_000_000)
        op.process(late, 1)  # late: reported once, by partition 0
    assert [len(op.take_side_output("late")) for op in ops] == [1, 0]
    snaps = [op.snapshot_by_key_group(8) for op in ops]
    assert BROADCAST_GROUP in snaps[0] and BROADCAST_GROUP not in snaps[1]
    assert snaps[0][BROADCAST_GROUP]["sides"][1].num_rows == 2
    for snap in snaps:  # key groups hold the local (left) rows only
        assert all(st["sides"][1] is None for g, st in snap.items() if g != BROADCAST_GROUP)
    assert sum(st["sides"][0].num_rows for snap in snaps for g, st in snap.items()
               if st["sides"][0] is not None) == 2
    # restored as one task (every group and the broadcast input): joins a new left row
    # with the broadcast rows once
    one = _op(0)
    one.restore_key_groups([st for snap in snaps for st in snap.values()])
    out = one.process(_keyed("left", [{"k": "b", "lt": 3_000_000}], "lt"), 0)
    assert sum(b.num_rows for b in out) == 1
    assert one.snapshot()["sides"][1].num_rows == 2


def test_every_task_restores_the_broadcast_input_and_its_own_key_groups():
    from millstream.core.keygroups import owned_key_groups
    from millstream.runtime.checkpoint import RestoreTarget, plan_restore

    op = _op(0)
    states = {g: [{"g": g}] for g in (0, 40, 90, 127)}
    states[BROADCAST_GROUP] = [{"g": BROADCAST_GROUP}]
    key = (2, 0)
    state = {"signature": "sig", "key_groups": 128, "parallelism": 2, "positions": {},
             "layout": [(*key, 0), (*key, 1)], "keyed": {(*key, 0): states}, "ops": {}}
    targets = [RestoreTarget((*key, i), [op], True, False, 3) for i in range(3)]
    _kg, plan = plan_restore("chk", 1, state, targets, signature="sig", parallelism=3,
                             key_groups_option=None)
    for i in range(3):
        kind, got = plan[(*key, i)][0]
        owned = set(owned_key_groups(i, 3, 128))
        assert kind == "keyed"
        assert [st["g"] for st in got] == [g for g in (0, 40, 90, 127) if g in owned] + [
            BROADCAST_GROUP]
