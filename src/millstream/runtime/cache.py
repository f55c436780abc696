"""The cache catalog: materialized partitions of ``Dataset.cache()``.

Entries belong to the runner that computed them (local files for the local runner, Ray
objects for Ray): an action on another runner does not see them and computes (and caches)
the dataset anew, so local workers never reach into a Ray object store.

Cached partitions are Arrow IPC files that tasks memory-map. They are written to shared
memory (``/dev/shm``) while the cached total stays within the cache's memory budget;
beyond it, the least recently used cached datasets are moved to the spill directory on
disk. Reading either is zero-copy; only the place (RAM or disk) differs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import OrderedDict
from typing import Any


def _shm_base() -> str | None:
    base = "/dev/shm"
    if os.path.isdir(base) and os.access(base, os.W_OK):
        return base
    return None


class CacheManager:
    """LRU catalog of cached datasets, in memory first and spilled to disk under pressure."""

    def __init__(self, disk_dir: str, memory_budget: int) -> None:
        self.disk_dir = disk_dir
        self.memory_budget = memory_budget
        base = _shm_base()
        self.memory_dir = tempfile.mkdtemp(prefix=f"millstream-cache-{os.getpid()}-", dir=base) if base else None
        self.entries: OrderedDict[int, list[Any]] = OrderedDict()
        #: cache id -> the name of the runner whose outputs the blocks are
        self.owners: dict[int, str | None] = {}
        self.spilled_datasets = 0

    def get(self, cache_id: int, runner: str | None = None) -> list[Any] | None:
        """The blocks of a cached dataset (and mark it recently used), or None; with
        ``runner``, None also when another runner computed them."""
        blocks = self.entries.get(cache_id)
        if blocks is None or (runner is not None and self.owners.get(cache_id) not in
                              (None, runner)):
            return None
        self.entries.move_to_end(cache_id)
        return blocks

    def __getitem__(self, cache_id: int) -> list[Any]:
        blocks = self.get(cache_id)
        if blocks is None:
            raise KeyError(cache_id)
        return blocks

    def __contains__(self, cache_id: int) -> bool:
        return cache_id in self.entries

    def memory_used(self) -> int:
        if self.memory_dir is None:
            return 0
        return sum(b.nbytes for blocks in self.entries.values() for b in blocks
                   if (getattr(b, "path", None) or "").startswith(self.memory_dir))

    def directory_for(self, cache_id: int, job_id: str) -> str:
        """Where a new cached dataset is written: memory if there is room, else disk."""
        use_memory = self.memory_dir is not None and self.memory_used() < self.memory_budget
        base = self.memory_dir if use_memory else self.disk_dir
        d = os.path.join(base, f"c{cache_id}-{job_id}")
        os.makedirs(d, exist_ok=True)
        return d

    def put(self, cache_id: int, blocks: list[Any], runner: str | None = None) -> None:
        """Register a materialized dataset (computed by ``runner``; it replaces what another
        runner cached), then spill LRU datasets while memory is over budget."""
        if cache_id in self.entries:
            self.drop(cache_id)
        self.entries[cache_id] = blocks
        self.owners[cache_id] = runner
        self.entries.move_to_end(cache_id)
        while self.memory_dir is not None and self.memory_used() > self.memory_budget:
            victim = next((cid for cid, bl in self.entries.items()
                           if any(b.path.startswith(self.memory_dir) for b in bl)), None)
            if victim is None:
                break
            self._spill(victim)

    def _spill(self, cache_id: int) -> None:
        os.makedirs(self.disk_dir, exist_ok=True)
        for b in self.entries[cache_id]:
            if self.memory_dir and b.path.startswith(self.memory_dir):
                dest_dir = os.path.join(self.disk_dir, os.path.basename(os.path.dirname(b.path)))
                os.makedirs(dest_dir, exist_ok=True)
                dest = os.path.join(dest_dir, os.path.basename(b.path))
                shutil.move(b.path, dest)
                b.path = dest
        self.spilled_datasets += 1

    def drop(self, cache_id: int) -> None:
        """Forget a cached dataset and delete its files."""
        blocks = self.entries.pop(cache_id, None) or []
        self.owners.pop(cache_id, None)
        dirs = {os.path.dirname(b.path) for b in blocks}
        for b in blocks:
            try:
                os.unlink(b.path)
            except FileNotFoundError:
                pass
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)

    def clear(self) -> None:
        for cid in list(self.entries):
            self.drop(cid)
        if self.memory_dir:
            shutil.rmtree(self.memory_dir, ignore_errors=True)
            self.memory_dir = None
