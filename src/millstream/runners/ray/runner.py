"""``RayRunner``: each task attempt is one Ray task (retries, attempts and errors are ours),
placed near its input when that node has a free CPU; speculation as on the local runner."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from millstream.errors import RunnerError
from millstream.runners.ray.connect import (
    _INLINE_LIMIT,
    _announce_dashboard,
    _first_line,
    _forwarded_env,
    _set_env,
    connect,
    dashboard_url,
    import_ray,
)
from millstream.runners.ray.objects import (
    _LOST_OBJECTS,
    RayBlockOutput,
    RayBlockRef,
    RayMapOutput,
    RayShuffleOutput,
    _near,
)
from millstream.runners.ray.stream_hosts import RayStreamHosts
from millstream.runtime.progress import StageProgress
from millstream.runtime.runner import Runner
from millstream.runtime.task import (
    BlockInput,
    ShuffleInput,
    Task,
    TaskFailure,
    TaskResult,
    describe_failure,
    run_task,
)

# ------------------------------------------------------------------ the remote side
_worker_ready = False


def _run_attempt(task: Task, attempt: int, env: dict[str, str | None]) -> tuple[Any, Any]:
    """Run one task attempt on a Ray worker: ``(("ok", TaskResult) | ("err", TaskFailure), data)``.

    ``data`` is the output's bytes (a separate Ray object the driver never fetches) or None.
    Spill files go to a directory of this attempt, removed when it ends.
    """
    global _worker_ready
    from millstream.runners.local import FAULT_ENV, _maybe_inject_fault
    from millstream.runners.processes import release_memory_promptly

    if not _worker_ready:
        release_memory_promptly()
        _worker_ready = True
    task.attempt = attempt
    base = task.settings.get("spill_dir") or tempfile.gettempdir()
    try:
        os.makedirs(base, exist_ok=True)
    except OSError:
        base = tempfile.gettempdir()
    scratch = tempfile.mkdtemp(prefix=f"s{task.stage_id}-p{task.partition}-a{attempt}-", dir=base)
    task.settings = {**task.settings, "spill_dir": scratch}
    saved = _set_env({FAULT_ENV: None, **env})
    data = None
    try:
        _maybe_inject_fault(task)
        result = run_task(task)
        result.worker = _where()
        data = getattr(result.value, "_payload", None)
        if data is not None:
            result.value._payload = None
        out: tuple[str, Any] = ("ok", result)
    except BaseException as exc:  # noqa: BLE001 - everything is reported to the driver
        out = ("err", describe_failure(exc))
    finally:
        _set_env(saved)
        shutil.rmtree(scratch, ignore_errors=True)
    return out, data


def _where() -> str:
    """This Ray worker: its node (short id) and process."""
    try:
        import ray

        node = ray.get_runtime_context().get_node_id()[:8]
    except Exception:  # noqa: BLE001 - not in a Ray worker (tests)
        node = "?"
    return f"node {node} pid {os.getpid()}"


# ------------------------------------------------------------------ the runner
@dataclass
class _Attempt:
    """One submitted attempt: its task, attempt number, data object and submit time."""

    index: int
    attempt: int
    data: Any
    started: float


class RayRunner(Runner):
    """Runs each task attempt as a Ray task on the cluster at ``address``.

    ``address=None`` starts a local Ray (``num_cpus`` = ``parallelism``) unless this
    process is connected to Ray already, in which case that connection is used.
    ``parallelism`` caps the attempts in flight (default: the cluster's CPUs).
    """

    name = "ray"

    def __init__(self, parallelism: int | None = None, address: str | None = None,
                 max_task_attempts: int = 4, speculation: bool = True,
                 speculation_multiplier: float = 4.0, speculation_quantile: float = 0.75,
                 speculation_min_seconds: float = 5.0, object_store_memory: int | None = None,
                 runtime_env: dict[str, Any] | None = None, locality: bool = True,
                 **init_options: Any) -> None:
        if parallelism is not None and parallelism < 1:
            raise RunnerError(f"parallelism must be >= 1, got {parallelism}")
        if max_task_attempts < 1:
            raise RunnerError(f"max_task_attempts must be >= 1, got {max_task_attempts}")
        self._ray = import_ray()
        self.address = address
        self.max_task_attempts = max_task_attempts
        self.speculation = speculation
        self.speculation_multiplier = speculation_multiplier
        self.speculation_quantile = speculation_quantile
        self.speculation_min_seconds = speculation_min_seconds
        self.speculative_attempts = 0
        self.locality = locality
        self._requested = parallelism
        try:
            self._owns_connection = connect(address, num_cpus=parallelism,
                                            object_store_memory=object_store_memory,
                                            runtime_env=runtime_env, **init_options)
        except RunnerError:
            raise
        except Exception as exc:  # noqa: BLE001 - say where we tried to connect
            where = f"the Ray cluster at {address}" if address else "a local Ray"
            raise RunnerError(f"could not start or connect to {where}: {type(exc).__name__}: "
                              f"{exc}") from exc
        if not self._owns_connection:
            _announce_dashboard(dashboard_url())
        self.parallelism = parallelism or max(1, self._cluster_cpus())
        self._remote = self._ray.remote(num_returns=2, max_retries=0, num_cpus=1)(_run_attempt)

    # ----------------------------------------------------------- cluster facts
    def _cluster_cpus(self) -> int:
        """CPUs of the cluster's live nodes (0 when unknown)."""
        try:
            return int(self._ray.cluster_resources().get("CPU", 0))
        except Exception:  # noqa: BLE001
            return 0

    def _slots(self) -> int:
        """Attempts in flight: the cluster's CPUs now, at most ``parallelism`` when given."""
        cpus = self._cluster_cpus()
        if self._requested:
            return max(1, min(self._requested, cpus) if cpus else self._requested)
        return max(1, cpus or self.parallelism)

    def _preferred_node(self, task: Task) -> str | None:
        """The node holding most of a task's input objects, when one holds most of them."""
        weights: dict[str, int] = {}
        for port in task.inputs:
            for spec in port:
                if isinstance(spec, ShuffleInput):
                    handles = [(o.node_id, o.size) for o in spec.map_outputs
                               if isinstance(o, RayMapOutput)]
                elif isinstance(spec, BlockInput):
                    handles = [(b.node_id, b.nbytes) for b in spec.blocks
                               if isinstance(b, RayBlockRef)]
                else:
                    continue
                for node, size in handles:
                    if node and size >= _INLINE_LIMIT:
                        weights[node] = weights.get(node, 0) + size
        if not weights:
            return None
        node, best = max(weights.items(), key=lambda kv: kv[1])
        return node if best * 2 > sum(weights.values()) else None

    def _submit(self, task: Task, attempt: int, env: dict[str, str | None]) -> tuple[Any, Any]:
        """Start one attempt as a Ray task; return its (result, data) object refs."""
        fn = self._remote
        node = self._preferred_node(task) if self.locality else None
        if node is not None:
            fn = fn.options(scheduling_strategy=_near(node))
        else:
            # no data to be near: spread a stage's tasks over the nodes (as Ray Data does
            # for reads), instead of Ray's default of filling the driver's node first
            fn = fn.options(scheduling_strategy="SPREAD")
        try:
            meta, data = fn.remote(task, attempt, env)
        except Exception:
            self.check_shippable([task])  # names the function and what it captures
            raise
        return meta, data

    def _cancel(self, refs: list[Any]) -> None:
        """Stop attempts (their workers are killed, as the local runner kills its workers)."""
        for ref in refs:
            try:
                self._ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - already finished or gone
                pass

    # ----------------------------------------------------------- scheduling
    def run_tasks(self, tasks: list[Task], progress: StageProgress) -> list[TaskResult]:
        """Run tasks as Ray tasks with our retries and speculative backup attempts."""
        ray = self._ray
        n = len(tasks)
        if n == 0:
            return []
        env = _forwarded_env()
        slots = self._slots()
        results: list[TaskResult | None] = [None] * n
        causes: list[list[str]] = [[] for _ in range(n)]
        next_attempt = [1] * n
        running: dict[Any, _Attempt] = {}
        per_task: dict[int, list[Any]] = {}
        speculated: set[int] = set()
        durations: list[float] = []
        pending: deque[tuple[int, int]] = deque((i, 0) for i in range(n))
        remaining = n

        def submit() -> None:
            """Start pending attempts while there are free slots."""
            while pending and len(running) < slots:
                idx, attempt = pending.popleft()
                meta, data = self._submit(tasks[idx], attempt, env)
                progress.task_started(idx, attempt, "ray", speculative=bool(per_task.get(idx)))
                running[meta] = _Attempt(idx, attempt, data, time.monotonic())
                per_task.setdefault(idx, []).append(meta)

        try:
            while remaining:
                submit()
                if not pending and len(running) < slots:
                    self._maybe_speculate(n, remaining, durations, running, per_task, speculated,
                                          pending, next_attempt)
                    submit()
                refs = list(running)
                ready, _ = ray.wait(refs, num_returns=1, timeout=0.5)
                if not ready:
                    continue
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                for meta in ready:
                    att = running.pop(meta, None)
                    if att is None:
                        continue
                    idx = att.index
                    per_task[idx] = [r for r in per_task.get(idx, []) if r != meta]
                    try:
                        status, payload = ray.get(meta)
                    except ray.exceptions.RuntimeEnvSetupError as exc:
                        status, payload = "err", TaskFailure(type(exc).__name__, _first_line(exc),
                                                             str(exc), retryable=False)
                    except ray.exceptions.RayError as exc:
                        status, payload = "lost", exc
                    if status == "ok":
                        if results[idx] is None:
                            value = payload.value
                            if isinstance(value, (RayMapOutput, RayBlockRef)):
                                value.ref = att.data
                            results[idx] = payload
                            remaining -= 1
                            durations.append(time.monotonic() - att.started)
                            progress.task_done(idx, att.attempt, payload)
                            # the first attempt to finish wins; stop its backups
                            others = per_task.pop(idx, [])
                            for other in others:
                                lost = running.pop(other, None)
                                if lost is not None:
                                    progress.task_killed(idx, lost.attempt,
                                                         "another attempt finished first")
                            self._cancel(others)
                        continue
                    if status == "lost":
                        cause = (f"attempt {att.attempt}: Ray worker lost "
                                 f"({type(payload).__name__}: {_first_line(payload)})")
                        failure = TaskFailure("WorkerLostError", cause, "", retryable=True)
                    else:
                        failure = payload
                        cause = f"attempt {att.attempt}: {failure.error_type}: {failure.message}"
                        lost = getattr(failure.exception, "lost_objects", None)
                        if lost:
                            _LOST_OBJECTS.update(lost)
                    if results[idx] is not None:
                        continue
                    self._attempt_failed(idx, cause, failure, bool(per_task.get(idx)), causes,
                                         pending, next_attempt, tasks, progress, att.attempt)
        except BaseException:
            # stop whatever still runs for this stage
            self._cancel(list(running))
            running.clear()
            raise
        return results  # type: ignore[return-value]

    def _maybe_speculate(self, n: int, remaining: int, durations: list[float],
                         running: dict[Any, _Attempt], per_task: dict[int, list[Any]],
                         speculated: set[int], pending: deque[tuple[int, int]],
                         next_attempt: list[int]) -> None:
        """Start a backup attempt of a straggler, with the local runner's rule: a task running
        ``speculation_multiplier`` x the median of its finished siblings, once most are done."""
        if not self.speculation or not durations or remaining == 0:
            return
        if (n - remaining) < self.speculation_quantile * n:
            return
        ordered = sorted(durations)
        threshold = max(self.speculation_min_seconds,
                        self.speculation_multiplier * ordered[len(ordered) // 2])
        now = time.monotonic()
        for idx, refs in per_task.items():
            if idx in speculated or len(refs) != 1 or refs[0] not in running:
                continue
            if now - running[refs[0]].started > threshold and next_attempt[idx] < self.max_task_attempts:
                speculated.add(idx)
                pending.append((idx, next_attempt[idx]))
                next_attempt[idx] += 1
                self.speculative_attempts += 1
                return

    # ----------------------------------------------------------- outputs
    def shuffle_output(self, partitioner: Any, directory: str) -> Any:
        """Map outputs go to the object store (``directory`` is not used)."""
        return RayShuffleOutput(partitioner)

    def block_output(self, directory: str, cached: bool = False) -> Any:
        """Materialized blocks go to the object store (``directory`` is not used)."""
        return RayBlockOutput(cached=cached)

    def release(self, handles: list[Any]) -> None:
        """Drop the driver's references, so Ray frees the objects nobody else holds."""
        for h in handles:
            if isinstance(h, (RayMapOutput, RayBlockRef)):
                h.ref = None

    def start_stream_hosts(self, payloads: list[bytes], inbox_capacity: int) -> RayStreamHosts:
        """Start one actor per streaming task (``payloads``: pickled callables taking the
        task's channels), spread over the cluster's nodes."""
        return RayStreamHosts(self._ray, payloads, inbox_capacity)

    def shutdown(self, wait: bool = True) -> None:
        """Disconnect from Ray (stopping the local Ray) if this runner connected; never stop a
        cluster it merely joined, nor a connection it found."""
        if self._owns_connection and self._ray.is_initialized():
            self._ray.shutdown()
        self._owns_connection = False


