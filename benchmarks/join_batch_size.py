"""A shuffled semi join at two batch sizes: does the join's cost follow the probe batches?

A join that hashes its build side again for every probe batch gets slower as batches get
smaller; one that indexes the build side once per task does not. The probe (left) side
is 60,000 orders, the build (right) side the first 3,000,000 lineitem rows of TPC-H SF1;
``broadcast=False`` forces the shuffle hash join. Public API only, so the same script
times any checkout (``PYTHONPATH=<checkout>/src``).

    python benchmarks/join_batch_size.py --data /work/data/sf1 --repeat 3
"""

from __future__ import annotations

import argparse
import os
import time

import pyarrow.parquet as pq

import millstream as ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/data/sf1")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--parallelism", type=int, default=2)
    ap.add_argument("--batch-sizes", default="65536,2048")
    args = ap.parse_args()
    orders = pq.read_table(os.path.join(args.data, "orders.parquet"),
                           columns=["o_orderkey", "o_custkey"]).slice(0, 60_000)
    lines = pq.read_table(os.path.join(args.data, "lineitem.parquet"),
                          columns=["l_orderkey", "l_suppkey"]).slice(0, 3_000_000)
    ms.init(parallelism=args.parallelism, progress=False)
    try:
        left = ms.from_arrow(orders, num_partitions=args.parallelism)
        right = ms.from_arrow(lines, num_partitions=args.parallelism)
        ds = left.join(right, left_on="o_orderkey", right_on="l_orderkey", how="semi",
                       broadcast=False)
        print(f"semi join: {orders.num_rows:,} orders against {lines.num_rows:,} lineitem "
              f"rows, shuffled, parallelism {args.parallelism}, best of {args.repeat}")
        for bs in (int(b) for b in args.batch_sizes.split(",")):
            best, n = float("inf"), -1
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                n = ds.to_arrow(batch_size=bs).num_rows
                best = min(best, time.perf_counter() - t0)
            print(f"  batch_size={bs:6d}: {best:7.2f} s ({n:,} rows)")
    finally:
        ms.shutdown()


if __name__ == "__main__":
    main()
