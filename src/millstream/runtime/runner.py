"""The runner interface: schedule tasks, move their results, recover failures. Nothing else.

Runners live in the layer above (``millstream.runners``) and register themselves here by
name (:func:`register_runner`), so the session finds them without importing them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from millstream.core.pickling import restore_code_locations, unpicklable_part
from millstream.errors import (
    MillstreamError,
    PlanError,
    RunnerError,
    TaskError,
    UserFunctionError,
)
from millstream.runtime.progress import StageProgress
from millstream.runtime.task import Task, TaskFailure, TaskResult


class Runner(ABC):
    """Runs a stage's tasks to completion, retrying failed attempts."""

    name: str = "runner"
    parallelism: int = 1
    max_task_attempts: int = 4

    @abstractmethod
    def run_tasks(self, tasks: list[Task], progress: StageProgress) -> list[TaskResult]:
        """Run all tasks; return their results in task order or raise TaskError."""

    #: Whether a small job (see ``Settings.driver_input_limit``) may run in the driver
    #: process instead of on the runner's workers (a runner whose workers share this
    #: machine's storage: the local one).
    runs_small_jobs_here: bool = False

    def run_tasks_here(self, tasks: list[Task], progress: StageProgress) -> list[TaskResult]:
        """Run tasks one after another in this process, with the same retries and errors as
        on workers (a small job: starting workers would cost more than the work)."""
        from millstream.core.lazy_pandas import blocking
        from millstream.runtime.task import describe_failure, run_task

        with blocking():
            return self._run_tasks_here(tasks, progress, describe_failure, run_task)

    def _run_tasks_here(self, tasks: list[Task], progress: StageProgress,
                        describe_failure: Any, run_task: Any) -> list[TaskResult]:
        from collections import deque
        from functools import partial

        n = len(tasks)
        results: list[TaskResult | None] = [None] * n
        causes: list[list[str]] = [[] for _ in range(n)]
        next_attempt = [1] * n
        pending: deque[tuple[int, int]] = deque((i, 0) for i in range(n))
        while pending:
            idx, attempt = pending.popleft()
            task = tasks[idx]
            task.attempt = attempt
            progress.task_started(idx, attempt, "driver")
            try:
                result = run_task(task, partial(progress.task_progress, idx, attempt))
            except Exception as exc:  # noqa: BLE001 - reported as a worker would report it
                failure = describe_failure(exc)
                self._attempt_failed(idx, f"attempt {attempt}: {failure.error_type}: "
                                          f"{failure.message}", failure, False, causes,
                                     pending, next_attempt, tasks, progress, attempt)
                continue
            results[idx] = result
            progress.task_done(idx, attempt, result)
        return results  # type: ignore[return-value]

    @abstractmethod
    def shutdown(self, wait: bool = True) -> None:
        """Stop workers and release resources (``wait=False``: kill busy workers at once)."""

    def _attempt_failed(self, idx: int, cause: str, failure: Any, still_running: bool,
                        causes: list[list[str]], pending: Any, next_attempt: list[int],
                        tasks: list[Any], progress: Any, attempt: int = -1) -> None:
        """Record a failed attempt; queue the next attempt, or raise once they are spent.

        While another attempt of the task (a speculative backup) still runs, just record.
        """
        causes[idx].append(cause)
        if still_running:
            progress.task_failed(idx, attempt, cause, retry=False)
            return
        if failure.retryable and next_attempt[idx] < self.max_task_attempts:
            pending.append((idx, next_attempt[idx]))
            next_attempt[idx] += 1
            progress.task_failed(idx, attempt, cause, retry=True)
        else:
            progress.task_failed(idx, attempt, cause, retry=False)
            raise self._task_error(tasks[idx], failure, causes[idx])

    # Where task outputs live is the runner's business: local files by default; a cluster
    # runner returns outputs that keep data in its object store. Handles returned by these
    # outputs must offer what readers use (``read_slice(p)`` or a local ``path``).
    def shuffle_output(self, partitioner: Any, directory: str) -> Any:
        """The output spec of a shuffle map task."""
        from millstream.runtime.task import ShuffleOutput

        return ShuffleOutput(partitioner, directory)

    def block_output(self, directory: str, cached: bool = False) -> Any:
        """The output spec of a task whose result is materialized (collect, cache, broadcast)."""
        from millstream.runtime.task import BlockOutput

        return BlockOutput(directory)

    def release(self, handles: list[Any]) -> None:
        """Free the data behind output handles that are no longer needed (no-op for files)."""
        return None

    @staticmethod
    def check_shippable(tasks: list[Task]) -> None:
        """A PlanError naming the function and what it captures when a task's operators
        cannot be sent to another process (a lock, an open file, a connection)."""
        seen: set[int] = set()
        for task in tasks:
            for factory in task.ops:
                if id(factory) in seen:
                    continue
                seen.add(id(factory))
                for value in [*factory.args, *factory.kwargs.values()]:
                    if not callable(value) and not isinstance(value, (dict, list, tuple)):
                        continue
                    why = unpicklable_part(value)
                    if why is None:
                        continue
                    name = getattr(value, "__qualname__", None) or type(value).__name__
                    raise PlanError(
                        f"the function {name!r} of {factory.describe()} cannot be sent to the "
                        f"worker processes: it {why}. Create such objects inside the function "
                        f"(or in an init hook), not outside it; or run a small job in the driver "
                        f"(ms.init(driver_input_limit=...))")

    def _task_error(self, task: Task, failure: TaskFailure, causes: list[str]) -> BaseException:
        """The error a task that failed on all its attempts raises (shared by all runners).

        ``causes`` holds one line per attempt; a user function's failure becomes a
        UserFunctionError with the user's traceback first; a non-retryable Millstream error
        (bad input, bad schema, existing output, lost shuffle output) is raised as it is.
        """
        exc = failure.exception
        if not failure.retryable and isinstance(exc, MillstreamError):
            # bad input, bad schema, existing output: the precise error itself
            return exc
        reads = "; ".join(spec.describe() for port in task.inputs for spec in port)
        where = (f"stage {task.stage_id} ({task.stage_name}), partition {task.partition}"
                 + (f" (input: {reads})" if reads else ""))
        attempts = _attempt_lines(causes)
        n = len(causes)
        debug = debugging()
        if failure.user_traceback:
            user_tb = restore_code_locations(
                failure.user_traceback, *[(f.args, f.kwargs) for f in task.ops])
            msg = (f"{failure.message}\n  in {where}, failed on all {n} attempt(s)\n\n"
                   f"{user_tb}\nAttempts:\n{attempts}")
            err: TaskError = UserFunctionError(msg, stage=task.stage_name, partition=task.partition,
                                               operator=failure.operator, attempts=causes,
                                               user_traceback=user_tb,
                                               cause_type=failure.error_type)
        else:
            msg = (f"task failed in {where} after {n} attempt(s): {failure.error_type}: "
                   f"{failure.message}\nAttempts:\n{attempts}")
            if failure.traceback and debug:
                msg += f"\n\nLast attempt's traceback:\n{failure.traceback}"
            elif failure.traceback:
                msg += f"\n(set {DEBUG_ENV}=1 for the internal traceback)"
            err = TaskError(msg, stage=task.stage_name, partition=task.partition,
                            operator=failure.operator, attempts=causes, cause_type=failure.error_type)
        err.original = failure.exception  # type: ignore[attr-defined]
        if debug and isinstance(failure.exception, BaseException):
            err.__cause__ = failure.exception
        return err


#: Set to 1 for Millstream's internal frames in task errors (they are left out otherwise).
DEBUG_ENV = "MILLSTREAM_DEBUG"


def debugging() -> bool:
    """Whether errors carry Millstream's internal tracebacks (``MILLSTREAM_DEBUG=1``)."""
    import os

    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _attempt_lines(causes: list[str]) -> str:
    """One line per run of attempts that failed the same way ("attempts 0-3: ...")."""
    lines: list[str] = []
    runs: list[tuple[int, int, str]] = []
    for i, cause in enumerate(causes):
        first = cause.splitlines()[0] if cause else ""
        text = first.split(": ", 1)[1] if first.startswith("attempt ") and ": " in first else first
        if runs and runs[-1][2] == text:
            runs[-1] = (runs[-1][0], i, text)
        else:
            runs.append((i, i, text))
    for a, b, text in runs:
        label = f"attempt {a}" if a == b else f"attempts {a}-{b}"
        lines.append(f"  {label}: {text}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class RunnerEntry:
    """How to make a runner from the session's settings, and when an existing one can be kept
    (``key``: settings that give the same key reuse the running runner)."""

    factory: Callable[[Any], Runner]
    key: Callable[[Any], Hashable]


_REGISTRY: dict[str, RunnerEntry] = {}


def register_runner(name: str, factory: Callable[[Any], Runner],
                    key: Callable[[Any], Hashable] | None = None) -> None:
    """Make ``ms.init(runner=name)`` use ``factory(settings)``; ``key(settings)`` (default: the
    parallelism and address) decides when a running runner of that name can be reused."""
    _REGISTRY[name] = RunnerEntry(
        factory, key or (lambda s: (s.resolved_parallelism(), s.address)))


def runner_names() -> list[str]:
    """Names of the registered runners."""
    return sorted(_REGISTRY)


def runner_entry(name: str) -> RunnerEntry:
    """The registered runner ``name``; a :class:`RunnerError` listing the others if unknown."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise RunnerError(f"unknown runner {name!r}; use one of {', '.join(runner_names())}"
                          ) from None
