"""Window-operator test drivers shared by ``test_windows``, ``test_window_combiner``,
``test_session_spill`` and ``test_global_windows``: the (k, t, v) rows, operators with every
aggregate of ``oracles.all_aggs``, driving a script of batches and watermarks, applying
the update and retraction rules to what they emit, and the scripts of the property tests.
"""

from __future__ import annotations

import math
import pickle

import pyarrow as pa
import pyarrow.compute as pc
from hypothesis import strategies as st
from oracles import AGG_NAMES, all_aggs, sliding_windows, tumbling_windows

from millstream.core.context import default_context
from millstream.expr.windows import Session, Sliding, Tumbling
from millstream.ops.window import WindowAggregate

#: rows (key, event time in epoch ms, value)
SCHEMA = pa.schema([("k", pa.string()), ("t", pa.int64()), ("v", pa.int64())])


def make(window, keys=("k",), lateness=0, aggs=None) -> WindowAggregate:
    """An opened window operator over ``t`` (every aggregate unless ``aggs``)."""
    op = WindowAggregate(window, list(keys), aggs or all_aggs(), "t", allowed_lateness=lateness)
    op.open(default_context())
    return op


def to_batch(events) -> pa.RecordBatch:
    """(k, t, v) events as a batch of :data:`SCHEMA`."""
    return pa.RecordBatch.from_pylist([{"k": k, "t": t, "v": v} for k, t, v in events],
                                      schema=SCHEMA)


def rows_of(batches) -> list[dict]:
    """The rows of output batches, window bounds as int µs."""
    out = []
    for b in batches:
        t = pa.Table.from_batches([b])
        for name in ("window_start", "window_end"):
            i = t.schema.get_field_index(name)
            t = t.set_column(i, name, pc.cast(t.column(name), pa.int64()))
        out.extend(t.to_pylist())
    return out


def drive(op_factory, script, snapshot_at: int | None = None):
    """Run a script of ("b", events) / ("w", watermark_us) steps; returns emissions and late rows.

    Emissions are (watermark at emission or None for finish(), row). With ``snapshot_at``,
    the operator is snapshotted (and pickled) before that step and replaced by a restored one.
    """
    op = op_factory()
    emitted: list[tuple[int | None, dict]] = []
    late: list[tuple] = []
    for i, (kind, arg) in enumerate(script):
        if snapshot_at == i:
            state = pickle.loads(pickle.dumps(op.snapshot()))
            op = op_factory()
            op.restore(state)
        out = op.process(to_batch(arg)) if kind == "b" else op.on_watermark(arg)
        emitted += [(op.watermark, r) for r in rows_of(out)]
        late += [(r["k"], r["t"], r["v"]) for b in op.take_side_output("late")
                 for r in b.to_pylist()]
    emitted += [(None, r) for r in rows_of(op.finish())]
    late += [(r["k"], r["t"], r["v"]) for b in op.take_side_output("late") for r in b.to_pylist()]
    return emitted, late


def resolve(emitted) -> dict:
    """Apply the update rules: upsert by key and window; a retraction row deletes its window.

    Also checks the flags: ``is_update`` exactly when a row for that key and window is held;
    without allowed lateness no window is emitted twice.
    """
    res: dict[tuple, dict] = {}
    for _, r in emitted:
        key = (r["k"], r["window_start"], r["window_end"])
        if r.get("is_retraction"):
            assert key in res, f"retraction of a window never emitted: {r}"
            del res[key]
            continue
        if "is_update" in r:
            assert r["is_update"] == (key in res), r
        else:
            assert key not in res, f"window emitted twice without allowed lateness: {r}"
        res[key] = r
    return res


def assert_matches(resolved: dict, expected: dict, skip: tuple = ()) -> None:
    """The resolved windows are the oracle's, every aggregate equal (``skip``: not those)."""
    assert set(resolved) == set(expected), (sorted(resolved, key=repr), sorted(expected, key=repr))
    for key, want in expected.items():
        got = dict(resolved[key])
        got["l"] = sorted(got["l"])
        for name in AGG_NAMES:
            if name in skip:
                continue
            if name == "m" and want[name] is not None:
                assert math.isclose(got[name], want[name]), (key, name, got[name], want[name])
            else:
                assert got[name] == want[name], (key, name, got[name], want[name])


def check_emission_timing(emitted) -> None:
    """Nothing fires before the watermark passes its end."""
    for wm, r in emitted:
        if wm is not None:
            assert r["window_end"] <= wm, (wm, r)


# event times are drawn relative to the current watermark (ms), so that many events are
# near the watermark: on time, late but allowed, or late
events_st = st.tuples(st.sampled_from(["a", "b", None]), st.integers(-9_000, 12_000),
                      st.one_of(st.none(), st.integers(-5, 20)))
steps_st = st.lists(st.one_of(st.tuples(st.just("b"), st.lists(events_st, min_size=1, max_size=6)),
                              st.tuples(st.just("w"), st.integers(0, 9_000))),
                    min_size=1, max_size=14)


def script_of(steps) -> list:
    """Watermark increments (ms) -> increasing watermarks (µs); event times relative to them."""
    out, wm = [], 0
    for kind, arg in steps:
        if kind == "w":
            wm += arg
            out.append(("w", wm * 1000))
        else:
            out.append((kind, [(k, wm + dt_, v) for k, dt_, v in arg]))
    return out


def rebatch(script, size: int) -> list:
    """The same events and watermark positions, cut into batches of ``size`` events."""
    out, pending = [], []
    for kind, arg in script:
        if kind == "w":
            out += [("b", pending[i:i + size]) for i in range(0, len(pending), size)]
            pending = []
            out.append((kind, arg))
        else:
            pending += arg
    out += [("b", pending[i:i + size]) for i in range(0, len(pending), size)]
    return out


#: (name, assigner factory, oracle window assignment or None for sessions)
WINDOWS = [("tumbling", lambda: Tumbling("5s"), tumbling_windows(5_000_000)),
           ("sliding", lambda: Sliding("6s", "2s"), sliding_windows(6_000_000, 2_000_000)),
           ("session", lambda: Session("3s"), None)]
