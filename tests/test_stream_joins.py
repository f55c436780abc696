"""Stream joins (interval, window, latest value, stream-table) against plain-Python oracles,
in streaming and batch mode, across restores at another parallelism."""

from __future__ import annotations

import datetime as dt
import random
import time

import pyarrow as pa
import pytest

import millstream as ms
from millstream.core.context import default_context
from millstream.core.keygroups import key_hashes
from millstream.errors import PlanError, SchemaError, SimulatedCrash
from millstream.ops.stream_join import IntervalJoin, JoinKeys
from millstream.testing import CollectingSink, TestSource, crash_and_restore

MIN_WM = -(2**63)
MAX_WM = 2**63 - 1
LSCHEMA = pa.schema([("k", pa.string()), ("lt", pa.int64()), ("x", pa.int64())])
RSCHEMA = pa.schema([("k", pa.string()), ("rt", pa.int64()), ("y", pa.int64())])
EPOCH = dt.datetime(1970, 1, 1)


# ----------------------------------------------------------------------------- data


def _side(seed: int, col: str, ident: str, n_items: int, per_item: int, keys: str = "abcd"):
    """Items of rows with out-of-order and some very late event times (epoch ms; whole
    seconds, so that times often fall exactly on a watermark or an interval bound)."""
    rng = random.Random(seed)
    items, t, n = [], 0, 0
    for _ in range(n_items):
        rows = []
        for _ in range(per_item):
            t += rng.randint(0, 3) * 1000
            jitter = rng.choice([0, 0, 0, rng.randint(0, 8) * 1000, rng.randint(0, 60) * 1000])
            k = rng.choice(keys) if rng.random() > 0.05 else None
            rows.append({"k": k, col: max(0, t - jitter), ident: n})
            n += 1
        items.append(rows)
    return items


def _parts(items, partitions: int):
    """Items dealt round-robin to partitions (what _source does)."""
    return [items[p::partitions] for p in range(partitions)]


def _source(items, schema, partitions: int, close: bool = True) -> TestSource:
    src = TestSource(schema=schema, partitions=partitions)
    for i, rows in enumerate(items):
        src.add(rows, partition=i % partitions)
    if close:
        src.close()
    return src


def _arrivals(sides, delay_ms: int):
    """Plain Python model of the job's rounds: every row with the watermark (µs) in effect
    when it was processed. ``sides``: [(side, time column, items, partitions)]."""
    parts = [(side, col, p) for side, col, items, n in sides for p in _parts(items, n)]
    w, maxts, out, r = MIN_WM, [None] * len(parts), [], 0
    while True:
        for i, (side, col, items) in enumerate(parts):
            if r < len(items):
                for row in items[r]:
                    out.append((side, row, w))
                    if row[col] is not None:
                        maxts[i] = row[col] if maxts[i] is None else max(maxts[i], row[col])
        marks = []
        for i, (_s, _c, items) in enumerate(parts):
            if r >= len(items):
                marks.append(MAX_WM)
            else:
                marks.append(MIN_WM if maxts[i] is None else (maxts[i] - delay_ms) * 1000)
        if min(marks) == MAX_WM:
            return out
        w = max(w, min(marks))
        r += 1


def _key(row: dict) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in row.items()))


def _sorted(rows):
    return sorted((_norm(r) for r in rows), key=_key)


def _norm(row: dict) -> dict:
    out = {}
    for k, v in row.items():
        out[k] = (v - EPOCH) // dt.timedelta(microseconds=1) if isinstance(v, dt.datetime) else v
    return out


def _pair(left: dict | None, right: dict | None) -> dict:
    """An output row of on="k" (the key once, coalesced), left columns, right columns."""
    left = left or {"k": None, "lt": None, "x": None}
    right = right or {"k": None, "rt": None, "y": None}
    return {"k": left["k"] if left["k"] is not None else right["k"], "lt": left["lt"],
            "x": left["x"], "rt": right["rt"], "y": right["y"]}


# ----------------------------------------------------------------------------- oracles


def _interval_oracle(arrivals, lower_ms: int, upper_ms: int, how: str):
    """Rows not late (time >= watermark on arrival) join when keys are equal and
    l.t + lower <= r.t <= l.t + upper; the late ones are the side output."""
    left = [r for s, r, w in arrivals if s == "L" and r["lt"] * 1000 >= w]
    right = [r for s, r, w in arrivals if s == "R" and r["rt"] * 1000 >= w]
    late = [r for s, r, w in arrivals if r["lt" if s == "L" else "rt"] * 1000 < w]
    out, lm, rm = [], set(), set()
    for a in left:
        for b in right:
            if a["k"] is not None and a["k"] == b["k"] and \
                    a["lt"] + lower_ms <= b["rt"] <= a["lt"] + upper_ms:
                out.append(_pair(a, b))
                lm.add(a["x"])
                rm.add(b["y"])
    if how in ("left", "outer"):
        out += [_pair(a, None) for a in left if a["x"] not in lm]
    if how in ("right", "outer"):
        out += [_pair(None, b) for b in right if b["y"] not in rm]
    return out, late


def _windows_of(t_ms: int, size_ms: int, every_ms: int | None):
    if every_ms is None:
        s = t_ms // size_ms * size_ms
        return [(s, s + size_ms)]
    s = t_ms // every_ms * every_ms
    out = []
    while s + size_ms > t_ms:
        out.append((s, s + size_ms))
        s -= every_ms
    return out


def _window_oracle(arrivals, size_ms: int, every_ms: int | None, how: str):
    """Each row lands in its windows whose end is after the watermark on arrival (a row
    with none is late); pairs of a key and window join when the window closes."""
    entries = {"L": [], "R": []}
    late = []
    for side, row, w in arrivals:
        t = row["lt" if side == "L" else "rt"]
        alive = [win for win in _windows_of(t, size_ms, every_ms) if win[1] * 1000 > w]
        if not alive:
            late.append(row)
        entries[side] += [(win, row) for win in alive]
    out, lm, rm = [], set(), set()

    def with_window(win, row):
        return {"window_start": win[0] * 1000, "window_end": win[1] * 1000, **row}

    for wl, a in entries["L"]:
        for wr, b in entries["R"]:
            if wl == wr and a["k"] is not None and a["k"] == b["k"]:
                out.append(with_window(wl, _pair(a, b)))
                lm.add((wl, a["x"]))
                rm.add((wr, b["y"]))
    if how in ("left", "outer"):
        out += [with_window(w, _pair(a, None)) for w, a in entries["L"] if (w, a["x"]) not in lm]
    if how in ("right", "outer"):
        out += [with_window(w, _pair(None, b)) for w, b in entries["R"] if (w, b["y"]) not in rm]
    return out, late


def _late_rows(job):
    """Late rows of both inputs (one side output: each row keeps its own input's columns)."""
    cols = {"left": LSCHEMA.names, "right": RSCHEMA.names}
    return _sorted({c: r[c] for c in cols[r["join_side"]]} for r in job.late_records())


# ----------------------------------------------------------------------------- interval join

LEFT = _side(1, "lt", "x", n_items=16, per_item=6)
RIGHT = _side(2, "rt", "y", n_items=16, per_item=6)


def _interval(how: str, delay: str = "5s", lp: int = 2, rp: int = 3):
    left = _source(LEFT, LSCHEMA, lp).dataset().with_watermark("lt", delay)
    right = _source(RIGHT, RSCHEMA, rp).dataset().with_watermark("rt", delay)
    return left.interval_join(right, on="k", between=("-4s", "6s"), how=how)


@pytest.mark.parametrize("how", ["inner", "left", "right", "outer"])
def test_interval_join_matches_oracle_streaming_and_batch(how):
    arrivals = _arrivals([("L", "lt", LEFT, 2), ("R", "rt", RIGHT, 3)], 5000)
    expected, late = _interval_oracle(arrivals, -4000, 6000, how)
    assert late, "the data should contain late rows"
    job = _interval(how).start(checkpoint_interval=0, parallelism=3)
    assert job.await_termination(30)
    assert _sorted(job.sink.rows()) == _sorted(expected)
    assert _late_rows(job) == _sorted(late)
    assert {r["join_side"] for r in job.late_records()} == {"left", "right"}
    # batch mode: nothing is late, every row takes part
    everything = [(s, r, MIN_WM) for s, r, _w in arrivals]
    assert _sorted(_interval(how).collect()) == _sorted(_interval_oracle(everything, -4000, 6000,
                                                                         how)[0])


def test_interval_join_streaming_equals_batch_when_nothing_is_late():
    ds = _interval("outer", delay="10m")
    job = ds.start(checkpoint_interval=0, parallelism=2)
    assert job.await_termination(30)
    assert job.late_records() == []
    assert _sorted(job.sink.rows()) == _sorted(ds.collect())


def test_interval_join_restores_at_another_parallelism(tmp_path):
    plain = _interval("left").start(checkpoint_interval=0, parallelism=2)
    assert plain.await_termination(30)
    expected = _sorted(plain.sink.rows())
    for before, after, epoch, point in [(2, 3, 5, "after_checkpoint"), (3, 1, 8, "during_epoch")]:
        chk, sink = str(tmp_path / f"chk-{before}-{after}"), CollectingSink()
        first = _interval("left").start(checkpoint=chk, sink=sink, checkpoint_interval=0,
                                        parallelism=before, _fault=(epoch, point))
        with pytest.raises(SimulatedCrash):
            first.await_termination(30)
        second = _interval("left").start(checkpoint=chk, sink=sink, checkpoint_interval=0,
                                         parallelism=after)
        assert second.await_termination(30)
        assert second.metrics()["restored_from_epoch"] is not None
        assert _sorted(sink.rows()) == expected, (before, after)
        assert _late_rows(second) == _late_rows(plain)


def _rounds(left_items, right_items):
    """One partition per input, no disorder allowed (delay 0): each item is one round."""
    left, right = TestSource(schema=LSCHEMA), TestSource(schema=RSCHEMA)
    for rows in left_items:
        left.add(rows)
    for rows in right_items:
        right.add(rows)
    left.close()
    right.close()
    return (left.dataset().with_watermark("lt", "0s"), right.dataset().with_watermark("rt", "0s"))


def _ids(rows, *cols):
    """Sorted tuples of id columns (None as -1)."""
    return sorted(tuple(-1 if r[c] is None else r[c] for c in cols) for r in rows)


def test_interval_join_bounds_lateness_and_clean_up_at_the_exact_edges():
    s = 1000
    left_items = [[{"k": "a", "lt": 10 * s, "x": 1}],
                  [{"k": "c", "lt": 15 * s, "x": 2}],
                  [{"k": "d", "lt": 20 * s, "x": 3}]]
    right_items = [[{"k": "b", "rt": 15 * s, "y": 1}],                  # watermark -> 10 s
                   [{"k": "a", "rt": 15 * s, "y": 2},                   # = l1 + upper
                    {"k": "c", "rt": 15 * s, "y": 3}],                  # = l2 + lower; wm -> 15 s
                   [{"k": "a", "rt": 15 * s, "y": 4},                   # time = watermark: on time
                    {"k": "a", "rt": 15 * s - 1, "y": 5}]]              # 1 ms behind: late
    left, right = _rounds(left_items, right_items)
    ds = left.interval_join(right, on="k", between=("0s", "5s"), how="outer")
    job = ds.start(checkpoint_interval=0)
    assert job.await_termination(30)
    # l1 (a, 10 s) is kept while 10 s + 5 s >= watermark 15 s, so y=4 still meets it
    assert _ids(job.sink.rows(), "x", "y") == [(-1, 1), (1, 2), (1, 4), (2, 3), (3, -1)]
    assert [(r["y"], r["join_side"]) for r in job.late_records()] == [(5, "right")]
    assert _ids(ds.collect(), "x", "y") == [(-1, 1), (1, 2), (1, 4), (1, 5), (2, 3), (3, -1)]


def test_window_join_window_closes_exactly_at_the_watermark():
    s = 1000
    left_items = [[{"k": "a", "lt": 5 * s, "x": 1}], [{"k": "a", "lt": 10 * s, "x": 2}]]
    right_items = [[{"k": "z", "rt": 10 * s, "y": 1}],                  # watermark -> 5 s
                   [{"k": "a", "rt": 9 * s, "y": 2}],                   # wm 10 s: [0, 10) fires
                   [{"k": "a", "rt": 10 * s - 500, "y": 3},             # [0, 10) closed: late
                    {"k": "a", "rt": 10 * s, "y": 4}]]                  # [10, 20): joins x=2
    left, right = _rounds(left_items, right_items)
    ds = left.window_join(right, on="k", window=ms.tumbling("10s"), how="outer")
    job = ds.start(checkpoint_interval=0)
    assert job.await_termination(30)
    rows = [{**r, "w": r["window_start"].second} for r in job.sink.rows()]
    assert _ids(rows, "w", "x", "y") == [(0, 1, 2), (10, -1, 1), (10, 2, 4)]
    assert [r["y"] for r in job.late_records()] == [3]


def test_interval_join_invalid_times_and_explicit_time_columns():
    left = TestSource(schema=pa.schema([("id", pa.int64()), ("when", pa.int64())]))
    left.add([{"id": 1, "when": 10_000}, {"id": 2, "when": None}, {"id": 3, "when": 20_000}])
    left.close()
    right = TestSource(schema=pa.schema([("key", pa.int64()), ("at", pa.int64())]))
    right.add([{"key": 1, "at": 9_000}, {"key": 3, "at": 30_000}, {"key": 2, "at": 10_000}])
    right.close()
    ds = left.dataset().interval_join(right.dataset(), left_on="id", right_on="key",
                                      between=(-1_000_000, "10s"), left_time="when", right_time="at")
    job = ds.start(checkpoint_interval=0)
    assert job.await_termination(30)
    assert _sorted(job.sink.rows()) == _sorted([
        {"id": 1, "when": 10_000, "key": 1, "at": 9_000},
        {"id": 3, "when": 20_000, "key": 3, "at": 30_000}])
    assert [r["id"] for r in job.side_output("invalid")] == [2]
    assert _sorted(ds.collect()) == _sorted(job.sink.rows())


def test_interval_join_arguments_are_checked():
    left = _source(LEFT, LSCHEMA, 1).dataset()
    right = _source(RIGHT, RSCHEMA, 1).dataset().with_watermark("rt", "1s")
    with pytest.raises(PlanError, match="left_time"):
        left.interval_join(right, on="k", between=("0s", "1s"))
    with pytest.raises(PlanError, match="lower <= upper"):
        left.interval_join(right, on="k", between=("1s", "-1s"), left_time="lt")
    with pytest.raises(PlanError, match="between"):
        left.interval_join(right, on="k", left_time="lt")
    with pytest.raises(PlanError, match="how"):
        left.interval_join(right, on="k", between=(0, 1), left_time="lt", how="semi")
    with pytest.raises(PlanError, match="session"):
        left.window_join(right, on="k", window=ms.session("1s"), left_time="lt")


# ----------------------------------------------------------------------------- key types


def _typed(ltype: pa.DataType, rtype: pa.DataType, lvals, rvals):
    left = TestSource(schema=pa.schema([("k", ltype), ("t", pa.int64()), ("x", pa.int64())]),
                      partitions=2)
    right = TestSource(schema=pa.schema([("k", rtype), ("t", pa.int64()), ("y", pa.int64())]),
                       partitions=2)
    for i, v in enumerate(lvals):
        left.add([{"k": v, "t": 1000 + i, "x": i}], partition=i % 2)
    for i, v in enumerate(rvals):
        right.add([{"k": v, "t": 1000 + i, "y": i}], partition=i % 2)
    left.close()
    right.close()
    return (left.dataset().with_watermark("t", "1h")
            .interval_join(right.dataset().with_watermark("t", "1h"), on="k",
                           between=("-1m", "1m")))


@pytest.mark.parametrize("ltype,rtype,lvals,rvals", [
    (pa.int32(), pa.int64(), list(range(20)), list(range(10, 30))),
    (pa.timestamp("ms"), pa.timestamp("us"),
     [dt.datetime(2024, 1, 1, 0, 0, i) for i in range(20)],
     [dt.datetime(2024, 1, 1, 0, 0, i) for i in range(10, 30)]),
    (pa.string(), pa.large_string(), [str(i) for i in range(20)], [str(i) for i in range(10, 30)]),
])
def test_keys_of_different_types_meet_in_one_key_group(ltype, rtype, lvals, rvals):
    ds = _typed(ltype, rtype, lvals, rvals)
    job = ds.start(checkpoint_interval=0, parallelism=4)
    assert job.await_termination(30)
    rows = job.sink.rows()
    assert sorted((r["x"], r["y"]) for r in rows) == [(i, i - 10) for i in range(10, 20)]
    assert sorted((r["x"], r["y"]) for r in ds.collect()) == [(i, i - 10) for i in range(10, 20)]


def test_incomparable_key_types_raise_a_schema_error():
    ds = _typed(pa.string(), pa.int64(), ["1", "2"], [1, 2])
    job = ds.start(checkpoint_interval=0, parallelism=1)
    with pytest.raises(SchemaError, match="cast one side"):
        job.await_termination(30)


# ----------------------------------------------------------------------------- window join


def _window_join(window, how: str, delay: str = "4s"):
    left = _source(LEFT, LSCHEMA, 2).dataset().with_watermark("lt", delay)
    right = _source(RIGHT, RSCHEMA, 2).dataset().with_watermark("rt", delay)
    return left.window_join(right, on="k", window=window, how=how)


@pytest.mark.parametrize("window,size,every", [(ms.tumbling("10s"), 10_000, None),
                                               (ms.sliding("10s", every="5s"), 10_000, 5000)])
@pytest.mark.parametrize("how", ["inner", "left", "outer"])
def test_window_join_matches_oracle_streaming_and_batch(window, size, every, how):
    arrivals = _arrivals([("L", "lt", LEFT, 2), ("R", "rt", RIGHT, 2)], 4000)
    expected, late = _window_oracle(arrivals, size, every, how)
    assert late and expected
    job = _window_join(window, how).start(checkpoint_interval=0, parallelism=2)
    assert job.await_termination(30)
    assert _sorted(job.sink.rows()) == _sorted(expected)
    assert _late_rows(job) == _sorted(late)
    everything = [(s, r, MIN_WM) for s, r, _w in arrivals]
    assert _sorted(_window_join(window, how).collect()) == \
        _sorted(_window_oracle(everything, size, every, how)[0])


def test_window_join_restores_at_another_parallelism(tmp_path):
    window = ms.tumbling("10s")
    plain = _window_join(window, "outer").start(checkpoint_interval=0, parallelism=3)
    assert plain.await_termination(30)
    expected = _sorted(plain.sink.rows())
    chk, sink = str(tmp_path / "chk"), CollectingSink()
    first = _window_join(window, "outer").start(checkpoint=chk, sink=sink, checkpoint_interval=0,
                                                parallelism=3, _fault=(6, "before_checkpoint"))
    with pytest.raises(SimulatedCrash):
        first.await_termination(30)
    second = _window_join(window, "outer").start(checkpoint=chk, sink=sink,
                                                 checkpoint_interval=0, parallelism=2)
    assert second.await_termination(30)
    assert _sorted(sink.rows()) == expected


# ----------------------------------------------------------------------------- join_latest


def _changelog_items(seed: int, n_items: int = 30):
    """One stream of items, each all orders ("O") or all rate updates ("R")."""
    rng = random.Random(seed)
    items, n = [], 0
    for i in range(n_items):
        kind = "R" if i < 2 or rng.random() < 0.4 else "O"
        rows = []
        for _ in range(rng.randint(1, 4)):
            cur = rng.choice(["eur", "usd", "gbp", None])
            rows.append({"kind": kind, "cur": cur, "amount": n, "rate": rng.randint(1, 99),
                         "ver": rng.randint(0, 5), "gone": rng.random() < 0.15, "ts": i * 1000})
            n += 1
        items.append(rows)
    return items


def _latest_ds(src: TestSource, how: str, version: str | None = None, deleted: str | None = None):
    base = src.dataset()
    orders = base.filter(ms.col("kind") == "O").select("cur", "amount", "ts")
    rates = base.filter(ms.col("kind") == "R").select("cur", "rate", "ver", "gone")
    return orders.join_latest(rates, on="cur", how=how, version=version, deleted=deleted)


def _latest_oracle(items, how: str, version: bool, deleted: bool, batch: bool):
    table: dict = {}
    updates = [r for rows in items for r in rows if r["kind"] == "R"]

    def apply(r):
        if r["cur"] is None:
            return
        held = table.get(r["cur"])
        if version and held is not None and r["ver"] < held["ver"]:
            return
        table[r["cur"]] = r

    out = []

    def look(o):
        hit = table.get(o["cur"]) if o["cur"] is not None else None
        if hit is not None and deleted and hit["gone"]:
            hit = None
        if hit is not None:
            out.append({**o, "rate": hit["rate"], "ver": hit["ver"], "gone": hit["gone"]})
        elif how == "left":
            out.append({**o, "rate": None, "ver": None, "gone": None})

    if batch:
        for r in updates:
            apply(r)
    for rows in items:
        for r in rows:
            if r["kind"] == "R" and not batch:
                apply(r)
            elif r["kind"] == "O":
                look({"cur": r["cur"], "amount": r["amount"], "ts": r["ts"]})
    return out


@pytest.mark.parametrize("how,version,deleted", [("inner", None, None), ("left", None, "gone"),
                                                 ("left", "ver", "gone"), ("inner", "ver", None)])
def test_join_latest_matches_oracle(how, version, deleted, tmp_path):
    items = _changelog_items(11)
    src = TestSource(schema=pa.schema([("kind", pa.string()), ("cur", pa.string()),
                                       ("amount", pa.int64()), ("rate", pa.int64()),
                                       ("ver", pa.int64()), ("gone", pa.bool_()),
                                       ("ts", pa.int64())]))
    for rows in items:
        src.add(rows)
    src.close()
    ds = _latest_ds(src, how, version, deleted)
    # one source read by both inputs: an item's orders see the updates of earlier items
    job = ds.start(checkpoint_interval=0, parallelism=2)
    assert job.await_termination(30)
    expected = _latest_oracle(items, how, version is not None, deleted is not None, batch=False)
    assert _sorted(job.sink.rows()) == _sorted(expected)
    # batch mode reads the whole changelog first: every order meets the last version
    assert _sorted(ds.collect()) == _sorted(
        _latest_oracle(items, how, version is not None, deleted is not None, batch=True))
    # restored at another parallelism, the state (one row per key) carries over
    sink, chk = CollectingSink(), str(tmp_path / "chk")
    first = ds.start(checkpoint=chk, sink=sink, checkpoint_interval=0, parallelism=2,
                     _fault=(9, "after_checkpoint"))
    with pytest.raises(SimulatedCrash):
        first.await_termination(30)
    second = ds.start(checkpoint=chk, sink=sink, checkpoint_interval=0, parallelism=3)
    assert second.await_termination(30)
    assert _sorted(sink.rows()) == _sorted(expected)


def test_changelog_side_does_not_hold_back_the_watermark():
    orders = TestSource(schema=pa.schema([("cur", pa.string()), ("ts", pa.int64())]))
    for i in range(6):
        orders.add([{"cur": "eur", "ts": i * 30_000}])
    orders.close()
    rates = TestSource(schema=pa.schema([("cur", pa.string()), ("rate", pa.int64())]))
    rates.add([{"cur": "eur", "rate": 2}])  # stays open: the changelog never ends
    ds = (orders.dataset().with_watermark("ts", "0s")
          .join_latest(rates.dataset(), on="cur", how="left")
          .window(ms.tumbling("1m"), on="ts").agg(ms.count().alias("n")))
    job = ds.start(checkpoint_interval=0)
    deadline = time.time() + 20
    while sum(r["n"] for r in job.sink.rows()) < 6 and time.time() < deadline:
        time.sleep(0.02)
    assert job.is_active  # the changelog is still open
    job.stop()
    assert sorted(r["n"] for r in job.sink.rows()) == [2, 2, 2]


# ----------------------------------------------------------------------------- stream-table


def _prices():
    return ms.from_items([{"k": k, "p": p} for k, p in [("a", 1), ("a", 2), ("b", 5), ("c", 7)]])


@pytest.mark.parametrize("how", ["inner", "left", "semi", "anti"])
def test_stream_joined_with_a_bounded_table(how, tmp_path):
    items = _side(5, "lt", "x", n_items=10, per_item=5, keys="abde")
    # the table side is any batch computation: here an aggregate
    table = _prices().group_by("k").agg(ms.sum("p").alias("p"))
    prices = {"a": 3, "b": 5, "c": 7}
    ds = _source(items, LSCHEMA, 2).dataset().join(table, on="k", how=how)
    job = ds.start(checkpoint=str(tmp_path / "chk"), checkpoint_interval=0, parallelism=2)
    assert job.await_termination(30)
    rows = [r for it in items for r in it]
    if how == "inner":
        expected = [{**r, "p": prices[r["k"]]} for r in rows if r["k"] in prices]
    elif how == "left":
        expected = [{**r, "p": prices.get(r["k"])} for r in rows]
    elif how == "semi":
        expected = [r for r in rows if r["k"] in prices]
    else:
        expected = [r for r in rows if r["k"] not in prices]
    assert _sorted(job.sink.rows()) == _sorted(expected)
    assert _sorted(ds.collect()) == _sorted(expected)
    if how == "left":  # a restarted job computes the table again and continues
        sink = CollectingSink()
        job = crash_and_restore(ds, checkpoint=str(tmp_path / "chk2"), sink=sink,
                                crash_epoch=4, point="after_checkpoint", checkpoint_interval=0)
        assert _sorted(sink.rows()) == _sorted(expected)


def test_stream_table_join_refuses_unbounded_right_sides_and_outer_joins():
    stream = _source(LEFT, LSCHEMA, 1).dataset()
    other = _source(RIGHT, RSCHEMA, 1, close=False).dataset()
    with pytest.raises(PlanError, match="interval_join"):
        stream.join(other, on="k").start(checkpoint_interval=0)
    with pytest.raises(PlanError, match="needs the end of the stream"):
        stream.join(_prices(), on="k", how="right").start(checkpoint_interval=0)


# ----------------------------------------------------------------------------- operator level


def test_interval_join_operator_snapshots_split_by_key_group_and_merge_back():
    def make():
        op = IntervalJoin(["k"], ["k"], -4_000_000, 6_000_000, "lt", "rt", how="outer")
        op.open(default_context())
        return op

    lkeys, rkeys = JoinKeys(["k"]), JoinKeys(["k"])

    def feed(ops, items, port, keys, schema):
        out = []
        for rows in items:
            b = next(iter(keys.process(pa.RecordBatch.from_pylist(rows, schema=schema))))
            for op in ops:
                out += op.process(b, port)
        return out

    def rows(batches):
        return _sorted(r for b in batches for r in b.to_pylist())

    half = len(LEFT) // 2
    whole = make()
    out = feed([whole], LEFT[:half], 0, lkeys, LSCHEMA) + feed([whole], RIGHT[:half], 1, rkeys,
                                                               RSCHEMA)
    out += whole.on_watermark(20_000_000)
    groups = whole.snapshot_by_key_group(8)
    assert len(groups) > 2 and all(g["key_group"] == k for k, g in groups.items())
    copy = make()
    copy.restore(whole.snapshot())
    # three new instances, each owning some key groups: every row goes to the owner of its
    # key group (a null key is in the group of the null hash)
    parts = [make() for _ in range(3)]
    for i, op in enumerate(parts):
        op.restore_key_groups([st for g, st in groups.items() if g % 3 == i])
    rest = []
    for ops in ([whole], [copy]):
        rest.append(feed(ops, LEFT[half:], 0, lkeys, LSCHEMA)
                    + feed(ops, RIGHT[half:], 1, rkeys, RSCHEMA) + list(ops[0].finish()))
    split = []
    for port, items, keys, schema in ((0, LEFT[half:], lkeys, LSCHEMA),
                                      (1, RIGHT[half:], rkeys, RSCHEMA)):
        for r in items:
            b = next(iter(keys.process(pa.RecordBatch.from_pylist(r, schema=schema))))
            g = key_hashes([b.column("__ms_jk0")], b.num_rows) % 8
            for i, op in enumerate(parts):
                mine = pa.array((g % 3) == i)
                split += op.process(b.filter(mine), port)
    for op in parts:
        split += op.finish()
    assert rows(rest[0]) == rows(rest[1]) == rows(split)
    assert rows(out + rest[0])  # something was joined


@pytest.mark.parametrize("executor", ["inline", "parallel"])
def test_stream_table_join_on_both_executors(executor):
    stream = ms.from_generator(lambda i: {"k": i % 3, "i": i}, count=10)
    table = ms.from_items([{"k": 0, "p": 1}, {"k": 0, "p": 2}, {"k": 1, "p": 5}])
    job = stream.join(table, on="k").start(executor=executor, checkpoint_interval=0,
                                           parallelism=2)
    assert job.await_termination(60)
    want = sorted((i, p) for i in range(10) for k, p in ((0, 1), (0, 2), (1, 5)) if i % 3 == k)
    assert sorted((r["i"], r["p"]) for r in job.sink.rows()) == want
