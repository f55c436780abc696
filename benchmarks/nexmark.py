"""Nexmark benchmark: queries q0-q8 on Millstream (inline, parallel, Ray), Bytewax and PyFlink.

Usage (from the repository root):

    python benchmarks/nexmark.py                                  # 1 M events, all queries
    python benchmarks/nexmark.py --events 2000000 --queries q5,q7 --engines inline,p2 --repeat 3
    python benchmarks/nexmark.py --latency-only                   # q1 latency at 100K events/s

Events come from ``nexmark_gen`` (Beam/Flink generator semantics, Arrow batches,
deterministic from ``--seed``): persons, auctions and bids 1:3:46, ``--event-rate``
events per second of event time, ``--out-of-order`` (Beam's out-of-order group size).
Millstream reads them with ``ms.from_generator`` (a batch per call: the fast path) or,
with ``--source parquet``, from the Parquet files the harness writes once into
``benchmarks/data/``. Every engine runs every query in its own measured subprocess;
each result is checked against DuckDB over the same events (``nexmark_queries``).

Engines: ``inline`` (Millstream's in-process executor), ``p2``/``p4`` (the parallel
executor, parallelism 2 and 4), ``ray`` (the parallel executor on a one-node Ray of its
own, parallelism 2), ``bytewax`` (one worker; q0, q1, q2, q5, q7) and ``flink`` (PyFlink's
local mini-cluster, Flink SQL's Nexmark texts over CSV files, in the virtualenv given
by ``--flink-python``, default /tmp/pyflink-venv). Reported: events/s (all events of
the run, whatever kinds the query reads, over the query's own time), CPU seconds per
million events (the whole process tree during the query), peak RSS and PSS of the
process tree, and the q1 end-to-end latency at ``--latency-rate`` events/s.
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

import nexmark_gen as gen  # noqa: E402
from common import (  # noqa: E402
    DATA_DIR,
    RESULTS_DIR,
    environment_info,
    format_table,
    module_available,
    own_ray,
    run_worker,
    write_results,
    write_worker_error,
)
from nexmark_queries import NEEDS, QUERIES, Streams, compare, millstream_query  # noqa: E402
from nexmark_sink import NexmarkSink, cpu_delta, cpu_snapshot, percentiles  # noqa: E402

BENCH = Path(__file__).resolve().parent
ENGINES = ("inline", "p2", "p4", "ray", "bytewax", "flink")
DEFAULT_ENGINES = ("inline", "p2", "p4", "ray", "bytewax", "flink")
#: Millstream engines: (executor, parallelism)
MS_ENGINES = {"inline": ("inline", 1), "p2": ("parallel", 2), "p4": ("parallel", 4),
              "ray": ("parallel", 2)}
BYTEWAX_QUERIES = ("q0", "q1", "q2", "q5", "q7")
FLINK_QUERIES = ("q0", "q1", "q2", "q3", "q4", "q5", "q7", "q8")  # q6 is rejected by Flink


# =========================================================================== config


def config(args: argparse.Namespace, **over: Any) -> gen.NexmarkConfig:
    """The generator's configuration from the command line."""
    kw = {"events": args.events, "event_rate": args.event_rate,
          "out_of_order": args.out_of_order, "seed": args.seed, "batch_size": args.batch_size}
    kw.update(over)
    return gen.NexmarkConfig(**kw)


def data_dir(cfg: gen.NexmarkConfig) -> Path:
    """Where the Parquet (and CSV) files of a configuration live."""
    return DATA_DIR / (f"nexmark-{cfg.events}ev-r{cfg.event_rate:g}-o{cfg.out_of_order}"
                       f"-s{cfg.seed}-b{cfg.batch_size}")


def parquet_paths(cfg: gen.NexmarkConfig) -> dict[str, str]:
    """The events as Parquet files (written once)."""
    d = data_dir(cfg)
    paths = {k: str(d / f"{k}.parquet") for k in gen.KINDS}
    if not all(os.path.exists(p) for p in paths.values()):
        t0 = time.perf_counter()
        gen.write_parquet(cfg, d)
        print(f"generated {d.name} in {time.perf_counter() - t0:.1f} s", flush=True)
    return paths


def csv_paths(cfg: gen.NexmarkConfig) -> dict[str, str]:
    """The events as header-less CSV files (for Flink's filesystem connector)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    src = parquet_paths(cfg)
    out = {}
    for kind, path in src.items():
        dest = str(Path(path).with_suffix(".csv"))
        if not os.path.exists(dest):
            opts = pacsv.WriteOptions(include_header=False, quoting_style="all_valid")
            pacsv.write_csv(pq.read_table(path), dest + ".tmp", opts)
            os.replace(dest + ".tmp", dest)
        out[kind] = dest
    return out


def expected(cfg: gen.NexmarkConfig, queries: list[str]) -> dict[str, Any]:
    """Each query's checksum computed by DuckDB (cached next to the data)."""
    from nexmark_queries import oracle

    paths = parquet_paths(cfg)
    cache = data_dir(cfg) / "expected.json"
    known = json.loads(cache.read_text()) if cache.exists() else {}
    for q in queries:
        if q not in known:
            t0 = time.perf_counter()
            known[q] = oracle(q, paths, cfg.max_auction_ms)
            print(f"oracle {q}: {known[q]['rows']} rows ({time.perf_counter() - t0:.1f} s)",
                  flush=True)
    cache.write_text(json.dumps(known, indent=1))
    return {q: known[q] for q in queries}


def watermark_delay(cfg: gen.NexmarkConfig) -> str:
    """The watermark delay: the generator's out-of-orderness and 1 s more."""
    return f"{cfg.disorder_ms + 1000}ms"


# =========================================================================== Millstream


def _ms_streams(ms: Any, cfg: gen.NexmarkConfig, source: str, partitions: int,
                rate: float | None = None) -> Streams:
    """The event streams: generated batches, or the Parquet files read as streams."""
    paths = {k: str(data_dir(cfg) / f"{k}.parquet") for k in gen.KINDS}
    share = {gen.PERSON: 1 / 50, gen.AUCTION: 3 / 50, gen.BID: 46 / 50}

    def make(kind: str) -> Any:
        if source == "parquet":
            return ms.read_parquet(paths[kind])
        return ms.from_generator(gen.Generator(cfg, kind), count=cfg.num_batches,
                                 partitions=partitions, schema=gen.schema(kind, cfg.stamp),
                                 rate=None if rate is None else rate * share[kind])

    return Streams(make, watermark_delay(cfg))


def _pickle_by_value() -> None:
    """Ship the benchmark's modules with the functions that use them (Ray actors and
    worker processes may not have benchmarks/ on their path)."""
    import cloudpickle
    import nexmark_queries
    import nexmark_sink

    for mod in (gen, nexmark_queries, nexmark_sink):
        cloudpickle.register_pickle_by_value(mod)


def _start_ray(ms: Any, parallelism: int) -> float:
    """Start a one-node Ray of this process's own (see own_ray); return the time it took."""
    from millstream.runners.ray import connect

    t0 = time.perf_counter()
    connect(num_cpus=parallelism, object_store_memory=512 << 20, include_dashboard=False)
    ms.init(runner="ray", parallelism=parallelism, progress=False)
    ms.range(1).count()  # the runner connects lazily: count its start as init
    return time.perf_counter() - t0


def run_millstream(args: argparse.Namespace) -> dict[str, Any]:
    """One query on one Millstream engine; the outcome (checksum and details)."""
    import millstream as ms

    _pickle_by_value()
    cfg = config(args)
    executor, par = MS_ENGINES[args.worker]
    init_s = _start_ray(ms, par) if args.worker == "ray" else 0.0
    q = args.query
    details: dict[str, Any] = {"executor": executor, "parallelism": par, "init_s": init_s,
                               "source": args.source}
    with tempfile.TemporaryDirectory(prefix="nexmark-chk-") as chk:
        try:
            ds = millstream_query(q, _ms_streams(ms, cfg, args.source, par),
                                  cfg.max_auction_ms)
            sink = NexmarkSink()
            before = cpu_snapshot()
            t0 = time.perf_counter()
            job = ds.start(checkpoint=chk, checkpoint_interval=args.checkpoint_interval,
                           sink=sink, parallelism=par, executor=executor)
        except Exception as e:  # a plan the engine cannot run yet
            if q in NEEDS:
                first = f"{type(e).__name__}: {e}".splitlines()[0][:200]
                return {"unsupported": f"{NEEDS[q]} ({first})"}
            raise
        job.await_termination()
        details["query_s"] = time.perf_counter() - t0
        details["cpu_s"] = cpu_delta(before)
        metrics = job.metrics()
    details.update({k: metrics.get(k) for k in ("checkpoints", "records_in", "late_records",
                                               "tasks")})
    return {"checksum": sink.result(), "details": details}


def run_latency(args: argparse.Namespace) -> dict[str, Any]:
    """q1 at ``--latency-rate`` events/s from the generator, ages of rows at the sink."""
    import millstream as ms

    _pickle_by_value()
    executor, par = MS_ENGINES[args.worker]
    rate = args.latency_rate
    batch = max(1, int(rate * args.latency_batch_ms / 1000))
    cfg = gen.NexmarkConfig(events=int(rate * args.latency_seconds), event_rate=rate,
                            seed=args.seed, batch_size=batch, stamp=True)
    with tempfile.TemporaryDirectory(prefix="nexmark-lat-") as chk:
        ds = millstream_query("q1", _ms_streams(ms, cfg, "generator", par, rate=rate),
                              cfg.max_auction_ms, stamp=True)
        sink = NexmarkSink()
        t0 = time.perf_counter()
        job = ds.start(checkpoint=chk, checkpoint_interval=args.latency_checkpoint_interval,
                       sink=sink, parallelism=par, executor=executor)
        job.await_termination()
        wall = time.perf_counter() - t0
    rows = sink.result()["rows"]
    return {"checksum": sink.result(),
            "details": {"query_s": wall, "rows": rows, "rate": rate, "batch_events": batch,
                        "checkpoint_interval": args.latency_checkpoint_interval,
                        "direct": percentiles(sink.latency),
                        "transactional": percentiles(sink.commit_latency),
                        "executor": executor, "parallelism": par}}


# =========================================================================== workers


def worker_main(args: argparse.Namespace) -> int:
    """Run one engine on one query in this process; write the outcome as JSON."""
    out = Path(args.result_file)
    try:
        if args.latency_worker:
            outcome = run_latency(args)
        elif args.worker in MS_ENGINES:
            outcome = run_millstream(args)
        elif args.worker == "bytewax":
            from nexmark_bytewax import run_bytewax

            outcome = run_bytewax(config(args), args.query, watermark_delay(config(args)))
        else:
            raise ValueError(f"no in-process worker for {args.worker}")
    except BaseException as e:
        return write_worker_error(out, e)
    t = os.times()
    outcome.setdefault("details", {})["process_cpu_s"] = (t.user + t.system + t.children_user
                                                          + t.children_system)
    out.write_text(json.dumps(outcome, default=str))
    return 0


# =========================================================================== harness


def availability(engine: str, args: argparse.Namespace) -> str | None:
    """Why an engine cannot run here, or None."""
    if engine in MS_ENGINES and not module_available("millstream"):
        return "millstream is not installed (pip install -e .)"
    if engine == "ray" and not module_available("ray"):
        return "ray is not installed"
    if engine == "bytewax" and not module_available("bytewax"):
        return "bytewax is not installed (pip install bytewax)"
    if engine == "flink":
        py = Path(args.flink_python)
        if not py.exists():
            return (f"no PyFlink interpreter at {py} (python3 -m venv /tmp/pyflink-venv && "
                    f"/tmp/pyflink-venv/bin/pip install apache-flink)")
    return None


def not_written(engine: str, q: str) -> str | None:
    """Why an engine does not run a query (the query is not written for it), or None."""
    if engine == "bytewax" and q not in BYTEWAX_QUERIES:
        return "not written for Bytewax"
    if engine == "flink" and q not in FLINK_QUERIES:
        return "Flink SQL rejects Nexmark's q6 (OVER on an updating input)"
    return None


def _worker_cmd(args: argparse.Namespace, engine: str, q: str, result: Path,
                latency: bool = False) -> list[str]:
    base = ["--query", q, "--result-file", str(result), "--events", str(args.events),
            "--event-rate", str(args.event_rate), "--out-of-order", str(args.out_of_order),
            "--seed", str(args.seed), "--batch-size", str(args.batch_size),
            "--source", args.source, "--checkpoint-interval", args.checkpoint_interval,
            "--latency-rate", str(args.latency_rate),
            "--latency-seconds", str(args.latency_seconds),
            "--latency-batch-ms", str(args.latency_batch_ms),
            "--latency-checkpoint-interval", args.latency_checkpoint_interval]
    if engine == "flink":
        return [args.flink_python, str(BENCH / "nexmark_flink.py"), "--query", q,
                "--result-file", str(result), "--data", str(data_dir(config(args))),
                "--max-auction-ms", str(config(args).max_auction_ms),
                "--delay-ms", str(config(args).disorder_ms + 1000),
                "--parallelism", str(args.flink_parallelism)]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", engine, *base]
    return cmd + (["--latency-worker"] if latency else [])


def run_once(args: argparse.Namespace, engine: str, q: str, log: Path,
             latency: bool = False) -> tuple[dict[str, Any], Any]:
    """One measured subprocess run of an engine on a query."""
    with tempfile.NamedTemporaryFile(prefix=f"nx-{engine}-", suffix=".json",
                                     delete=False) as f:
        result = Path(f.name)
    env = dict(os.environ)
    cleanup = None  # run_worker then deletes the result file itself
    if engine == "ray":
        _base, env, ray_cleanup = own_ray()
        env["MILLSTREAM_RAY_LOG_TO_DRIVER"] = "0"

        def cleanup() -> None:
            ray_cleanup()
            result.unlink(missing_ok=True)

    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(BENCH), env.get("PYTHONPATH", ""))
                                        if p)
    outcome, run = run_worker(_worker_cmd(args, engine, q, result, latency), result,
                              timeout_s=args.timeout, log_path=log, with_pss=True, env=env,
                              cleanup=cleanup)
    if run.timed_out:
        outcome = {"error": f"timed out after {args.timeout:.0f} s"}
    elif run.returncode != 0 and "error" not in outcome and "unsupported" not in outcome:
        outcome = {"error": f"exit code {run.returncode}: {run.stderr_tail[-300:]}"}
    return outcome, run


def _cell(res: dict[str, Any]) -> dict[str, Any]:
    """Summary of an engine's runs on one query: best time, CPU, memory, status."""
    runs = [r for r in res["runs"] if "checksum" in r["outcome"]]
    if not runs:
        return {}
    best = min(runs, key=lambda r: r["outcome"]["details"]["query_s"])
    d = best["outcome"]["details"]
    cpus = [r["outcome"]["details"].get("cpu_s") for r in runs
            if r["outcome"]["details"].get("cpu_s") is not None]
    return {"query_s": d["query_s"], "init_s": d.get("init_s", 0.0),
            "cpu_s": min(cpus) if cpus else None,
            "wall_s": min(r["run"]["wall_s"] for r in runs),
            "peak_rss_mb": max(r["run"]["peak_rss_mb"] for r in runs),
            "peak_pss_mb": max((r["run"]["peak_pss_mb"] or 0) for r in runs) or None,
            "query_s_all": [r["outcome"]["details"]["query_s"] for r in runs],
            "cpu_s_all": cpus}


def harness_main(args: argparse.Namespace) -> int:
    """Generate, run every engine on every query (interleaved repeats), check, report."""
    cfg = config(args)
    queries = [q.strip() for q in args.queries.split(",") if q.strip()]
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [q for q in queries if q not in QUERIES] + [e for e in engines if e not in ENGINES]
    if bad:
        print(f"unknown queries or engines: {bad}")
        return 2
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_dir = RESULTS_DIR / "logs" / f"nexmark-{stamp}"
    log_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, dict[str, Any]]] = {q: {} for q in queries}
    wrong = False
    if not args.latency_only:
        truth = expected(cfg, queries)
        if "flink" in engines and not availability("flink", args):
            csv_paths(cfg)
        for q in queries:
            for e in engines:
                why = availability(e, args) or not_written(e, q)
                results[q][e] = {"status": "skipped" if why else "ok", "message": why or "",
                                 "runs": []}
        for r in range(args.repeat):
            for q in queries:
                for e in engines:
                    res = results[q][e]
                    if res["status"] != "ok":
                        continue
                    log = log_dir / f"{q}-{e}-{r}.log"
                    outcome, run = run_once(args, e, q, log)
                    res["runs"].append({"outcome": outcome, "run": vars(run)})
                    if "unsupported" in outcome:
                        res["status"], res["message"] = "unsupported", outcome["unsupported"]
                    elif "error" in outcome:
                        res["status"], res["message"] = "error", f"{outcome['error']} ({log})"
                    else:
                        problems = compare(truth[q], outcome["checksum"])
                        if problems:
                            res["status"], res["message"] = "WRONG", "; ".join(problems)[:300]
                            wrong = True
                    d = outcome.get("details", {})
                    print(f"[{r + 1}/{args.repeat}] {q} {e}: {res['status']} "
                          f"{d.get('query_s', 0):.2f} s, cpu {d.get('cpu_s') or 0:.1f} s, "
                          f"RSS {run.peak_rss_mb:.0f} MB {res['message'][:150]}", flush=True)
        for q in queries:
            for e in engines:
                results[q][e]["summary"] = _cell(results[q][e])
        print()
        print(throughput_table(results, args.events))
        print(targets(results))
    latency = {}
    if args.latency or args.latency_only:
        for r in range(args.repeat):
            for e in [e for e in args.latency_engines.split(",") if e]:
                log = log_dir / f"latency-{e}-{r}.log"
                outcome, run = run_once(args, e, "q1", log, latency=True)
                latency.setdefault(e, []).append(outcome)
                d = outcome.get("details", {})
                print(f"[{r + 1}/{args.repeat}] latency {e}: {outcome.get('error', '')} "
                      f"direct {d.get('direct')} transactional {d.get('transactional')}",
                      flush=True)
        print()
        print(latency_table(latency))
    payload = {"benchmark": "nexmark", "params": vars(args), "config": cfg.__dict__,
               "environment": environment_info(["millstream", "bytewax", "pyarrow", "ray",
                                                "duckdb", "numpy"]),
               "results": results, "latency": latency}
    print(f"results: {write_results('nexmark', payload)}")
    if wrong:
        print("RESULT MISMATCH: an engine's result differs from DuckDB's")
        return 2
    return 0


def _f(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def throughput_table(results: dict[str, dict[str, dict[str, Any]]], events: int) -> str:
    """Events/s, CPU-s per million events and peak memory per query and engine."""
    rows = []
    for q, per in results.items():
        inline = per.get("inline", {}).get("summary") or {}
        for e, res in per.items():
            s = res.get("summary") or {}
            if not s:
                rows.append([q, e, res["status"], "-", "-", "-", "-", "-", "-",
                             res["message"][:60]])
                continue
            eps = events / s["query_s"]
            cpu_m = None if s["cpu_s"] is None else s["cpu_s"] / (events / 1e6)
            ratio = (s["cpu_s"] / inline["cpu_s"] if inline.get("cpu_s") and s["cpu_s"]
                     else None)
            rows.append([q, e, res["status"], _f(s["query_s"], ".2f"), _f(eps, ",.0f"),
                         _f(cpu_m, ".2f"), _f(ratio, ".2f"), _f(s["peak_rss_mb"], ".0f"),
                         _f(s["peak_pss_mb"], ".0f"), res["message"][:60]])
    return format_table(["query", "engine", "status", "query s", "events/s", "CPU-s/M ev",
                         "CPU x inline", "peak RSS MB", "peak PSS MB", "note"], rows)


def targets(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """The issue's targets on q5 and q7: parallel(2) at most 1.3x inline's CPU per event
    and faster than inline in wall time (the query's own time)."""
    lines = []
    for q in ("q5", "q7"):
        inline = (results.get(q, {}).get("inline") or {}).get("summary") or {}
        p2 = (results.get(q, {}).get("p2") or {}).get("summary") or {}
        if not inline or not p2 or not inline.get("cpu_s") or not p2.get("cpu_s"):
            continue
        cpu = p2["cpu_s"] / inline["cpu_s"]
        wall = p2["query_s"] / inline["query_s"]
        lines.append(f"target {q}: p2 CPU {cpu:.2f}x inline (<= 1.3: "
                     f"{'met' if cpu <= 1.3 else 'NOT met'}), p2 time {wall:.2f}x inline "
                     f"(< 1: {'met' if wall < 1 else 'NOT met'})")
    return "\n".join(lines)


def latency_table(latency: dict[str, list[dict[str, Any]]]) -> str:
    """q1 latency percentiles per engine and run."""
    rows = []
    for e, outs in latency.items():
        for i, o in enumerate(outs):
            d = o.get("details", {})
            di, tr = d.get("direct", {}), d.get("transactional", {})
            rows.append([e, str(i + 1), o.get("error", "ok")[:40], str(d.get("rows", "-")),
                         _f(di.get("p50"), ".1f"), _f(di.get("p95"), ".1f"),
                         _f(di.get("p99"), ".1f"), _f(tr.get("p50"), ".0f"),
                         _f(tr.get("p99"), ".0f")])
    return format_table(["engine", "run", "status", "rows", "direct p50 ms", "p95 ms",
                         "p99 ms", "commit p50 ms", "commit p99 ms"], rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=1_000_000, help="events of all kinds")
    p.add_argument("--event-rate", type=float, default=10_000.0,
                   help="events per second of event time")
    p.add_argument("--out-of-order", type=int, default=1,
                   help="out-of-order group size (1: in order)")
    p.add_argument("--seed", type=int, default=20261207)
    p.add_argument("--batch-size", type=int, default=10_000, help="events per generated batch")
    p.add_argument("--source", choices=("generator", "parquet"), default="generator")
    p.add_argument("--queries", default=",".join(QUERIES))
    p.add_argument("--engines", default=",".join(DEFAULT_ENGINES),
                   help=f"comma-separated, of {', '.join(ENGINES)}")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--checkpoint-interval", default="10s")
    p.add_argument("--flink-python", default="/tmp/pyflink-venv/bin/python")
    p.add_argument("--flink-parallelism", type=int, default=2)
    p.add_argument("--latency", action="store_true", help="also measure q1 latency")
    p.add_argument("--latency-only", action="store_true")
    p.add_argument("--latency-engines", default="inline,p2")
    p.add_argument("--latency-rate", type=float, default=100_000.0)
    p.add_argument("--latency-seconds", type=float, default=20.0)
    p.add_argument("--latency-batch-ms", type=float, default=10.0,
                   help="event time (and so wall time) one generated batch spans")
    p.add_argument("--latency-checkpoint-interval", default="1s",
                   help="checkpoint interval of the latency runs (the transactional sink's "
                        "latency follows it)")
    p.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--latency-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--query", help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point: the harness, or one engine on one query with --worker."""
    args = parse_args(argv)
    return worker_main(args) if args.worker else harness_main(args)


if __name__ == "__main__":
    sys.exit(main())
