"""The session: settings, the runner, the cache catalog and scratch space of this process."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from millstream.core.units import default_memory_limit, parse_size
from millstream.runtime.scratch import (
    install_termination_cleanup,
    remove_stale,
    stop_helper_processes,
)


@dataclass
class Settings:
    """Execution settings; ``ms.init(...)`` sets them, actions may override them per call."""

    runner: str = "local"
    parallelism: int | None = None
    memory_limit: int | None = None
    spill_dir: str | None = None
    shuffle_partitions: int | None = None
    shuffle_compression: str | None = "lz4"
    broadcast_threshold: int = 10 << 20
    #: a sort (or top-k) whose input is at most this many rows and bytes (and a quarter
    #: of a task's memory budget) runs in one task, without sampling nor range shuffle:
    #: decided when planning if the plan bounds the rows for sure, else from the measured
    #: input at run time (0: always range-partitioned)
    small_sort_rows: int = 100_000
    small_sort_bytes: int = 4 << 20
    batch_size: int = 65536
    max_task_attempts: int = 4
    speculation: bool = True
    speculation_multiplier: float = 4.0
    speculation_quantile: float = 0.75
    speculation_min_seconds: float = 5.0
    progress: bool | None = None
    address: str | None = None
    #: a job whose estimated input is at most this many bytes runs in the driver process,
    #: without starting workers (0: always on workers)
    driver_input_limit: int = 16 << 20
    #: run the optimizer rules (False: the plan runs as written; tests compare the two)
    optimizer: bool = True
    #: optimizer rules left out, by name (``explain()`` lists the names of those that fired)
    disabled_rules: tuple[str, ...] = ()

    #: the dashboard (None: ``MILLSTREAM_UI=1`` turns it on), where it listens (port 0 or
    #: None: a free one; another host than loopback requires a token)
    ui: bool | None = None
    ui_port: int | None = None
    ui_host: str = "127.0.0.1"
    #: every job's events as JSON lines here (a path or storage URI), for ``millstream ui
    #: --history``
    event_log_dir: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.disabled_rules, str):
            self.disabled_rules = (self.disabled_rules,)
        self.disabled_rules = tuple(self.disabled_rules)

    def rules_off(self) -> tuple[str, ...]:
        """The optimizer rules not to run (``("all",)`` with ``optimizer=False``)."""
        return ("all",) if not self.optimizer else self.disabled_rules

    def resolved_parallelism(self) -> int:
        """Workers to plan for: as set, else the runner's (cluster CPUs on Ray), else local CPUs."""
        if self.parallelism:
            return self.parallelism
        if self.runner != "local" and _session is not None and _session.runner_obj is not None:
            return max(1, int(getattr(_session.runner_obj, "parallelism", 0) or 0)) or (os.cpu_count() or 1)
        return os.cpu_count() or 1

    def resolved_memory_limit(self) -> int:
        return parse_size(self.memory_limit) or default_memory_limit()

    def task_budget(self) -> int:
        """Bytes one task's buffering operators may hold (the limit shared by the workers)."""
        return max(8 << 20, self.resolved_memory_limit() // self.resolved_parallelism())

    def resolved_shuffle_partitions(self) -> int:
        return self.shuffle_partitions or max(2, 2 * self.resolved_parallelism())


_KNOWN = {f.name for f in fields(Settings)}


@dataclass
class Session:
    """Process-wide state: one runner, one scratch directory, the cache catalog."""

    settings: Settings = field(default_factory=Settings)
    #: the runner the last action used (of ``runners``)
    runner_obj: Any = None
    #: runner name -> (key, runner): every runner this session started and still holds
    runners: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    cache_manager: Any = None
    workdir: str | None = None
    lock: threading.RLock = field(default_factory=threading.RLock)
    last_job_stats: Any = None

    def scratch(self) -> str:
        """This process's scratch directory (``millstream-<pid>-*`` in the spill directory):
        every temporary file of its jobs lives below it. Created on first use, after the
        scratch of processes that no longer exist is removed."""
        if self.workdir is None:
            base = self.settings.spill_dir or tempfile.gettempdir()
            os.makedirs(base, exist_ok=True)
            remove_stale({base, tempfile.gettempdir(), "/dev/shm"})
            self.workdir = tempfile.mkdtemp(prefix=f"millstream-{os.getpid()}-", dir=base)
        return self.workdir

    @property
    def cache(self) -> Any:
        """The cache catalog (created on first use)."""
        if self.cache_manager is None:
            from millstream.runtime.cache import CacheManager

            self.cache_manager = CacheManager(os.path.join(self.scratch(), "cache"),
                                              self.settings.resolved_memory_limit() // 2)
        return self.cache_manager

    def job_dir(self, job_id: str) -> str:
        d = os.path.join(self.scratch(), f"job-{job_id}")
        os.makedirs(d, exist_ok=True)
        return d

    def get_runner(self, settings: Settings) -> Any:
        """The runner ``settings`` name, reused while its key (e.g. parallelism) is the same.

        The session keeps one runner per name, so an action on another runner does not
        stop this one: a Ray connection and the objects it holds (cached datasets) outlive
        a per-action switch to the local runner and back.
        """
        from millstream.runtime.runner import runner_entry

        with self.lock:
            entry = runner_entry(settings.runner)
            key = entry.key(settings)
            held = self.runners.get(settings.runner)
            if held is not None and held[0] == key:
                runner = held[1]
            else:
                if held is not None:
                    held[1].shutdown()
                runner = entry.factory(settings)
                self.runners[settings.runner] = (key, runner)
            self.runner_obj = runner
        self.configure_runner(settings)
        return runner

    def configure_runner(self, settings: Settings) -> None:
        """Apply per-job retry and speculation settings to the (reused) runner."""
        r = self.runner_obj
        for name in ("max_task_attempts", "speculation", "speculation_multiplier",
                     "speculation_quantile", "speculation_min_seconds"):
            if hasattr(r, name):
                setattr(r, name, getattr(settings, name))

    def new_job_id(self) -> str:
        return uuid.uuid4().hex[:12]

    def shutdown(self, wait: bool = True) -> None:
        """Stop the runner's workers and delete this process's scratch (``wait=False``: kill
        busy workers at once, e.g. on SIGTERM)."""
        with self.lock:
            for _key, runner in self.runners.values():
                runner.shutdown(wait=wait)
            self.runners = {}
            self.runner_obj = None
            if self.cache_manager is not None:
                self.cache_manager.clear()
                self.cache_manager = None
            if self.workdir and os.path.isdir(self.workdir):
                shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


_session: Session | None = None


def get_session() -> Session:
    """The process's session, created with default settings on first use."""
    global _session
    if _session is None:
        _session = Session()
        install_termination_cleanup(_terminate)
        _configure_services(_session.settings)
    return _session


#: name -> configure(settings): what a new session starts or stops besides its runner
#: (the dashboard registers itself from ``millstream.ui``, the layer above)
_SERVICES: dict[str, Callable[[Settings], None]] = {}


def register_service(name: str, configure: Callable[[Settings], None]) -> None:
    """Call ``configure(settings)`` whenever a session is created (``ms.init`` or the
    default session), so the service follows its settings."""
    _SERVICES[name] = configure


def _configure_services(settings: Settings) -> None:
    from millstream.runtime.eventlog import configure_event_log

    configure_event_log(settings.event_log_dir)
    for configure in list(_SERVICES.values()):
        configure(settings)


def _terminate() -> None:
    """SIGTERM: kill the workers and remove the scratch before the process dies."""
    if _session is not None:
        _session.shutdown(wait=False)


def init(runner: str = "local", parallelism: int | None = None, memory_limit: int | str | None = None,
         spill_dir: str | None = None, **options: Any) -> Session:
    """Configure execution: runner, worker count, memory limit (bytes or "2GB"), spill dir.

    Further options: shuffle_partitions, shuffle_compression ("lz4", "zstd", None),
    broadcast_threshold, small_sort_rows and small_sort_bytes (a sort of at most that
    many rows and bytes runs in one task; 0: always range-partitioned), batch_size,
    max_task_attempts, progress (True/False/None=auto), optimizer (False: plans run as written), disabled_rules (optimizer rules to skip, by
    name), ui (the dashboard), ui_port, ui_host, event_log_dir.
    """
    unknown = set(options) - _KNOWN
    if unknown:
        raise TypeError(f"init() got unknown option(s) {sorted(unknown)}; known: {sorted(_KNOWN)}")
    from millstream.runtime.runner import runner_entry

    runner_entry(runner)  # an unknown name fails here, listing the registered ones
    global _session
    if _session is not None:
        _session.shutdown()
    st = Settings(runner=runner, parallelism=parallelism, memory_limit=parse_size(memory_limit),
                  spill_dir=spill_dir, **options)
    if st.shuffle_compression not in (None, "lz4", "zstd"):
        raise ValueError(f"shuffle_compression must be 'lz4', 'zstd' or None, got {st.shuffle_compression!r}")
    _session = Session(settings=st)
    install_termination_cleanup(_terminate)
    _configure_services(st)
    return _session


def effective_settings(overrides: dict[str, Any]) -> Settings:
    """Session settings with per-action overrides applied."""
    st = get_session().settings
    if not overrides:
        return st
    unknown = set(overrides) - _KNOWN
    if unknown:
        raise TypeError(f"unknown execution option(s) {sorted(unknown)}; known: {sorted(_KNOWN)}")
    if "memory_limit" in overrides:
        overrides = dict(overrides, memory_limit=parse_size(overrides["memory_limit"]))
    return replace(st, **overrides)


def shutdown() -> None:
    """Stop the workers and delete scratch data (cached datasets are dropped)."""
    if _session is not None:
        _session.shutdown()


def _at_exit() -> None:
    shutdown()
    stop_helper_processes()


atexit.register(_at_exit)
