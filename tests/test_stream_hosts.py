"""The parallel executor's task-slot hosts on this machine: the pipes each holds."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from faults import wait_for

import millstream as ms
from millstream.testing import CollectingSink, TestSource


def _run_driver(script: str) -> subprocess.CompletedProcess:
    """Run ``script`` as a driver process of its own (the default fork server); it must
    succeed."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    env.pop("MILLSTREAM_FORK_SERVER", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out


def _pipe_inodes(pid: int) -> set[str]:
    """The pipes process ``pid`` has open (``pipe:[inode]``)."""
    out = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if target.startswith("pipe:"):
            out.add(target)
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_pipe_between_two_slots_is_open_in_those_two_hosts_only():
    """A pipe between two slots is open in those two hosts only (none inherits another's
    ends, nor a pipe of the driver's), or a dead host's peers never see end-of-file (nor
    a broken pipe)."""
    src = TestSource(partitions=3)
    for p in range(3):
        src.add([{"k": f"k{i}", "v": i} for i in range(p, 30, 3)], partition=p)
    job = (src.dataset().group_by("k").agg(ms.sum("v").alias("s"))
           .start(executor="parallel", parallelism=3, sink=CollectingSink(),
                  checkpoint_interval=0))
    try:
        wait_for(lambda: len(job.host_pids()) == 3 and job.metrics()["records_out"] > 0, 60,
                 "three hosts with rows through them")
        driver = _pipe_inodes(os.getpid())
        holders: dict[str, int] = {}
        for pid in job.host_pids():
            for pipe in _pipe_inodes(pid) - driver:  # (the driver's queues are shared)
                holders[pipe] = holders.get(pipe, 0) + 1
        assert holders, "the hosts hold no pipes of their own"
        assert max(holders.values()) <= 2, holders
    finally:
        job.stop()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forks, reads /proc")
def test_the_fork_server_is_forked_from_the_driver_and_holds_none_of_its_descriptors():
    """Workers and hosts come from a fork server forked from the driver (it does not import
    millstream, pyarrow and pandas again), which closed every descriptor the driver had
    open (a pipe of the driver's here), so nothing it forks can hold one."""
    script = textwrap.dedent("""
        import os
        from multiprocessing import forkserver
        import millstream as ms
        from millstream.testing import CollectingSink, TestSource
        r, w = os.pipe()  # the driver's, open before the first job
        pipe = os.readlink(f"/proc/self/fd/{r}")
        src = TestSource(partitions=2)
        for p in range(2):
            src.add([{"k": f"k{i % 3}", "v": i} for i in range(p, 20, 2)], partition=p)
        src.close()
        sink = CollectingSink()
        job = (src.dataset().group_by("k").agg(ms.sum("v").alias("s"))
               .start(executor="parallel", parallelism=2, sink=sink, checkpoint_interval=0))
        job.await_termination()
        pid = forkserver._forkserver._forkserver_pid
        def cmdline(p):
            with open(f"/proc/{p}/cmdline", "rb") as f:
                return f.read()
        # a stock fork server is a new interpreter: python -c "from multiprocessing..."
        print("forked" if cmdline(pid) == cmdline(os.getpid()) else "stock")
        fds = os.listdir(f"/proc/{pid}/fd")
        print(sum(1 for fd in fds if os.readlink(f"/proc/{pid}/fd/{fd}") == pipe))
        print(sorted((row["k"], row["s"]) for row in sink.final_table(["k"]).to_pylist()))
    """)
    out = _run_driver(script)
    lines = out.stdout.splitlines()
    assert lines[:2] == ["forked", "0"], out.stdout
    sums = {k: sum(i for i in range(20) if f"k{i % 3}" == k) for k in ("k0", "k1", "k2")}
    assert lines[2] == str(sorted(sums.items()))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forks")
def test_a_worker_of_the_forked_server_has_its_fork_server_lock_free():
    """The driver holds multiprocessing's fork-server lock while it forks the server: the
    server lets go of its copy, or anything in a worker that makes sure a fork server runs
    (``forkserver.ensure_running``) would wait for it forever."""
    script = textwrap.dedent("""
        import millstream as ms

        def lock_free(batch):
            from multiprocessing import forkserver
            import pyarrow as pa
            lock = forkserver._forkserver._lock
            free = lock.acquire(timeout=5)
            if free:
                lock.release()
            return pa.table({"code": [int(free)] * batch.num_rows})

        ms.init(parallelism=2, progress=False)
        got = ms.range(2000, num_partitions=2).map_batches(lock_free).to_arrow(
            driver_input_limit=0)
        print(sorted(set(got.column("code").to_pylist())))
    """)
    out = _run_driver(script)
    assert out.stdout.split("\n")[0] == "[1]", out.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_large_driver_gets_the_stock_fork_server(monkeypatch):
    """A forked server would keep the driver's pages of the moment for as long as it lives:
    past the bound (or on an interpreter whose fork server keeps other state) the stock one
    starts."""
    from multiprocessing import forkserver as stock

    from millstream.runners import forkserver

    assert forkserver.available()
    monkeypatch.setattr(forkserver, "MAX_DRIVER_RSS", 1 << 20)
    assert not forkserver.available()
    monkeypatch.undo()
    monkeypatch.setattr(stock._forkserver, "_authkey", b"", raising=False)
    assert not forkserver.available()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forks, reads /proc")
def test_a_descriptor_the_driver_had_is_open_in_a_worker_but_no_longer_its_pipe():
    """Arrow's fork handler closes a self-pipe it made in the driver, in every process forked
    later, and aborts when that close fails: the server points the driver's descriptors at
    /dev/null instead of closing them (a suite run lost 62 tests to workers dying of it)."""
    script = textwrap.dedent("""
        import os
        import millstream as ms
        r, w = os.pipe()  # the driver's, open before the first job
        os.dup2(r, 200)  # (a number nothing below takes when it is free)

        def look(batch, fd=200):
            import pyarrow as pa
            try:
                os.fstat(fd)
                where = os.readlink(f"/proc/self/fd/{fd}")
            except OSError as exc:
                where = f"closed: {exc.errno}"
            return pa.table({"where": [where] * batch.num_rows})

        ms.init(parallelism=2, progress=False)
        got = ms.range(100, num_partitions=2).map_batches(look).to_arrow(driver_input_limit=0)
        print(sorted(set(got.column("where").to_pylist())))
    """)
    out = _run_driver(script)
    assert out.stdout.splitlines()[0] == "['/dev/null']", out.stdout
