"""Shared fixtures for the test suite: the engine session, the ``runner`` fixture (every
runner), the ``executor`` fixture (both streaming executors), ``feed`` (test sources fed
alike to both executors, see ``streams.py``) ``broker`` (a Kafka broker per module) and ``postgres`` (a PostgreSQL server per module).

``executor`` is parametrized over "inline" and "parallel"; a test marked
``@pytest.mark.ray_streaming`` also runs as "parallel-ray" (the parallel executor on the
test Ray cluster; the fixture's value is then "parallel" and the session runs on Ray).
A genuine gap of one executor is marked, never forked into a copy of the test::

    @pytest.mark.executor_gap("parallel", "why it cannot hold there", mode="xfail",
                              when={"point": "during_epoch"})

``mode`` is "skip" (default; for results that vary from run to run) or "xfail" (strict:
an engine bug, it must fail until fixed); ``when`` limits the gap to some parameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
from runners_fixture import runner, stop_shared_ray_cluster, use_runner  # noqa: F401 - the fixture, for every module
from services.kafka import TansuBroker, kafka_missing
from services.postgres import PostgresServer, postgres_missing
from streams import Feed

import millstream as ms
from millstream.runtime.session import get_session

EXECUTORS = ("inline", "parallel")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "executor_gap(executor, reason, mode='skip', when=None): "
                            "a genuine gap of one streaming executor (skip or strict xfail)")
    config.addinivalue_line("markers", "ray_streaming: also run the test's streaming jobs on "
                            "the parallel executor on the Ray runner (executor 'parallel-ray')")
    _check_xdist_groups(config)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """Test workers for ``-n auto`` (the default, see pyproject): one more than the cores
    on a quiet machine, as many as the cores when other processes keep them busy.

    Most tests wait on processes, services and timers, so on a quiet 2-core machine a third
    worker fills that time (measured: 373 s -> 310 s, process-tree CPU 491 s -> 475 s). With
    two CPU-bound processes beside the suite it only starves the Ray cluster's own
    processes (the Ray group went from 15 to 26 minutes and two of its jobs missed their
    60 s bounds), so then it is two.
    """
    import os

    import psutil

    cores = os.cpu_count() or 2
    busy_cores = psutil.cpu_percent(interval=0.5) / 100 * cores  # (used by others: idle now)
    return max(2, min(cores + 1, 4)) if busy_cores < 0.5 else max(2, min(cores, 4))


def _check_xdist_groups(config: pytest.Config) -> None:
    """Refuse a pytest that ``--dist loadgroup`` cannot group: pytest 9.2 keeps a node's id
    where pytest-xdist 3.8 does not rename it, so every test worker would start its own Ray
    cluster and brokers would run side by side (the suite took a third longer)."""
    if config.getoption("dist", "no") != "loadgroup" or hasattr(config, "workerinput"):
        return
    from _pytest.nodes import Node

    if "_nodeid" not in Node.nodeid.fget.__code__.co_names:
        raise pytest.UsageError(
            f"pytest {pytest.__version__} and this pytest-xdist do not group tests (--dist "
            f"loadgroup): install the pytest that pyproject.toml's test extra names "
            f"(.venv/bin/pip install -e '.[test]')")


@pytest.fixture(scope="session", autouse=True)
def millstream_session():
    """One engine session (two workers, no progress bars) for the whole test run."""
    ms.init(parallelism=2, progress=False)
    yield
    ms.shutdown()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``executor`` over the executors (and Ray, where a test asks for it)."""
    if "executor" not in metafunc.fixturenames:
        return
    if any("executor" in m.args[0] for m in metafunc.definition.iter_markers("parametrize")):
        return
    params = list(EXECUTORS)
    if metafunc.definition.get_closest_marker("ray_streaming") is not None:
        params.append(pytest.param("parallel-ray", marks=[pytest.mark.ray]))
    metafunc.parametrize("executor", params, indirect=True)


#: Tests of these markers share a service the test session starts (one Ray cluster, a
#: Kafka broker or an S3 server per module): under pytest-xdist (``--dist loadgroup``)
#: each kind runs on one worker, so that no second cluster starts; the first that applies.
SERVICE_GROUPS = ("ray", "s3", "kafka", "postgres")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Apply ``executor_gap`` markers to the parameters they name; put service tests in
    their xdist group."""
    for item in items:
        group = next((g for g in SERVICE_GROUPS if item.get_closest_marker(g)), None)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
        params = getattr(getattr(item, "callspec", None), "params", {})
        executor = params.get("executor")
        if executor is None:
            continue
        for gap in item.iter_markers("executor_gap"):
            name, reason = gap.args
            when = gap.kwargs.get("when") or {}
            if name not in (executor, executor.split("-")[0]) or \
                    any(params.get(k) != v for k, v in when.items()):
                continue
            if gap.kwargs.get("mode", "skip") == "xfail":
                item.add_marker(pytest.mark.xfail(reason=reason, strict=True))
            else:
                item.add_marker(pytest.mark.skip(reason=f"{name} executor: {reason}"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    """In a ``--dist loadgroup`` test worker, after its last Ray test (the "ray" group runs
    there as one stretch), stop the test Ray cluster rather than leave it idle for the
    rest of the run. Not in one process (``-n 0``), where Ray tests alternate with others."""
    yield  # the item's fixtures (module-scoped ones too, when the module ends) are down
    config = item.config
    if hasattr(config, "workerinput") and config.getoption("dist", "no") == "loadgroup" \
            and item.get_closest_marker("ray") is not None \
            and (nextitem is None or nextitem.get_closest_marker("ray") is None):
        stop_shared_ray_cluster()


@pytest.fixture
def executor(request: pytest.FixtureRequest) -> Iterator[str]:
    """The streaming executor to pass to ``start(executor=...)``: "inline" or "parallel"
    (for "parallel-ray", the session runs on the test Ray cluster meanwhile)."""
    name = request.param
    if name != "parallel-ray":
        yield name
        return
    saved = use_runner("ray", request.config)
    try:
        yield "parallel"
    finally:
        if dataclasses.asdict(get_session().settings) != saved:
            ms.init(**saved)


@pytest.fixture(scope="module")
def broker(tmp_path_factory) -> Iterator[TansuBroker]:
    """A Kafka-compatible broker (Tansu) on loopback for the module's tests (each uses
    topics of its own); the test is skipped where there is none."""
    missing = kafka_missing()
    if missing:
        pytest.skip(f"no Kafka broker: {missing}")
    server = TansuBroker.start(tmp_path_factory.mktemp("kafka"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server on loopback (a fresh cluster in a temporary directory) for the
    module's tests (each uses tables of its own); skipped where there is none."""
    missing = postgres_missing()
    if missing:
        pytest.skip(f"no PostgreSQL server: {missing}")
    server = PostgresServer.start()
    yield server
    server.stop()


@pytest.fixture
def feed(executor: str, tmp_path) -> Iterator:
    """Make a :class:`streams.Feed` on this test's executor: ``f = feed()`` (``paced=False``
    to add every item up front on the parallel executor too)."""
    made: list[Feed] = []

    def make(paced: bool = True) -> Feed:
        f = Feed(executor, tmp_path / f"feed{len(made)}", paced)
        made.append(f)
        return f

    yield make
    for f in made:
        f.stop()
