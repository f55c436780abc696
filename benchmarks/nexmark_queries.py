"""Nexmark queries q0-q8 in Millstream's Dataset API, their DuckDB oracles, and the
order-free checksum by which a query's result is compared with its oracle's.

The queries follow the Flink/Beam Nexmark definitions (event times are int64 epoch ms):

- q0 pass-through of bids; q1 price in euros (``0.908 * price``); q2 bids of auctions
  whose id is a multiple of 123;
- q3 local item suggestions: auctions of category 10 whose seller lives in OR, ID or CA
  (a regular join of two streams, ``join`` with a state TTL);
- q4 average winning price per category: bids join their auction while it is open
  (an interval join, then the auction's expiry), the highest bid per auction, its average
  per category (aggregates that update, changelog);
- q5 hot items: bids per auction in sliding windows (10 s every 2 s), the auctions with
  the most bids of each window;
- q6 average winning price of each seller's last 10 auctions (``top_n`` over the
  updating winning prices, then the average per seller, changelog);
- q7 highest bid of each 10 s tumbling window (Flink: the window's maximum joined back
  with the bids of ``[window_end - 10 s, window_end]``);
- q8 new users: people who opened an auction in the 10 s tumbling window in which they
  registered (a window join).

The oracles are SQL over the same events with the windows written out (DuckDB), and
compare final results; an updating result is compared by the rows its changes leave.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

QUERIES = ("q0", "q1", "q2", "q3", "q4", "q5", "q6", "q7", "q8")
#: event kinds each query reads
INPUTS = {"q0": ("bid",), "q1": ("bid",), "q2": ("bid",), "q3": ("person", "auction"),
          "q4": ("auction", "bid"), "q5": ("bid",), "q6": ("auction", "bid"),
          "q7": ("bid",), "q8": ("person", "auction")}
#: what a query needs that Millstream may not have yet (reported as "unsupported: ...")
NEEDS = {"q3": "regular stream-stream join (branch stream-joins2)",
         "q4": "non-windowed aggregate of a stream, changelog (branch changelog)",
         "q6": "top_n and non-windowed aggregates of a stream, changelog (branch changelog)"}
AUCTION_SKIP = 123
EURO = 0.908
TS = pa.timestamp("us")


# =========================================================================== checksums

_K = [np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F),
      np.uint64(0x165667B19E3779F9), np.uint64(0xD6E8FEB86659FD93)]
_MASK = (1 << 64) - 1
#: the columns a changelog row's kind comes in (hidden int8, or visible "+I"/"-U"/...)
HIDDEN_CHANGE, VISIBLE_CHANGE = "__ms_change", "change"


def _mix(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _signs(batch: pa.RecordBatch | pa.Table) -> np.ndarray | None:
    """+1 for inserts (+I, +U), -1 for retractions (-U, -D); None: all inserts."""
    names = batch.schema.names
    if HIDDEN_CHANGE in names:
        k = np.asarray(batch.column(HIDDEN_CHANGE).fill_null(0), dtype=np.int8)
        return np.where((k == 1) | (k == 3), -1, 1).astype(np.int64)
    if VISIBLE_CHANGE in names:
        k = np.asarray(batch.column(VISIBLE_CHANGE).to_pylist(), dtype=object)
        return np.where((k == "-U") | (k == "-D"), -1, 1).astype(np.int64)
    return None


def _as_int(col: Any) -> tuple[np.ndarray, str]:
    """A column as int64 for the checksum: integers as they are, times in epoch ms,
    floats in thousandths (rounded), strings by their length; and the column's kind."""
    t = col.type
    if pa.types.is_timestamp(t):
        ms = pc.cast(pc.cast(col, pa.timestamp("ms")), pa.int64())
        return np.asarray(ms.fill_null(0), dtype=np.int64), "int"
    if pa.types.is_floating(t):
        v = np.asarray(col.fill_null(0), dtype=np.float64)
        return np.round(v * 1000.0).astype(np.int64), "float"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return np.asarray(pc.utf8_length(col).fill_null(0), dtype=np.int64), "str"
    if pa.types.is_decimal(t):
        v = np.asarray(pc.cast(col, pa.float64()).fill_null(0), dtype=np.float64)
        return np.round(v * 1000.0).astype(np.int64), "float"
    return np.asarray(pc.cast(col, pa.int64()).fill_null(0), dtype=np.int64), "int"


def checksum_part(batch: pa.RecordBatch | pa.Table) -> dict[str, Any]:
    """The additive checksum of a batch of result rows (retractions count negatively):
    rows, per column the sum of its values (floats in thousandths, strings' lengths), and
    a multiset hash of the rows (a sum of row hashes modulo 2**64), so that any order and
    any split into batches, and a changelog and the rows it leaves, give the same value."""
    signs = _signs(batch)
    cols = [n for n in batch.schema.names if n not in (HIDDEN_CHANGE, VISIBLE_CHANGE)]
    n = batch.num_rows
    h = np.zeros(n, dtype=np.uint64)
    sums = []
    for j, name in enumerate(cols):
        v, _kind = _as_int(batch.column(name))
        h = _mix(h + v.astype(np.uint64) * _K[j % 4] + np.uint64(j))
        sums.append(int((v * signs).sum()) if signs is not None else int(v.sum()))
    if signs is not None:
        rows = int(signs.sum())
        hsum = (int(h[signs > 0].sum(dtype=np.uint64)) - int(h[signs < 0].sum(dtype=np.uint64)))
    else:
        rows = n
        hsum = int(h.sum(dtype=np.uint64))
    return {"rows": rows, "sums": sums, "hash": hsum & _MASK, "columns": cols}


def checksum_add(a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
    """The checksum of the rows of both (``a`` None: empty)."""
    if a is None or not a.get("columns"):
        return dict(b)
    if not b.get("columns"):
        return dict(a)
    return {"rows": a["rows"] + b["rows"], "sums": [x + y for x, y in zip(a["sums"], b["sums"])],
            "hash": (a["hash"] + b["hash"]) & _MASK, "columns": a["columns"]}


def checksum_table(table: pa.Table) -> dict[str, Any]:
    """The checksum of a whole result."""
    out: dict[str, Any] = {"rows": 0, "sums": [0] * len(table.schema.names), "hash": 0,
                           "columns": [n for n in table.schema.names
                                       if n not in (HIDDEN_CHANGE, VISIBLE_CHANGE)]}
    for b in table.to_batches():
        out = checksum_add(out, checksum_part(b))
    out["sums"] = out["sums"][:len(out["columns"])]
    return out


def compare(expected: dict[str, Any], got: dict[str, Any]) -> list[str]:
    """What differs between two checksums (columns by position: names may differ)."""
    problems = []
    if expected["rows"] != got["rows"]:
        problems.append(f"rows: expected {expected['rows']}, got {got['rows']}")
    if len(expected["sums"]) != len(got["sums"]):
        problems.append(f"columns: expected {expected['columns']}, got {got['columns']}")
    else:
        for name, e, g in zip(expected["columns"], expected["sums"], got["sums"]):
            if e != g:
                problems.append(f"sum of {name}: expected {e}, got {g}")
    if expected["hash"] != got["hash"] and not problems:
        problems.append("row hash differs (same counts and sums)")
    return problems


# =========================================================================== Millstream


@dataclass
class Streams:
    """The three event streams of a run, as Millstream Datasets with watermarks."""

    make: Callable[[str], Any]  #: kind -> Dataset (without watermark)
    delay: str  #: the watermark delay (covers the generator's out-of-orderness)

    def person(self) -> Any:
        return self.make("person").with_watermark("date_time", self.delay)

    def auction(self) -> Any:
        return self.make("auction").with_watermark("date_time", self.delay)

    def bid(self) -> Any:
        return self.make("bid").with_watermark("date_time", self.delay)


def _before_end(ms: Any, column: str) -> Any:
    """``column`` (a window end) minus 1 µs: a time inside the window, so that a
    window's result can be windowed or window-joined again without being late."""
    return (ms.col(column).cast(pa.int64()) - 1).cast(TS)


def _join_kwargs(ttl: str) -> dict[str, Any]:
    """``state_ttl=`` for ``Dataset.join`` of two streams (a regular stream join). Without
    it, a bounded right side would be read whole first and broadcast (a stream-table join,
    not what q3 measures): refuse."""
    import millstream as ms

    if "state_ttl" not in inspect.signature(ms.Dataset.join).parameters:
        raise NotImplementedError("Dataset.join takes no state_ttl: no regular join of two "
                                  "streams (a bounded right side would be a broadcast table)")
    return {"state_ttl": ttl}


def _winning(ms: Any, s: Streams, max_auction_ms: int, extra: tuple[str, ...]) -> Any:
    """The highest bid on each auction placed while it was open (Nexmark's winning bids)."""
    auctions = s.auction().select("id", "date_time", "expires", *extra)
    bids = s.bid().select("auction", "price", "date_time")
    joined = auctions.interval_join(bids, left_on="id", right_on="auction",
                                    between=("0ms", f"{max_auction_ms}ms"))
    return (joined.filter(ms.col("date_time_right") <= ms.col("expires"))
            .group_by("id", "expires", *extra).agg(ms.max("price").alias("final")))


def millstream_query(q: str, s: Streams, max_auction_ms: int, stamp: bool = False) -> Any:
    """Query ``q`` as a Millstream Dataset over the streams ``s`` (``stamp``: bids carry
    ``ingest_ns`` and q0/q1 keep it, for latency)."""
    import millstream as ms

    keep = ("ingest_ns",) if stamp else ()
    if q == "q0":
        return s.bid().select("auction", "bidder", "price", "date_time", "extra", *keep)
    if q == "q1":
        return s.bid().select("auction", "bidder", (ms.col("price") * EURO).alias("price"),
                              "date_time", "extra", *keep)
    if q == "q2":
        return s.bid().filter(ms.col("auction") % AUCTION_SKIP == 0).select("auction", "price")
    if q == "q3":
        auctions = s.auction().filter(ms.col("category") == 10).select("id", "seller")
        people = (s.person().filter(ms.col("state").is_in(["OR", "ID", "CA"]))
                  .select(ms.col("id").alias("pid"), "name", "city", "state"))
        return (auctions.join(people, left_on="seller", right_on="pid", **_join_kwargs("1h"))
                .select("name", "city", "state", "id"))
    if q == "q4":
        return (_winning(ms, s, max_auction_ms, ("category",))
                .group_by("category").agg(ms.mean("final").alias("avg_price")))
    if q == "q5":
        counts = (s.bid().group_by("auction").window(ms.sliding("10s", every="2s"))
                  .agg(ms.count().alias("num"))
                  .rename({"window_start": "starttime", "window_end": "endtime"})
                  .with_columns(_before_end(ms, "endtime").alias("t")))
        most = (counts.group_by("endtime").window(ms.tumbling("2s"), on="t")
                .agg(ms.max("num").alias("maxn"))
                .select("endtime", "maxn", _before_end(ms, "endtime").alias("t")))
        return (counts.window_join(most, on="endtime", window=ms.tumbling("2s"),
                                   left_time="t", right_time="t")
                .filter(ms.col("num") >= ms.col("maxn"))
                .select("auction", "num", "starttime", "endtime"))
    if q == "q6":
        last10 = _winning(ms, s, max_auction_ms, ("seller",)).top_n(
            10, by=["expires", "id"], per="seller", descending=[True, True])
        return last10.group_by("seller").agg(ms.mean("final").alias("avg_price"))
    if q == "q7":
        bids = s.bid()
        highest = (bids.window(ms.tumbling("10s")).agg(ms.max("price").alias("maxprice"))
                   .select("maxprice", "window_end"))
        return (bids.select("auction", "price", "bidder", "date_time", "extra")
                .interval_join(highest, left_on="price", right_on="maxprice",
                               between=("0s", "10s"), right_time="window_end")
                .select("auction", "price", "bidder", "date_time", "extra"))
    if q == "q8":
        sellers = (s.auction().group_by("seller").window(ms.tumbling("10s"))
                   .agg(ms.count().alias("n"))
                   .select("seller", _before_end(ms, "window_end").alias("t")))
        return (s.person().select("id", "name", "date_time")
                .window_join(sellers, left_on="id", right_on="seller",
                             window=ms.tumbling("10s"), right_time="t")
                .select("id", "name", ms.col("window_start").alias("starttime")))
    raise ValueError(f"unknown query {q!r}")


# =========================================================================== oracles


def oracle_sql(q: str, max_auction_ms: int) -> str:
    """The DuckDB SQL of query ``q`` over tables person, auction and bid (times in ms)."""
    winning = """
        SELECT a.id, a.category, a.seller, a.expires, max(b.price) AS final
        FROM auction a JOIN bid b ON a.id = b.auction
         AND b.date_time BETWEEN a.date_time AND a.expires
        GROUP BY a.id, a.category, a.seller, a.expires"""
    sqls = {
        "q0": "SELECT auction, bidder, price, date_time, extra FROM bid",
        "q1": f"SELECT auction, bidder, price * {EURO}::DOUBLE AS price, date_time, extra "
              "FROM bid",
        "q2": f"SELECT auction, price FROM bid WHERE auction % {AUCTION_SKIP} = 0",
        "q3": """SELECT p.name, p.city, p.state, a.id FROM auction a JOIN person p
                 ON a.seller = p.id WHERE a.category = 10 AND p.state IN ('OR', 'ID', 'CA')""",
        "q4": f"""WITH w AS ({winning})
                  SELECT category, avg(final) AS avg_price FROM w GROUP BY category""",
        # sliding windows of 10 s every 2 s: a bid at t is in the windows starting at
        # floor(t / 2 s) * 2 s - k * 2 s, k = 0..4
        "q5": """WITH s AS (SELECT b.auction, (b.date_time // 2000) * 2000 - k.k * 2000 AS st
                            FROM bid b, range(0, 5) k(k)),
                      c AS (SELECT auction, st, count(*) AS num FROM s GROUP BY auction, st),
                      m AS (SELECT st, max(num) AS maxn FROM c GROUP BY st)
                 SELECT c.auction, c.num, c.st AS starttime, c.st + 10000 AS endtime
                 FROM c JOIN m ON c.st = m.st WHERE c.num >= m.maxn""",
        "q6": f"""WITH w AS ({winning}),
                  r AS (SELECT *, row_number() OVER (PARTITION BY seller
                                  ORDER BY expires DESC, id DESC) AS rn FROM w)
                  SELECT seller, avg(final) AS avg_price FROM r WHERE rn <= 10
                  GROUP BY seller""",
        # tumbling windows of 10 s: the highest price of each, joined back with the bids
        # of [window_end - 10 s, window_end] (Flink's BETWEEN, both ends included)
        "q7": """WITH m AS (SELECT (date_time // 10000) * 10000 + 10000 AS we,
                                   max(price) AS maxprice FROM bid GROUP BY 1)
                 SELECT b.auction, b.price, b.bidder, b.date_time, b.extra
                 FROM bid b JOIN m ON b.price = m.maxprice
                  AND b.date_time BETWEEN m.we - 10000 AND m.we""",
        "q8": """WITH p AS (SELECT id, name, (date_time // 10000) * 10000 AS ws FROM person),
                      a AS (SELECT DISTINCT seller, (date_time // 10000) * 10000 AS ws
                            FROM auction)
                 SELECT p.id, p.name, p.ws AS starttime
                 FROM p JOIN a ON p.id = a.seller AND p.ws = a.ws""",
    }
    return sqls[q]


def oracle(q: str, paths: dict[str, str], max_auction_ms: int) -> dict[str, Any]:
    """Query ``q``'s checksum computed by DuckDB over the events' Parquet files."""
    import duckdb

    con = duckdb.connect()
    try:
        for kind, path in paths.items():
            con.execute(f"CREATE VIEW {kind} AS SELECT * FROM read_parquet('{path}')")
        table = con.execute(oracle_sql(q, max_auction_ms)).to_arrow_table()
    finally:
        con.close()
    return checksum_table(table)
