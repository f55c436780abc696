"""The Ray runner: the same batch pipelines on a Ray cluster.

Ray is the distributed engine; Millstream brings no cluster manager of its own. Each task
attempt is one Ray task (``max_retries=0``: retries, attempt numbers and error messages are
ours, exactly as on the local runner). Task outputs live in the Ray object store:

- a shuffle map task writes its indexed shuffle file (the local runner's format) and
  returns it as a second, separate object; the driver only receives the small
  :class:`TaskResult` with the partition index, and reducers ``ray.get`` the map outputs
  by reference and read their own slice (zero-copy from the object store);
- materialized blocks (collect, cache, broadcast) are objects too, so ``cache()`` keeps
  its partitions in the object store across actions for as long as the session holds
  their handles.

Data locality, object transfer and spilling of the object store are Ray's. A lost object
(its node died) is reported by the reader as :class:`FetchFailedError`, and the scheduler
recomputes the map tasks whose outputs :meth:`is_lost` says are gone, as on the local
runner. Sources are planned on the driver as splits (paths and byte ranges); the workers
read them from shared storage themselves.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from millstream.core.shuffle import (
    BlockRef,
    BlockWriter,
    MapOutput,
    Partitioner,
    ShuffleWriter,
    _stream_batches,
)
from millstream.errors import FetchFailedError, RunnerError, WorkerLostError
from millstream.runtime.progress import StageProgress
from millstream.runtime.runner import Runner
from millstream.runtime.streaming.wire import from_wire, to_wire, wire_bytes
from millstream.runtime.task import (
    BlockInput,
    ShuffleInput,
    Task,
    TaskFailure,
    TaskResult,
    describe_failure,
    run_task,
)

INSTALL_HINT = "the Ray runner needs Ray: pip install 'millstream[ray]'"

#: Driver environment variables (by prefix) that every task attempt sees on its worker, as
#: local workers inherit the driver's environment: storage credentials and endpoints, and
#: Millstream's own switches (fault injection in tests).
FORWARD_ENV_PREFIXES: tuple[str, ...] = ("MILLSTREAM_", "AWS_", "GOOGLE_", "AZURE_")

# Ray returns task results smaller than this to the owner (the driver) inline instead of
# keeping them in the producing node's object store (``max_direct_call_object_size``).
_INLINE_LIMIT = 100 * 1024

_logger = logging.getLogger(__name__)


def import_ray() -> Any:
    """The ``ray`` module, or a RunnerError saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise RunnerError(INSTALL_HINT) from exc
    return ray


# ------------------------------------------------------------------ connecting
def worker_runtime_env(runtime_env: dict[str, Any] | None = None) -> dict[str, Any]:
    """A runtime_env whose PYTHONPATH holds the driver's own code directories.

    Functions of importable modules travel by reference (as with the local runner's
    cloudpickle), so workers must find the same modules: the driver's ``sys.path`` entries
    outside the Python installation are put first on the workers' path (they exist there
    when the code is on a shared path or the cluster is this machine).
    """
    env = dict(runtime_env or {})
    env_vars = dict(env.get("env_vars") or {})
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    own: list[str] = []
    for entry in sys.path:
        if not entry or not os.path.isdir(entry):
            continue
        real = os.path.realpath(entry)
        if any(real == p or real.startswith(p + os.sep) for p in prefixes):
            continue
        if "site-packages" in real or "dist-packages" in real or real in own:
            continue
        own.append(real)
    if own:
        rest = env_vars.get("PYTHONPATH") or "${PYTHONPATH}"
        env_vars["PYTHONPATH"] = os.pathsep.join([*own, rest])
        env["env_vars"] = env_vars
    return env


_announced: set[str] = set()


def dashboard_url() -> str | None:
    """The Ray dashboard URL of the connected cluster, when it runs one."""
    ray = import_ray()
    if not ray.is_initialized():
        return None
    try:
        url = ray._private.worker.get_dashboard_url()  # no public API for a joined cluster
    except Exception:  # noqa: BLE001
        url = None
    if not url:
        return None
    return url if "://" in url else f"http://{url}"


def _announce_dashboard(url: str | None) -> None:
    """Print the dashboard link on stderr, once per URL and process."""
    if url and url not in _announced:
        _announced.add(url)
        sys.stderr.write(f"millstream: Ray dashboard at {url}\n")
        sys.stderr.flush()


def connect(address: str | None = None, *, num_cpus: int | None = None,
            object_store_memory: int | None = None, runtime_env: dict[str, Any] | None = None,
            **init_options: Any) -> bool:
    """Connect this process to Ray (start a local Ray when ``address`` is None).

    Returns True when this call initialized Ray, False when Ray was already initialized
    (then the existing connection is used as it is).
    """
    ray = import_ray()
    if ray.is_initialized():
        return False
    options: dict[str, Any] = {"runtime_env": worker_runtime_env(runtime_env),
                               "logging_level": logging.WARNING,
                               # workers' output is shown here unless turned off (the tests do)
                               "log_to_driver": os.environ.get("MILLSTREAM_RAY_LOG_TO_DRIVER", "1") != "0"}
    if address is None:
        if num_cpus is not None:
            options["num_cpus"] = num_cpus
        if object_store_memory is not None:
            options["object_store_memory"] = object_store_memory
    else:
        options["address"] = address
    options.update(init_options)
    context = ray.init(**options)
    url = getattr(context, "dashboard_url", None)
    _announce_dashboard((url if "://" in url else f"http://{url}") if url else dashboard_url())
    return True


# ------------------------------------------------------------------ object handles
_LOST_OBJECTS: set[str] = set()
_dead: dict[str, Any] = {"at": 0.0, "nodes": frozenset()}
_dead_lock = threading.Lock()


def _dead_nodes() -> frozenset[str]:
    """IDs of the cluster's dead nodes (asked at most once a second)."""
    with _dead_lock:
        now = time.monotonic()
        if now - _dead["at"] > 1.0:
            ray = import_ray()
            try:
                _dead["nodes"] = frozenset(n["NodeID"] for n in ray.nodes() if not n.get("Alive"))
            except Exception:  # noqa: BLE001 - no answer: assume nothing died
                _dead["nodes"] = frozenset()
            _dead["at"] = now
        return _dead["nodes"]


def _object_lost(ref: Any, node_id: str, size: int) -> bool:
    """Whether an object is gone: released, reported lost by a reader, or on a dead node.

    Objects are produced with ``max_retries=0``, so Ray does not rebuild them by lineage
    (that would re-run attempts behind our back); the scheduler recomputes them instead.
    Small objects live with their owner (the driver), not on the producing node.
    """
    if ref is None:
        return True
    if ref.hex() in _LOST_OBJECTS:
        return True
    return size >= _INLINE_LIMIT and bool(node_id) and node_id in _dead_nodes()


def _fetch(ref: Any, what: str, stage_id: int | None = None, map_index: int | None = None) -> Any:
    """``ray.get`` of an output object; a lost object becomes FetchFailedError."""
    ray = import_ray()
    if ref is None:
        raise FetchFailedError(f"{what} was released", stage_id=stage_id, map_index=map_index)
    try:
        return ray.get(ref)
    except ray.exceptions.ObjectLostError as exc:
        _LOST_OBJECTS.add(ref.hex())
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        err = FetchFailedError(f"{what} is gone (Ray object {ref.hex()}): {type(exc).__name__}: "
                               f"{first}", stage_id=stage_id, map_index=map_index)
        err.lost_objects = [ref.hex()]  # type: ignore[attr-defined]
        raise err from exc


@dataclass
class RayMapOutput(MapOutput):
    """A shuffle map output kept in the Ray object store (the indexed shuffle file's bytes)."""

    node_id: str = ""
    size: int = 0
    ref: Any = field(default=None, repr=False, compare=False)
    _payload: Any = field(default=None, repr=False, compare=False)

    def read_slice(self, partition: int) -> Iterator[pa.RecordBatch]:
        """The batches of reduce partition ``partition`` (zero-copy from the object store)."""
        data = _fetch(self.ref, f"shuffle output of stage {self.stage_id} map task {self.map_index}",
                      self.stage_id, self.map_index)
        offset, length = self.offsets[partition]
        yield from _stream_batches(data.slice(offset, length))

    def is_lost(self) -> bool:
        """Whether the object is gone (see ``_object_lost``)."""
        return _object_lost(self.ref, self.node_id, self.size)


@dataclass
class RayBlockRef(BlockRef):
    """A materialized partition kept in the Ray object store (an Arrow IPC stream)."""

    node_id: str = ""
    cached: bool = False
    ref: Any = field(default=None, repr=False, compare=False)
    _payload: Any = field(default=None, repr=False, compare=False)

    def read(self) -> Iterator[pa.RecordBatch]:
        """Stream the block's batches (zero-copy from the object store)."""
        data = _fetch(self.ref, "cached partition" if self.cached else "materialized block")
        yield from _stream_batches(data)

    def is_lost(self) -> bool:
        """Whether the object is gone (see ``_object_lost``)."""
        return _object_lost(self.ref, self.node_id, self.nbytes)


def _take_file(path: str) -> pa.Buffer:
    """The bytes of a file as a memory-mapped buffer; the file is unlinked at once.

    Ray copies the buffer into the object store when the task returns; the worker's heap
    never holds the whole output.
    """
    size = os.path.getsize(path)
    if size == 0:
        os.unlink(path)
        return pa.py_buffer(b"")
    with pa.memory_map(path, "r") as mm:
        buf = mm.read_buffer(size)
    os.unlink(path)
    return buf


def _node_id() -> str:
    """The ID of the Ray node this process runs on ('' outside Ray)."""
    try:
        return import_ray().get_runtime_context().get_node_id() or ""
    except Exception:  # noqa: BLE001 - outside a Ray worker
        return ""


@dataclass
class RayShuffleOutput:
    """Output spec of a shuffle map task: the indexed shuffle file, kept as a Ray object."""

    partitioner: Partitioner

    def write(self, batches: Iterator[pa.RecordBatch], ctx: Any) -> RayMapOutput:
        """Partition the task's output; return the handle, with the bytes as its payload."""
        path = ctx.scratch_path("shuffle", ".arrow")
        out = ShuffleWriter(ctx, self.partitioner, path).write_all(batches)
        data = _take_file(path)
        return RayMapOutput("", out.offsets, out.rows, out.stage_id, out.map_index,
                            node_id=_node_id(), size=data.size, _payload=data)


@dataclass
class RayBlockOutput:
    """Output spec of a materializing task (collect, cache, broadcast): an IPC stream object."""

    cached: bool = False
    compression: str | None = None

    def write(self, batches: Iterator[pa.RecordBatch], ctx: Any) -> RayBlockRef:
        """Write the task's output as one block; return the handle, with the bytes as payload."""
        path = ctx.scratch_path("block", ".arrow")
        ref = BlockWriter(ctx, path, self.compression).write_all(batches)
        data = _take_file(path)
        return RayBlockRef("", ref.rows, ref.nbytes, ref.schema_names, node_id=_node_id(),
                           cached=self.cached, _payload=data)


# ------------------------------------------------------------------ the remote side
_worker_ready = False


def _set_env(values: dict[str, str | None]) -> dict[str, str | None]:
    """Apply environment values (None removes); return what they replaced."""
    old = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    return old


def _run_attempt(task: Task, attempt: int, env: dict[str, str | None]) -> tuple[Any, Any]:
    """Run one task attempt on a Ray worker: ``(("ok", TaskResult) | ("err", TaskFailure), data)``.

    ``data`` is the output's bytes (a separate Ray object the driver never fetches) or None.
    Spill files go to a directory of this attempt, removed when it ends.
    """
    global _worker_ready
    from millstream.runners.local import FAULT_ENV, _maybe_inject_fault, _release_memory_promptly

    if not _worker_ready:
        _release_memory_promptly()
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


# ------------------------------------------------------------------ the runner
@dataclass
class _Attempt:
    """One submitted attempt: its task, attempt number, data object and submit time."""

    index: int
    attempt: int
    data: Any
    started: float


def _forwarded_env() -> dict[str, str | None]:
    """The driver's variables every attempt sees (FORWARD_ENV_PREFIXES; fault injection)."""
    from millstream.runners.local import FAULT_ENV

    env: dict[str, str | None] = {k: v for k, v in os.environ.items()
                                  if k.startswith(FORWARD_ENV_PREFIXES)}
    env.setdefault(FAULT_ENV, None)
    return env


def _near(node: str) -> Any:
    """Run on ``node`` when it has a free CPU, elsewhere at once when it is busy or gone
    (locality without waiting, as Ray itself does for a task's direct arguments)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    try:
        return NodeAffinitySchedulingStrategy(node, soft=True, _spill_on_unavailable=True)
    except TypeError:  # an older Ray: prefer the node, wait for it when busy
        return NodeAffinitySchedulingStrategy(node, soft=True)


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


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
        meta, data = fn.remote(task, attempt, env)
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
                            progress.task_done(payload.rows_out, payload.bytes_out)
                            # the first attempt to finish wins; stop its backups
                            others = per_task.pop(idx, [])
                            for other in others:
                                running.pop(other, None)
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
                                         pending, next_attempt, tasks, progress)
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

    def shutdown(self) -> None:
        """Disconnect from Ray (stopping the local Ray) if this runner connected; never stop a
        cluster it merely joined, nor a connection it found."""
        if self._owns_connection and self._ray.is_initialized():
            self._ray.shutdown()
        self._owns_connection = False


# ------------------------------------------------------------------ streaming task hosts
class _Mailbox:
    """The coordinator's inbox (an actor): tasks append, the driver drains. One thread, so
    the messages of each task keep their order."""

    def __init__(self) -> None:
        self.items: list[tuple] = []

    def push_many(self, msgs: list[tuple]) -> None:
        """Several messages of one task, in order (what an :class:`_Outbox` sends)."""
        self.items.extend(msgs)

    def drain(self) -> list[tuple]:
        out, self.items = self.items, []
        return out


class _StreamHost:
    """An actor hosting one streaming task: its loop runs in ``run``; peers ``push`` into
    its bounded inbox from other threads (a full inbox blocks the pushing peer)."""

    def __init__(self, capacity: int, env: dict[str, str | None]) -> None:
        import queue

        from millstream.runners.local import _release_memory_promptly

        _set_env(env)
        _release_memory_promptly()
        self.inbox: Any = queue.Queue(maxsize=capacity)
        self.controls: Any = queue.Queue()
        self.peers: list[Any] = []
        self.mailbox: Any = None

    def wire(self, peers: list[Any], mailbox: Any) -> str:
        self.peers = peers
        self.mailbox = mailbox
        return _node_id()

    def push(self, msg: tuple) -> None:
        self.inbox.put(msg)

    def push_many(self, msgs: list[tuple]) -> None:
        """Several messages of one peer, in order (blocks while the inbox is full)."""
        for msg in msgs:
            self.inbox.put(msg)

    def control(self, msg: tuple) -> None:
        self.controls.put(msg)

    def run(self, payload: bytes, index: int) -> None:
        import cloudpickle

        from millstream.runners.local import run_stream_task_fn

        channels = _ActorChannels(self)
        run_stream_task_fn(cloudpickle.loads(payload), channels, index)
        channels.flush()  # what the task sent last (its end of input) reaches the peers


class _Outbox:
    """The messages a task sends one peer, pushed in order by one thread with one call in
    flight: messages that queue up meanwhile travel together in the next call, so a task
    does not wait a round trip per batch. Bounded: a full outbox blocks the task (the
    backpressure of the peer's full inbox reaches it)."""

    #: most messages, and bytes of batch data, in one push
    max_messages = 64
    max_bytes = 8 << 20

    def __init__(self, ray: Any, peer: Any, capacity: int) -> None:
        import queue

        self._ray = ray
        self.peer = peer
        self.queue: Any = queue.Queue(maxsize=max(1, capacity))
        self.error: BaseException | None = None
        threading.Thread(target=self._loop, daemon=True, name="millstream-outbox").start()

    def put(self, msg: tuple) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(msg)

    def flush(self) -> None:
        """Wait until every message put so far was delivered into the peer's inbox."""
        self.queue.join()
        if self.error is not None:
            raise self.error

    @staticmethod
    def _size(msg: tuple) -> int:
        """Bytes of batch data in a message (Arrow IPC buffers)."""
        return wire_bytes(msg)

    def _loop(self) -> None:
        import queue

        while True:
            batch = [self.queue.get()]
            size = self._size(batch[0])
            while len(batch) < self.max_messages and size < self.max_bytes:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
                size += self._size(batch[-1])
            try:
                if self.error is None:
                    self._ray.get(self.peer.push_many.remote(batch))
            except BaseException as exc:  # noqa: BLE001 - the peer died: the task learns it
                # (as a lost host: the coordinator restarts the job, it does not fail it)
                self.error = WorkerLostError(f"a streaming task's peer was lost: "
                                             f"{_first_line(exc)}")
            finally:
                for _ in batch:
                    self.queue.task_done()


class _ActorChannels:
    """A streaming task's channels inside a :class:`_StreamHost` actor."""

    #: messages queued per peer before ``send`` blocks
    outbox_capacity = 8
    #: messages queued for the coordinator's mailbox (not bounded by an inbox over there)
    mailbox_capacity = 64

    def __init__(self, host: _StreamHost) -> None:
        import ray

        self._ray = ray
        self.host = host
        self._outboxes: dict[int, _Outbox] = {}
        # one outbox for the coordinator too: its messages keep their order (rows of an
        # epoch before the acknowledgement), and a call carries what queued up meanwhile
        # (a call costs ~1.6 ms for a 400 KB batch; ten in one call, 0.13 ms each)
        self._mailbox = _Outbox(ray, host.mailbox, self.mailbox_capacity)

    def flush(self) -> None:
        """Wait until every message sent so far is in its peer's inbox (or the mailbox)."""
        for box in [*self._outboxes.values(), self._mailbox]:
            box.flush()

    def recv(self, timeout: float) -> tuple | None:
        import queue

        try:
            return from_wire(self.host.inbox.get(timeout=timeout))
        except queue.Empty:
            return None

    def recv_control(self, timeout: float = 0.0) -> tuple | None:
        import queue

        try:
            if timeout <= 0:
                return self.host.controls.get_nowait()
            return self.host.controls.get(timeout=timeout)
        except queue.Empty:
            return None

    def send(self, dest: int, msg: tuple) -> None:
        """Queue ``msg`` for peer ``dest`` (in order; blocks while its outbox is full)."""
        box = self._outboxes.get(dest)
        if box is None:
            box = self._outboxes[dest] = _Outbox(self._ray, self.host.peers[dest],
                                                 self.outbox_capacity)
        box.put(to_wire(msg))

    def to_coordinator(self, msg: tuple) -> None:
        self._mailbox.put(to_wire(msg))


_HOST_START_TIMEOUT_S = 120.0  # actors need no CPU; this only waits for worker processes


class RayStreamHosts:
    """The actors hosting a streaming job's tasks (spread over nodes), and their mailbox."""

    def __init__(self, ray: Any, payloads: list[bytes], inbox_capacity: int) -> None:
        self._ray = ray
        n = len(payloads)
        # Tasks ask for no CPU: a job's tasks are long-lived and mostly wait on each other,
        # and a job must not be unschedulable because it has more tasks than the cluster
        # has CPUs. SPREAD puts them on different nodes.
        host_cls = ray.remote(num_cpus=0, max_restarts=0, max_concurrency=n + 4,
                              scheduling_strategy="SPREAD")(_StreamHost)
        self.mailbox = ray.remote(num_cpus=0, max_restarts=0)(_Mailbox).remote()
        env = _forwarded_env()
        self.actors = [host_cls.remote(inbox_capacity, env) for _ in range(n)]
        try:
            self.nodes = ray.get([a.wire.remote(self.actors, self.mailbox)
                                  for a in self.actors], timeout=_HOST_START_TIMEOUT_S)
        except ray.exceptions.RayError as exc:
            # an actor placed on a node that is going away (a removed node takes a while
            # to be noticed): the coordinator restarts, as for a host lost while running
            self.shutdown()
            raise WorkerLostError(f"a streaming task's Ray actor died while starting: "
                                  f"{_first_line(exc)}") from None
        self.runs = [a.run.remote(p, i) for i, (a, p) in enumerate(zip(self.actors, payloads))]
        self._finished: set[int] = set()
        self._dead: dict[int, str] = {}

    def send_control(self, index: int, msg: tuple) -> None:
        """Put a coordinator message into task ``index``'s control queue."""
        self.actors[index].control.remote(msg)

    def poll(self, timeout: float) -> list[tuple]:
        """Messages from the tasks (sleeps ``timeout`` when there are none)."""
        try:
            out = self._ray.get(self.mailbox.drain.remote())
        except Exception as exc:  # noqa: BLE001 - the mailbox's node died
            self._dead.setdefault(-1, f"the coordinator mailbox was lost: {_first_line(exc)}")
            return []
        if not out:
            time.sleep(timeout)
        return [from_wire(m) for m in out]

    def dead(self) -> list[tuple[int, str]]:
        """Tasks whose actor died (its node was lost, its process killed)."""
        pending = [r for i, r in enumerate(self.runs)
                   if i not in self._finished and i not in self._dead]
        if pending:
            ready, _ = self._ray.wait(pending, num_returns=len(pending), timeout=0)
            index = {r: i for i, r in enumerate(self.runs)}
            for ref in ready:
                i = index[ref]
                try:
                    self._ray.get(ref)
                    self._finished.add(i)
                except Exception as exc:  # noqa: BLE001 - RayActorError and friends
                    self._dead[i] = f"its Ray actor died: {_first_line(exc)}"
        out = sorted(self._dead.items())
        return [(max(i, 0), why) for i, why in out]

    def shutdown(self) -> None:
        """Kill every actor of the job (finished ones are gone already)."""
        for a in [*self.actors, self.mailbox]:
            try:
                self._ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
