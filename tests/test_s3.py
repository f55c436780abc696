"""S3 end to end against a real SeaweedFS started by the tests on loopback.

Two servers, each started once for this module:

* ``mini``: ``weed mini`` (one process) for pyarrow-level checks and Millstream jobs on
  ``s3://`` URIs: word count from text files, a Parquet round trip with ``_SUCCESS``, a
  failing job that must leave nothing behind;
* ``cluster``: master with default replication ``001``, two volume servers, filer and S3
  gateway as separate processes, for jobs that must survive losing a volume server.
  Inputs are replicated (two copies); output buckets get replication ``000``, because
  SeaweedFS cannot place new ``001`` writes with one of two servers down (details in
  ``tests/services/seaweedfs.py``).

The engine reads its S3 settings from the standard AWS variables; each engine test sets
them (``server.env()``) and restarts the worker pool, so the workers inherit them.
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import threading
import time

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

import millstream as ms

try:  # tests/ is on sys.path under pytest's default (prepend) import mode
    from services.seaweedfs import (
        SeaweedCluster,
        SeaweedS3,
        WeedNotFoundError,
        find_weed,
        s3_request,
    )
except ImportError:  # pragma: no cover - tests/ imported as a package
    from tests.services.seaweedfs import (
        SeaweedCluster,
        SeaweedS3,
        WeedNotFoundError,
        find_weed,
        s3_request,
    )


def _weed_missing() -> str | None:
    try:
        find_weed()
        return None
    except WeedNotFoundError as exc:
        return str(exc)


_WEED_MISSING = _weed_missing()

pytestmark = [
    pytest.mark.s3,
    pytest.mark.skipif(_WEED_MISSING is not None, reason=f"no SeaweedFS: {_WEED_MISSING}"),
]

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron "
         "pi rho sigma tau upsilon phi chi psi omega").split()


# ----------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    server = SeaweedS3.start_mini(tmp_path_factory.mktemp("seaweed"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def replicated(tmp_path_factory):
    server = SeaweedS3.start_replicated(tmp_path_factory.mktemp("seaweed"))
    yield server
    server.stop()


@pytest.fixture
def cluster(replicated):
    """The shared replicated cluster with every volume server up, before and after."""
    replicated.ensure_volumes_running()
    yield replicated
    replicated.ensure_volumes_running()


@pytest.fixture
def fs(mini):
    return mini.filesystem()


@contextlib.contextmanager
def engine_on(server: SeaweedS3, monkeypatch: pytest.MonkeyPatch):
    """Millstream with 2 local workers whose environment points S3 at ``server``."""
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    # Workers inherit the driver's environment when the pool starts: start a fresh one.
    if hasattr(ms, "shutdown"):
        ms.shutdown()
    try:
        ms.init(parallelism=2, progress=False)
    except TypeError:
        ms.init(parallelism=2)
    try:
        yield ms
    finally:
        if hasattr(ms, "shutdown"):
            ms.shutdown()


def _unique(prefix: str) -> str:
    """A fresh bucket name (lowercase, 3..63 characters)."""
    return f"{prefix}-{os.getpid()}-{random.randrange(16**6):06x}"


def _make_text_files(fs: pafs.FileSystem, base: str, files: int, lines: int, seed: int
                     ) -> collections.Counter[str]:
    """Write ``files`` text files of ``lines`` lines under ``base``; their word counts."""
    rng = random.Random(seed)
    want: collections.Counter[str] = collections.Counter()
    fs.create_dir(base.split("/")[0])
    for i in range(files):
        text_lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
                      for _ in range(lines)]
        for line in text_lines:
            want.update(line.split())
        with fs.open_output_stream(f"{base}/part-{i:03d}.txt") as f:
            f.write(("\n".join(text_lines) + "\n").encode())
    return want


def _files_under(fs: pafs.FileSystem, path: str) -> list[str]:
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    return sorted(i.path for i in fs.get_file_info(selector) if i.type == pafs.FileType.File)


# ----------------------------------------------------------------------------------------
# The server itself (pyarrow.fs level): these pass without the engine
# ----------------------------------------------------------------------------------------

def test_bucket_write_read_list_delete(mini):
    fs = pafs.S3FileSystem(endpoint_override=mini.endpoint, scheme="http",
                           access_key=mini.access_key, secret_key=mini.secret_key,
                           region=mini.region, allow_bucket_creation=True)
    bucket = _unique("objects")
    fs.create_dir(bucket)
    objects = {f"{bucket}/dir/obj-{i}.bin": os.urandom(1000 * i + 1) for i in range(5)}
    objects[f"{bucket}/dir/sub/big.bin"] = os.urandom(6 << 20)  # > filer chunk size (4 MB)
    for path, data in objects.items():
        with fs.open_output_stream(path) as f:
            f.write(data)
    for path, data in objects.items():
        with fs.open_input_stream(path) as f:
            assert f.read() == data
        assert fs.get_file_info(path).size == len(data)
    with fs.open_input_file(f"{bucket}/dir/sub/big.bin") as f:  # ranged reads
        f.seek(5 << 20)
        assert f.read(10) == objects[f"{bucket}/dir/sub/big.bin"][5 << 20:(5 << 20) + 10]
    assert _files_under(fs, bucket) == sorted(objects)
    top = fs.get_file_info(pafs.FileSelector(f"{bucket}/dir"))
    assert {i.base_name: i.type for i in top}["sub"] == pafs.FileType.Directory
    fs.delete_file(f"{bucket}/dir/obj-0.bin")
    assert fs.get_file_info(f"{bucket}/dir/obj-0.bin").type == pafs.FileType.NotFound
    fs.delete_dir_contents(f"{bucket}/dir")
    assert _files_under(fs, bucket) == []


def test_parquet_dataset_roundtrip_with_pyarrow(fs):
    bucket = _unique("pq")
    fs.create_dir(bucket)
    table = pa.table({"a": list(range(10_000)), "b": [f"s{i % 97}" for i in range(10_000)]})
    for i, start in enumerate(range(0, 10_000, 3000)):
        pq.write_table(table.slice(start, 3000), f"{bucket}/t/part-{i}.parquet", filesystem=fs,
                       row_group_size=1000)
    assert len(_files_under(fs, f"{bucket}/t")) == 4
    back = pq.read_table(f"{bucket}/t", filesystem=fs).sort_by("a")
    assert back.equals(table)


def test_credentials_are_checked(mini):
    assert mini.request("GET", "/")[0] == 200
    assert s3_request(mini.endpoint_url, "GET", "/", mini.access_key, "not-the-secret")[0] == 403
    assert s3_request(mini.endpoint_url, "GET", "/", "nobody", mini.secret_key)[0] == 403


def test_env_is_enough_for_default_clients(mini, monkeypatch):
    env = mini.env()
    assert {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
            "AWS_REGION"} <= set(env)
    assert env["AWS_ENDPOINT_URL"] == mini.endpoint_url
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    bucket = _unique("env")
    mini.create_bucket(bucket)
    fs, path = pafs.FileSystem.from_uri(f"s3://{bucket}/hello.txt")  # no explicit options
    with fs.open_output_stream(path) as f:
        f.write(b"hello")
    assert mini.filesystem().open_input_stream(path).read() == b"hello"


@pytest.mark.slow
def test_replicated_reads_survive_either_volume_server_and_writes_go_on(cluster):
    assert len(cluster.live_volume_servers()) == 2
    fs = cluster.filesystem()
    bucket, out_bucket = _unique("repl-in"), _unique("repl-out")
    # Output bucket: single copies wherever a server is alive (see the controller's doc).
    cluster.set_replication(f"/buckets/{out_bucket}/", "000")
    fs.create_dir(bucket)
    fs.create_dir(out_bucket)
    objects = {f"{bucket}/obj-{i}.bin": os.urandom(20_000 + i) for i in range(12)}
    objects[f"{bucket}/big.bin"] = os.urandom(9 << 20)  # three 4 MB chunks
    for path, data in objects.items():
        with fs.open_output_stream(path) as f:
            f.write(data)
    # Every volume of the input has its two copies on the two servers.
    servers = sorted(cluster.live_volume_servers())
    locations = cluster.volume_locations(collection=bucket)
    assert locations and all(where == servers for where in locations.values())

    for victim, kill in ((0, False), (1, True)):
        cluster.stop_volume(victim, kill=kill)
        assert len(cluster.live_volume_servers()) == 1
        for path, data in objects.items():
            with fs.open_input_stream(path) as f:
                assert f.read() == data, f"{path} unreadable with volume server {victim} down"
        new = os.urandom(50_000)
        with fs.open_output_stream(f"{out_bucket}/while-{victim}-down.bin") as f:
            f.write(new)
        assert fs.open_input_stream(f"{out_bucket}/while-{victim}-down.bin").read() == new
        cluster.start_volume(victim)
        assert len(cluster.live_volume_servers()) == 2


# ----------------------------------------------------------------------------------------
# Millstream on S3 (need the engine)
# ----------------------------------------------------------------------------------------

def test_word_count_from_s3(mini, fs, monkeypatch):
    bucket = _unique("wc")
    want = _make_text_files(fs, f"{bucket}/in", files=6, lines=300, seed=1)
    with engine_on(mini, monkeypatch):
        counts = (ms.read_text(f"s3://{bucket}/in/*.txt")
                  .select(ms.col("text").str.split().alias("word"))
                  .explode("word")
                  .group_by("word").agg(ms.count().alias("n")))
        got = {r["word"]: r["n"] for r in counts.collect()}
    assert got == dict(want)


def test_parquet_roundtrip_on_s3_commits_with_success_marker(mini, fs, monkeypatch):
    bucket = _unique("pqrt")
    fs.create_dir(bucket)
    n = 20_000
    table = pa.table({"a": pa.array(range(n), pa.int64()),
                      "b": [f"v{i % 101}" for i in range(n)],
                      "c": [i * 0.5 for i in range(n)]})
    with engine_on(mini, monkeypatch):
        ms.from_arrow(table, num_partitions=4).write_parquet(f"s3://{bucket}/out/")
        files = _files_under(fs, f"{bucket}/out")
        assert f"{bucket}/out/_SUCCESS" in files
        data_files = [f for f in files if f.endswith(".parquet")]
        assert data_files and all("/." not in f and "staging" not in f for f in files)
        only_a = ms.read_parquet(f"s3://{bucket}/out/", columns=["a"]).collect()
        assert all(set(r) == {"a"} for r in only_a)
        assert sorted(r["a"] for r in only_a) == list(range(n))
        # JSON lines and CSV sinks commit on S3 too.
        small = ms.from_arrow(table.slice(0, 500), num_partitions=2)
        small.write_json(f"s3://{bucket}/json/")
        small.write_csv(f"s3://{bucket}/csv/")
        from_json = ms.read_json(f"s3://{bucket}/json/").collect()
        from_csv = ms.read_csv(f"s3://{bucket}/csv/").collect()
    back = pq.read_table(f"{bucket}/out", filesystem=fs).sort_by("a")
    assert back.select(["a", "b", "c"]).to_pylist() == table.to_pylist()
    want_small = sorted(table.slice(0, 500).to_pylist(), key=lambda r: r["a"])
    assert sorted(from_json, key=lambda r: r["a"]) == want_small
    assert sorted(({k: r[k] for k in ("a", "b", "c")} for r in from_csv),
                  key=lambda r: r["a"]) == want_small
    for kind in ("json", "csv"):
        assert f"{bucket}/{kind}/_SUCCESS" in _files_under(fs, f"{bucket}/{kind}")


def test_failed_job_leaves_nothing_under_the_target(mini, fs, monkeypatch):
    bucket = _unique("fail")
    _make_text_files(fs, f"{bucket}/in", files=4, lines=200, seed=2)

    def explode_on_a_late_line(row):
        if row["text"].startswith("omega omega"):  # some line, in some split, mid-job
            raise RuntimeError("deliberate failure in the map function")
        return row

    # Make sure the bad line exists, late in the last file.
    with fs.open_output_stream(f"{bucket}/in/part-999.txt") as f:
        f.write(b"alpha beta\n" * 500 + b"omega omega fails here\n" + b"gamma\n" * 10)
    with engine_on(mini, monkeypatch):
        ds = ms.read_text(f"s3://{bucket}/in/*.txt").map(explode_on_a_late_line)
        with pytest.raises(Exception, match="deliberate failure"):
            ds.write_parquet(f"s3://{bucket}/job/out/")
    # No data files, no _SUCCESS, no staging left next to the target (a directory
    # marker may linger: SeaweedFS removes empty directories asynchronously).
    assert _files_under(fs, f"{bucket}/job") == []
    assert fs.get_file_info(f"{bucket}/job/out/_SUCCESS").type == pafs.FileType.NotFound


def _stop_gate(flag_dir: str, timeout: float = 60.0):
    """A function for row-wise user code: the first call anywhere (any worker) asks the
    driver to stop a volume server, and every call waits until that is done.

    Protocol through files: the first caller creates ``started`` (O_EXCL); the driver's
    thread stops the server, then creates ``stopped``. Built as a closure so cloudpickle
    ships it by value (workers need not import this module).
    """
    started = os.path.join(flag_dir, "started")
    stopped = os.path.join(flag_dir, "stopped")
    state = {"open": False}

    def gate() -> None:
        if state["open"]:
            return
        if not os.path.exists(stopped):
            with contextlib.suppress(FileExistsError):
                fd = os.open(started, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
            deadline = time.monotonic() + timeout
            while not os.path.exists(stopped):
                if time.monotonic() > deadline:
                    raise RuntimeError("the test never stopped the volume server")
                time.sleep(0.005)
        state["open"] = True

    return gate


def _stop_when_started(cluster: SeaweedCluster, flag_dir: str, index: int, report: dict,
                       timeout: float = 60.0) -> None:
    """Driver-side thread: wait for the job's first record, stop volume server ``index``."""
    started = os.path.join(flag_dir, "started")
    stopped = os.path.join(flag_dir, "stopped")
    try:
        deadline = time.monotonic() + timeout
        while not os.path.exists(started):
            if report.get("cancel"):
                return
            if time.monotonic() > deadline:
                report["error"] = "the job never reached its first record"
                return
            time.sleep(0.005)
        cluster.stop_volume(index)
        report["stopped"] = True
        report["live_after_stop"] = cluster.live_volume_servers()
    except Exception as exc:  # noqa: BLE001 - reported to the test
        report["error"] = exc
    finally:
        with open(stopped, "w"):
            pass


@pytest.mark.slow
def test_word_count_survives_losing_a_volume_server_mid_job(cluster, tmp_path, monkeypatch):
    fs = cluster.filesystem()
    in_bucket, out_bucket = _unique("wcr-in"), _unique("wcr-out")
    # Input keeps replication 001 (two copies); output goes to single-copy volumes on
    # whichever server is alive: with two servers and one down SeaweedFS cannot place
    # new 001 writes at all (see tests/services/seaweedfs.py).
    cluster.set_replication(f"/buckets/{out_bucket}/", "000")
    fs.create_dir(out_bucket)
    # Many small files: at most one split per worker is read before the stop.
    want = _make_text_files(fs, f"{in_bucket}/in", files=12, lines=150, seed=3)
    locations = cluster.volume_locations(collection=in_bucket)
    assert locations and all(len(where) == 2 for where in locations.values())

    flag_dir = str(tmp_path / "flags")
    os.makedirs(flag_dir)
    gate = _stop_gate(flag_dir)

    def words(row):
        gate()
        return [{"word": w} for w in row["text"].split()]

    report: dict = {}
    stopper = threading.Thread(target=_stop_when_started,
                               args=(cluster, flag_dir, 0, report), daemon=True)
    stopper.start()
    try:
        with engine_on(cluster, monkeypatch):
            (ms.read_text(f"s3://{in_bucket}/in/*.txt")
             .flat_map(words)
             .group_by("word").agg(ms.count().alias("n"))
             .write_parquet(f"s3://{out_bucket}/counts/"))
            stopper.join(timeout=30)
            assert report.get("stopped") and "error" not in report, report
            assert report["live_after_stop"] == [cluster.volume_address(1)]
            assert not cluster.volumes[0].alive()
            # Read the result back with the engine too, still with one server down.
            got_engine = {r["word"]: r["n"]
                          for r in ms.read_parquet(f"s3://{out_bucket}/counts/").collect()}
    finally:
        report["cancel"] = True
        stopper.join(timeout=30)
    assert len(cluster.live_volume_servers()) == 1
    files = _files_under(fs, f"{out_bucket}/counts")
    assert f"{out_bucket}/counts/_SUCCESS" in files
    table = pq.read_table(f"{out_bucket}/counts", filesystem=fs)
    got = dict(zip(table.column("word").to_pylist(), table.column("n").to_pylist()))
    assert got == dict(want)
    assert got_engine == dict(want)


def test_streaming_job_checkpoints_to_s3_and_restarts_exactly_once(mini, fs, monkeypatch):
    """Checkpoints and the exactly-once file sink on S3; a task process killed mid-job (the
    test source stays open until then, so the kill always lands in a running job)."""
    import signal
    from collections import Counter

    from faults import HeldRows

    from millstream.io.files.stream_sink import FileStreamSink

    bucket = _unique("stream")
    fs.create_dir(bucket)
    rows = [{"id": i, "k": f"k{i % 5}"} for i in range(6000)]
    held = HeldRows(rows, partitions=2, chunk=40)

    with engine_on(mini, monkeypatch):
        ds = held.dataset().repartition(2, "k")
        job = ds.start(checkpoint=f"s3://{bucket}/chk", checkpoint_interval="100ms",
                       sink=FileStreamSink(f"s3://{bucket}/out"), parallelism=2,
                       executor="parallel")
        # half the input is held back: the job cannot end before the kill
        held.wait_until_checkpointed(job)
        os.kill(job.host_pids()[-1], signal.SIGKILL)
        held.release()
        assert job.await_termination(120)
        assert job.metrics()["restarts"] == 1
        files = [i.path for i in fs.get_file_info(pafs.FileSelector(f"{bucket}/out"))
                 if i.type == pafs.FileType.File]
        ids = [i for f in files for i in pq.read_table(f, filesystem=fs).column("id").to_pylist()]
        assert Counter(ids) == Counter(r["id"] for r in rows)
        chk = fs.get_file_info(pafs.FileSelector(f"{bucket}/chk"))
        assert any(i.base_name.startswith("chk-") for i in chk)
