"""Switching between the local and the Ray runner per action keeps the Ray connection and
never lets local workers reach into Ray; an unreachable cluster fails fast and clearly."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from runners_fixture import ray_missing, use_runner

import millstream as ms
from millstream.runtime.session import get_session

pytestmark = [pytest.mark.ray,  # the session's Ray cluster, on the test worker of the Ray tests
              pytest.mark.skipif(ray_missing() is not None, reason=ray_missing() or "")]

SRC = str(Path(__file__).resolve().parent.parent / "src")


@pytest.fixture
def on_ray(request):
    saved = use_runner("ray", request.config)
    yield
    ms.init(**saved)


def test_a_ray_cached_dataset_survives_actions_on_the_local_runner(on_ray):
    import ray

    a = ms.range(300_000, num_partitions=3).with_columns(sq=ms.col("id") * 2).cache()
    assert a.count() == 300_000
    ray_runner = get_session().runner_obj
    assert ms.range(10).count(runner="local") == 10
    # the Ray connection outlived the switch: the same runner, still connected
    assert ray.is_initialized()
    assert a.count(runner="ray") == 300_000
    assert get_session().runner_obj is ray_runner
    # on the local runner the Ray-cached partitions are not read (local workers never
    # connect to Ray): the dataset is computed (and cached) there, and right
    started = time.monotonic()
    assert a.agg(ms.sum("sq").alias("s")).collect(runner="local") == \
        [{"s": 2 * sum(range(300_000))}]
    assert time.monotonic() - started < 120
    assert a.count(runner="ray") == 300_000  # recomputed on Ray now that local cached it


def test_an_unreachable_cluster_fails_within_seconds(tmp_path):
    script = ("import millstream as ms\n"
              "ms.init(runner='ray', address='127.0.0.1:1')\n"
              "try:\n    ms.range(10).count()\n"
              "except ms.MillstreamError as e:\n    print('ERR', type(e).__name__, e)\n")
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"}, timeout=60)
    assert time.monotonic() - started < 30
    assert "ERR RunnerError cannot reach a Ray cluster at '127.0.0.1:1'" in out.stdout, out
