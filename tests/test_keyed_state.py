"""Keyed state (value, list, map), timers and the KeyedProcess operator."""

from __future__ import annotations

import pickle
import random

import pyarrow as pa
import pytest

from millstream.core.arrow import batch_to_rows
from millstream.core.context import default_context
from millstream.core.time import VirtualClock
from millstream.errors import PlanError, SchemaError, UserCodeFailure
from millstream.ops.state.descriptors import (
    ListStateDescriptor,
    MapStateDescriptor,
    ValueStateDescriptor,
)
from millstream.ops.state.process import KeyedProcess, KeyedProcessFunction
from millstream.ops.state.store import KeyedStateStore
from millstream.ops.state.timers import TimerService

SEC = 1_000_000


def rows(batches) -> list[dict]:
    return [r for b in batches for r in batch_to_rows(b)]


def opened(op: KeyedProcess) -> KeyedProcess:
    op.open(default_context())
    return op


# --------------------------------------------------------------------------- the store


def test_store_scopes_state_to_the_current_key():
    store = KeyedStateStore()
    count = store.value_state("count", 0)
    seen = store.list_state("seen")
    last = store.map_state("last")
    for key, item in [("a", 1), ("b", 2), ("a", 3)]:
        store.set_current_key(key)
        count.update(count.value() + 1)
        seen.add(item)
        last.put("item", item)
    store.set_current_key("a")
    assert (count.value(), seen.get(), last.items()) == (2, [1, 3], [("item", 3)])
    store.set_current_key("b")
    assert (count.value(), seen.get(), last.get("item")) == (1, [2], 2)
    store.set_current_key("c")
    assert (count.value(), seen.get(), last.is_empty(), len(seen)) == (0, [], True, 0)
    assert sorted(store.keys("count")) == ["a", "b"]


def test_value_list_map_operations_and_clearing():
    store = KeyedStateStore()
    store.set_current_key(("x", 1))
    v = store.get_state(ValueStateDescriptor("v", default=[]))
    lst = store.get_state(ListStateDescriptor("l"))
    m = store.get_state(MapStateDescriptor("m"))
    default = v.value()
    default.append(1)  # the default is a copy: mutating it changes nothing
    assert v.value() == []
    v.update({"a": 1})
    assert v.get() == {"a": 1}
    v.update(None)
    assert v.value() == []
    lst.add_all([1, 2])
    lst.add(3)
    assert list(lst) == [1, 2, 3]
    lst.update([9])
    assert lst.get() == [9]
    lst.update([])
    assert lst.get() == []
    m.put_all({"a": 1, "b": 2})
    assert "a" in m and m.contains("b") and not m.contains("z")
    assert sorted(m.keys()) == ["a", "b"] and sorted(m.values()) == [1, 2] and len(m) == 2
    m.remove("a")
    m.remove("zz")
    assert m.items() == [("b", 2)]
    m.clear()
    lst.add(5)
    store.clear_key(("x", 1))
    assert len(store) == 0
    with pytest.raises(PlanError, match="is a list state"):
        store.value_state("l")
    with pytest.raises(PlanError, match="non-empty string"):
        ValueStateDescriptor("")


def test_store_snapshot_is_a_deep_copy_and_restores_in_place():
    store = KeyedStateStore()
    lst = store.list_state("l")
    store.set_current_key("a")
    lst.add(1)
    snap = pickle.loads(pickle.dumps(store.snapshot()))
    lst.add(2)
    store.restore(snap)
    assert lst.get() == [1]  # the old handle sees the restored data
    other = KeyedStateStore()
    other.restore(snap)
    other.set_current_key("a")
    assert other.list_state("l").get() == [1]


# --------------------------------------------------------------------------- timers


def test_timer_service_orders_and_deduplicates():
    ts = TimerService(VirtualClock())
    for key, t in [("a", 30), ("b", 10), ("a", 10), ("a", 30), ("c", 20)]:
        ts.current_key = key
        ts.register_event_time_timer(t)
    assert ts.num_event_timers() == 4
    ts.current_key = "c"
    ts.delete_event_time_timer(20)
    ts.register_event_time_timer(25)
    fired = []
    while (due := ts.pop_event_timer(26)) is not None:
        fired.append(due)
    assert fired == [(10, "b"), (10, "a"), (25, "c")]
    assert ts.pop_event_timer(29) is None and ts.num_event_timers() == 1
    with pytest.raises(PlanError, match="int microseconds"):
        ts.register_event_time_timer(1.5)


def test_virtual_clock():
    c = VirtualClock(100)
    assert c.advance(50) == 150 and c.now() == 150
    assert c.set(1000) == 1000
    with pytest.raises(ValueError):
        c.set(10)
    with pytest.raises(ValueError):
        c.advance(-1)


# --------------------------------------------------------------------------- KeyedProcess


class Counter(KeyedProcessFunction):
    """Counts per key; emits the running count."""

    def open(self, ctx):
        self.count = ctx.get_state(ValueStateDescriptor("count", 0))

    def process_element(self, row, ctx):
        n = self.count.value() + 1
        self.count.update(n)
        yield {"key": ctx.key, "n": n}


def batch(**cols) -> pa.RecordBatch:
    return pa.record_batch(cols)


def test_counter_per_key_in_arrival_order():
    op = opened(KeyedProcess(Counter(), "k"))
    out = rows(op.process(batch(k=["a", "b", "a", "a"], v=[1, 2, 3, 4])))
    out += rows(op.process(batch(k=["b", "a"], v=[5, 6])))
    assert out == [{"key": "a", "n": 1}, {"key": "b", "n": 1}, {"key": "a", "n": 2},
                   {"key": "a", "n": 3}, {"key": "b", "n": 2}, {"key": "a", "n": 4}]


def test_function_api_with_multi_column_keys_and_timestamps():
    seen = []

    def fn(row, ctx):
        st = ctx.get_state("total", 0)
        st.update(st.value() + row["v"])
        seen.append((ctx.key, ctx.timestamp))
        return {"k1": ctx.key[0], "k2": ctx.key[1], "total": st.value()}

    op = opened(KeyedProcess(fn, ["k1", "k2"], time_column="t"))
    out = rows(op.process(batch(k1=["a", "a", "a"], k2=[1, 2, 1], v=[1, 2, 3], t=[5, 6, 7])))
    assert out == [{"k1": "a", "k2": 1, "total": 1}, {"k1": "a", "k2": 2, "total": 2},
                   {"k1": "a", "k2": 1, "total": 4}]
    assert seen == [(("a", 1), 5000), (("a", 2), 6000), (("a", 1), 7000)]


def test_list_and_map_state_in_a_process_function():
    class Sessionizer(KeyedProcessFunction):
        def open(self, ctx):
            self.items = ctx.get_list_state("items")
            self.by_kind = ctx.get_map_state("by_kind")

        def process_element(self, row, ctx):
            self.items.add(row["v"])
            self.by_kind.put(row["kind"], self.by_kind.get(row["kind"], 0) + 1)
            if row["kind"] == "end":
                out = {"key": ctx.key, "items": self.items.get(),
                       "kinds": sorted(self.by_kind.items())}
                self.items.clear()
                self.by_kind.clear()
                return [out]
            return None

    op = opened(KeyedProcess(Sessionizer, "k"))
    out = rows(op.process(batch(k=["a", "b", "a", "a", "b"], v=[1, 2, 3, 4, 5],
                                kind=["x", "y", "x", "end", "end"])))
    assert out == [{"key": "a", "items": [1, 3, 4], "kinds": [("end", 1), ("x", 2)]},
                   {"key": "b", "items": [2, 5], "kinds": [("end", 1), ("y", 1)]}]
    assert len(op.store) == 0


class TimerEcho(KeyedProcessFunction):
    """Registers an event-time timer at the element's value; emits on timers."""

    def process_element(self, row, ctx):
        ctx.timer_service().register_event_time_timer(row["at"])
        return None

    def on_timer(self, timestamp, ctx):
        assert ctx.time_domain == "event_time" and ctx.timestamp == timestamp
        out = [{"key": ctx.key, "ts": timestamp, "wm": ctx.current_watermark}]
        if timestamp == 15:  # a timer registered while firing, already due: fires in this call
            ctx.timer_service().register_event_time_timer(12)
        return out


def test_event_time_timers_fire_at_the_watermark_in_order():
    op = opened(KeyedProcess(TimerEcho(), "k"))
    op.process(batch(k=["a", "b", "a", "b", "a"], at=[30, 10, 15, 10, 50]))
    assert rows(op.on_watermark(9)) == []
    # in timestamp order; the timer at 12 is registered by the one at 15, then fires too
    assert rows(op.on_watermark(20)) == [{"key": "b", "ts": 10, "wm": 20},
                                         {"key": "a", "ts": 15, "wm": 20},
                                         {"key": "a", "ts": 12, "wm": 20}]
    # a timer in the past fires at the next watermark, even one that does not advance
    op.process(batch(k=["c"], at=[1]))
    assert rows(op.on_watermark(20)) == [{"key": "c", "ts": 1, "wm": 20}]
    assert rows(op.on_watermark(30)) == [{"key": "a", "ts": 30, "wm": 30}]
    # the end of a bounded input fires the rest
    assert [r["ts"] for r in rows(op.finish())] == [50]


def test_processing_time_timers_with_a_virtual_clock():
    clock = VirtualClock(1_000)

    class Reminder(KeyedProcessFunction):
        def process_element(self, row, ctx):
            ts = ctx.timer_service()
            ts.register_processing_time_timer(ctx.current_processing_time() + row["after"])
            return None

        def on_timer(self, timestamp, ctx):
            return [{"key": ctx.key, "ts": timestamp, "domain": ctx.time_domain}]

    op = opened(KeyedProcess(Reminder(), "k", clock=clock))
    op.process(batch(k=["a", "b", "a"], after=[100, 50, 100]))  # "a" twice: one timer
    assert rows(op.advance_processing_time()) == []
    clock.advance(60)
    assert rows(op.advance_processing_time()) == [
        {"key": "b", "ts": 1_050, "domain": "processing_time"}]
    clock.set(5_000)
    assert rows(op.advance_processing_time()) == [
        {"key": "a", "ts": 1_100, "domain": "processing_time"}]
    assert op.timers.num_processing_timers() == 0
    # watermarks do not fire processing-time timers, nor does finish()
    op.process(batch(k=["z"], after=[1]))
    assert rows(op.on_watermark(10**12)) == [] and rows(op.finish()) == []


def test_side_outputs_and_output_schema():
    def fn(row, ctx):
        if row["v"] < 0:
            ctx.output("negative", {"k": ctx.key, "v": row["v"]})
            return None
        return [{"k": ctx.key, "v": float(row["v"])}]

    schema = pa.schema([("k", pa.string()), ("v", pa.float64())])
    op = opened(KeyedProcess(fn, "k", output_schema=schema))
    out = list(op.process(batch(k=["a", "b", "c"], v=[1, -2, -3])))
    assert out[0].schema == schema and out[0].to_pylist() == [{"k": "a", "v": 1.0}]
    assert op.side_output_tags() == ["negative"]
    assert rows(op.take_side_output("negative")) == [{"k": "b", "v": -2}, {"k": "c", "v": -3}]
    assert op.take_side_output("negative") == [] and op.take_side_output("other") == []


def test_user_errors_are_wrapped():
    def boom(row, ctx):
        if row["v"] == 2:
            raise ValueError("bad value")
        return None

    op = opened(KeyedProcess(boom, "k"))
    with pytest.raises(UserCodeFailure) as info:
        op.process(batch(k=["a", "a"], v=[1, 2]))
    assert "boom.process_element" in str(info.value) and "'v': 2" in str(info.value)
    assert isinstance(info.value.original, ValueError)

    class BadTimer(KeyedProcessFunction):
        def process_element(self, row, ctx):
            ctx.timer_service().register_event_time_timer(5)

        def on_timer(self, timestamp, ctx):
            raise KeyError("x")

    op = opened(KeyedProcess(BadTimer(), "k"))
    op.process(batch(k=["q"], v=[1]))
    with pytest.raises(UserCodeFailure, match="event_time timer at 5 for key 'q'"):
        op.on_watermark(10)

    def timer_less(row, ctx):
        ctx.timer_service().register_event_time_timer(1)

    op = opened(KeyedProcess(timer_less, "k"))
    op.process(batch(k=["q"], v=[1]))
    with pytest.raises(UserCodeFailure, match="has no on_timer"):
        op.on_watermark(10)


def test_bad_arguments_and_columns():
    with pytest.raises(PlanError, match="KeyedProcessFunction"):
        KeyedProcess(42, "k")
    with pytest.raises(PlanError, match="key_by"):
        KeyedProcess(Counter(), [])
    op = opened(KeyedProcess(Counter(), "k", time_column="t"))
    with pytest.raises(SchemaError, match="no key column"):
        op.process(batch(x=[1]))
    with pytest.raises(SchemaError, match="no time column 't'"):
        op.process(batch(k=[1]))
    with pytest.raises(PlanError, match="not a KeyedProcess snapshot"):
        op.restore({"operator": "WindowAggregate"})


# --------------------------------------------------------------------------- snapshots


class Mixed(KeyedProcessFunction):
    """Uses every kind of state and both timer kinds."""

    def open(self, ctx):
        self.total = ctx.get_state("total", 0)
        self.hist = ctx.get_list_state("hist")
        self.kinds = ctx.get_map_state("kinds")

    def process_element(self, row, ctx):
        self.total.update(self.total.value() + row["v"])
        self.hist.add(row["v"])
        self.kinds.put(row["v"] % 3, True)
        ts = ctx.timer_service()
        ts.register_event_time_timer(ctx.timestamp + 10 * SEC)
        ts.register_processing_time_timer(ctx.current_processing_time() + row["v"] * 1000)
        if row["v"] % 4 == 0:
            ctx.output("fours", {"k": ctx.key, "v": row["v"]})
        return [{"k": ctx.key, "total": self.total.value()}]

    def on_timer(self, timestamp, ctx):
        out = {"k": ctx.key, "at": timestamp, "domain": ctx.time_domain,
               "hist": self.hist.get(), "kinds": sorted(self.kinds.keys())}
        if ctx.time_domain == "event_time":
            self.hist.clear()
        return [out]


def _mixed_script(seed: int) -> list:
    rnd = random.Random(seed)
    script, t = [], 0
    for _ in range(25):
        r = rnd.random()
        if r < 0.5:
            n = rnd.randint(1, 4)
            script.append(("b", {"k": [rnd.choice("abc") for _ in range(n)],
                                 "v": [rnd.randint(1, 9) for _ in range(n)],
                                 "t": [(t + rnd.randint(-3, 8)) * 1000 for _ in range(n)]}))
        elif r < 0.8:
            t += rnd.randint(0, 6)
            script.append(("w", t * SEC))
        else:
            script.append(("clock", rnd.randint(0, 5000)))
    return script


def _run_mixed(script, cut: int | None = None):
    clock = VirtualClock(0)

    def fresh():
        return opened(KeyedProcess(Mixed, "k", time_column="t", clock=clock))

    op = fresh()
    out = []
    for i, (kind, arg) in enumerate(script):
        if i == cut:
            snap = pickle.loads(pickle.dumps(op.snapshot()))
            op.close()
            op = KeyedProcess(Mixed, "k", time_column="t", clock=clock)
            op.restore(snap)  # restore before open works as well as after
            op.open(default_context())
        if kind == "b":
            out.append(rows(op.process(pa.record_batch(arg))))
        elif kind == "w":
            out.append(rows(op.on_watermark(arg)))
        else:
            clock.advance(arg)
            out.append(rows(op.advance_processing_time()))
        out.append(rows(op.take_side_output("fours")))
    out.append(rows(op.finish()))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_snapshot_restore_of_state_and_timers_equals_uninterrupted(seed):
    script = _mixed_script(seed)
    base = _run_mixed(script)
    assert any(r.get("domain") == "processing_time" for step in base for r in step)
    assert any(r.get("domain") == "event_time" for step in base for r in step)
    for cut in range(0, len(script), 3):
        assert _run_mixed(script, cut) == base, f"restored before step {cut}"


# --------------------------------------------------------------------------- fraud detection


class SpendingAlert(KeyedProcessFunction):
    """Alert when a card spends more than ``limit`` within one minute (event time).

    Keeps the card's recent (time, amount) pairs in list state; an event-time timer one
    minute after each payment prunes what can no longer count, so state stays small.
    """

    WINDOW = 60 * SEC

    def __init__(self, limit: float) -> None:
        self.limit = limit

    def open(self, ctx):
        self.recent = ctx.get_list_state("recent")

    def process_element(self, row, ctx):
        now = ctx.timestamp
        self.recent.add((now, row["amount"]))
        spent = sum(a for t, a in self.recent if now - self.WINDOW < t <= now)
        ctx.timer_service().register_event_time_timer(now + self.WINDOW)
        if spent > self.limit:
            return [{"card": ctx.key, "at": now, "spent": spent}]
        return None

    def on_timer(self, timestamp, ctx):
        keep = [(t, a) for t, a in self.recent if t > timestamp - self.WINDOW]
        self.recent.update(keep)
        return None


def test_fraud_detection_example():
    rnd = random.Random(7)
    cards = ["c1", "c2", "c3", "c4"]
    txns = []  # in event-time order per card, interleaved across cards
    clock = {c: 0 for c in cards}
    for _ in range(400):
        c = rnd.choice(cards)
        clock[c] += rnd.randint(1, 40) * SEC
        txns.append((c, clock[c], rnd.choice([5.0, 20.0, 80.0, 150.0])))
    limit = 300.0
    # oracle: spending of the card in (t - 1 min, t], over payments seen so far
    want = []
    for i, (c, t, _) in enumerate(txns):
        spent = sum(a for c2, t2, a in txns[:i + 1] if c2 == c and t - 60 * SEC < t2 <= t)
        if spent > limit:
            want.append({"card": c, "at": t, "spent": spent})

    op = opened(KeyedProcess(SpendingAlert(limit), "card", time_column="ts"))
    got = []
    for i in range(0, len(txns), 25):
        chunk = txns[i:i + 25]
        b = pa.record_batch({"card": [c for c, _, _ in chunk],
                             "ts": pa.array([t for _, t, _ in chunk], pa.timestamp("us")),
                             "amount": [a for _, _, a in chunk]})
        got += rows(op.process(b))
        # each card pays in time order: the watermark is the slowest card's latest time
        latest: dict[str, int] = {}
        for c, t, _ in txns[: i + 25]:
            latest[c] = t
        got += rows(op.on_watermark(min(latest.values())))
        assert max(len(op.store._data.get(("recent", c), [])) for c in cards) < 40
    got += rows(op.finish())
    assert want and got == want
    assert len(op.store) == 0  # every list pruned at the end of input


def test_function_instance_is_not_shared_between_parallel_operators(executor):
    """State handles kept on ``self`` in open() stay per operator instance in streaming."""
    import millstream as ms
    from millstream.ops.state.process import KeyedProcessFunction as KPF

    class Count(KPF):
        def open(self, ctx):
            self.n = ctx.get_state("n", 0)

        def process_element(self, row, ctx):
            self.n.update(self.n.value() + 1)
            return {"k": row["k"], "n": self.n.value()}

    ds = (ms.from_items([{"k": k, "ts": i} for i, k in enumerate("abcdabcd")])
          .with_watermark("ts", "0s").group_by("k").process(Count()))
    want = sorted((k, n) for k in "abcd" for n in (1, 2))
    assert sorted((r["k"], r["n"]) for r in ds.collect()) == want
    job = ds.start(checkpoint_interval=0, executor=executor)
    assert job.await_termination(30)
    assert sorted((r["k"], r["n"]) for r in job.sink.rows()) == want
