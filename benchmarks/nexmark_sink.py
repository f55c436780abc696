"""The Nexmark benchmark's streaming sink and process CPU accounting.

:class:`NexmarkSink` is a sink written in the tasks (``for_subtask``): each instance folds
the rows it receives into the order-free checksum of ``nexmark_queries`` (and, for the
latency runs, each row's age: now minus its ``ingest_ns``); an epoch's part travels in its
pre-commit handle, and the driver adds every (epoch, subtask) part once when the epoch
commits. So results are checked exactly once without moving rows to the driver, and
latency is measured where rows arrive (a direct sink) and where they commit (a
transactional sink).
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
from nexmark_queries import checksum_add, checksum_part

INGEST = "ingest_ns"
#: latency histogram resolution (ns per bucket): 0.1 ms
LAT_BUCKET_NS = 100_000


def _sparse_add(acc: dict[int, int], values: np.ndarray, counts: np.ndarray | None = None
                ) -> None:
    if counts is None:
        values, counts = np.unique(values, return_counts=True)
    for v, c in zip(values.tolist(), counts.tolist()):
        acc[v] = acc.get(v, 0) + c


class NexmarkSink:
    """Checksums (and ages) the rows of a query's result; exactly once per epoch."""

    changelog_mode = "retract"  # takes updates (-U/+U/-D): they count negatively

    def __init__(self, index: int | None = None) -> None:
        self.index = index
        self.total: dict[str, Any] | None = None
        self.latency: dict[int, int] = {}  # direct: age bucket -> rows
        self.commit_latency: dict[int, int] = {}  # transactional: age bucket -> rows
        self._committed: set[tuple[int, int | None]] = set()
        self._reset()

    def _reset(self) -> None:
        self._part: dict[str, Any] | None = None
        self._ages: dict[int, int] = {}
        self._ingest: dict[int, int] = {}

    def for_subtask(self, index: int) -> NexmarkSink:
        """The instance of parallel subtask ``index`` (written in the task)."""
        return NexmarkSink(index)

    def begin(self, epoch: int) -> None:
        self._reset()

    def write(self, batch: Any) -> None:
        now = time.time_ns()
        if batch.num_rows == 0:
            return
        names = batch.schema.names
        if INGEST in names:
            ingest = np.asarray(batch.column(INGEST), dtype=np.int64)
            _sparse_add(self._ages, (now - ingest) // LAT_BUCKET_NS)
            _sparse_add(self._ingest, ingest // LAT_BUCKET_NS)
            batch = batch.drop_columns([INGEST])
        self._part = checksum_add(self._part, checksum_part(batch))

    def pre_commit(self, epoch: int) -> dict[str, Any]:
        handle = {"epoch": epoch, "index": self.index, "part": self._part,
                  "ages": self._ages, "ingest": self._ingest}
        self._reset()
        return handle

    def commit(self, handle: dict[str, Any]) -> None:
        key = (handle["epoch"], handle["index"])
        if key in self._committed:
            return
        self._committed.add(key)
        now = time.time_ns() // LAT_BUCKET_NS
        if handle["part"] is not None:
            self.total = checksum_add(self.total, handle["part"])
        for b, c in handle["ages"].items():
            self.latency[b] = self.latency.get(b, 0) + c
        for b, c in handle["ingest"].items():
            age = now - b
            self.commit_latency[age] = self.commit_latency.get(age, 0) + c

    def abort(self, handle: Any = None) -> None:
        self._reset()

    def result(self) -> dict[str, Any]:
        """The checksum of every committed row (empty result: zero rows)."""
        return self.total or {"rows": 0, "sums": [], "hash": 0, "columns": []}


def percentiles(hist: dict[int, int], qs: tuple[float, ...] = (50, 95, 99)) -> dict[str, float]:
    """Percentiles (ms) of a latency histogram of 0.1 ms buckets."""
    if not hist:
        return {}
    keys = np.array(sorted(hist), dtype=np.int64)
    counts = np.array([hist[k] for k in keys.tolist()], dtype=np.int64)
    cum = np.cumsum(counts)
    out = {}
    for q in qs:
        i = int(np.searchsorted(cum, cum[-1] * q / 100.0))
        out[f"p{q:g}"] = float(keys[min(i, len(keys) - 1)]) * LAT_BUCKET_NS / 1e6
    out["max"] = float(keys[-1]) * LAT_BUCKET_NS / 1e6
    out["rows"] = int(cum[-1])
    return out


# ---------------------------------------------------------------------- CPU accounting


def cpu_snapshot() -> dict[int, float]:
    """CPU seconds so far of this process and each live descendant (their own and their
    reaped children's), by pid; key -1: this process's reaped children (os.times)."""
    import psutil

    me = psutil.Process()
    procs = [me]
    try:
        procs += me.children(recursive=True)
    except psutil.Error:
        pass
    out: dict[int, float] = {}
    for p in procs:
        try:
            t = p.cpu_times()
            own = t.user + t.system
            out[p.pid] = own if p.pid == me.pid else own + t.children_user + t.children_system
        except psutil.Error:
            continue
    t = os.times()
    out[-1] = t.children_user + t.children_system
    return out


def cpu_delta(before: dict[int, float], after: dict[int, float] | None = None) -> float:
    """CPU seconds used between two snapshots by this process tree: the live processes'
    growth, the new ones' whole, the ones reaped since (counted in their parent's children
    times) less what they had used before."""
    after = cpu_snapshot() if after is None else after
    total = 0.0
    for pid, v in after.items():
        total += v - before.get(pid, 0.0)
    for pid, v in before.items():
        if pid not in after and pid != -1:
            total -= v
    return max(total, 0.0)
