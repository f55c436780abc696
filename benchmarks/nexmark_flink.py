"""Nexmark on PyFlink's local mini-cluster: Flink SQL's Nexmark texts over the events' CSV files.

Run by ``nexmark.py`` with the interpreter of a virtualenv that has ``apache-flink`` (and
``psutil``): ``python nexmark_flink.py --query q5 --data DIR --result-file OUT``. The
tables ``person``, ``auction`` and ``bid`` read ``DIR/<kind>.csv`` (filesystem connector,
CSV format) with ``dt = TO_TIMESTAMP_LTZ(date_time, 3)`` as the event time and the same
watermark delay as Millstream's. Append-only results go to a CSV filesystem sink
(checkpoints every 10 s, as Millstream's) and are read back afterwards to be checked;
q4's updating result is collected with its row kinds. The outcome (the checksum of
``nexmark_queries``, the query's time and CPU) is written as JSON, as the other workers do.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pyarrow as pa  # noqa: E402
from nexmark_queries import checksum_add, checksum_part  # noqa: E402

TABLES = {
    "person": "id BIGINT, name STRING, email_address STRING, credit_card STRING, "
              "city STRING, state STRING, date_time BIGINT, extra STRING",
    "auction": "id BIGINT, item_name STRING, description STRING, initial_bid BIGINT, "
               "reserve BIGINT, date_time BIGINT, expires BIGINT, seller BIGINT, "
               "category BIGINT, extra STRING",
    "bid": "auction BIGINT, bidder BIGINT, price BIGINT, channel STRING, url STRING, "
           "date_time BIGINT, extra STRING",
}
#: output columns (name, Flink type, Arrow type) of each query, in the oracle's order
OUTPUT = {
    "q0": [("auction", "BIGINT"), ("bidder", "BIGINT"), ("price", "BIGINT"),
           ("date_time", "BIGINT"), ("extra", "STRING")],
    "q1": [("auction", "BIGINT"), ("bidder", "BIGINT"), ("price", "DOUBLE"),
           ("date_time", "BIGINT"), ("extra", "STRING")],
    "q2": [("auction", "BIGINT"), ("price", "BIGINT")],
    "q3": [("name", "STRING"), ("city", "STRING"), ("state", "STRING"), ("id", "BIGINT")],
    "q4": [("category", "BIGINT"), ("avg_price", "DOUBLE")],
    "q5": [("auction", "BIGINT"), ("num", "BIGINT"), ("starttime", "TIMESTAMP(3)"),
           ("endtime", "TIMESTAMP(3)")],
    "q7": [("auction", "BIGINT"), ("price", "BIGINT"), ("bidder", "BIGINT"),
           ("date_time", "BIGINT"), ("extra", "STRING")],
    "q8": [("id", "BIGINT"), ("name", "STRING"), ("starttime", "TIMESTAMP(3)")],
}
ARROW = {"BIGINT": pa.int64(), "DOUBLE": pa.float64(), "STRING": pa.string(),
         "TIMESTAMP(3)": pa.timestamp("ms")}

# Nexmark's Flink SQL texts (flink-nexmark), with this benchmark's column names
SQL = {
    "q0": "SELECT auction, bidder, price, date_time, extra FROM bid",
    "q1": "SELECT auction, bidder, CAST(0.908 AS DOUBLE) * price AS price, date_time, extra "
          "FROM bid",
    "q2": "SELECT auction, price FROM bid WHERE MOD(auction, 123) = 0",
    "q3": """SELECT P.name, P.city, P.state, A.id
             FROM auction AS A INNER JOIN person AS P ON A.seller = P.id
             WHERE A.category = 10 AND (P.state = 'OR' OR P.state = 'ID' OR P.state = 'CA')""",
    "q4": """SELECT Q.category, AVG(CAST(Q.final AS DOUBLE)) AS avg_price
             FROM (SELECT MAX(B.price) AS final, A.category
                   FROM auction A, bid B
                   WHERE A.id = B.auction AND B.date_time BETWEEN A.date_time AND A.expires
                   GROUP BY A.id, A.category) Q
             GROUP BY Q.category""",
    "q5": """SELECT AuctionBids.auction, AuctionBids.num, AuctionBids.starttime,
                    AuctionBids.endtime
             FROM (SELECT auction, count(*) AS num, window_start AS starttime,
                          window_end AS endtime
                   FROM TABLE(HOP(TABLE bid, DESCRIPTOR(dt), INTERVAL '2' SECOND,
                                  INTERVAL '10' SECOND))
                   GROUP BY auction, window_start, window_end) AS AuctionBids
             JOIN (SELECT max(CountBids.num) AS maxn, CountBids.starttime,
                          CountBids.endtime
                   FROM (SELECT count(*) AS num, window_start AS starttime,
                                window_end AS endtime
                         FROM TABLE(HOP(TABLE bid, DESCRIPTOR(dt), INTERVAL '2' SECOND,
                                        INTERVAL '10' SECOND))
                         GROUP BY auction, window_start, window_end) AS CountBids
                   GROUP BY CountBids.starttime, CountBids.endtime) AS MaxBids
             ON AuctionBids.starttime = MaxBids.starttime
                AND AuctionBids.endtime = MaxBids.endtime
                AND AuctionBids.num >= MaxBids.maxn""",
    "q7": """SELECT B.auction, B.price, B.bidder, B.date_time, B.extra
             FROM bid B
             JOIN (SELECT MAX(price) AS maxprice, window_end AS dt
                   FROM TABLE(TUMBLE(TABLE bid, DESCRIPTOR(dt), INTERVAL '10' SECOND))
                   GROUP BY window_start, window_end) B1
             ON B.price = B1.maxprice
             WHERE B.dt BETWEEN B1.dt - INTERVAL '10' SECOND AND B1.dt""",
    "q8": """SELECT P.id, P.name, P.starttime
             FROM (SELECT id, name, window_start AS starttime, window_end AS endtime
                   FROM TABLE(TUMBLE(TABLE person, DESCRIPTOR(dt), INTERVAL '10' SECOND))
                   GROUP BY id, name, window_start, window_end) P
             JOIN (SELECT seller, window_start AS starttime, window_end AS endtime
                   FROM TABLE(TUMBLE(TABLE auction, DESCRIPTOR(dt), INTERVAL '10' SECOND))
                   GROUP BY seller, window_start, window_end) A
             ON P.id = A.seller AND P.starttime = A.starttime AND P.endtime = A.endtime""",
}
INPUTS = {"q0": ("bid",), "q1": ("bid",), "q2": ("bid",), "q3": ("person", "auction"),
          "q4": ("auction", "bid"), "q5": ("bid",), "q7": ("bid",),
          "q8": ("person", "auction")}


def _cpu() -> dict[int, float]:
    """CPU seconds of this process tree (the JVM is a child), by pid."""
    import psutil

    me = psutil.Process()
    out = {}
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            continue
    return out


def _read_output(directory: str, q: str) -> dict[str, Any]:
    """The checksum of the CSV files a filesystem sink wrote (in-progress ones too)."""
    import pyarrow.csv as pacsv

    cols = OUTPUT[q]
    names = [c for c, _t in cols]
    types = {c: ARROW[t] for c, t in cols}
    total = None
    for root, _dirs, files in os.walk(directory):
        for f in sorted(files):
            path = os.path.join(root, f)
            if os.path.getsize(path) == 0 or f.endswith(".crc"):
                continue
            t = pacsv.read_csv(path, pacsv.ReadOptions(column_names=names),
                               convert_options=pacsv.ConvertOptions(column_types=types))
            total = checksum_add(total, checksum_part(t))
    return total or {"rows": 0, "sums": [], "hash": 0, "columns": names}


def run(q: str, data: str, delay_ms: int, parallelism: int) -> dict[str, Any]:
    """Run query ``q`` on a local mini-cluster; the outcome."""
    from pyflink.table import EnvironmentSettings, TableEnvironment

    t0 = time.perf_counter()
    env = TableEnvironment.create(EnvironmentSettings.in_streaming_mode())
    conf = env.get_config()
    conf.set("parallelism.default", str(parallelism))
    conf.set("table.local-time-zone", "UTC")
    conf.set("execution.checkpointing.interval", "10s")
    conf.set("pipeline.name", f"nexmark-{q}")
    delay = f"{delay_ms / 1000:.3f}"
    for kind in INPUTS[q]:
        env.execute_sql(
            f"CREATE TABLE {kind} ({TABLES[kind]}, dt AS TO_TIMESTAMP_LTZ(date_time, 3), "
            f"WATERMARK FOR dt AS dt - INTERVAL '{delay}' SECOND) WITH ("
            f"'connector' = 'filesystem', 'path' = '{data}/{kind}.csv', 'format' = 'csv')")
    init = time.perf_counter() - t0
    out_dir = tempfile.mkdtemp(prefix="nexmark-flink-out-")
    try:
        before = _cpu()
        t1 = time.perf_counter()
        if q == "q4":  # an updating result: collected with its row kinds
            total = None
            with env.execute_sql(SQL[q]).collect() as rows:
                for row in rows:
                    kind = str(row.get_row_kind())
                    t = pa.table({"category": [row[0]], "avg_price": [row[1]],
                                  "change": [kind]})
                    total = checksum_add(total, checksum_part(t))
            checksum = total
        else:
            cols = ", ".join(f"{c} {t}" for c, t in OUTPUT[q])
            env.execute_sql(f"CREATE TABLE sink ({cols}) WITH ('connector' = 'filesystem', "
                            f"'path' = '{out_dir}', 'format' = 'csv')")
            env.execute_sql(f"INSERT INTO sink {SQL[q]}").wait()
            checksum = None
        query = time.perf_counter() - t1
        after = _cpu()
        cpu = sum(v - before.get(p, 0.0) for p, v in after.items())
        if checksum is None:
            checksum = _read_output(out_dir, q)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return {"checksum": checksum, "details": {"init_s": init, "query_s": query, "cpu_s": cpu,
                                              "parallelism": parallelism}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--query", required=True, choices=sorted(SQL))
    p.add_argument("--data", required=True)
    p.add_argument("--result-file", required=True)
    p.add_argument("--max-auction-ms", type=int, default=0)
    p.add_argument("--delay-ms", type=int, default=1000)
    p.add_argument("--parallelism", type=int, default=2)
    args = p.parse_args()
    out = Path(args.result_file)
    try:
        outcome = run(args.query, args.data, args.delay_ms, args.parallelism)
    except BaseException as e:
        traceback.print_exc()
        out.write_text(json.dumps({"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}))
        return 1
    out.write_text(json.dumps(outcome, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
