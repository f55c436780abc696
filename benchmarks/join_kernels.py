"""Join kernels on one core: which one a task should use to build and probe.

Times an inner join of TPC-H lineitem with orders (``l_orderkey = o_orderkey``, a few
columns each) with Acero (``pyarrow.Table.join``), DuckDB and Polars on Arrow tables, and
Millstream's build-once index (``ops.join.JoinIndex``) probed with the whole probe side
and batch by batch; plus the old way, an Acero join per probe batch (extrapolated from
the first batches). Every variant returns an Arrow table; counts and a checksum are checked
against Acero's.

    python benchmarks/join_kernels.py --data /work/data/sf1 --repeat 3
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("POLARS_MAX_THREADS", "1")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from millstream.ops.join.index import JoinIndex, pair_chunks  # noqa: E402
from millstream.ops.join.keys import key_column  # noqa: E402

LCOLS = ["l_orderkey", "l_suppkey", "l_extendedprice", "l_discount"]
OCOLS = ["o_orderkey", "o_custkey", "o_orderdate", "o_shippriority"]


def _acero(probe: pa.Table, build: pa.Table) -> pa.Table:
    return probe.join(build, "l_orderkey", "o_orderkey", join_type="inner", use_threads=False)


def _duckdb(probe: pa.Table, build: pa.Table) -> pa.Table:
    import duckdb

    con = duckdb.connect()
    con.execute("SET threads=1")
    con.register("l", probe)
    con.register("o", build)
    return con.execute("SELECT * FROM l JOIN o ON l_orderkey = o_orderkey").to_arrow_table()


def _polars(probe: pa.Table, build: pa.Table) -> pa.Table:
    import polars as pl

    lp, bp = pl.from_arrow(probe), pl.from_arrow(build)
    return lp.join(bp, left_on="l_orderkey", right_on="o_orderkey", how="inner").to_arrow()


def _gather(probe: pa.Table | pa.RecordBatch, build: pa.Table, pi: np.ndarray,
            bi: np.ndarray) -> pa.Table:
    pidx, bidx = pa.array(pi), pa.array(bi)
    cols = [probe.column(c).take(pidx) for c in probe.column_names]
    cols += [build.column(c).take(bidx) for c in build.column_names]
    return pa.table(cols, names=probe.column_names + build.column_names)


def _index_batches(probe: pa.Table, build: pa.Table, batch_rows: int | None) -> pa.Table:
    build = build.combine_chunks()
    index = JoinIndex([key_column(build.column("o_orderkey"), pa.int64())], build.num_rows)
    out = []
    batches = [probe.combine_chunks()] if batch_rows is None else \
        probe.to_batches(max_chunksize=batch_rows)
    for b in batches:
        key = key_column(b.column("l_orderkey"), pa.int64())
        count, first, _ = index.lookup([key], b.num_rows)
        for pi, bi in pair_chunks(count, first, index.order, 1 << 22):
            out.append(_gather(b, build, pi, bi))
    return pa.concat_tables(out)


def _acero_per_batch(probe: pa.Table, build: pa.Table, batch_rows: int,
                     max_batches: int) -> tuple[float, int]:
    """Seconds for the old per-batch Acero join, extrapolated from ``max_batches``."""
    batches = probe.to_batches(max_chunksize=batch_rows)
    t0 = time.perf_counter()
    for b in batches[:max_batches]:
        _acero(pa.Table.from_batches([b]), build)
    used = min(max_batches, len(batches))
    return (time.perf_counter() - t0) * len(batches) / used, len(batches)


def _check(t: pa.Table, want: tuple[int, int]) -> None:
    got = (t.num_rows, int(pc.sum(t.column("o_custkey")).as_py()))
    assert got == want, (got, want)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/data/sf1")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    probe = pq.read_table(os.path.join(args.data, "lineitem.parquet"), columns=LCOLS)
    build = pq.read_table(os.path.join(args.data, "orders.parquet"), columns=OCOLS)
    probe, build = probe.combine_chunks(), build.combine_chunks()
    print(f"lineitem {probe.num_rows:,} rows ⋈ orders {build.num_rows:,} rows "
          f"(inner, l_orderkey = o_orderkey), one thread, best of {args.repeat}")
    ref = _acero(probe, build)
    want = (ref.num_rows, int(pc.sum(ref.column("o_custkey")).as_py()))
    variants = {
        "acero (whole probe side)": lambda: _acero(probe, build),
        "duckdb (whole probe side)": lambda: _duckdb(probe, build),
        "polars (whole probe side)": lambda: _polars(probe, build),
        "index (whole probe side)": lambda: _index_batches(probe, build, None),
        "index, batches of 65536": lambda: _index_batches(probe, build, 65536),
        "index, batches of 2048": lambda: _index_batches(probe, build, 2048),
    }
    for name, fn in variants.items():
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - t0)
            _check(out, want)
        print(f"  {name:32s} {best:8.3f} s")
    for rows, first in ((65536, 6), (2048, 20)):
        secs, n = _acero_per_batch(probe, build, rows, first)
        print(f"  {'acero per batch of ' + str(rows):32s} {secs:8.1f} s  "
              f"(extrapolated from {first} of {n} batches)")


if __name__ == "__main__":
    main()
