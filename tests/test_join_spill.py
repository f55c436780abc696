"""Stream joins whose buffered state spills to disk: the same rows (and window order) with
a tiny limit, a zero limit and no limit, against the plain-Python oracles; snapshots and
key-group restores that include spilled rows; spill files deleted by ``close()``; state far
larger than the limit with memory kept near it; jobs on both executors."""

from __future__ import annotations

import os

import join_cases as jc
import numpy as np
import pyarrow as pa
import pytest
from oracles import arrivals, assert_same_as_duckdb, schedule_steps, sorted_rows

import millstream as ms
from millstream.core.context import default_context
from millstream.core.keygroups import key_hashes
from millstream.errors import PlanError
from millstream.expr.windows import Sliding, Tumbling
from millstream.ops.stream_join import IntervalJoin, JoinKeys, LatestJoin, WindowJoin
from millstream.runtime.checkpoint import BlobStore, externalize
from millstream.testing import CollectingSink, SimulatedCrash

#: no limit, a limit below one batch (every batch spills), a limit of a few batches
LIMITS = [None, 0, 1500]
CSCHEMA = jc.CSCHEMA
BIG_LEFT = jc.side(7, "lt", "x", n_items=40, per_item=12, keys="abcdefghij")
BIG_RIGHT = jc.side(8, "rt", "y", n_items=40, per_item=12, keys="abcdefghij")


# ----------------------------------------------------------------------------- drivers


def _batch(rows: list[dict], schema: pa.Schema, keys: list[str]) -> pa.RecordBatch:
    return next(iter(JoinKeys(keys).process(pa.RecordBatch.from_pylist(rows, schema=schema))))


def _parts(left_items, right_items, delay_ms: int, lp: int = 2, rp: int = 2):
    """The two inputs dealt round-robin to partitions, as ``oracles.arrivals`` takes them."""
    return [("L", "lt", delay_ms, [(it, None) for it in left_items[p::lp]]) for p in range(lp)] + \
        [("R", "rt", delay_ms, [(it, None) for it in right_items[p::rp]]) for p in range(rp)]


def _arrivals(left_items, right_items, delay_ms: int, lp: int = 2, rp: int = 2):
    return arrivals(_parts(left_items, right_items, delay_ms, lp, rp), "rounds")


def _drive(op, left_items, right_items, delay_ms: int, lp: int = 2, rp: int = 2,
           stop_round: int | None = None):
    """Feed the operator as a job's inline rounds go (``oracles.schedule_steps``: items
    dealt to partitions; after each round the watermark moves to the minimum over the
    partitions); returns the output batches and the last watermark. ``stop_round``: stop
    before it."""
    parts = _parts(left_items, right_items, delay_ms, lp, rp)
    inputs = {"L": (0, jc.LSCHEMA), "R": (1, jc.RSCHEMA)}
    out, w = [], -(2**63)
    for step in schedule_steps(parts, "rounds"):
        if stop_round is not None and step[-1] >= stop_round:
            break
        if step[0] == "wm":
            w = step[1]
            out += op.on_watermark(w)
        else:
            port, schema = inputs[parts[step[1]][0]]
            out += op.process(_batch(step[2], schema, ["k"]), port)
    return out, w


def _rows(batches) -> list[dict]:
    """The rows of output batches (columns an early batch lacked are None, as in a sink)."""
    tables = [pa.Table.from_batches([b]) for b in batches if b.num_rows]
    if not tables:
        return []
    return pa.concat_tables(tables, promote_options="permissive").to_pylist()


def _late(op) -> list[dict]:
    cols = {"left": jc.LSCHEMA.names, "right": jc.RSCHEMA.names}
    return sorted_rows({c: r[c] for c in cols[r["join_side"]]}
                       for b in op.take_side_output("late") for r in b.to_pylist())


def _interval_op(how: str, limit: int | None, ctx=None) -> IntervalJoin:
    op = IntervalJoin(["k"], ["k"], -4_000_000, 6_000_000, "lt", "rt", how=how,
                      state_memory_limit=limit)
    op.open(ctx or default_context())
    return op


def _window_op(window, how: str, limit: int | None, ctx=None) -> WindowJoin:
    op = WindowJoin(["k"], ["k"], window, "lt", "rt", how=how, state_memory_limit=limit)
    op.open(ctx or default_context())
    return op


def _latest_op(how: str, version, deleted, limit: int | None) -> LatestJoin:
    op = LatestJoin(["cur"], ["cur"], how=how, version=version, deleted=deleted,
                    state_memory_limit=limit)
    op.open(default_context())
    return op


def _feed_changelog(op: LatestJoin, items) -> list[pa.RecordBatch]:
    out = []
    for rows in items:
        kind = rows[0]["kind"]
        if kind == "R":
            cols = ["cur", "rate", "ver", "gone"]
            schema = pa.schema([CSCHEMA.field(c) for c in cols])
            out += op.process(_batch([{c: r[c] for c in cols} for r in rows], schema, ["cur"]), 1)
        else:
            cols = ["cur", "amount", "ts"]
            schema = pa.schema([CSCHEMA.field(c) for c in cols])
            out += op.process(_batch([{c: r[c] for c in cols} for r in rows], schema, ["cur"]), 0)
    return out


def _changelog(seed: int, n_items: int, n_keys: int):
    """Items of all orders ("O") or all rate updates ("R") over ``n_keys`` currencies."""
    return jc.changelog_items(seed, n_items, n_keys, per_item=(1, 12), rates=0.5)


def _snapshot_rows(table: pa.Table | None) -> list[tuple]:
    """A snapshot table's rows (hidden and bookkeeping columns included), sorted."""
    if table is None:
        return []
    return sorted(tuple(sorted((k, repr(v)) for k, v in r.items())) for r in table.to_pylist())


# ----------------------------------------------------------------------------- interval


@pytest.mark.parametrize("limit", LIMITS)
@pytest.mark.parametrize("how", ["inner", "left", "right", "outer"])
def test_interval_join_spilled_matches_the_oracle(how, limit, tmp_path):
    for left, right in ((jc.LEFT, jc.RIGHT), (BIG_LEFT, BIG_RIGHT)):
        op = _interval_op(how, limit, default_context(spill_dir=str(tmp_path)))
        out, _w = _drive(op, left, right, 5000)
        out += op.finish()
        expected, late = jc.interval_oracle(_arrivals(left, right, 5000), -4000, 6000, how)
        assert sorted_rows(_rows(out)) == sorted_rows(expected)
        assert _late(op) == sorted_rows(late)
        stats = op.spill_stats()
        assert (stats["spills"] > 0) == (limit is not None)
        assert stats["runs"] == 0  # finish() dropped every run
        op.close()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("limit", [0, 1500])
def test_interval_join_batch_mode_with_spilled_state(limit):
    """No watermark (batch mode): every row is buffered until finish(), then outer rows."""
    op = _interval_op("outer", limit)
    out = []
    for items, port, schema in ((BIG_LEFT, 0, jc.LSCHEMA), (BIG_RIGHT, 1, jc.RSCHEMA)):
        for rows in items:
            out += op.process(_batch(rows, schema, ["k"]), port)
    out += op.finish()
    assert sorted_rows(_rows(out)) == sorted_rows(
        jc.interval_oracle(jc.everything(BIG_LEFT, BIG_RIGHT), -4000, 6000, "outer")[0])
    assert op.spill_stats()["spills"] > 0


# ----------------------------------------------------------------------------- window


@pytest.mark.parametrize("limit", LIMITS)
@pytest.mark.parametrize("window,size,every", [(Tumbling(10_000_000), 10_000, None),
                                               (Sliding(10_000_000, 5_000_000), 10_000, 5000)])
@pytest.mark.parametrize("how", ["inner", "left", "outer"])
def test_window_join_spilled_matches_the_oracle_in_the_same_order(window, size, every, how,
                                                                   limit):
    results = {}
    for lim in (None, limit):
        op = _window_op(window, how, lim)
        out, _w = _drive(op, BIG_LEFT, BIG_RIGHT, 4000)
        out += op.finish()
        results[lim] = (_rows(out), _late(op), op.spill_stats())
        op.close()
    rows, late, stats = results[limit]
    expected, expected_late = jc.window_oracle(_arrivals(BIG_LEFT, BIG_RIGHT, 4000), size,
                                               every, how)
    assert sorted_rows(rows) == sorted_rows(expected)
    assert late == sorted_rows(expected_late)
    assert (stats["spills"] > 0) == (limit is not None)
    # the order the operator defines: by window end, then start
    bounds = [(r["window_end"], r["window_start"]) for r in rows]
    assert bounds == [(r["window_end"], r["window_start"]) for r in results[None][0]]


def test_window_larger_than_the_work_budget_fires_by_hash_range(monkeypatch):
    """One day-long window holds everything; with a tiny work budget it is joined in
    several hash ranges, with the same rows as in memory."""
    calls = []
    gather = WindowJoin._gather

    def spy(picks, unit):
        calls.append(unit)
        return gather(picks, unit)

    monkeypatch.setattr(WindowJoin, "_gather", staticmethod(spy))
    out = {}
    for limit in (None, 2000):
        op = _window_op(Tumbling(86_400_000_000), "outer", limit)
        op.spill_work_min_bytes = 0
        rows, _w = _drive(op, BIG_LEFT, BIG_RIGHT, 10**9)
        rows += op.finish()
        out[limit] = _rows(rows)
        op.close()
    assert sorted_rows(out[2000]) == sorted_rows(out[None]) and out[None]
    assert len({u[2] for u in calls}) > 2  # several hash ranges of one window


# ----------------------------------------------------------------------------- latest


@pytest.mark.parametrize("limit", LIMITS)
@pytest.mark.parametrize("how,version,deleted", [("inner", None, None), ("left", None, "gone"),
                                                 ("left", "ver", "gone"), ("inner", "ver", None)])
def test_join_latest_spilled_matches_the_oracle(how, version, deleted, limit):
    for items in (_changelog(3, 150, 40), _changelog(4, 150, 400)):
        op = _latest_op(how, version, deleted, limit)
        out = _feed_changelog(op, items)
        expected = jc.latest_oracle(items, how, version, deleted, batch=False)
        assert sorted_rows(_rows(out)) == sorted_rows(expected)
        stats = op.spill_stats()
        assert (stats["spills"] > 0) == (limit is not None)
        if limit == 0:  # merging keeps the runs few
            assert 0 < stats["runs"] <= int(np.log2(stats["spills"])) + 1
        op.close()


def test_a_deleted_key_hides_its_spilled_row():
    """Without versions a delete forgets a key; while older rows are on disk, the delete
    stays as a tombstone (in memory, then in a newer run) that hides them."""
    op = _latest_op("left", None, "gone", 0)
    rate = pa.schema([CSCHEMA.field(c) for c in ("cur", "rate", "ver", "gone")])
    order = pa.schema([CSCHEMA.field(c) for c in ("cur", "amount", "ts")])

    def upsert(rows):
        op.process(_batch([{"ver": 0, "gone": False, **r} for r in rows], rate, ["cur"]), 1)

    def rates(curs):
        rows = [{"cur": c, "amount": i, "ts": 0} for i, c in enumerate(curs)]
        return {r["cur"]: r["rate"] for r in _rows(op.process(_batch(rows, order, ["cur"]), 0))}

    upsert([{"cur": f"c{i}", "rate": i} for i in range(10)])
    assert op.spill_stats()["spilled_rows"] == 10
    op.state_memory_limit = 1 << 20
    upsert([{"cur": "c3", "rate": None, "gone": True}])  # a tombstone in memory
    assert rates(["c3", "c4"]) == {"c3": None, "c4": 4}
    op.state_memory_limit = 0
    upsert([{"cur": "c5", "rate": 55}])  # tombstone and c5 go to a second run
    assert op.spill_stats()["runs"] == 2
    assert rates(["c3", "c4", "c5"]) == {"c3": None, "c4": 4, "c5": 55}
    assert sorted_rows(op.snapshot()["sides"][1].select(["cur", "rate"]).to_pylist()) == \
        sorted_rows([{"cur": f"c{i}", "rate": 55 if i == 5 else i} for i in range(10) if i != 3])
    op.close()


# ----------------------------------------------------------------------------- snapshots


def _interval_factory(limit):
    return _interval_op("outer", limit)


def _window_factory(limit):
    return _window_op(Sliding(10_000_000, 5_000_000), "outer", limit)


@pytest.mark.parametrize("factory", [_interval_factory, _window_factory])
def test_snapshots_include_spilled_rows_and_restore_at_another_parallelism(factory, tmp_path):
    half = 12
    plain, spilled = factory(None), factory(0)
    first = [_drive(op, BIG_LEFT, BIG_RIGHT, 5000, stop_round=half)[0] for op in (plain, spilled)]
    assert sorted_rows(_rows(first[0])) == sorted_rows(_rows(first[1]))
    assert spilled.spill_stats()["runs"] > 0 and spilled.spill_stats()["memory_rows"] == 0
    # the same state, with the bookkeeping columns (matched flags, window bounds, hashes)
    for port in (0, 1):
        assert _snapshot_rows(spilled.snapshot()["sides"][port]) == \
            _snapshot_rows(plain.snapshot()["sides"][port])
    groups = spilled.snapshot_by_key_group(8)
    for g, st in groups.items():
        for side in st["sides"]:
            if side is not None:
                h = np.asarray(side.column("__ms_h"))
                assert ((h % np.uint64(8)) == g).all()
    # the rest of the stream: uninterrupted, restored whole, restored in three parts
    rest_items = ([it for i, it in enumerate(BIG_LEFT) if i // 2 >= half],
                  [it for i, it in enumerate(BIG_RIGHT) if i // 2 >= half])
    # as a parallel task checkpoints: one group at a time, each written out as blobs
    store = BlobStore(str(tmp_path / "chk"))
    refs = {}
    for g, st in spilled.iter_key_group_snapshots(8):
        refs[g] = externalize(st, set(), set())
        store.put(refs[g])
    assert list(refs) == sorted(groups)
    for g, st in groups.items():  # the same as the whole snapshot, group by group
        mine = store.resolve(refs[g])
        assert {k: v for k, v in mine.items() if k != "sides"} == \
            {k: v for k, v in st.items() if k != "sides"}
        for a, b in zip(mine["sides"], st["sides"]):
            assert (a is None and b is None) or a.equals(b)
    copy = factory(0)
    copy.restore(spilled.snapshot())
    parts = [factory(0) for _ in range(3)]
    for i, op in enumerate(parts):  # two parts read their groups' blobs a group at a time
        mine = [refs[g] if i else groups[g] for g in groups if g % 3 == i]
        op.restore_key_groups(mine, load=store.resolve if i else None)
    assert all(op.spill_stats()["runs"] > 0 for op in parts)
    results = []
    for op in (plain, copy):
        out = []
        for items, port, schema in ((rest_items[0], 0, jc.LSCHEMA), (rest_items[1], 1, jc.RSCHEMA)):
            for rows in items:
                out += op.process(_batch(rows, schema, ["k"]), port)
        out += op.on_watermark(plain.watermark + 20_000_000)
        results.append(sorted_rows(_rows(out + list(op.finish()))))
    split = []
    for items, port, schema in ((rest_items[0], 0, jc.LSCHEMA), (rest_items[1], 1, jc.RSCHEMA)):
        for rows in items:
            b = _batch(rows, schema, ["k"])
            g = key_hashes([b.column("__ms_jk0")], b.num_rows) % 8
            for i, op in enumerate(parts):
                split += op.process(b.filter(pa.array((g % 3) == i)), port)
    for op in parts:
        split += op.on_watermark(plain.watermark + 20_000_000)
        split += op.finish()
    assert results[0] == results[1] == sorted_rows(_rows(split))
    assert results[0]
    for op in (plain, spilled, copy, *parts):
        op.close()


@pytest.mark.parametrize("version", ["ver", None])
def test_join_latest_snapshot_resolves_spilled_versions_and_restores_by_key_group(version):
    """A snapshot holds the last row per key (no tombstones without versions), as without
    spilling; restored in two parts by key group, each part joins its keys as before."""
    items = _changelog(9, 200, 60)
    half = len(items) // 2
    plain = _latest_op("left", version, "gone", None)
    spilled = _latest_op("left", version, "gone", 0)
    for op in (plain, spilled):
        _feed_changelog(op, items[:half])
    assert spilled.spill_stats()["runs"] > 0
    assert _snapshot_rows(spilled.snapshot()["sides"][1]) == \
        _snapshot_rows(plain.snapshot()["sides"][1])
    groups = spilled.snapshot_by_key_group(4)
    parts = [_latest_op("left", version, "gone", 0) for _ in range(2)]
    for i, op in enumerate(parts):
        op.restore_key_groups([st for g, st in groups.items() if g % 2 == i])
    # every part sees every order, and joins those of its own key groups
    want = sorted_rows(_rows(_feed_changelog(plain, items[half:])))
    got = []
    for i, op in enumerate(parts):
        for row in _rows(_feed_changelog(op, items[half:])):
            if row["cur"] is not None and key_hashes([pa.array([row["cur"]])], 1)[0] % 4 % 2 == i:
                got.append(row)
    assert sorted_rows(got) == [r for r in want if r["cur"] is not None]
    for op in (plain, spilled, *parts):
        op.close()


# ----------------------------------------------------------------------------- files, memory


def test_close_deletes_the_spill_files(tmp_path):
    ctx = default_context(spill_dir=str(tmp_path))
    ops = [_interval_op("outer", 0, ctx), _window_op(Tumbling(10_000_000), "inner", 0, ctx)]
    for op in ops:
        _drive(op, BIG_LEFT, BIG_RIGHT, 10**6, stop_round=10)
    latest = LatestJoin(["cur"], ["cur"], version="ver", state_memory_limit=0)
    latest.open(ctx)
    _feed_changelog(latest, _changelog(5, 60, 50))
    assert len(os.listdir(tmp_path)) >= 3
    for op in (*ops, latest):
        assert op.spill_stats()["disk_bytes"] > 0
        op.close()
        assert op.spill_stats()["runs"] == 0
    assert os.listdir(tmp_path) == []


def test_state_limit_is_checked():
    with pytest.raises(PlanError, match="state_memory_limit"):
        IntervalJoin(["k"], ["k"], 0, 1, "lt", "rt", state_memory_limit=-1)


def _bulk(n: int, seed: int, tcol: str, idcol: str, n_keys: int, batch: int):
    rng = np.random.default_rng(seed)
    i = np.arange(n)
    t = i - rng.integers(0, 2000, n)  # epoch ms, up to 2 s out of order
    table = pa.table({"k": rng.integers(0, n_keys, n), tcol: t, idcol: i,
                      "pad": pa.array([f"{v:024d}" for v in i])})
    keys = JoinKeys(["k"])
    return table, [next(iter(keys.process(b))) for b in table.to_batches(max_chunksize=batch)]


def _same_pairs(out: list[pa.RecordBatch], sql: str, **tables: pa.Table) -> int:
    """Check that the (x, y) pairs of ``out`` are those of the DuckDB query over ``tables``
    (with multiplicity); their number."""
    got = pa.Table.from_batches(out).select(["x", "y"])
    return assert_same_as_duckdb(got, sql, exact=True, **tables)


def test_interval_join_state_far_larger_than_the_limit():
    """About 9 MB of rows buffered (a two-minute interval over 120 000 rows a side) under a
    256 KB limit: results equal DuckDB's, memory stays near the limit."""
    n, bs, limit = 120_000, 2000, 256 << 10
    lt, left = _bulk(n, 1, "lt", "x", 20_000, bs)
    rt, right = _bulk(n, 2, "rt", "y", 20_000, bs)
    op = IntervalJoin(["k"], ["k"], -60_000_000, 60_000_000, "lt", "rt",
                      state_memory_limit=limit)
    op.open(default_context())
    out, held = [], 0
    batch_bytes = max(b.nbytes for b in left + right)
    for i, (lb, rb) in enumerate(zip(left, right)):
        out += op.process(lb, 0)
        out += op.process(rb, 1)
        out += op.on_watermark(((i + 1) * bs - 2000) * 1000)
        assert op.state_memory_bytes() <= limit
        if i == 40:
            held = sum(t.nbytes for t in op.snapshot()["sides"])
            assert op.spill_stats()["runs"] <= 12
    out += op.finish()
    op.close()
    assert held > 20 * limit
    # between spills it holds up to the limit plus the batch it is adding
    assert limit // 2 < op.peak_state_memory_bytes <= limit + 2 * batch_bytes
    assert _same_pairs(out, "SELECT x, y FROM lt JOIN rt ON lt.k = rt.k AND rt.rt BETWEEN "
                            "lt.lt - 60000 AND lt.lt + 60000", lt=lt, rt=rt) > 100_000


def test_window_join_state_far_larger_than_the_limit():
    """Minute windows of 60 000 rows a side (about 10 MB) under a 256 KB limit: a window
    fires from disk in hash ranges of the work budget; results equal DuckDB's."""
    n, bs, limit = 120_000, 2000, 256 << 10
    lt, left = _bulk(n, 3, "lt", "x", 20_000, bs)
    rt, right = _bulk(n, 4, "rt", "y", 20_000, bs)
    op = WindowJoin(["k"], ["k"], Tumbling(60_000_000), "lt", "rt", state_memory_limit=limit)
    op.open(default_context())
    out, held = [], 0
    for i, (lb, rb) in enumerate(zip(left, right)):
        out += op.process(lb, 0)
        out += op.process(rb, 1)
        out += op.on_watermark(((i + 1) * bs - 2000) * 1000)
        assert op.state_memory_bytes() <= limit
        held = max(held, op.spill_stats()["spilled_rows"])
    out += op.finish()
    op.close()
    assert held > 80_000
    assert _same_pairs(out, "SELECT x, y FROM lt JOIN rt ON lt.k = rt.k AND "
                            "floor(lt.lt / 60000) = floor(rt.rt / 60000)", lt=lt, rt=rt) > 10_000


def test_join_latest_state_far_larger_than_the_limit():
    """80 000 keys (about 7 MB of rows), each updated three times, under a 256 KB limit:
    merged runs stay few, every key meets its last row."""
    limit, n_keys = 256 << 10, 80_000
    op = LatestJoin(["k"], ["k"], how="left", state_memory_limit=limit)
    op.open(default_context())
    keys = JoinKeys(["k"])
    for rnd in range(3):
        for s in range(0, n_keys, 2000):
            k = np.arange(s, s + 2000)
            b = pa.record_batch({"k": k, "v": k * 10 + rnd,
                                 "pad": pa.array([f"{x:040d}" for x in k])})
            op.process(next(iter(keys.process(b))), 1)
            assert op.state_memory_bytes() <= limit
    stats = op.spill_stats()
    assert stats["spilled_rows"] >= n_keys * 0.9 and stats["runs"] <= 10
    probe = pa.record_batch({"k": np.arange(0, n_keys + 10, 7)})
    rows = _rows(op.process(next(iter(keys.process(probe))), 0))
    assert sum(t.nbytes for t in op.snapshot()["sides"] if t is not None) > 20 * limit
    op.close()
    assert sorted((r["k"], r["v"]) for r in rows) == \
        [(k, k * 10 + 2 if k < n_keys else None) for k in range(0, n_keys + 10, 7)]


# ----------------------------------------------------------------------------- jobs


def test_jobs_with_a_tiny_memory_limit_match_the_oracles(feed):
    """memory_limit="1KB" per task (a join keeps 512 bytes in memory): the stream joins of
    test_stream_joins give the oracles' rows, and their state went to disk."""
    def spills(job) -> int:
        return job.metrics()["counters"].get("millstream.state_spills", 0)

    f = feed()
    job = f.start(jc.interval(f, "outer"), checkpoint_interval=0, parallelism=2,
                  memory_limit="1KB")
    assert job.await_termination(60)
    expected, late = jc.interval_oracle(f.arrivals(), -4000, 6000, "outer")
    assert sorted_rows(job.sink.rows()) == sorted_rows(expected)
    assert jc.late_rows(job) == sorted_rows(late)
    assert spills(job)
    f = feed()
    job = f.start(jc.window_join(f, ms.sliding("10s", every="5s"), "outer"),
                  checkpoint_interval=0, parallelism=2, memory_limit="1KB")
    assert job.await_termination(60)
    expected, late = jc.window_oracle(f.arrivals(), 10_000, 5000, "outer")
    assert sorted_rows(job.sink.rows()) == sorted_rows(expected)
    assert jc.late_rows(job) == sorted_rows(late)
    assert spills(job)
    items = _changelog(3, 100, 40)
    f = feed()
    job = f.start(jc.latest_ds(f.source(items, CSCHEMA), "left", "ver", "gone"),
                  checkpoint_interval=0, parallelism=2, memory_limit="1KB")
    assert job.await_termination(60)
    assert sorted_rows(job.sink.rows()) == sorted_rows(
        jc.latest_oracle(items, "left", "ver", "gone", batch=False))
    assert spills(job)


def test_job_with_a_tiny_memory_limit_equals_batch(executor):
    """A 4 KB budget per task: an outer interval join of in-order streams (nothing late)
    gives the batch result and the plain-Python one."""
    def side(col: str, ident: str):
        return ms.from_generator(lambda i: {"k": i % 37, col: i * 10, ident: i}, count=3000,
                                 partitions=2).with_watermark(col, "1m")

    ds = side("lt", "x").interval_join(side("rt", "y"), on="k", between=("-1s", "500ms"),
                                       how="outer")
    job = ds.start(executor=executor, checkpoint_interval=0, parallelism=2,
                   memory_limit="4KB")
    assert job.await_termination(120)
    got = sorted((r["x"], r["y"]) for r in job.sink.rows())
    want = [(x, y) for x in range(3000) for y in range(3000)
            if x % 37 == y % 37 and -100 <= y - x <= 50]
    assert got == sorted((x, y) for x, y in want)  # every row has a partner
    assert got == sorted((r["x"], r["y"]) for r in ds.collect())


def test_job_with_spilled_join_state_restores_at_another_parallelism(feed, tmp_path):
    f = feed()
    plain = f.start(jc.interval(f, "left"), checkpoint_interval=0, parallelism=2)
    assert plain.await_termination(60)
    expected = sorted_rows(plain.sink.rows())
    chk, sink, f = str(tmp_path / "chk"), CollectingSink(), feed()
    ds = jc.interval(f, "left")
    first = f.start(ds, checkpoint=chk, sink=sink, checkpoint_interval=0, parallelism=2,
                    memory_limit="1KB", _fault=(6, "after_checkpoint"))
    with pytest.raises(SimulatedCrash):
        first.await_termination(60)
    second = f.start(ds, checkpoint=chk, sink=sink, checkpoint_interval=0, parallelism=3,
                     memory_limit="1KB")
    assert second.await_termination(60)
    assert second.metrics()["restored_from_epoch"] is not None
    assert sorted_rows(sink.rows()) == expected
