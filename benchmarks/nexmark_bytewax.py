"""Nexmark q0, q1, q2, q5 and q7 as Bytewax dataflows (one worker), for the peer figures.

Events come from the same generator as Millstream's (``nexmark_gen``), each Arrow batch
turned into Python dicts (Bytewax works on Python objects), and the results are folded
into the same order-free checksum. Windows use an ``EventClock`` on ``date_time`` that
waits as long as Millstream's watermark delay.

- q5: ``count_window`` per auction over ``SlidingWindower(10 s, every 2 s)``; then a
  stateful step gathers the counts per window and, at the end of the input, keeps each
  window's auctions with the most bids. (Bytewax closes a key's window when that key is
  next notified, so the counts of one window come interleaved with later windows' and
  there is no point before the end at which a window is known to be complete.)
- q7: ``fold_window`` over ``TumblingWindower(10 s)`` keeps each window's highest price
  and its bids. Flink's text also matches a bid at exactly the window's end time with
  the window's maximum; a price tie at that instant is vanishingly rare here and the
  checksum would show it.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from typing import Any

import nexmark_gen as gen
import pyarrow as pa
from nexmark_queries import AUCTION_SKIP, EURO, checksum_add, checksum_part

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
COLUMNS = {"q0": ("auction", "bidder", "price", "date_time", "extra"),
           "q1": ("auction", "bidder", "price", "date_time", "extra"),
           "q2": ("auction", "price"),
           "q5": ("auction", "num", "starttime", "endtime"),
           "q7": ("auction", "price", "bidder", "date_time", "extra")}


def _bids(cfg: gen.NexmarkConfig) -> Iterator[dict[str, Any]]:
    for i in range(cfg.num_batches or 0):
        yield from gen.batch(cfg, gen.BID, i).to_pylist()


def run_bytewax(cfg: gen.NexmarkConfig, q: str, delay: str) -> dict[str, Any]:
    """Run query ``q``; the outcome (checksum and details) as Millstream's workers give it."""
    import bytewax.operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.operators import windowing as win
    from bytewax.outputs import DynamicSink, StatelessSinkPartition
    from bytewax.testing import TestingSource, run_main
    from nexmark_sink import cpu_delta, cpu_snapshot

    if q not in COLUMNS:
        raise ValueError(f"{q} is not written for Bytewax")
    cols = COLUMNS[q]
    total: list[Any] = [None]

    class _Part(StatelessSinkPartition):
        def write_batch(self, items: list[Any]) -> None:
            if items:
                table = pa.table(list(zip(*items)), names=list(cols))
                total[0] = checksum_add(total[0], checksum_part(table))

    class _Sink(DynamicSink):
        def build(self, step_id: str, worker_index: int, worker_count: int) -> _Part:
            return _Part()

    wait = dt.timedelta(milliseconds=int(delay.removesuffix("ms")))
    flow = Dataflow(f"nexmark_{q}")
    bids = op.input("bids", flow, TestingSource(_bids(cfg), batch_size=1000))
    if q in ("q0", "q1"):
        f = EURO if q == "q1" else 1
        out = op.map("select", bids, lambda r: (r["auction"], r["bidder"],
                                                r["price"] * f if f != 1 else r["price"],
                                                r["date_time"], r["extra"]))
    elif q == "q2":
        kept = op.filter("skip", bids, lambda r: r["auction"] % AUCTION_SKIP == 0)
        out = op.map("select", kept, lambda r: (r["auction"], r["price"]))
    elif q == "q5":
        clock = win.EventClock(lambda r: EPOCH + dt.timedelta(milliseconds=r["date_time"]),
                               wait_for_system_duration=wait)
        sliding = win.SlidingWindower(length=dt.timedelta(seconds=10),
                                      offset=dt.timedelta(seconds=2), align_to=EPOCH)
        counts = win.count_window("count", bids, clock, sliding,
                                  key=lambda r: str(r["auction"]))
        by_window = op.key_on("all", op.map("flat", counts.down,
                                            lambda kv: (int(kv[0]), kv[1][0], kv[1][1])),
                              lambda _t: "all")
        out = op.map("unkey", op.stateful("hot", by_window, lambda _resume: _HotItems()),
                     lambda kv: kv[1])
    else:  # q7
        clock = win.EventClock(lambda r: EPOCH + dt.timedelta(milliseconds=r["date_time"]),
                               wait_for_system_duration=wait)
        tumbling = win.TumblingWindower(length=dt.timedelta(seconds=10), align_to=EPOCH)
        keyed = op.key_on("all", bids, lambda _r: "all")
        folded = win.fold_window("max", keyed, clock, tumbling, _max_builder, _max_folder,
                                 _max_merger)
        out = op.flat_map("rows", folded.down, lambda kv: [
            (r["auction"], r["price"], r["bidder"], r["date_time"], r["extra"])
            for r in kv[1][1][1]])
    op.output("out", out, _Sink())
    before = cpu_snapshot()
    t0 = time.perf_counter()
    run_main(flow)
    query = time.perf_counter() - t0
    checksum = total[0] or {"rows": 0, "sums": [], "hash": 0, "columns": list(cols)}
    return {"checksum": checksum, "details": {"query_s": query, "cpu_s": cpu_delta(before),
                                              "workers": 1}}


def _max_builder() -> tuple[int, list[dict[str, Any]]]:
    return (-1, [])


def _max_folder(acc: tuple[int, list[dict[str, Any]]], r: dict[str, Any]
                ) -> tuple[int, list[dict[str, Any]]]:
    best, rows = acc
    if r["price"] > best:
        return (r["price"], [r])
    if r["price"] == best:
        rows.append(r)
    return acc


def _max_merger(a: tuple[int, list[Any]], b: tuple[int, list[Any]]) -> tuple[int, list[Any]]:
    if a[0] == b[0]:
        return (a[0], a[1] + b[1])
    return a if a[0] > b[0] else b


def _hot_items_logic_base() -> Any:
    from bytewax.operators import StatefulLogic

    return StatefulLogic


class _HotItems(_hot_items_logic_base()):  # type: ignore[misc]
    """Gathers (auction, window id, count) per window; at the end of the input emits each
    window's auctions with the most bids."""

    SLIDE_MS, SIZE_MS = 2000, 10_000

    def __init__(self) -> None:
        self.windows: dict[int, list[tuple[int, int]]] = {}

    def on_item(self, value: tuple[int, int, int]) -> tuple[list[Any], bool]:
        auction, wid, n = value
        self.windows.setdefault(wid, []).append((auction, n))
        return [], False

    def on_eof(self) -> tuple[list[Any], bool]:
        out: list[Any] = []
        for wid, counts in sorted(self.windows.items()):
            top = max(n for _a, n in counts)
            start = wid * self.SLIDE_MS
            out.extend((a, n, start, start + self.SIZE_MS) for a, n in counts if n >= top)
        return out, True

    def snapshot(self) -> Any:
        return dict(self.windows)
