"""The statistical aggregates of the changelog aggregate: std/var (exact under retraction:
equal to ``statistics``' correctly rounded answer, close to numpy's), median and quantile
(every interpolation, against numpy), any_value (a value still held), and the sketches
(approx_count_distinct, approx_quantile) on append-only input; random inserts and
retractions (hypothesis), state split by key group, streaming on both executors against
the batch answer, kill-and-restore and restore at another parallelism; and the planner's
refusal of a sketch over a changelog."""

from __future__ import annotations

import math
import random
import statistics
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import millstream as ms
from millstream.core import changelog as C
from millstream.core.context import default_context
from millstream.core.keygroups import key_group_owners, key_hashes, owned_key_groups
from millstream.errors import PlanError
from millstream.expr.aggregates import AggSpec
from millstream.expr.nodes import col
from millstream.ops.changelog import ChangelogAggregate
from millstream.testing import CollectingSink, TestSource, crash_and_restore

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SCHEMA = pa.schema([("k", pa.string()), ("x", pa.float64())])
KEYS = "abcd"
#: values with a wide range: a large one taken back from small ones cancels float moments
VALUES = st.one_of(st.sampled_from([1e12, -1e12, 1e15 + 1, 0.1, 0.2, 1e-300, 3.0, -2.5]),
                   st.integers(-20, 20).map(float),
                   st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False))
HOWS = ("linear", "discrete", "lower", "higher", "midpoint", "nearest")
NUMPY_METHOD = {"discrete": "inverted_cdf"}


@st.composite
def changelogs(draw: Any, values: Any = VALUES) -> list[list[tuple[str, dict]]]:
    """Batches of valid changes to rows {k, x}: inserts, and retractions of rows held."""
    live: list[dict] = []
    out = []
    for _ in range(draw(st.integers(1, 8))):
        batch = []
        for _ in range(draw(st.integers(1, 12))):
            if live and draw(st.integers(0, 2)) == 0:
                row = live.pop(draw(st.integers(0, len(live) - 1)))
                batch.append((draw(st.sampled_from(["-U", "-D"])), row))
            else:
                row = {"k": draw(st.sampled_from(KEYS)),
                       "x": draw(st.one_of(st.none(), values))}
                live.append(row)
                batch.append((draw(st.sampled_from(["+I", "+U"])), row))
        out.append(batch)
    return out


def _batch(changes: list[tuple[str, dict]]) -> pa.RecordBatch:
    b = pa.RecordBatch.from_pylist([r for _, r in changes], schema=SCHEMA)
    return C.with_kinds(b, np.asarray([C.NAMES.index(k) for k, _ in changes], dtype=np.int8))


def _opened(op: Any) -> Any:
    op.open(default_context())
    return op


def _run(op: Any, batch: pa.RecordBatch) -> list[pa.RecordBatch]:
    return [b for b in op.process(batch) if b.num_rows]


def _final(outputs: list[pa.RecordBatch]) -> dict[str, dict]:
    if not outputs:
        return {}
    table = pa.concat_tables([pa.Table.from_batches([b]) for b in outputs])
    return {r["k"]: r for r in C.materialize(table, ["k"]).to_pylist()}


def _specs(q: float, how: str) -> list[AggSpec]:
    return [AggSpec("std", col("x"), "sd", {"ddof": 1}), AggSpec("var", col("x"), "v0",
                                                                  {"ddof": 0}),
            AggSpec("median", col("x"), "med"),
            AggSpec("quantile", col("x"), "qq", {"q": q, "interpolation": how}),
            AggSpec("any_value", col("x"), "any")]


class Held:
    """The rows held per key, from the changes in order."""

    def __init__(self) -> None:
        self.rows: dict[str, list[dict]] = defaultdict(list)

    def apply(self, changes: list[tuple[str, dict]]) -> None:
        for kind, row in changes:
            if kind in ("+I", "+U"):
                self.rows[row["k"]].append(row)
            else:
                self.rows[row["k"]].remove(row)

    def check(self, got: dict[str, dict], q: float, how: str) -> None:
        want = {k: [r["x"] for r in rows] for k, rows in self.rows.items() if rows}
        assert set(got) == set(want)
        for k, xs in want.items():
            g, vs = got[k], [x for x in xs if x is not None]
            # exact sums: the correctly rounded variance, as statistics computes it
            assert g["sd"] == (math.sqrt(statistics.variance(vs)) if len(vs) > 1 else None)
            assert g["v0"] == (statistics.pvariance(vs) if vs else None)
            if len(vs) > 1:
                assert g["sd"] == pytest.approx(float(np.std(vs, ddof=1)), rel=1e-9, abs=1e-9)
            if not vs:
                assert g["med"] is None and g["qq"] is None and g["any"] is None
                continue
            assert g["med"] == pytest.approx(float(np.median(vs)), rel=1e-12)
            method = NUMPY_METHOD.get(how, how)
            assert g["qq"] == pytest.approx(float(np.quantile(vs, q, method=method)),
                                            rel=1e-12)
            assert g["any"] in vs


@SETTINGS
@given(changelogs(), st.sampled_from([0.0, 0.25, 0.5, 0.9, 1.0]), st.sampled_from(HOWS))
def test_statistics_of_a_changelog_match_the_held_rows(batches, q, how):
    op = _opened(ChangelogAggregate(["k"], _specs(q, how), retracting=True))
    held, outputs = Held(), []
    for changes in batches:
        held.apply(changes)
        outputs += _run(op, _batch(changes))
        held.check(_final(outputs), q, how)


@SETTINGS
@given(changelogs(), st.integers(1, 3), st.integers(0, 7))
def test_statistics_state_moves_by_key_group(batches, parallelism, cut):
    """A snapshot split by key group, restored into instances owning some groups each."""
    specs = _specs(0.3, "linear")
    op = _opened(ChangelogAggregate(["k"], specs, retracting=True))
    held, outputs = Held(), []
    cut = min(cut, len(batches))
    for changes in batches[:cut]:
        held.apply(changes)
        outputs += _run(op, _batch(changes))
    groups = dict(op.iter_key_group_snapshots(16))
    ops = []
    for i in range(parallelism):
        new = _opened(ChangelogAggregate(["k"], specs, retracting=True))
        new.restore_key_groups([groups[g] for g in owned_key_groups(i, parallelism, 16)
                                if g in groups])
        ops.append(new)
    owners = key_group_owners(16, parallelism)
    for changes in batches[cut:]:
        held.apply(changes)
        batch = _batch(changes)
        dest = owners[(key_hashes([batch.column("k")], batch.num_rows) % 16).astype(np.int64)]
        for i, o in enumerate(ops):
            part = batch.filter(pa.array(dest == i))
            if part.num_rows:
                outputs += _run(o, part)
    held.check(_final(outputs), 0.3, "linear")


def test_a_large_value_taken_back_leaves_the_exact_variance_of_the_rest():
    op = _opened(ChangelogAggregate(["k"], [AggSpec("var", col("x"), "v", {"ddof": 1})]))
    rows = [{"k": "a", "x": x} for x in (1e12, 1e-300, 1.0, 2.0, 3.0)]
    out = _run(op, _batch([("+I", r) for r in rows]))
    out += _run(op, _batch([("-D", rows[0]), ("-U", rows[1])]))
    assert _final(out)["a"]["v"] == 1.0
    out += _run(op, _batch([("-D", r) for r in rows[2:]]))  # the key goes: deleted
    assert _final(out) == {}
    out += _run(op, _batch([("+I", {"k": "a", "x": 0.5}), ("+I", {"k": "a", "x": 1.5})]))
    assert _final(out)["a"]["v"] == 0.5
    state = op.store
    state.set_current_key("a")
    assert op._state.value()[1][3] < 60  # the scale restarted with the key


def test_nan_infinity_and_nulls_as_the_batch_aggregate_gives():
    rows = [{"k": "a", "x": 1.0}, {"k": "a", "x": float("nan")}, {"k": "a", "x": 4.0},
            {"k": "a", "x": None}, {"k": "b", "x": float("inf")}, {"k": "b", "x": 2.0},
            {"k": "c", "x": None}, {"k": "d", "x": 5.0}]
    specs = _specs(0.75, "linear")
    op = _opened(ChangelogAggregate(["k"], specs, retracting=True))
    out = _run(op, _batch([("+I", r) for r in rows]))
    batch = ms.from_arrow(pa.Table.from_pylist(rows, schema=SCHEMA)).group_by("k").agg(
        ms.std("x").alias("sd"), ms.var("x", ddof=0).alias("v0"), ms.median("x").alias("med"),
        ms.quantile("x", 0.75).alias("qq")).collect()

    def same(a: Any, b: Any) -> bool:
        return a == b or (a != a and b != b) or (a is not None and b is not None
                                                 and math.isclose(a, b))

    got = _final(out)
    for want in batch:
        g = got[want["k"]]
        for c in ("sd", "v0", "med", "qq"):
            if want["k"] in ("a", "b") and c in ("sd", "v0"):
                # with a NaN or an infinity held the variance is NaN, as numpy's (the
                # batch aggregate's merge turns a NaN M2 into 0 and inf into a large
                # finite number: 0.0 and 1.34e154 here)
                assert g[c] != g[c] and np.isnan(np.var([np.inf, 2.0]))
                continue
            assert same(g[c], want[c]), (want["k"], c, g[c], want[c])
    out += _run(op, _batch([("-D", rows[1]), ("-U", rows[4])]))  # the NaN and inf go
    got = _final(out)
    assert got["a"]["sd"] == pytest.approx(statistics.stdev([1.0, 4.0]))
    assert got["a"]["med"] == 2.5 and got["b"]["v0"] == 0.0 and got["b"]["med"] == 2.0


def test_any_value_changes_only_when_its_value_goes():
    op = _opened(ChangelogAggregate(["k"], [AggSpec("any_value", col("x"), "a")]))
    rows = [{"k": "a", "x": x} for x in (3.0, 4.0, 5.0)]
    out = _run(op, _batch([("+I", r) for r in rows]))
    first = _final(out)["a"]["a"]
    other = next(r for r in rows if r["x"] != first)
    assert _run(op, _batch([("-D", other)])) == []
    out += _run(op, _batch([("-D", {"k": "a", "x": first})]))
    assert _final(out)["a"]["a"] in {3.0, 4.0, 5.0} - {first, other["x"]}


def test_sketches_on_appends_match_the_batch_sketches():
    rng = random.Random(5)
    rows = [{"k": rng.choice(KEYS), "x": float(rng.randrange(3000))} for _ in range(6000)]
    specs = [AggSpec("approx_count_distinct", col("x"), "d"),
             AggSpec("approx_quantile", col("x"), "q9", {"q": 0.9}),
             AggSpec("any_value", col("x"), "a")]
    op = _opened(ChangelogAggregate(["k"], specs, retracting=False))
    out = []
    for i in range(0, len(rows), 250):
        out += _run(op, _batch([("+I", r) for r in rows[i:i + 250]]))
    got = _final(out)
    batch = {r["k"]: r for r in ms.from_arrow(pa.Table.from_pylist(rows, schema=SCHEMA))
             .group_by("k").agg(ms.approx_count_distinct("x").alias("d"),
                                ms.approx_quantile("x", 0.9).alias("q9")).collect()}
    for k, want in batch.items():
        xs = sorted(r["x"] for r in rows if r["k"] == k)
        assert got[k]["d"] == want["d"]  # HLL registers merge to the same sketch
        assert abs(got[k]["d"] - len(set(xs))) <= 0.06 * len(set(xs))
        rank = np.searchsorted(xs, got[k]["q9"]) / len(xs)
        assert abs(rank - 0.9) < 0.01
        assert got[k]["a"] == next(r["x"] for r in rows if r["k"] == k)  # the first
    # a small group's digest keeps every value: the exact linear quantile
    op = _opened(ChangelogAggregate(["k"], specs[1:2], retracting=False))
    xs = [float(rng.randrange(-50, 50)) for _ in range(120)]
    out = []
    for i in range(0, len(xs), 7):
        out += _run(op, _batch([("+I", {"k": "a", "x": x}) for x in xs[i:i + 7]]))
        assert _final(out)["a"]["q9"] == pytest.approx(float(np.quantile(xs[:i + 7], 0.9)))
    with pytest.raises(PlanError, match="approx_count_distinct.*cannot take a value back.*count_distinct"):
        ChangelogAggregate(["k"], specs, retracting=True)


# ----------------------------------------------------------------------------- streaming

ROWS_SCHEMA = pa.schema([("k", pa.string()), ("g", pa.int64()), ("v", pa.float64())])


def _items(seed: int, n_items: int = 16, per_item: int = 20) -> list[list[dict]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n_items):
        out.append([{"k": f"k{(k := rng.randrange(10))}", "g": k % 3,
                     "v": rng.choice([None, 1e9, 0.5, *map(float, range(40))])}
                    for _ in range(per_item)])
    return out


def _source(items: list[list[dict]], partitions: int = 2) -> TestSource:
    src = TestSource(schema=ROWS_SCHEMA, partitions=partitions)
    for i, rows in enumerate(items):
        src.add(rows, partition=i % partitions)
    src.close()
    return src


def _stats(ds: ms.Dataset) -> ms.Dataset:
    """Per key on the appends, then per group over the per-key changelog (retractions)."""
    per_key = ds.group_by("k", "g").agg(
        ms.sum("v").alias("s"), ms.std("v").alias("sd"), ms.median("v").alias("med"),
        ms.approx_count_distinct("v").alias("d"), ms.any_value("g").alias("ag"))
    return per_key.group_by("g").agg(
        ms.var("s").alias("var_s"), ms.std("sd", ddof=0).alias("sd_sd"),
        ms.median("med").alias("med_med"), ms.quantile("s", 0.25, "lower").alias("q_s"),
        ms.any_value("ag").alias("ag"), ms.max("d").alias("d"))


def _oracle(items: list[list[dict]]) -> list[dict]:
    per: dict[tuple, list[float | None]] = defaultdict(list)
    for rows in items:
        for r in rows:
            per[(r["k"], r["g"])].append(r["v"])
    by_g: dict[int, list[dict]] = defaultdict(list)
    for (_k, g), vs in per.items():
        xs = [v for v in vs if v is not None]
        by_g[g].append({"s": sum(xs) if xs else None,
                        "sd": statistics.stdev(xs) if len(xs) > 1 else None,
                        "med": statistics.median(xs) if xs else None, "d": len(set(xs))})
    out = []
    for g, rs in by_g.items():
        s = [r["s"] for r in rs if r["s"] is not None]
        sd = [r["sd"] for r in rs if r["sd"] is not None]
        med = [r["med"] for r in rs if r["med"] is not None]
        out.append({"g": g, "var_s": statistics.variance(s) if len(s) > 1 else None,
                    "sd_sd": statistics.pstdev(sd) if sd else None,
                    "med_med": statistics.median(med) if med else None,
                    "q_s": float(np.quantile(s, 0.25, method="lower")) if s else None,
                    "ag": g, "d": max(r["d"] for r in rs)})
    return out


def _close(got: list[dict], want: list[dict]) -> None:
    got_by, want_by = {r["g"]: r for r in got}, {r["g"]: r for r in want}
    assert set(got_by) == set(want_by) and len(got) == len(got_by)
    for g, w in want_by.items():
        for c, v in w.items():
            if c == "d":  # a HyperLogLog estimate of a few dozen values
                assert abs(got_by[g][c] - v) <= 1, (g, c)
            else:
                assert got_by[g][c] == (v if v is None else pytest.approx(v, rel=1e-9)), (g, c)


@pytest.mark.parametrize("executor", ["inline", "parallel"])
def test_statistics_on_a_stream_match_the_oracle_and_batch(executor):
    items = _items(1)
    ds = _stats(_source(items).dataset())
    job = ds.start(checkpoint_interval=0 if executor == "inline" else "50ms",
                   executor=executor, parallelism=2)
    assert job.await_termination(120)
    final = job.sink.final_rows(["g"])
    assert sorted(map(repr, job.sink.final_rows())) == sorted(map(repr, final)), \
        "a retraction took back a row not held"
    want = _oracle(items)
    _close(final, want)
    _close(ds.collect(), want)  # batch: the same plan
    assert any(r["change"] == "-U" for r in job.sink.rows())


@pytest.mark.parametrize("point", ["during_epoch", "after_checkpoint"])
def test_statistics_crash_and_restore_in_the_middle(point, tmp_path):
    items = _items(2)
    sink = CollectingSink()
    job = crash_and_restore(_stats(_source(items).dataset()), checkpoint=str(tmp_path / "c"),
                            sink=sink, crash_epoch=7, point=point, checkpoint_interval=0,
                            parallelism=2)
    assert job.metrics()["restored_from_epoch"] is not None
    _close(sink.final_rows(["g"]), _oracle(items))


def test_statistics_restore_at_another_parallelism(tmp_path):
    from millstream.errors import SimulatedCrash

    items = _items(3)
    chk, sink = str(tmp_path / "chk"), CollectingSink()
    first = _stats(_source(items).dataset()).start(
        checkpoint=chk, sink=sink, checkpoint_interval=0, parallelism=3,
        _fault=(8, "after_checkpoint"))
    with pytest.raises(SimulatedCrash):
        first.await_termination(60)
    second = _stats(_source(items).dataset()).start(checkpoint=chk, sink=sink,
                                                    checkpoint_interval=0, parallelism=1)
    assert second.await_termination(60)
    assert second.metrics()["restored_from_epoch"] == 7
    _close(sink.final_rows(["g"]), _oracle(items))


def test_a_sketch_over_a_changelog_is_refused_when_the_job_starts():
    per_key = _source(_items(4, n_items=2)).dataset().group_by("k").agg(
        ms.sum("v").alias("s"))
    for agg, exact in ((ms.approx_count_distinct("s"), "count_distinct"),
                       (ms.approx_quantile("s", 0.5), "quantile")):
        ds = per_key.agg(agg.alias("x"))
        with pytest.raises(PlanError, match=rf"{agg.func}\(col\(\"s\"\).*\) keeps a sketch, "
                                            rf"which cannot take a value back.*use the exact "
                                            rf"{exact}.*Aggregate keys=\['k'\].* emits"):
            ds.start(checkpoint_interval=0)
        assert len(ds.collect()) == 1  # batch results are final: fine there
