"""Feeding test sources to a streaming job on either executor, so that one test checks both
executors against one oracle; and pieces of pipelines several test modules share.

Inline (``executor="inline"``): every item is added before the job starts and the sources
are closed; the job reads them round by round, as ``oracles.arrivals(..., "rounds")``
models.

Parallel: source tasks run in other processes at their own pace, and consumers hear of a
source's watermark at most every 20 ms, so whether a row meets a moved watermark (is it
late? in which pane of a count trigger does it land? in which epoch?) depends on timing,
as in Flink. A *paced* feed makes it deterministic: the items go in one at a time, in the
same round-robin order, each once the newest complete checkpoint covers every item before
it (a checkpoint completes only after every task processed all data and watermarks sent
before its barrier). The job then reads them as ``oracles.arrivals(..., "sequential")``
models, and every item with rows is an epoch of its own at least, so a fault injected at
epoch N is reached when there are N items or more: the feed waits for states, never for
time.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import oracles

from millstream.core import changelog
from millstream.io import fs as msfs
from millstream.ops.state.process import KeyedProcessFunction
from millstream.plan.compile import streaming_settings
from millstream.plan.optimizer import optimize
from millstream.runtime.checkpoint import COMPLETE, CheckpointStore
from millstream.runtime.streaming.layout import scans
from millstream.testing import CollectingSink, TestSource
from millstream.testing import crash_and_restore as _crash_and_restore

#: How long a paced feed waits for the job to checkpoint an item before it gives up.
PACE_TIMEOUT_S = 60.0


def _has_rows(rows: Any) -> bool:
    return rows is not None and len(rows) > 0


class Feed:
    """Test sources and their items, fed to the jobs a test starts through it.

    ``source(items, ...)`` makes an empty :class:`TestSource` and deals ``items`` (lists of
    rows, or (rows, watermark µs) pairs) round-robin to its partitions; ``start(ds, ...)``
    and ``crash_and_restore(ds, ...)`` start jobs on the feed's executor, feeding the items
    up front (inline, or ``paced=False``) or paced by checkpoints (parallel). Jobs of one
    feed share its sources: a restart reads on where its checkpoint left off.
    """

    def __init__(self, executor: str, workdir: Path, paced: bool = True) -> None:
        self.executor = executor
        self.paced = paced and executor != "inline"
        self.workdir = Path(workdir)
        #: (source, name, time column, delay ms, items per partition)
        self._sources: list[tuple[TestSource, Any, str | None, int | None, list[list]]] = []
        self._begun = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None

    # ------------------------------------------------------------------ building

    def source(self, items: list, schema: Any = None, partitions: int = 1, name: Any = None,
               time_column: str | None = None, delay_ms: int | None = None) -> TestSource:
        """A new, empty test source whose ``items`` the feed adds later. ``name``,
        ``time_column`` (its event-time column) and ``delay_ms`` (the watermark delay the pipeline gives
        it) are for :meth:`arrivals`."""
        if self._begun:
            raise RuntimeError("Feed.source after a job started")
        src = TestSource(schema=schema, partitions=partitions)
        parts: list[list] = [[] for _ in range(partitions)]
        for i, item in enumerate(items):
            rows, wm = item if isinstance(item, tuple) else (item, None)
            parts[i % partitions].append((rows, wm))
        self._sources.append((src, len(self._sources) if name is None else name, time_column,
                              delay_ms, parts))
        return src

    def _order(self) -> list[tuple[TestSource, int, Any, int | None]]:
        """Every item in feed order: round r holds item r of every partition of every
        source (sources in the order they were made)."""
        out = []
        rounds = max((len(p) for s in self._sources for p in s[4]), default=0)
        for r in range(rounds):
            for src, _name, _time, _delay, parts in self._sources:
                for p, items in enumerate(parts):
                    if r < len(items):
                        out.append((src, p, *items[r]))
        return out

    # ------------------------------------------------------------------ the model

    @property
    def schedule(self) -> str:
        """How the jobs read the items: "rounds" (inline) or "sequential" (paced)."""
        if self.executor == "inline":
            return "rounds"
        if self.paced:
            return "sequential"
        raise RuntimeError("an unpaced feed on the parallel executor has no fixed schedule")

    def arrivals(self) -> list[tuple[Any, dict, int]]:
        """Every row with the watermark it meets in the job (``oracles.arrivals``)."""
        parts = [(name, time_col, delay, items) for _src, name, time_col, delay, per in
                 self._sources for items in per]
        return oracles.arrivals(parts, self.schedule)

    def rows_in_order(self) -> list[tuple[Any, dict]]:
        """Every row in the order the job reads it when that order is fixed (one partition
        in all, or a paced feed): [(source name, row)]."""
        return [(name, row) for name, row, _w in self.arrivals()]

    # ------------------------------------------------------------------ running

    def start(self, ds: Any, **options: Any) -> Any:
        """``ds.start(**options)`` on the feed's executor, with its items fed."""
        options.setdefault("executor", self.executor)
        self._begin(ds, options)
        return ds.start(**options)

    def crash_and_restore(self, ds: Any, **options: Any) -> Any:
        """``millstream.testing.crash_and_restore`` on the feed's executor, items fed."""
        options.setdefault("executor", self.executor)
        self._begin(ds, options)
        return _crash_and_restore(ds, **options)

    def _begin(self, ds: Any, options: dict[str, Any]) -> None:
        if self.paced and options.get("checkpoint") is None:
            options["checkpoint"] = str(self.workdir / "chk")
        if self._begun:
            return
        self._begun = True
        if not self.paced:
            for src, p, rows, wm in self._order():
                src.add(rows, watermark=wm, partition=p)
            self._close()
            return
        # a source read by several branches of the plan has a source task per branch (and
        # partition); an item is covered once every one of them read it. The optimized plan
        # says how many: a scan the branches share (one node object) is read once.
        planned = optimize(ds._node, streaming_settings(options.get("parallelism") or 1))
        unique = {id(s): s for s in scans(planned)}.values()
        readers = Counter(id(s.source) for s in unique)
        self._thread = threading.Thread(target=self._pace, args=(options["checkpoint"], readers),
                                        daemon=True, name="test-feed")
        self._thread.start()

    def _close(self) -> None:
        for src, *_ in self._sources:
            src.close()

    def _pace(self, checkpoint: str, readers: Counter) -> None:
        """Add one item, wait until a complete checkpoint covers it, add the next...

        Covered: the source positions (item indexes) in the newest committed checkpoint add
        up to the items fed times the tasks reading each (a task never reads ahead of the
        items fed, so the sum reaches it only when every task has read every item)."""
        store = CheckpointStore(checkpoint)
        seen: list[Any] = [None, 0]  # newest epoch read, items it covers

        def covered() -> int:
            # the newest checkpoint that is complete and committed: a job restarted with a
            # sink that cannot re-commit (in memory, Kafka) resumes from there, and an item
            # fed beyond it would be read in one epoch with the replayed ones (their order
            # across partitions then depends on timing)
            stamp = None
            for epoch in reversed(store.epochs()):
                if not store.is_committed(epoch):
                    continue
                try:  # (an epoch may be written again by a job restarted before it)
                    stamp = (epoch, msfs.read_bytes(store.fs, msfs.join(
                        store._dir(epoch), COMPLETE)))
                except Exception:  # noqa: BLE001 - discarded meanwhile
                    stamp = None
                break
            if stamp is not None and stamp != seen[0]:
                state = store.read(stamp[0], keyed_as_blobs=True)
                if state is not None:
                    seen[0] = stamp
                    seen[1] = sum(v for v in state["positions"].values()
                                  if isinstance(v, int))
            return seen[1]

        fed = 0
        for src, p, rows, wm in self._order():
            src.add(rows, watermark=wm, partition=p)
            fed += readers[id(src)]
            if not _has_rows(rows):
                continue  # a watermark alone may change nothing: no epoch to wait for
            deadline = time.monotonic() + PACE_TIMEOUT_S
            while covered() < fed:
                if self._stop.wait(0.005):
                    return
                if time.monotonic() > deadline:
                    self.error = (f"no checkpoint in {checkpoint} covered the items fed "
                                  f"within {PACE_TIMEOUT_S:g}s (positions add up to "
                                  f"{covered()}, not {fed})")
                    self._close()
                    return
        self._close()

    def stop(self) -> None:
        """Stop feeding (test teardown); fail if the feed gave up waiting."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self.error:
            raise AssertionError(f"paced feed: {self.error}")


# ============================================================================ shared pipelines


def events(seed: int, n_items: int, per_item: int, keys: str = "abc") -> list[list[dict]]:
    """Items of rows {k, ts (epoch ms), v} with time moving forward, most rows in order, some
    up to 20 s behind and some up to 200 s (late for a small watermark delay)."""
    rng = random.Random(seed)
    items, t = [], 0
    for _ in range(n_items):
        rows = []
        for _ in range(per_item):
            t += rng.randint(0, 4000)
            jitter = rng.choice([0, 0, 0, rng.randint(0, 20_000), rng.randint(0, 200_000)])
            rows.append({"k": rng.choice(keys), "ts": max(0, t - jitter), "v": rng.randint(1, 9)})
        items.append(rows)
    return items


def in_order_events(seed: int, n_items: int, per_item: int, keys: str = "abcde",
                    max_v: int = 9) -> list[list[dict]]:
    """Items of rows {k, ts (ms, moving forward, never back), v in 1..``max_v``}."""
    rng = random.Random(seed)
    items, t = [], 0
    for _ in range(n_items):
        rows = []
        for _ in range(per_item):
            t += rng.randint(0, 3000)
            rows.append({"k": rng.choice(keys), "ts": t, "v": rng.randint(1, max_v)})
        items.append(rows)
    return items


def filled_source(items: list, partitions: int = 1, schema: Any = None,
                  close: bool = True) -> TestSource:
    """A test source with ``items`` dealt round-robin to its partitions (for jobs whose
    result does not depend on when rows meet the watermark, and for batch mode)."""
    src = TestSource(schema=schema, partitions=partitions)
    for i, rows in enumerate(items):
        src.add(rows, partition=i % partitions)
    if close:
        src.close()
    return src


class CountWithTimeout(KeyedProcessFunction):
    """Counts rows per key; 30 s of event time after a key's last row, emits the count and
    clears; rows with v == 9 also go to the side output "nines"."""

    def open(self, ctx):
        self.count = ctx.get_state("count", 0)
        self.last = ctx.get_state("last", None)

    def process_element(self, row, ctx):
        self.count.update(self.count.value() + 1)
        if self.last.value() is not None:
            ctx.timer_service().delete_event_time_timer(self.last.value() + 30_000_000)
        self.last.update(ctx.timestamp)
        ctx.timer_service().register_event_time_timer(ctx.timestamp + 30_000_000)
        if row.get("v") == 9:
            ctx.output("nines", row)

    def on_timer(self, timestamp, ctx):
        n = self.count.value()
        self.count.clear()
        self.last.clear()
        return {"k": ctx.key, "n": n, "at": timestamp}


def read_ids(out: Any) -> list[int]:
    """The ``id`` column of every Parquet file a file sink committed under ``out``."""
    import pyarrow.parquet as pq

    files = sorted(Path(out).glob("*.parquet"))
    return [i for f in files for i in pq.read_table(f).column("id").to_pylist()]


def wait_until(cond: Any, timeout: float = 30.0) -> bool:
    """Wait until ``cond()`` holds (True), or ``timeout`` seconds passed (its last value)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


class UpsertTable(CollectingSink):
    """An upsert sink keyed by ``keys``: ``table`` holds the rows by key as committed
    epochs leave them (``core.changelog.upserts``), as a database table would."""

    changelog_mode = changelog.UPSERT

    def __init__(self, keys: list[str]) -> None:
        super().__init__()
        self.upsert_keys = keys
        self.table: dict[tuple, dict] = {}

    def commit(self, handle: dict[str, Any]) -> None:
        table = self._staged.get(handle["epoch"])
        super().commit(handle)
        if table is None:
            return
        ups = changelog.upserts(table, self.upsert_keys)
        for r, kind in zip(changelog.without_kinds(ups).to_pylist(), changelog.kinds(ups)):
            key = tuple(r[k] for k in self.upsert_keys)
            if kind == changelog.DELETE:
                self.table.pop(key, None)
            else:
                self.table[key] = r
