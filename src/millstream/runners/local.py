"""The local runner: a pool of worker processes on this machine.

Tasks are shipped with cloudpickle over pipes; shuffle data moves through local files.
A task that raises, or whose worker dies (SIGKILL, out of memory), is retried on a
fresh or another worker up to ``max_task_attempts``; only one attempt of each task
contributes its result.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import cloudpickle

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

from millstream.core import pickling
from millstream.errors import RunnerError
from millstream.runners.forkserver import start_forked_server
from millstream.runners.processes import describe_exit, release_memory_promptly
from millstream.runtime.progress import StageProgress
from millstream.runtime.runner import Runner
from millstream.runtime.task import Task, TaskFailure, TaskResult, describe_failure, run_task

FAULT_ENV = "MILLSTREAM_FAULT_INJECT"


def _maybe_inject_fault(task: Task) -> None:
    """Test hook: ``MILLSTREAM_FAULT_INJECT="kill:<stage>:<partition>:<attempt>"`` (or ``raise:``)
    kills this worker (SIGKILL) or raises before the matching task attempt runs.

    ``<stage>`` matches the stage id or purpose; ``*`` matches anything.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    for item in spec.split(","):
        parts = item.split(":")
        if len(parts) != 4:
            continue
        action, stage, part, attempt = parts

        def ok(pattern: str, value: str) -> bool:
            return pattern == "*" or pattern == value

        if (ok(stage, str(task.stage_id)) or ok(stage, task.stage_name)) and ok(part, str(task.partition)) \
                and ok(attempt, str(task.attempt)):
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif action == "raise":
                raise RuntimeError(f"injected fault in {task.describe()} attempt {task.attempt}")


def _worker_main(conn: Connection, env: dict[str, str]) -> None:
    """Worker process loop: receive (attempt, task bytes), run, send the outcome."""
    os.environ.update(env)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _batch_memory_pool()
    while True:
        try:
            msg = conn.recv_bytes()
        except (EOFError, OSError):
            return
        if not msg:
            return
        attempt, payload = pickle.loads(msg)
        try:
            task: Task = cloudpickle.loads(payload)
            task.attempt = attempt
            _maybe_inject_fault(task)
            result = run_task(task, partial(_send_progress, conn))
            out = ("ok", result)
        except BaseException as exc:  # noqa: BLE001 - everything is reported to the driver
            out = ("err", describe_failure(exc))
        try:
            data = cloudpickle.dumps(out)
        except Exception as exc:  # noqa: BLE001
            data = cloudpickle.dumps(("err", describe_failure(exc)))
        try:
            conn.send_bytes(data)
        except (BrokenPipeError, OSError):
            return


def _batch_memory_pool() -> None:
    """Arrow's mimalloc pool for a batch worker when pyarrow has it: it reuses freed pages,
    where jemalloc (decay 0 or not) unmapped every large buffer on free, so each kernel's
    output page-faulted afresh (casting 2.5M values took twice as long; 3.7x the page
    faults on db-benchmark q3-q5). The footprint stays bounded: a worker grew by 77 MiB in
    ``test_memory``'s word count, 80 MiB with jemalloc at decay 0."""
    import pyarrow as pa

    try:
        pa.set_memory_pool(pa.mimalloc_memory_pool())
    except Exception:  # noqa: BLE001 - pyarrow built without mimalloc
        release_memory_promptly()


def _send_progress(conn: Connection, rows: int, nbytes: int) -> None:
    """Tell the driver what the running task has read so far (it keeps waiting for the
    outcome after this message)."""
    try:
        conn.send_bytes(pickle.dumps(("progress", rows, nbytes)))
    except (BrokenPipeError, OSError):
        pass


@dataclass
class _Worker:
    process: mp.process.BaseProcess
    conn: Connection
    busy: tuple[int, int] | None = None  # (task index, attempt)
    started: float = 0.0


def _short_socket_dir() -> None:
    """Give multiprocessing a short temporary directory when ``TMPDIR`` is long.

    The fork server listens on a Unix socket under that directory, and socket paths are
    limited to 107 bytes: a deep ``TMPDIR`` (a CI's per-test directory) would fail the first
    job with "AF_UNIX path too long"."""
    import shutil
    import tempfile
    from multiprocessing import process, util

    config = process.current_process()._config  # noqa: SLF001
    if config.get("tempdir") is not None or len(tempfile.gettempdir()) <= 60:
        return
    for base in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(base) and os.access(base, os.W_OK):
            path = tempfile.mkdtemp(prefix="pymp-", dir=base)
            util.Finalize(None, shutil.rmtree, args=[path], kwargs={"ignore_errors": True},
                          exitpriority=-100)
            config["tempdir"] = path
            return


class LocalRunner(Runner):
    """Runs tasks on ``parallelism`` worker processes of this machine."""

    name = "local"
    runs_small_jobs_here = True

    def __init__(self, parallelism: int, max_task_attempts: int = 4, speculation: bool = True,
                 speculation_multiplier: float = 4.0, speculation_quantile: float = 0.75,
                 speculation_min_seconds: float = 5.0) -> None:
        if parallelism < 1:
            raise RunnerError(f"parallelism must be >= 1, got {parallelism}")
        if max_task_attempts < 1:
            raise RunnerError(f"max_task_attempts must be >= 1, got {max_task_attempts}")
        self.parallelism = parallelism
        self.max_task_attempts = max_task_attempts
        self.speculation = speculation
        self.speculation_multiplier = speculation_multiplier
        self.speculation_quantile = speculation_quantile
        self.speculation_min_seconds = speculation_min_seconds
        self.speculative_attempts = 0
        self._context: Any = None
        self.workers: list[_Worker] = []

    @property
    def _mp(self) -> Any:
        """The multiprocessing context of the workers, set up when the first one starts (a
        small job run in the driver needs none)."""
        if self._context is None:
            try:
                _short_socket_dir()
                ctx = mp.get_context("forkserver")
                # pyarrow imports pandas (when installed) on its first to_numpy(): import it
                # once in the fork server rather than in every worker; likewise Acero,
                # which every aggregation and join loads
                preload = ["millstream.runtime.task", "millstream.runtime.streaming.slot",
                           "millstream.runners.local_stream", "pyarrow", "cloudpickle",
                           "pandas", "pyarrow.acero"]
                ctx.set_forkserver_preload(preload)
                # on Linux the server is forked from this process, which has imported most
                # of them already (see millstream.runners.forkserver)
                start_forked_server(preload)
            except ValueError:  # pragma: no cover - platforms without forkserver
                ctx = mp.get_context("spawn")
            self._context = ctx
        return self._context

    # ----------------------------------------------------------- workers
    def _spawn(self) -> _Worker:
        parent, child = self._mp.Pipe(duplex=True)
        proc = self._mp.Process(target=_worker_main, args=(child, dict(os.environ)), daemon=True,
                                name="millstream-worker")
        self._start(proc)
        child.close()
        return _Worker(proc, parent)

    def _start(self, proc: mp.process.BaseProcess) -> None:
        """Start a worker process without the user's ``__main__``."""
        # Workers never need the user's __main__ module (cloudpickle ships its functions by
        # value), so hide it: scripts without an `if __name__ == "__main__"` guard then work,
        # and a script is not re-run in every worker.
        main = sys.modules.get("__main__")
        saved_file = getattr(main, "__file__", None)
        saved_spec = getattr(main, "__spec__", None)
        try:
            if main is not None:
                if saved_file is not None:
                    del main.__file__
                main.__spec__ = None
            proc.start()
        finally:
            if main is not None:
                if saved_file is not None:
                    main.__file__ = saved_file
                main.__spec__ = saved_spec

    def start_stream_hosts(self, payloads: list[bytes], inbox_capacity: int) -> Any:
        """Start one long-lived process per streaming task slot (``payloads``: pickled
        callables taking the slot's channels), wired by pipes
        (:class:`~millstream.runners.local_stream.LocalStreamHosts`)."""
        from millstream.runners.local_stream import LocalStreamHosts

        return LocalStreamHosts(self, payloads, inbox_capacity)

    def _ensure_workers(self, n: int) -> None:
        self.workers = [w for w in self.workers if w.process.is_alive()]
        while len(self.workers) < n:
            self.workers.append(self._spawn())

    def _kill(self, w: _Worker) -> None:
        try:
            w.process.kill()
            w.process.join(timeout=5)
        except Exception:  # noqa: BLE001
            pass
        try:
            w.conn.close()
        except Exception:  # noqa: BLE001
            pass

    def worker_pids(self) -> list[int]:
        """PIDs of the live worker processes (for tests and monitoring)."""
        return [w.process.pid for w in self.workers if w.process.is_alive()]

    # ----------------------------------------------------------- scheduling
    def run_tasks(self, tasks: list[Task], progress: StageProgress) -> list[TaskResult]:
        """Run tasks on the pool with retries and speculative backup attempts."""
        n = len(tasks)
        if n == 0:
            return []
        try:
            payloads = [pickling.dumps(t) for t in tasks]
        except Exception:
            self.check_shippable(tasks)  # names the function and what it captures
            raise
        results: list[TaskResult | None] = [None] * n
        causes: list[list[str]] = [[] for _ in range(n)]
        next_attempt = [1] * n
        running: dict[int, list[_Worker]] = {}
        speculated: set[int] = set()
        durations: list[float] = []
        pending: deque[tuple[int, int]] = deque((i, 0) for i in range(n))
        remaining = n
        self._ensure_workers(min(self.parallelism, n))
        from multiprocessing.connection import wait as wait_for
        try:
            while remaining:
                self._assign(pending, payloads, running, progress)
                if not pending:
                    self._maybe_speculate(n, remaining, durations, running, speculated, pending,
                                          next_attempt)
                    self._assign(pending, payloads, running, progress)
                busy = [w for w in self.workers if w.busy is not None]
                if not busy:
                    self._ensure_workers(min(self.parallelism, remaining))
                    continue
                handles = [w.conn for w in busy] + [w.process.sentinel for w in busy]
                ready = wait_for(handles, timeout=0.5)
                for w in busy:
                    if w.busy is None:
                        continue
                    idx, attempt = w.busy
                    outcome = None
                    if w.conn in ready:
                        try:
                            outcome = cloudpickle.loads(w.conn.recv_bytes())
                        except (EOFError, OSError):
                            outcome = None
                        if outcome is not None and outcome[0] == "progress":
                            progress.task_progress(idx, attempt, outcome[1], outcome[2])
                            continue
                    if outcome is None and not (w.process.sentinel in ready or not w.process.is_alive()):
                        continue
                    w.busy = None
                    running[idx] = [x for x in running.get(idx, []) if x is not w]
                    if outcome is None:
                        w.process.join(timeout=1)
                        cause = f"attempt {attempt}: {describe_exit(w.process.exitcode)} " \
                                f"(pid {w.process.pid})"
                        failure = TaskFailure("WorkerLostError", cause, "", retryable=True)
                        self._replace(w)
                    elif outcome[0] == "ok":
                        if results[idx] is None:
                            results[idx] = outcome[1]
                            remaining -= 1
                            durations.append(time.monotonic() - w.started)
                            progress.task_done(idx, attempt, outcome[1])
                            # the first attempt to finish wins; cancel its backups
                            for other in running.pop(idx, []):
                                if other.busy is not None:
                                    progress.task_killed(idx, other.busy[1],
                                                         "another attempt finished first")
                                self._replace(other)
                        continue
                    else:
                        failure = outcome[1]
                        cause = f"attempt {attempt}: {failure.error_type}: {failure.message}"
                    if results[idx] is not None:
                        continue
                    self._attempt_failed(idx, cause, failure, bool(running.get(idx)), causes,
                                         pending, next_attempt, tasks, progress, attempt)
        except BaseException:
            # stop whatever still runs for this stage; the workers are replaced lazily
            for w in list(self.workers):
                if w.busy is not None:
                    self._kill(w)
                    self.workers.remove(w)
            raise
        return results  # type: ignore[return-value]

    def _assign(self, pending: deque[tuple[int, int]], payloads: list[bytes],
                running: dict[int, list[_Worker]], progress: StageProgress) -> None:
        for w in self.workers:
            if not pending:
                return
            if w.busy is not None or not w.process.is_alive():
                continue
            idx, attempt = pending.popleft()
            try:
                w.conn.send_bytes(pickle.dumps((attempt, payloads[idx])))
            except (BrokenPipeError, OSError):
                pending.appendleft((idx, attempt))
                continue
            w.busy = (idx, attempt)
            w.started = time.monotonic()
            progress.task_started(idx, attempt, f"pid {w.process.pid}",
                                  speculative=bool(running.get(idx)))
            running.setdefault(idx, []).append(w)

    def _maybe_speculate(self, n: int, remaining: int, durations: list[float],
                         running: dict[int, list[_Worker]], speculated: set[int],
                         pending: deque[tuple[int, int]], next_attempt: list[int]) -> None:
        """Start a backup attempt of a straggler: a task running far longer than its finished
        siblings (``speculation_multiplier`` x their median), once most tasks are done."""
        if not self.speculation or not durations or remaining == 0:
            return
        if (n - remaining) < self.speculation_quantile * n:
            return
        if not any(w.busy is None and w.process.is_alive() for w in self.workers):
            return
        durations_sorted = sorted(durations)
        median = durations_sorted[len(durations_sorted) // 2]
        threshold = max(self.speculation_min_seconds, self.speculation_multiplier * median)
        now = time.monotonic()
        for idx, ws in running.items():
            if idx in speculated or len(ws) != 1:
                continue
            if now - ws[0].started > threshold and next_attempt[idx] < self.max_task_attempts:
                speculated.add(idx)
                pending.append((idx, next_attempt[idx]))
                next_attempt[idx] += 1
                self.speculative_attempts += 1
                return

    def _replace(self, w: _Worker) -> None:
        """Kill a worker (dead, or running a losing attempt) and start a fresh one."""
        self._kill(w)
        if w in self.workers:
            self.workers.remove(w)
        self.workers.append(self._spawn())

    def shutdown(self, wait: bool = True) -> None:
        """Ask idle workers to exit (busy ones are killed after 3 s, or at once when not
        ``wait``)."""
        for w in self.workers:
            try:
                w.conn.send_bytes(b"")
            except Exception:  # noqa: BLE001
                pass
        deadline = time.monotonic() + (3 if wait else 0.05)
        for w in self.workers:
            w.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                self._kill(w)
        self.workers = []
