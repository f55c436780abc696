"""The Ray runner on a real Ray cluster of a head and two worker nodes on this machine.

Jobs span nodes (word count, joins), ``cache()`` keeps partitions in the object store,
errors and retries read as on the local runner, the driver never reads input or shuffle
data, and a worker node removed mid-job (a machine failure) still gives exactly the right
output. The cluster comes from ``runners_fixture.py`` (own token, temp dir and HOME;
teardown stops only the processes it started).
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter

import pyarrow as pa
import pytest
from faults import HeldRows
from runners_fixture import RAY_PARALLELISM, ray_missing, shared_ray_cluster, use_runner

import millstream as ms
from millstream.runtime.session import Session, Settings, get_session

pytestmark = [pytest.mark.ray,
              pytest.mark.skipif(ray_missing() is not None, reason=ray_missing() or "")]


@pytest.fixture(scope="module")
def ray_cluster(request):
    """The session's Ray cluster (head + 2 worker nodes), connected."""
    return shared_ray_cluster(request.config)


@pytest.fixture(scope="module", autouse=True)
def on_ray(ray_cluster, request):
    """Every test of this module runs its jobs on the Ray runner."""
    saved = use_runner("ray", request.config)
    yield
    ms.init(**saved)


def _node_id() -> str:
    """The Ray node this code runs on."""
    import ray

    return ray.get_runtime_context().get_node_id()


def _tag_node(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Add the ID of the Ray node that processed the batch (slowly, so tasks overlap)."""
    time.sleep(0.3)
    return batch.append_column("node", pa.array([_node_id()] * batch.num_rows, pa.string()))


def _write_corpus(path: str, lines: int, vocab: int, seed: int) -> Counter:
    """A text file of random words; returns the true word counts."""
    rng = random.Random(seed)
    words = [f"w{i:05d}" for i in range(vocab)]
    want: Counter = Counter()
    with open(path, "w") as f:
        for _ in range(lines):
            line = [rng.choice(words) for _ in range(rng.randint(3, 12))]
            want.update(line)
            f.write(" ".join(line) + "\n")
    return want


def _word_count(path: str, **read_options) -> ms.Dataset:
    """Word -> count over the lines of ``path``."""
    return (ms.read_text(path, **read_options)
            .select(ms.col("text").str.split().alias("word"))
            .explode("word")
            .group_by("word").agg(ms.count().alias("n")))


# ------------------------------------------------------------------ jobs across nodes
def test_word_count_across_nodes(tmp_path):
    path = str(tmp_path / "corpus.txt")
    want = _write_corpus(path, lines=20_000, vocab=3_000, seed=1)
    ds = _word_count(path, split_size=os.path.getsize(path) // 6 + 1)
    got = {r["word"]: r["n"] for r in ds.collect()}
    assert got == dict(want)
    stats = ms.last_job_stats()
    assert stats.stages[0]["tasks"] >= 6
    # the map side ran on more than one node of the cluster
    nodes = {r["node"] for r in ms.read_text(path, split_size=os.path.getsize(path) // 6 + 1)
             .map_batches(_tag_node).select("node").distinct().collect()}
    assert len(nodes) >= 2


def test_join_across_nodes():
    n = 30_000
    left = ms.range(n, num_partitions=6).with_columns(k=ms.col("id") % 997).map_batches(_tag_node)
    right = ms.range(997, num_partitions=3).select(k=ms.col("id"), name=ms.col("id").cast(pa.string()))
    for broadcast in (False, True):
        rows = left.join(right, on="k", broadcast=broadcast).select("id", "k", "name", "node").collect()
        assert sorted((r["id"], r["k"], r["name"]) for r in rows) == \
            [(i, i % 997, str(i % 997)) for i in range(n)]
        assert len({r["node"] for r in rows}) >= 2, "all left-side tasks ran on one node"
    # an outer shuffle join with keys missing on either side
    a = ms.from_items([{"k": i, "a": i} for i in range(0, 2000, 2)], num_partitions=4)
    b = ms.from_items([{"k": i, "b": -i} for i in range(0, 2000, 3)], num_partitions=4)
    got = {(r["k"], r["a"], r["b"]) for r in a.join(b, on="k", how="outer").collect()}
    want = {(k, k if k % 2 == 0 else None, -k if k % 3 == 0 else None)
            for k in range(2000) if k % 2 == 0 or k % 3 == 0}
    assert got == want


# ------------------------------------------------------------------ cache
def _counting_map(calls_file: str):
    """A map function that appends a line to ``calls_file`` per call."""

    def fn(row):
        with open(calls_file, "a") as f:
            f.write("x\n")
        return {**row, "sq": row["id"] * row["id"]}
    return fn


def test_cache_keeps_partitions_in_the_object_store_across_actions(tmp_path):
    from millstream.runners.ray import RayBlockRef

    calls = tmp_path / "calls.txt"
    cached = ms.range(3000, num_partitions=3).map(_counting_map(str(calls))).cache()
    assert cached.count() == 3000
    assert any("cache" in s["purpose"] for s in ms.last_job_stats().stages)
    blocks = get_session().cache[cached._node.cache_id]
    assert len(blocks) == 3 and all(isinstance(b, RayBlockRef) and b.ref is not None for b in blocks)
    # later actions read the cached objects: the function does not run again
    got = cached.filter(ms.col("id") % 7 == 0).select("sq").collect()
    assert sorted(r["sq"] for r in got) == [i * i for i in range(0, 3000, 7)]
    total = cached.agg(ms.sum("sq").alias("s")).collect()[0]["s"]
    assert total == sum(i * i for i in range(3000))
    assert not any("cache" in s["purpose"] for s in ms.last_job_stats().stages)
    assert calls.read_text().count("x") == 3000
    # the handles survived the jobs that read them (only a job's own outputs are released)
    assert all(b.ref is not None and not b.is_lost() for b in blocks)
    cached.unpersist()
    assert cached.count() == 3000
    assert calls.read_text().count("x") == 6000


def test_tasks_reading_cached_partitions_run_where_the_partitions_are():
    from millstream.runners.ray import RayBlockRef

    n, parts = 90_000, 3
    # slow tasks, so the three partitions are usually materialized on different nodes (Ray
    # decides; materialize again until they are, so that every partition has its own node)
    cached = (ms.range(n, num_partitions=parts).with_columns(a=ms.col("id") * 2, b=ms.col("id") % 5)
              .map_batches(lambda b: (time.sleep(0.5), b)[1]).cache())
    # Ray places the tasks; locality only means something when the blocks sit on different
    # nodes, so materialize again until at least two nodes hold blocks
    for _ in range(8):
        assert cached.count() == n
        blocks = get_session().cache[cached._node.cache_id]
        if len({b.node_id for b in blocks}) >= 2:
            break
        cached.unpersist()
    assert len({b.node_id for b in blocks}) >= 2, "Ray never spread the partitions"
    assert all(isinstance(b, RayBlockRef) and b.nbytes > 100 * 1024 for b in blocks)
    per = n // parts
    # Locality is best effort: a task goes elsewhere when its node has no free CPU (under
    # the load of a full test run it sometimes has none), so allow a few tries; without
    # locality all three would rarely land on their block's nodes by chance.
    mismatches: list[str] = []
    for attempt in range(5):
        if attempt:
            time.sleep(1.0)  # let whatever held the CPUs finish
        # (no speculative copies: a backup attempt elsewhere may finish first under load)
        rows = cached.map_batches(_tag_node).select("id", "node").collect(speculation=False)
        mismatches = []
        for i, block in enumerate(blocks):
            ran = {r["node"] for r in rows if i * per <= r["id"] < (i + 1) * per}
            if ran != {block.node_id}:
                mismatches.append(f"partition {i} ran on {ran}, its block is on {block.node_id}")
        if not mismatches:
            break
    assert not mismatches, mismatches
    cached.unpersist()


class _FakeRay:
    """Just enough of ``ray`` for an outbox: ``remote`` calls run at once, ``get`` unwraps."""

    @staticmethod
    def get(value):
        return value


class _SlowPeer:
    """A peer whose inbox takes one push at a time, slowly; records what arrived."""

    def __init__(self, delay: float = 0.01, fail_after: int | None = None) -> None:
        self.calls: list[list] = []
        self.delay = delay
        self.fail_after = fail_after
        self.push_many = self  # peer.push_many.remote(batch)

    def remote(self, batch):
        time.sleep(self.delay)
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("the peer's actor died")
        self.calls.append(list(batch))


def test_outbox_keeps_order_batches_waiting_messages_and_bounds_the_queue():
    from millstream.runners.ray.stream_hosts import _Outbox

    peer = _SlowPeer()
    box = _Outbox(_FakeRay(), peer, capacity=4)
    longest = 0
    for i in range(200):
        box.put(("data", 0, 0, i))
        longest = max(longest, box.queue.qsize())
    box.flush()
    got = [m[3] for call in peer.calls for m in call]
    assert got == list(range(200))  # every message, in order
    assert len(peer.calls) < 100  # messages that queued up went together
    assert longest <= 4  # the bound: a full outbox makes put() wait


def test_outbox_surfaces_a_dead_peer():
    from millstream.errors import WorkerLostError
    from millstream.runners.ray.stream_hosts import _Outbox

    box = _Outbox(_FakeRay(), _SlowPeer(delay=0, fail_after=1), capacity=2)
    # a lost host for the coordinator (it restarts the job), naming the cause
    with pytest.raises(WorkerLostError, match="peer was lost: the peer's actor died"):
        for i in range(100):
            box.put(("data", 0, 0, i))
            if i % 10 == 9:
                box.flush()


def test_dashboard_link_is_printed_once(capsys):
    from millstream.runners.ray.connect import _announce_dashboard

    _announce_dashboard("http://127.0.0.1:8265")
    _announce_dashboard("http://127.0.0.1:8265")
    _announce_dashboard(None)
    assert capsys.readouterr().err.count("Ray dashboard at http://127.0.0.1:8265") == 1


# ------------------------------------------------------------------ errors and retries
def _boom(row):
    """A user function that fails on id 77."""
    if row["id"] == 77:
        raise ValueError("bad id 77")
    return row


def test_user_function_error_reads_as_on_the_local_runner():
    ds = ms.range(200, num_partitions=4).map(_boom)
    errors = {}
    for runner in ("local", "ray"):
        with pytest.raises(ms.UserFunctionError) as info:
            ds.collect(max_task_attempts=2, runner=runner)
        errors[runner] = info.value
    local, ray_err = errors["local"], errors["ray"]
    assert str(ray_err) == str(local)
    assert "partition 1" in str(ray_err) and "{'id': 77}" in str(ray_err)
    assert ray_err.user_traceback == local.user_traceback
    assert ray_err.attempts == local.attempts and len(ray_err.attempts) == 2
    assert (ray_err.stage, ray_err.partition, ray_err.operator) == \
        (local.stage, local.partition, local.operator)
    assert isinstance(ray_err.original, ValueError)
    with pytest.raises(ms.SchemaError, match="nope"):
        ms.range(10).select(ms.col("nope")).collect()


def test_killed_worker_is_retried_and_counters_count_once(monkeypatch):
    from millstream.runners.local import FAULT_ENV

    monkeypatch.setenv(FAULT_ENV, "kill:group-by map side:1:0")
    ds = ms.range(10_000, num_partitions=4).with_columns(k=ms.col("id") % 7)
    rows = ds.group_by("k").agg(ms.count().alias("n"), ms.sum("id").alias("s")).collect()
    want: dict[int, tuple[int, int]] = {}
    for i in range(10_000):
        n, s = want.get(i % 7, (0, 0))
        want[i % 7] = (n + 1, s + i)
    assert {r["k"]: (r["n"], r["s"]) for r in rows} == want
    assert ms.last_job_stats().stages[0]["rows_in"] == 10_000  # the dead attempt is not counted


def test_attempts_exhausted_reports_each_cause(monkeypatch):
    from millstream.runners.local import FAULT_ENV

    monkeypatch.setenv(FAULT_ENV, "kill:*:0:*")
    with pytest.raises(ms.TaskError) as info:
        ms.range(100, num_partitions=2).collect(max_task_attempts=3)
    text = str(info.value)
    assert "after 3 attempt(s)" in text and "partition 0" in text
    # one line per attempt, or one line for attempts that failed alike ("attempts 0-2")
    lines = [ln for ln in text.splitlines() if ln.startswith("  attempt")]
    assert lines and "Ray worker lost" in text
    assert sum(int(ln.split(":")[0].split("-")[-1].split()[-1]) - int(
        ln.split(":")[0].split()[1].split("-")[0]) + 1 for ln in lines) == 3
    assert [c.split(":")[0] for c in info.value.attempts] == ["attempt 0", "attempt 1", "attempt 2"]


@pytest.mark.timeout(240)  # (room for Ray on a busy machine; the straggler waits for the test)
def test_speculative_backup_attempt_wins(tmp_path):
    from faults import straggler

    release = tmp_path / "release"  # partition 3's first attempt waits for it
    ds = ms.range(400, num_partitions=4).map(straggler(release))
    try:
        rows = ds.collect(speculation=True, speculation_multiplier=2.0,
                          speculation_min_seconds=0.5, speculation_quantile=0.5)
    finally:
        release.touch()  # (a straggler that was not stopped ends now)
    assert sorted(r["id"] for r in rows) == list(range(400))
    assert get_session().runner_obj.speculative_attempts >= 1  # (a busy machine may add one)


def test_dropped_shuffle_output_is_recomputed(monkeypatch):
    """A map output whose object is gone before its reducers read it is recomputed (the
    object is dropped here; a node's death is the test at the end of this module)."""
    from millstream.runtime import scheduler

    dropped = []
    original = scheduler.Job._tasks

    def tasks_then_drop_output(self, st):
        # when the reduce stage is about to run, drop one map output of its input stage
        for dep in st.deps:
            if dep.output_kind == "shuffle" and dep.results and not dropped:
                get_session().runner_obj.release([dep.results[1]])
                dropped.append(dep.results[1])
        return original(self, st)

    monkeypatch.setattr(scheduler.Job, "_tasks", tasks_then_drop_output)
    ds = ms.range(1000, num_partitions=3).with_columns(k=ms.col("id") % 5)
    rows = ds.group_by("k").agg(ms.sum("id").alias("s")).collect()
    assert len(dropped) == 1 and dropped[0].is_lost()
    assert {r["k"]: r["s"] for r in rows} == {k: sum(range(k, 1000, 5)) for k in range(5)}
    assert ms.last_job_stats().counters.get(("millstream", "recomputed_map_tasks")) == 1


# ------------------------------------------------------------------ data never via the driver
def test_driver_never_reads_input_or_shuffle_data(tmp_path, monkeypatch):
    from millstream.io.files.text import TextSource
    from millstream.runners.ray import RayMapOutput

    path = str(tmp_path / "corpus.txt")
    want = _write_corpus(path, lines=5000, vocab=500, seed=2)

    def not_here(*args, **kwargs):
        raise AssertionError("the driver read task data")

    # patched in this (the driver's) process only; the workers have their own copies
    monkeypatch.setattr(TextSource, "read_split", not_here)
    monkeypatch.setattr(RayMapOutput, "read_slice", not_here)
    got = {r["word"]: r["n"] for r in _word_count(path).collect()}
    assert got == dict(want)


def test_asking_for_ray_without_ray_says_how_to_install(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "ray", None)
    session = Session(settings=Settings(runner="ray"))
    with pytest.raises(ms.MillstreamError, match=r"pip install 'millstream\[ray\]'"):
        session.get_runner(session.settings)


# ------------------------------------------------------------------ a node dies mid-job
def _node_gate(flag_dir: str, timeout: float = 60.0):
    """Row-wise user code for the map side: on every node, the first task attempt passes
    (so each node holds a finished map output in its object store) and the second blocks
    until the driver has removed a node (file ``go``); retries pass at once.

    Protocol through files on the shared disk: ``first-<node>`` (O_EXCL) marks a node's
    first attempt, ``blocked-<node>-<partition>`` a blocked one.
    """
    go = os.path.join(flag_dir, "go")
    opened: set[tuple[int, int, int]] = set()

    def gate() -> None:
        from millstream.core.context import current_context

        ctx = current_context()
        key = (ctx.stage_id, ctx.partition, ctx.attempt)
        if key in opened:
            return
        opened.add(key)
        if os.path.exists(go):
            return
        node = _node_id()
        try:
            fd = os.open(os.path.join(flag_dir, f"first-{node}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.close(fd)
            return
        except FileExistsError:
            pass
        with open(os.path.join(flag_dir, f"blocked-{node}-{ctx.partition}"), "w"):
            pass
        deadline = time.monotonic() + timeout
        while not os.path.exists(go):
            if time.monotonic() > deadline:
                raise RuntimeError("the test never removed a node")
            time.sleep(0.01)

    return gate


def _remove_when_blocked(cluster, flag_dir: str, report: dict, timeout: float = 60.0) -> None:
    """Driver-side thread: once every node has a blocked task, remove a worker node that
    holds a finished map output and a running attempt; then let the job go on."""
    try:
        deadline = time.monotonic() + timeout
        by_id = {node.node_id: node for node in cluster.workers()}
        victim = None
        while victim is None:
            if report.get("cancel"):
                return
            if time.monotonic() > deadline:
                report["error"] = f"no node blocked in time: {sorted(os.listdir(flag_dir))}"
                return
            names = os.listdir(flag_dir)
            blocked = {n.split("-")[1] for n in names if n.startswith("blocked-")}
            first = {n.split("-", 1)[1] for n in names if n.startswith("first-")}
            if len(blocked) >= RAY_PARALLELISM:
                victim = next((by_id[x] for x in sorted(blocked & first) if x in by_id), None)
            time.sleep(0.01)
        cluster.remove_worker(victim)
        report["removed"] = victim.node_id
    except Exception as exc:  # noqa: BLE001 - reported to the test
        report["error"] = exc
    finally:
        with open(os.path.join(flag_dir, "go"), "w"):
            pass


@pytest.mark.slow
def test_worker_node_removed_mid_job_still_gives_exact_output(ray_cluster, tmp_path):
    path = str(tmp_path / "corpus.txt")
    # many distinct words: every map output is big enough (> 100 KiB) to live in the
    # object store of the node that produced it, not inline with the driver
    want = _write_corpus(path, lines=60_000, vocab=40_000, seed=3)
    flag_dir = str(tmp_path / "flags")
    os.makedirs(flag_dir)
    gate = _node_gate(flag_dir)

    def words(row):
        gate()
        return [{"word": w} for w in row["text"].split()]

    ds = (ms.read_text(path, split_size=os.path.getsize(path) // 8 + 1)
          .flat_map(words)
          .group_by("word").agg(ms.count().alias("n")))
    report: dict = {}
    remover = threading.Thread(target=_remove_when_blocked, args=(ray_cluster, flag_dir, report),
                               daemon=True)
    remover.start()
    try:
        got = {r["word"]: r["n"] for r in ds.collect()}
    finally:
        report["cancel"] = True
        remover.join(timeout=60)
        if "removed" in report:
            ray_cluster.add_worker()  # the cluster has its two worker nodes again
            ray_cluster.wait_for_nodes()
    assert "error" not in report and "removed" in report, report
    assert got == dict(want)
    stats = ms.last_job_stats()
    assert stats.stages[0]["tasks"] >= 8
    # the removed node's finished map output was lost and recomputed, once
    assert stats.counters.get(("millstream", "recomputed_map_tasks"), 0) >= 1


# ------------------------------------------------------------------ streaming on Ray
def _slow_ids(batch: pa.RecordBatch) -> pa.RecordBatch:
    time.sleep(0.02)
    return batch


def _committed_ids(out) -> list[int]:
    import pyarrow.parquet as pq

    return [i for f in sorted(out.glob("*.parquet")) for i in pq.read_table(f).column("id").to_pylist()]


def test_streaming_windows_run_as_actors_on_several_nodes(tmp_path):

    rows = [{"k": f"k{i % 11}", "ts": 1_000 * i, "v": i % 13} for i in range(6000)]
    pipeline = (ms.from_items(rows, num_partitions=3).map_batches(_slow_ids)
                .with_watermark("ts", "0s").group_by("k")
                .window(ms.tumbling("30s"), on="ts").agg(ms.sum("v").alias("s")))
    job = pipeline.start(checkpoint=str(tmp_path / "chk"), checkpoint_interval="100ms",
                         parallelism=3, max_batch_records=200)
    assert job.executor == "parallel"
    nodes: set = set()
    deadline = time.time() + 60
    while not nodes and time.time() < deadline:
        nodes = set(job.host_nodes())
        time.sleep(0.05)
    assert job.await_termination(120)
    assert len(nodes) >= 2, "every task ran on one node"
    want: Counter = Counter()
    for r in rows:
        want[(r["k"], r["ts"] // 30_000)] += r["v"]
    got = {(r["k"], int(r["window_start"].timestamp()) // 30): r["s"] for r in job.sink.rows()}
    assert got == dict(want)
    assert job.metrics()["checkpoints"] >= 1


@pytest.mark.slow
def test_streaming_job_restores_from_its_checkpoint_when_a_node_is_removed(ray_cluster,
                                                                          tmp_path):
    from millstream.io.files.stream_sink import FileStreamSink

    rows = [{"id": i, "k": f"k{i % 7}"} for i in range(6000)]
    out = tmp_path / "out"
    held = HeldRows(rows, partitions=3, chunk=50)
    ds = held.dataset().repartition(3, "k").select("id", "k")
    job = ds.start(checkpoint=str(tmp_path / "chk"), checkpoint_interval="100ms",
                   sink=FileStreamSink(str(out)), parallelism=3, executor="parallel")
    removed = None
    try:
        # half the input is held back: the job cannot end before the node is removed
        held.wait_until_checkpointed(job, 90)
        hosting = set(job.host_nodes())
        removed = next(n for n in ray_cluster.workers() if n.node_id in hosting)
        ray_cluster.remove_worker(removed)
        held.release()
        assert job.await_termination(180)
    finally:
        if removed is not None:
            ray_cluster.add_worker()
            ray_cluster.wait_for_nodes()
    m = job.metrics()
    assert m["restarts"] >= 1 and m["restored_from_epoch"] is not None
    assert Counter(_committed_ids(out)) == Counter(r["id"] for r in rows)  # exactly once


def test_streaming_on_ray_checkpoints_to_s3_and_survives_a_killed_actor(tmp_path, monkeypatch):
    """Checkpoints and the exactly-once sink on S3 (SeaweedFS), reached by every actor."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq
    import ray
    from services.seaweedfs import SeaweedS3

    from millstream.io.files.stream_sink import FileStreamSink

    (tmp_path / "seaweed").mkdir()
    server = SeaweedS3.start_mini(tmp_path / "seaweed")
    try:
        for key, value in server.env().items():  # forwarded to the actors at their start
            monkeypatch.setenv(key, value)
        fs = server.filesystem()
        bucket = f"raystream-{os.getpid()}"
        fs.create_dir(bucket)
        rows = [{"id": i, "k": f"k{i % 5}"} for i in range(4000)]
        held = HeldRows(rows, partitions=2, chunk=40)
        ds = held.dataset().repartition(2, "k").select("id", "k")
        job = ds.start(checkpoint=f"s3://{bucket}/chk", checkpoint_interval="100ms",
                       sink=FileStreamSink(f"s3://{bucket}/out"), parallelism=2,
                       executor="parallel")
        # half the input is held back: the job cannot end before the actor is killed
        held.wait_until_checkpointed(job, 90)
        ray.kill(job._hosts.actors[-1], no_restart=True)
        held.release()
        assert job.await_termination(180)
        assert job.metrics()["restarts"] >= 1
        files = [i.path for i in fs.get_file_info(pafs.FileSelector(f"{bucket}/out"))
                 if i.type == pafs.FileType.File]
        ids = [i for f in files for i in pq.read_table(f, filesystem=fs).column("id").to_pylist()]
        assert Counter(ids) == Counter(r["id"] for r in rows)
    finally:
        server.stop()
