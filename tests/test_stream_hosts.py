"""The parallel executor's task-slot hosts on this machine: the pipes each holds."""

from __future__ import annotations

import os
import sys

import pytest
from faults import wait_for

import millstream as ms
from millstream.testing import CollectingSink, TestSource


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

