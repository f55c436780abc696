"""Run runner-independent tests on every runner: the ``runner`` fixture and a test Ray cluster.

``runner`` is parametrized over ``["local", "ray"]`` (the "ray" case marked ``ray``): a
test that takes it runs once per runner with the session's engine set to that runner (and
its settings restored after). ``conftest.py`` imports it for every test module.

The Ray side is a real cluster of a head and two worker nodes on this machine
(``ray.cluster_utils.Cluster``), started once per test session on first use and stopped
at its end. Ray 2.x clusters use token authentication: the cluster gets its own token,
temporary directory and HOME (the user's ``~/.ray`` and ``/tmp/ray`` are never touched),
this process connects with that token, and teardown stops exactly the processes this
cluster started (never ``ray stop``, which ends every Ray process on the machine).
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest

import millstream as ms
from millstream.runtime.session import get_session

RAY_NODE_CPUS = 1
RAY_OBJECT_STORE = 128 << 20
RAY_WORKER_NODES = 2
#: ``parallelism`` given to ms.init on the Ray runner: one task per CPU of the cluster.
RAY_PARALLELISM = RAY_NODE_CPUS * (1 + RAY_WORKER_NODES)


def ray_missing() -> str | None:
    """Why Ray tests cannot run here (None when they can)."""
    try:
        import ray  # noqa: F401
        import ray.cluster_utils  # noqa: F401
    except ImportError:
        return "Ray is not installed: pip install 'millstream[ray]'"
    return None


def _refresh_ray_auth() -> None:
    """Make an already imported Ray re-read RAY_AUTH_MODE / RAY_AUTH_TOKEN from the environment
    (Ray caches its configuration at import; Ray's own tests reset it the same way)."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # a Ray without token authentication
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _node_pids(node: Any) -> set[int]:
    """PIDs of a Ray node's processes (raylet, GCS, agents, reaper) and their children
    (the worker processes the raylet started)."""
    import psutil

    pids = {info.process.pid for infos in node.all_processes.values() for info in infos
            if info.process is not None}
    for pid in list(pids):
        try:
            pids.update(c.pid for c in psutil.Process(pid).children(recursive=True))
        except psutil.Error:
            continue
    return pids


def _reap(pids: set[int], timeout: float = 10.0) -> list[int]:
    """Wait for processes we started to exit; SIGKILL the ones still there (by PID only)."""
    import psutil

    def alive(pid: int) -> bool:
        """Whether the process exists and is not a zombie."""
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    killed = [p for p in pids if alive(p)]
    for pid in killed:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return killed


class RayTestCluster:
    """A Ray cluster of a head and worker nodes on this machine, owned by the test run."""

    def __init__(self, worker_nodes: int = RAY_WORKER_NODES, num_cpus: int = RAY_NODE_CPUS,
                 object_store_memory: int = RAY_OBJECT_STORE) -> None:
        self.worker_nodes = worker_nodes
        self.num_cpus = num_cpus
        self.object_store_memory = object_store_memory
        self.cluster: Any = None
        self.base = ""
        self._saved_env: dict[str, str | None] = {}
        self._pids: set[int] = set()

    # ----------------------------------------------------------- lifecycle
    def start(self) -> RayTestCluster:
        """Start the head and the worker nodes with their own directories and token."""
        from ray.cluster_utils import Cluster

        # A short base path: Ray's unix socket paths must stay under 108 bytes.
        self.base = tempfile.mkdtemp(prefix="msray-", dir="/tmp")
        home = os.path.join(self.base, "home")
        os.makedirs(home)
        env = {
            "HOME": home,                       # ~/.ray (token file, caches) of our own
            "RAY_TMPDIR": self.base,            # sessions, sockets, logs, spilled objects
            "RAY_AUTH_MODE": "token",           # Ray's default for new clusters, made explicit
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        self._saved_env = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        _refresh_ray_auth()
        try:
            # A dead node is noticed in about 5 s instead of Ray's default 15 s or more,
            # and a fetch from it is retried after 1 s instead of 10 s. Shorter checks
            # declare live nodes dead on a busy machine (a node missing three 0.5 s checks
            # while the CPUs are taken), and jobs then run on the head alone.
            head = {**self._node_args(), "_system_config": {
                "health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                "health_check_timeout_ms": 2000, "health_check_failure_threshold": 5,
                "object_manager_pull_timeout_ms": 1000}}
            self.cluster = Cluster(initialize_head=True, head_node_args=head,
                                   shutdown_at_exit=True)
            self._pids |= _node_pids(self.cluster.head_node)
            for _ in range(self.worker_nodes):
                self.add_worker()
            self.cluster.wait_for_nodes()
        except BaseException:
            self.shutdown()
            raise
        return self

    def _node_args(self) -> dict[str, Any]:
        """Arguments of every node: small CPU count and object store, no dashboard."""
        return {"num_cpus": self.num_cpus, "object_store_memory": self.object_store_memory,
                "include_dashboard": False}

    @property
    def address(self) -> str:
        """The GCS address drivers connect to."""
        return self.cluster.address

    def add_worker(self) -> Any:
        """Start one more worker node."""
        node = self.cluster.add_node(**self._node_args())
        self._pids |= _node_pids(node)
        return node

    def wait_for_nodes(self, timeout: float = 60.0) -> None:
        """Wait until Ray sees exactly this cluster's nodes alive: the new ones registered
        and the removed ones declared dead (``Cluster.wait_for_nodes`` only compares
        counts, which a removed node not yet noticed and a new one not yet registered
        satisfy; actors spread then, over nodes Ray thinks are alive, land on one)."""
        import ray

        want = {node.node_id for node in self.cluster.list_all_nodes()}
        deadline = time.monotonic() + timeout
        while True:
            alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
            if alive == want:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"Ray sees nodes {sorted(alive)} alive, the cluster has "
                                   f"{sorted(want)}")
            time.sleep(0.1)

    def workers(self) -> list[Any]:
        """The live worker nodes (not the head, which this process is connected through)."""
        return list(self.cluster.worker_nodes)

    def remove_worker(self, node: Any) -> None:
        """Kill a worker node's processes, as a machine failure would (not gracefully)."""
        pids = _node_pids(node)
        self.cluster.remove_node(node, allow_graceful=False)
        _reap(pids - {os.getpid()}, timeout=10.0)

    def connect(self) -> None:
        """Connect this process to the cluster (as Millstream's Ray runner would)."""
        import ray

        from millstream.runners.ray import connect

        if ray.is_initialized():
            if ray.get_runtime_context().gcs_address == self.address:
                return
            ray.shutdown()
        connect(self.address)

    def shutdown(self) -> None:
        """Disconnect, stop every node, kill any straggler we started, restore the env."""
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except ImportError:
            pass
        if self.cluster is not None:
            for node in self.cluster.list_all_nodes():
                self._pids |= _node_pids(node)
            try:
                self.cluster.shutdown()
            finally:
                self.cluster = None
        _reap(self._pids - {os.getpid()}, timeout=10.0)
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env = {}
        _refresh_ray_auth()
        if self.base:
            shutil.rmtree(self.base, ignore_errors=True)


_shared: RayTestCluster | None = None


def shared_ray_cluster(config: pytest.Config) -> RayTestCluster:
    """The test session's Ray cluster, started on first use and stopped when pytest ends."""
    global _shared
    reason = ray_missing()
    if reason:
        pytest.skip(reason)
    if _shared is None:
        cluster = RayTestCluster().start()
        config.add_cleanup(lambda: stop_shared_ray_cluster(cluster))
        _shared = cluster
    _shared.connect()
    return _shared


def stop_shared_ray_cluster(cluster: RayTestCluster | None = None) -> None:
    """Stop the session's Ray cluster (``cluster``: only if it is still that one) and drop
    the engine's Ray runner connected to it. Called when pytest ends, and by conftest.py
    once this test process has run its last Ray test: an idle cluster of three nodes (14
    processes) takes about 5% of a core for the rest of the run."""
    global _shared
    if _shared is None or (cluster is not None and _shared is not cluster):
        return
    stopping, _shared = _shared, None
    held = get_session().runners.pop("ray", None)
    if held is not None:
        try:
            held[1].shutdown()
        except Exception:  # noqa: BLE001 - the cluster goes away next anyway
            pass
    stopping.shutdown()


def use_runner(name: str, config: pytest.Config) -> dict[str, Any]:
    """Point the engine session at runner ``name``; return the settings to restore."""
    saved = dataclasses.asdict(get_session().settings)
    if name == "ray":
        os.environ["MILLSTREAM_RAY_LOG_TO_DRIVER"] = "0"  # keep Ray's node chatter out of the test log
        cluster = shared_ray_cluster(config)
        ms.init(runner="ray", address=cluster.address, parallelism=RAY_PARALLELISM,
                progress=False)
    elif saved["runner"] != "local":
        ms.init(runner="local", parallelism=2, progress=False)
    return saved


@pytest.fixture(params=["local", pytest.param("ray", marks=pytest.mark.ray)])
def runner(request: pytest.FixtureRequest) -> Iterator[str]:
    """The name of the runner this test runs on; the engine session is set to it."""
    saved = use_runner(request.param, request.config)
    try:
        yield request.param
    finally:
        if dataclasses.asdict(get_session().settings) != saved:
            ms.init(**saved)
