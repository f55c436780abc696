"""Runtime join filters: when the smaller side of a shuffle join has run and is too big to
broadcast, the other side keeps only the rows whose keys are among the smaller side's
before it is shuffled (where the join type lets its unmatched rows go). Results equal
DuckDB's with the filter and without it (a forced shuffle join has none)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from oracles import duckdb_connect

import millstream as ms
from millstream.ops.join.runtime_filter import DROPPED_COUNTER, KeyFilter, KeyMembership

THRESHOLD = 8 << 10  # the small side (2000 rows) is over it: no broadcast


@pytest.fixture(scope="module")
def tables():
    n = 60_000
    big = pa.table({"k": [None if i % 997 == 0 else i % 1000 for i in range(n)],
                    "x": list(range(n))})
    small = pa.table({"k2": [None if i % 50 == 0 else i * 10 % 2000 for i in range(2000)],
                      "y": [i % 7 for i in range(2000)]})
    return big, small


def duck(query: str, **tables: pa.Table) -> list[tuple]:
    con = duckdb_connect()
    try:
        for name, t in tables.items():
            con.register(name, t)
        return sorted(con.sql(query).fetchall(), key=repr)
    finally:
        con.close()


def rows(got: list[dict], cols: list[str]) -> list[tuple]:
    return sorted((tuple(r[c] for c in cols) for r in got), key=repr)


# (how, side the small table is on, whether the big side can be filtered)
CASES = [("inner", "right", True), ("left", "right", False), ("semi", "right", True),
         ("anti", "right", False), ("inner", "left", True), ("semi", "left", True),
         ("anti", "left", True), ("left", "left", True), ("right", "left", False)]


@pytest.mark.parametrize("how,small_on,filtered", CASES)
def test_runtime_filter_drops_big_side_rows_and_keeps_results(tables, how, small_on, filtered):
    big, small = tables
    b = ms.from_arrow(big, num_partitions=2)
    s = ms.from_arrow(small, num_partitions=2)
    if small_on == "right":
        q = b.join(s, left_on="k", right_on="k2", how=how)
        sql = f"SELECT * FROM big {how.upper()} JOIN small ON k = k2"
    else:
        q = s.join(b, left_on="k2", right_on="k", how=how)
        sql = f"SELECT * FROM small {how.upper()} JOIN big ON k2 = k"
    got = q.collect(broadcast_threshold=THRESHOLD, shuffle_partitions=3)
    stats = ms.last_job_stats()
    notes = [n for n in stats.notes if n.startswith("runtime filter")]
    dropped = stats.counters.get(DROPPED_COUNTER, 0)
    assert bool(notes) == filtered, stats.notes
    assert (dropped > 0) == filtered
    if filtered:
        assert "runtime filter" in stats.explain()
    cols = list(q.columns)
    want = duck(sql, big=big, small=small)
    assert rows(got, cols) == want
    # the same join forced to shuffle without adaptive execution: no filter, same rows
    if how != "right" or small_on != "left":
        forced = (b.join(s, left_on="k", right_on="k2", how=how, broadcast=False)
                  if small_on == "right" else
                  s.join(b, left_on="k2", right_on="k", how=how, broadcast=False))
        assert rows(forced.collect(broadcast_threshold=THRESHOLD), cols) == want
        assert DROPPED_COUNTER not in ms.last_job_stats().counters


def test_key_membership_handles_nulls_ranges_and_other_types():
    ints = KeyMembership(pa.chunked_array([pa.array([5, None, 7]), pa.array([1 << 40])]))
    assert ints.bitmap is None  # (a range too wide for a bitmap: a hash set)
    got = ints.contains(pa.array([5, 6, None, 1 << 40, -3], pa.int64()))
    assert got.tolist() == [True, False, False, True, False]
    narrow = KeyMembership(pa.chunked_array([pa.array([3, 9, None], pa.int32())]))
    assert narrow.bitmap is not None
    got = narrow.contains(pa.array([9, 2, None, 100, -1], pa.int64()))
    assert got.tolist() == [True, False, False, False, False]
    assert KeyMembership(pa.chunked_array([], pa.int64())).contains(pa.array([1])).tolist() == [False]
    strings = KeyMembership(pa.chunked_array([pa.array(["a", None, "c"])]))
    got = strings.contains(pa.array(["c", "b", None]))
    assert got.tolist() == [True, False, False]
    op = KeyFilter(["k"], ["k2"], blocks=[])
    op.open(None)
    # no block, so no key column to know the keys by: the rows pass (a filter never guesses)
    assert op.process(pa.record_batch({"k": [1, 2]}))[0].num_rows == 2


def test_key_membership_never_rehashes_its_keys_per_batch(monkeypatch):
    """A key range too wide for a byte a value gets a bit a value, and wider ranges and
    strings a join index built once: Arrow's is_in (which hashes the whole key set again
    on every call: 30 s on TPC-H SF10 Q4, whose order keys span 60M values) is not used."""
    from millstream.ops.join import runtime_filter as rf

    def no_is_in(*args, **kwargs):
        raise AssertionError("is_in called per batch")

    monkeypatch.setattr(rf, "_MAX_BITMAP", 64)
    monkeypatch.setattr(rf, "_MAX_BITS", 1 << 12)
    monkeypatch.setattr(rf.pc, "is_in", no_is_in)
    rng = np.random.default_rng(3)
    keys = rng.choice(3000, 200, replace=False) + 17
    probe = np.append(rng.integers(-5, 3100, 5000), [17, 3016]).astype(np.int64)
    bits = KeyMembership(pa.chunked_array([pa.array(keys[:90]), pa.array(keys[90:])]))
    assert bits.packed and len(bits.bitmap) <= 3000 // 8 + 1
    want = np.isin(probe, keys)
    for arr in (pa.array(probe), pa.array(probe, pa.int32())):
        assert bits.contains(arr).tolist() == want.tolist()
    with_null = bits.contains(pa.array([int(keys[0]), None], pa.int64()))
    assert with_null.tolist() == [True, False]
    wide = KeyMembership(pa.chunked_array([pa.array(keys * 10_000)]))
    assert wide.bitmap is None and wide.index is not None
    assert wide.contains(pa.array(probe * 10_000)).tolist() == want.tolist()
    assert wide.contains(pa.array([None, int(keys[1]) * 10_000], pa.int64())).tolist() \
        == [False, True]
    words = KeyMembership(pa.chunked_array([pa.array([f"k{k}" for k in keys], pa.string_view())]))
    assert words.index is not None
    got = words.contains(pa.array([f"k{k}" for k in probe] + [None], pa.large_string()))
    assert got.tolist() == want.tolist() + [False]


def test_a_filter_that_drops_nothing_stops_testing(monkeypatch):
    """Once a task has tested TRIAL_ROWS rows and dropped almost none (every key of a
    foreign-key join matches), the rest pass untested."""
    from millstream.ops.join import runtime_filter as rf

    monkeypatch.setattr(rf, "TRIAL_ROWS", 100)
    op = KeyFilter(["k"], ["k"])
    op.sets = [KeyMembership(pa.chunked_array([pa.array(list(range(50)))]))]
    tested = []
    real = KeyMembership.contains
    monkeypatch.setattr(KeyMembership, "contains", lambda s, a: tested.append(len(a)) or real(s, a))
    batch = pa.record_batch({"k": list(range(40))})
    outs = [op.process(batch)[0].num_rows for _ in range(5)]
    assert outs == [40] * 5 and tested == [40, 40, 40]
    # a selective filter keeps testing
    op2 = KeyFilter(["k"], ["k"])
    op2.sets = [KeyMembership(pa.chunked_array([pa.array([1, 2])]))]
    assert [op2.process(batch)[0].num_rows for _ in range(5)] == [2] * 5
    assert op2.dropped == 5 * 38


def test_no_runtime_filter_when_the_small_side_has_every_key():
    """A join against a whole key table (every big-side key is among the small side's, as
    a foreign key into its table) plans no runtime filter: it would drop nothing."""
    from millstream.runtime import actions
    from millstream.runtime.session import effective_settings

    keys = pa.table({"k2": list(range(1000)), "y": [i % 7 for i in range(1000)]})
    big = pa.table({"k": [i % 1000 for i in range(60_000)], "x": list(range(60_000))})
    q = ms.from_arrow(big, num_partitions=2).join(ms.from_arrow(keys), left_on="k", right_on="k2")
    q.collect(broadcast_threshold=1 << 10)
    assert not any("runtime filter" in n for n in ms.last_job_stats().notes)
    text = actions.explain(q._node, effective_settings({"broadcast_threshold": 1 << 10}))
    assert "adaptive: may switch to broadcast)" in text
    # the same join against a tenth of the keys: a filter is planned
    few = ms.from_arrow(keys).filter(ms.col("k2") < 100)
    q = ms.from_arrow(big, num_partitions=2).join(few, left_on="k", right_on="k2")
    text = actions.explain(q._node, effective_settings({"broadcast_threshold": 1 << 10}))
    assert "or filter a side by the other's keys" in text


def test_the_small_side_is_read_for_its_keys_only(tmp_path):
    """A materialized small side is decoded for its key columns only (its other columns are
    neither decompressed nor held); an empty block still gives the key's type."""
    from millstream.core.shuffle import BlockRef
    from millstream.ops.join import runtime_filter as rf

    t = pa.table({"name": [f"row {i}" for i in range(3000)], "k": [i * 3 for i in range(3000)],
                  "v": [float(i) for i in range(3000)]})
    path = str(tmp_path / "block")
    with pa.OSFile(path, "wb") as f:
        w = pa.ipc.new_stream(f, t.schema, options=pa.ipc.IpcWriteOptions(compression="lz4"))
        for b in t.to_batches(1000):
            w.write_batch(b)
        w.close()
    got = list(rf._key_batches(BlockRef(path, 3000, 0, t.schema.names), ["k"]))
    assert {tuple(b.schema.names) for b in got} == {("k",)}
    assert sum(b.num_rows for b in got) == 3000
    sets = rf._Sets().get([BlockRef(path, 3000, 0, t.schema.names)], ["k"])
    assert sets[0].contains(pa.array([3, 4, 8997])).tolist() == [True, False, True]
    empty = str(tmp_path / "empty")
    with pa.OSFile(empty, "wb") as f:
        pa.ipc.new_stream(f, t.schema).close()
    got = list(rf._key_batches(BlockRef(empty, 0, 0, t.schema.names), ["k"]))
    assert [b.schema.names for b in got] == [["k"]] and got[0].num_rows == 0
