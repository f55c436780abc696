"""Nothing is left behind: scratch files, shared memory and processes go with the driver,
whether it ends normally, is stopped with SIGTERM, or was killed earlier.

Each test runs its driver as a separate process with a private temporary directory, and
acts at a state the driver reports (a marker file), never at a time it hopes for.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

import millstream as ms

SRC = str(Path(__file__).resolve().parent.parent / "src")


def _driver(tmp_path: Path, body: str, tmpdir: Path | None = None) -> subprocess.Popen:
    """Start ``body`` (Python, with ``ms`` and ``MARK`` defined) as a driver process in its own
    session (process group), with ``TMPDIR`` private to the test."""
    tmpdir = tmpdir or tmp_path / "tmp"
    tmpdir.mkdir(exist_ok=True)
    script = tmp_path / "driver.py"
    script.write_text("import os, sys, time\nimport millstream as ms\n"
                      f"MARK = {str(tmp_path / 'mark')!r}\n" + textwrap.dedent(body))
    env = dict(os.environ, TMPDIR=str(tmpdir), PYTHONPATH=SRC)
    return subprocess.Popen([sys.executable, str(script)], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_file(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the driver ended before {path.name}: {out}\n{err}")
        assert time.monotonic() < deadline, f"timed out waiting for {path}"
        time.sleep(0.02)


def _ours(base: Path, pid: int) -> list[str]:
    """Scratch paths named for process ``pid`` under ``base``."""
    try:
        return [n for n in os.listdir(base)
                if n.startswith((f"millstream-{pid}-", f"millstream-cache-{pid}-"))]
    except FileNotFoundError:
        return []


def _group_processes(pgid: int, timeout: float = 5.0) -> list[psutil.Process]:
    """Processes of process group ``pgid`` (zombies included) once the group has settled."""
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for p in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(p.pid) == pgid:
                    left.append(p)
            except (ProcessLookupError, psutil.Error):
                continue
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def test_sigterm_during_a_batch_job_removes_scratch_and_shared_memory(tmp_path):
    proc = _driver(tmp_path, """
        ds = ms.range(2_000_000).with_columns(ms.col("id").cast("string").alias("s")).cache()
        assert ds.count() == 2_000_000           # cached: shared memory and scratch in use

        def slow(batch):
            open(MARK, "w").close()               # the job is running
            time.sleep(60)
            return batch

        ds.map_batches(slow).count()
    """)
    _wait_file(tmp_path / "mark", proc)
    tmp = tmp_path / "tmp"
    assert _ours(tmp, proc.pid), "the driver had no scratch directory to clean up"
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(30) == -signal.SIGTERM  # it still dies of the signal
    assert _ours(tmp, proc.pid) == []
    assert _ours(Path("/dev/shm"), proc.pid) == []
    assert _group_processes(proc.pid) == []  # workers, fork server, resource tracker: gone


def test_sigterm_during_a_streaming_job_with_spilled_state_leaves_nothing(tmp_path):
    proc = _driver(tmp_path, """
        rows = [{"k": f"k{i % 2000}", "ts": i * 10, "v": i} for i in range(40_000)]
        src = ms.testing.TestSource()
        for i in range(0, len(rows), 500):
            src.add(rows[i:i + 500])
        job = (src.dataset().with_watermark("ts", "1h").group_by("k")
               .window(ms.tumbling("1h"), on="ts").agg(ms.sum("v").alias("s"))
               .start(executor="parallel", parallelism=2, memory_limit="64KB",
                      checkpoint_interval="1h"))
        while job.metrics()["counters"].get("millstream.state_spills", 0) == 0:
            time.sleep(0.05)                      # window state is on disk now
        open(MARK, "w").close()
        job.await_termination()                   # never ends: the source is not closed
    """)
    _wait_file(tmp_path / "mark", proc, timeout=120)
    tmp = tmp_path / "tmp"
    spills = [p for p in tmp.rglob("*") if p.is_file()]
    assert spills and all(str(p).startswith(str(tmp / f"millstream-{proc.pid}-")) for p in spills), \
        f"streaming spill files outside the process's scratch directory: {spills[:5]}"
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(30) == -signal.SIGTERM
    time.sleep(1.0)  # task processes notice their driver is gone within 0.5 s
    assert _ours(tmp, proc.pid) == []
    assert [p for p in tmp.rglob("*") if p.is_file()] == []
    assert _group_processes(proc.pid) == []


def test_streaming_spills_go_to_the_spill_dir_and_a_killed_tasks_files_are_removed(tmp_path):
    spill = tmp_path / "spill"
    proc = _driver(tmp_path, f"""
        import signal
        ms.init(spill_dir={str(spill)!r}, parallelism=2)
        rows = [{{"k": f"k{{i % 2000}}", "ts": i * 10, "v": i}} for i in range(40_000)]
        src = ms.testing.TestSource()
        for i in range(0, 20_000, 500):
            src.add(rows[i:i + 500])
        job = (src.dataset().with_watermark("ts", "1h").group_by("k")
               .window(ms.tumbling("1h"), on="ts").agg(ms.sum("v").alias("s"))
               .start(executor="parallel", memory_limit="64KB", checkpoint_interval="50ms",
                      checkpoint={str(tmp_path / "chk")!r}))
        while job.metrics()["counters"].get("millstream.state_spills", 0) == 0 \\
                or job.metrics()["checkpoints"] < 1:
            time.sleep(0.05)
        os.kill(job.host_pids()[-1], signal.SIGKILL)   # its spill files stay on disk
        for i in range(20_000, 40_000, 500):
            src.add(rows[i:i + 500])
        src.close()
        job.await_termination(120)
        assert job.metrics()["restarts"] == 1, job.metrics()
        print("SUM", sum(r["s"] for r in job.sink.rows()))
        left = [os.path.join(d, f) for d, _, fs in os.walk({str(spill)!r}) for f in fs
                if "/job-" in d]  # (the test source's items live on while it does)
        print("LEFT", left)
    """)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert f"SUM {sum(range(40_000))}" in out
    assert "LEFT []" in out, out  # the dead task's spills went with its run
    assert _ours(spill, proc.pid) == []  # and the scratch with the driver


def test_scratch_of_processes_that_are_gone_is_removed_at_start(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    stale = tmp / f"millstream-{dead.pid}-abc123"
    (stale / "job-1").mkdir(parents=True)
    (stale / "job-1" / "shuffle.arrow").write_bytes(b"x" * 1000)
    shm = Path("/dev/shm")
    stale_shm = shm / f"millstream-cache-{dead.pid}-xyz" if shm.is_dir() else None
    if stale_shm is not None:
        stale_shm.mkdir()
    alive = tmp / f"millstream-{os.getpid()}-mine"  # a live process's scratch stays
    alive.mkdir()
    proc = _driver(tmp_path, "print(ms.range(10).count())", tmpdir=tmp)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert not stale.exists() and alive.exists()
    if stale_shm is not None:
        assert not stale_shm.exists()


def test_a_driver_leaves_no_process_behind(tmp_path):
    proc = _driver(tmp_path, "print(ms.range(10).count())")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.strip() == "10", err
    left = _group_processes(proc.pid)
    assert left == [], [(p.pid, p.status()) for p in left]


def test_a_program_that_exits_while_its_streaming_job_runs_ends_it_quietly(tmp_path):
    """The job's task hosts go with the program; the coordinator says once that it ended the
    job, instead of taking the hosts' end for a loss and restarting."""
    proc = _driver(tmp_path, f"""
        src = ms.testing.TestSource(partitions=2)
        src.add([{{"k": i % 3, "v": i}} for i in range(100)], partition=0)
        job = src.dataset().repartition(2, "k").start(
            executor="parallel", parallelism=2, checkpoint={str(tmp_path / "chk")!r},
            checkpoint_interval="50ms")       # the source stays open: the job never ends
        while job.metrics()["records_in"] < 100 or job.metrics()["checkpoints"] < 1:
            time.sleep(0.05)
        print("RUNNING", job.job_id, flush=True)
    """)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    job_id = out.split()[-1]
    assert err.count(f"streaming job {job_id} was still running when the program exited") \
        == 1, err
    assert "restarting" not in err and "died" not in err, err
    left = _group_processes(proc.pid)
    assert left == [], [(p.pid, p.status()) for p in left]


@pytest.mark.parametrize("handler", ["custom"])
def test_a_programs_own_sigterm_handler_is_kept(tmp_path, handler):
    proc = _driver(tmp_path, """
        import signal
        signal.signal(signal.SIGTERM, lambda *a: (print("MINE", flush=True), sys.exit(3)))
        print(ms.range(10).count(), flush=True)
        open(MARK, "w").close()
        time.sleep(60)
    """)
    _wait_file(tmp_path / "mark", proc)
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 3 and "MINE" in out
    assert _ours(tmp_path / "tmp", proc.pid) == []  # exit handlers still clean up


def test_a_small_job_runs_in_the_driver_without_starting_workers():
    from millstream.runtime.session import get_session

    ms.shutdown()
    assert ms.range(10).count() == 10
    assert ms.from_items([{"k": i % 3, "v": i} for i in range(100)]).group_by("k") \
        .agg(ms.sum("v").alias("s")).sort("k").collect() == \
        [{"k": 0, "s": 1683}, {"k": 1, "s": 1617}, {"k": 2, "s": 1650}]
    assert get_session().runner_obj.worker_pids() == []
    # a larger input (or driver_input_limit=0) goes to the workers
    assert ms.range(10).count(driver_input_limit=0) == 10
    assert len(get_session().runner_obj.worker_pids()) >= 1
