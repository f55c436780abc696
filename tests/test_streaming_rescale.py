"""Rescaling streaming jobs: keyed state by key groups, restored at another parallelism."""

from __future__ import annotations

import pyarrow as pa
import pytest
from oracles import sorted_rows
from streams import CountWithTimeout, events, filled_source

import millstream as ms
from millstream.core.context import default_context
from millstream.core.keygroups import key_group_owners, owned_key_groups
from millstream.errors import SimulatedCrash
from millstream.expr.windows import Tumbling
from millstream.ops.state.process import KeyedProcess
from millstream.ops.window import WindowAggregate
from millstream.runtime.checkpoint import CheckpointError, CheckpointStore
from millstream.testing import CollectingSink


def _events(seed: int, n_items: int = 24, per_item: int = 10, keys: str = "abcdefghij"):
    return events(seed, n_items, per_item, keys)


def _source(items, f=None, partitions: int = 2):
    """The items in a test source of ``partitions``: from the feed ``f``, or filled."""
    return f.source(items, partitions=partitions) if f is not None else \
        filled_source(items, partitions)


def _tumbling(items, f=None):
    return (_source(items, f).dataset().with_watermark("ts", "10s").group_by("k")
            .window(ms.tumbling("1m")).agg(ms.sum("v").alias("s"), ms.count().alias("n")))


def _process(items, f=None):
    return (_source(items, f).dataset().with_watermark("ts", "5s").group_by("k")
            .process(CountWithTimeout))


def _rescale(make, items, feed, tmp_path, before: int, after: int, crash_epoch: int):
    """Run uninterrupted; then crash at ``before`` after ``crash_epoch`` and restore at ``after``."""
    f = feed()
    plain = f.start(make(items, f), checkpoint_interval=0, parallelism=before)
    assert plain.await_termination(30)
    expected = sorted_rows(plain.sink.rows())
    assert expected
    chk, sink, f = str(tmp_path / "chk"), CollectingSink(), feed()
    ds = make(items, f)
    first = f.start(ds, checkpoint=chk, sink=sink, checkpoint_interval=0, parallelism=before,
                    _fault=(crash_epoch, "after_checkpoint"))
    with pytest.raises(SimulatedCrash):
        first.await_termination(30)
    state = CheckpointStore(chk).latest()[1]
    assert state["parallelism"] == before and state["key_groups"] == 128
    (groups,) = state["keyed"].values()
    assert len(groups) > 2, "the checkpoint should hold state of several key groups"
    second = f.start(ds, checkpoint=chk, sink=sink, checkpoint_interval=0, parallelism=after)
    assert second.await_termination(30)
    # (a collecting sink resumes from the newest checkpoint whose commit is known)
    assert second.metrics()["restored_from_epoch"] == crash_epoch - 1
    assert sorted_rows(sink.rows()) == expected
    return second


@pytest.mark.parametrize(("before", "after"), [(2, 3), (4, 1), (3, 2)])
def test_keyed_tumbling_window_restored_at_another_parallelism(before, after, feed, tmp_path):
    job = _rescale(_tumbling, _events(3), feed, tmp_path, before, after, crash_epoch=7)
    assert job.late_records(), "the data should contain late events"


@pytest.mark.parametrize(("before", "after"), [(2, 3), (4, 1)])
def test_keyed_process_function_state_and_timers_move_with_key_groups(before, after, feed,
                                                                     tmp_path):
    _rescale(_process, _events(5), feed, tmp_path, before, after, crash_epoch=9)


def test_window_without_keys_restored_at_another_parallelism(feed, tmp_path):
    """A window without keys runs in one task at any parallelism: its state restores into
    that task (no longer refused), and the result is the uninterrupted job's."""
    items = _events(11, n_items=10)

    def make(items, f):
        return (_source(items, f).dataset().with_watermark("ts", "10s")
                .window(ms.tumbling("1m")).agg(ms.sum("v").alias("s")))

    f = feed()
    plain = f.start(make(items, f), checkpoint_interval=0, parallelism=2)
    assert plain.await_termination(30)
    expected = sorted_rows(plain.sink.rows())
    assert expected
    chk, sink, f = str(tmp_path / "chk"), CollectingSink(), feed()
    ds = make(items, f)
    first = f.start(ds, checkpoint=chk, sink=sink, checkpoint_interval=0, parallelism=2,
                    _fault=(4, "after_checkpoint"))
    with pytest.raises(SimulatedCrash):
        first.await_termination(30)
    state = CheckpointStore(chk).latest()[1]
    assert any(v is not None for v in state["ops"].values()), "the window's state"
    again = f.start(ds, checkpoint=chk, sink=sink, checkpoint_interval=0, parallelism=3)
    assert again.await_termination(30)
    assert again.metrics()["restored_from_epoch"] == 3  # the newest committed one
    assert sorted_rows(sink.rows()) == expected


def test_a_different_pipeline_or_key_groups_is_refused(feed, tmp_path):
    items = _events(2, n_items=10)
    chk, f = str(tmp_path / "chk"), feed()
    first = f.start(_tumbling(items, f), checkpoint=chk, checkpoint_interval=0, parallelism=2,
                    _fault=(3, "after_checkpoint"))
    with pytest.raises(SimulatedCrash):
        first.await_termination(30)
    # refused when they restore, before they read anything
    other = _process(items).start(checkpoint=chk, checkpoint_interval=0, parallelism=2,
                                  executor=f.executor)
    with pytest.raises(CheckpointError, match="different pipeline"):
        other.await_termination(30)
    kg = _tumbling(items).start(checkpoint=chk, checkpoint_interval=0, key_groups=64,
                                executor=f.executor)
    with pytest.raises(CheckpointError, match="128 key groups"):
        kg.await_termination(30)


def test_key_group_ranges_are_contiguous_and_cover_everything():
    for k, p in [(128, 3), (128, 1), (10, 4), (7, 7)]:
        owners = key_group_owners(k, p)
        for i in range(p):
            assert list(owned_key_groups(i, p, k)) == [g for g in range(k) if owners[g] == i]


def _batch(rows):
    return pa.RecordBatch.from_pylist(rows)


def test_operators_split_and_merge_state_by_key_group():
    rows = [{"k": f"k{i % 13}", "ts": i * 7_000, "v": i} for i in range(200)]

    def window():
        return WindowAggregate(Tumbling("1m"), ["k"], [ms.sum("v").alias("s")], "ts")

    whole = window()
    whole.process(_batch(rows))
    groups = whole.snapshot_by_key_group(16)
    assert len(groups) > 3
    parts = [window() for _ in range(3)]
    for i, op in enumerate(parts):
        op.restore_key_groups([groups[g] for g in owned_key_groups(i, 3, 16) if g in groups])
    got = [r for op in parts for b in op.finish() for r in b.to_pylist()]
    want = [r for b in whole.finish() for r in b.to_pylist()]
    assert sorted_rows(got) == sorted_rows(want)

    def proc():
        op = KeyedProcess(CountWithTimeout, "k", time_column="ts")
        op.open(default_context())
        return op

    whole_p = proc()
    whole_p.process(_batch(rows))
    groups = whole_p.snapshot_by_key_group(16)
    parts_p = [proc() for _ in range(2)]
    for i, op in enumerate(parts_p):
        op.restore_key_groups([groups[g] for g in owned_key_groups(i, 2, 16) if g in groups])
    assert sum(op.timers.num_event_timers() for op in parts_p) == 13
    got = [r for op in parts_p for b in op.finish() for r in b.to_pylist()]
    want = [r for b in whole_p.finish() for r in b.to_pylist()]
    assert sorted_rows(got) == sorted_rows(want) and len(want) == 13


def test_changed_source_partitions_are_refused(feed, tmp_path):
    items = _events(4, n_items=12)

    def make(partitions, f=None):
        return (_source(items, f, partitions).dataset().with_watermark("ts", "10s")
                .group_by("k").window(ms.tumbling("1m")).agg(ms.sum("v").alias("s")))

    chk, f = str(tmp_path / "chk"), feed()
    first = f.start(make(2, f), checkpoint=chk, checkpoint_interval=0, parallelism=2,
                    _fault=(3, "after_checkpoint"))
    with pytest.raises(SimulatedCrash):
        first.await_termination(30)
    again = make(3).start(checkpoint=chk, checkpoint_interval=0, parallelism=3,
                          executor=f.executor)
    with pytest.raises(CheckpointError, match="source partitions"):
        again.await_termination(30)
