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
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

import cloudpickle

from millstream.errors import MillstreamError, RunnerError, TaskError, UserFunctionError
from millstream.runners.base import Runner
from millstream.runtime.progress import StageProgress
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


def _release_memory_promptly() -> None:
    """Make Arrow's allocator return freed memory to the OS at once, so a worker's
    footprint follows its memory budget rather than its high-water mark."""
    import pyarrow as pa

    try:
        pa.set_memory_pool(pa.jemalloc_memory_pool())
        pa.jemalloc_set_decay_ms(0)
    except Exception:  # noqa: BLE001 - pyarrow built without jemalloc: keep its default pool
        pass


def _worker_main(conn: Connection, env: dict[str, str]) -> None:
    """Worker process loop: receive (attempt, task bytes), run, send the outcome."""
    os.environ.update(env)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _release_memory_promptly()
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
            result = run_task(task)
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


@dataclass
class _Worker:
    process: mp.process.BaseProcess
    conn: Connection
    busy: tuple[int, int] | None = None  # (task index, attempt)
    started: float = 0.0


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "worker process vanished"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (killed; out of memory?)" if name == "SIGKILL" else ""
        return f"worker process died from {name}{hint}"
    return f"worker process exited with code {code}"


class LocalRunner(Runner):
    """Runs tasks on ``parallelism`` worker processes of this machine."""

    name = "local"

    def __init__(self, parallelism: int, max_task_attempts: int = 4) -> None:
        if parallelism < 1:
            raise RunnerError(f"parallelism must be >= 1, got {parallelism}")
        self.parallelism = parallelism
        self.max_task_attempts = max_task_attempts
        try:
            self._mp = mp.get_context("forkserver")
            self._mp.set_forkserver_preload(["millstream.runtime.task", "pyarrow", "cloudpickle"])
        except ValueError:  # pragma: no cover - platforms without forkserver
            self._mp = mp.get_context("spawn")
        self.workers: list[_Worker] = []

    # ----------------------------------------------------------- workers
    def _spawn(self) -> _Worker:
        parent, child = self._mp.Pipe(duplex=True)
        proc = self._mp.Process(target=_worker_main, args=(child, dict(os.environ)), daemon=True,
                                name="millstream-worker")
        proc.start()
        child.close()
        return _Worker(proc, parent)

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
        n = len(tasks)
        if n == 0:
            return []
        payloads = [cloudpickle.dumps(t) for t in tasks]
        results: list[TaskResult | None] = [None] * n
        causes: list[list[str]] = [[] for _ in range(n)]
        last_failure: list[TaskFailure | None] = [None] * n
        pending: deque[tuple[int, int]] = deque((i, 0) for i in range(n))
        remaining = n
        self._ensure_workers(min(self.parallelism, n))
        try:
            while remaining:
                # assign work
                for w in self.workers:
                    if not pending:
                        break
                    if w.busy is None:
                        if not w.process.is_alive():
                            continue
                        idx, attempt = pending.popleft()
                        try:
                            w.conn.send_bytes(pickle.dumps((attempt, payloads[idx])))
                        except (BrokenPipeError, OSError):
                            pending.appendleft((idx, attempt))
                            continue
                        w.busy = (idx, attempt)
                        w.started = time.monotonic()
                busy = [w for w in self.workers if w.busy is not None]
                if not busy:
                    # all workers died while idle: replace them
                    self._ensure_workers(min(self.parallelism, remaining))
                    continue
                handles = [w.conn for w in busy] + [w.process.sentinel for w in busy]
                ready = wait(handles, timeout=1.0)
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
                    if outcome is None and not (w.process.sentinel in ready or not w.process.is_alive()):
                        continue
                    w.busy = None
                    if outcome is None:
                        w.process.join(timeout=1)
                        cause = f"attempt {attempt}: {_describe_exit(w.process.exitcode)} " \
                                f"(pid {w.process.pid})"
                        failure = TaskFailure("WorkerLostError", cause, "", retryable=True)
                        self._kill(w)
                        self.workers.remove(w)
                        self.workers.append(self._spawn())
                    elif outcome[0] == "ok":
                        results[idx] = outcome[1]
                        remaining -= 1
                        progress.task_done(outcome[1].rows_out, outcome[1].bytes_out)
                        continue
                    else:
                        failure = outcome[1]
                        cause = f"attempt {attempt}: {failure.error_type}: {failure.message}"
                    causes[idx].append(cause)
                    last_failure[idx] = failure
                    if failure.retryable and attempt + 1 < self.max_task_attempts:
                        pending.append((idx, attempt + 1))
                        progress.task_retried()
                    else:
                        raise self._task_error(tasks[idx], failure, causes[idx])
        except BaseException:
            # stop whatever still runs for this stage; the workers are replaced lazily
            for w in list(self.workers):
                if w.busy is not None:
                    self._kill(w)
                    self.workers.remove(w)
            raise
        return results  # type: ignore[return-value]

    def _task_error(self, task: Task, failure: TaskFailure, causes: list[str]) -> BaseException:
        exc = failure.exception
        if not failure.retryable and isinstance(exc, MillstreamError):
            # bad input, bad schema, existing output: the precise error itself
            return exc
        where = f"stage {task.stage_id} ({task.stage_name}), partition {task.partition}"
        attempts = "\n".join("  " + c.splitlines()[0] for c in causes)
        n = len(causes)
        if failure.user_traceback:
            msg = (f"{failure.message}\n  in {where}, failed on all {n} attempt(s)\n\n"
                   f"{failure.user_traceback}\nAttempts:\n{attempts}")
            err: TaskError = UserFunctionError(msg, stage=task.stage_name, partition=task.partition,
                                               operator=failure.operator, attempts=causes,
                                               user_traceback=failure.user_traceback,
                                               cause_type=failure.error_type)
        else:
            detail = failure.traceback.strip().splitlines()[-1] if failure.traceback else failure.message
            msg = (f"task failed in {where} after {n} attempt(s): {failure.error_type}: "
                   f"{failure.message}\nAttempts:\n{attempts}")
            if failure.traceback:
                msg += f"\n\nLast attempt's traceback:\n{failure.traceback}"
            del detail
            err = TaskError(msg, stage=task.stage_name, partition=task.partition,
                            operator=failure.operator, attempts=causes, cause_type=failure.error_type)
        if isinstance(failure.exception, BaseException):
            err.__cause__ = failure.exception
        return err

    def shutdown(self) -> None:
        for w in self.workers:
            try:
                w.conn.send_bytes(b"")
            except Exception:  # noqa: BLE001
                pass
        deadline = time.monotonic() + 3
        for w in self.workers:
            w.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                self._kill(w)
        self.workers = []


def run_inline(task: Task) -> TaskResult:
    """Run a task in the driver process (used for tiny driver-side work and debugging)."""
    return run_task(task)
