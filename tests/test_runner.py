"""Local runner: errors name the user's code, operator and partition; failed tasks are retried."""

from __future__ import annotations

import os

import pytest

import millstream as ms
from millstream.runners.local import FAULT_ENV


def _boom(row):
    if row["id"] == 77:
        raise ValueError("bad id 77")
    return row


def test_user_function_error_names_operator_partition_and_user_traceback():
    ds = ms.range(200, num_partitions=4).map(_boom)
    with pytest.raises(ms.UserFunctionError) as info:
        ds.collect(max_task_attempts=2)
    err = info.value
    text = str(err)
    assert "bad id 77" in text
    assert "Map(_boom)" in text
    assert "partition 1" in text                     # ids 50..99 live in partition 1
    assert "{'id': 77}" in text                      # the failing record
    assert err.user_traceback.index("_boom") < err.user_traceback.index("ValueError")
    assert "millstream/ops" not in err.user_traceback  # the user's frames, not ours
    assert len(err.attempts) == 2
    assert isinstance(err.original, ValueError)


def test_schema_error_is_not_retried():
    with pytest.raises(ms.SchemaError, match="nope"):
        ms.range(10).select(ms.col("nope")).collect()


def test_worker_killed_mid_job_is_retried(monkeypatch):
    ms.shutdown()  # fresh workers see the fault-injection variable
    monkeypatch.setenv(FAULT_ENV, "kill:group-by map side:1:0")
    try:
        ds = ms.range(10_000, num_partitions=4).with_columns(k=ms.col("id") % 7)
        rows = ds.group_by("k").agg(ms.count().alias("n"), ms.sum("id").alias("s")).collect()
        got = {r["k"]: (r["n"], r["s"]) for r in rows}
        want: dict[int, list[int]] = {}
        for i in range(10_000):
            n, s = want.get(i % 7, (0, 0))
            want[i % 7] = (n + 1, s + i)
        assert got == want
    finally:
        monkeypatch.delenv(FAULT_ENV)
        ms.shutdown()


def test_attempts_exhausted_reports_each_cause(monkeypatch):
    ms.shutdown()
    monkeypatch.setenv(FAULT_ENV, "kill:*:0:*")
    try:
        with pytest.raises(ms.TaskError) as info:
            ms.range(100, num_partitions=2).collect(max_task_attempts=3)
        text = str(info.value)
        assert "after 3 attempt(s)" in text
        assert text.count("\n  attempt ") == 3 and "SIGKILL" in text
        assert "partition 0" in text
    finally:
        monkeypatch.delenv(FAULT_ENV)
        ms.shutdown()


def test_results_do_not_depend_on_parallelism():
    def run(par):
        ms.init(parallelism=par, progress=False)
        ds = ms.range(5000, num_partitions=5).with_columns(k=ms.col("id") % 13)
        return sorted(tuple(r.values()) for r in
                      ds.group_by("k").agg(ms.sum("id").alias("s")).collect())
    try:
        assert run(1) == run(3)
    finally:
        ms.init(parallelism=2, progress=False)


def test_env_snapshot_reaches_workers(monkeypatch):
    ms.shutdown()
    monkeypatch.setenv("MILLSTREAM_TEST_MARK", "42")
    rows = ms.range(3).map(lambda r: {"v": os.environ.get("MILLSTREAM_TEST_MARK")}).collect()
    assert {r["v"] for r in rows} == {"42"}
    ms.shutdown()


@pytest.mark.timeout(240)  # (room for a busy machine; the straggler waits for the test)
def test_speculative_backup_attempt_wins(tmp_path):
    from faults import straggler

    from millstream.runtime.session import get_session

    ms.shutdown()
    release = tmp_path / "release"  # (the straggler's first attempt waits for it)
    ds = ms.range(400, num_partitions=4).map(straggler(release))
    try:
        rows = ds.collect(speculation=True, speculation_multiplier=2.0,
                          speculation_min_seconds=0.5, speculation_quantile=0.5,
                          driver_input_limit=0)  # (workers, not here)
    finally:
        release.touch()
    assert sorted(r["id"] for r in rows) == list(range(400))
    assert get_session().runner_obj.speculative_attempts == 1


def test_lost_shuffle_output_is_recomputed(monkeypatch):
    """A map output that disappears before its reducers read it is recomputed."""

    from millstream.runtime import scheduler

    deleted = []
    original = scheduler.Job._tasks

    def tasks_then_lose_output(self, st):
        # when the reduce stage is about to run, delete one map output of its input stage
        for dep in st.deps:
            if dep.output_kind == "shuffle" and dep.results and not deleted:
                path = dep.results[1].path
                os.unlink(path)
                deleted.append(path)
        return original(self, st)

    monkeypatch.setattr(scheduler.Job, "_tasks", tasks_then_lose_output)
    ds = ms.range(1000, num_partitions=3).with_columns(k=ms.col("id") % 5)
    rows = ds.group_by("k").agg(ms.sum("id").alias("s")).collect()
    assert len(deleted) == 1
    assert {r["k"]: r["s"] for r in rows} == {k: sum(i for i in range(1000) if i % 5 == k) for k in range(5)}
    assert ms.last_job_stats().counters.get(("millstream", "recomputed_map_tasks")) == 1


def test_lost_cached_partition_is_recomputed_from_lineage():
    """A cached partition that disappears (disk or node lost) is rebuilt from its lineage."""
    from millstream.runtime.session import get_session

    cached = ms.range(3000, num_partitions=3).with_columns(k=ms.col("id") % 7).cache()
    assert cached.count() == 3000
    blocks = get_session().cache[cached._node.cache_id]
    os.unlink(blocks[1].path)
    rows = cached.group_by("k").agg(ms.count().alias("n")).collect()
    assert sum(r["n"] for r in rows) == 3000
    assert cached.count() == 3000  # cached again
    cached.unpersist()


@pytest.mark.parametrize("how", ["inner", "right"])
def test_small_left_side_is_broadcast(how):
    small = ms.from_items([{"k": i, "name": f"n{i}", "v": i} for i in range(5)] + [{"k": None, "name": "x", "v": 9}])
    big = ms.range(2000, num_partitions=4).with_columns(k=ms.col("id") % 7, v=ms.col("id"))
    joined = small.join(big, on="k", how=how)
    assert "broadcast left" in joined.explain(print_plan=False)
    shuffled = small.join(big, on="k", how=how, broadcast=False)

    def canon(rows):
        return sorted(tuple(sorted(r.items())) for r in rows)

    got = joined.collect()
    assert list(got[0]) == ["k", "name", "v", "id", "v_right"]
    assert canon(got) == canon(shuffled.collect())
