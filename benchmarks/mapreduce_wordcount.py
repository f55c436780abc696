"""MapReduce word count: Millstream's MapReduceJob (row-wise) against the vectorized Dataset
API, plain Python and mrjob's inline and local runners, on the same corpus.

Usage (from the repository root):

    /work/venv/bin/python benchmarks/mapreduce_wordcount.py --size-mb 32
    /work/venv/bin/python benchmarks/mapreduce_wordcount.py --size-mb 64 --engines job,dataset

Every engine runs in its own subprocess; the harness samples the summed RSS/PSS of that
process tree (benchmarks/common.py), checks each result against the ground truth the
corpus generator recorded (benchmarks/wordcount.py), prints a table with time ratios to
the MapReduceJob run and writes JSON to benchmarks/results/. mrjob is optional
(``pip install mrjob``); without it its engines are reported as skipped.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    DATA_DIR,
    RESULTS_DIR,
    EngineResult,
    add_ratios,
    add_worker_args,
    check_engine_args,
    check_outcome,
    checksum_from_pairs,
    compare_checksums,
    engine_worker_main,
    environment_info,
    format_table,
    mark_unavailable,
    module_available,
    run_worker,
    warm_page_cache,
    write_results,
)
from wordcount import (  # noqa: E402
    DEFAULT_SEED,
    DEFAULT_VOCAB,
    EngineUnavailable,
    ensure_corpus,
    run_millstream,
    run_python,
)

ALL_ENGINES = ("python", "job", "job-nocombiner", "dataset", "mrjob-inline", "mrjob-local")
DEFAULT_ENGINES = ("python", "job", "job-nocombiner", "dataset", "mrjob-inline", "mrjob-local")
REFERENCE_ENGINE = "job"
DESCRIPTIONS = {
    "python": "plain Python: Counter over lines, one process",
    "job": "ms.MapReduceJob: mapper + combiner + reducer (row-wise Python)",
    "job-nocombiner": "ms.MapReduceJob without combiner: every pair shuffled, external sort",
    "dataset": "ms Dataset API, vectorized (examples/wordcount.py)",
    "mrjob-inline": "mrjob inline runner (one process)",
    "mrjob-local": "mrjob local runner (subprocesses, --num-cores)",
}

Timed = tuple[dict[str, Any], dict[str, Any]]

MRJOB_SCRIPT = '''\
"""Word count for mrjob (written by benchmarks/mapreduce_wordcount.py)."""
from mrjob.job import MRJob


class MRWordCount(MRJob):
    def mapper(self, _, line):
        for word in line.lower().split():
            yield word, 1

    def combiner(self, word, counts):
        yield word, sum(counts)

    def reducer(self, word, counts):
        yield word, sum(counts)


if __name__ == "__main__":
    MRWordCount.run()
'''


# =========================================================================== engines


def _job_classes(ms: Any) -> tuple[type, type]:
    """The Millstream word count jobs (defined here so they ship to workers by value)."""

    class WordCount(ms.MapReduceJob):
        def mapper(self, _key: Any, line: str) -> Any:
            for word in line.lower().split():
                yield word, 1

        def combiner(self, word: str, counts: Any) -> Any:
            yield word, sum(counts)

        def reducer(self, word: str, counts: Any) -> Any:
            yield word, sum(counts)

    class WordCountNoCombiner(ms.MapReduceJob):
        def mapper(self, _key: Any, line: str) -> Any:
            for word in line.lower().split():
                yield word, 1

        def reducer(self, word: str, counts: Any) -> Any:
            n = 0
            for _ in counts:
                n += 1
            yield word, n

    return WordCount, WordCountNoCombiner


def _run_job(path: str, parallelism: int, memory_limit: int | None, combiner: bool) -> Timed:
    try:
        import millstream as ms
    except ImportError as e:
        raise EngineUnavailable(f"millstream is not importable ({e}): pip install -e .") from e
    if not hasattr(ms, "MapReduceJob"):
        raise EngineUnavailable("millstream.MapReduceJob does not exist in this checkout")
    t0 = time.perf_counter()
    ms.init(parallelism=parallelism, memory_limit=memory_limit, progress=False)
    init = time.perf_counter() - t0
    with_combiner, without = _job_classes(ms)
    job = with_combiner() if combiner else without()
    t1 = time.perf_counter()
    pairs = job.run(path)
    query = time.perf_counter() - t1
    checksum = checksum_from_pairs(pairs)
    stages = [{k: s[k] for k in ("purpose", "tasks", "rows_in", "rows_out", "seconds")}
              for s in job.stats.stages]
    counters = {f"{g}:{n}": v for (g, n), v in sorted(job.counters.items())}
    ms.shutdown()
    return checksum, {"init_s": init, "query_s": query, "parallelism": parallelism,
                      "stages": stages, "counters": counters}


def run_job(path: str, parallelism: int, memory_limit: int | None) -> Timed:
    """MapReduceJob with a combiner."""
    return _run_job(path, parallelism, memory_limit, combiner=True)


def run_job_nocombiner(path: str, parallelism: int, memory_limit: int | None) -> Timed:
    """MapReduceJob without a combiner: the shuffle and the reducer see every pair."""
    return _run_job(path, parallelism, memory_limit, combiner=False)


def _mrjob(path: str, parallelism: int, runner: str) -> Timed:
    if not module_available("mrjob"):
        raise EngineUnavailable("mrjob is not installed: pip install mrjob")
    import importlib.util

    workdir = tempfile.mkdtemp(prefix="mr-bench-mrjob-")
    script = os.path.join(workdir, "mrjob_wordcount.py")
    with open(script, "w") as f:
        f.write(MRJOB_SCRIPT)
    spec = importlib.util.spec_from_file_location("mrjob_wordcount", script)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["mrjob_wordcount"] = mod  # mrjob finds the script through the class's module
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    args = ["-r", runner, "--no-conf", "--local-tmp-dir", workdir, path]
    if runner == "local":
        args[3:3] = ["--num-cores", str(parallelism)]
    t0 = time.perf_counter()
    job = mod.MRWordCount(args=args)
    with job.make_runner() as r:
        r.run()
        pairs = list(job.parse_output(r.cat_output()))
    query = time.perf_counter() - t0
    import mrjob

    return checksum_from_pairs(pairs), {"init_s": 0.0, "query_s": query,
                                        "mrjob": mrjob.__version__, "runner": runner}


def run_mrjob_inline(path: str, parallelism: int, memory_limit: int | None) -> Timed:
    """mrjob's inline runner: every step in this process."""
    return _mrjob(path, parallelism, "inline")


def run_mrjob_local(path: str, parallelism: int, memory_limit: int | None) -> Timed:
    """mrjob's local runner: tasks in subprocesses, ``--num-cores`` at a time."""
    return _mrjob(path, parallelism, "local")


ENGINES: dict[str, Callable[[str, int, int | None], Timed]] = {
    "python": run_python,
    "job": run_job,
    "job-nocombiner": run_job_nocombiner,
    "dataset": run_millstream,
    "mrjob-inline": run_mrjob_inline,
    "mrjob-local": run_mrjob_local,
}


def worker_main(args: argparse.Namespace) -> int:
    """Run one engine in this (sub)process and write its outcome as JSON."""
    return engine_worker_main(ENGINES[args.worker], args)


# =========================================================================== harness


def availability(engine: str) -> str | None:
    """Why an engine cannot run here, or None."""
    if engine.startswith("mrjob") and not module_available("mrjob"):
        return "mrjob is not installed: pip install mrjob"
    if engine in ("job", "job-nocombiner", "dataset") and not module_available("millstream"):
        return "millstream is not importable: pip install -e ."
    return None


def run_engine_once(engine: str, corpus: Path, args: argparse.Namespace,
                    log_path: Path) -> tuple[dict[str, Any], Any]:
    """Run one engine once in a measured subprocess; return (outcome, measurement)."""
    with tempfile.NamedTemporaryFile(prefix=f"mrwc-{engine}-", suffix=".json",
                                     delete=False) as tf:
        result_file = Path(tf.name)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", engine, "--input",
           str(corpus), "--result-file", str(result_file), "--parallelism", str(args.parallelism)]
    if args.memory_limit:
        cmd += ["--memory-limit", args.memory_limit]
    outcome, run = run_worker(cmd, result_file, timeout_s=args.timeout, log_path=log_path,
                              with_pss=not args.no_pss)
    return check_outcome(outcome, run, args.timeout), run


def print_table(results: list[EngineResult], meta: dict[str, Any]) -> None:
    """The summary table, with time ratios to the MapReduceJob run."""
    ref = next((r for r in results if r.engine == REFERENCE_ENGINE and r.status == "ok"), None)
    ref_wall = ref.best_wall if ref else None
    headers = ["engine", "wall s", "compute s", "x job", "M words/s", "peak RSS MB",
               "peak PSS MB", "procs", "status"]
    rows = []
    for r in results:
        ok = r.status in ("ok", "WRONG")
        ratio = f"{r.best_wall / ref_wall:.2f}" if ok and ref_wall and r.best_wall else "n/a"
        rate = (f"{meta['tokens'] / r.best_compute / 1e6:.2f}"
                if ok and r.best_compute else "-")
        rows.append([
            r.engine,
            f"{r.best_wall:.2f}" if ok and r.best_wall else "-",
            f"{r.best_compute:.2f}" if ok and r.best_compute else "-",
            ratio, rate,
            f"{max(r.peak_rss_mb):.0f}" if ok and r.peak_rss_mb else "-",
            f"{max(r.peak_pss_mb):.0f}" if ok and r.peak_pss_mb else "-",
            str(r.max_processes) if ok else "-",
            r.status if not r.message else f"{r.status}: {r.message}",
        ])
    print()
    print(format_table(headers, rows))
    print()
    for r in results:
        print(f"  {r.engine:<15} {DESCRIPTIONS[r.engine]}")
    print("wall = whole subprocess; compute = engine start + job + result in Python;")
    print("x job = wall / MapReduceJob wall; memory = peak summed over the process tree.")


def harness_main(args: argparse.Namespace) -> int:
    """Generate or reuse the corpus, run the engines, verify, report."""
    corpus, meta = ensure_corpus(args.size_mb, args.seed, Path(args.data_dir), args.vocab)
    expected = meta["checksum"]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_dir = RESULTS_DIR / "logs" / f"mapreduce_wordcount-{stamp}"
    log_dir.mkdir(parents=True, exist_ok=True)
    results = {e: EngineResult(engine=e, status="ok") for e in args.engines}
    mark_unavailable(results, availability)
    print(f"corpus {corpus.name}: {meta['bytes'] / 2**20:.0f} MB, {meta['lines']:,} lines, "
          f"{meta['tokens']:,} words; parallelism {args.parallelism}, repeat {args.repeat}",
          flush=True)
    warm_page_cache(corpus)
    for rep in range(args.repeat):
        for engine, res in results.items():
            if res.status != "ok":
                continue
            print(f"[{rep + 1}/{args.repeat}] {engine} ...", end=" ", flush=True)
            log_path = log_dir / f"{engine}-{rep + 1}.log"
            outcome, run = run_engine_once(engine, corpus, args, log_path)
            if "error" in outcome:
                res.status = "timeout" if outcome.get("timeout") else (
                    "skipped" if outcome.get("unavailable") else "error")
                res.message = outcome["error"]
                print(f"{res.status}: {res.message} (log: {log_path})", flush=True)
                continue
            res.add_run(run, float(outcome["compute_s"]))
            res.details = outcome.get("details", {})
            res.checksum = outcome["checksum"]
            problems = compare_checksums(expected, outcome["checksum"])
            print(f"{run.wall_s:.2f} s wall, {float(outcome['compute_s']):.2f} s compute, "
                  f"peak RSS {run.peak_rss_mb:.0f} MB, {'ok' if not problems else 'WRONG'}",
                  flush=True)
            if problems:
                res.status, res.message = "WRONG", "result differs from ground truth"
                res.details["problems"] = problems
    ordered = list(results.values())
    print_table(ordered, meta)
    payload = {
        "benchmark": "mapreduce_wordcount",
        "timestamp": stamp,
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "result_file")},
        "corpus": {k: v for k, v in meta.items() if k != "checksum"} | {"path": str(corpus)},
        "expected": expected,
        "environment": environment_info(["millstream", "pyarrow", "mrjob", "numpy", "psutil"]),
        "results": [r.to_json() for r in ordered],
    }
    add_ratios(payload["results"], ordered, results.get(REFERENCE_ENGINE), "ratio_to_job")
    out = write_results("mapreduce_wordcount", payload)
    print(f"results: {out}\nlogs:    {log_dir}")
    return 2 if any(r.status == "WRONG" for r in ordered) else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size-mb", type=int, default=32, help="corpus size in MiB")
    p.add_argument("--engines", default=",".join(DEFAULT_ENGINES),
                   help=f"comma-separated, from: {', '.join(ALL_ENGINES)} (or 'all')")
    p.add_argument("--parallelism", type=int, default=os.cpu_count() or 1,
                   help="worker processes (Millstream) and --num-cores (mrjob local)")
    p.add_argument("--repeat", type=int, default=1, help="runs per engine (best time shown)")
    p.add_argument("--memory-limit", default=None, help="Millstream memory_limit, e.g. 2GB")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="corpus seed")
    p.add_argument("--vocab", type=int, default=DEFAULT_VOCAB, help="vocabulary size")
    p.add_argument("--data-dir", default=str(DATA_DIR), help="where corpora are cached")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per engine run")
    p.add_argument("--no-pss", action="store_true", help="sample RSS only (cheaper)")
    add_worker_args(p, ALL_ENGINES)
    args = p.parse_args(argv)
    check_engine_args(p, args, ALL_ENGINES)
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point: harness by default, a single engine with --worker."""
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    return harness_main(args)


if __name__ == "__main__":
    sys.exit(main())
