"""Global windows with count, processing-time and event-time triggers.

The oracle is plain Python that takes one element at a time: every key keeps the values
of its pending pane (and, when accumulating, all its values); a trigger firing emits the
aggregate of those and starts a new pane. The operator's rows, per key and in order, must
match it: the same panes, at the same steps, whatever the batch boundaries, snapshots or
key-group restores in between; and a streaming job must give what batch mode gives.
"""

from __future__ import annotations

import math
import pickle
import random
from collections import defaultdict

import oracles
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracles import AGG_NAMES, all_aggs
from streams import in_order_events
from window_cases import to_batch

import millstream as ms
from millstream.core.context import default_context
from millstream.core.keygroups import owned_key_groups
from millstream.core.time import MIN_WATERMARK, VirtualClock
from millstream.errors import PlanError, SchemaError
from millstream.expr.windows import GlobalWindow
from millstream.ops.window import GlobalWindowAggregate, WindowAggregate
from millstream.testing import CollectingSink, TestSource

AGGS = AGG_NAMES
NEVER = float("inf")


def agg_oracle(vals: list) -> dict:
    """The aggregates of values in arrival order (``first`` and ``collect_list`` keep it)."""
    return oracles.agg_oracle(vals, sort_list=False)


def trigger_of(count=None, interval=None, every=None):
    parts = []
    if count is not None:
        parts.append(ms.count_trigger(count))
    if interval is not None:
        parts.append(ms.processing_time_trigger(interval))
    if every is not None:
        parts.append(ms.event_time_trigger(every))
    return parts or None


def make(count=None, interval=None, every=None, accumulate=False, keys=("k",), clock=None):
    window = ms.global_window(trigger_of(count, interval, every), accumulate=accumulate)
    op = GlobalWindowAggregate(window, list(keys), all_aggs(), "t")
    op.set_clock(clock or VirtualClock(0))
    op.open(default_context())
    return op


def drive(factory, script, snapshot_at: int | None = None):
    """Run steps ("b", events) / ("w", watermark µs) / ("p", clock µs); returns (step, row) pairs
    (step None: finish) and the invalid-time rows. ``snapshot_at``: snapshot, pickle and
    restore into a fresh operator before that step."""
    clock = VirtualClock(0)
    op = factory(clock)
    out: list[tuple[int | None, dict]] = []
    for i, (kind, arg) in enumerate(script):
        if snapshot_at == i:
            state = pickle.loads(pickle.dumps(op.snapshot()))
            op = factory(clock)
            op.restore(state)
        if kind == "b":
            got = op.process(to_batch(arg))
        elif kind == "w":
            got = op.on_watermark(arg)
        else:
            clock.set(arg)
            got = op.advance_processing_time()
        out += [(i, r) for b in got for r in b.to_pylist()]
    out += [(None, r) for b in op.finish() for r in b.to_pylist()]
    invalid = [r for b in op.take_side_output("invalid") for r in b.to_pylist()]
    return out, invalid


def oracle(script, count=None, interval=None, every=None, accumulate=False, keyed=True):
    """One element at a time: (step, key, aggregates, is_update) of every firing."""
    clock, wm = 0, MIN_WATERMARK
    keys: dict = {}
    fired: list[tuple] = []
    invalid = []

    def fire(step, k, st):
        vals = st["all"] if accumulate else st["pane"]
        fired.append((step, k, agg_oracle(vals), st["fired"]))
        st.update(pane=[], fpt=NEVER, fet=NEVER, fired=True)
        if not accumulate:
            st["all"] = []

    for i, (kind, arg) in enumerate(script):
        if kind == "b":
            for k, t, v in arg:
                if every is not None and t is None:
                    invalid.append({"k": k, "t": t, "v": v})
                    continue
                k = k if keyed else None
                st = keys.setdefault(k, {"pane": [], "all": [], "fpt": NEVER, "fet": NEVER,
                                         "fired": False})
                st["pane"].append(v)
                st["all"].append(v)
                if interval is not None:
                    st["fpt"] = min(st["fpt"], (clock // interval + 1) * interval)
                if every is not None:
                    st["fet"] = min(st["fet"], (t * 1000 // every + 1) * every)
                if count is not None and len(st["pane"]) == count:
                    fire(i, k, st)
        elif kind == "p":
            clock = arg
            if interval is not None:
                for k, st in keys.items():
                    if st["pane"] and st["fpt"] <= clock:
                        fire(i, k, st)
        elif arg > wm:
            wm = arg
            if every is not None:
                for k, st in keys.items():
                    if st["pane"] and st["fet"] <= wm:
                        fire(i, k, st)
    for k, st in keys.items():
        if st["pane"]:
            fire(None, k, st)
    return fired, invalid


def per_key(rows, with_step: bool = True, key: str | None = "k") -> dict:
    """Operator rows (step, row) -> {key: [(step, aggregates, is_update)]} in emission order."""
    out: dict = defaultdict(list)
    for step, r in rows:
        aggs = {name: r[name] for name in AGGS}
        out[r[key] if key else None].append(
            ((step,) if with_step else ()) + (aggs, r.get("is_update")))
    return dict(out)


def oracle_per_key(fired, accumulate: bool, with_step: bool = True) -> dict:
    out: dict = defaultdict(list)
    for step, k, aggs, upd in fired:
        out[k].append(((step,) if with_step else ()) + (aggs, upd if accumulate else None))
    return dict(out)


def assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want), (sorted(got, key=repr), sorted(want, key=repr))
    for k in want:
        assert len(got[k]) == len(want[k]), (k, got[k], want[k])
        for g, w in zip(got[k], want[k]):
            assert g[:-2] == w[:-2] and g[-1] == w[-1], (k, g, w)
            ga, wa = g[-2], w[-2]
            for name in AGGS:
                if name == "m" and wa[name] is not None:
                    assert math.isclose(ga[name], wa[name]), (k, name, g, w)
                else:
                    assert ga[name] == wa[name], (k, name, g, w)


def _random_script(seed: int, steps: int = 40) -> list:
    rnd = random.Random(seed)
    script, wm_ms, clock = [], 0, 0
    for _ in range(steps):
        r = rnd.random()
        if r < 0.6:
            script.append(("b", [(rnd.choice(["a", "b", "c", None]),
                                  wm_ms + rnd.randrange(-3_000, 9_000),
                                  rnd.choice([None, *range(-3, 10)]))
                                 for _ in range(rnd.randrange(1, 12))]))
        elif r < 0.8:
            wm_ms += rnd.randrange(0, 5_000)
            script.append(("w", wm_ms * 1000))
        else:
            clock += rnd.randrange(0, 8_000_000)
            script.append(("p", clock))
    return script


# --------------------------------------------------------------------------- count trigger


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("count", [1, 3, 7])
def test_count_trigger_fires_every_n_elements_per_key(count, accumulate):
    script = _random_script(count)
    got, _ = drive(lambda c: make(count=count, accumulate=accumulate), script)
    fired, _ = oracle(script, count=count, accumulate=accumulate)
    assert_same(per_key(got), oracle_per_key(fired, accumulate))
    # count firings happen in process(), at the batch holding the n-th element
    assert all(step is None or script[step][0] == "b" for step, _ in got)
    if not accumulate:  # every pane but a key's last holds exactly count elements
        for rows in per_key(got).values():
            assert all(r[1]["n"] == count for r in rows[:-1]) and rows[-1][1]["n"] <= count


def test_count_trigger_worked_example():
    op = make(count=3)
    out = op.process(to_batch([("a", 0, i) for i in range(7)] + [("b", 0, 10)]))
    assert [(r["k"], r["l"]) for b in out for r in b.to_pylist()] == [
        ("a", [0, 1, 2]), ("a", [3, 4, 5])]
    out = op.process(to_batch([("b", 0, 11), ("a", 0, 7), ("b", 0, 12), ("a", 0, 8)]))
    assert sorted((r["k"], r["l"], r["f"]) for b in out for r in b.to_pylist()) == [
        ("a", [6, 7, 8], 6), ("b", [10, 11, 12], 10)]
    assert list(op.finish()) == []  # nothing pending: nothing more to say

    acc = make(count=2, accumulate=True)
    out = acc.process(to_batch([("a", 0, 1), ("a", 0, 2), ("a", 0, 3), ("a", 0, 4), ("a", 0, 5)]))
    assert [(r["s"], r["is_update"]) for b in out for r in b.to_pylist()] == [
        (3, False), (10, True)]
    assert [(r["s"], r["n"], r["is_update"]) for b in acc.finish() for r in b.to_pylist()] == [
        (15, 5, True)]


@pytest.mark.parametrize("size", [1, 2, 5, 1000])
def test_count_firings_do_not_depend_on_batch_boundaries(size):
    script = _random_script(11, steps=60)
    events = [e for kind, arg in script if kind == "b" for e in arg]
    rebatched = [("b", events[i:i + size]) for i in range(0, len(events), size)]
    for accumulate in (False, True):
        base, _ = drive(lambda c, a=accumulate: make(count=4, accumulate=a), [("b", events)])
        got, _ = drive(lambda c, a=accumulate: make(count=4, accumulate=a), rebatched)
        assert per_key(got, with_step=False) == per_key(base, with_step=False)


def test_count_trigger_without_keys():
    script = _random_script(5)
    for accumulate in (False, True):
        got, _ = drive(lambda c, a=accumulate: make(count=5, accumulate=a, keys=()), script)
        fired, _ = oracle(script, count=5, accumulate=accumulate, keyed=False)
        assert all("k" not in r for _, r in got)
        assert_same(per_key(got, key=None), oracle_per_key(fired, accumulate))


def test_no_trigger_fires_once_at_the_end_like_a_group_by():
    script = _random_script(8)
    got, _ = drive(lambda c: make(), script)
    assert all(step is None for step, _ in got)
    fired, _ = oracle(script)
    assert_same(per_key(got), oracle_per_key(fired, False))


# --------------------------------------------------------------------------- time triggers


@pytest.mark.parametrize("accumulate", [False, True])
def test_processing_time_trigger_fires_at_interval_boundaries(accumulate):
    clock = VirtualClock(0)
    op = make(interval=10_000_000, accumulate=accumulate, clock=clock)
    op.process(to_batch([("a", 0, 1), ("b", 0, 2)]))
    clock.set(9_999_999)
    assert list(op.advance_processing_time()) == []
    op.process(to_batch([("a", 0, 3)]))
    clock.set(10_000_000)  # the boundary after both first arrivals
    out = [r for b in op.advance_processing_time() for r in b.to_pylist()]
    assert sorted((r["k"], r["s"]) for r in out) == [("a", 4), ("b", 2)]
    assert list(op.advance_processing_time()) == []  # nothing new: no firing
    op.process(to_batch([("a", 10_000, 5)]))  # pending again: next boundary is 20 s
    clock.set(19_000_000)
    assert list(op.advance_processing_time()) == []
    clock.set(25_000_000)
    out = [r for b in op.advance_processing_time() for r in b.to_pylist()]
    assert [(r["k"], r["s"], r.get("is_update")) for r in out] == [
        ("a", 9 if accumulate else 5, True if accumulate else None)]
    assert list(op.finish()) == []


def test_event_time_trigger_fires_when_the_watermark_passes_the_next_multiple():
    op = make(every=10_000_000)
    op.process(to_batch([("a", 3_000, 1), ("a", 12_000, 2), ("b", 14_000, 3),
                         ("c", None, 4)]))
    assert list(op.on_watermark(9_999_999)) == []
    out = [r for b in op.on_watermark(10_000_000) for r in b.to_pylist()]
    # a's pane starts at 3 s, so it fires at 10 s (with its 12 s element); b waits for 20 s
    assert [(r["k"], r["l"]) for r in out] == [("a", [1, 2])]
    out = [r for b in op.on_watermark(30_000_000) for r in b.to_pylist()]
    assert [(r["k"], r["l"]) for r in out] == [("b", [3])]
    assert [r["v"] for b in op.take_side_output("invalid") for r in b.to_pylist()] == [4]
    assert op.invalid_records == 1
    # an element behind the watermark fires at the next watermark advance
    op.process(to_batch([("b", 1_000, 5)]))
    assert list(op.on_watermark(30_000_000)) == []
    assert [(r["k"], r["l"]) for b in op.on_watermark(30_000_001) for r in b.to_pylist()] == [
        ("b", [5])]


@pytest.mark.parametrize("accumulate", [False, True])
def test_count_or_processing_time_whichever_comes_first(accumulate):
    clock = VirtualClock(0)
    op = make(count=3, interval=5_000_000, accumulate=accumulate, clock=clock)

    def lists(batches):
        return [r["l"] for b in batches for r in b.to_pylist()]

    out = op.process(to_batch([("a", 0, 1), ("a", 0, 2), ("a", 0, 3), ("a", 0, 4),
                               ("b", 0, 5), ("b", 0, 6), ("b", 0, 7)]))
    assert sorted(lists(out)) == [[1, 2, 3], [5, 6, 7]]
    clock.set(5_000_000)
    assert lists(op.advance_processing_time()) == [[1, 2, 3, 4] if accumulate else [4]]
    # b's pane was closed by the count: it left no processing-time deadline behind
    clock.set(6_000_000)
    op.process(to_batch([("b", 0, 8)]))  # a new pane: its deadline is 10 s
    clock.set(9_000_000)
    assert lists(op.advance_processing_time()) == []
    clock.set(10_000_000)
    assert lists(op.advance_processing_time()) == [[5, 6, 7, 8] if accumulate else [8]]


# --------------------------------------------------------------------------- properties


events_st = st.tuples(st.sampled_from(["a", "b", None]),
                      st.one_of(st.none(), st.integers(-4_000, 12_000)),
                      st.one_of(st.none(), st.integers(-5, 20)))
steps_st = st.lists(st.one_of(
    st.tuples(st.just("b"), st.lists(events_st, min_size=1, max_size=6)),
    st.tuples(st.just("w"), st.integers(0, 9_000)),
    st.tuples(st.just("p"), st.integers(0, 9_000))), min_size=1, max_size=16)


def _script(steps) -> list:
    """Increments (ms) -> increasing watermarks and clock times (µs); event times relative."""
    out, wm, clock = [], 0, 0
    for kind, arg in steps:
        if kind == "w":
            wm += arg
            out.append(("w", wm * 1000))
        elif kind == "p":
            clock += arg
            out.append(("p", clock * 1000))
        else:
            out.append(("b", [(k, None if t is None else wm + t, v) for k, t, v in arg]))
    return out


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=steps_st, count=st.sampled_from([None, 1, 2, 3]),
       interval=st.sampled_from([None, 4_000_000]), every=st.sampled_from([None, 3_000_000]),
       accumulate=st.booleans(), cut=st.integers(0, 16))
def test_random_scripts_match_the_oracle(steps, count, interval, every, accumulate, cut):
    script = _script(steps)

    def factory(clock):
        return make(count, interval, every, accumulate, clock=clock)

    fired, invalid = oracle(script, count, interval, every, accumulate)
    base = drive(factory, script)
    assert_same(per_key(base[0]), oracle_per_key(fired, accumulate))
    assert base[1] == invalid
    # restored from a (pickled) snapshot at any step: exactly the same rows
    assert drive(factory, script, snapshot_at=cut) == base


def test_snapshot_splits_by_key_group_and_restores_elsewhere():
    script = _random_script(21, steps=60)
    cut = 30

    def factory(clock):
        return make(count=3, interval=6_000_000, accumulate=True, clock=clock)

    want, _ = drive(factory, script)
    clock = VirtualClock(0)
    whole = factory(clock)
    got: list = []
    for i, (kind, arg) in enumerate(script[:cut]):
        if kind == "b":
            res = whole.process(to_batch(arg))
        elif kind == "w":
            res = whole.on_watermark(arg)
        else:
            clock.set(arg)
            res = whole.advance_processing_time()
        got += [(i, r) for b in res for r in b.to_pylist()]
    groups = whole.snapshot_by_key_group(8)
    assert len(groups) >= 2 and all(g["state"] is None or "k" in g["state"].schema.names
                                    for g in groups.values())
    parts = [factory(clock) for _ in range(2)]
    for p, op in enumerate(parts):
        op.restore_key_groups([groups[g] for g in owned_key_groups(p, 2, 8) if g in groups])
    hashes = {}
    for p in range(2):
        for g in owned_key_groups(p, 2, 8):
            hashes[g] = p
    from millstream.core.keygroups import key_hashes

    for i, (kind, arg) in enumerate(script[cut:], start=cut):
        for p, op in enumerate(parts):
            if kind == "b":
                batch = to_batch(arg)
                owner = key_hashes([batch.column("k")], batch.num_rows) % 8
                mine = [e for e, g in zip(arg, owner) if hashes[int(g)] == p]
                res = op.process(to_batch(mine)) if mine else []
            elif kind == "w":
                res = op.on_watermark(arg)
            else:
                clock.set(arg)
                res = op.advance_processing_time()
            got += [(i, r) for b in res for r in b.to_pylist()]
    got += [(None, r) for op in parts for b in op.finish() for r in b.to_pylist()]
    assert per_key(got) == per_key(want)


# --------------------------------------------------------------------------- validation


def test_errors_are_clear():
    with pytest.raises(PlanError, match="positive int"):
        ms.count_trigger(0)
    with pytest.raises(PlanError, match="positive int"):
        ms.count_trigger(True)
    with pytest.raises(PlanError, match="must be positive"):
        ms.processing_time_trigger(0)
    with pytest.raises(PlanError, match="must be positive"):
        ms.event_time_trigger("0s")
    with pytest.raises(PlanError, match="at most one trigger of each kind"):
        ms.count_trigger(2) | ms.count_trigger(3)
    with pytest.raises(PlanError, match="expected ms.count_trigger"):
        ms.global_window(trigger="every 5")
    with pytest.raises(PlanError, match="True or False"):
        ms.global_window(accumulate="yes")
    with pytest.raises(PlanError, match="allowed_lateness does not apply"):
        GlobalWindowAggregate(ms.global_window(), ["k"], all_aggs(), "t", allowed_lateness="1s")
    with pytest.raises(PlanError, match="event_time_trigger needs the event time"):
        GlobalWindowAggregate(ms.global_window(ms.event_time_trigger("1s")), ["k"], all_aggs(),
                              None)
    with pytest.raises(PlanError, match="a global window has no time bounds"):
        GlobalWindow().assign(None)
    op = make(count=2)
    with pytest.raises(SchemaError, match="no key column"):
        op.process(pa.RecordBatch.from_pylist([{"x": 1, "v": 2}]))
    ds = ms.from_items([{"k": "a", "v": 1}])
    with pytest.raises(PlanError, match="allowed_lateness does not apply"):
        ds.group_by("k").window(ms.global_window(), allowed_lateness="5s")
    with pytest.raises(PlanError, match="event-time column"):
        ds.group_by("k").window(ms.global_window(ms.event_time_trigger("1m")))
    with pytest.raises(PlanError, match="ms.global_window"):
        ds.group_by("k").window("global")


def test_operator_type_describe_and_pickling():
    window = ms.global_window(ms.count_trigger(10) | ms.processing_time_trigger("30s"),
                              accumulate=True)
    op = GlobalWindowAggregate(window, ["k"], [ms.count().alias("n")], None)
    assert isinstance(op, GlobalWindowAggregate) and isinstance(op, WindowAggregate)
    assert "count(10) | processing_time(30s)" in op.describe() and "accumulating" in op.describe()
    assert repr(window.trigger) == "count(10) | processing_time(30s)"
    clone = pickle.loads(pickle.dumps(window))
    assert (clone.count, clone.interval, clone.every, clone.accumulate) == (10, 30_000_000, None,
                                                                           True)
    with pytest.raises(PlanError, match="must be a GlobalWindow"):
        GlobalWindowAggregate(ms.tumbling("1m"), ["k"], [ms.count().alias("n")], "t")
    with pytest.raises(PlanError, match="is a global window; GlobalWindowAggregate runs those"):
        WindowAggregate(window, ["k"], [ms.count().alias("n")], "t")


# --------------------------------------------------------------------------- API, batch, streaming


def _items(seed: int, n_items: int = 14, per_item: int = 9, keys: str = "abcde"):
    return in_order_events(seed, n_items, per_item, keys)


def _source(items, partitions: int = 1, watermarks: bool = False, f=None) -> TestSource:
    """The items as a test source (dealt round-robin to its partitions); ``watermarks``:
    each item carries the watermark of its largest time; ``f``: from that feed."""
    items = [(rows, max(r["ts"] for r in rows) * 1000 if watermarks else None) for rows in items]
    if f is not None:
        return f.source(items, partitions=partitions)
    src = TestSource(partitions=partitions)
    for i, (rows, wm) in enumerate(items):
        src.add(rows, watermark=wm, partition=i % partitions)
    src.close()
    return src


def _count_pipeline(src, count=4, accumulate=False):
    return (src.dataset().group_by("k")
            .window(ms.global_window(ms.count_trigger(count), accumulate=accumulate))
            .agg(ms.sum("v").alias("s"), ms.count().alias("n"),
                 ms.collect_list("v").alias("l")))


def _sequences(rows) -> dict:
    out: dict = defaultdict(list)
    for r in rows:
        out[r["k"]].append(tuple((name, r[name]) for name in sorted(r) if name != "k"))
    return dict(out)


def _count_oracle(items, count, accumulate):
    seq: dict = defaultdict(list)
    pend: dict = defaultdict(list)
    allv: dict = defaultdict(list)
    for rows in items:
        for r in rows:
            pend[r["k"]].append(r["v"])
            allv[r["k"]].append(r["v"])
            if len(pend[r["k"]]) == count:
                seq[r["k"]].append(list(allv[r["k"]] if accumulate else pend[r["k"]]))
                pend[r["k"]] = []
    for k, vals in pend.items():
        if vals:
            seq[k].append(list(allv[k] if accumulate else vals))
    out = {}
    for k, panes in seq.items():
        rows = []
        for i, vals in enumerate(panes):
            row = {"s": sum(vals), "n": len(vals), "l": vals}
            if accumulate:
                row["is_update"] = i > 0
            rows.append(tuple(sorted(row.items())))
        out[k] = rows
    return out


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("parallelism", [1, 3])
def test_count_trigger_same_in_batch_and_streaming(accumulate, parallelism, executor):
    items = _items(3)
    want = _count_oracle(items, 4, accumulate)
    batch = _count_pipeline(_source(items), 4, accumulate).collect()
    assert _sequences(batch) == want
    # one partition: each key's rows arrive in order on both executors
    job = _count_pipeline(_source(items), 4, accumulate).start(
        checkpoint_interval=0, parallelism=parallelism, executor=executor)
    assert job.await_termination(30)
    assert _sequences(job.sink.rows()) == want


def test_count_trigger_with_interleaved_partitions_keeps_pane_sizes_and_totals(executor):
    # which elements share a pane follows arrival order, which differs between batch and
    # streaming when partitions interleave; pane sizes and per-key totals do not
    items = _items(4, n_items=16)
    totals: dict = defaultdict(int)
    counts: dict = defaultdict(int)
    for rows in items:
        for r in rows:
            totals[r["k"]] += r["v"]
            counts[r["k"]] += 1
    batch = _count_pipeline(_source(items, partitions=2), 5).collect()
    job = _count_pipeline(_source(items, partitions=2), 5).start(checkpoint_interval=0,
                                                                 executor=executor)
    assert job.await_termination(30)
    for rows in (batch, job.sink.rows()):
        seqs = _sequences(rows)
        assert {k: sum(dict(p)["s"] for p in v) for k, v in seqs.items()} == dict(totals)
        for k, v in seqs.items():
            sizes = [dict(p)["n"] for p in v]
            assert sizes == [5] * (counts[k] // 5) + ([counts[k] % 5] if counts[k] % 5 else [])


@pytest.mark.parametrize("epoch,point", [(3, "after_checkpoint"), (6, "during_epoch")])
def test_count_trigger_survives_crash_and_restore(epoch, point, feed, tmp_path):
    items = _items(6, n_items=14)
    want = _count_oracle(items, 3, True)
    sink, f = CollectingSink(), feed()
    job = f.crash_and_restore(_count_pipeline(_source(items, partitions=2, f=f), 3, True),
                              checkpoint=str(tmp_path / "chk"), sink=sink, crash_epoch=epoch,
                              point=point, checkpoint_interval=0)
    assert job.metrics()["restored_from_epoch"] is not None
    # a round reads partition 0 then 1 (inline), or the paced feed adds the items in turn
    # (parallel): items arrive in order, as the oracle takes them
    assert _sequences(sink.rows()) == want


@pytest.mark.parametrize(("before", "after"), [(2, 3), (3, 1)])
def test_count_trigger_state_moves_with_key_groups(before, after, feed, tmp_path):
    from millstream.errors import SimulatedCrash
    from millstream.runtime.checkpoint import CheckpointStore

    items = _items(8, n_items=16, keys="abcdefghij")
    f = feed()
    ds = _count_pipeline(_source(items, partitions=2, f=f), 4, accumulate=True)
    want = _count_oracle(items, 4, True)
    chk, sink = str(tmp_path / "chk"), CollectingSink()
    first = f.start(ds, checkpoint=chk, sink=sink, checkpoint_interval=0, parallelism=before,
                    _fault=(7, "after_checkpoint"))
    with pytest.raises(SimulatedCrash):
        first.await_termination(30)
    (groups,) = CheckpointStore(chk).latest()[1]["keyed"].values()
    assert len(groups) > 2
    second = f.start(ds, checkpoint=chk, sink=sink, checkpoint_interval=0, parallelism=after)
    assert second.await_termination(30)
    # (a collecting sink resumes from the newest checkpoint whose commit is known)
    assert second.metrics()["restored_from_epoch"] == 6
    assert _sequences(sink.rows()) == want


def test_event_time_trigger_in_a_streaming_job_matches_the_oracle(feed):
    items = _items(9, n_items=12)
    f = feed()
    ds = (_source(items, watermarks=True, f=f).dataset().group_by("k")
          .window(ms.global_window(ms.event_time_trigger("10s")), on="ts")
          .agg(ms.sum("v").alias("s"), ms.count().alias("n"), ms.collect_list("v").alias("l")))
    job = f.start(ds, checkpoint_interval=0)
    assert job.await_termination(30)
    # one round per item (inline) or one paced item at a time (parallel): its rows, then
    # its watermark
    pend: dict = defaultdict(list)
    fet: dict = {}
    want: dict = defaultdict(list)
    wm = None
    for rows in items:
        for r in rows:
            pend[r["k"]].append(r["v"])
            fet[r["k"]] = min(fet.get(r["k"], NEVER), (r["ts"] // 10_000 + 1) * 10_000)
        if wm is not None and max(r["ts"] for r in rows) <= wm:
            continue  # the watermark did not advance
        wm = max(r["ts"] for r in rows)
        for k in sorted(pend):
            if pend[k] and fet[k] <= wm:
                want[k].append(pend[k])
                pend[k], fet[k] = [], NEVER
    for k, v in pend.items():
        if v:
            want[k].append(v)
    got = {k: [dict(p)["l"] for p in v] for k, v in _sequences(job.sink.rows()).items()}
    assert got == dict(want)
    assert any(len(v) > 1 for v in got.values())
    # batch mode has no watermarks: each key fires once, at the end
    batch = _sequences(ds.collect())
    assert {k: [dict(p)["l"] for p in v] for k, v in batch.items()} == \
        {k: [[x for pane in v for x in pane]] for k, v in want.items()}


def test_processing_time_trigger_in_a_streaming_job(executor):
    import time

    def wait_for(cond, what):
        deadline = time.monotonic() + 30
        while not cond():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.01)

    clock = VirtualClock(0)
    src = TestSource()
    ds = (src.dataset().group_by("k")
          .window(ms.global_window(ms.processing_time_trigger("10s")))
          .agg(ms.sum("v").alias("s")))
    job = ds.start(checkpoint_interval=0, clock=clock, executor=executor)
    src.add([{"k": "a", "v": 1}, {"k": "b", "v": 2}, {"k": "a", "v": 3}])

    def window_rows_in() -> int:
        ops = job.metrics()["operators"]
        return sum(v["records_in"] for k, v in ops.items() if k.startswith("WindowAggregate"))

    # the window operator (not only the source) has the rows: their panes are due at the
    # first 10 s boundary of processing time after 0 (on the parallel executor it runs in
    # a task of its own, which could otherwise see them only after the clock moved)
    wait_for(lambda: window_rows_in() == 3, "the rows to reach the window")
    assert job.sink.rows() == []
    clock.set(10_000_000)
    wait_for(lambda: len(job.sink.rows()) == 2, "the first firing")
    assert sorted((r["k"], r["s"]) for r in job.sink.rows()) == [("a", 4), ("b", 2)]
    src.add([{"k": "a", "v": 5}])
    src.close()
    assert job.await_termination(30)
    assert sorted((r["k"], r["s"]) for r in job.sink.rows()) == [("a", 4), ("a", 5), ("b", 2)]
