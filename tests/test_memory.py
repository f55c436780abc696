"""Bounded memory: a word count over text five times larger than memory_limit completes,
and the worker processes stay near the limit (measured above their idle footprint)."""

from __future__ import annotations

import threading
import time
from collections import Counter

import numpy as np
import psutil
import pytest

import millstream as ms
from millstream.runtime.session import get_session


def _anon_rss(pid: int) -> int:
    """Anonymous resident memory of a process (excludes memory-mapped file pages)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return psutil.Process(pid).memory_info().rss


def _write_corpus(path, target_bytes: int, vocab: int = 200_000, seed: int = 5) -> Counter:
    """Lines of ten random words (``w000123x``: eight bytes each) up to ``target_bytes``;
    returns each word's count, taken from the draws (not from reading the file back)."""
    rng = np.random.default_rng(seed)
    words = np.frombuffer("".join(f"w{i:06d}x " for i in range(vocab)).encode(),
                          np.uint8).reshape(vocab, 9)
    counts = np.zeros(vocab, np.int64)
    with open(path, "wb") as f:
        written = 0
        while written < target_bytes:
            ids = rng.integers(0, vocab, size=200_000)
            counts += np.bincount(ids, minlength=vocab)
            lines = words[ids].reshape(-1, 90)  # ten words and their spaces per line
            lines[:, -1] = ord("\n")  # the tenth word's space ends the line
            f.write(lines.tobytes())
            written += lines.size
    return Counter({f"w{i:06d}x": int(n) for i, n in enumerate(counts) if n})


@pytest.mark.slow
def test_wordcount_five_times_memory_limit(tmp_path):
    limit = 16 << 20
    path = tmp_path / "big.txt"
    want = _write_corpus(path, 5 * limit + (1 << 20))
    assert path.stat().st_size > 5 * limit
    # no speculative copies (a slow task under load gets one, and the losing copy's worker
    # is replaced): the check that no worker was replaced is about memory
    ms.init(parallelism=2, memory_limit=limit, progress=False, shuffle_partitions=4,
            speculation=False)
    try:
        # start the workers and measure their idle footprint
        ms.range(4, num_partitions=2).collect(driver_input_limit=0)
        runner = get_session().runner_obj
        procs = [psutil.Process(p) for p in runner.worker_pids()]
        idle = {p.pid: _anon_rss(p.pid) for p in procs}
        peak = dict(idle)
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                for p in procs:
                    try:
                        peak[p.pid] = max(peak[p.pid], _anon_rss(p.pid))
                    except (psutil.NoSuchProcess, FileNotFoundError):
                        pass
                time.sleep(0.02)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        counts = (ms.read_text(str(path))
                  .select(ms.col("text").str.split().alias("word"))
                  .explode("word")
                  .group_by("word").agg(ms.count().alias("n")))
        got = {r["word"]: r["n"] for r in counts.collect()}
        stop.set()
        t.join()
        assert sorted(runner.worker_pids()) == sorted(idle)  # no worker was replaced
        assert got == dict(want)
        growth = max(peak[p] - idle[p] for p in idle)
        # Operators keep their buffers within the per-task budget (limit/2) and batches shrink
        # with it; on top of that a worker has a working set of ~100 MiB that does not grow
        # with the input or the limit (mostly Arrow's group-by internals, ~40-55 MiB a call).
        assert growth < 192 << 20, f"worker grew by {growth / 2**20:.0f} MiB over idle"
        print(f"worker growth over idle: {growth / 2**20:.1f} MiB (limit {limit / 2**20:.0f} MiB)")
    finally:
        ms.init(parallelism=2, progress=False)
