"""Streaming SQL: Flink's windowing table-valued functions (TUMBLE, HOP, CUMULATE, SESSION)
over a stream with a watermark, window aggregation, window Top-N, window and interval
joins; each as a streaming job and in batch with the same rows, checked against plain
Python; and the errors for what streams cannot do yet."""

from __future__ import annotations

import datetime as dt
from collections import Counter, defaultdict
from typing import Any

import pyarrow as pa
import pytest
from streams import wait_until

import millstream as ms
from millstream.testing import TestSource

E = dt.datetime(2024, 1, 1)
SCHEMA = pa.schema([("auction", pa.int64()), ("price", pa.int64()),
                    ("ts", pa.timestamp("us"))])
ROWS = [{"auction": i % 3, "price": (i * 37) % 100, "ts": E + dt.timedelta(seconds=i)}
        for i in range(60)]
OTHER = pa.schema([("auction", pa.int64()), ("seller", pa.string()),
                   ("at", pa.timestamp("us"))])
OTHER_ROWS = [{"auction": i % 3, "seller": f"s{i}", "at": E + dt.timedelta(seconds=2 * i + 1)}
              for i in range(30)]


def stream(rows=ROWS, schema=SCHEMA, column="ts") -> ms.Dataset:
    src = TestSource(schema=schema)
    for i in range(0, len(rows), 10):
        src.add(rows[i:i + 10])
    src.close()
    return src.dataset().with_watermark(column, "1m")


def both(query: str, **extra) -> tuple[list, list]:
    """(streaming rows, batch rows) of a query over ``bids`` (and ``extra`` streams)."""
    job = ms.sql(query, bids=stream(), **{k: v() for k, v in extra.items()}).start(
        checkpoint_interval=0)
    assert job.await_termination(60)
    assert job.late_records() == []
    streamed = job.sink.rows()
    batch = ms.sql(query, bids=stream(), **{k: v() for k, v in extra.items()}).collect()
    return streamed, batch


def norm(rows) -> list[tuple]:
    return sorted(tuple(r.values()) if isinstance(r, dict) else tuple(r) for r in rows)


def tumble_start(t: dt.datetime, seconds: int) -> dt.datetime:
    return E + dt.timedelta(seconds=int((t - E).total_seconds()) // seconds * seconds)


def test_tumble_window_aggregation():
    q = """SELECT auction, window_start, window_end, count(*) AS n, max(price) AS mp
           FROM TABLE(TUMBLE(TABLE bids, DESCRIPTOR(ts), INTERVAL '10' SECOND))
           GROUP BY auction, window_start, window_end"""
    streamed, batch = both(q)
    groups = defaultdict(list)
    for r in ROWS:
        groups[(r["auction"], tumble_start(r["ts"], 10))].append(r["price"])
    want = [(a, s, s + dt.timedelta(seconds=10), len(p), max(p)) for (a, s), p in groups.items()]
    assert norm(streamed) == norm(batch) == norm(want)


def test_hop_cumulate_and_session_windows():
    hop = """SELECT window_start, window_end, count(*) AS n FROM TABLE(HOP(DATA => TABLE bids,
             TIMECOL => DESCRIPTOR(ts), SLIDE => INTERVAL '5' SECOND,
             SIZE => INTERVAL '10' SECOND)) GROUP BY window_start, window_end"""
    streamed, batch = both(hop)
    assert norm(streamed) == norm(batch)
    assert all(r["n"] == 10 for r in batch if E <= r["window_start"]
               and r["window_end"] <= E + dt.timedelta(seconds=60))
    cumulate = """SELECT window_start, window_end, sum(price) AS s FROM TABLE(CUMULATE(
                  TABLE bids, DESCRIPTOR(ts), INTERVAL '5' SECOND, INTERVAL '20' SECOND))
                  GROUP BY window_start, window_end"""
    streamed, batch = both(cumulate)
    want = []
    for start in range(0, 60, 20):
        for end in range(start + 5, start + 21, 5):
            want.append((E + dt.timedelta(seconds=start), E + dt.timedelta(seconds=end),
                         sum(r["price"] for r in ROWS[start:end])))
    assert norm(streamed) == norm(batch) == norm(want)
    session = """SELECT auction, window_start, window_end, count(*) AS n FROM TABLE(
                 SESSION(TABLE bids PARTITION BY auction, DESCRIPTOR(ts), INTERVAL '4' SECOND))
                 GROUP BY auction, window_start, window_end"""
    streamed, batch = both(session)
    assert norm(streamed) == norm(batch)
    assert sorted(r["n"] for r in batch) == [20, 20, 20]  # 3 s apart: one session each


def test_window_columns_per_row_and_window_time():
    q = """SELECT auction, price, window_start, window_end, window_time FROM TABLE(
           TUMBLE(TABLE bids, DESCRIPTOR(ts), INTERVAL '10' SECOND)) WHERE price > 90"""
    streamed, batch = both(q)
    want = [(r["auction"], r["price"], tumble_start(r["ts"], 10),
             tumble_start(r["ts"], 10) + dt.timedelta(seconds=10),
             tumble_start(r["ts"], 10) + dt.timedelta(seconds=10, microseconds=-1))
            for r in ROWS if r["price"] > 90]
    assert norm(streamed) == norm(batch) == norm(want)


def test_window_top_n():
    q = """SELECT * FROM (
             SELECT auction, price, window_start, window_end,
                    ROW_NUMBER() OVER (PARTITION BY window_start, window_end
                                       ORDER BY price DESC) AS rownum
             FROM TABLE(TUMBLE(TABLE bids, DESCRIPTOR(ts), INTERVAL '10' SECOND)))
           WHERE rownum <= 2"""
    streamed, batch = both(q)
    want = []
    for start in range(0, 60, 10):
        top = sorted(ROWS[start:start + 10], key=lambda r: -r["price"])[:2]
        for i, r in enumerate(top, 1):
            want.append((r["auction"], r["price"], E + dt.timedelta(seconds=start),
                         E + dt.timedelta(seconds=start + 10), i))
    assert norm(streamed) == norm(batch) == norm(want)


def test_window_join_and_interval_join():
    window_join = """SELECT b.auction, b.price, o.seller, b.window_start FROM
        TABLE(TUMBLE(TABLE bids, DESCRIPTOR(ts), INTERVAL '10' SECOND)) b
        JOIN TABLE(TUMBLE(TABLE others, DESCRIPTOR(at), INTERVAL '10' SECOND)) o
        ON b.auction = o.auction AND b.window_start = o.window_start
           AND b.window_end = o.window_end"""
    others = lambda: stream(OTHER_ROWS, OTHER, "at")  # noqa: E731
    streamed, batch = both(window_join, others=others)
    want = [(b["auction"], b["price"], o["seller"], tumble_start(b["ts"], 10))
            for b in ROWS for o in OTHER_ROWS if b["auction"] == o["auction"]
            and tumble_start(b["ts"], 10) == tumble_start(o["at"], 10)]
    assert norm(streamed) == norm(batch) == norm(want)
    interval = """SELECT b.auction, b.price, o.seller FROM bids b, others o
        WHERE b.auction = o.auction
          AND o.at BETWEEN b.ts - INTERVAL '2' SECOND AND b.ts + INTERVAL '1' SECOND"""
    streamed, batch = both(interval, others=others)
    want = [(b["auction"], b["price"], o["seller"]) for b in ROWS for o in OTHER_ROWS
            if b["auction"] == o["auction"]
            and b["ts"] - dt.timedelta(seconds=2) <= o["at"] <= b["ts"] + dt.timedelta(seconds=1)]
    assert norm(streamed) == norm(batch) == norm(want)


def test_a_group_by_over_a_stream_without_a_window_is_a_changelog():
    """Each group's row is updated as rows arrive; the last values are the batch answer."""
    query = ("select auction, count(*) as n, sum(price) as s, max(price) as top from bids "
             "group by auction having count(*) > 5")
    job = ms.sql(query, bids=stream()).start(checkpoint_interval=0)
    assert job.await_termination(60)
    got = job.sink.final_rows(["auction"])
    assert norm(got) == norm(ms.sql(query, bids=stream()).collect())
    assert len(job.sink.rows()) > len(got)  # earlier values were updated


def changelog(query: str, keys: list[str] | None, executor: str) -> tuple[list, list, Any]:
    """(final rows of the streaming job's changelog, batch rows, the job) of ``query``."""
    job = ms.sql(query, bids=stream()).start(
        checkpoint_interval=0 if executor == "inline" else "50ms", executor=executor,
        parallelism=2)
    assert job.await_termination(120)
    final = job.sink.final_rows(keys)
    if keys:  # every retraction took back a row that was there
        assert rounded(job.sink.final_rows()) == rounded(final)
    return final, ms.sql(query, bids=stream()).collect(), job


def rounded(rows) -> list[tuple]:
    return norm([{k: round(v, 9) if isinstance(v, float) else v for k, v in r.items()}
                 for r in rows])


def test_select_distinct_on_a_stream_and_on_a_changelog(executor):
    q = "select distinct auction, price % 4 as p from bids"
    final, batch, _ = changelog(q, None, executor)
    assert norm(final) == norm(batch) and len(batch) == 12
    # over an aggregate's updates: a count leaves the distinct rows when no group has it
    q = ("select distinct c from (select price % 10 as p, count(*) as c from bids "
         "group by price % 10)")
    final, batch, job = changelog(q, ["c"], executor)
    assert norm(final) == norm(batch)
    assert any(r["change"] == "-D" for r in job.sink.rows())


def test_row_number_top_n_on_a_stream_without_a_window(executor):
    q = ("select * from (select *, row_number() over (partition by auction order by price "
         "desc) as rn from bids) where rn <= 3")
    final, batch, job = changelog(q, ["auction", "rn"], executor)
    assert "TopN" in " ".join(job.metrics()["operators"])
    assert norm(final) == norm(batch) and len(batch) == 9
    want = [(a, p, t, i + 1) for a in range(3) for i, (p, t) in enumerate(sorted(
        ((r["price"], r["ts"]) for r in ROWS if r["auction"] == a), reverse=True)[:3])]
    assert norm(final) == sorted(want)
    # over an aggregate (its sums change, so keys leave the top), no PARTITION BY
    q = ("select a, s, rn from (select a, s, row_number() over (order by s desc) as rn "
         "from (select price % 7 as a, sum(price) as s from bids group by price % 7)) "
         "where rn <= 2")
    final, batch, _ = changelog(q, ["rn"], executor)
    assert norm(final) == norm(batch) and len(batch) == 2


def test_aggregates_over_the_changelog_of_an_aggregate(executor):
    q = ("select n, count(*) as c, sum(s) as s, stddev(s) as sd, median(s) as m, "
         "any_value(n) as an, max(top) as top from (select price % 7 as p, count(*) as n, "
         "sum(price) as s, max(price) as top from bids group by price % 7) group by n")
    final, batch, job = changelog(q, ["n"], executor)
    assert rounded(final) == rounded(batch)
    assert any(r["change"] == "-U" for r in job.sink.rows())  # retractions flowed
    q = ("select auction, stddev(price) as sd, var_pop(price) as v, median(price) as m, "
         "percentile_cont(0.9) within group (order by price) as p9, "
         "approx_count_distinct(price % 10) as d from bids group by auction")
    final, batch, _ = changelog(q, ["auction"], executor)
    assert rounded(final) == rounded(batch)


def test_a_sketch_over_a_changelog_is_refused_naming_the_exact_aggregate():
    ds = ms.sql("select approx_count_distinct(n) as d from (select auction, count(*) as n "
                "from bids group by auction)", bids=stream())
    with pytest.raises(ms.PlanError, match=r"approx_count_distinct\(col\(\"n\"\)\) keeps a sketch.*"
                                           r"use the exact count_distinct"):
        ds.start(checkpoint_interval=0)
    assert ds.collect() == [{"d": 1}]  # batch: final results, fine


def _folded(rows) -> list[tuple]:
    """The rows a changelog leaves (rows without a ``change`` column are inserts)."""
    held: Counter = Counter()
    for r in rows:
        r = dict(r)
        sign = -1 if r.pop("change", "+I") in ("-U", "-D") else 1
        held[tuple(r.values())] += sign
    assert all(v >= 0 for v in held.values())
    return sorted((k for k, v in held.items() for _ in range(v)), key=repr)


@pytest.mark.parametrize("how", ["INNER", "LEFT", "FULL"])
def test_a_join_of_two_streams_on_keys_is_a_regular_join(how):
    """Equal keys alone (and a residual condition): a regular join of the two streams;
    outer ones emit updates (a padded row taken back when its partner comes)."""
    others = [r for r in OTHER_ROWS if r["auction"] != 2]
    q = f"""SELECT b.auction, b.price, o.seller FROM bids b {how} JOIN others o
            ON b.auction = o.auction AND o.seller <> 's3'"""

    def make():
        return ms.sql(q, bids=stream(), others=stream(others, OTHER, "at"))

    job = make().start(checkpoint_interval=0)
    assert job.await_termination(60)
    streamed = job.sink.rows()
    if how == "INNER":
        assert all(r.get("change", "+I") == "+I" for r in streamed)
    want = []
    for b in ROWS:
        matched = [o for o in others if o["auction"] == b["auction"] and o["seller"] != "s3"]
        want += [(b["auction"], b["price"], o["seller"]) for o in matched]
        if not matched and how != "INNER":
            want.append((b["auction"], b["price"], None))
    if how == "FULL":
        want.append((None, None, "s3"))
    want = sorted(want, key=repr)
    assert _folded(streamed) == want
    assert sorted((tuple(r.values()) for r in make().collect()), key=repr) == want


def test_streams_refuse_what_needs_an_end_with_a_clear_error():
    with pytest.raises(ms.SQLError, match="a join of two streams needs equal keys"):
        ms.sql("select * from bids b cross join others o",
               bids=stream(), others=stream(OTHER_ROWS, OTHER, "at"))
    with pytest.raises(ms.SQLError, match="ORDER BY on a stream is not supported"):
        ms.sql("select * from bids order by price", bids=stream())
    with pytest.raises(ms.SQLError, match="SESSION windows are only defined for a GROUP BY"):
        ms.sql("select * from table(session(table bids, descriptor(ts), interval '1' second))",
               bids=stream())
    with pytest.raises(ms.SQLError, match="the time column is given as DESCRIPTOR"):
        ms.sql("select * from table(tumble(table bids, ts, interval '1' second))",
               bids=stream())


def test_set_state_ttl_bounds_the_regular_joins_of_later_queries():
    """``SET state_ttl`` (Flink's ``table.exec.state.ttl``): the regular stream joins of
    later queries drop rows that arrived longer ago (processing time here, as neither
    input has a watermark); RESET takes it back; bounded joins are left alone."""
    from millstream.core.time import VirtualClock

    lschema = pa.schema([("k", pa.string()), ("x", pa.int64())])
    rschema = pa.schema([("k", pa.string()), ("y", pa.int64())])
    q = "SELECT l.k, l.x, r.y FROM l JOIN r ON l.k = r.k"
    try:
        assert ms.sql("SET state_ttl = '10s'") is None
        left, right = TestSource(schema=lschema), TestSource(schema=rschema)
        ds = ms.sql(q, l=left.dataset(), r=right.dataset())
        assert "state_ttl=10s" in ds.explain(print_plan=False)
        bounded = ms.sql(q, l=pa.table({"k": ["a"], "x": [1]}),
                         r=pa.table({"k": ["a"], "y": [2]}))
        assert "state_ttl" not in bounded.explain(print_plan=False)
        clock = VirtualClock(1_000_000)
        job = ds.start(checkpoint_interval=0, clock=clock, executor="inline")
        left.add([{"k": "a", "x": 1}])
        right.add([{"k": "a", "y": 1}])
        assert wait_until(lambda: len(job.sink.rows()) == 1)
        clock.advance(11_000_000)
        right.add([{"k": "a", "y": 2}])                 # x=1 expired
        left.add([{"k": "a", "x": 3}])                  # meets y=2 only
        assert wait_until(lambda: len(job.sink.rows()) == 2)
        left.close()
        right.close()
        assert job.await_termination(30)
        assert sorted((r["x"], r["y"]) for r in job.sink.rows()) == [(1, 1), (3, 2)]
        # Flink's name and units; a number is milliseconds, as there
        ms.sql("SET 'table.exec.state.ttl' = '2 h'")
        again = ms.sql(q, l=TestSource(schema=lschema).dataset(),
                       r=TestSource(schema=rschema).dataset())
        assert "state_ttl=2h" in again.explain(print_plan=False)
        ms.sql("SET state_ttl = 90000")
        assert "state_ttl=90s" in ms.sql(q, l=TestSource(schema=lschema).dataset(),
                                          r=TestSource(schema=rschema).dataset()).explain(
            print_plan=False)
        ms.sql("RESET state_ttl")
        plain = ms.sql(q, l=TestSource(schema=lschema).dataset(),
                       r=TestSource(schema=rschema).dataset())
        assert "state_ttl" not in plain.explain(print_plan=False)
        with pytest.raises(ms.SQLError, match="unknown setting 'nope'.*state_ttl"):
            ms.sql("SET nope = '1h'")
        with pytest.raises(ms.SQLError, match="cannot read the duration 'soon'"):
            ms.sql("SET state_ttl = 'soon'")
    finally:
        ms.sql("RESET")

