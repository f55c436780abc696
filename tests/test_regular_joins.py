"""Regular joins of two streams (``stream.join(stream, how=..., state_ttl=...)``): the
operator against a plain-Python reference of Flink's semantics (hypothesis: changelog
inputs, batch boundaries, spilled state, snapshots and key-group restores, state TTL by
event and processing time), and jobs on both executors and in batch, across a crash and a
restore at another parallelism."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from regular_cases import (
    DELETE,
    INSERT,
    LSCHEMA,
    RSCHEMA,
    UPDATE_AFTER,
    UPDATE_BEFORE,
    Reference,
    bag,
    change_bag,
    changelog_side,
    changes,
    fold,
    join_oracle,
    live_rows,
    make_op,
    out_changes,
    to_batch,
    visible_items,
)
from streams import UpsertTable, filled_source, wait_until

import millstream as ms
from millstream.core.changelog import VISIBLE
from millstream.core.context import default_context
from millstream.core.keygroups import key_hashes
from millstream.core.time import VirtualClock
from millstream.errors import PlanError, SimulatedCrash
from millstream.testing import CollectingSink, TestSource

HOWS = ["inner", "left", "right", "outer"]

# ----------------------------------------------------------------------------- operator


def _row(data, side: int, ident: int, t: int) -> dict:
    k = data.draw(st.sampled_from(["a", "b", "c", None]), label="key")
    if side == 0:
        return {"k": k, "x": data.draw(st.integers(0, 2), label="x"), "lt": t}
    return {"k": k, "y": data.draw(st.integers(0, 2), label="y"), "rt": t}


def _script(data, unique: bool = False, watermarks: bool = False):
    """Steps: ("b", side, [(kind, row)]) batches of changes (a retraction takes back a row
    still there) and, with ``watermarks``, ("w", µs) watermark advances. Small key and
    value domains, so rows repeat and keys have several partners."""
    live: list[list[dict]] = [[], []]
    steps, ident, t = [], 0, 0
    for _ in range(data.draw(st.integers(1, 25), label="steps")):
        if watermarks and data.draw(st.integers(0, 3), label="wm?") == 0:
            steps.append(("w", data.draw(st.integers(0, t + 3000), label="wm") * 1000))
            continue
        side = data.draw(st.integers(0, 1), label="side")
        rows = []
        for _ in range(data.draw(st.integers(1, 5), label="size")):
            t += data.draw(st.integers(0, 2000), label="dt")
            if live[side] and data.draw(st.integers(0, 2), label="back?") == 0:
                row = live[side].pop(data.draw(st.integers(0, len(live[side]) - 1)))
                rows.append((data.draw(st.sampled_from([DELETE, UPDATE_BEFORE])), row))
            else:
                row = _row(data, side, ident, t)
                if unique:
                    row["x" if side == 0 else "y"] = ident
                ident += 1
                live[side].append(row)
                rows.append((data.draw(st.sampled_from([INSERT, UPDATE_AFTER])), row))
        steps.append(("b", side, rows))
    return steps, live


def _expected(steps, how: str, ttl: int | None = None):
    ref = Reference(how, ttl)
    out, w = [], -(2 ** 63)
    for step in steps:
        if step[0] == "w":
            w = max(w, step[1])
            continue
        _b, side, rows = step
        for kind, row in rows:
            t = row["lt" if side == 0 else "rt"] * 1000
            out += ref.feed(side, kind, row, t, w)
    return out


def _drive(ops, steps, key_groups: int | None = None):
    """Feed ``steps`` to ``ops`` (one op, or several owning key groups ``g % len(ops)``)."""
    out = []
    for step in steps:
        if step[0] == "w":
            for op in ops:
                out += out_changes(op.on_watermark(step[1]))
            continue
        _b, side, rows = step
        b = to_batch(side, rows)
        if len(ops) == 1:
            out += out_changes(ops[0].process(b, side))
            continue
        g = key_hashes([b.column("__ms_jk0")], b.num_rows) % key_groups
        for i, op in enumerate(ops):
            part = b.filter(pa.array((g % len(ops)) == i))
            if part.num_rows:
                out += out_changes(op.process(part, side))
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), how=st.sampled_from(HOWS), limit=st.sampled_from([None, 0, 600]))
def test_operator_emits_what_the_reference_emits(data, how, limit):
    """Changelog inputs (+I/+U, -U/-D of rows still there, repeated rows), any batch
    boundaries, state in memory or spilled: the same changes as Flink's row-at-a-time
    algorithm, and what they leave is the batch join of what the inputs leave."""
    steps, live = _script(data)
    op = make_op(how, state_memory_limit=limit)
    got = _drive([op], steps)
    want = _expected(steps, how)
    assert change_bag(got) == change_bag(want)
    assert fold(got) == bag(join_oracle(live[0], live[1], how))
    # rows held at the end went to disk (a null-keyed row never matches: it is not held)
    if limit == 0 and any(r["k"] is not None for rows in live for r in rows):
        assert op.spill_stats()["spills"] > 0
    op.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), how=st.sampled_from(HOWS), limit=st.sampled_from([None, 0]))
def test_snapshots_restore_whole_and_by_key_group(data, how, limit):
    """Halfway, the state is snapshotted: restored whole into one new operator and, split
    by key group, into three; both go on to emit what the original emits."""
    steps, _live = _script(data)
    half = len(steps) // 2
    first = make_op(how, state_memory_limit=limit)
    before = _drive([first], steps[:half])
    whole = make_op(how, state_memory_limit=limit)
    whole.restore(first.snapshot())
    groups = first.iter_key_group_snapshots(8)
    parts = [make_op(how, state_memory_limit=limit) for _ in range(3)]
    states = list(groups)
    for i, op in enumerate(parts):
        op.restore_key_groups([st for g, st in states if g % 3 == i])
    rest = _drive([first], steps[half:])
    assert change_bag(_drive([whole], steps[half:])) == change_bag(rest)
    assert change_bag(_drive(parts, steps[half:], 8)) == change_bag(rest)
    assert change_bag(before + rest) == change_bag(_expected(steps, how))
    for op in (first, whole, *parts):
        op.close()


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), how=st.sampled_from(HOWS), limit=st.sampled_from([None, 0]))
def test_event_time_ttl_drops_rows_the_watermark_left_behind(data, how, limit):
    """``state_ttl`` on event time: a row is dropped once its time is more than the TTL
    behind the watermark; rows arriving later for its key do not meet it (Flink's TTL)."""
    steps, _live = _script(data, unique=True, watermarks=True)
    ttl = data.draw(st.integers(1, 4000), label="ttl ms") * 1000
    op = make_op(how, state_ttl=ttl, left_time="lt", right_time="rt",
                 state_memory_limit=limit)
    got = _drive([op], steps)
    assert change_bag(got) == change_bag(_expected(steps, how, ttl))
    op.close()


def test_processing_time_ttl_drops_rows_that_arrived_long_ago():
    clock = VirtualClock(1_000_000)
    op = make_op("left", state_ttl=10_000_000, clock=clock)
    ref = Reference("left", 10_000_000)
    out, want = [], []

    def feed(side, rows):
        nonlocal out, want
        out += out_changes(op.process(to_batch(side, rows), side))
        for kind, row in rows:
            want += ref.feed(side, kind, row, clock.now(), clock.now())

    feed(0, [(INSERT, {"k": "a", "x": 1, "lt": 0}), (INSERT, {"k": "b", "x": 2, "lt": 0})])
    clock.advance(6_000_000)
    feed(1, [(INSERT, {"k": "a", "y": 1, "rt": 0})])       # meets x=1 (6 s old)
    clock.advance(5_000_000)                               # x rows are 11 s old: gone
    assert list(op.advance_processing_time()) == []        # expiry emits nothing
    assert op.spill_stats()["memory_rows"] <= 1
    feed(1, [(INSERT, {"k": "b", "y": 2, "rt": 0})])       # x=2 is gone: no pair
    feed(0, [(INSERT, {"k": "a", "x": 3, "lt": 0})])       # y=1 (5 s old) is still there
    assert change_bag(out) == change_bag(want)
    pairs = sorted((r["x"], r["y"]) for k, r in out if k == INSERT and r["x"] and r["y"])
    assert pairs == [(1, 1), (3, 1)]
    op.close()


def test_retractions_take_back_one_copy_and_the_pairs_it_made():
    """Worked by hand (full outer): a padded row, its retraction when the first partner
    comes, its return when the last partner goes; a repeated row taken back once."""
    op = make_op("outer")
    a1 = {"k": "a", "x": 1, "lt": 0}
    b1 = {"k": "a", "y": 7, "rt": 0}
    steps = [("b", 0, [(INSERT, a1), (INSERT, a1)]),       # two copies, no partner yet
             ("b", 1, [(INSERT, b1)]),                     # first partner
             ("b", 0, [(DELETE, a1)]),                     # one copy goes
             ("b", 1, [(UPDATE_BEFORE, b1), (UPDATE_AFTER, {**b1, "y": 8})])]
    got = _drive([op], steps)
    pad_a = {"k": "a", "x": 1, "lt": 0, "y": None, "rt": None}
    pad_b = {"k": "a", "x": None, "lt": None, "y": 7, "rt": 0}
    pair = {"k": "a", "x": 1, "lt": 0, "y": 7, "rt": 0}
    assert got[:2] == [(INSERT, pad_a), (INSERT, pad_a)]
    # b1 comes: both padded copies go, two pairs come; a1 goes once: one pair goes
    assert change_bag(got[2:7]) == change_bag([(DELETE, pad_a), (DELETE, pad_a),
                                               (INSERT, pair), (INSERT, pair),
                                               (DELETE, pair)])
    assert change_bag(got) == change_bag(_expected(steps, "outer"))
    assert fold(got) == bag([{**pair, "y": 8}])
    assert (DELETE, pad_b) not in got and (INSERT, pad_b) not in got  # b1 always had a partner
    op.close()


def test_inner_join_of_appends_emits_inserts_without_kinds():
    op = make_op("inner")
    out = list(op.process(to_batch(0, [(INSERT, {"k": "a", "x": 1, "lt": 0})]), 0))
    out += op.process(to_batch(1, [(INSERT, {"k": "a", "y": 2, "rt": 0})]), 1)
    rows = [r for b in out for r in b.to_pylist()]
    assert rows == [{"k": "a", "x": 1, "lt": 0, "y": 2, "rt": 0}]
    op.close()


def test_large_state_in_memory_finds_keys_by_binary_search():
    """Many keys and batches: sealed chunks sorted by key hash, then a retraction of every
    other row; the result is the batch join of what is left."""
    rng = random.Random(3)
    op = make_op("left")
    lefts, rights = [], []
    for i in range(60):
        rows = [{"k": f"k{rng.randrange(3000)}", "x": i * 1000 + j, "lt": i} for j in range(700)]
        lefts += rows
        op.process(to_batch(0, [(INSERT, r) for r in rows]), 0)
    state = op._bufs[0]
    assert len(state.sealed) >= 2 and all(c.sorted for c in state.sealed)
    out = []
    for i in range(0, 3000, 7):
        r = {"k": f"k{i}", "y": i, "rt": 0}
        rights.append(r)
    out += out_changes(op.process(to_batch(1, [(INSERT, r) for r in rights]), 1))
    gone = lefts[::2]
    for i in range(0, len(gone), 5000):
        out += out_changes(op.process(to_batch(0, [(DELETE, r) for r in gone[i:i + 5000]]), 0))
    # every left row went out padded first (no right rows yet): fold the whole changelog
    first = [(INSERT, {**r, "y": None, "rt": None}) for r in lefts]
    assert fold(first + out) == bag(join_oracle(lefts[1::2], rights, "left"))
    op.close()


def test_regular_join_spills_under_a_tiny_limit_and_snapshots_the_spilled_rows(tmp_path):
    rng = random.Random(5)
    ctx = default_context(spill_dir=str(tmp_path))
    limit = 100_000
    op = make_op("outer", state_memory_limit=limit, ctx=ctx)
    ref = Reference("outer")
    got, want = [], []
    live = [[], []]
    for i in range(160):
        side = i % 2
        rows = []
        for j in range(60):
            if live[side] and rng.random() < 0.3:
                rows.append((DELETE, live[side].pop(rng.randrange(len(live[side])))))
            else:
                c, t = ("x", "lt") if side == 0 else ("y", "rt")
                row = {"k": f"k{rng.randrange(50)}", c: i * 1000 + j, t: 0}
                live[side].append(row)
                rows.append((INSERT, row))
        got += out_changes(op.process(to_batch(side, rows), side))
        for kind, row in rows:
            want += ref.feed(side, kind, row, 0, 0)
        assert op.state_memory_bytes() <= limit
    stats = op.spill_stats()
    assert stats["spills"] > 0 and stats["runs"] >= 1
    assert sum(t.nbytes for t in op.snapshot()["sides"]) > 2 * limit
    assert change_bag(got) == change_bag(want)
    copy = make_op("outer")
    copy.restore(op.snapshot())
    probe = [(INSERT, {"k": f"k{i}", "x": -1, "lt": 0}) for i in range(50)]
    assert change_bag(out_changes(copy.process(to_batch(0, probe), 0))) == \
        change_bag(out_changes(op.process(to_batch(0, probe), 0)))
    op.close()
    copy.close()
    assert not any(tmp_path.rglob("*join-state*"))


# ----------------------------------------------------------------------------- jobs


LEFT_ITEMS = [[{"k": random.Random(i).choice("abcd-"), "x": i * 10 + j, "lt": i * 1000}
               for j in range(4)] for i in range(14)]
RIGHT_ITEMS = [[{"k": random.Random(100 + i).choice("abce-"), "y": i * 10 + j, "rt": i * 1000}
                for j in range(3)] for i in range(12)]
for _items in (LEFT_ITEMS, RIGHT_ITEMS):
    for _rows in _items:
        for _r in _rows:
            _r["k"] = None if _r["k"] == "-" else _r["k"]


def _two_streams(f, how: str, lp: int = 2, rp: int = 3, **kw):
    if f is None:
        left = filled_source(LEFT_ITEMS, lp, LSCHEMA)
        right = filled_source(RIGHT_ITEMS, rp, RSCHEMA)
    else:
        left = f.source(LEFT_ITEMS, LSCHEMA, lp, "L")
        right = f.source(RIGHT_ITEMS, RSCHEMA, rp, "R")
    return left.dataset().join(right.dataset(), on="k", how=how, **kw)


def _all(items):
    return [r for rows in items for r in rows]


@pytest.mark.parametrize("how", HOWS)
def test_join_of_two_streams_matches_the_oracle_streaming_and_batch(how, feed):
    f = feed()
    job = f.start(_two_streams(f, how), checkpoint_interval=0, parallelism=3)
    assert job.await_termination(60)
    want = bag(join_oracle(_all(LEFT_ITEMS), _all(RIGHT_ITEMS), how))
    got = changes(job.sink.rows())
    assert fold(got) == want
    if how == "inner":  # appends in, appends out
        assert all(k == INSERT for k, _r in got)
    # batch mode: the same plan on the bounded inputs is the batch join
    assert bag(_two_streams(None, how).collect()) == want


@pytest.mark.parametrize("how", ["inner", "outer"])
def test_join_of_changelog_streams(how, feed):
    """Both inputs carry changes (a visible change column read as kinds): the result
    folds to the join of what the inputs leave."""
    lch = changelog_side(1, 0, 50)
    rch = changelog_side(2, 1, 40)
    f = feed()
    left = f.source(visible_items(lch, 4), LSCHEMA.append(pa.field(VISIBLE, pa.string())),
                    1, "L")
    right = f.source(visible_items(rch, 3), RSCHEMA.append(pa.field(VISIBLE, pa.string())),
                     1, "R")
    ds = left.dataset().from_changelog().join(right.dataset().from_changelog(), on="k",
                                              how=how)
    assert ds._node.emits_updates
    job = f.start(ds, checkpoint_interval=0, parallelism=2)
    assert job.await_termination(60)
    got = changes(job.sink.rows())
    assert fold(got) == bag(join_oracle(live_rows(lch), live_rows(rch), how))
    assert any(k in (UPDATE_BEFORE, DELETE) for k, _r in got)


@pytest.mark.parametrize("before,after,epoch,point", [(2, 3, 4, "after_checkpoint"),
                                                      (3, 1, 6, "during_epoch")])
def test_join_of_two_streams_restores_at_another_parallelism(before, after, epoch, point,
                                                             feed, tmp_path):
    want = bag(join_oracle(_all(LEFT_ITEMS), _all(RIGHT_ITEMS), "outer"))
    chk, sink, f = str(tmp_path / "chk"), CollectingSink(), feed()
    ds = _two_streams(f, "outer")
    first = f.start(ds, checkpoint=chk, sink=sink, checkpoint_interval=0,
                    parallelism=before, _fault=(epoch, point))
    with pytest.raises(SimulatedCrash):
        first.await_termination(60)
    second = f.start(ds, checkpoint=chk, sink=sink, checkpoint_interval=0, parallelism=after)
    assert second.await_termination(60)
    assert second.metrics()["restored_from_epoch"] is not None
    assert fold(changes(sink.rows())) == want


def _one_stream_both_sides(f, ttl: str | None):
    """One source (one partition) whose items hold the rows of one side each: the join
    meets the rows in the feed's order, and both sides share the watermark (delay 0)."""
    rng = random.Random(11)
    items, t = [], 0
    for i in range(24):
        side = rng.choice("LR")
        rows = []
        for j in range(rng.randint(1, 3)):
            t += rng.randint(0, 3) * 1000
            rows.append({"side": side, "k": rng.choice("ab"), "v": i * 10 + j, "ts": t})
        items.append(rows)
    schema = pa.schema([("side", pa.string()), ("k", pa.string()), ("v", pa.int64()),
                        ("ts", pa.int64())])
    base = f.source(items, schema, 1, "S", "ts", 0).dataset().with_watermark("ts", "0s")
    left = base.filter(ms.col("side") == "L").select("k", ms.col("v").alias("x"),
                                                     ms.col("ts").alias("lt"))
    right = base.filter(ms.col("side") == "R").select("k", ms.col("v").alias("y"),
                                                      ms.col("ts").alias("rt"))
    return left.join(right, on="k", how="left", state_ttl=ttl)


def test_event_time_ttl_in_a_job(feed):
    """State TTL of 5 s on event time against the reference over the rows in the order and
    with the watermark each meets (inline: round by round; parallel: a paced feed)."""
    f = feed()
    ds = _one_stream_both_sides(f, "5s")
    job = f.start(ds, checkpoint_interval=0, parallelism=2)
    assert job.await_termination(60)
    ref = Reference("left", 5_000_000)
    want = []
    for _name, row, w in f.arrivals():
        side = 0 if row["side"] == "L" else 1
        r = {"k": row["k"], "x": row["v"], "lt": row["ts"]} if side == 0 else \
            {"k": row["k"], "y": row["v"], "rt": row["ts"]}
        want += ref.feed(side, INSERT, r, row["ts"] * 1000, w)
    got = changes(job.sink.rows())
    assert change_bag(got) == change_bag(want)
    # the TTL made a difference: without it the result would be the batch join
    sides = [[{"k": r["k"], "x": r["v"], "lt": r["ts"]} if s == "L" else
              {"k": r["k"], "y": r["v"], "rt": r["ts"]}
              for _n, r, _w in f.arrivals() if r["side"] == s] for s in "LR"]
    assert fold(got) != bag(join_oracle(sides[0], sides[1], "left"))


def test_processing_time_ttl_in_a_job():
    """The task's clock drives a processing-time TTL: rows that arrived more than the TTL
    ago no longer meet new rows of their key."""
    clock = VirtualClock(1_000_000)
    left = TestSource(schema=LSCHEMA)
    right = TestSource(schema=RSCHEMA)
    ds = left.dataset().join(right.dataset(), on="k", state_ttl="10s")
    job = ds.start(checkpoint_interval=0, clock=clock, executor="inline")
    left.add([{"k": "a", "x": 1, "lt": 0}])
    right.add([{"k": "a", "y": 1, "rt": 0}])
    assert wait_until(lambda: len(job.sink.rows()) == 1)
    clock.advance(11_000_000)
    right.add([{"k": "a", "y": 2, "rt": 0}])                # x=1 expired
    left.add([{"k": "a", "x": 3, "lt": 0}])                 # meets y=2 only
    assert wait_until(lambda: len(job.sink.rows()) == 2)
    left.close()
    right.close()
    assert job.await_termination(30)
    assert sorted((r["x"], r["y"]) for r in job.sink.rows()) == [(1, 1), (3, 2)]


def test_join_apis_and_checks():
    stream = filled_source(LEFT_ITEMS, 1, LSCHEMA, close=False).dataset()
    other = filled_source(RIGHT_ITEMS, 1, RSCHEMA, close=False).dataset()
    table = ms.from_items([{"k": "a", "p": 1}])
    with pytest.raises(PlanError, match="semi join of two streams"):
        stream.join(other, on="k", how="semi").start(checkpoint_interval=0)
    with pytest.raises(PlanError, match="broadcast=True"):
        stream.join(other, on="k", broadcast=True).start(checkpoint_interval=0)
    with pytest.raises(PlanError, match="state_ttl applies to a join of two streams"):
        stream.join(table, on="k", state_ttl="1h").start(checkpoint_interval=0)
    with pytest.raises(PlanError, match="broadcast=False"):
        stream.join(table, on="k", how="outer").start(checkpoint_interval=0)
    with pytest.raises(PlanError, match="state_ttl"):
        stream.join(other, on="k", state_ttl="0s")
    assert "state_ttl=1h" in stream.join(other, on="k", state_ttl="1h")._node.label()


def test_a_bounded_table_joined_as_a_stream_with_broadcast_false(executor):
    """broadcast=False makes a stream-table join a regular one: an outer join's table rows
    without a partner stay in the result, the others are taken back when matched."""
    stream = filled_source(LEFT_ITEMS, 2, LSCHEMA).dataset()
    table = ms.from_items([{"k": "a", "p": 1}, {"k": "z", "p": 2}])
    job = stream.join(table, on="k", how="outer", broadcast=False).start(
        checkpoint_interval=0, parallelism=2, executor=executor)
    assert job.await_termination(60)
    got = fold(changes(job.sink.rows()))
    lefts = _all(LEFT_ITEMS)
    want = []
    for r in lefts:
        want.append({**r, "p": 1 if r["k"] == "a" else None})
    if not any(r["k"] == "a" for r in lefts):
        want.append({"k": "a", "x": None, "lt": None, "p": 1})
    want.append({"k": "z", "x": None, "lt": None, "p": 2})
    assert got == bag(want)


def test_explain_shows_the_regular_join():
    stream = filled_source(LEFT_ITEMS, 1, LSCHEMA, close=False).dataset()
    other = filled_source(RIGHT_ITEMS, 1, RSCHEMA, close=False).dataset()
    text = stream.join(other, on="k", how="left", state_ttl="30m").explain()
    assert "Join left left_on=['k'] right_on=['k'] state_ttl=30m" in text


# ----------------------------------------------------------------------------- with main's model


@pytest.mark.parametrize("how", ["inner", "left"])
def test_join_of_an_updating_aggregate_with_a_stream(how, feed):
    """A non-windowed aggregate (an updating stream: -U/+U per key) joined with a stream:
    what the changelog leaves is the join of the final counts with the other side, the
    batch result of the same plan."""
    f = feed()
    counts = f.source(LEFT_ITEMS, LSCHEMA, 2, "L").dataset().group_by("k").agg(
        ms.count().alias("n"))
    right = f.source(RIGHT_ITEMS, RSCHEMA, 1, "R").dataset()
    ds = counts.join(right, on="k", how=how)
    assert ds._node.emits_updates
    job = f.start(ds, checkpoint_interval=0, parallelism=2)
    assert job.await_termination(60)
    got = changes(job.sink.rows())
    # counts changed after they met y rows: an inner join keeps the input's -U, an outer
    # one takes pairs back with -D (as Flink)
    assert any(k == (UPDATE_BEFORE if how == "inner" else DELETE) for k, _r in got)
    final: dict = {}
    for r in _all(LEFT_ITEMS):
        final[r["k"]] = final.get(r["k"], 0) + 1
    want = []
    for k, n in final.items():
        mates = [r for r in _all(RIGHT_ITEMS) if k is not None and r["k"] == k]
        want += [{"k": k, "n": n, "y": r["y"], "rt": r["rt"]} for r in mates]
        if not mates and how == "left":
            want.append({"k": k, "n": n, "y": None, "rt": None})
    assert fold(got) == bag(want)
    batch_counts = filled_source(LEFT_ITEMS, 2, LSCHEMA).dataset().group_by("k").agg(
        ms.count().alias("n"))
    assert bag(batch_counts.join(filled_source(RIGHT_ITEMS, 1, RSCHEMA).dataset(), on="k",
                                 how=how).collect()) == bag(want)


@pytest.mark.parametrize("how", ["inner", "outer"])
def test_a_residual_condition_on_the_pairs(how, feed):
    """``condition=``: a pair of equal keys that fails it is no pair (an outer row without
    another stays padded), as in the batch join of the same plan."""
    f = feed()
    cond = ms.col("x") % 3 != ms.col("y") % 3
    left = f.source(LEFT_ITEMS, LSCHEMA, 2, "L").dataset()
    right = f.source(RIGHT_ITEMS, RSCHEMA, 1, "R").dataset()
    ds = left.join(right, on="k", how=how, condition=cond)
    job = f.start(ds, checkpoint_interval=0, parallelism=2)
    assert job.await_termination(60)
    lefts, rights = _all(LEFT_ITEMS), _all(RIGHT_ITEMS)
    want, lm, rm = [], set(), set()
    for i, a in enumerate(lefts):
        for j, b in enumerate(rights):
            if a["k"] is not None and a["k"] == b["k"] and a["x"] % 3 != b["y"] % 3:
                want.append({**a, "y": b["y"], "rt": b["rt"]})
                lm.add(i)
                rm.add(j)
    if how == "outer":
        want += [{**a, "y": None, "rt": None} for i, a in enumerate(lefts) if i not in lm]
        want += [{"k": b["k"], "x": None, "lt": None, **b} for j, b in enumerate(rights)
                 if j not in rm]
    assert fold(changes(job.sink.rows())) == bag(want)
    batch = filled_source(LEFT_ITEMS, 2, LSCHEMA).dataset().join(
        filled_source(RIGHT_ITEMS, 1, RSCHEMA).dataset(), on="k", how=how, condition=cond)
    assert bag(batch.collect()) == bag(want)


def test_sinks_and_steps_that_cannot_take_its_updates_are_refused_at_plan_time(tmp_path):
    """An outer regular join (or one of an updating input) emits updates: an append-only
    sink, a window or a Python function after it is a PlanError naming the join, before
    the job runs; an inner join of appends is append-only."""
    def streams():
        return (filled_source(LEFT_ITEMS, 1, LSCHEMA, close=False).dataset(),
                filled_source(RIGHT_ITEMS, 1, RSCHEMA, close=False).dataset())

    left, right = streams()
    outer = left.join(right, on="k", how="left")
    with pytest.raises(PlanError, match=r"takes appends only.*Join left"):
        outer.start(sink=ms.file_sink(str(tmp_path / "out")), checkpoint_interval=0)
    with pytest.raises(PlanError, match=r"Map\(.*cannot take the updates.*Join left"):
        outer.map(lambda r: r).start(checkpoint_interval=0)
    with pytest.raises(PlanError, match=r"Window .*cannot take the updates.*Join left"):
        (outer.with_watermark("lt", "0s").window(ms.tumbling("1m"), on="lt")
         .agg(ms.count())).start(checkpoint_interval=0)
    with pytest.raises(PlanError, match="no key the plan can tell"):
        outer.start(sink=UpsertTable(["k"]), checkpoint_interval=0)
    updating = left.group_by("k").agg(ms.count().alias("n"))
    with pytest.raises(PlanError, match=r"takes appends only.*Aggregate"):
        updating.join(right, on="k").start(sink=ms.file_sink(str(tmp_path / "o2")),
                                           checkpoint_interval=0)
    # a stream-table join still refuses updates (it does not take a retraction back)
    table = ms.from_items([{"k": "a", "p": 1}])
    with pytest.raises(PlanError, match=r"Join inner.*cannot take the updates"):
        updating.join(table, on="k").start(checkpoint_interval=0)
    inner = left.join(right, on="k")
    assert not inner._node.emits_updates
    assert outer._node.emits_updates and outer.to_changelog()._node.emits_updates is False


def _counts(items: list, name: str, partitions: int = 2) -> ms.Dataset:
    schema = LSCHEMA if items is LEFT_ITEMS else RSCHEMA
    return filled_source(items, partitions, schema).dataset().group_by("k").agg(
        ms.count().alias(name))


def _final_counts(items: list) -> dict:
    final: dict = {}
    for r in _all(items):
        final[r["k"]] = final.get(r["k"], 0) + 1
    return final


@pytest.mark.parametrize("how", ["inner", "left", "right", "outer"])
def test_a_join_of_two_aggregates_on_their_keys_writes_to_an_upsert_sink(how):
    """Each side keyed by the join key: the result is keyed by it too (Flink's derived
    unique key), so an upsert sink keyed by ``k`` takes it and ends with the joined final
    counts; a null key is a key of its own on an outer side. A full join of two sides
    with null keys has two rows of key null (null keys never match): refused."""
    ds = _counts(LEFT_ITEMS, "n").join(_counts(RIGHT_ITEMS, "m", 3), on="k", how=how)
    sink = UpsertTable(["k"])
    if how == "outer":
        with pytest.raises(PlanError, match="no key the plan can tell"):
            ds.start(sink=sink, checkpoint_interval=0)
        return
    job = ds.start(sink=sink, checkpoint_interval=0, parallelism=2)
    assert job.await_termination(60)
    lefts, rights = _final_counts(LEFT_ITEMS), _final_counts(RIGHT_ITEMS)
    want = {}
    for k, n in lefts.items():
        if k is not None and k in rights:
            want[k] = {"k": k, "n": n, "m": rights[k]}
        elif how in ("left", "outer"):
            want[k] = {"k": k, "n": n, "m": None}
    if how in ("right", "outer"):
        for k, m in rights.items():
            if k is None or k not in lefts:
                want[k] = {"k": k, "n": None, "m": m}
    # null keys never match: an outer side's null-keyed row is its own key
    got = {key[0]: row for key, row in sink.table.items()}
    assert bag(got.values()) == bag(want.values())


def test_which_join_results_have_a_key_an_upsert_sink_can_use():
    """The derived key: a side's key held through a join when each of its rows meets at
    most one row of the other side; both keys together otherwise; nothing without them
    or where a row's changes could come from two join tasks."""
    from millstream.plan.updates import upsert_key

    def streams():
        return (filled_source(LEFT_ITEMS, 1, LSCHEMA, close=False).dataset(),
                filled_source(RIGHT_ITEMS, 1, RSCHEMA, close=False).dataset())

    left, right = streams()
    by_k = left.group_by("k").agg(ms.count().alias("n"))
    by_ky = right.group_by("k", "y").agg(ms.count().alias("m"))
    by_y = right.group_by("y").agg(ms.max("k").alias("k"))
    cases = {
        ("inner", "k", by_k, by_ky): ("k", "y"),       # both keys
        ("left", "k", by_ky, by_k): ("k", "y"),        # the left's: one right row per k
        ("left", "k", by_k, by_ky): None,              # a k meets several (k, y) rows
        ("right", "k", by_ky, by_k): None,
        ("right", "k", by_k, by_ky): ("k", "y"),
        ("outer", "k", by_k, by_ky): None,
        ("semi", "k", by_k, right): ("k",),
        ("inner", "k", by_k, right): None,             # appends have no key
        ("inner", "k", by_y, by_k): ("y", "k"),        # with k: one task per key
        ("left", "k", by_y, by_k): None,               # y's row moves when its k changes
    }
    for (how, on, a, b), want in cases.items():
        node = a.join(b, on=on, how=how)._node
        assert upsert_key(node) == want, (how, a.columns, b.columns)
    # a right column that clashes with a left one carries the suffix
    clash = by_k.join(by_k.select("k", m="n"), on="k").select("k", "n")
    assert upsert_key(clash._node) == ("k",)
    assert upsert_key(left.join(right, on="k", how="outer")._node) is None
