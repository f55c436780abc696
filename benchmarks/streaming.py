"""Streaming benchmark: Millstream streaming vs Bytewax (and Millstream batch) on the same events.

Usage (from the repository root):

    /work/venv/bin/python benchmarks/streaming.py                     # 3 M events, 1000 keys
    /work/venv/bin/python benchmarks/streaming.py --events 500000 --pipelines window
    /work/venv/bin/python benchmarks/streaming.py --engines millstream,bytewax --repeat 3

Two pipelines over generated events ``(key: str, ts: epoch ms, value: int)`` kept in a
Parquet file (``benchmarks/data/``): ``filter`` (stateless: ``value >= 500``) and ``window``
(count per key and one-minute tumbling event-time window). Engines, each in its own
subprocess: ``millstream`` (the file as a bounded stream through ``start()``, checkpoints
every 10 s; ``millstream-inline``: the in-process executor), ``millstream-batch`` (the same
pipeline with ``collect()``/``to_arrow()``), ``millstream-ray`` (``start()`` on the Ray
runner, a one-node Ray with its own temp dir; only when named in ``--engines``) and
``bytewax`` (the same pipelines as a Bytewax dataflow, one worker). Every result is checked
against the answer computed from the file with pyarrow; the table shows wall time,
events/s, events/s per core, peak RSS and ratios; JSON goes to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    DATA_DIR,
    INSTALL_HINT,
    RESULTS_DIR,
    EngineResult,
    environment_info,
    format_table,
    module_available,
    own_ray,
    run_worker,
    warm_page_cache,
    write_results,
    write_worker_error,
)

START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z, on a minute boundary
MINUTE_MS = 60_000
FILTER_MIN = 500  # the filter keeps value >= 500 (about half)
ENGINES = ("millstream", "millstream-inline", "millstream-batch", "millstream-ray", "bytewax")
#: engines run when --engines is not given (millstream-ray starts a one-node Ray: ask for it)
DEFAULT_ENGINES = ("millstream", "millstream-inline", "millstream-batch", "bytewax")
PIPELINES = ("filter", "window")
ENGINE_MODULES = {"millstream": "millstream", "millstream-inline": "millstream",
                  "millstream-batch": "millstream", "millstream-ray": "ray",
                  "bytewax": "bytewax"}
# Cores an engine's pipeline runs on: Millstream's parallel streaming executor runs
# --parallelism partitions of every stage as task processes (at most the machine's cores
# busy); the inline executor runs every operator in one thread; Bytewax runs one worker;
# batch mode uses --parallelism.
Result = tuple[dict[str, Any], dict[str, Any]]


# =========================================================================== data


def data_path(events: int, keys: int, minutes: int, seed: int) -> Path:
    """The cached event file for these parameters."""
    return DATA_DIR / f"streaming-{events}ev-{keys}k-{minutes}m-seed{seed}.parquet"


def generate(path: Path, events: int, keys: int, minutes: int, seed: int) -> None:
    """Write ``events`` events in event-time order spread over ``minutes`` minutes."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    names = np.array([f"k{k:05d}" for k in range(keys)], dtype=object)
    chunk = 500_000
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    schema = pa.schema([("key", pa.string()), ("ts", pa.int64()), ("value", pa.int64())])
    with pq.ParquetWriter(tmp, schema) as w:
        for lo in range(0, events, chunk):
            idx = np.arange(lo, min(events, lo + chunk), dtype=np.int64)
            ts = START_MS + idx * (minutes * MINUTE_MS) // events
            table = pa.table({"key": names[rng.integers(0, keys, len(idx))],
                              "ts": ts, "value": rng.integers(0, 1000, len(idx))},
                             schema=schema)
            w.write_table(table, row_group_size=100_000)
    tmp.replace(path)


def expected(path: Path) -> dict[str, dict[str, Any]]:
    """The answers of both pipelines, computed from the file with pyarrow."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    kept = t.filter(pc.greater_equal(t["value"], FILTER_MIN))
    minute = pc.multiply(pc.divide(t["ts"], MINUTE_MS), MINUTE_MS)
    g = t.append_column("start", minute).group_by(["key", "start"]).aggregate([("ts", "count")])
    windows = zip(g["key"].to_pylist(), g["start"].to_pylist(), g["ts_count"].to_pylist())
    return {"filter": filter_checksum(kept.num_rows, pc.sum(kept["value"]).as_py(),
                                      pc.sum(kept["ts"]).as_py()),
            "window": window_checksum(windows)}


def filter_checksum(rows: int, value_sum: int, ts_sum: int) -> dict[str, Any]:
    """What a filter result is checked by: rows, and sums of two columns."""
    return {"rows": int(rows), "value_sum": int(value_sum or 0), "ts_sum": int(ts_sum or 0)}


def window_checksum(windows: Iterable[tuple[str, int, int]]) -> dict[str, Any]:
    """Windows (key, start ms, count): their number, total count and a digest of them all."""
    items = sorted((str(k), int(s), int(c)) for k, s, c in windows)
    digest = hashlib.sha256()
    for k, s, c in items:
        digest.update(f"{k}\t{s}\t{c}\n".encode())
    return {"windows": len(items), "events": sum(c for _, _, c in items),
            "digest": digest.hexdigest()}


# =========================================================================== engines


class CountingSink:
    """A Millstream streaming sink that only counts rows and sums columns, exactly once."""

    def __init__(self) -> None:
        self.totals = [0, 0, 0]
        self._pending = [0, 0, 0]
        self._committed: set[int] = set()

    def begin(self, epoch: int) -> None:
        """Start an epoch."""
        self._pending = [0, 0, 0]

    def write(self, batch: Any) -> None:
        """Count a batch of the current epoch."""
        import pyarrow.compute as pc

        self._pending[0] += batch.num_rows
        self._pending[1] += pc.sum(batch.column("value")).as_py() or 0
        self._pending[2] += pc.sum(batch.column("ts")).as_py() or 0

    def pre_commit(self, epoch: int) -> dict[str, Any]:
        """The epoch's counts as its handle."""
        handle = {"epoch": epoch, "counts": list(self._pending)}
        self._pending = [0, 0, 0]
        return handle

    def commit(self, handle: dict[str, Any]) -> None:
        """Add an epoch's counts once."""
        if handle["epoch"] not in self._committed:
            self._committed.add(handle["epoch"])
            self.totals = [a + b for a, b in zip(self.totals, handle["counts"])]

    def abort(self, handle: dict[str, Any] | None = None) -> None:
        """Drop the pending counts."""
        self._pending = [0, 0, 0]


def _ms_pipeline(ms: Any, path: str, pipeline: str) -> Any:
    """The Millstream Dataset of a pipeline (the same for streaming and batch)."""
    events = ms.read_parquet(path)
    if pipeline == "filter":
        return events.filter(ms.col("value") >= FILTER_MIN)
    return (events.with_watermark("ts", delay="10s").group_by("key")
            .window(ms.tumbling("1m"), on="ts").agg(ms.count().alias("n")))


def _ms_windows(table: Any) -> dict[str, Any]:
    """Checksum a Millstream window result table."""
    import pyarrow as pa

    starts = table["window_start"].cast(pa.int64()).to_pylist()  # µs since the epoch
    return window_checksum(zip(table["key"].to_pylist(), (s // 1000 for s in starts),
                               table["n"].to_pylist()))


def run_millstream(path: str, pipeline: str, parallelism: int,
                   executor: str = "parallel") -> Result:
    """Millstream streaming: the file as a bounded stream through ``start()``."""
    import millstream as ms
    from millstream.testing import CollectingSink

    if executor == "inline":
        parallelism = 1
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as chk:
        t0 = time.perf_counter()
        sink = CountingSink() if pipeline == "filter" else CollectingSink()
        job = _ms_pipeline(ms, path, pipeline).start(checkpoint=chk, checkpoint_interval="10s",
                                                     sink=sink, parallelism=parallelism,
                                                     executor=executor)
        job.await_termination()
        query = time.perf_counter() - t0
        metrics = job.metrics()
    if pipeline == "filter":
        checksum = filter_checksum(*sink.totals)
    else:
        checksum = _ms_windows(sink.to_arrow())
    cores = 1 if executor == "inline" else min(os.cpu_count() or 1, metrics.get("tasks", 1))
    details = {"query_s": query, "cores": cores, "checkpoints": metrics["checkpoints"],
               "records_in": metrics["records_in"], "late_records": metrics["late_records"],
               "executor": executor, "parallelism": parallelism}
    return checksum, details


def run_millstream_ray(path: str, pipeline: str, parallelism: int) -> Result:
    """Millstream streaming on the Ray runner: every task an actor of a one-node Ray that
    this process starts (with ``parallelism`` CPUs; its own temp dir, see run_once)."""
    import millstream as ms
    from millstream.runners.ray import connect

    t0 = time.perf_counter()
    connect(num_cpus=parallelism, object_store_memory=512 << 20, include_dashboard=False)
    ms.init(runner="ray", parallelism=parallelism, progress=False)
    ms.range(1).count()  # the runner connects lazily: count its start as init
    init = time.perf_counter() - t0
    checksum, details = run_millstream(path, pipeline, parallelism)
    details["init_s"] = init
    return checksum, details


def run_millstream_inline(path: str, pipeline: str, parallelism: int) -> Result:
    """Millstream streaming with the in-process executor (one thread)."""
    return run_millstream(path, pipeline, parallelism, executor="inline")


def run_millstream_batch(path: str, pipeline: str, parallelism: int) -> Result:
    """Millstream batch mode: the same Dataset with ``to_arrow()``."""
    import pyarrow.compute as pc

    import millstream as ms

    t0 = time.perf_counter()
    ms.init(parallelism=parallelism)
    init = time.perf_counter() - t0
    t1 = time.perf_counter()
    table = _ms_pipeline(ms, path, pipeline).to_arrow()
    query = time.perf_counter() - t1
    if pipeline == "filter":
        checksum = filter_checksum(table.num_rows, pc.sum(table["value"]).as_py(),
                                   pc.sum(table["ts"]).as_py())
    else:
        checksum = _ms_windows(table)
    ms.shutdown()
    return checksum, {"init_s": init, "query_s": query, "cores": parallelism}


def run_bytewax(path: str, pipeline: str, parallelism: int) -> Result:
    """Bytewax: the same pipeline as a dataflow (one worker), rows read from the file."""
    import datetime as dt

    import bytewax.operators as op
    import pyarrow.parquet as pq
    from bytewax.dataflow import Dataflow
    from bytewax.operators import windowing as win
    from bytewax.outputs import DynamicSink, StatelessSinkPartition
    from bytewax.testing import TestingSource, run_main

    def rows() -> Iterable[dict[str, Any]]:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=10_000):
            yield from batch.to_pylist()

    totals = [0, 0, 0]
    windows: list[tuple[str, int, int]] = []

    class _Part(StatelessSinkPartition):
        def write_batch(self, items: list[Any]) -> None:
            if pipeline == "filter":
                totals[0] += len(items)
                totals[1] += sum(r["value"] for r in items)
                totals[2] += sum(r["ts"] for r in items)
            else:
                windows.extend((k, START_MS + wid * MINUTE_MS, n) for k, (wid, n) in items)

    class _Sink(DynamicSink):
        def build(self, step_id: str, worker_index: int, worker_count: int) -> _Part:
            return _Part()

    flow = Dataflow("bench")
    events = op.input("in", flow, TestingSource(rows(), batch_size=1_000))
    if pipeline == "filter":
        op.output("out", op.filter("keep", events, lambda r: r["value"] >= FILTER_MIN), _Sink())
    else:
        align = dt.datetime.fromtimestamp(START_MS / 1000, dt.timezone.utc)
        epoch = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
        clock = win.EventClock(lambda r: epoch + dt.timedelta(milliseconds=r["ts"]),
                               wait_for_system_duration=dt.timedelta(seconds=10))
        windower = win.TumblingWindower(length=dt.timedelta(minutes=1), align_to=align)
        counted = win.count_window("count", events, clock, windower, key=lambda r: r["key"])
        op.output("out", counted.down, _Sink())
    t0 = time.perf_counter()
    run_main(flow)
    query = time.perf_counter() - t0
    checksum = filter_checksum(*totals) if pipeline == "filter" else window_checksum(windows)
    return checksum, {"query_s": query, "cores": 1, "workers": 1}


RUNNERS: dict[str, Callable[[str, str, int], Result]] = {
    "millstream": run_millstream,
    "millstream-inline": run_millstream_inline,
    "millstream-batch": run_millstream_batch,
    "millstream-ray": run_millstream_ray,
    "bytewax": run_bytewax,
}


def worker_main(args: argparse.Namespace) -> int:
    """Run one engine on one pipeline in this process; write the outcome as JSON."""
    out = Path(args.result_file)
    try:
        checksum, details = RUNNERS[args.worker](args.input, args.pipeline, args.parallelism)
    except BaseException as e:
        return write_worker_error(out, e)
    t = os.times()
    details["cpu_s"] = t.user + t.system + t.children_user + t.children_system
    out.write_text(json.dumps({"checksum": checksum, "details": details}, default=str))
    return 0


# =========================================================================== harness


def availability(engine: str) -> str | None:
    """Why an engine cannot run here, or None."""
    module = ENGINE_MODULES[engine]
    if not module_available(module):
        hint = "pip install -e ." if module == "millstream" else f"pip install bytewax ({INSTALL_HINT})"
        return f"{module} is not installed: {hint}"
    return None


def run_once(engine: str, pipeline: str, path: Path, args: argparse.Namespace,
             log: Path) -> tuple[dict[str, Any], Any]:
    """One measured subprocess run; return (worker outcome, measurement)."""
    with tempfile.NamedTemporaryFile(prefix=f"st-{engine}-", suffix=".json", delete=False) as f:
        result_file = Path(f.name)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", engine, "--pipeline",
           pipeline, "--input", str(path), "--result-file", str(result_file),
           "--parallelism", str(args.parallelism)]
    env = cleanup = None
    if engine == "millstream-ray":  # a Ray of its own, its processes killed by PID after
        _base, env, cleanup = own_ray()
        env["MILLSTREAM_RAY_LOG_TO_DRIVER"] = "0"
    outcome, run = run_worker(cmd, result_file, env=env, timeout_s=args.timeout, log_path=log,
                              with_pss=False, cleanup=cleanup)
    if run.timed_out:
        outcome = {"error": f"timed out after {args.timeout:.0f} s"}
    elif run.returncode != 0 and "error" not in outcome:
        outcome = {"error": f"exit code {run.returncode}: {run.stderr_tail[-300:]}"}
    return outcome, run


def _fmt(v: float | None, digits: int = 1) -> str:
    """A number for the table, '-' when missing."""
    return "-" if v is None else f"{v:,.{digits}f}"


def harness_main(args: argparse.Namespace) -> int:
    """Generate the data, run every engine on every pipeline, check, print and save."""
    path = data_path(args.events, args.keys, args.minutes, args.seed)
    if not path.exists():
        t0 = time.perf_counter()
        generate(path, args.events, args.keys, args.minutes, args.seed)
        print(f"generated {path.name} in {time.perf_counter() - t0:.1f} s")
    truth = expected(path)
    warm_page_cache(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_dir = RESULTS_DIR / "logs" / f"streaming-{stamp}"
    log_dir.mkdir(parents=True, exist_ok=True)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    pipelines = [p.strip() for p in args.pipelines.split(",") if p.strip()]
    results: dict[str, list[EngineResult]] = {}
    wrong = False
    for pipeline in pipelines:
        results[pipeline] = []
        for engine in engines:
            res = EngineResult(engine=engine, status="ok")
            results[pipeline].append(res)
            why = availability(engine)
            if why:
                res.status, res.message = "skipped", why
                print(f"[{pipeline}] {engine}: skipped ({why})")
                continue
            for r in range(args.repeat):
                log = log_dir / f"{pipeline}-{engine}-{r}.log"
                outcome, run = run_once(engine, pipeline, path, args, log)
                res.runs.append({"outcome": outcome, "run": vars(run)})
                if "error" in outcome:
                    res.status, res.message = "error", f"{outcome['error']} (log: {log})"
                    break
                res.add_run(run, outcome["details"]["query_s"])
                res.checksum, res.details = outcome["checksum"], outcome["details"]
                if res.checksum != truth[pipeline]:
                    res.status = "wrong"
                    res.message = f"expected {truth[pipeline]}, got {res.checksum}"
                    wrong = True
                    break
            print(f"[{pipeline}] {engine}: {res.status} {res.message}".rstrip())
    print()
    for pipeline, rs in results.items():
        print_table(pipeline, rs, args.events)
    payload = {
        "benchmark": "streaming",
        "params": {"events": args.events, "keys": args.keys, "minutes": args.minutes,
                   "seed": args.seed, "repeat": args.repeat, "parallelism": args.parallelism,
                   "file": str(path), "file_mb": round(path.stat().st_size / 2**20, 1)},
        "expected": truth,
        "environment": environment_info(["millstream", "bytewax", "pyarrow", "numpy"]),
        "results": {p: [dict(r.to_json(), **_rates(r, args.events)) for r in rs]
                    for p, rs in results.items()},
    }
    print(f"results: {write_results('streaming', payload)}")
    if wrong:
        print("RESULT MISMATCH: an engine's result differs from the expected one")
        return 2
    return 0


def _rates(r: EngineResult, events: int) -> dict[str, Any]:
    """Events/s (over the pipeline's own time) and events/s per core of an engine's best run."""
    if r.status != "ok" or not r.compute_s:
        return {"events_per_s": None, "events_per_s_per_core": None}
    eps = events / min(r.compute_s)
    return {"events_per_s": eps, "events_per_s_per_core": eps / r.details.get("cores", 1)}


def print_table(pipeline: str, rs: list[EngineResult], events: int) -> None:
    """Print one pipeline's table, with events/s and peak RSS relative to Millstream streaming."""
    base = next((r for r in rs if r.engine == "millstream" and r.status == "ok"), None)
    base_eps = _rates(base, events)["events_per_s"] if base else None
    base_rss = max(base.peak_rss_mb) if base else None
    rows = []
    for r in rs:
        rate = _rates(r, events)
        eps = rate["events_per_s"]
        rows.append([
            r.engine, r.status, _fmt(r.best_wall, 2), _fmt(r.best_compute, 2),
            _fmt(eps, 0), str(r.details.get("cores", "-")) if eps else "-",
            _fmt(rate["events_per_s_per_core"], 0),
            _fmt(max(r.peak_rss_mb) if r.peak_rss_mb else None, 0),
            f"{eps / base_eps:.2f}x" if eps and base_eps else "-",
            f"{max(r.peak_rss_mb) / base_rss:.2f}x" if eps and base_rss else "-",
            r.message[:70]])
    print(f"pipeline {pipeline}: {events:,} events")
    print(format_table(["engine", "status", "wall s", "pipeline s", "events/s", "cores",
                        "events/s/core", "peak RSS MB", "events/s vs ms", "RSS vs ms",
                        "note"], rows))
    print()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=3_000_000)
    p.add_argument("--keys", type=int, default=1_000)
    p.add_argument("--minutes", type=int, default=60, help="event-time span of the data")
    p.add_argument("--seed", type=int, default=20261126)
    p.add_argument("--engines", default=",".join(DEFAULT_ENGINES),
                   help=f"comma-separated, of {', '.join(ENGINES)}")
    p.add_argument("--pipelines", default=",".join(PIPELINES))
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--parallelism", type=int, default=os.cpu_count() or 1,
                   help="cores for Millstream's batch mode")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--pipeline", choices=PIPELINES, help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point: the harness, or one engine with --worker."""
    args = parse_args(argv)
    return worker_main(args) if args.worker else harness_main(args)


if __name__ == "__main__":
    sys.exit(main())
