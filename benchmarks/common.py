"""Shared helpers for the Millstream benchmarks: process measurement, checksums, reporting."""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from argparse import SUPPRESS, ArgumentParser, Namespace
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
DATA_DIR = BENCH_DIR / "data"
RESULTS_DIR = BENCH_DIR / "results"
INSTALL_HINT = "pip install 'millstream[bench]'"

_MB = 1024 * 1024
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(text: str) -> int:
    """Parse a byte size such as '4GB', '512m', '2GiB' or '1048576' into bytes."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 512MB, 4GB)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def module_available(name: str) -> bool:
    """Tell whether a module can be imported, without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def package_version(dist: str) -> str | None:
    """Return the installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- measurement


@dataclass
class ProcessRun:
    """Outcome of one measured subprocess run."""

    returncode: int | None
    wall_s: float
    peak_rss_mb: float
    peak_pss_mb: float | None
    max_processes: int
    timed_out: bool
    stderr_tail: str
    #: CPU seconds (user + system) of the process tree: the larger of what the OS reports
    #: for the reaped child (and the descendants it reaped) and the sum of the last CPU
    #: time sampled from each process of the tree (which sees processes the child never
    #: reaped, such as a JVM, up to the last 50 ms sample).
    cpu_s: float | None = None


def _tree(proc: Any) -> list[Any]:
    """Return a psutil process and all its live descendants."""
    import psutil

    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return [proc]


def _sample(procs: Sequence[Any], with_pss: bool,
            cpu: dict[int, float] | None = None) -> tuple[int, int | None, int]:
    """Sum RSS (and PSS when asked) over a process tree; return (rss, pss, live count).

    With ``cpu``, also record each process's CPU seconds so far (user + system) by PID.
    """
    import psutil

    rss = 0
    pss: int | None = 0 if with_pss else None
    live = 0
    for p in procs:
        if cpu is not None:
            try:
                t = p.cpu_times()
                cpu[p.pid] = max(cpu.get(p.pid, 0.0), t.user + t.system)
            except psutil.Error:
                pass
        try:
            if with_pss:
                info = p.memory_full_info()
                rss += info.rss
                pss = (pss or 0) + getattr(info, "pss", info.rss)
            else:
                rss += p.memory_info().rss
            live += 1
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        except psutil.AccessDenied:
            with_pss = False
            pss = None
            try:
                rss += p.memory_info().rss
                live += 1
            except psutil.Error:
                continue
    return rss, pss, live


def run_measured(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout_s: float | None = None,
    interval_s: float = 0.05,
    log_path: Path | None = None,
    with_pss: bool = True,
) -> ProcessRun:
    """Run a command in its own session, sampling the summed memory and the CPU time of
    its process tree."""
    import resource

    import psutil

    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    popen = subprocess.Popen(
        list(cmd),
        env=dict(env) if env is not None else None,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    ps_proc = psutil.Process(popen.pid)
    peak_rss = 0
    peak_pss: int | None = 0 if with_pss else None
    max_procs = 1
    cpu_by_pid: dict[int, float] = {}
    stop = threading.Event()

    def sampler() -> None:
        nonlocal peak_rss, peak_pss, max_procs
        while not stop.is_set():
            rss, pss, live = _sample(_tree(ps_proc), with_pss, cpu_by_pid)
            peak_rss = max(peak_rss, rss)
            if pss is None:
                peak_pss = None
            elif peak_pss is not None:
                peak_pss = max(peak_pss, pss)
            max_procs = max(max_procs, live)
            stop.wait(interval_s)

    thread = threading.Thread(target=sampler, name="rss-sampler", daemon=True)
    thread.start()
    timed_out = False
    try:
        popen.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_session(popen)
    except BaseException:
        _kill_session(popen)
        raise
    finally:
        wall = time.perf_counter() - start
        stop.set()
        thread.join()
        if log_path:
            log.close()  # type: ignore[union-attr]
        # Our session may have left orphans behind (e.g. a JVM): end them, they are ours.
        _kill_session(popen)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    reaped = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    tail = ""
    if log_path and log_path.exists():
        tail = _tail(log_path, 40)
    return ProcessRun(
        returncode=popen.returncode,
        wall_s=wall,
        peak_rss_mb=peak_rss / _MB,
        peak_pss_mb=None if peak_pss is None else peak_pss / _MB,
        max_processes=max_procs,
        timed_out=timed_out,
        stderr_tail=tail,
        cpu_s=max(reaped, sum(cpu_by_pid.values())),
    )


def tree_cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process and its live descendants
    (and the children they reaped): the difference of two calls is the CPU time of the
    work in between, worker processes and JVMs included."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in _tree(me):
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            continue
    return total


def _kill_session(popen: subprocess.Popen[bytes]) -> None:
    """Kill the process group that we started for a measured run (if any of it is left)."""
    import psutil

    try:
        os.killpg(popen.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        popen.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    # Wait until the group is really gone, so that it does not disturb the next measurement.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = []
        for p in psutil.process_iter(["status"]):
            try:
                if os.getpgid(p.pid) == popen.pid and p.info["status"] != psutil.STATUS_ZOMBIE:
                    left.append(p)
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
        if not left:
            return
        time.sleep(0.1)


def _tail(path: Path, lines: int) -> str:
    """Return the last lines of a text file."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 16384))
        data = f.read().decode("utf-8", errors="replace")
    return "\n".join(data.splitlines()[-lines:])


def warm_page_cache(path: Path, chunk: int = 16 * _MB) -> None:
    """Read a file once so that every engine starts with it in the OS page cache."""
    with open(path, "rb", buffering=0) as f:
        while f.read(chunk):
            pass


# --------------------------------------------------------------------------- workers


class EngineUnavailable(RuntimeError):
    """The engine cannot run in this checkout (not installed or not implemented yet)."""


def write_worker_error(out: Path, exc: BaseException) -> int:
    """Print the traceback, write the error's first line as the worker's outcome; return 1."""
    traceback.print_exc()
    msg = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]
    out.write_text(json.dumps({"error": msg}))
    return 1


def engine_worker_main(fn: Callable[[str, int, int | None], tuple[dict[str, Any], dict[str, Any]]],
                       args: Namespace) -> int:
    """Run ``fn(input, parallelism, memory_limit)`` in this process; write its outcome as JSON.

    The outcome is the checksum, the details and the compute time (engine start + query),
    or an error (``unavailable`` when the engine raised :class:`EngineUnavailable`).
    """
    out = Path(args.result_file)
    t0 = time.perf_counter()
    try:
        checksum, details = fn(args.input, args.parallelism, args.memory_limit_bytes)
    except EngineUnavailable as e:
        out.write_text(json.dumps({"error": str(e), "unavailable": True}))
        print(f"engine unavailable: {e}", file=sys.stderr)
        return 3
    except BaseException as e:
        return write_worker_error(out, e)
    compute = details.get("init_s", 0.0) + details.get("query_s", time.perf_counter() - t0)
    out.write_text(
        json.dumps({"compute_s": compute, "checksum": checksum, "details": details}, default=str)
    )
    return 0


def own_ray() -> tuple[str, dict[str, str], Callable[[], list[int]]]:
    """A Ray of a run's own: (its base dir, the worker's environment, cleanup).

    The base is a short temp dir (Ray's socket paths) used as ``RAY_TMPDIR`` and, under
    it, ``HOME`` (Ray writes its auth token there). ``cleanup()`` SIGKILLs every process
    whose command line names the base (only this run's do; never ``ray stop``), removes
    the dir and returns the PIDs it killed.
    """
    import tempfile

    base = tempfile.mkdtemp(prefix="msbench-", dir="/tmp")
    home = os.path.join(base, "home")
    os.makedirs(home, exist_ok=True)
    env = dict(os.environ)
    env.update({"HOME": home, "RAY_TMPDIR": base, "RAY_USAGE_STATS_ENABLED": "0"})

    def cleanup() -> list[int]:
        import psutil

        killed = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any(base in part for part in p.info["cmdline"] or ()):
                    os.kill(p.info["pid"], signal.SIGKILL)
                    killed.append(p.info["pid"])
            except (psutil.Error, OSError):
                continue
        shutil.rmtree(base, ignore_errors=True)
        return killed

    return base, env, cleanup


def run_worker(
    cmd: Sequence[str],
    result_file: Path,
    *,
    timeout_s: float,
    log_path: Path,
    with_pss: bool,
    env: Mapping[str, str] | None = None,
    cleanup: Callable[[], None] | None = None,
    interval_s: float = 0.05,
) -> tuple[dict[str, Any], ProcessRun]:
    """Run a worker subprocess (from the repository root), measured; return the outcome
    it wrote to ``result_file`` (``{}`` if none) and the measurement.

    ``cleanup`` runs afterwards in any case (default: delete ``result_file``);
    ``interval_s`` is the memory sampling period.
    """
    try:
        run = run_measured(cmd, env=env, cwd=str(REPO_DIR), timeout_s=timeout_s,
                           log_path=log_path, with_pss=with_pss, interval_s=interval_s)
        try:
            outcome = json.loads(result_file.read_text() or "{}")
        except (OSError, ValueError):
            outcome = {}
    finally:
        if cleanup is None:
            result_file.unlink(missing_ok=True)
        else:
            cleanup()
    return outcome, run


def check_outcome(outcome: dict[str, Any], run: ProcessRun, timeout_s: float) -> dict[str, Any]:
    """The worker's outcome, or an error outcome when the run timed out or crashed."""
    if run.timed_out:
        return {"error": f"timed out after {timeout_s:.0f} s", "timeout": True}
    if run.returncode != 0 and "error" not in outcome:
        last = run.stderr_tail.strip().splitlines()[-1:] or [f"exit code {run.returncode}"]
        return {"error": f"exit code {run.returncode}: {last[0][:300]}"}
    return outcome


def add_worker_args(p: ArgumentParser, engines: Sequence[str]) -> None:
    """The hidden options with which a harness runs one engine in a worker subprocess."""
    p.add_argument("--worker", choices=engines, help=SUPPRESS)
    p.add_argument("--input", help=SUPPRESS)
    p.add_argument("--result-file", help=SUPPRESS)


def check_engine_args(p: ArgumentParser, args: Namespace, all_engines: Sequence[str]) -> None:
    """Parse ``--memory-limit`` and, for the harness, check ``--engines`` (or 'all') and
    the counts; ``p.error`` on a bad value."""
    args.memory_limit_bytes = parse_size(args.memory_limit) if args.memory_limit else None
    if not args.worker:
        names = all_engines if args.engines.strip() == "all" else args.engines.split(",")
        args.engines = [e.strip() for e in names if e.strip()]
        unknown = [e for e in args.engines if e not in all_engines]
        if unknown:
            p.error(f"unknown engine(s) {unknown}; choose from {', '.join(all_engines)}")
        if args.parallelism < 1 or args.repeat < 1 or args.size_mb < 1:
            p.error("--parallelism, --repeat and --size-mb must be >= 1")


# --------------------------------------------------------------------------- checksums


def checksum_from_pairs(pairs: Iterable[tuple[str, int]], top: int = 10) -> dict[str, Any]:
    """Summarize a word->count result: distinct words, total, top words and a digest of all."""
    items = sorted((str(w), int(c)) for w, c in pairs)
    digest = hashlib.sha256()
    duplicates = 0
    prev: str | None = None
    for w, c in items:
        if w == prev:
            duplicates += 1
        prev = w
        digest.update(w.encode("utf-8"))
        digest.update(b"\t%d\n" % c)
    top_items = sorted(items, key=lambda wc: (-wc[1], wc[0]))[:top]
    return {
        "distinct": len(items),
        "duplicate_keys": duplicates,
        "total": sum(c for _, c in items),
        "top": [[w, c] for w, c in top_items],
        "digest": digest.hexdigest(),
    }


def checksum_from_arrow(table: Any, top: int = 10) -> dict[str, Any]:
    """Checksum a two-column (word, count) Arrow table or anything with the Arrow C stream."""
    import pyarrow as pa

    if not isinstance(table, pa.Table):
        table = pa.table(table)
    if table.num_columns != 2:
        raise ValueError(f"expected 2 columns (word, count), got {table.schema}")
    words = table.column(0).to_pylist()
    counts = table.column(1).to_pylist()
    return checksum_from_pairs(zip(words, counts), top=top)


def compare_checksums(expected: Mapping[str, Any], got: Mapping[str, Any]) -> list[str]:
    """List the ways in which a result checksum differs from the expected one."""
    problems = []
    for key in ("distinct", "total", "duplicate_keys", "top", "digest"):
        if expected.get(key) != got.get(key):
            e, g = expected.get(key), got.get(key)
            if key == "top":
                problems.append(f"top words differ: expected {e}, got {g}")
            else:
                problems.append(f"{key}: expected {e}, got {g}")
    return problems


# --------------------------------------------------------------------------- reporting


@dataclass
class EngineResult:
    """Aggregated measurements of one engine over all repeats."""

    engine: str
    status: str  # ok | error | skipped | wrong | timeout
    message: str = ""
    wall_s: list[float] = field(default_factory=list)
    compute_s: list[float] = field(default_factory=list)
    peak_rss_mb: list[float] = field(default_factory=list)
    peak_pss_mb: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    max_processes: int = 0
    checksum: dict[str, Any] | None = None
    details: dict[str, Any] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def best_wall(self) -> float | None:
        """Fastest wall time over the repeats."""
        return min(self.wall_s) if self.wall_s else None

    @property
    def best_compute(self) -> float | None:
        """Fastest in-process compute time over the repeats."""
        return min(self.compute_s) if self.compute_s else None

    def add_run(self, run: ProcessRun, compute_s: float) -> None:
        """Add the measurements of one successful run."""
        self.wall_s.append(run.wall_s)
        self.compute_s.append(compute_s)
        self.peak_rss_mb.append(run.peak_rss_mb)
        if run.peak_pss_mb is not None:
            self.peak_pss_mb.append(run.peak_pss_mb)
        if run.cpu_s is not None:
            self.cpu_s.append(run.cpu_s)
        self.max_processes = max(self.max_processes, run.max_processes)

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict with summary fields added."""
        data = asdict(self)
        data["best_wall_s"] = self.best_wall
        data["best_compute_s"] = self.best_compute
        data["max_peak_rss_mb"] = max(self.peak_rss_mb) if self.peak_rss_mb else None
        data["max_peak_pss_mb"] = max(self.peak_pss_mb) if self.peak_pss_mb else None
        data["min_cpu_s"] = min(self.cpu_s) if self.cpu_s else None
        return data


def mark_unavailable(results: Mapping[str, EngineResult],
                     availability: Callable[[str], str | None]) -> None:
    """Mark (and report) as skipped the engines that cannot run here."""
    for engine, res in results.items():
        reason = availability(engine)
        if reason:
            res.status, res.message = "skipped", reason
            print(f"[skip] {engine}: {reason}", flush=True)


def add_ratios(items: Sequence[dict[str, Any]], results: Sequence[EngineResult],
               ref: EngineResult | None, key: str) -> None:
    """Set ``item[key]`` = best wall / the reference engine's best wall, for every engine
    with a result (right or wrong), when the reference ran fine."""
    if ref and ref.status == "ok" and ref.best_wall:
        for item, r in zip(items, results):
            if r.best_wall and r.status in ("ok", "WRONG"):
                item[key] = r.best_wall / ref.best_wall


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Render a plain-text table with right-aligned numeric columns."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]

    def fmt(cells: Sequence[str]) -> str:
        out = []
        for i, (cell, w) in enumerate(zip(cells, widths)):
            out.append(cell.ljust(w) if i == 0 or i == len(cells) - 1 else cell.rjust(w))
        return "  ".join(out).rstrip()

    lines = [fmt(headers), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)


def environment_info(packages: Sequence[str]) -> dict[str, Any]:
    """Describe the machine and the package versions a benchmark ran with."""
    import psutil

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1),
        "java": _java_version(),
        "packages": {p: package_version(p) for p in packages},
        "git_commit": _git_commit(),
    }
    return info


def _java_version() -> str | None:
    """Return the first line of `java -version`, or None without Java."""
    java = shutil.which("java")
    if not java:
        return None
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = (out.stderr or out.stdout).strip().splitlines()
    return lines[0] if lines else None


def _git_commit() -> str | None:
    """Return the repository's HEAD commit (read-only), or None."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=BENCH_DIR, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def write_results(name: str, payload: Mapping[str, Any]) -> Path:
    """Write a benchmark's results as JSON to benchmarks/results/<name>-<timestamp>.json."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = RESULTS_DIR / f"{name}-{stamp}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path
