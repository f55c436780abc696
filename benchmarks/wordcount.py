"""Word count benchmark: Millstream against plain Python, Polars, DuckDB and PySpark.

Usage (from the repository root):

    /work/venv/bin/python benchmarks/wordcount.py --size-mb 512
    /work/venv/bin/python benchmarks/wordcount.py --size-mb 64 --engines polars,duckdb,millstream

Each engine runs in its own subprocess; the harness samples the summed RSS/PSS of that
process tree every 50 ms, checks every result against the ground truth that the corpus
generator recorded, prints a table and writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    DATA_DIR,
    INSTALL_HINT,
    RESULTS_DIR,
    EngineResult,
    EngineUnavailable,
    add_ratios,
    add_worker_args,
    check_engine_args,
    check_outcome,
    checksum_from_arrow,
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

# Bump when the corpus generator changes, so cached corpora are regenerated.
GENERATOR_VERSION = 1
DEFAULT_SEED = 20240607
DEFAULT_VOCAB = 50_000
LINES_PER_CHUNK = 100_000

ALL_ENGINES = ("python", "polars", "duckdb", "pyspark", "millstream", "millstream-rows")
DEFAULT_ENGINES = ("python", "polars", "duckdb", "pyspark", "millstream")
REFERENCE_ENGINE = "millstream"

# Module each engine needs, and how to get it.
ENGINE_MODULES = {
    "python": None,
    "polars": "polars",
    "duckdb": "duckdb",
    "pyspark": "pyspark",
    "millstream": "millstream",
    "millstream-rows": "millstream",
}


# =========================================================================== corpus


def corpus_paths(size_mb: int, seed: int, data_dir: Path = DATA_DIR) -> tuple[Path, Path]:
    """Return the cached corpus file and its metadata file for a size and seed."""
    stem = f"wordcount-{size_mb}mb-seed{seed}-v{GENERATOR_VERSION}"
    return data_dir / f"{stem}.txt", data_dir / f"{stem}.json"


def build_vocabulary(rng: Any, size: int) -> list[str]:
    """Make `size` distinct lower-case words, ordered by rank (frequent first, mostly short)."""
    import numpy as np

    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    weights = np.array(
        [12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8,
         2.4, 2.4, 2.2, 2.0, 2.0, 1.9, 1.5, 1.0, 0.8, 0.15, 0.15, 0.1, 0.07]
    )  # fmt: skip
    weights = weights / weights.sum()
    accents = np.array(list("éèàçñöüäâ"))
    words: dict[str, None] = {}
    while len(words) < size:
        n = int((size - len(words)) * 1.3) + 100
        lengths = 1 + rng.binomial(18, 0.38, size=n)
        chars = rng.choice(letters, size=int(lengths.sum()), p=weights)
        accented = rng.random(n) < 0.03
        accent_pick = rng.choice(accents, size=n)
        accent_pos = (rng.random(n) * lengths).astype(np.int64)
        pos = 0
        for i in range(n):
            w = chars[pos : pos + lengths[i]]
            pos += lengths[i]
            if accented[i]:
                w = w.copy()
                w[accent_pos[i]] = accent_pick[i]
            word = "".join(w)
            # Every case variant in the corpus must lower-case back to the word itself.
            if word.upper().lower() == word and word.capitalize().lower() == word:
                words.setdefault(word, None)
            if len(words) >= size:
                break
    vocab = list(words)
    # Frequent words are short: rank by length plus noise.
    key = np.array([len(w) for w in vocab], dtype=np.float64) + rng.normal(0.0, 2.5, size)
    return [vocab[i] for i in np.argsort(key, kind="stable")]


def generate_corpus(
    path: Path, meta_path: Path, size_mb: int, seed: int, vocab_size: int = DEFAULT_VOCAB
) -> dict[str, Any]:
    """Write a deterministic Zipf-distributed text corpus and its ground-truth word counts."""
    import numpy as np

    target = size_mb * 1024 * 1024
    rng = np.random.default_rng(seed)
    vocab = build_vocabulary(rng, vocab_size)
    v = len(vocab)

    # Zipf-Mandelbrot rank frequencies, as in natural-language text.
    ranks = np.arange(1, v + 1, dtype=np.float64)
    cdf = np.cumsum(1.0 / (ranks + 2.7) ** 1.07)
    cdf /= cdf[-1]

    # Three case variants per word (lower, Capitalized, UPPER), each followed by one space.
    variants = [s for w in vocab for s in (w, w.capitalize(), w.upper())]
    encoded = [(s + " ").encode("utf-8") for s in variants]
    var_len = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
    var_start = np.concatenate(([0], np.cumsum(var_len)[:-1]))
    buf = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    newline = ord("\n")

    counts = np.zeros(v, dtype=np.int64)
    written = lines = tokens = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    start = time.perf_counter()
    with open(tmp, "wb") as out:
        while written < target:
            line_len = rng.integers(5, 21, size=LINES_PER_CHUNK)
            n = int(line_len.sum())
            word_id = np.searchsorted(cdf, rng.random(n), side="right")
            case = rng.choice(3, size=n, p=[0.88, 0.10, 0.02])
            line_end_tok = np.cumsum(line_len) - 1
            line_start_tok = line_end_tok - line_len + 1
            case[line_start_tok] = np.where(
                rng.random(LINES_PER_CHUNK) < 0.5, 1, case[line_start_tok]
            )
            var = word_id * 3 + case
            tok_len = var_len[var]
            tok_end = np.cumsum(tok_len)
            line_end_byte = tok_end[line_end_tok]  # exclusive
            if written + int(line_end_byte[-1]) > target:
                # Keep only whole lines that fit in the target size.
                keep_lines = int(np.searchsorted(line_end_byte, target - written, side="right"))
                if keep_lines == 0:
                    break
                n = int(line_end_tok[keep_lines - 1]) + 1
                word_id, var, tok_len, tok_end = word_id[:n], var[:n], tok_len[:n], tok_end[:n]
                line_end_byte = line_end_byte[:keep_lines]
            total = int(tok_end[-1])
            tok_start = tok_end - tok_len
            idx = np.repeat(var_start[var] - tok_start, tok_len) + np.arange(total, dtype=np.int64)
            chunk = buf[idx]
            chunk[line_end_byte - 1] = newline
            out.write(chunk.tobytes())
            counts += np.bincount(word_id, minlength=v)
            written += total
            lines += len(line_end_byte)
            tokens += n
    os.replace(tmp, path)
    nz = np.flatnonzero(counts)
    checksum = checksum_from_pairs((vocab[i], int(counts[i])) for i in nz)
    meta = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "size_mb": size_mb,
        "bytes": written,
        "lines": lines,
        "tokens": tokens,
        "vocabulary": v,
        "generate_s": round(time.perf_counter() - start, 2),
        "checksum": checksum,
    }
    meta_path.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return meta


def ensure_corpus(
    size_mb: int, seed: int, data_dir: Path = DATA_DIR, vocab_size: int = DEFAULT_VOCAB
) -> tuple[Path, dict[str, Any]]:
    """Return the cached corpus for a size and seed, generating it first if needed."""
    path, meta_path = corpus_paths(size_mb, seed, data_dir)
    if path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("bytes") == path.stat().st_size and meta.get("vocabulary") == vocab_size:
            return path, meta
    print(f"generating {size_mb} MB corpus (seed {seed}) -> {path} ...", flush=True)
    meta = generate_corpus(path, meta_path, size_mb, seed, vocab_size)
    print(
        f"  {meta['bytes'] / 2**20:.0f} MB, {meta['lines']:,} lines, {meta['tokens']:,} words, "
        f"{meta['checksum']['distinct']:,} distinct, in {meta['generate_s']} s",
        flush=True,
    )
    return path, meta


# =========================================================================== engines
# Each engine function runs inside the worker subprocess and returns (checksum, details).
# Its timed region ("compute") starts at engine initialization and ends when the full
# word -> count result is in this Python process; interpreter start and imports are not in it,
# but they are in the harness's wall time.


Timed = tuple[dict[str, Any], dict[str, Any]]


def run_python(path: str, parallelism: int, memory_limit: int | None) -> Timed:
    """Plain Python: collections.Counter over the lines, one process."""
    from collections import Counter

    t0 = time.perf_counter()
    counter: Counter[str] = Counter()
    with open(path, encoding="utf-8") as f:
        for line in f:
            counter.update(line.lower().split())
    query = time.perf_counter() - t0
    return checksum_from_pairs(counter.items()), {"init_s": 0.0, "query_s": query}


def run_polars(path: str, parallelism: int, memory_limit: int | None) -> Timed:
    """Polars: lazy line scan, lower, split, explode, group_by count (streaming engine)."""
    import polars as pl

    t0 = time.perf_counter()
    if hasattr(pl, "scan_lines"):
        lines = pl.scan_lines(path, name="line")
        reader = "scan_lines"
    else:
        lines = pl.scan_csv(
            path,
            has_header=False,
            separator="\x1f",
            quote_char=None,
            schema={"line": pl.String},
        )
        reader = "scan_csv"
    counts = (
        lines.select(pl.col("line").str.to_lowercase().str.split(" ").alias("word"))
        .explode("word")
        .filter(pl.col("word") != "")
        .group_by("word")
        .agg(pl.len().alias("count"))
    )
    engine = os.environ.get("WORDCOUNT_POLARS_ENGINE", "streaming")
    df = counts.collect(engine=engine)  # type: ignore[arg-type]
    query = time.perf_counter() - t0
    details = {
        "init_s": 0.0,
        "query_s": query,
        "reader": reader,
        "polars_engine": engine,
        "threads": pl.thread_pool_size(),
    }
    return checksum_from_arrow(df.to_arrow()), details


def run_duckdb(path: str, parallelism: int, memory_limit: int | None) -> Timed:
    """DuckDB: read_csv as whole lines, string_split + unnest, GROUP BY."""
    import duckdb

    spill = tempfile.mkdtemp(prefix="wordcount-duckdb-")
    try:
        t0 = time.perf_counter()
        con = duckdb.connect(":memory:")
        con.execute(f"SET threads = {int(parallelism)}")
        con.execute(f"SET temp_directory = '{spill}'")
        if memory_limit:
            con.execute(f"SET memory_limit = '{memory_limit // 2**20}MB'")
        init = time.perf_counter() - t0
        # A delimiter that never occurs (ASCII unit separator) and no quoting keep lines whole.
        sql = f"""
            SELECT word, count(*) AS count
            FROM (
                SELECT unnest(string_split(lower(line), ' ')) AS word
                FROM read_csv(?, columns = {{'line': 'VARCHAR'}}, header = false,
                              delim = '{chr(31)}', quote = '', escape = '',
                              auto_detect = false, new_line = '\\n')
            )
            WHERE word <> ''
            GROUP BY word
        """
        rel = con.execute(sql, [path])
        fetch = getattr(rel, "to_arrow_table", None) or rel.fetch_arrow_table
        table = fetch()
        query = time.perf_counter() - t0 - init
        con.close()
    finally:
        shutil.rmtree(spill, ignore_errors=True)
    return checksum_from_arrow(table), {"init_s": init, "query_s": query, "threads": parallelism}


def run_pyspark(path: str, parallelism: int, memory_limit: int | None) -> Timed:
    """PySpark local mode: read.text, split/explode, groupBy count."""
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F  # noqa: N812

    if not shutil.which("java") and not os.environ.get("JAVA_HOME"):
        raise EngineUnavailable("PySpark needs Java 17+ (no java on PATH, no JAVA_HOME)")
    cores = os.cpu_count() or 1
    master = "local[*]" if parallelism >= cores else f"local[{parallelism}]"
    driver_mem = f"{memory_limit // 2**20}m" if memory_limit else "4g"
    t0 = time.perf_counter()
    spark = (
        SparkSession.builder.master(master)
        .appName("millstream-wordcount")
        .config("spark.driver.memory", driver_mem)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    init = time.perf_counter() - t0
    t1 = time.perf_counter()
    counts = (
        spark.read.text(path)
        .select(F.explode(F.split(F.lower(F.col("value")), " ")).alias("word"))
        .filter(F.col("word") != "")
        .groupBy("word")
        .count()
    )
    if hasattr(counts, "toArrow"):
        result = counts.toArrow()
        query = time.perf_counter() - t1
        checksum = checksum_from_arrow(result)
    else:
        rows = counts.collect()
        query = time.perf_counter() - t1
        checksum = checksum_from_pairs((r[0], r[1]) for r in rows)
    spark.stop()
    details = {"init_s": init, "query_s": query, "master": master, "driver_memory": driver_mem}
    return checksum, details


def _millstream() -> Any:
    """Import Millstream and check that its dataset API exists yet."""
    try:
        import millstream as ms
    except ImportError as e:
        raise EngineUnavailable(f"millstream is not importable ({e}): pip install -e .") from e
    if not hasattr(ms, "read_text"):
        raise EngineUnavailable(
            "millstream.read_text does not exist: the dataset API is not implemented in this "
            "checkout yet"
        )
    return ms


def _millstream_init(ms: Any, parallelism: int, memory_limit: int | None) -> float:
    """Start the local runner and return how long that took."""
    t0 = time.perf_counter()
    ms.init(parallelism=parallelism, memory_limit=memory_limit)
    return time.perf_counter() - t0


def _millstream_shutdown(ms: Any) -> None:
    """Stop the local runner if the API offers a way to."""
    for name in ("shutdown", "stop"):
        fn = getattr(ms, name, None)
        if callable(fn):
            fn()
            return


def _run_millstream_query(
    parallelism: int, memory_limit: int | None, query: Callable[[Any], Any]
) -> Timed:
    """Start Millstream, time ``query(ms).to_arrow()`` (a word/count dataset), shut down."""
    ms = _millstream()
    init = _millstream_init(ms, parallelism, memory_limit)
    t1 = time.perf_counter()
    table = query(ms).to_arrow()
    query_s = time.perf_counter() - t1
    checksum = checksum_from_arrow(table.select(["word", "count"]))
    _millstream_shutdown(ms)
    return checksum, {"init_s": init, "query_s": query_s, "parallelism": parallelism}


def run_millstream(path: str, parallelism: int, memory_limit: int | None) -> Timed:
    """Millstream vectorized: column expressions over Arrow batches."""
    return _run_millstream_query(
        parallelism,
        memory_limit,
        lambda ms: (
            ms.read_text(path)
            .select(ms.col("text").str.lower().str.split().alias("word"))
            .explode("word")
            .filter(ms.col("word") != "")
            .group_by("word")
            .agg(ms.count().alias("count"))
        ),
    )


def run_millstream_rows(path: str, parallelism: int, memory_limit: int | None) -> Timed:
    """Millstream row-wise: a Python flat_map over dict rows, then group_by count."""
    return _run_millstream_query(
        parallelism,
        memory_limit,
        lambda ms: (
            ms.read_text(path)
            .flat_map(lambda r: [{"word": w} for w in r["text"].lower().split()])
            .group_by("word")
            .agg(ms.count().alias("count"))
        ),
    )


ENGINES: dict[str, Callable[[str, int, int | None], Timed]] = {
    "python": run_python,
    "polars": run_polars,
    "duckdb": run_duckdb,
    "pyspark": run_pyspark,
    "millstream": run_millstream,
    "millstream-rows": run_millstream_rows,
}


def worker_main(args: argparse.Namespace) -> int:
    """Run one engine in this (sub)process and write its outcome as JSON."""
    return engine_worker_main(ENGINES[args.worker], args)


# =========================================================================== harness


def engine_env(engine: str, parallelism: int) -> dict[str, str]:
    """Environment for an engine's subprocess (thread caps, quiet Spark)."""
    env = dict(os.environ)
    env["POLARS_MAX_THREADS"] = str(parallelism)
    if engine == "pyspark":
        env.setdefault("PYSPARK_PYTHON", sys.executable)
        env.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
        env.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    return env


def availability(engine: str) -> str | None:
    """Return why an engine cannot run here, or None if it can."""
    module = ENGINE_MODULES[engine]
    if module and not module_available(module):
        if module == "millstream":
            return "millstream is not importable: pip install -e ."
        return f"{module} is not installed: {INSTALL_HINT}"
    if engine == "pyspark" and not shutil.which("java") and not os.environ.get("JAVA_HOME"):
        return "PySpark needs Java 17+ on PATH (or JAVA_HOME)"
    return None


def run_engine_once(
    engine: str,
    corpus: Path,
    args: argparse.Namespace,
    log_path: Path,
) -> tuple[dict[str, Any], Any]:
    """Run one engine once in a measured subprocess; return (worker outcome, measurement)."""
    with tempfile.NamedTemporaryFile(prefix=f"wc-{engine}-", suffix=".json", delete=False) as tf:
        result_file = Path(tf.name)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        engine,
        "--input",
        str(corpus),
        "--result-file",
        str(result_file),
        "--parallelism",
        str(args.parallelism),
    ]
    if args.memory_limit:
        cmd += ["--memory-limit", args.memory_limit]
    outcome, run = run_worker(
        cmd,
        result_file,
        env=engine_env(engine, args.parallelism),
        timeout_s=args.timeout,
        log_path=log_path,
        with_pss=not args.no_pss,
    )
    return check_outcome(outcome, run, args.timeout), run


def fmt_num(value: float | None, digits: int = 1) -> str:
    """Format a number for the table, '-' when missing."""
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(results: list[EngineResult]) -> None:
    """Print the summary table, with time ratios to Millstream."""
    ref = next((r for r in results if r.engine == REFERENCE_ENGINE and r.status == "ok"), None)
    ref_wall = ref.best_wall if ref else None
    headers = ["engine", "wall s", "compute s", "cpu s", "x millstream", "peak RSS MB",
               "peak PSS MB", "procs", "status"]  # fmt: skip
    rows = []
    for r in results:
        ok = r.status in ("ok", "WRONG")
        ratio = f"{r.best_wall / ref_wall:.2f}" if ok and ref_wall and r.best_wall else "n/a"
        status = r.status if not r.message else f"{r.status}: {r.message}"
        rows.append(
            [
                r.engine,
                fmt_num(r.best_wall if ok else None, 2),
                fmt_num(r.best_compute if ok else None, 2),
                fmt_num(min(r.cpu_s) if ok and r.cpu_s else None, 2),
                ratio,
                fmt_num(max(r.peak_rss_mb) if ok and r.peak_rss_mb else None, 0),
                fmt_num(max(r.peak_pss_mb) if ok and r.peak_pss_mb else None, 0),
                str(r.max_processes) if ok else "-",
                status,
            ]
        )
    print()
    print(format_table(headers, rows))
    print()
    print("wall = whole subprocess (interpreter start, imports, engine start, query, result in")
    print("Python); compute = engine start + query; cpu = CPU seconds of the process tree")
    print("(sampled, least of the repeats); x millstream = wall / millstream wall;")
    print("best of repeats for times, max of repeats for memory (sum over the process tree).")


def harness_main(args: argparse.Namespace) -> int:
    """Generate or reuse the corpus, run the engines, verify, report."""
    if args.rows and "millstream-rows" not in args.engines:
        args.engines.append("millstream-rows")
    corpus, meta = ensure_corpus(args.size_mb, args.seed, Path(args.data_dir), args.vocab)
    if args.generate_only:
        return 0
    expected = meta["checksum"]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_dir = RESULTS_DIR / "logs" / f"wordcount-{stamp}"
    log_dir.mkdir(parents=True, exist_ok=True)

    results = {e: EngineResult(engine=e, status="ok") for e in args.engines}
    mark_unavailable(results, availability)

    print(
        f"corpus {corpus.name}: {meta['bytes'] / 2**20:.0f} MB, {meta['tokens']:,} words; "
        f"parallelism {args.parallelism}, repeat {args.repeat}",
        flush=True,
    )
    warm_page_cache(corpus)
    for rep in range(args.repeat):
        for engine, res in results.items():
            if res.status != "ok":
                continue
            label = f"[{rep + 1}/{args.repeat}] {engine}"
            print(f"{label} ...", end=" ", flush=True)
            log_path = log_dir / f"{engine}-{rep + 1}.log"
            outcome, run = run_engine_once(engine, corpus, args, log_path)
            if "error" in outcome:
                res.status = "timeout" if outcome.get("timeout") else "error"
                res.message = outcome["error"]
                print(f"{res.status}: {res.message} (log: {log_path})", flush=True)
                continue
            res.add_run(run, float(outcome["compute_s"]))
            res.details = outcome.get("details", {})
            res.runs.append(
                {
                    "wall_s": run.wall_s,
                    "compute_s": float(outcome["compute_s"]),
                    "peak_rss_mb": run.peak_rss_mb,
                    "peak_pss_mb": run.peak_pss_mb,
                    "cpu_s": run.cpu_s,
                    "processes": run.max_processes,
                    "details": res.details,
                }
            )
            res.checksum = outcome["checksum"]
            problems = compare_checksums(expected, outcome["checksum"])
            verdict = "ok" if not problems else "WRONG RESULT"
            print(
                f"{run.wall_s:.2f} s wall, {float(outcome['compute_s']):.2f} s compute, "
                f"{run.cpu_s or 0:.2f} s cpu, "
                f"peak RSS {run.peak_rss_mb:.0f} MB, {verdict}",
                flush=True,
            )
            if problems:
                res.status = "WRONG"
                res.message = "result differs from ground truth"
                res.details["problems"] = problems

    wrong = [r for r in results.values() if r.status == "WRONG"]
    if wrong:
        bar = "!" * 78
        print(f"\n{bar}\n!!! RESULT MISMATCH: these engines disagree with the ground truth")
        for r in wrong:
            print(f"!!!   {r.engine}:")
            for p in r.details.get("problems", []):
                print(f"!!!     {p}")
        groups: dict[str, list[str]] = {json.dumps(expected, sort_keys=True): ["ground truth"]}
        for r in results.values():
            if r.checksum is not None:
                groups.setdefault(json.dumps(r.checksum, sort_keys=True), []).append(r.engine)
        print("!!! engines that agree with each other:")
        for names in groups.values():
            print(f"!!!   {', '.join(names)}")
        print(bar)

    ordered = list(results.values())
    print_table(ordered)
    payload = {
        "benchmark": "wordcount",
        "timestamp": stamp,
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "result_file")},
        "corpus": {k: v for k, v in meta.items() if k != "checksum"} | {"path": str(corpus)},
        "expected": expected,
        "environment": environment_info(
            ["millstream", "pyarrow", "polars", "duckdb", "pyspark", "numpy", "psutil"]
        ),
        "results": [r.to_json() for r in ordered],
    }
    add_ratios(payload["results"], ordered, results.get(REFERENCE_ENGINE), "ratio_to_millstream")
    out = write_results("wordcount", payload)
    print(f"results: {out}\nlogs:    {log_dir}")
    return 2 if wrong else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(
        description="Word count: Millstream vs plain Python, Polars, DuckDB, PySpark.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--size-mb", type=int, default=512, help="corpus size in MiB")
    p.add_argument(
        "--engines",
        default=",".join(DEFAULT_ENGINES),
        help=f"comma-separated, from: {', '.join(ALL_ENGINES)} (or 'all')",
    )
    p.add_argument("--rows", action="store_true", help="also run millstream-rows (slow)")
    p.add_argument(
        "--parallelism",
        type=int,
        default=os.cpu_count() or 1,
        help="cores for every engine (Millstream workers, Polars/DuckDB threads, Spark local[N])",
    )
    p.add_argument("--repeat", type=int, default=1, help="runs per engine (best time is shown)")
    p.add_argument(
        "--memory-limit",
        default=None,
        help="e.g. 4GB: Millstream memory_limit, DuckDB memory_limit, Spark driver memory",
    )
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="corpus seed")
    p.add_argument("--vocab", type=int, default=DEFAULT_VOCAB, help="vocabulary size")
    p.add_argument("--data-dir", default=str(DATA_DIR), help="where corpora are cached")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per engine run")
    p.add_argument("--no-pss", action="store_true", help="sample RSS only (cheaper)")
    p.add_argument("--generate-only", action="store_true", help="only make the corpus")
    # Internal: run a single engine in this process (used by the harness).
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
