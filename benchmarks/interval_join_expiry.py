"""Micro-benchmark of the interval join's state: watermark advances and batches over a
large buffered input (Nexmark q7 keeps about 1.6 M bids buffered).

Usage (from the repository root):

    PYTHONPATH=src python benchmarks/interval_join_expiry.py              # 1.6 M rows
    PYTHONPATH=src python benchmarks/interval_join_expiry.py --rows 400000 --how left

It drives an :class:`~millstream.ops.stream_join.IntervalJoin` operator directly (no job,
no exchange): bids (auction, price, bidder, ts, extra) on the left, one "max price" row
per 10 s window on the right, ``between=("-10s", "0s")`` on ``price``. Times move 1 ms per
bid with up to 2 s of disorder. Three phases, each timed (best of ``--repeat``):

* ``fill``: the left input is buffered (the watermark stays far behind): ms per batch;
* ``advance``: watermark advances that each expire one batch's worth of rows (about
  0.1% of the buffer): ms per advance;
* ``steady``: a batch of new bids, a right row, and an advance, over a buffer that stays
  at ``--rows``: ms per step.

Times are CPU milliseconds of this process (``time.process_time``), so that a busy
machine inflates them less than wall time.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import numpy as np
import pyarrow as pa

from millstream.core.context import default_context
from millstream.ops.stream_join import IntervalJoin, JoinKeys

MS = 1000  # µs per ms


def bids(start: int, n: int, rng: np.random.Generator) -> pa.RecordBatch:
    """``n`` bids numbered from ``start``: one per ms, up to 2 s out of order (integer
    times are epoch milliseconds)."""
    i = np.arange(start, start + n, dtype=np.int64)
    ts = np.maximum(0, i - rng.integers(0, 2000, n))
    return pa.RecordBatch.from_pydict({
        "auction": i % 5000, "price": rng.integers(1, 10_000_000, n), "bidder": i % 977,
        "ts": ts, "extra": pa.array([f"channel-{v:08d}" for v in i % 100_000])})


def max_row(window_end_ms: int, price: int) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict({"price": [price], "wend": [window_end_ms]})


def run(rows: int, batch: int, steps: int, how: str) -> dict[str, float]:
    rng = np.random.default_rng(7)
    op = IntervalJoin(["price"], ["price"], -10_000 * MS, 0, "ts", "wend", how=how,
                      state_memory_limit=1 << 40)
    op.open(default_context())
    lk, rk = JoinKeys(["price"]), JoinKeys(["price"])
    batches = [next(iter(lk.process(bids(s, batch, rng))))
               for s in range(0, rows + (steps + 2) * batch, batch)]
    out = {}
    # fill: no watermark yet, nothing expires
    t0 = time.process_time()
    for b in batches[:rows // batch]:
        op.process(b, 0)
    out["fill_ms_per_batch"] = (time.process_time() - t0) * 1e3 / (rows // batch)
    assert op.spill_stats()["memory_rows"] >= rows * 0.99, op.spill_stats()
    # advance: each expires about one batch (left rows go once ts + 0 < W)
    wm = 0
    t0 = time.process_time()
    for k in range(steps):
        wm = (k + 1) * batch * MS
        op.on_watermark(wm)
    out["advance_ms"] = (time.process_time() - t0) * 1e3 / steps
    # steady: a batch in, a max-price row (matches nothing), an advance out
    nxt = rows // batch
    t0 = time.process_time()
    for k in range(steps):
        op.process(batches[nxt + k], 0)
        op.process(next(iter(rk.process(max_row(wm // MS + 5000, -1)))), 1)
        wm += batch * MS
        op.on_watermark(wm)
    out["steady_ms_per_step"] = (time.process_time() - t0) * 1e3 / steps
    out["buffered_rows"] = op.spill_stats()["memory_rows"]
    op.close()
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_600_000)
    p.add_argument("--batch", type=int, default=2000)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--how", default="inner", choices=("inner", "left"))
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args(argv)
    best: dict[str, float] = {}
    for _ in range(a.repeat):
        gc.collect()
        r = run(a.rows, a.batch, a.steps, a.how)
        for k, v in r.items():
            best[k] = min(best.get(k, v), v)
        print(" ".join(f"{k}={v:.3f}" for k, v in r.items()), file=sys.stderr)
    print(f"rows={a.rows} batch={a.batch} how={a.how} (best of {a.repeat}): "
          + ", ".join(f"{k} {v:.2f}" for k, v in best.items()))


if __name__ == "__main__":
    main()
