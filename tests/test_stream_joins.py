"""Stream joins (interval, window, latest value, stream-table) on both executors against
plain-Python oracles, in streaming and batch mode, across restores at another parallelism."""

from __future__ import annotations

import datetime as dt
import time

import pyarrow as pa
import pytest
from join_cases import (
    CSCHEMA,
    LEFT,
    LSCHEMA,
    RIGHT,
    RSCHEMA,
    changelog_items,
    everything,
    interval,
    interval_oracle,
    late_rows,
    latest_ds,
    latest_oracle,
    side,
    window_join,
    window_oracle,
)
from oracles import sorted_rows
from streams import filled_source

import millstream as ms
from millstream.core.context import default_context
from millstream.core.keygroups import key_hashes
from millstream.errors import PlanError, SchemaError, SimulatedCrash
from millstream.ops.stream_join import IntervalJoin, JoinKeys
from millstream.testing import CollectingSink, TestSource

# ----------------------------------------------------------------------------- interval join


@pytest.mark.parametrize("how", ["inner", "left", "right", "outer"])
def test_interval_join_matches_oracle_streaming_and_batch(how, feed):
    f = feed()
    job = f.start(interval(f, how), checkpoint_interval=0, parallelism=3)
    assert job.await_termination(30)
    expected, late = interval_oracle(f.arrivals(), -4000, 6000, how)
    assert late, "the data should contain late rows"
    assert sorted_rows(job.sink.rows()) == sorted_rows(expected)
    assert late_rows(job) == sorted_rows(late)
    assert {r["join_side"] for r in job.late_records()} == {"left", "right"}
    # batch mode: nothing is late, every row takes part
    assert sorted_rows(interval(None, how).collect()) == \
        sorted_rows(interval_oracle(everything(), -4000, 6000, how)[0])


def test_interval_join_streaming_equals_batch_when_nothing_is_late(executor):
    ds = interval(None, "outer", delay="10m")
    job = ds.start(checkpoint_interval=0, parallelism=2, executor=executor)
    assert job.await_termination(30)
    assert job.late_records() == []
    assert sorted_rows(job.sink.rows()) == sorted_rows(ds.collect())


@pytest.mark.parametrize("before,after,epoch,point", [(2, 3, 5, "after_checkpoint"),
                                                      (3, 1, 8, "during_epoch")])
def test_interval_join_restores_at_another_parallelism(before, after, epoch, point, feed,
                                                       tmp_path):
    f = feed()
    plain = f.start(interval(f, "left"), checkpoint_interval=0, parallelism=before)
    assert plain.await_termination(30)
    expected = sorted_rows(plain.sink.rows())
    assert expected == sorted_rows(interval_oracle(f.arrivals(), -4000, 6000, "left")[0])
    chk, sink, f = str(tmp_path / "chk"), CollectingSink(), feed()
    ds = interval(f, "left")
    first = f.start(ds, checkpoint=chk, sink=sink, checkpoint_interval=0,
                    parallelism=before, _fault=(epoch, point))
    with pytest.raises(SimulatedCrash):
        first.await_termination(30)
    second = f.start(ds, checkpoint=chk, sink=sink, checkpoint_interval=0, parallelism=after)
    assert second.await_termination(30)
    assert second.metrics()["restored_from_epoch"] is not None
    assert sorted_rows(sink.rows()) == expected
    assert late_rows(second) == late_rows(plain)


def _rounds(f, left_items, right_items):
    """One partition per input, no disorder allowed (delay 0): each item is one round
    (inline) or one step of a paced feed (parallel)."""
    left = f.source(left_items, LSCHEMA, 1, "L", "lt", 0)
    right = f.source(right_items, RSCHEMA, 1, "R", "rt", 0)
    return (left.dataset().with_watermark("lt", "0s"), right.dataset().with_watermark("rt", "0s"))


def _ids(rows, *cols):
    """Sorted tuples of id columns (None as -1)."""
    return sorted(tuple(-1 if r[c] is None else r[c] for c in cols) for r in rows)


def test_interval_join_bounds_lateness_and_clean_up_at_the_exact_edges(feed):
    s = 1000
    left_items = [[{"k": "a", "lt": 10 * s, "x": 1}],
                  [{"k": "c", "lt": 15 * s, "x": 2}],
                  [{"k": "d", "lt": 20 * s, "x": 3}]]
    right_items = [[{"k": "b", "rt": 15 * s, "y": 1}],                  # watermark -> 10 s
                   [{"k": "a", "rt": 15 * s, "y": 2},                   # = l1 + upper
                    {"k": "c", "rt": 15 * s, "y": 3}],                  # = l2 + lower; wm -> 15 s
                   [{"k": "a", "rt": 15 * s, "y": 4},                   # time = watermark: on time
                    {"k": "a", "rt": 15 * s - 1, "y": 5}]]              # 1 ms behind: late
    f = feed()
    left, right = _rounds(f, left_items, right_items)
    ds = left.interval_join(right, on="k", between=("0s", "5s"), how="outer")
    job = f.start(ds, checkpoint_interval=0)
    assert job.await_termination(30)
    expected, late = interval_oracle(f.arrivals(), 0, 5000, "outer")
    assert _ids(job.sink.rows(), "x", "y") == _ids(expected, "x", "y")
    assert [(r["y"], r["join_side"]) for r in job.late_records()] == \
        [(r["y"], "right") for r in late]
    if f.schedule == "rounds":  # the edges, worked out by hand for rounds
        # l1 (a, 10 s) is kept while 10 s + 5 s >= watermark 15 s, so y=4 still meets it
        assert _ids(expected, "x", "y") == [(-1, 1), (1, 2), (1, 4), (2, 3), (3, -1)]
        assert [r["y"] for r in late] == [5]
    # batch mode (the sources ended with the job): nothing is late
    assert _ids(ds.collect(), "x", "y") == [(-1, 1), (1, 2), (1, 4), (1, 5), (2, 3), (3, -1)]


def test_window_join_window_closes_exactly_at_the_watermark(feed):
    s = 1000
    left_items = [[{"k": "a", "lt": 5 * s, "x": 1}], [{"k": "a", "lt": 10 * s, "x": 2}]]
    right_items = [[{"k": "z", "rt": 10 * s, "y": 1}],                  # watermark -> 5 s
                   [{"k": "a", "rt": 9 * s, "y": 2}],                   # wm 10 s: [0, 10) fires
                   [{"k": "a", "rt": 10 * s - 500, "y": 3},             # [0, 10) closed: late
                    {"k": "a", "rt": 10 * s, "y": 4}]]                  # [10, 20): joins x=2
    f = feed()
    left, right = _rounds(f, left_items, right_items)
    ds = left.window_join(right, on="k", window=ms.tumbling("10s"), how="outer")
    job = f.start(ds, checkpoint_interval=0)
    assert job.await_termination(30)
    expected, late = window_oracle(f.arrivals(), 10_000, None, "outer")
    rows = [{**r, "w": r["window_start"].second} for r in job.sink.rows()]
    want = [{**r, "w": r["window_start"] // 1_000_000} for r in expected]
    assert _ids(rows, "w", "x", "y") == _ids(want, "w", "x", "y")
    assert [r["y"] for r in job.late_records()] == [r["y"] for r in late]
    if f.schedule == "rounds":  # worked out by hand for rounds
        assert _ids(want, "w", "x", "y") == [(0, 1, 2), (10, -1, 1), (10, 2, 4)]
        assert [r["y"] for r in late] == [3]


def test_interval_join_invalid_times_and_explicit_time_columns(executor):
    left = TestSource(schema=pa.schema([("id", pa.int64()), ("when", pa.int64())]))
    left.add([{"id": 1, "when": 10_000}, {"id": 2, "when": None}, {"id": 3, "when": 20_000}])
    left.close()
    right = TestSource(schema=pa.schema([("key", pa.int64()), ("at", pa.int64())]))
    right.add([{"key": 1, "at": 9_000}, {"key": 3, "at": 30_000}, {"key": 2, "at": 10_000}])
    right.close()
    ds = left.dataset().interval_join(right.dataset(), left_on="id", right_on="key",
                                      between=(-1_000_000, "10s"), left_time="when", right_time="at")
    job = ds.start(checkpoint_interval=0, executor=executor)
    assert job.await_termination(30)
    assert sorted_rows(job.sink.rows()) == sorted_rows([
        {"id": 1, "when": 10_000, "key": 1, "at": 9_000},
        {"id": 3, "when": 20_000, "key": 3, "at": 30_000}])
    assert [r["id"] for r in job.side_output("invalid")] == [2]
    assert sorted_rows(ds.collect()) == sorted_rows(job.sink.rows())


def test_interval_join_arguments_are_checked():
    left = filled_source(LEFT, 1, LSCHEMA).dataset()
    right = filled_source(RIGHT, 1, RSCHEMA).dataset().with_watermark("rt", "1s")
    with pytest.raises(PlanError, match="left_time"):
        left.interval_join(right, on="k", between=("0s", "1s"))
    with pytest.raises(PlanError, match="lower <= upper"):
        left.interval_join(right, on="k", between=("1s", "-1s"), left_time="lt")
    with pytest.raises(PlanError, match="between"):
        left.interval_join(right, on="k", left_time="lt")
    with pytest.raises(PlanError, match="how"):
        left.interval_join(right, on="k", between=(0, 1), left_time="lt", how="semi")
    with pytest.raises(PlanError, match="session"):
        left.window_join(right, on="k", window=ms.session("1s"), left_time="lt")


# ----------------------------------------------------------------------------- key types


def _typed(ltype: pa.DataType, rtype: pa.DataType, lvals, rvals):
    left = TestSource(schema=pa.schema([("k", ltype), ("t", pa.int64()), ("x", pa.int64())]),
                      partitions=2)
    right = TestSource(schema=pa.schema([("k", rtype), ("t", pa.int64()), ("y", pa.int64())]),
                       partitions=2)
    for i, v in enumerate(lvals):
        left.add([{"k": v, "t": 1000 + i, "x": i}], partition=i % 2)
    for i, v in enumerate(rvals):
        right.add([{"k": v, "t": 1000 + i, "y": i}], partition=i % 2)
    left.close()
    right.close()
    return (left.dataset().with_watermark("t", "1h")
            .interval_join(right.dataset().with_watermark("t", "1h"), on="k",
                           between=("-1m", "1m")))


@pytest.mark.parametrize("ltype,rtype,lvals,rvals", [
    (pa.int32(), pa.int64(), list(range(20)), list(range(10, 30))),
    (pa.timestamp("ms"), pa.timestamp("us"),
     [dt.datetime(2024, 1, 1, 0, 0, i) for i in range(20)],
     [dt.datetime(2024, 1, 1, 0, 0, i) for i in range(10, 30)]),
    (pa.string(), pa.large_string(), [str(i) for i in range(20)], [str(i) for i in range(10, 30)]),
])
def test_keys_of_different_types_meet_in_one_key_group(ltype, rtype, lvals, rvals, executor):
    ds = _typed(ltype, rtype, lvals, rvals)
    job = ds.start(checkpoint_interval=0, parallelism=4, executor=executor)
    assert job.await_termination(30)
    rows = job.sink.rows()
    assert sorted((r["x"], r["y"]) for r in rows) == [(i, i - 10) for i in range(10, 20)]
    assert sorted((r["x"], r["y"]) for r in ds.collect()) == [(i, i - 10) for i in range(10, 20)]


def test_incomparable_key_types_raise_a_schema_error(executor):
    ds = _typed(pa.string(), pa.int64(), ["1", "2"], [1, 2])
    job = ds.start(checkpoint_interval=0, parallelism=1, executor=executor)
    with pytest.raises(SchemaError, match="cast one side"):
        job.await_termination(30)


# ----------------------------------------------------------------------------- window join


@pytest.mark.parametrize("window,size,every", [(ms.tumbling("10s"), 10_000, None),
                                               (ms.sliding("10s", every="5s"), 10_000, 5000)])
@pytest.mark.parametrize("how", ["inner", "left", "outer"])
def test_window_join_matches_oracle_streaming_and_batch(window, size, every, how, feed):
    f = feed()
    job = f.start(window_join(f, window, how), checkpoint_interval=0, parallelism=2)
    assert job.await_termination(30)
    expected, late = window_oracle(f.arrivals(), size, every, how)
    assert late and expected
    assert sorted_rows(job.sink.rows()) == sorted_rows(expected)
    assert late_rows(job) == sorted_rows(late)
    assert sorted_rows(window_join(None, window, how).collect()) == \
        sorted_rows(window_oracle(everything(), size, every, how)[0])


def test_window_join_restores_at_another_parallelism(feed, tmp_path):
    window = ms.tumbling("10s")
    f = feed()
    plain = f.start(window_join(f, window, "outer"), checkpoint_interval=0, parallelism=3)
    assert plain.await_termination(30)
    expected = sorted_rows(plain.sink.rows())
    chk, sink, f = str(tmp_path / "chk"), CollectingSink(), feed()
    ds = window_join(f, window, "outer")
    first = f.start(ds, checkpoint=chk, sink=sink, checkpoint_interval=0, parallelism=3,
                    _fault=(6, "before_checkpoint"))
    with pytest.raises(SimulatedCrash):
        first.await_termination(30)
    second = f.start(ds, checkpoint=chk, sink=sink, checkpoint_interval=0, parallelism=2)
    assert second.await_termination(30)
    assert sorted_rows(sink.rows()) == expected


# ----------------------------------------------------------------------------- join_latest


@pytest.mark.parametrize("how,version,deleted", [("inner", None, None), ("left", None, "gone"),
                                                 ("left", "ver", "gone"), ("inner", "ver", None)])
def test_join_latest_matches_oracle(how, version, deleted, feed, tmp_path):
    items = changelog_items(11)
    f = feed()
    ds = latest_ds(f.source(items, CSCHEMA), how, version, deleted)
    # one source read by both inputs: an item's orders see the updates of earlier items
    job = f.start(ds, checkpoint_interval=0, parallelism=2)
    assert job.await_termination(30)
    expected = latest_oracle(items, how, version, deleted, batch=False)
    assert sorted_rows(job.sink.rows()) == sorted_rows(expected)
    # batch mode reads the whole changelog first: every order meets the last version
    assert sorted_rows(ds.collect()) == sorted_rows(
        latest_oracle(items, how, version, deleted, batch=True))
    # restored at another parallelism, the state (one row per key) carries over
    sink, chk, f = CollectingSink(), str(tmp_path / "chk"), feed()
    ds = latest_ds(f.source(items, CSCHEMA), how, version, deleted)
    first = f.start(ds, checkpoint=chk, sink=sink, checkpoint_interval=0, parallelism=2,
                    _fault=(9, "after_checkpoint"))
    with pytest.raises(SimulatedCrash):
        first.await_termination(30)
    second = f.start(ds, checkpoint=chk, sink=sink, checkpoint_interval=0, parallelism=3)
    assert second.await_termination(30)
    assert sorted_rows(sink.rows()) == sorted_rows(expected)


def test_changelog_side_does_not_hold_back_the_watermark(executor):
    orders = TestSource(schema=pa.schema([("cur", pa.string()), ("ts", pa.int64())]))
    for i in range(6):
        orders.add([{"cur": "eur", "ts": i * 30_000}])
    orders.close()
    rates = TestSource(schema=pa.schema([("cur", pa.string()), ("rate", pa.int64())]))
    rates.add([{"cur": "eur", "rate": 2}])  # stays open: the changelog never ends
    ds = (orders.dataset().with_watermark("ts", "0s")
          .join_latest(rates.dataset(), on="cur", how="left")
          .window(ms.tumbling("1m"), on="ts").agg(ms.count().alias("n")))
    job = ds.start(checkpoint_interval=0, executor=executor)
    deadline = time.time() + 20
    while sum(r["n"] for r in job.sink.rows()) < 6 and time.time() < deadline:
        time.sleep(0.02)
    assert job.is_active  # the changelog is still open
    job.stop()
    assert sorted(r["n"] for r in job.sink.rows()) == [2, 2, 2]


# ----------------------------------------------------------------------------- stream-table


def _prices():
    return ms.from_items([{"k": k, "p": p} for k, p in [("a", 1), ("a", 2), ("b", 5), ("c", 7)]])


@pytest.mark.parametrize("how", ["inner", "left", "semi", "anti"])
def test_stream_joined_with_a_bounded_table(how, feed, tmp_path):
    items = side(5, "lt", "x", n_items=10, per_item=5, keys="abde")
    # the table side is any batch computation: here an aggregate
    table = _prices().group_by("k").agg(ms.sum("p").alias("p"))
    prices = {"a": 3, "b": 5, "c": 7}
    f = feed(paced=False)
    ds = f.source(items, LSCHEMA, 2).dataset().join(table, on="k", how=how)
    job = f.start(ds, checkpoint=str(tmp_path / "chk"), checkpoint_interval=0, parallelism=2)
    assert job.await_termination(30)
    rows = [r for it in items for r in it]
    if how == "inner":
        expected = [{**r, "p": prices[r["k"]]} for r in rows if r["k"] in prices]
    elif how == "left":
        expected = [{**r, "p": prices.get(r["k"])} for r in rows]
    elif how == "semi":
        expected = [r for r in rows if r["k"] in prices]
    else:
        expected = [r for r in rows if r["k"] not in prices]
    assert sorted_rows(job.sink.rows()) == sorted_rows(expected)
    assert sorted_rows(ds.collect()) == sorted_rows(expected)
    if how == "left":  # a restarted job computes the table again and continues
        sink, f = CollectingSink(), feed()  # paced: epoch 4 comes before the end
        ds = f.source(items, LSCHEMA, 2).dataset().join(table, on="k", how=how)
        f.crash_and_restore(ds, checkpoint=str(tmp_path / "chk2"), sink=sink, crash_epoch=4,
                            point="after_checkpoint", checkpoint_interval=0)
        assert sorted_rows(sink.rows()) == sorted_rows(expected)


def test_stream_table_join_refuses_outer_joins_and_two_streams_refuse_semi_joins():
    # two streams make a regular join (tests/test_regular_joins.py), inner to outer only
    stream = filled_source(LEFT, 1, LSCHEMA).dataset()
    other = filled_source(RIGHT, 1, RSCHEMA, close=False).dataset()
    with pytest.raises(PlanError, match="semi join of two streams is not supported"):
        stream.join(other, on="k", how="semi").start(checkpoint_interval=0)
    with pytest.raises(PlanError, match="needs the end of the stream"):
        stream.join(_prices(), on="k", how="right").start(checkpoint_interval=0)


# ----------------------------------------------------------------------------- operator level


def test_interval_join_operator_snapshots_split_by_key_group_and_merge_back():
    def make():
        op = IntervalJoin(["k"], ["k"], -4_000_000, 6_000_000, "lt", "rt", how="outer")
        op.open(default_context())
        return op

    lkeys, rkeys = JoinKeys(["k"]), JoinKeys(["k"])

    def feed(ops, items, port, keys, schema):
        out = []
        for rows in items:
            b = next(iter(keys.process(pa.RecordBatch.from_pylist(rows, schema=schema))))
            for op in ops:
                out += op.process(b, port)
        return out

    def rows(batches):
        return sorted_rows(r for b in batches for r in b.to_pylist())

    half = len(LEFT) // 2
    whole = make()
    out = feed([whole], LEFT[:half], 0, lkeys, LSCHEMA) + feed([whole], RIGHT[:half], 1, rkeys,
                                                               RSCHEMA)
    out += whole.on_watermark(20_000_000)
    groups = whole.snapshot_by_key_group(8)
    assert len(groups) > 2 and all(g["key_group"] == k for k, g in groups.items())
    copy = make()
    copy.restore(whole.snapshot())
    # three new instances, each owning some key groups: every row goes to the owner of its
    # key group (a null key is in the group of the null hash)
    parts = [make() for _ in range(3)]
    for i, op in enumerate(parts):
        op.restore_key_groups([st for g, st in groups.items() if g % 3 == i])
    rest = []
    for ops in ([whole], [copy]):
        rest.append(feed(ops, LEFT[half:], 0, lkeys, LSCHEMA)
                    + feed(ops, RIGHT[half:], 1, rkeys, RSCHEMA) + list(ops[0].finish()))
    split = []
    for port, items, keys, schema in ((0, LEFT[half:], lkeys, LSCHEMA),
                                      (1, RIGHT[half:], rkeys, RSCHEMA)):
        for r in items:
            b = next(iter(keys.process(pa.RecordBatch.from_pylist(r, schema=schema))))
            g = key_hashes([b.column("__ms_jk0")], b.num_rows) % 8
            for i, op in enumerate(parts):
                mine = pa.array((g % 3) == i)
                split += op.process(b.filter(mine), port)
    for op in parts:
        split += op.finish()
    assert rows(rest[0]) == rows(rest[1]) == rows(split)
    assert rows(out + rest[0])  # something was joined


@pytest.mark.ray_streaming
def test_stream_table_join_on_both_executors(executor):
    stream = ms.from_generator(lambda i: {"k": i % 3, "i": i}, count=10)
    table = ms.from_items([{"k": 0, "p": 1}, {"k": 0, "p": 2}, {"k": 1, "p": 5}])
    job = stream.join(table, on="k").start(executor=executor, checkpoint_interval=0,
                                           parallelism=2)
    assert job.await_termination(60)
    want = sorted((i, p) for i in range(10) for k, p in ((0, 1), (0, 2), (1, 5)) if i % 3 == k)
    assert sorted((r["i"], r["p"]) for r in job.sink.rows()) == want
