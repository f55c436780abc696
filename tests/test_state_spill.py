"""Keyed state and timers larger than the memory limit: spilled to local disk, same results."""

from __future__ import annotations

import os
import pickle
import random
import threading

import pyarrow as pa
import pytest
from streams import CountWithTimeout as BaseCountWithTimeout

from millstream.core.arrow import batch_to_rows
from millstream.core.context import default_context
from millstream.core.keygroups import key_group_owners, key_hashes, owned_key_groups
from millstream.core.time import VirtualClock
from millstream.errors import PlanError, SimulatedCrash, UserCodeFailure
from millstream.ops.state.process import KeyedProcess, KeyedProcessFunction
from millstream.ops.state.spill_store import decode_key, deep_size, encode_key
from millstream.ops.state.store import KeyedStateStore
from millstream.ops.state.timers import TimerService
from millstream.runtime.checkpoint import BlobStore, CheckpointStore, externalize
from millstream.testing import CollectingSink

SEC = 1_000_000


def rows(batches) -> list[dict]:
    return [r for b in batches for r in batch_to_rows(b)]


# --------------------------------------------------------------------------- functions


class Rich(KeyedProcessFunction):
    """Every kind of state, both timer kinds, timer deletes, clears and side outputs."""

    def open(self, ctx):
        self.count = ctx.get_state("count", 0)
        self.last = ctx.get_state("last", None)
        self.hist = ctx.get_list_state("hist")
        self.seen = ctx.get_map_state("seen")
        self.pad = ctx.get_state("pad", None)

    def process_element(self, row, ctx):
        v, ts = row["v"], ctx.timer_service()
        self.count.update(self.count.value() + 1)
        self.hist.add(v)
        self.seen.put(v % 5, self.seen.get(v % 5, 0) + 1)
        if self.pad.value() is None:
            self.pad.update("p" * (40 + 10 * v))
        if v % 7 == 0 and self.last.value() is not None:
            ts.delete_event_time_timer(self.last.value() + 10 * SEC)
        self.last.update(ctx.timestamp)
        ts.register_event_time_timer(ctx.timestamp + 10 * SEC)
        if v % 3 == 0:
            ts.register_processing_time_timer(ctx.current_processing_time() + v * 1000)
        if v % 4 == 0:
            ctx.output("fours", {"k": ctx.key, "v": v, "n": self.count.value()})
        out = {"k": ctx.key, "n": self.count.value(), "sum": sum(self.hist),
               "seen": str(sorted(self.seen.items())), "pad": len(self.pad.value())}
        if v == 11:  # forget everything about this key
            for state in (self.count, self.last, self.hist, self.seen, self.pad):
                state.clear()
        return out

    def on_timer(self, timestamp, ctx):
        out = {"k": ctx.key, "at": timestamp, "domain": ctx.time_domain,
               "hist": str(self.hist.get()), "keys": str(sorted(self.seen)),
               "values": str(sorted(self.seen.values())), "len": len(self.seen),
               "empty": self.seen.is_empty(), "has1": 1 in self.seen}
        if ctx.time_domain == "event_time":
            self.hist.update(self.hist.get()[-2:])
        elif not self.seen.is_empty():
            self.seen.remove(min(self.seen.keys()))
        return out


def _script(seed: int, n_keys: int = 60, steps: int = 60) -> list:
    rnd = random.Random(seed)
    keys = [f"key{i}" for i in range(n_keys)]
    script, t = [], 0
    for _ in range(steps):
        r = rnd.random()
        if r < 0.6:
            n = rnd.randint(1, 30)
            script.append(("b", {"k": [rnd.choice(keys) for _ in range(n)],
                                 "v": [rnd.randint(1, 12) for _ in range(n)],
                                 "t": [(t + rnd.randint(-3, 8)) * SEC for _ in range(n)]}))
        elif r < 0.85:
            t += rnd.randint(0, 6)
            script.append(("w", t * SEC))
        else:
            script.append(("clock", rnd.randint(0, 8000)))
    return script


def _make(limit, clock):
    return KeyedProcess(Rich, "k", time_column="t", clock=clock, state_memory_limit=limit)


def _run(script, limit, cut: int | None = None, limit_after=None):
    """Outputs of every step (and the final spill stats); restore from a snapshot at ``cut``."""
    clock = VirtualClock(0)
    op = _make(limit, clock)
    op.open(default_context())
    out, spilled = [], {"keys_read_back": 0, "spilled_timers": 0}
    for i, (kind, arg) in enumerate(script):
        if i == cut:
            snap = pickle.loads(pickle.dumps(op.snapshot()))
            op.close()
            op = _make(limit_after, clock)
            op.restore(snap)  # before open: spilled rows go to a file in the default dir
            op.open(default_context())
        if kind == "b":
            out.append(rows(op.process(pa.record_batch(arg))))
        elif kind == "w":
            out.append(rows(op.on_watermark(arg)))
        else:
            clock.advance(arg)
            out.append(rows(op.advance_processing_time()))
        out.append(rows(op.take_side_output("fours")))
        stats = op.spill_stats()
        spilled["keys_read_back"] = max(spilled["keys_read_back"], stats["keys_read_back"])
        spilled["spilled_timers"] = max(spilled["spilled_timers"], stats["spilled_timers"])
    out.append(rows(op.finish()))
    op.close()
    return out, spilled


# --------------------------------------------------------------------------- same results


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spilling_does_not_change_results(seed):
    script = _script(seed)
    base, unspilled = _run(script, None)
    assert unspilled == {"keys_read_back": 0, "spilled_timers": 0}
    assert any(r.get("domain") == "processing_time" for step in base for r in step)
    assert any(r.get("domain") == "event_time" for step in base for r in step)
    for limit in (0, 3_000, 30_000):
        got, spilled = _run(script, limit)
        assert got == base, f"limit {limit}"
        assert spilled["keys_read_back"] > 0, f"limit {limit}: nothing was read back from disk"
    assert _run(script, 0)[1]["spilled_timers"] > 0


@pytest.mark.parametrize("seed", [3, 4])
def test_snapshot_of_spilled_state_restores_to_the_same_results(seed):
    script = _script(seed, steps=40)
    base, _ = _run(script, None)
    for cut in range(2, len(script), 7):
        for before, after in ((0, 0), (2_000, None), (None, 0)):
            got, _ = _run(script, before, cut, after)
            assert got == base, f"cut {cut}, limits {before} -> {after}"


class WindowSum(KeyedProcessFunction):
    """Tumbling event-time windows by hand: map, list and value state and one timer per window."""

    W = 10 * SEC

    def open(self, ctx):
        self.sums = ctx.get_map_state("sums")  # window end -> (n, sum)
        self.items = ctx.get_list_state("items")  # (ts, v) of windows not fired yet
        self.total = ctx.get_state("total", 0)

    def process_element(self, row, ctx):
        end = ctx.timestamp // self.W * self.W + self.W
        n, s = self.sums.get(end, (0, 0))
        self.sums.put(end, (n + 1, s + row["v"]))
        self.items.add((ctx.timestamp, row["v"]))
        self.total.update(self.total.value() + 1)
        ctx.timer_service().register_event_time_timer(end)
        if self.total.value() % 5 == 0:
            return {"k": ctx.key, "kind": "nth", "a": self.total.value(), "b": 0, "c": 0, "d": 0}
        return None

    def on_timer(self, timestamp, ctx):
        n, s = self.sums.get(timestamp)
        self.sums.remove(timestamp)
        closed = [v for t, v in self.items if t < timestamp]
        self.items.update([(t, v) for t, v in self.items if t >= timestamp])
        return {"k": ctx.key, "kind": "window", "a": timestamp, "b": s, "c": n,
                "d": sum(closed)}


def test_window_sums_match_a_plain_python_oracle_with_and_without_spilling():
    rnd = random.Random(5)
    keys = [f"user{i}" for i in range(400)]
    batches, events, t = [], [], 0
    for _ in range(60):
        chunk = []
        for _ in range(rnd.randint(20, 80)):
            t += rnd.randint(0, 300_000)
            chunk.append((rnd.choice(keys), t, rnd.randint(1, 100)))
        rnd.shuffle(chunk)  # out of order within a batch, never late
        events += chunk
        batches.append(chunk)
    # oracle: per key and window, count and sum; per key, every fifth element
    want, windows, seen = [], {}, {}
    for k, ts, v in events:
        end = ts // WindowSum.W * WindowSum.W + WindowSum.W
        n, s = windows.get((k, end), (0, 0))
        windows[(k, end)] = (n + 1, s + v)
    for (k, end), (n, s) in windows.items():
        want.append({"k": k, "kind": "window", "a": end, "b": s, "c": n, "d": s})
    for k, _ts, _v in events:
        seen[k] = seen.get(k, 0) + 1
        if seen[k] % 5 == 0:
            want.append({"k": k, "kind": "nth", "a": seen[k], "b": 0, "c": 0, "d": 0})

    def run(limit):
        op = KeyedProcess(WindowSum, "k", time_column="ts", state_memory_limit=limit)
        op.open(default_context())
        out = []
        for chunk in batches:
            out += rows(op.process(pa.record_batch({
                "k": [k for k, _, _ in chunk],
                "ts": pa.array([ts for _, ts, _ in chunk], pa.timestamp("us")),
                "v": [v for _, _, v in chunk]})))
            out += rows(op.on_watermark(max(ts for _, ts, _ in chunk)))
        out += rows(op.finish())
        stats = op.spill_stats()
        assert len(op.store) == 0 or all(n == "total" for n, _k in op.store._data)
        op.close()
        return out, stats

    big, big_stats = run(None)
    small, small_stats = run(20_000)
    assert big_stats["spills"] == 0 and small_stats["spills"] > 10
    assert small_stats["keys_read_back"] > 100
    assert small == big  # the same rows in the same order

    def key(r):
        return (r["k"], r["kind"], r["a"])

    assert sorted(big, key=key) == sorted(want, key=key)


# --------------------------------------------------------------------------- rescaling


def _route(op_rows, parallelism: int, key_groups: int):
    """Split rows by the instance owning each row's key group."""
    owners = key_group_owners(key_groups, parallelism)
    parts = [[] for _ in range(parallelism)]
    for r in op_rows:
        h = int(key_hashes([pa.array([r["k"]])], 1)[0])
        parts[owners[h % key_groups]].append(r)
    return parts


def _feed(op, rows_: list[dict]) -> list[dict]:
    out = []
    for i in range(0, len(rows_), 50):
        chunk = rows_[i:i + 50]
        out += rows(op.process(pa.record_batch({c: [r[c] for r in chunk] for c in chunk[0]})))
        out += rows(op.on_watermark(max(r["t"] for r in chunk) - 5 * SEC))
    return out


@pytest.mark.parametrize(("after", "limit_after"), [(3, 0), (1, 5_000), (2, None)])
def test_key_group_snapshot_of_a_spilled_operator_restores_at_another_parallelism(
        after, limit_after, tmp_path):
    rnd = random.Random(after)
    events, t = [], 0
    for _ in range(1500):
        t += rnd.randint(0, 400_000)
        events.append({"k": f"k{rnd.randint(0, 199)}", "v": rnd.randint(1, 12), "t": t})
    first, second = events[:800], events[800:]
    clock = VirtualClock(0)

    def fresh(limit):
        op = _make(limit, clock)
        op.open(default_context())
        return op

    plain = fresh(None)
    want = _feed(plain, events) + rows(plain.finish())
    plain.close()

    op = fresh(3_000)
    got = _feed(op, first)
    assert op.spill_stats()["spilled_keys"] > 50 and op.spill_stats()["spilled_timers"] > 0
    whole = pickle.loads(pickle.dumps(op.snapshot_by_key_group(16)))
    # the way a parallel task checkpoints: one group at a time, each written out as blobs
    store = BlobStore(str(tmp_path / "chk"))
    snap = {}
    for g, st in op.iter_key_group_snapshots(16):
        snap[g] = externalize(pickle.loads(pickle.dumps(st)), set(), set())
        store.put(snap[g])
    assert list(snap) == sorted(snap) == sorted(whole)
    resolved = {g: store.resolve(st) for g, st in snap.items()}
    for g, st in whole.items():  # the same as the whole snapshot, group by group
        mine = resolved[g]
        assert {k: v for k, v in mine.items() if k != "store"} == \
            {k: v for k, v in st.items() if k != "store"}
        if st["store"] is not None:
            assert mine["store"]["data"] == st["store"]["data"]
            assert mine["store"]["hashes"] == st["store"]["hashes"]
            assert (len(mine["store"]["spilled"]) == 0) == (len(st["store"]["spilled"]) == 0)
            if len(st["store"]["spilled"]):
                assert mine["store"]["spilled"].equals(st["store"]["spilled"])
    # spilled rows travel as one Arrow table per group (a checkpoint blob when large)
    spilled = [st["store"]["spilled"] for st in whole.values()
               if st["store"] is not None and len(st["store"]["spilled"])]
    assert spilled and all(isinstance(t, pa.Table) for t in spilled)
    op.close()
    restored = []
    for i in range(after):  # each part reads its own groups' blobs, one group at a time
        part = fresh(limit_after)
        part.restore_key_groups([snap[g] for g in owned_key_groups(i, after, 16) if g in snap],
                                load=store.resolve)
        restored.append(part)
    for part, part_rows in zip(restored, _route(second, after, 16)):
        if part_rows:
            got += _feed(part, part_rows)
        got += rows(part.finish())
        part.close()

    def key(r):
        return tuple(sorted((k, str(v)) for k, v in r.items()))

    assert sorted(got, key=key) == sorted(want, key=key)


class CountWithTimeout(BaseCountWithTimeout):
    """``streams.CountWithTimeout``, with 100 bytes of list state per event."""

    def open(self, ctx):
        super().open(ctx)
        self.pad = ctx.get_list_state("pad")

    def process_element(self, row, ctx):
        self.pad.add("x" * 100)
        super().process_element(row, ctx)

    def on_timer(self, timestamp, ctx):
        assert len(self.pad) == self.count.value()
        self.pad.clear()
        return super().on_timer(timestamp, ctx)


def test_streaming_job_with_spilled_state_crashes_and_restores_at_another_parallelism(
        feed, tmp_path):
    rng = random.Random(9)
    items, t = [], 0
    for _ in range(16):
        batch = []
        for _ in range(40):
            t += rng.randint(0, 3000)
            batch.append({"k": f"u{rng.randint(0, 299)}", "ts": max(0, t - rng.randint(0, 5000))})
        items.append(batch)

    def make(f):
        return (f.source(items, partitions=2).dataset().with_watermark("ts", "5s").group_by("k")
                .process(CountWithTimeout))

    f = feed()
    plain = f.start(make(f), checkpoint_interval=0, parallelism=2)
    assert plain.await_termination(30)
    expected = sorted(tuple(sorted(r.items())) for r in plain.sink.rows())
    assert expected

    # 8 KB per task: keyed state keeps 4 KB in memory (a hundred keys and more spill)
    chk, sink, f = str(tmp_path / "chk"), CollectingSink(), feed()
    ds = make(f)
    first = f.start(ds, checkpoint=chk, sink=sink, checkpoint_interval=0, parallelism=2,
                    memory_limit=8_000, _fault=(6, "after_checkpoint"))
    with pytest.raises(SimulatedCrash):
        first.await_termination(30)
    assert first.metrics()["counters"].get("millstream.state_spills"), \
        "the job's keyed state should have spilled"
    state = CheckpointStore(chk).latest()[1]
    (groups,) = state["keyed"].values()
    assert any(st["store"] and st["store"]["spilled"] for g in groups.values() for st in g)
    second = f.start(ds, checkpoint=chk, sink=sink, checkpoint_interval=0, parallelism=3,
                     memory_limit=8_000)
    assert second.await_termination(30)
    # (a collecting sink resumes from the newest checkpoint whose commit is known)
    assert second.metrics()["restored_from_epoch"] == 5
    assert sorted(tuple(sorted(r.items())) for r in sink.rows()) == expected


# --------------------------------------------------------------------------- bounded memory


def test_state_much_larger_than_the_budget_completes_within_it():
    limit = 4 << 20
    n_keys = 200_000

    class Big(KeyedProcessFunction):
        def open(self, ctx):
            self.blob = ctx.get_state("blob")
            self.n = ctx.get_state("n", 0)

        def process_element(self, row, ctx):
            if self.blob.value() is None:
                self.blob.update(f"{ctx.key:08d}" * 40)  # 320 bytes
            self.n.update(self.n.value() + 1)
            if ctx.key % 10 == 0:
                ctx.timer_service().register_event_time_timer(ctx.key)
            if row["check"]:
                return {"k": ctx.key, "n": self.n.value(),
                        "ok": self.blob.value() == f"{ctx.key:08d}" * 40}
            return None

        def on_timer(self, timestamp, ctx):
            return {"k": ctx.key, "n": self.n.value(), "ok": timestamp == ctx.key}

    op = KeyedProcess(Big, "k", state_memory_limit=limit)
    ctx = default_context()
    op.open(ctx)
    order = list(range(n_keys))
    random.Random(1).shuffle(order)
    step = 8192
    for i in range(0, n_keys, step):
        part = order[i:i + step]
        assert not rows(op.process(pa.record_batch({"k": part, "check": [False] * len(part)})))
    again = order[::40]
    got = rows(op.process(pa.record_batch({"k": again, "check": [True] * len(again)})))
    assert got == [{"k": k, "n": 2, "ok": True} for k in again]

    stats = op.spill_stats()
    assert stats["spilled_keys"] > 0.9 * n_keys
    assert stats["spilled_timers"] > 0.8 * (n_keys // 10)
    assert stats["disk_bytes"] > 40 * limit / 4  # most of the ~70 MB of state is on disk
    assert ctx.counters[("millstream", "state_spills")] == stats["spills"] > 10
    # the operator's own accounting stayed within the budget ...
    assert op.peak_state_memory_bytes <= limit * 1.05
    assert op.state_memory_bytes() <= limit
    # ... and is not an underestimate of what is really held in memory
    real = sum(deep_size(k) + deep_size(v) for k, v in op.store._data.items())
    assert real <= op.store.memory_bytes()

    fired = rows(op.finish())
    assert len(fired) == n_keys // 10
    assert all(r["ok"] and r["n"] in (1, 2) for r in fired)
    assert [r["k"] for r in fired] == list(range(0, n_keys, 10))  # timestamp order
    assert op.peak_state_memory_bytes <= limit * 1.05
    path = op._spill.store().path
    op.close()
    assert not os.path.exists(path)


# --------------------------------------------------------------------------- pieces


def test_store_spills_least_recently_used_keys_and_reads_them_back():
    store = KeyedStateStore(memory_limit=5_000)
    count = store.value_state("count", 0)
    items = store.list_state("items")
    for i in range(200):
        store.set_current_key(("k", i % 50))
        count.update(count.value() + 1)
        items.add("x" * 30)
        store.maintain()
    assert store.spilled and 0 < store.num_spilled_keys() < 50
    assert len(store) == 100  # two states of 50 keys, in memory or on disk
    assert sorted(store.keys("count")) == [("k", i) for i in range(50)]
    assert store.state_keys() == {("k", i) for i in range(50)}
    store.clear_key(("k", 7))  # maybe on disk
    store.set_current_key(("k", 7))
    assert count.value() == 0 and items.get() == []
    for i in (0, 13, 49):
        store.set_current_key(("k", i))
        assert (count.value(), len(items)) == (4, 4)
    assert len(store) == 98
    # a restore of a spilled snapshot reads the current key back from disk
    snap = pickle.loads(pickle.dumps(store.snapshot()))
    assert snap["spilled"]
    other = KeyedStateStore(memory_limit=0)
    other.set_current_key(("k", 3))
    other.restore(snap)
    assert other.value_state("count", 0).value() == 4
    assert sorted(other.keys("items")) == sorted(store.keys("items"))
    store._spill.close()
    other._spill.close()


def test_timers_spilled_to_disk_pop_in_order():
    rnd = random.Random(2)
    service = TimerService(VirtualClock(0))
    service.configure(8 * 320 * 6)  # six timers of each kind in memory
    model: dict[tuple[str, int], int] = {}
    seq = 0
    fired, want = [], []
    limit = 0
    for _ in range(3000):
        r = rnd.random()
        key, ts = f"k{rnd.randint(0, 30)}", rnd.randint(limit - 5, limit + 200)
        service.current_key = key
        if r < 0.55:
            service.register_event_time_timer(ts)
            if (key, ts) not in model:
                seq += 1
                model[(key, ts)] = seq
        elif r < 0.75:
            service.delete_event_time_timer(ts)
            model.pop((key, ts), None)
        else:
            limit += rnd.randint(0, 20)
            while (due := service.pop_event_timer(limit)) is not None:
                fired.append(due)
            for (k, t), _s in sorted(model.items(), key=lambda e: (e[0][1], e[1])):
                if t <= limit:
                    want.append((t, k))
                    del model[(k, t)]
        assert service.num_event_timers() == len(model)
    assert fired == want and len(want) > 300
    assert service.num_spilled_timers() > 0
    snap = service.snapshot()
    assert sorted((t, k) for t, _s, k, _h in snap["event"]) == sorted((t, k) for k, t in model)
    service._spill.close()


def test_close_deletes_the_spill_file_and_unpicklable_state_fails_clearly():
    class Keep(KeyedProcessFunction):
        def open(self, ctx):
            self.v = ctx.get_state("v")

        def process_element(self, row, ctx):
            self.v.update(threading.Lock() if row["bad"] else "x" * 200)

    op = KeyedProcess(Keep, "k", state_memory_limit=2_000)
    op.open(default_context())
    op.process(pa.record_batch({"k": list(range(300)), "bad": [False] * 300}))
    path = op._spill.store().path
    assert os.path.exists(path) and op.spill_stats()["spilled_keys"] > 200
    op.close()
    assert not os.path.exists(path)

    op = KeyedProcess(Keep, "k", state_memory_limit=2_000)
    op.open(default_context())
    with pytest.raises((PlanError, UserCodeFailure), match="cannot be pickled"):
        op.process(pa.record_batch({"k": list(range(300)), "bad": [True] * 300}))
    op.close()
    with pytest.raises(PlanError, match="state_memory_limit"):
        KeyedProcess(Keep, "k", state_memory_limit=-1)


def test_key_encoding_is_canonical():
    s = "".join(["a", "b"])  # a distinct object equal to "ab"
    assert encode_key(("ab", "ab")) == encode_key(("ab", s))
    assert encode_key(-0.0) == encode_key(0.0)
    for key in [1, "x", ("a", 1, None), (("n", 2), b"z"), 2.5, None, ()]:
        assert decode_key(encode_key(key)) == key


def test_version_1_snapshots_still_restore():
    """Snapshots taken before spilling existed (hashes kept per operator) restore as before."""
    import cloudpickle

    h = {k: int(key_hashes([pa.array([k])], 1)[0]) for k in ("a", "b")}
    old = {"version": 1, "operator": "KeyedProcess", "watermark": 5, "side": pickle.dumps({}),
           "store": {"version": 1, "kinds": {"count": "value", "last": "value"},
                     "data": cloudpickle.dumps({("count", "a"): 2, ("last", "a"): 3,
                                                ("count", "b"): 1})},
           "timers": {"version": 1, "event": [(40, 1, "a"), (50, 2, "b")], "processing": [],
                      "seq": 2, "watermark": 5},
           "key_hashes": h}
    class Emit(KeyedProcessFunction):
        def on_timer(self, timestamp, ctx):
            return {"k": ctx.key, "n": ctx.get_state("count").value(), "at": timestamp,
                    "last": ctx.get_state("last").value()}

    for limit in (None, 0):
        op = KeyedProcess(Emit, "k", time_column="ts", state_memory_limit=limit)
        op.restore(old)
        op.open(default_context())
        groups = op.snapshot_by_key_group(8)
        assert sorted(groups) == sorted({h["a"] % 8, h["b"] % 8})
        out = rows(op.finish())
        assert [(r["k"], r["n"], r["at"], r["last"]) for r in out] == [("a", 2, 40, 3),
                                                                       ("b", 1, 50, None)]
        op.close()
