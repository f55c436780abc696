"""Ray runner benchmark: Millstream on Ray vs Millstream local vs Ray Data, same data.

Usage (from the repository root):

    /work/venv/bin/python benchmarks/ray_runner.py --size-mb 256
    /work/venv/bin/python benchmarks/ray_runner.py --size-mb 64 --workloads wordcount --repeat 3

Workloads:

- ``wordcount``: the corpus of ``benchmarks/wordcount.py`` (same generator, same cache,
  same ground truth): lower-case, split on whitespace, count per word.
- ``groupby``: Parquet files of ``(key int64, value int64)`` rows, about ``--size-mb`` of
  Arrow data, 1 M distinct keys; ``count``, ``sum`` and ``mean`` of ``value`` per key. The
  ground truth (pyarrow's own group-by) is recorded when the data is generated.

Engines, each in its own measured subprocess (summed RSS/PSS of the process tree, which
includes Ray's raylet, GCS, workers and the object store's shared memory):

- ``millstream-local``: the local runner (``parallelism`` worker processes);
- ``millstream-ray``: the Ray runner on a one-node Ray that the engine starts itself
  (``num_cpus = parallelism``, ``--object-store-mb``);
- ``ray-data``: Ray Data on the same one-node Ray settings (``ray.data.read_text`` /
  ``read_parquet``, ``groupby``).

Ray runs with its own temporary directory and HOME (token file) per run; afterwards any
process left with that directory on its command line is killed by PID (never ``ray stop``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    DATA_DIR,
    RESULTS_DIR,
    EngineResult,
    check_outcome,
    checksum_from_arrow,
    compare_checksums,
    environment_info,
    format_table,
    module_available,
    own_ray,
    run_worker,
    warm_page_cache,
    write_results,
    write_worker_error,
)
from wordcount import DEFAULT_SEED, DEFAULT_VOCAB, ensure_corpus  # noqa: E402

ENGINES = ("millstream-local", "millstream-ray", "ray-data")
WORKLOADS = ("wordcount", "groupby")
REFERENCE_ENGINE = "millstream-local"
GROUPBY_VERSION = 1
GROUPBY_KEYS = 1_000_000
GROUPBY_FILES = 8


# =========================================================================== group-by data


def groupby_paths(size_mb: int, seed: int, data_dir: Path = DATA_DIR) -> tuple[Path, Path]:
    """The cached group-by dataset directory and its metadata file."""
    stem = f"groupby-{size_mb}mb-seed{seed}-v{GROUPBY_VERSION}"
    return data_dir / stem, data_dir / f"{stem}.json"


def groupby_checksum(table: Any) -> dict[str, Any]:
    """Summarize a (key, count, sum) result: groups, totals and a digest of all rows."""
    import pyarrow as pa

    if not isinstance(table, pa.Table):
        table = pa.table(table)
    table = table.sort_by("key")
    digest = hashlib.sha256()
    keys = table.column("key").to_numpy()
    counts = table.column("n").to_numpy()
    sums = table.column("s").to_numpy()
    step = 1 << 16
    for i in range(0, len(keys), step):
        digest.update(keys[i:i + step].astype("<i8").tobytes())
        digest.update(counts[i:i + step].astype("<i8").tobytes())
        digest.update(sums[i:i + step].astype("<i8").tobytes())
    import numpy as np

    top = np.lexsort((keys, -counts))[:10]
    return {
        "distinct": len(keys),
        "duplicate_keys": int((keys[1:] == keys[:-1]).sum()),
        "total": int(counts.sum()),
        "top": [[int(keys[i]), int(counts[i])] for i in top],
        "digest": digest.hexdigest(),
    }


def ensure_groupby_data(size_mb: int, seed: int, data_dir: Path = DATA_DIR
                        ) -> tuple[Path, dict[str, Any]]:
    """Generate (once) the group-by Parquet files and their ground truth."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    path, meta_path = groupby_paths(size_mb, seed, data_dir)
    if path.is_dir() and meta_path.exists():
        return path, json.loads(meta_path.read_text())
    rows = size_mb * 1024 * 1024 // 16  # two int64 columns
    print(f"generating group-by data: {rows:,} rows, {GROUPBY_KEYS:,} keys -> {path} ...",
          flush=True)
    t0 = time.perf_counter()
    tmp = path.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    per_file = -(-rows // GROUPBY_FILES)
    parts = []
    for i in range(GROUPBY_FILES):
        n = min(per_file, rows - i * per_file)
        # skewed keys: a quarter of the rows on 1% of the keys
        hot = rng.random(n) < 0.25
        key = np.where(hot, rng.integers(0, GROUPBY_KEYS // 100, n), rng.integers(0, GROUPBY_KEYS, n))
        value = rng.integers(0, 1000, n)
        t = pa.table({"key": pa.array(key, pa.int64()), "value": pa.array(value, pa.int64())})
        pq.write_table(t, tmp / f"part-{i:03d}.parquet", row_group_size=1 << 20)
        parts.append(t)
    agg = pa.concat_tables(parts).group_by("key").aggregate([("value", "count"), ("value", "sum")])
    truth = pa.table({"key": agg.column("key"), "n": agg.column("value_count"),
                      "s": agg.column("value_sum")})
    os.replace(tmp, path)
    meta = {"version": GROUPBY_VERSION, "seed": seed, "size_mb": size_mb, "rows": rows,
            "keys": GROUPBY_KEYS, "files": GROUPBY_FILES,
            "parquet_bytes": sum(f.stat().st_size for f in path.iterdir()),
            "generate_s": round(time.perf_counter() - t0, 2),
            "checksum": groupby_checksum(truth)}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return path, meta


# =========================================================================== engines
# Each runs in the worker subprocess and returns (checksum, details with init_s/query_s).


def _ray_init(parallelism: int, object_store_mb: int) -> float:
    """Start a one-node Ray for this process (Ray Data); return the seconds it took."""
    import logging

    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=parallelism, object_store_memory=object_store_mb << 20,
             include_dashboard=False, logging_level=logging.WARNING)
    return time.perf_counter() - t0


def _millstream_start(engine: str, parallelism: int, object_store_mb: int) -> tuple[Any, float]:
    """Start Millstream on its runner (and Ray for the Ray runner); return (ms, seconds)."""
    import millstream as ms

    t0 = time.perf_counter()
    if engine == "millstream-ray":
        from millstream.runners.ray import connect

        # the same one-node Ray as Ray Data gets; the runner then uses this connection
        connect(num_cpus=parallelism, object_store_memory=object_store_mb << 20,
                include_dashboard=False)
        ms.init(runner="ray", parallelism=parallelism, progress=False)
        ms.range(1).count()  # the runner connects lazily: make init include it
    else:
        ms.init(parallelism=parallelism, progress=False)
        ms.range(1).count()  # start the worker pool
    return ms, time.perf_counter() - t0


def run_millstream(engine: str, workload: str, path: str, parallelism: int,
                   object_store_mb: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Millstream (either runner): vectorized expressions over Arrow batches."""
    ms, init = _millstream_start(engine, parallelism, object_store_mb)
    t1 = time.perf_counter()
    if workload == "wordcount":
        table = (ms.read_text(path)
                 .select(ms.col("text").str.lower().str.split().alias("word"))
                 .explode("word")
                 .filter(ms.col("word") != "")
                 .group_by("word").agg(ms.count().alias("count"))
                 .to_arrow())
        checksum = checksum_from_arrow(table.select(["word", "count"]))
    else:
        table = (ms.read_parquet(path)
                 .group_by("key").agg(ms.count().alias("n"), ms.sum("value").alias("s"),
                                      ms.mean("value").alias("m"))
                 .to_arrow())
        checksum = groupby_checksum(table.select(["key", "n", "s"]))
    query = time.perf_counter() - t1
    stats = ms.last_job_stats()
    ms.shutdown()
    if engine == "millstream-ray":
        import ray

        ray.shutdown()
    return checksum, {"init_s": init, "query_s": query,
                      "stages": [(s["purpose"], s["tasks"]) for s in stats.stages]}


def run_ray_data(engine: str, workload: str, path: str, parallelism: int,
                 object_store_mb: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Ray Data: read_text / read_parquet, map_batches with pyarrow compute, groupby."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray
    from ray.data import DataContext

    init = _ray_init(parallelism, object_store_mb)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    t1 = time.perf_counter()
    if workload == "wordcount":
        def words(batch: pa.Table) -> pa.Table:
            """Lower-case, split on whitespace, one row per non-empty word."""
            flat = pc.list_flatten(pc.utf8_split_whitespace(pc.utf8_lower(batch["text"])))
            return pa.table({"word": pc.filter(flat, pc.not_equal(flat, ""))})

        ds = ray.data.read_text(path).map_batches(words, batch_format="pyarrow")
        counts = ds.groupby("word").count()
        table = pa.concat_tables(ray.get(counts.to_arrow_refs()))
        checksum = checksum_from_arrow(table.select(["word", "count()"]))
    else:
        from ray.data.aggregate import Count, Mean, Sum

        ds = ray.data.read_parquet(path)
        out = ds.groupby("key").aggregate(Count(alias_name="n"), Sum("value", alias_name="s"),
                                          Mean("value", alias_name="m"))
        table = pa.concat_tables(ray.get(out.to_arrow_refs()))
        checksum = groupby_checksum(table.select(["key", "n", "s"]))
    query = time.perf_counter() - t1
    ray.shutdown()
    return checksum, {"init_s": init, "query_s": query}


def worker_main(args: argparse.Namespace) -> int:
    """Run one engine on one workload in this (sub)process; write the outcome as JSON."""
    out = Path(args.result_file)
    fn = run_ray_data if args.worker == "ray-data" else run_millstream
    try:
        checksum, details = fn(args.worker, args.workload, args.input, args.parallelism,
                               args.object_store_mb)
    except BaseException as e:
        return write_worker_error(out, e)
    out.write_text(json.dumps({"compute_s": details["init_s"] + details["query_s"],
                               "checksum": checksum, "details": details}, default=str))
    return 0


# =========================================================================== harness


def run_once(engine: str, workload: str, data: Path, args: argparse.Namespace,
             log_path: Path) -> tuple[dict[str, Any], Any]:
    """One measured run of an engine on a workload."""
    base, env, kill_ray = own_ray()
    result_file = Path(base) / "result.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", engine,
           "--workload", workload, "--input", str(data), "--result-file", str(result_file),
           "--parallelism", str(args.parallelism), "--object-store-mb", str(args.object_store_mb)]

    def cleanup() -> None:
        left = kill_ray()
        if left:
            print(f"(killed {len(left)} leftover process(es) of this run)", end=" ", flush=True)

    outcome, run = run_worker(cmd, result_file, env=env, timeout_s=args.timeout,
                              log_path=log_path, with_pss=not args.no_pss, cleanup=cleanup)
    return check_outcome(outcome, run, args.timeout), run


def _fmt(value: float | None, digits: int = 2) -> str:
    """A number for the table, '-' when missing."""
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(workload: str, results: list[EngineResult]) -> None:
    """One table per workload: times, ratios to the local runner, peak memory."""
    ref = next((r for r in results if r.engine == REFERENCE_ENGINE and r.status == "ok"), None)
    headers = ["engine", "wall s", "compute s", "init s", "query s", "x local (query)",
               "x local (wall)", "peak RSS MB", "peak PSS MB", "procs", "status"]
    rows = []
    for r in results:
        ok = r.status == "ok"
        best = min(r.runs, key=lambda x: x["compute_s"]) if ok and r.runs else {}
        det = best.get("details", {})
        ref_best = min(ref.runs, key=lambda x: x["compute_s"]) if ref and ref.runs else {}
        ref_q = ref_best.get("details", {}).get("query_s")
        q = det.get("query_s")
        rows.append([
            r.engine, _fmt(r.best_wall if ok else None), _fmt(r.best_compute if ok else None),
            _fmt(det.get("init_s")), _fmt(q),
            f"{q / ref_q:.2f}" if q and ref_q else "n/a",
            f"{r.best_wall / ref.best_wall:.2f}" if ok and ref and ref.best_wall else "n/a",
            _fmt(max(r.peak_rss_mb) if ok and r.peak_rss_mb else None, 0),
            _fmt(max(r.peak_pss_mb) if ok and r.peak_pss_mb else None, 0),
            str(r.max_processes) if ok else "-",
            r.status if not r.message else f"{r.status}: {r.message}",
        ])
    print(f"\n== {workload} ==")
    print(format_table(headers, rows))


def harness_main(args: argparse.Namespace) -> int:
    """Prepare the data, run every engine on every workload, verify, report."""
    for engine in args.engines:
        if engine != "millstream-local" and not module_available("ray"):
            print(f"{engine} needs Ray: pip install 'millstream[ray]'", file=sys.stderr)
            return 3
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_dir = RESULTS_DIR / "logs" / f"ray_runner-{stamp}"
    log_dir.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {"benchmark": "ray_runner", "timestamp": stamp,
                               "args": {k: v for k, v in vars(args).items()
                                        if k not in ("worker", "result_file", "input", "workload")},
                               "workloads": {}}
    wrong = False
    for workload in args.workloads:
        if workload == "wordcount":
            data, meta = ensure_corpus(args.size_mb, args.seed, Path(args.data_dir), DEFAULT_VOCAB)
            warm_page_cache(data)
            print(f"wordcount corpus {data.name}: {meta['bytes'] / 2**20:.0f} MB, "
                  f"{meta['tokens']:,} words", flush=True)
        else:
            data, meta = ensure_groupby_data(args.size_mb, args.seed, Path(args.data_dir))
            for f in sorted(data.iterdir()):
                warm_page_cache(f)
            print(f"groupby data {data.name}: {meta['rows']:,} rows, {meta['keys']:,} keys, "
                  f"{meta['parquet_bytes'] / 2**20:.0f} MB Parquet", flush=True)
        expected = meta["checksum"]
        results = {e: EngineResult(engine=e, status="ok") for e in args.engines}
        for rep in range(args.repeat):
            for engine, res in results.items():
                if res.status != "ok":
                    continue
                print(f"[{rep + 1}/{args.repeat}] {workload} {engine} ...", end=" ", flush=True)
                log_path = log_dir / f"{workload}-{engine}-{rep + 1}.log"
                outcome, run = run_once(engine, workload, data, args, log_path)
                if "error" in outcome:
                    res.status = "timeout" if outcome.get("timeout") else "error"
                    res.message = outcome["error"]
                    print(f"{res.status}: {res.message} (log: {log_path})", flush=True)
                    continue
                problems = compare_checksums(expected, outcome["checksum"])
                res.add_run(run, float(outcome["compute_s"]))
                res.checksum = outcome["checksum"]
                res.runs.append({"wall_s": run.wall_s, "compute_s": float(outcome["compute_s"]),
                                 "peak_rss_mb": run.peak_rss_mb, "peak_pss_mb": run.peak_pss_mb,
                                 "processes": run.max_processes,
                                 "details": outcome.get("details", {})})
                d = outcome.get("details", {})
                print(f"{run.wall_s:.2f} s wall, init {d.get('init_s', 0):.2f} s, query "
                      f"{d.get('query_s', 0):.2f} s, peak PSS {run.peak_pss_mb or 0:.0f} MB, "
                      f"{'ok' if not problems else 'WRONG RESULT'}", flush=True)
                if problems:
                    res.status, res.message = "WRONG", "; ".join(problems)[:200]
                    wrong = True
        ordered = list(results.values())
        print_table(workload, ordered)
        payload["workloads"][workload] = {
            "data": {k: v for k, v in meta.items() if k != "checksum"} | {"path": str(data)},
            "expected": expected, "results": [r.to_json() for r in ordered]}
    print("\nwall = whole subprocess (interpreter, imports, Ray start, query, result in Python);")
    print("init = engine start (Ray start + connect, or the local worker pool); query = the job;")
    print("x local = ratio to millstream-local (best of repeats); memory = max over repeats of")
    print("the summed process tree (PSS counts the object store's shared memory once).")
    payload["environment"] = environment_info(["millstream", "ray", "pyarrow", "numpy", "psutil"])
    out = write_results("ray_runner", payload)
    print(f"results: {out}\nlogs:    {log_dir}")
    return 2 if wrong else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size-mb", type=int, default=256,
                   help="word count corpus size, and group-by data size (Arrow), in MiB")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated")
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated")
    p.add_argument("--parallelism", type=int, default=os.cpu_count() or 1)
    p.add_argument("--object-store-mb", type=int, default=1024,
                   help="Ray object store size for both Ray engines")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--data-dir", default=str(DATA_DIR))
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    p.add_argument("--no-pss", action="store_true", help="sample RSS only (cheaper)")
    p.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--workload", choices=WORKLOADS, help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.worker:
        args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
        args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
        bad = [w for w in args.workloads if w not in WORKLOADS] + \
              [e for e in args.engines if e not in ENGINES]
        if bad:
            p.error(f"unknown workload(s)/engine(s) {bad}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point: harness by default, one engine run with --worker."""
    args = parse_args(argv)
    return worker_main(args) if args.worker else harness_main(args)


if __name__ == "__main__":
    sys.exit(main())
