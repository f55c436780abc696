"""Session window state spills to disk under the memory limit, with unchanged results.

Each script runs with a limit so small that sessions move to disk all the time and with no
limit at all: the rows must be the same (and match a plain-Python oracle that takes one
event at a time), snapshots must hold the spilled sessions, and no file may stay behind.
"""

from __future__ import annotations

import math
import os
import pickle
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracles import all_aggs, oracle_sessions
from window_cases import to_batch

from millstream.core.context import default_context
from millstream.core.keygroups import owned_key_groups
from millstream.expr.windows import Session
from millstream.ops.window import WindowAggregate

AGGS = ["s", "c", "n", "m", "lo", "hi", "d", "l"]
GAP_MS = 3_000
SPILLS = ("millstream", "state_spills")


class Runs:
    """Makes session operators over one spill directory and remembers their contexts."""

    def __init__(self, spill_dir: str, lateness: int | str = 0, keys=("k",)) -> None:
        self.spill_dir = spill_dir
        self.lateness = lateness
        self.keys = list(keys)
        self.ctxs: list = []

    def factory(self, limit: int | None):
        def make() -> WindowAggregate:
            op = WindowAggregate(Session(GAP_MS * 1000), self.keys, all_aggs(), "t",
                                 allowed_lateness=self.lateness, state_memory_limit=limit)
            ctx = default_context(spill_dir=self.spill_dir)
            self.ctxs.append(ctx)
            op.open(ctx)
            return op
        return make

    def spills(self) -> int:
        return sum(c.counters.get(SPILLS, 0) for c in self.ctxs)


def step(op: WindowAggregate, kind: str, arg) -> list[dict]:
    got = op.process(to_batch(arg)) if kind == "b" else op.on_watermark(arg)
    return [r for b in got for r in b.to_pylist()]


def drive(make, script, snapshot_at: int | None = None):
    """Rows emitted per step (in a canonical order: the order inside one emission is not
    specified) and the late rows."""
    op = make()
    out, late = [], []
    for i, (kind, arg) in enumerate(script):
        if snapshot_at == i:
            state = pickle.loads(pickle.dumps(op.snapshot()))
            op.close()
            op = make()
            op.restore(state)
        out.append(sorted(step(op, kind, arg), key=repr))
        late += [r for b in op.take_side_output("late") for r in b.to_pylist()]
    out.append(sorted((r for b in op.finish() for r in b.to_pylist()), key=repr))
    late += [r for b in op.take_side_output("late") for r in b.to_pylist()]
    op.close()
    return out, late


def rows_of(run) -> list[dict]:
    return [r for rows in run[0] for r in rows]


def oracle(script, lateness_us: int):
    """One event at a time: final aggregates per (key, start µs, end µs) and the late events
    (``oracles.oracle_sessions``; ``first`` is checked on its own here)."""
    want, late = oracle_sessions(script, GAP_MS * 1000, lateness_us)
    return {k: {n: v for n, v in w.items() if n != "f"} for k, w in want.items()}, late


def resolve(rows) -> dict:
    """Upsert by key and window; a retraction deletes its window."""
    import datetime as dt

    epoch = dt.datetime(1970, 1, 1)
    res = {}
    for r in rows:
        key = (r["k"], (r["window_start"] - epoch) // dt.timedelta(microseconds=1),
               (r["window_end"] - epoch) // dt.timedelta(microseconds=1))
        if r.get("is_retraction"):
            del res[key]
        else:
            res[key] = r
    return res


def assert_matches_oracle(run, script, lateness_us: int) -> None:
    want, want_late = oracle(script, lateness_us)
    got = resolve(rows_of(run))
    assert set(got) == set(want)
    for key, w in want.items():
        g = dict(got[key], l=sorted(got[key]["l"]))
        for name in AGGS:
            if name == "m" and w[name] is not None:
                assert math.isclose(g[name], w[name]), (key, name)
            else:
                assert g[name] == w[name], (key, name, g[name], w[name])
    assert sorted(map(repr, run[1])) == sorted(repr({"k": k, "t": t, "v": v})
                                                for k, t, v in want_late)


def _script(seed: int, n_batches: int = 24, per_batch: int = 150, keys: int = 120) -> list:
    """Event time advances ~2 s a batch with up to 12 s of disorder; watermarks lag 8 s."""
    rnd = random.Random(seed)
    script = []
    for i in range(n_batches):
        base = i * 2_000
        script.append(("b", [(rnd.choice([f"k{rnd.randrange(keys)}", None]) if i % 7 == 0
                              else f"k{rnd.randrange(keys)}",
                              base + rnd.randrange(-12_000, 4_000),
                              rnd.choice([None, *range(-5, 30)])) for _ in range(per_batch)]))
        if i % 2 == 1:
            script.append(("w", (base - 8_000) * 1000))
    return script


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("lateness", [0, "5s"])
def test_tiny_memory_limit_gives_the_same_rows_as_no_limit(tmp_path, lateness):
    script = _script(1)
    runs = Runs(str(tmp_path), lateness)
    base = drive(runs.factory(None), script)
    assert runs.spills() == 0
    spilled = drive(runs.factory(4 << 10), script)
    assert runs.spills() > 20
    assert spilled == base
    assert_matches_oracle(base, script, 0 if lateness == 0 else 5_000_000)
    assert os.listdir(tmp_path) == []


def test_every_session_on_disk_after_every_step(tmp_path):
    # limit 0: after each step every held session is on disk, so every event and every
    # watermark has to find what it needs among the spill files
    script = _script(2, n_batches=14, per_batch=60, keys=25)
    runs = Runs(str(tmp_path), "4s")
    base = drive(runs.factory(None), script)
    op = runs.factory(0)()
    for kind, arg in script[:9]:
        step(op, kind, arg)
        assert all(t is None for t in op._store.buckets) and op._store.spills
    op.close()
    assert drive(runs.factory(0), script) == base
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("lateness", [0, "5s"])
def test_snapshots_include_spilled_sessions(tmp_path, lateness):
    script = _script(3, n_batches=14, per_batch=100)
    runs = Runs(str(tmp_path), lateness)
    base = drive(runs.factory(None), script)
    for cut in (6, len(script) - 1):
        assert drive(runs.factory(3 << 10), script, snapshot_at=cut) == base, f"cut {cut}"
    # the snapshot of a spilling operator holds the same sessions as one that never spills
    plain, spilling = runs.factory(None)(), runs.factory(3 << 10)()
    for kind, arg in script[:10]:
        step(plain, kind, arg)
        step(spilling, kind, arg)
    assert spilling._store.spills
    files = sorted(os.listdir(tmp_path))
    distinct = plain._store._score.state_cols[6][0]  # count_distinct: a set, in any order

    def sessions(op):
        rows = op.snapshot()["state"].to_pylist()
        return sorted(repr({**r, distinct: sorted(r[distinct])}) for r in rows)

    assert sessions(spilling) == sessions(plain)
    assert sorted(os.listdir(tmp_path)) == files  # spilled state stays spilled
    plain.close()
    spilling.close()
    assert os.listdir(tmp_path) == []


def test_key_group_snapshots_with_spilled_state_restore_elsewhere(tmp_path):
    script = _script(4, n_batches=20)
    cut = 12
    runs = Runs(str(tmp_path), "3s")
    want = sorted(repr(r) for rows in drive(runs.factory(None), script)[0] for r in rows)
    whole = runs.factory(2 << 10)()
    got = []
    for kind, arg in script[:cut]:
        got += map(repr, step(whole, kind, arg))
    assert whole._store.spills
    groups = whole.snapshot_by_key_group(8)
    whole.close()
    parts = [runs.factory(2 << 10)() for _ in range(3)]
    owner = {g: p for p in range(3) for g in owned_key_groups(p, 3, 8)}
    for p, op in enumerate(parts):
        op.restore_key_groups([groups[g] for g in owned_key_groups(p, 3, 8) if g in groups])
    from millstream.core.keygroups import key_hashes

    for kind, arg in script[cut:]:
        for p, op in enumerate(parts):
            if kind == "b":
                gid = key_hashes([to_batch(arg).column("k")], len(arg)) % 8
                mine = [e for e, g in zip(arg, gid) if owner[int(g)] == p]
                got += map(repr, step(op, kind, mine)) if mine else []
            else:
                got += map(repr, step(op, kind, arg))
    got += [repr(r) for op in parts for b in op.finish() for r in b.to_pylist()]
    for op in parts:
        op.close()
    assert sorted(got) == want
    assert os.listdir(tmp_path) == []


def test_sessions_without_keys_spill_too(tmp_path):
    script = [(kind, [(None, t, v) for _, t, v in arg] if kind == "b" else arg)
              for kind, arg in _script(5, n_batches=16, per_batch=40)]
    runs = Runs(str(tmp_path), "2s", keys=())
    base = drive(runs.factory(None), script)
    assert drive(runs.factory(512), script) == base
    assert runs.spills() > 0 and os.listdir(tmp_path) == []


def test_first_and_collect_list_follow_first_arrivals_even_from_disk(tmp_path):
    # the session [9 s, 15 s) arrives first, [0 s, 6 s) later (they do not overlap); the
    # event at 4.5 s bridges them: the merged session lists the 9 s session's values first
    script = [("b", [("a", 9_000, 1)]), ("b", [("a", 0, 2)]), ("b", [("a", 4_500, 3)])]
    for limit in (None, 0):
        op = WindowAggregate(Session("6s"), ["k"], all_aggs(), "t", state_memory_limit=limit)
        op.open(default_context(spill_dir=str(tmp_path)))
        for kind, arg in script:
            step(op, kind, arg)
        assert bool(op._store.spills) == (limit == 0)
        rows = [r for b in op.finish() for r in b.to_pylist()]
        assert [(r["f"], r["l"]) for r in rows] == [(1, [1, 2, 3])], limit
        op.close()
    assert os.listdir(tmp_path) == []


events_st = st.tuples(st.sampled_from(["a", "b", "c", None]), st.integers(-9_000, 12_000),
                      st.one_of(st.none(), st.integers(-5, 20)))
steps_st = st.lists(st.one_of(st.tuples(st.just("b"), st.lists(events_st, min_size=1, max_size=6)),
                              st.tuples(st.just("w"), st.integers(0, 9_000))),
                    min_size=1, max_size=14)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(steps=steps_st, lateness=st.sampled_from([0, 2_500_000]), limit=st.sampled_from([0, 300]),
       cut=st.integers(0, 14))
def test_random_streams_spilled_or_not_match_the_oracle(tmp_path, steps, lateness, limit, cut):
    script, wm = [], 0
    for kind, arg in steps:
        if kind == "w":
            wm += arg
            script.append(("w", wm * 1000))
        else:
            script.append(("b", [(k, wm + t, v) for k, t, v in arg]))
    runs = Runs(str(tmp_path), lateness)
    base = drive(runs.factory(None), script)
    assert_matches_oracle(base, script, lateness)
    assert drive(runs.factory(limit), script) == base
    assert drive(runs.factory(limit), script, snapshot_at=cut) == base
    assert os.listdir(tmp_path) == []
