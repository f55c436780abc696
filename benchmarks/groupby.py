"""Group-by benchmark: the db-benchmark (h2oai / DuckDB Labs) group-by questions q1-q5 on
1e7 rows, Millstream against DuckDB and Polars in the same run.

Usage (from the repository root):

    python benchmarks/groupby.py                                # 1e7 rows, q1-q5, parallelism 2
    python benchmarks/groupby.py --rows 1000000 --repeat 5 --queries q1,q3
    python benchmarks/groupby.py --engines millstream,duckdb --parallelism 2

The data is db-benchmark's G1 table (``id1..id6, v1..v3``; K = 100 groups for the low
cardinality keys, N/K for the high ones), generated once with numpy into a Parquet file
under benchmarks/data/. Every (engine, query) runs in its own measured subprocess: the query
reads the Parquet file and ends with an Arrow table in the driver, repeated ``--repeat``
times (best time reported); the harness samples the process tree's peak RSS/PSS and CPU.
Every result is checked against DuckDB's (row count, keys, column sums).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    DATA_DIR,
    RESULTS_DIR,
    add_worker_args,
    check_engine_args,
    check_outcome,
    environment_info,
    format_table,
    module_available,
    run_worker,
    warm_page_cache,
    write_results,
    write_worker_error,
)

ALL_ENGINES = ("millstream", "duckdb", "polars")
REFERENCE = "duckdb"
GENERATOR_VERSION = 1

#: question -> (keys, [(column, function)]) as in db-benchmark's groupby-*.py
QUERIES: dict[str, tuple[list[str], list[tuple[str, str]]]] = {
    "q1": (["id1"], [("v1", "sum")]),
    "q2": (["id1", "id2"], [("v1", "sum")]),
    "q3": (["id3"], [("v1", "sum"), ("v3", "mean")]),
    "q4": (["id4"], [("v1", "mean"), ("v2", "mean"), ("v3", "mean")]),
    "q5": (["id6"], [("v1", "sum"), ("v2", "sum"), ("v3", "sum")]),
}
DESCRIPTIONS = {
    "q1": "sum v1 by id1 (100 groups)",
    "q2": "sum v1 by id1, id2 (10,000 groups)",
    "q3": "sum v1, mean v3 by id3 (N/100 groups)",
    "q4": "mean v1, v2, v3 by id4 (100 groups)",
    "q5": "sum v1, v2, v3 by id6 (N/100 groups)",
}


# =========================================================================== data


def data_path(rows: int, k: int, seed: int, data_dir: Path = DATA_DIR) -> Path:
    return data_dir / f"groupby-G1-{rows}-k{k}-seed{seed}-v{GENERATOR_VERSION}.parquet"


def ensure_data(rows: int, k: int, seed: int, data_dir: Path = DATA_DIR) -> Path:
    """db-benchmark's G1 table (as its groupby-datagen.R makes it), generated once."""
    path = data_path(rows, k, seed, data_dir)
    if path.exists():
        return path
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    print(f"generating {rows:,} rows (K={k}) -> {path} ...", flush=True)
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)

    def ids(levels: int, width: int) -> pa.Array:
        names = pa.array([f"id{i:0{width}d}" for i in range(1, levels + 1)])
        return names.take(pa.array(rng.integers(0, levels, rows)))

    table = pa.table({
        "id1": ids(k, 3), "id2": ids(k, 3), "id3": ids(max(1, rows // k), 10),
        "id4": rng.integers(1, k + 1, rows), "id5": rng.integers(1, k + 1, rows),
        "id6": rng.integers(1, max(1, rows // k) + 1, rows),
        "v1": rng.integers(1, 6, rows), "v2": rng.integers(1, 16, rows),
        "v3": np.round(rng.random(rows) * 100, 6),
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp, row_group_size=1 << 20)
    os.replace(tmp, path)
    print(f"  {path.stat().st_size / 2**20:.0f} MB in {time.perf_counter() - t0:.1f} s",
          flush=True)
    return path


# =========================================================================== engines


def _tree_cpu() -> float:
    """CPU seconds of this process and its live descendants (Millstream's workers)."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            continue
    return total


def _millstream(path: str, q: str, parallelism: int) -> Any:
    import millstream as ms

    keys, aggs = QUERIES[q]
    fns = {"sum": ms.sum, "mean": ms.mean}
    items = [fns[f](c).alias(f"{f}_{c}") for c, f in aggs]
    return lambda: ms.read_parquet(path).group_by(*keys).agg(*items).to_arrow()


def _duckdb(path: str, q: str, parallelism: int) -> Any:
    import duckdb

    con = duckdb.connect(":memory:")
    con.execute(f"SET threads = {int(parallelism)}")
    keys, aggs = QUERIES[q]
    sel = ", ".join(f"{'avg' if f == 'mean' else f}({c}) AS {f}_{c}" for c, f in aggs)
    sql = f"SELECT {', '.join(keys)}, {sel} FROM read_parquet(?) GROUP BY {', '.join(keys)}"
    return lambda: con.execute(sql, [path]).to_arrow_table()


def _polars(path: str, q: str, parallelism: int) -> Any:
    import polars as pl

    keys, aggs = QUERIES[q]
    exprs = [getattr(pl.col(c), f)().alias(f"{f}_{c}") for c, f in aggs]
    return lambda: pl.scan_parquet(path).group_by(keys).agg(exprs).collect().to_arrow()


ENGINES = {"millstream": _millstream, "duckdb": _duckdb, "polars": _polars}


def checksum(table: Any, q: str) -> dict[str, Any]:
    """Rows, a digest of the sorted keys and the sum of every aggregate column."""
    import hashlib

    keys, aggs = QUERIES[q]
    t = table.sort_by([(k, "ascending") for k in keys])
    digest = hashlib.sha256()
    for k in keys:
        digest.update(json.dumps(t.column(k).to_pylist()).encode())
    import pyarrow.compute as pc

    sums = {f"{f}_{c}": float(pc.sum(t.column(f"{f}_{c}").cast("float64")).as_py() or 0.0)
            for c, f in aggs}
    return {"rows": t.num_rows, "keys": digest.hexdigest(), "sums": sums}


def worker_main(args: argparse.Namespace) -> int:
    """Run one query on one engine, ``--repeat`` times; write the outcome as JSON."""
    out = Path(args.result_file)
    try:
        if args.worker == "millstream":
            import millstream as ms

            t0 = time.perf_counter()
            ms.init(parallelism=args.parallelism, memory_limit=args.memory_limit_bytes)
            init = time.perf_counter() - t0
        else:
            init = 0.0
        run = ENGINES[args.worker](args.input, args.query, args.parallelism)
        times, cpus = [], []
        result = None
        for _ in range(args.repeat):
            c0, t0 = _tree_cpu(), time.perf_counter()
            result = run()
            times.append(time.perf_counter() - t0)
            cpus.append(_tree_cpu() - c0)
        best = min(range(len(times)), key=times.__getitem__)
        details = {"init_s": init, "times_s": times, "cpu_s": cpus}
        out.write_text(json.dumps({"query_s": times[best], "query_cpu_s": cpus[best],
                                   "compute_s": init + times[best],
                                   "checksum": checksum(result, args.query),
                                   "details": details}))
        if args.worker == "millstream":
            ms.shutdown()
    except BaseException as e:  # noqa: BLE001 - reported to the harness
        return write_worker_error(out, e)
    return 0


# =========================================================================== harness


def same_result(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a["rows"] != b["rows"] or a["keys"] != b["keys"]:
        return False
    return all(abs(a["sums"][k] - b["sums"][k]) <= 1e-9 * max(1.0, abs(b["sums"][k]))
               for k in b["sums"])


def harness_main(args: argparse.Namespace) -> int:
    path = ensure_data(args.rows, args.k, args.seed, Path(args.data_dir))
    if args.generate_only:
        return 0
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_dir = RESULTS_DIR / "logs" / f"groupby-{stamp}"
    log_dir.mkdir(parents=True, exist_ok=True)
    engines = [e for e in args.engines if module_available(e)]
    for e in args.engines:
        if e not in engines:
            print(f"[skip] {e}: not installed", flush=True)
    print(f"{path.name}: {args.rows:,} rows; parallelism {args.parallelism}, "
          f"repeat {args.repeat} per process", flush=True)
    warm_page_cache(path)
    results: dict[tuple[str, str], dict[str, Any]] = {}
    for q in args.queries:
        for engine in engines:
            with tempfile.NamedTemporaryFile(prefix=f"gb-{engine}-", suffix=".json",
                                             delete=False) as tf:
                result_file = Path(tf.name)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", engine,
                   "--input", str(path), "--result-file", str(result_file), "--query", q,
                   "--parallelism", str(args.parallelism), "--repeat", str(args.repeat)]
            if args.memory_limit:
                cmd += ["--memory-limit", args.memory_limit]
            env = dict(os.environ, POLARS_MAX_THREADS=str(args.parallelism))
            outcome, run = run_worker(cmd, result_file, env=env, timeout_s=args.timeout,
                                      log_path=log_dir / f"{engine}-{q}.log",
                                      with_pss=not args.no_pss)
            outcome = check_outcome(outcome, run, args.timeout)
            outcome["peak_rss_mb"] = run.peak_rss_mb
            outcome["peak_pss_mb"] = run.peak_pss_mb
            outcome["process_cpu_s"] = run.cpu_s
            outcome["wall_s"] = run.wall_s
            results[(engine, q)] = outcome
            msg = outcome.get("error") or (f"{outcome['query_s']:.3f} s, cpu "
                                           f"{outcome['query_cpu_s']:.2f} s, peak RSS "
                                           f"{run.peak_rss_mb:.0f} MB")
            print(f"{q} {engine}: {msg}", flush=True)
    wrong = 0
    for (_engine, q), res in results.items():
        ref = results.get((REFERENCE, q))
        if "error" in res or ref is None or "error" in ref:
            continue
        res["correct"] = same_result(res["checksum"], ref["checksum"])
        wrong += not res["correct"]
    print_table(results, engines, args.queries)
    payload = {"benchmark": "groupby", "timestamp": stamp,
               "args": {k: v for k, v in vars(args).items()
                        if k not in ("worker", "result_file", "input")},
               "data": str(path),
               "environment": environment_info(["millstream", "pyarrow", "polars", "duckdb",
                                                "numpy", "psutil"]),
               "results": [{"engine": e, "query": q, **r} for (e, q), r in results.items()]}
    out = write_results("groupby", payload)
    print(f"results: {out}\nlogs:    {log_dir}")
    return 2 if wrong else 0


def print_table(results: dict[tuple[str, str], dict[str, Any]], engines: list[str],
                queries: list[str]) -> None:
    headers = ["query", "engine", "query s", f"x {REFERENCE}", "cpu s", "peak RSS MB",
               "peak PSS MB", "status"]
    rows = []
    ratios: dict[str, list[float]] = {e: [] for e in engines}
    for q in queries:
        ref = results.get((REFERENCE, q), {})
        for e in engines:
            r = results.get((e, q), {})
            if "error" in r:
                rows.append([q, e, "-", "-", "-", "-", "-", f"error: {r['error'][:60]}"])
                continue
            ratio = r["query_s"] / ref["query_s"] if ref.get("query_s") else None
            if ratio:
                ratios[e].append(ratio)
            pss = r.get("peak_pss_mb")
            rows.append([q, e, f"{r['query_s']:.3f}", f"{ratio:.2f}" if ratio else "-",
                         f"{r['query_cpu_s']:.2f}", f"{r['peak_rss_mb']:.0f}",
                         f"{pss:.0f}" if pss else "-",
                         "ok" if r.get("correct", True) else "WRONG"])
    print()
    print(format_table(headers, rows))
    print()
    import math

    for e, rs in ratios.items():
        if rs:
            geo = math.exp(sum(math.log(x) for x in rs) / len(rs))
            print(f"{e}: geometric mean {geo:.2f}x {REFERENCE} over {len(rs)} queries")
    print("\nquery s = best of --repeat runs in one process (Parquet file -> Arrow table in "
          "the driver); cpu s = CPU of that run, the process and its workers; peak memory = "
          "the process tree over the whole run (sampled every 50 ms).")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--k", type=int, default=100, help="groups of the low-cardinality keys")
    p.add_argument("--queries", default=",".join(QUERIES))
    p.add_argument("--engines", default=",".join(ALL_ENGINES),
                   help=f"comma-separated, from: {', '.join(ALL_ENGINES)} (or 'all')")
    p.add_argument("--parallelism", type=int, default=2,
                   help="Millstream workers, DuckDB threads, POLARS_MAX_THREADS")
    p.add_argument("--repeat", type=int, default=3, help="runs per query (best is shown)")
    p.add_argument("--memory-limit", default=None)
    p.add_argument("--seed", type=int, default=108)
    p.add_argument("--data-dir", default=str(DATA_DIR))
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--no-pss", action="store_true")
    p.add_argument("--generate-only", action="store_true")
    p.add_argument("--query", help=argparse.SUPPRESS)
    p.add_argument("--size-mb", type=int, default=1, help=argparse.SUPPRESS)
    add_worker_args(p, ALL_ENGINES)
    args = p.parse_args(argv)
    check_engine_args(p, args, ALL_ENGINES)
    args.queries = [q.strip() for q in args.queries.split(",") if q.strip()]
    unknown = [q for q in args.queries if q not in QUERIES]
    if unknown:
        p.error(f"unknown queries {unknown}; choose from {list(QUERIES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    return harness_main(args)


if __name__ == "__main__":
    sys.exit(main())
