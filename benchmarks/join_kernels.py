"""Join kernels on one core: which one a task should use to build and probe.

Inner joins of TPC-H SF1 lineitem (the probe side) with a build side, three key shapes:

- ``orders``: ``l_orderkey = o_orderkey`` (one int64 key, a dense range),
- ``partsupp``: ``(l_partkey, l_suppkey) = (ps_partkey, ps_suppkey)`` (two int64 keys),
- ``string``: the part key as a string on both sides (a hashed key, 4 matches a row).

Each is timed with Acero (``pyarrow.Table.join``), DuckDB and Polars on the whole probe
side (Arrow tables in and out), with Millstream's build-once index
(``ops.join.JoinIndex``) on the whole probe side and batch by batch, and the old way: an
Acero join per probe batch (extrapolated from the first batches). Row counts and a
checksum are checked against Acero's.

    python benchmarks/join_kernels.py --data /work/data/sf1 --repeat 3 [--cases orders]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

os.environ.setdefault("POLARS_MAX_THREADS", "1")

import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from millstream.ops.join.index import JoinIndex, pair_chunks  # noqa: E402
from millstream.ops.join.keys import common_key_type, key_column  # noqa: E402


def _load(data: str, case: str) -> tuple[pa.Table, pa.Table, list[str], list[str], str]:
    """(probe, build, probe keys, build keys, a build column to checksum)."""
    li = pq.read_table(os.path.join(data, "lineitem.parquet"),
                       columns=["l_orderkey", "l_partkey", "l_suppkey", "l_quantity"])
    li = li.set_column(3, "l_quantity", li.column("l_quantity").cast(pa.float64()))
    if case == "orders":
        build = pq.read_table(os.path.join(data, "orders.parquet"),
                              columns=["o_orderkey", "o_custkey", "o_orderdate"])
        return li, build, ["l_orderkey"], ["o_orderkey"], "o_custkey"
    build = pq.read_table(os.path.join(data, "partsupp.parquet"),
                          columns=["ps_partkey", "ps_suppkey", "ps_availqty"])
    if case == "partsupp":
        return li, build, ["l_partkey", "l_suppkey"], ["ps_partkey", "ps_suppkey"], \
            "ps_availqty"
    li = li.append_column("l_pk", li.column("l_partkey").cast(pa.string()))
    build = build.append_column("ps_pk", build.column("ps_partkey").cast(pa.string()))
    return li.drop_columns(["l_partkey"]), build.drop_columns(["ps_partkey"]), ["l_pk"], \
        ["ps_pk"], "ps_availqty"


def _acero(probe: pa.Table, build: pa.Table, pk: list[str], bk: list[str]) -> pa.Table:
    return probe.join(build, pk, bk, join_type="inner", use_threads=False)


def _duckdb(probe: pa.Table, build: pa.Table, pk: list[str], bk: list[str]) -> pa.Table:
    import duckdb

    con = duckdb.connect()
    con.execute("SET threads=1")
    con.register("l", probe)
    con.register("b", build)
    on = " AND ".join(f"l.{a} = b.{c}" for a, c in zip(pk, bk))
    return con.sql(f"SELECT * FROM l JOIN b ON {on}").to_arrow_table()


def _polars(probe: pa.Table, build: pa.Table, pk: list[str], bk: list[str]) -> pa.Table:
    import polars as pl

    return pl.from_arrow(probe).join(pl.from_arrow(build), left_on=pk, right_on=bk,
                                     how="inner").to_arrow()


def _index(probe: pa.Table, build: pa.Table, pk: list[str], bk: list[str],
           batch_rows: int | None) -> pa.Table:
    """Index the build side once, probe it with every batch, gather every column."""
    build = build.combine_chunks()
    types = [common_key_type(probe.schema.field(a).type, build.schema.field(b).type, a, b)
             for a, b in zip(pk, bk)]
    index = JoinIndex([key_column(build.column(k), t) for k, t in zip(bk, types)],
                      build.num_rows)
    out = []
    batches = [probe.combine_chunks()] if batch_rows is None else \
        probe.to_batches(max_chunksize=batch_rows)
    for b in batches:
        keys = [key_column(b.column(k), t) for k, t in zip(pk, types)]
        count, first, check = index.lookup(keys, b.num_rows)
        for pi, bi in pair_chunks(count, first, index.order, 1 << 22):
            if check is not None:
                keep = check(pi, bi)
                pi, bi = pi[keep], bi[keep]
            pidx, bidx = pa.array(pi), pa.array(bi)
            cols = [b.column(c).take(pidx) for c in b.column_names]
            cols += [build.column(c).take(bidx) for c in build.column_names]
            out.append(pa.table(cols, names=b.column_names + build.column_names))
    return pa.concat_tables(out)


def _acero_per_batch(probe: pa.Table, build: pa.Table, pk: list[str], bk: list[str],
                     batch_rows: int, max_batches: int) -> tuple[float, int]:
    """Seconds of the old per-batch Acero join, extrapolated from ``max_batches``."""
    batches = probe.to_batches(max_chunksize=batch_rows)
    t0 = time.perf_counter()
    for b in batches[:max_batches]:
        _acero(pa.Table.from_batches([b]), build, pk, bk)
    used = min(max_batches, len(batches))
    return (time.perf_counter() - t0) * len(batches) / used, len(batches)


def run_case(data: str, case: str, repeat: int) -> None:
    probe, build, pk, bk, check = _load(data, case)
    probe, build = probe.combine_chunks(), build.combine_chunks()
    print(f"{case}: lineitem {probe.num_rows:,} rows ⋈ {build.num_rows:,} rows on {pk} = {bk}")
    ref = _acero(probe, build, pk, bk)
    want = (ref.num_rows, pc.sum(ref.column(check)).as_py())
    variants: dict[str, Callable[[], pa.Table]] = {
        "acero (whole probe side)": lambda: _acero(probe, build, pk, bk),
        "duckdb (whole probe side)": lambda: _duckdb(probe, build, pk, bk),
        "polars (whole probe side)": lambda: _polars(probe, build, pk, bk),
        "index (whole probe side)": lambda: _index(probe, build, pk, bk, None),
        "index, batches of 65536": lambda: _index(probe, build, pk, bk, 65536),
        "index, batches of 2048": lambda: _index(probe, build, pk, bk, 2048),
    }
    for name, fn in variants.items():
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - t0)
            got = (out.num_rows, pc.sum(out.column(check)).as_py())
            assert got == want, (name, got, want)
        print(f"  {name:32s} {best:8.3f} s")
    for rows, first in ((65536, 4), (2048, 10)):
        secs, n = _acero_per_batch(probe, build, pk, bk, rows, first)
        print(f"  {'acero per batch of ' + str(rows):32s} {secs:8.1f} s  "
              f"(extrapolated from {first} of {n} batches)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/data/sf1")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cases", default="orders,partsupp,string")
    args = ap.parse_args()
    print(f"one thread, best of {args.repeat}")
    for case in args.cases.split(","):
        run_case(args.data, case, args.repeat)


if __name__ == "__main__":
    main()
