"""Card fraud detection on a transaction stream, two ways.

    python examples/fraud_detection.py                   # 100,000 transactions, ~7 h of event time
    python examples/fraud_detection.py --transactions 20000 --threshold 150000

1. Windows: per card, the amount spent over a sliding window of 10 minutes every minute;
   an alert for every window whose total exceeds a threshold (``spending_alerts``).
2. A keyed process function with state and event-time timers (``FraudDetector``): an
   alert when a card makes more than N transactions within one minute (a burst), or when a
   small transaction is followed by a large one within one minute (a card test).

The stream is generated (``ms.from_generator``) in event-time order, amounts in cents.
Window alerts go to Parquet files committed exactly once per checkpoint; the process
function's alerts are collected in memory (``CollectingSink``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import tempfile
from collections import defaultdict, deque
from typing import Any

import millstream as ms
from millstream.ops.state.process import KeyedProcessFunction, ProcessContext
from millstream.testing import CollectingSink

START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
STEP_MS = 250  # four transactions per second over all cards
CARDS = 200
MINUTE_MS = 60_000
MINUTE_US = 60_000_000
THRESHOLD_CENTS = 150_000  # more than 1,500.00 spent within 10 minutes
BURST_N = 5  # more than 5 transactions within a minute
SMALL_CENTS = 100  # a transaction under 1.00 ...
LARGE_CENTS = 50_000  # ... followed by one of 500.00 or more within a minute


def _mix(i: int, salt: int) -> int:
    """A cheap deterministic hash of (i, salt) in [0, 2**32)."""
    x = (i * 2_654_435_761 + salt * 40_503 + 12_345) & 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x45D9F3B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def transaction(i: int) -> dict[str, Any]:
    """The i-th transaction; every 1000 of them hold one burst and one small-then-large pair."""
    block, j = divmod(i, 1000)
    card = _mix(i, 1) % CARDS
    amount = 500 + _mix(i, 2) % 12_000  # 5.00 to 125.00
    if j < 7:  # a burst: seven transactions of one card within two seconds
        card = (block * 37) % CARDS
        amount = 2_000 + 100 * j
    elif j in (500, 540):  # card test: 0.50, then 900.00 ten seconds later
        card = (block * 53 + 11) % CARDS
        amount = 50 if j == 500 else 90_000
    return {"card": f"card-{card:04d}", "amount": amount, "ts": START_MS + i * STEP_MS}


def transactions(n: int, partitions: int = 1) -> ms.Dataset:
    """``n`` generated transactions as a (bounded) stream."""
    return ms.from_generator(transaction, count=n, partitions=partitions)


# ------------------------------------------------------------------ 1. sliding windows

def spending(stream: ms.Dataset) -> ms.Dataset:
    """Per card: total amount and transactions over 10 minutes, every minute."""
    return (stream.with_watermark("ts", delay="5s")
            .group_by("card").window(ms.sliding("10m", every="1m"), on="ts")
            .agg(ms.sum("amount").alias("total"), ms.count().alias("n")))


def spending_alerts(stream: ms.Dataset, threshold: int = THRESHOLD_CENTS) -> ms.Dataset:
    """The windows of ``spending`` whose total exceeds ``threshold`` cents."""
    return spending(stream).filter(ms.col("total") > threshold)


def spending_oracle(n: int, threshold: int = THRESHOLD_CENTS) -> dict[tuple[str, int], int]:
    """Plain Python: {(card, window start in epoch ms): total} of the alerting windows."""
    totals: dict[tuple[str, int], int] = defaultdict(int)
    for i in range(n):
        t = transaction(i)
        last = t["ts"] // MINUTE_MS * MINUTE_MS
        for start in range(last - 9 * MINUTE_MS, last + 1, MINUTE_MS):
            totals[(t["card"], start)] += t["amount"]
    return {k: v for k, v in totals.items() if v > threshold}


def as_alerts(rows: list[dict[str, Any]]) -> dict[tuple[str, int], int]:
    """Window result rows as {(card, window start in epoch ms): total}."""
    epoch = dt.datetime(1970, 1, 1)
    return {(r["card"], (r["window_start"] - epoch) // dt.timedelta(milliseconds=1)): r["total"]
            for r in rows}


# ------------------------------------------------------------------ 2. process function

class FraudDetector(KeyedProcessFunction):
    """Per card: alert on a burst (> N within a minute) or a small-then-large pair."""

    def __init__(self, burst_n: int = BURST_N) -> None:
        self.burst_n = burst_n

    # State handles come from ``ctx`` on every call rather than being kept on ``self`` in
    # ``open``: in this version the parallel instances of a streaming job share one
    # instance of the function object, so handles kept on ``self`` would point at the
    # state of whichever instance opened last.

    def process_element(self, row: dict[str, Any], ctx: ProcessContext) -> list[dict[str, Any]]:
        """Check one transaction against the card's state; return its alerts."""
        ts = ctx.timestamp
        alerts = []
        recent_state, small_at = ctx.get_list_state("recent"), ctx.get_state("small_at", None)
        recent = [t for t in recent_state.get() if ts - t < MINUTE_US] + [ts]
        recent_state.update(recent)
        ctx.timer_service().register_event_time_timer(ts + MINUTE_US)  # expire it then
        if len(recent) > self.burst_n:
            alerts.append(_alert(row, "burst", len(recent)))
        small = small_at.value()
        if small is not None and ts - small < MINUTE_US and row["amount"] >= LARGE_CENTS:
            alerts.append(_alert(row, "small_then_large", 2))
            small_at.clear()
        if row["amount"] < SMALL_CENTS:
            small_at.update(ts)
        return alerts

    def on_timer(self, timestamp: int, ctx: ProcessContext) -> None:
        """A minute after a transaction: drop what is older than a minute from the state."""
        recent_state, small_at = ctx.get_list_state("recent"), ctx.get_state("small_at", None)
        recent_state.update(t for t in recent_state.get() if timestamp - t < MINUTE_US)
        small = small_at.value()
        if small is not None and timestamp - small >= MINUTE_US:
            small_at.clear()


def _alert(row: dict[str, Any], kind: str, n: int) -> dict[str, Any]:
    """An alert row for transaction ``row``."""
    return {"card": row["card"], "ts": row["ts"], "kind": kind, "amount": row["amount"], "n": n}


def pattern_alerts(stream: ms.Dataset, burst_n: int = BURST_N) -> ms.Dataset:
    """The alerts of :class:`FraudDetector` per card."""
    return (stream.with_watermark("ts", delay="5s").group_by("card")
            .process(FraudDetector(burst_n)))


def pattern_oracle(n: int, burst_n: int = BURST_N) -> list[tuple[str, int, str, int, int]]:
    """Plain Python: the alerts of ``pattern_alerts`` as sorted (card, ts, kind, amount, n)."""
    recent: dict[str, deque[int]] = defaultdict(deque)
    small: dict[str, int] = {}
    out = []
    for i in range(n):
        t = transaction(i)
        card, ts = t["card"], t["ts"]
        q = recent[card]
        while q and ts - q[0] >= MINUTE_MS:
            q.popleft()
        q.append(ts)
        if len(q) > burst_n:
            out.append((card, ts, "burst", t["amount"], len(q)))
        if card in small and ts - small[card] < MINUTE_MS and t["amount"] >= LARGE_CENTS:
            out.append((card, ts, "small_then_large", t["amount"], 2))
            del small[card]
        if t["amount"] < SMALL_CENTS:
            small[card] = ts
    return sorted(out)


def as_tuples(rows: list[dict[str, Any]]) -> list[tuple[str, int, str, int, int]]:
    """Alert rows as sorted (card, ts, kind, amount, n) tuples."""
    return sorted((r["card"], r["ts"], r["kind"], r["amount"], r["n"]) for r in rows)


# ------------------------------------------------------------------ running

def run_windows(n: int, out_dir: str, checkpoint: str, threshold: int = THRESHOLD_CENTS,
                partitions: int = 2, max_batch_records: int = 10_000,
                timeout: float = 120.0, executor: str | None = None) -> Any:
    """The window alerts as a streaming job writing Parquet to ``out_dir``; the ended job."""
    job = spending_alerts(transactions(n, partitions), threshold).start(
        checkpoint=checkpoint, checkpoint_interval="1s", sink=out_dir,
        max_batch_records=max_batch_records, executor=executor)
    if not job.await_termination(timeout):
        job.stop()
        raise TimeoutError(f"the spending job did not end within {timeout}s")
    return job


def run_patterns(n: int, checkpoint: str, burst_n: int = BURST_N,
                 max_batch_records: int = 10_000, timeout: float = 120.0,
                 executor: str | None = None) -> Any:
    """The process-function alerts as a streaming job into a ``CollectingSink``."""
    job = pattern_alerts(transactions(n), burst_n).start(
        checkpoint=checkpoint, checkpoint_interval="1s", sink=CollectingSink(),
        max_batch_records=max_batch_records, executor=executor)
    if not job.await_termination(timeout):
        job.stop()
        raise TimeoutError(f"the pattern job did not end within {timeout}s")
    return job


def main() -> None:
    """Run both detectors on a generated stream and print their alerts."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transactions", type=int, default=100_000)
    ap.add_argument("--threshold", type=int, default=THRESHOLD_CENTS,
                    help="an alert above this many cents spent within 10 minutes")
    ap.add_argument("--burst", type=int, default=BURST_N, help="max transactions per minute")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_windows(args.transactions, f"{tmp}/alerts", f"{tmp}/chk-windows", args.threshold)
        windows = ms.read_parquet(f"{tmp}/alerts").sort(["window_start", "card"])
        print(f"spending over {dollars(args.threshold)} within 10 minutes: "
              f"{windows.count()} window(s)")
        windows.select("card", "window_start", "window_end",
                       (ms.col("total") / 100).alias("total_usd"),
                       ms.col("n").alias("transactions")).show(10)
        job = run_patterns(args.transactions, f"{tmp}/chk-patterns", args.burst)
        alerts = as_tuples(job.sink.rows())
        for kind in ("burst", "small_then_large"):
            some = [a for a in alerts if a[2] == kind]
            print(f"{kind}: {len(some)} alert(s); the first:")
            for card, ts, _, amount, n in some[:3]:
                what = f"{n} transactions within a minute" if kind == "burst" else \
                    "after one under 1.00 USD"
                print(f"  {card}  {timestamp(ts)}  {dollars(amount)} ({what})")


def dollars(cents: int) -> str:
    """An amount in cents as dollars, e.g. ``1,500.00 USD``."""
    return f"{cents / 100:,.2f} USD"


def timestamp(ms_since_epoch: int) -> str:
    """Epoch milliseconds as a UTC timestamp, e.g. ``2026-01-01 00:00:01.250``."""
    t = dt.datetime.fromtimestamp(ms_since_epoch / 1000, dt.timezone.utc)
    return t.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


if __name__ == "__main__":
    main()
