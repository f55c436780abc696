"""The harness of the query benchmarks (tpch.py, join.py): every (query, engine) pair runs
in its own measured subprocess, which starts the engine, runs the query once (cold: a
fresh process) and again (warm: the same process); the answer of the cold run is checked,
and the times are reported per query and as geometric means, as ratios to a reference
engine (DuckDB).

A benchmark script supplies the engines (objects with ``run(query) -> pyarrow.Table``),
the check of an answer, and its command line; this module runs and reports.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import threading
import time
import traceback
from argparse import SUPPRESS, ArgumentParser, Namespace
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

from common import format_table, run_worker, tree_cpu_seconds

#: Relative and absolute tolerance of numeric answers: decimal engines round quotients and
#: averages to 6 digits, float engines sum in another order.
REL_TOL = 1e-6
ABS_TOL = 1e-5
#: Memory sampling period: PSS sampling reads every process's smaps, which costs CPU that
#: a 2-core machine would take from the engine under test; 100 ms halves that of 50 ms.
SAMPLE_INTERVAL_S = 0.1


class Unsupported(Exception):
    """The engine cannot express the query yet: the message names the missing feature."""


class QueryEngine(Protocol):
    """An engine started in a worker process."""

    details: dict[str, Any]

    def run(self, query: str) -> Any:
        """Run one query; return its whole answer as a pyarrow Table in this process."""

    def close(self) -> None:
        """Stop the engine."""


# =========================================================================== worker


def add_query_worker_args(p: ArgumentParser, engines: Sequence[str]) -> None:
    """The hidden options with which the harness runs one (query, engine) in a worker."""
    p.add_argument("--worker", choices=engines, help=SUPPRESS)
    p.add_argument("--query", help=SUPPRESS)
    p.add_argument("--result-file", help=SUPPRESS)


def query_worker_main(make_engine: Callable[[Namespace], QueryEngine], args: Namespace) -> int:
    """Start the engine, run ``args.query`` ``args.runs`` times (each under
    ``args.timeout`` seconds, else the process ends), write the outcome as JSON to
    ``args.result_file`` and the cold run's answer as Arrow IPC next to it.

    Exit status: 0 done, 1 error, 3 unsupported, 4 timed out.
    """
    import pyarrow as pa

    out = Path(args.result_file)
    outcome: dict[str, Any] = {"runs": []}

    def save() -> None:
        out.write_text(json.dumps(outcome, default=str))

    def on_timeout() -> None:
        outcome["error"] = f"timed out after {args.timeout:.0f} s (run {len(outcome['runs']) + 1})"
        outcome["timeout"] = True
        save()
        print(outcome["error"], file=sys.stderr, flush=True)
        os._exit(4)

    try:
        t0 = time.perf_counter()
        engine = make_engine(args)
        outcome["init_s"] = time.perf_counter() - t0
        outcome["details"] = dict(engine.details)
        save()
        for i in range(args.runs):
            watchdog = threading.Timer(args.timeout, on_timeout)
            watchdog.daemon = True
            watchdog.start()
            c0 = tree_cpu_seconds()
            t1 = time.perf_counter()
            table = engine.run(args.query)
            seconds = time.perf_counter() - t1
            cpu = tree_cpu_seconds() - c0
            watchdog.cancel()
            if i == 0:
                with pa.OSFile(str(out.with_suffix(".arrow")), "wb") as f, \
                        pa.ipc.new_file(f, table.schema) as writer:
                    writer.write_table(table)
                outcome["rows"] = table.num_rows
            outcome["runs"].append({"s": seconds, "cpu_s": cpu})
            save()
            print(f"run {i + 1}: {seconds:.3f} s, {table.num_rows} rows", file=sys.stderr,
                  flush=True)
        engine.close()
    except Unsupported as e:
        outcome["unsupported"] = str(e)
        save()
        print(f"unsupported: {e}", file=sys.stderr)
        return 3
    except BaseException as e:  # noqa: BLE001 - every failure is reported, not raised
        traceback.print_exc()
        outcome["error"] = f"{type(e).__name__}: {e}".strip().splitlines()[0][:300]
        save()
        return 1
    return 0


# =========================================================================== checking


def _norm(v: Any) -> Any:
    """A comparable Python value: numbers as float, dates as ISO text."""
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float, Decimal)):
        return float(v)
    if isinstance(v, datetime):
        return v.date().isoformat() if v.time() == datetime.min.time() else v.isoformat()
    if isinstance(v, date):
        return v.isoformat()
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    return v


def table_rows(table: Any) -> list[tuple[Any, ...]]:
    """The rows of a pyarrow Table as tuples of normalized values."""
    cols = [[_norm(v) for v in c.to_pylist()] for c in table.columns]
    return list(zip(*cols)) if cols else []


def values_equal(a: Any, b: Any) -> bool:
    """Equal values, numbers within the tolerance."""
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=ABS_TOL)
    return a == b


def _rows_equal(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return len(a) == len(b) and all(values_equal(x, y) for x, y in zip(a, b))


def _canonical_key(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """Sort key for comparing answers as multisets: exact columns first, then numbers
    rounded to 6 significant digits (so that near-equal numbers sort alike)."""
    exact = tuple((0, "") if v is None else (1, v) for v in row if not isinstance(v, float))
    approx = tuple(float(f"{v:.6g}") for v in row if isinstance(v, float))
    return exact + approx


def _sorted_by(rows: list[tuple[Any, ...]], order_by: Sequence[tuple[int, bool]]) -> bool:
    """Whether rows are in the order of ``order_by`` ((column index, descending) pairs);
    values that are equal within the tolerance count as ties."""
    for prev, cur in zip(rows, rows[1:]):
        for i, desc in order_by:
            a, b = prev[i], cur[i]
            if values_equal(a, b):
                continue
            if a is None or b is None:
                break
            if (a > b) != desc:
                return False
            break
    return True


def compare_answers(expected: Any, got: Any, order_by: Sequence[tuple[int, bool]] | None,
                    limit: int = 5) -> list[str]:
    """How an answer differs from the expected one (pyarrow Tables, columns by position):
    the same rows (numbers within the tolerance) and, with ``order_by``, in that order
    (rows that tie on the ORDER BY columns may come in any order). Empty when right."""
    if got.num_columns != expected.num_columns:
        return [f"{got.num_columns} columns {got.column_names}, expected "
                f"{expected.num_columns} {expected.column_names}"]
    exp_rows, got_rows = table_rows(expected), table_rows(got)
    if len(got_rows) != len(exp_rows):
        return [f"{len(got_rows)} rows, expected {len(exp_rows)}"]
    if order_by is not None and all(_rows_equal(a, b) for a, b in zip(exp_rows, got_rows)):
        return []
    problems = []
    exp_sorted = sorted(exp_rows, key=_canonical_key)
    got_sorted = sorted(got_rows, key=_canonical_key)
    for e, g in zip(exp_sorted, got_sorted):
        if not _rows_equal(e, g):
            problems.append(f"row {g} where {e} was expected")
            if len(problems) >= limit:
                break
    if not problems and order_by is not None and not _sorted_by(got_rows, order_by):
        problems.append(f"right rows, wrong order (expected ORDER BY {list(order_by)})")
    return problems


def read_arrow(path: Path) -> Any:
    """Read an Arrow IPC file written by a worker."""
    import pyarrow as pa

    with pa.memory_map(str(path), "r") as src:
        return pa.ipc.open_file(src).read_all()


# =========================================================================== harness


@dataclass
class Cell:
    """The outcome of one (query, engine) subprocess."""

    query: str
    engine: str
    status: str  # ok | WRONG | unsupported | error | timeout | skipped
    message: str = ""
    init_s: float | None = None
    cold_s: float | None = None
    warm_s: float | None = None  # best of the runs after the first
    cold_cpu_s: float | None = None
    warm_cpu_s: float | None = None
    wall_s: float | None = None
    process_cpu_s: float | None = None
    peak_rss_mb: float | None = None
    peak_pss_mb: float | None = None
    processes: int = 0
    rows: int | None = None
    problems: list[str] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    log: str = ""

    @property
    def timed(self) -> bool:
        """Whether the run produced times (right or wrong answer)."""
        return self.status in ("ok", "WRONG", "timeout") and self.cold_s is not None

    def seconds(self, phase: str) -> float | None:
        """The time of a phase ('cold' or 'warm') whose answer is right: a cold run that
        finished counts even when the warm run after it timed out."""
        t = getattr(self, f"{phase}_s")
        if self.status == "ok" or (self.status == "timeout" and not self.problems):
            return t
        return None


def engine_env(engine: str, parallelism: int) -> dict[str, str]:
    """The environment of an engine's subprocess: thread caps, quiet Spark, and the
    repository's src/ on PYTHONPATH so that this checkout of Millstream is imported."""
    env = dict(os.environ)
    env["POLARS_MAX_THREADS"] = str(parallelism)
    src = str(Path(__file__).resolve().parent.parent / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if engine == "pyspark":
        env.setdefault("PYSPARK_PYTHON", sys.executable)
        env.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
        env.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    return env


def run_cell(script: Path, engine: str, query: str, args: Namespace, log_path: Path,
             check: Callable[[str, Any], list[str]], extra: Sequence[str] = ()) -> Cell:
    """Run one query on one engine in a measured subprocess; check its answer."""
    with tempfile.NamedTemporaryFile(prefix=f"qb-{engine}-", suffix=".json",
                                     delete=False) as tf:
        result_file = Path(tf.name)
    answer_file = result_file.with_suffix(".arrow")
    cmd = [sys.executable, str(script), "--worker", engine, "--query", query,
           "--result-file", str(result_file), "--parallelism", str(args.parallelism),
           "--runs", str(args.runs), "--timeout", str(args.timeout), *extra]
    if args.memory_limit:
        cmd += ["--memory-limit", args.memory_limit]
    # The worker enforces the per-run timeout itself; this one covers a hung start.
    budget = args.startup_timeout + args.runs * args.timeout + 30

    def cleanup() -> None:
        result_file.unlink(missing_ok=True)

    try:
        outcome, run = run_worker(cmd, result_file, timeout_s=budget, log_path=log_path,
                                  with_pss=not args.no_pss, env=engine_env(engine, args.parallelism),
                                  cleanup=cleanup, interval_s=SAMPLE_INTERVAL_S)
        cell = Cell(query=query, engine=engine, status="ok", log=str(log_path),
                    wall_s=run.wall_s, process_cpu_s=run.cpu_s, peak_rss_mb=run.peak_rss_mb,
                    peak_pss_mb=run.peak_pss_mb, processes=run.max_processes,
                    init_s=outcome.get("init_s"), rows=outcome.get("rows"),
                    runs=outcome.get("runs", []), details=outcome.get("details", {}))
        if cell.runs:
            cell.cold_s = cell.runs[0]["s"]
            cell.cold_cpu_s = cell.runs[0]["cpu_s"]
            warm = cell.runs[1:]
            if warm:
                best = min(warm, key=lambda r: r["s"])
                cell.warm_s, cell.warm_cpu_s = best["s"], best["cpu_s"]
        if "unsupported" in outcome:
            cell.status, cell.message = "unsupported", outcome["unsupported"]
        elif outcome.get("timeout") or run.timed_out:
            cell.status = "timeout"
            cell.message = outcome.get("error") or f"no answer within {budget:.0f} s"
        elif "error" in outcome or run.returncode != 0 or not cell.runs:
            cell.status = "error"
            last = run.stderr_tail.strip().splitlines()[-1:] or [f"exit code {run.returncode}"]
            cell.message = outcome.get("error") or last[0][:300]
        if cell.cold_s is not None and answer_file.exists():
            cell.problems = check(query, read_arrow(answer_file))
            if cell.problems and cell.status in ("ok", "timeout"):
                cell.status = "WRONG" if cell.status == "ok" else cell.status
                cell.message = cell.message or "answer differs from the reference"
        return cell
    finally:
        answer_file.unlink(missing_ok=True)


def run_matrix(script: Path, queries: Sequence[str], engines: Sequence[str], args: Namespace,
               log_dir: Path, check: Callable[[str, Any], list[str]],
               availability: Callable[[str], str | None],
               extra: Sequence[str] = ()) -> list[Cell]:
    """Every query on every engine (engines in turn for each query), with progress."""
    skipped = {e: availability(e) for e in engines}
    for e, why in skipped.items():
        if why:
            print(f"[skip] {e}: {why}", flush=True)
    cells = []
    for q in queries:
        for e in engines:
            if skipped[e]:
                cells.append(Cell(query=q, engine=e, status="skipped", message=skipped[e] or ""))
                continue
            print(f"{q:>4} {e:<12}", end=" ", flush=True)
            cell = run_cell(script, e, q, args, log_dir / f"{q}-{e}.log", check, extra)
            cells.append(cell)
            print(describe(cell), flush=True)
    return cells


def describe(cell: Cell) -> str:
    """One line about a cell, for the progress output."""
    parts = []
    if cell.cold_s is not None:
        parts.append(f"cold {cell.cold_s:.2f} s")
    if cell.warm_s is not None:
        parts.append(f"warm {cell.warm_s:.2f} s")
    if cell.peak_rss_mb is not None and cell.timed:
        parts.append(f"peak RSS {cell.peak_rss_mb:.0f} MB")
    status = cell.status if not cell.message else f"{cell.status}: {cell.message}"
    if cell.problems:
        status += f" ({cell.problems[0][:200]})"
    return ", ".join(parts + [status])


# =========================================================================== reporting


def geomean(values: Sequence[float]) -> float | None:
    """Geometric mean of positive values, None when there are none."""
    vals = [v for v in values if v and v > 0]
    if not vals:
        return None
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


_SHORT = {"unsupported": "unsupp.", "error": "error", "timeout": "timeout", "skipped": "-"}


def _index(cells: Sequence[Cell]) -> dict[tuple[str, str], Cell]:
    return {(c.query, c.engine): c for c in cells}


def summarize(cells: Sequence[Cell], queries: Sequence[str], engines: Sequence[str],
              reference: str) -> dict[str, Any]:
    """Per engine and phase (cold, warm): how many queries ran right, geometric means of
    the seconds and of the ratios to the reference engine (over the queries both ran
    right), and the queries whose ratio is the largest."""
    by = _index(cells)
    out: dict[str, Any] = {}
    for e in engines:
        per: dict[str, Any] = {"status_counts": {}}
        for q in queries:
            c = by.get((q, e))
            if c:
                per["status_counts"][c.status] = per["status_counts"].get(c.status, 0) + 1
        for phase in ("cold", "warm"):
            secs, ratios = [], []
            for q in queries:
                c, r = by.get((q, e)), by.get((q, reference))
                t = c.seconds(phase) if c else None
                if t is None:
                    continue
                secs.append(t)
                rt = r.seconds(phase) if r else None
                if rt:
                    ratios.append(t / rt)
            per[phase] = {"queries": len(secs), "geomean_s": geomean(secs),
                          "ratio_queries": len(ratios), "geomean_ratio": geomean(ratios),
                          "max_ratio": max(ratios) if ratios else None}
        out[e] = per
    return out


def _fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def time_table(cells: Sequence[Cell], queries: Sequence[str], engines: Sequence[str],
               reference: str, phase: str, summary: Mapping[str, Any]) -> str:
    """A table of seconds per query (rows) and engine (columns), each with its ratio to
    the reference, and geometric means at the bottom."""
    by = _index(cells)
    headers = ["query"]
    for e in engines:
        headers += [f"{e} s"] if e == reference else [f"{e} s", "x"]
    rows = []
    for q in queries:
        ref = by.get((q, reference))
        ref_t = ref.seconds(phase) if ref else None
        row = [q]
        for e in engines:
            c = by.get((q, e))
            t = c.seconds(phase) if c else None
            if c is not None and c.status == "WRONG" and getattr(c, f"{phase}_s") is not None:
                cell, ratio = f"{getattr(c, f'{phase}_s'):.2f} WRONG", ""
            elif c is None or t is None:
                cell, ratio = _SHORT.get(c.status if c else "skipped", "-"), ""
            else:
                cell = f"{t:.2f}"
                ratio = f"{t / ref_t:.2f}" if ref_t else ""
            row += [cell] if e == reference else [cell, ratio]
        rows.append(row)
    gm = ["geomean"]
    for e in engines:
        s = summary[e][phase]
        n = f" ({s['queries']})" if s["queries"] != len(queries) else ""
        gm += [_fmt(s["geomean_s"]) + n]
        if e != reference:
            rn = f" ({s['ratio_queries']})" if s["ratio_queries"] != len(queries) else ""
            gm += [_fmt(s["geomean_ratio"]) + rn]
    rows.append(gm)
    return format_table(headers, rows)


def resource_table(cells: Sequence[Cell], queries: Sequence[str],
                   engines: Sequence[str]) -> str:
    """Peak memory (PSS where sampled, else RSS) of each query's process tree and the CPU
    seconds of its warm run, per engine."""
    by = _index(cells)
    headers = ["query"] + [f"{e} {k}" for e in engines for k in ("MB", "cpu s")]
    rows = []
    for q in queries:
        row = [q]
        for e in engines:
            c = by.get((q, e))
            if c is None or not c.timed:
                row += ["-", "-"]
                continue
            mem = c.peak_pss_mb if c.peak_pss_mb is not None else c.peak_rss_mb
            cpu = c.warm_cpu_s if c.warm_cpu_s is not None else c.cold_cpu_s
            row += [_fmt(mem, 0), _fmt(cpu)]
        rows.append(row)
    return format_table(headers, rows)


def print_report(cells: Sequence[Cell], queries: Sequence[str], engines: Sequence[str],
                 reference: str, title: str) -> dict[str, Any]:
    """Print the warm, cold and resource tables and the problems; return the summary."""
    summary = summarize(cells, queries, engines, reference)
    ref_note = f"x = engine s / {reference} s (above 1: slower than {reference})"
    print(f"\n== {title}: warm (best run after the first, same process); {ref_note}")
    print(time_table(cells, queries, engines, reference, "warm", summary))
    print(f"\n== {title}: cold (first run in a fresh process, engine already started)")
    print(time_table(cells, queries, engines, reference, "cold", summary))
    print("\n== peak memory of the process tree (PSS, MB) and CPU seconds of the warm run")
    print(resource_table(cells, queries, engines))
    print("\ngeomean: over the queries the engine answered right (count in parentheses when "
          "not all); its x over those both it and the reference answered right.")
    notes = [c for c in cells if c.status not in ("ok", "skipped")]
    if notes:
        print("\n== not ok")
        for c in notes:
            print(f"{c.query:>4} {c.engine:<12} {c.status}: {c.message}")
            for p in c.problems[:3]:
                print(f"{'':>17} {p[:300]}")
            if c.status in ("error", "timeout"):
                print(f"{'':>17} log: {c.log}")
    wrong = [c for c in cells if c.status == "WRONG"]
    if wrong:
        bar = "!" * 78
        print(f"\n{bar}\n!!! WRONG ANSWERS: "
              + ", ".join(f"{c.engine} {c.query}" for c in wrong) + f"\n{bar}")
    return summary


def cells_json(cells: Sequence[Cell], reference: str) -> list[dict[str, Any]]:
    """The cells as JSON-ready dicts, with the ratios to the reference engine."""
    by = _index(cells)
    out = []
    for c in cells:
        d = asdict(c)
        ref = by.get((c.query, reference))
        for phase in ("cold", "warm"):
            t = c.seconds(phase)
            rt = ref.seconds(phase) if ref else None
            d[f"{phase}_ratio_to_{reference}"] = t / rt if t and rt else None
        out.append(d)
    return out


def cells_from_results(paths: Sequence[Path]) -> tuple[list[Cell], dict[str, Any]]:
    """The cells of saved results (JSON written by a harness), merged in order: a later
    file's (query, engine) replaces an earlier one's. Also the last file's payload."""
    merged: dict[tuple[str, str], Cell] = {}
    payload: dict[str, Any] = {}
    names = {f.name for f in Cell.__dataclass_fields__.values()}  # type: ignore[attr-defined]
    for path in paths:
        payload = json.loads(Path(path).read_text())
        for d in payload["cells"]:
            cell = Cell(**{k: v for k, v in d.items() if k in names})
            merged[(cell.query, cell.engine)] = cell
    return list(merged.values()), payload


def report_saved(paths: Sequence[Path], engine_order: Sequence[str], reference: str,
                 title: str) -> int:
    """Print the report of saved results (several files merged, as ``cells_from_results``:
    e.g. a run of the peers and a later run of one engine); exit status 2 on a wrong
    answer. Ratios across files compare runs made at different times: say so."""
    cells, _ = cells_from_results(paths)
    engines = [e for e in engine_order if any(c.engine == e for c in cells)]
    queries = sorted({c.query for c in cells},
                     key=lambda q: int("".join(ch for ch in q if ch.isdigit()) or 0))
    ref = reference if reference in engines else engines[0]
    print_report(cells, queries, engines, ref, title)
    return 2 if any(c.status == "WRONG" for c in cells) else 0


def add_common_args(p: ArgumentParser, default_timeout: float) -> None:
    """Options shared by the query benchmarks."""
    p.add_argument("--parallelism", type=int, default=2,
                   help="cores for every engine: DuckDB threads, POLARS_MAX_THREADS, Spark "
                        "local[N], Millstream workers")
    p.add_argument("--runs", type=int, default=2,
                   help="runs per process: the first is cold, the best of the others is warm")
    p.add_argument("--timeout", type=float, default=default_timeout,
                   help="seconds per run of a query; a slower run ends its process")
    p.add_argument("--startup-timeout", type=float, default=180.0,
                   help="seconds allowed for an engine to start (JVM, worker pool)")
    p.add_argument("--memory-limit", default=None,
                   help="e.g. 4GB: Millstream memory_limit, DuckDB memory_limit, Spark driver "
                        "memory (default 4g for Spark, the engines' own defaults otherwise)")
    p.add_argument("--no-pss", action="store_true", help="sample RSS only (cheaper)")
    p.add_argument("--report", nargs="+", metavar="JSON", default=None,
                   help="only print the report of saved results (several: merged, a later "
                        "file's query/engine replacing an earlier one's)")


def parse_list(text: str, allowed: Sequence[str], what: str, p: ArgumentParser) -> list[str]:
    """A comma-separated choice from ``allowed`` ('all' for all); ``p.error`` otherwise."""
    items = list(allowed) if text.strip() == "all" else [x.strip() for x in text.split(",")
                                                         if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad:
        p.error(f"unknown {what} {bad}; choose from {', '.join(allowed)}")
    return items
