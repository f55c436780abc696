"""Continuous queries with updates, end to end: non-windowed aggregates, deduplication and
top-N per group on streams (both executors), against plain-Python oracles and the same
plans in batch mode; kill-and-restore in the middle (fault points, a SIGKILLed task
slot), restore at another parallelism; the planner's checks of steps and sinks; sinks
that take the changes."""

from __future__ import annotations

import os
import random
import signal
from collections import defaultdict
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from faults import HeldRows
from streams import UpsertTable

import millstream as ms
from millstream.core import changelog as C
from millstream.errors import PlanError, SimulatedCrash
from millstream.runtime.checkpoint import CheckpointStore
from millstream.testing import CollectingSink, TestSource, crash_and_restore

SCHEMA = pa.schema([("k", pa.string()), ("g", pa.int64()), ("v", pa.int64()),
                    ("ts", pa.int64())])


def _canon(rows: Any) -> list[str]:
    return sorted(repr(sorted(r.items())) for r in rows)


def _events(seed: int, n_items: int = 20, per_item: int = 15, keys: int = 12) -> list[list[dict]]:
    rng = random.Random(seed)
    items, t = [], 0
    for _ in range(n_items):
        rows = []
        for _ in range(per_item):
            t += rng.randint(0, 2000)
            k = rng.randrange(keys)
            rows.append({"k": f"k{k}", "g": k % 3, "v": rng.choice([None, *range(50)]),
                         "ts": t})
        items.append(rows)
    return items


def _source(items: list[list[dict]], partitions: int = 2, schema: pa.Schema = SCHEMA
            ) -> TestSource:
    src = TestSource(schema=schema, partitions=partitions)
    for i, rows in enumerate(items):
        src.add(rows, partition=i % partitions)
    src.close()
    return src


def _valid(sink: CollectingSink, keys: list[str]) -> list[dict]:
    """The final rows, after checking that the changes are consistent: every retraction
    takes back a row that is there and a key holds at most one row."""
    keyed = sink.final_rows(keys)
    assert _canon(sink.final_rows()) == _canon(keyed), "a retraction took back a row not held"
    held = [tuple(r[k] for k in keys) for r in keyed]
    assert len(held) == len(set(held))
    return keyed


# ----------------------------------------------------------------------------- oracles


def _per_key(items: list[list[dict]]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    rows: dict[str, list[dict]] = defaultdict(list)
    for item in items:
        for r in item:
            rows[r["k"]].append(r)
    for k, rs in rows.items():
        vs = [r["v"] for r in rs if r["v"] is not None]
        out[k] = {"k": k, "g": rs[0]["g"], "s": sum(vs) if vs else None, "n": len(rs),
                  "hi": max(vs, default=None), "lo": min(vs, default=None),
                  "d": len(set(vs)), "last": vs[-1] if vs else None}
    return out


def _two_levels_oracle(items: list[list[dict]]) -> list[dict]:
    per_g: dict[int, list[dict]] = defaultdict(list)
    for r in _per_key(items).values():
        per_g[r["g"]].append(r)
    out = []
    for g, rs in per_g.items():
        his = [r["hi"] for r in rs if r["hi"] is not None]
        out.append({"g": g, "keys": len(rs), "total": sum(r["n"] for r in rs),
                    "best": max(his, default=None), "avg_hi": sum(his) / len(his) if his else None})
    return out


def _per_key_agg(ds: ms.Dataset) -> ms.Dataset:
    return ds.group_by("k", "g").agg(ms.sum("v").alias("s"), ms.count().alias("n"),
                                     ms.max("v").alias("hi"), ms.min("v").alias("lo"),
                                     ms.count_distinct("v").alias("d"))


def _two_levels(ds: ms.Dataset) -> ms.Dataset:
    """An aggregate of an aggregate's updates (it takes their retractions)."""
    return (_per_key_agg(ds).group_by("g")
            .agg(ms.count().alias("keys"), ms.sum("n").alias("total"),
                 ms.max("hi").alias("best"), ms.mean("hi").alias("avg_hi")))


def _approx(rows: list[dict]) -> list[dict]:
    return [{k: (round(v, 9) if isinstance(v, float) else v) for k, v in r.items()}
            for r in rows]


# ----------------------------------------------------------------------------- aggregates


@pytest.mark.parametrize("executor", ["inline", "parallel"])
def test_aggregate_of_an_aggregate_matches_the_oracle_and_batch(executor):
    items = _events(1)
    ds = _two_levels(_source(items).dataset())
    job = ds.start(checkpoint_interval=0 if executor == "inline" else "50ms",
                   executor=executor, parallelism=2)
    assert job.await_termination(120)
    final = _valid(job.sink, ["g"])
    want = _two_levels_oracle(items)
    assert _canon(_approx(final)) == _canon(_approx(want))
    assert _canon(_approx(ds.collect())) == _canon(_approx(want))  # batch: the same plan
    changes = job.sink.rows()
    assert {r["change"] for r in changes} <= {"+I", "-U", "+U", "-D"}
    assert any(r["change"] == "-U" for r in changes)


def test_first_level_results_per_key_and_their_updates():
    items = _events(2, n_items=8)
    job = _per_key_agg(_source(items, partitions=1).dataset()).start(checkpoint_interval=0)
    assert job.await_termination(60)
    want = {k: {c: r[c] for c in ("k", "g", "s", "n", "hi", "lo", "d")}
            for k, r in _per_key(items).items()}
    assert _canon(_valid(job.sink, ["k", "g"])) == _canon(want.values())
    # a key's result changes at most once per input item (mini-batch): one -U/+U pair
    per_epoch: dict[tuple, int] = defaultdict(int)
    for epoch, table in sorted(job.sink._committed.items()):
        for r in C.to_visible(table).to_pylist():
            per_epoch[(epoch, r["k"], r["change"])] += 1
    assert max(per_epoch.values()) == 1


def test_global_aggregate_and_last_on_a_stream():
    items = _events(3, n_items=6)
    ds = _source(items).dataset()
    job = ds.agg(ms.count().alias("n"), ms.sum("v").alias("s")).start(checkpoint_interval=0)
    assert job.await_termination(60)
    vs = [r["v"] for rows in items for r in rows if r["v"] is not None]
    assert job.sink.final_rows() == [{"n": sum(map(len, items)), "s": sum(vs)}]
    src = _source(items, partitions=1)
    last = src.dataset().group_by("k").agg(ms.last("v").alias("last"))
    job = last.start(checkpoint_interval=0)
    assert job.await_termination(60)
    want = [{"k": k, "last": r["last"]} for k, r in _per_key(items).items()]
    assert _canon(job.sink.final_rows(["k"])) == _canon(want)
    assert _canon(last.collect()) == _canon(want)  # batch: the last non-null value too


def test_aggregate_of_a_changelog_input():
    """A source whose rows are changes (a 'change' column): retractions come back out of
    the aggregates, in streaming and in batch mode."""
    schema = pa.schema([("k", pa.string()), ("v", pa.int64()), ("change", pa.string())])
    rng = random.Random(5)
    live: list[dict] = []
    items = []
    for _ in range(15):
        rows = []
        for _ in range(8):
            if live and rng.random() < 0.35:
                r = live.pop(rng.randrange(len(live)))
                rows.append({**r, "change": rng.choice(["-U", "-D"])})
            else:
                r = {"k": rng.choice("abcd"), "v": rng.randrange(-5, 30)}
                live.append(r)
                rows.append({**r, "change": rng.choice(["+I", "+U"])})
        items.append(rows)
    ds = (_source(items, schema=schema).dataset().from_changelog()
          .group_by("k").agg(ms.sum("v").alias("s"), ms.min("v").alias("lo"),
                             ms.count().alias("n")))
    want = []
    for k in sorted({r["k"] for r in live}):
        vs = [r["v"] for r in live if r["k"] == k]
        want.append({"k": k, "s": sum(vs), "lo": min(vs), "n": len(vs)})
    job = ds.start(checkpoint_interval=0)
    assert job.await_termination(60)
    assert _canon(_valid(job.sink, ["k"])) == _canon(want)
    assert _canon(ds.collect()) == _canon(want)
    # the changes as plain rows: a Python map can take them
    seen = []
    plain = _source(items, schema=schema).dataset().from_changelog().to_changelog("kind")
    job = plain.map(lambda r: seen.append(r["kind"]) or r).start(checkpoint_interval=0)
    assert job.await_termination(60)
    assert sorted(seen) == sorted(r["change"] for rows in items for r in rows)


# ----------------------------------------------------------------------------- dedup, top-n


def test_drop_duplicates_first_and_last_on_both_executors_and_in_batch():
    items = _events(4, n_items=10)
    flat = [r for rows in items for r in rows]
    first: dict[str, dict] = {}
    last: dict[str, dict] = {}
    for r in flat:
        first.setdefault(r["k"], r)
        last[r["k"]] = r
    for executor in ("inline", "parallel"):
        src = _source(items, partitions=1)
        job = src.dataset().drop_duplicates("k").start(checkpoint_interval=0,
                                                        executor=executor)
        assert job.await_termination(120)
        assert "change" not in job.sink.to_arrow().schema.names  # append-only
        assert _canon(job.sink.rows()) == _canon(first.values())
        job = src.dataset().drop_duplicates(["k"], keep="last").start(
            checkpoint_interval=0, executor=executor)
        assert job.await_termination(120)
        assert _canon(_valid(job.sink, ["k"])) == _canon(last.values())
    src = _source(items, partitions=1)
    assert _canon(src.dataset().drop_duplicates("k", keep="last").collect()) == \
        _canon(last.values())
    assert _canon(src.dataset().drop_duplicates("k").collect()) == _canon(first.values())
    # distinct() on a stream: the first of each distinct row
    job = src.dataset().select("g").distinct().start(checkpoint_interval=0)
    assert job.await_termination(60)
    assert sorted(r["g"] for r in job.sink.rows()) == [0, 1, 2]


def test_drop_duplicates_within_forgets_keys_by_event_time():
    rows = [{"k": "a", "t": t} for t in (0, 5_000, 12_000, 13_000, 30_000)]
    src = TestSource(schema=pa.schema([("k", pa.string()), ("t", pa.int64())]))
    for r, nxt in zip(rows, [*rows[1:], rows[-1]]):  # after each row, the watermark
        src.add([r], watermark=nxt["t"] * 1000)       # reaches the next row's time
    src.close()
    ds = src.dataset().with_watermark("t", "0s").drop_duplicates("k", within="10s")
    job = ds.start(checkpoint_interval=0)
    assert job.await_termination(60)
    # kept at 0 (till 10 s), again at 12 s (till 22 s), again at 30 s
    assert [r["t"] for r in job.sink.rows()] == [0, 12_000, 30_000]


def _top_oracle(items: list[list[dict]], n: int) -> list[dict]:
    per: dict[int, list[dict]] = defaultdict(list)
    for rows in items:
        for r in rows:
            per[r["g"]].append(r)
    out = []
    for rs in per.values():
        order = sorted(rs, key=lambda r: (r["v"] is None, -(r["v"] or 0)))  # stable
        out += [{**r, "rank": i + 1} for i, r in enumerate(order[:n])]
    return out


@pytest.mark.parametrize("executor", ["inline", "parallel"])
def test_top_n_per_group_on_a_stream_and_in_batch(executor):
    items = _events(6, n_items=12)
    src = _source(items, partitions=1)
    ds = src.dataset().top_n(3, by="v", per="g", descending=True, rank="rank")
    job = ds.start(checkpoint_interval=0, executor=executor, parallelism=2)
    assert job.await_termination(120)
    want = _top_oracle(items, 3)
    assert _canon(_valid(job.sink, ["g", "rank"])) == _canon(want)
    assert _canon(ds.collect()) == _canon(want)


def test_row_number_filter_on_a_stream_is_a_top_n():
    items = _events(7, n_items=10)
    src = _source(items, partitions=1)
    rn = ms.row_number().over(partition_by="g", order_by=ms.col("v"), descending=True)
    ds = src.dataset().with_columns(rn.alias("rank")).filter(ms.col("rank") <= 3)
    job = ds.start(checkpoint_interval=0)
    assert job.await_termination(60)
    assert "TopN" in " ".join(job.metrics()["operators"])
    want = _top_oracle(items, 3)
    assert _canon(_valid(job.sink, ["g", "rank"])) == _canon(want)
    batch = ds.collect()  # batch mode keeps the window function (ties in any order)
    assert sorted((r["g"], r["rank"], r["v"]) for r in batch) == \
        sorted((r["g"], r["rank"], r["v"]) for r in want)
    # the predicate inside filter(): private rank column, dropped after
    ds2 = src.dataset().filter(rn <= 2)
    job = ds2.start(checkpoint_interval=0)
    assert job.await_termination(60)
    assert _canon(job.sink.final_rows()) == _canon(
        [{k: v for k, v in r.items() if k != "rank"} for r in _top_oracle(items, 2)])


def test_top_n_over_an_aggregate_takes_its_retractions():
    """The best keys per group, by a running sum: sums change, so rows leave the top."""
    items = _events(8, n_items=15)
    ds = (_source(items).dataset().group_by("k", "g").agg(ms.sum("v").alias("s"))
          .filter(ms.col("s").is_not_null())
          .top_n(2, by=["s", "k"], per="g", descending=[True, False], rank="r"))
    job = ds.start(checkpoint_interval=0, parallelism=2)
    assert job.await_termination(60)
    per_g: dict[int, list[dict]] = defaultdict(list)
    for r in _per_key(items).values():
        if r["s"] is not None:
            per_g[r["g"]].append({"k": r["k"], "g": r["g"], "s": r["s"]})
    want = []
    for rs in per_g.values():
        want += [{**r, "r": i + 1} for i, r in
                 enumerate(sorted(rs, key=lambda r: (-r["s"], r["k"]))[:2])]
    assert _canon(_valid(job.sink, ["g", "r"])) == _canon(want)
    assert _canon(ds.collect()) == _canon(want)


# ----------------------------------------------------------------------------- failures


@pytest.mark.parametrize("point", ["during_epoch", "after_checkpoint", "after_commit"])
def test_crash_and_restore_in_the_middle(point, tmp_path):
    items = _events(9)
    ds = _two_levels(_source(items).dataset())
    sink = CollectingSink()
    job = crash_and_restore(ds, checkpoint=str(tmp_path / "chk"), sink=sink, crash_epoch=8,
                            point=point, checkpoint_interval=0, parallelism=2)
    assert job.metrics()["restored_from_epoch"] is not None
    assert _canon(_approx(_valid(sink, ["g"]))) == _canon(_approx(_two_levels_oracle(items)))


def _rescale(make: Any, tmp_path: Any, before: int, after: int, crash_epoch: int,
             keys: list[str]) -> list[dict]:
    """Crash at ``before`` after ``crash_epoch``, restore at ``after``: the final rows."""
    chk, sink = str(tmp_path / "chk"), CollectingSink()
    first = make().start(checkpoint=chk, sink=sink, checkpoint_interval=0,
                         parallelism=before, _fault=(crash_epoch, "after_checkpoint"))
    with pytest.raises(SimulatedCrash):
        first.await_termination(60)
    state = CheckpointStore(chk).latest()[1]
    assert state["parallelism"] == before
    assert any(len(groups) > 2 for groups in state["keyed"].values()), \
        "the checkpoint should hold keyed state of several key groups"
    second = make().start(checkpoint=chk, sink=sink, checkpoint_interval=0,
                          parallelism=after)
    assert second.await_termination(60)
    assert second.metrics()["restored_from_epoch"] == crash_epoch - 1
    return _valid(sink, keys)


@pytest.mark.parametrize(("before", "after"), [(2, 3), (3, 1)])
def test_aggregates_restore_at_another_parallelism(before, after, tmp_path):
    items = _events(10, n_items=16)
    got = _rescale(lambda: _two_levels(_source(items).dataset()), tmp_path, before, after, 9,
                   ["g"])
    assert _canon(_approx(got)) == _canon(_approx(_two_levels_oracle(items)))


@pytest.mark.parametrize(("before", "after"), [(2, 3), (4, 2)])
def test_dedup_and_top_n_restore_at_another_parallelism(before, after, tmp_path):
    items = _events(11, n_items=16)
    src = _source(items, partitions=1)

    def make():
        return (src.dataset().with_watermark("ts", "1s")
                .drop_duplicates(["k", "v"], keep="last", within="1h")
                .top_n(2, by="v", per="k", descending=True, rank="r"))

    got = _rescale(make, tmp_path, before, after, 7, ["k", "r"])
    last: dict[tuple, dict] = {}
    for rows in items:
        for r in rows:
            last[(r["k"], r["v"])] = r
    per: dict[str, list[dict]] = defaultdict(list)
    for r in last.values():
        per[r["k"]].append(r)
    want = []
    for rs in per.values():
        # ties (equal v) cannot happen after dedup by (k, v), except nulls: one per key
        order = sorted(rs, key=lambda r: (r["v"] is None, -(r["v"] or 0)))
        want += [{**r, "r": i + 1} for i, r in enumerate(order[:2])]
    assert _canon(got) == _canon(want)


def _last_then_top(ds: ms.Dataset) -> ms.Dataset:
    return (ds.drop_duplicates(["k", "v"], keep="last")
            .top_n(2, by=["v", "ts"], per="k", descending=True, rank="r"))


def _last_then_top_oracle(rows: list[dict]) -> list[dict]:
    last: dict[tuple, dict] = {}
    for r in rows:
        last[(r["k"], r["v"])] = r
    per: dict[str, list[dict]] = defaultdict(list)
    for r in last.values():
        per[r["k"]].append(r)
    want = []
    for rs in per.values():
        order = sorted(rs, key=lambda r: (r["v"] is None, -(r["v"] or 0), -r["ts"]))
        want += [{**r, "r": i + 1} for i, r in enumerate(order[:2])]
    return want


@pytest.mark.parametrize("pipeline", ["aggregates", "dedup_topn"])
def test_a_killed_task_slot_restarts_from_the_checkpoint(pipeline, tmp_path):
    """SIGKILL of a slot process of the parallel executor while the job runs (half the
    input is held back, so the kill lands in the middle); the result is still right."""
    rows = [r for item in _events(12, n_items=60, per_item=40, keys=40) for r in item]
    # (keep last depends on the arrival order: one source partition keeps it the rows')
    held = HeldRows(rows, partitions=2 if pipeline == "aggregates" else 1, chunk=40)
    make, keys = ((_two_levels, ["g"]) if pipeline == "aggregates"
                  else (_last_then_top, ["k", "r"]))
    sink = CollectingSink()
    job = make(held.dataset()).start(checkpoint=str(tmp_path / "chk"), executor="parallel",
                                     parallelism=2, sink=sink, checkpoint_interval="50ms")
    held.wait_until_checkpointed(job)
    os.kill(job.host_pids()[-1], signal.SIGKILL)
    held.release()
    assert job.await_termination(120)
    assert job.metrics()["restarts"] == 1
    want = (_two_levels_oracle([rows]) if pipeline == "aggregates"
            else _last_then_top_oracle(rows))
    assert _canon(_approx(_valid(sink, keys))) == _canon(_approx(want))


# ----------------------------------------------------------------------------- checks


def _updating() -> ms.Dataset:
    return _source(_events(13, n_items=3)).dataset().group_by("k").agg(ms.sum("v").alias("s"))


def test_steps_that_cannot_take_updates_are_refused():
    with pytest.raises(PlanError, match=r"Map\(.*<lambda>\) cannot take the updates .*"
                                        r"Aggregate keys=\['k'\].*to_changelog"):
        _updating().map(lambda r: r).start()
    with pytest.raises(PlanError, match="Window .* cannot take the updates"):
        (_updating().with_columns(ts=ms.lit(1)).with_watermark("ts", "0s")
         .window(ms.tumbling("1m"), on="ts").agg(ms.count())).start()
    with pytest.raises(PlanError, match="Deduplicate .* cannot take the updates"):
        _updating().drop_duplicates("k").start()
    with pytest.raises(PlanError, match="Repartition .* cannot take .*reorder"):
        _updating().repartition(2, "s").start()
    # filters, selects and renames keep each row's kind: fine
    job = (_updating().filter(ms.col("s") > 0).select("k", total="s")
           .rename({"k": "key"}).start(checkpoint_interval=0))
    assert job.await_termination(60)
    assert "change" in job.sink.to_arrow().schema.names


def test_operators_and_nodes_agree_on_updates():
    """Per-row nodes that take updates have operators that keep the kinds, and the other
    way round; the changelog operators declare what they take and give."""
    from millstream.ops.changelog import ChangelogAggregate, Deduplicate, TopN
    from millstream.plan import logical as L
    from millstream.plan.physical import narrow_factory

    child = _source(_events(13, n_items=1)).dataset()._node
    nodes = [L.Map(child, len), L.FlatMap(child, list), L.FilterRows(child, bool),
             L.MapBatches(child, len), L.Filter(child, ms.col("v") > 1),
             L.Project(child, (ms.col("k"),)), L.WithColumns(child, (ms.lit(1).alias("x"),)),
             L.Drop(child, ("v",)), L.Rename(child, (("v", "w"),)),
             L.Explode(L.WithColumns(child, (ms.col("k").str.split().alias("l"),)), "l")]
    for node in nodes:
        assert node.accepts_updates == narrow_factory(node).cls.accepts_updates, node.label()
    assert ChangelogAggregate.accepts_updates and ChangelogAggregate.emits_updates
    assert TopN.accepts_updates and TopN.emits_updates
    assert not Deduplicate.accepts_updates
    assert Deduplicate(["k"], "last").emits_updates and not Deduplicate(["k"]).emits_updates
    assert L.Aggregate(child, ("k",), ()).emits_updates and not child.emits_updates


def test_sinks_declare_what_they_take(tmp_path):
    with pytest.raises(PlanError, match="takes appends only.*changelog=True"):
        _updating().start(sink=str(tmp_path / "out"))
    with pytest.raises(PlanError, match="keyed by \\['s'\\].*keyed by \\['k'\\]"):
        _updating().start(sink=UpsertTable(["s"]))
    with pytest.raises(PlanError, match="no key the plan can tell"):
        _updating().top_n(1, by="s").start(sink=UpsertTable(["k"]))
    # an upsert sink keyed by the group keys (or more) gets the last row per key
    items = _events(13, n_items=3)
    for keys in (["k"], ["key", "s"]):
        sink = UpsertTable(keys)
        ds = _source(items).dataset().group_by("k").agg(ms.sum("v").alias("s"))
        if "key" in keys:
            ds = ds.select(key="k", s="s")
        job = ds.start(sink=sink, checkpoint_interval=0)
        assert job.await_termination(60)
        want = [{"key" if "key" in keys else "k": k, "s": r["s"]}
                for k, r in _per_key(items).items()]
        assert _canon(sink.table.values()) == _canon(want)


def test_sink_function_gets_the_change_kinds():
    calls = []
    job = _updating().start(sink=ms.sink(lambda t: calls.append(t)), checkpoint_interval=0)
    assert job.await_termination(60)
    table = pa.concat_tables(calls)
    assert table.schema.names == ["k", "s", "change"]
    assert set(table.column("change").to_pylist()) <= {"+I", "-U", "+U", "-D"}
    assert _canon(C.materialize(table, ["k"]).to_pylist()) == _canon(
        [{"k": k, "s": r["s"]} for k, r in _per_key(_events(13, n_items=3)).items()])


def test_file_sink_writes_a_change_column_exactly_once(tmp_path):
    items = _events(14, n_items=12)
    out = tmp_path / "out"
    ds = _per_key_agg(_source(items).dataset())
    job = crash_and_restore(ds, checkpoint=str(tmp_path / "chk"),
                            sink=ms.file_sink(str(out), changelog=True), crash_epoch=6,
                            checkpoint_interval=0)
    assert job.await_termination(60)
    files = sorted(out.glob("*.parquet"))  # names sort by epoch: the changes in order
    table = pa.concat_tables([pq.read_table(f) for f in files])
    assert "change" in table.schema.names
    final = C.materialize(table, ["k"]).to_pylist()
    want = {k: {c: r[c] for c in ("k", "g", "s", "n", "hi", "lo", "d")}
            for k, r in _per_key(items).items()}
    assert _canon(final) == _canon(want.values())
    # an append-only result with changelog=True: every row is an insert
    out2 = tmp_path / "plain"
    job = _source(items).dataset().select("k").start(
        sink=ms.file_sink(str(out2), changelog=True), checkpoint_interval=0)
    assert job.await_termination(60)
    kinds = {k for f in out2.glob("*.parquet") for k in pq.read_table(f)["change"].to_pylist()}
    assert kinds == {"+I"}


def test_to_changelog_and_from_changelog_in_batch_mode():
    ds = ms.from_items([{"k": "a", "v": 1}, {"k": "b", "v": 2}])
    assert ds.to_changelog().collect() == [{"k": "a", "v": 1, "change": "+I"},
                                           {"k": "b", "v": 2, "change": "+I"}]
    changes = ms.from_items([{"k": "a", "v": 1, "change": "+I"},
                             {"k": "a", "v": 1, "change": "+I"},
                             {"k": "a", "v": 1, "change": "-U"},
                             {"k": "b", "v": 2, "change": "+I"},
                             {"k": "b", "v": 2, "change": "-D"},
                             {"k": "c", "v": 3, "change": "+U"}], num_partitions=2)
    assert _canon(changes.from_changelog().collect()) == _canon(
        [{"k": "a", "v": 1}, {"k": "c", "v": 3}])
    with pytest.raises(ms.SchemaError, match="no column"):
        ds.from_changelog()
