"""Event-time and processing-time timers of keyed process functions.

``TimerService`` keeps event-time timers (fire when the watermark reaches their
timestamp) and processing-time timers (fire when the clock reaches it), at most one per
(key, timestamp) and kind, each kind in a ``_TimerQueue``; beyond its share of the
memory limit, a queue's latest timers wait on disk (``ops.state.spill_store``). The clock
is injectable: ``WallClock`` by default, ``VirtualClock`` in tests. Timers snapshot to
picklable values (spilled ones included) and restore in place.
"""

from __future__ import annotations

import heapq
import sys
from typing import TYPE_CHECKING, Any

import numpy as np

from millstream.core.keygroups import python_key_hash
from millstream.core.time import MIN_TIME, Clock, WallClock
from millstream.errors import PlanError
from millstream.ops.state.spill_store import SpillArea, decode_key, encode_key

if TYPE_CHECKING:
    from millstream.ops.state.store import KeyedStateStore

#: Rough in-memory bytes of one queued timer (heap tuple, index entry and their ints).
TIMER_BYTES = 320

_EVENT, _PROCESSING = 0, 1


class _TimerQueue:
    """A min-heap of (timestamp, seq, key, hash) with lazy deletion; one timer per (key, ts).

    Beyond ``max_memory`` entries the latest timers move to disk: everything on disk (or
    in ``pending``, timers on their way there, written in batches) sorts at or after
    ``bound`` (ts, seq) and everything in the heap before it, so the heap's smallest live
    entry is the earliest timer whenever memory holds any; when the heap runs empty, the
    earliest timers on disk are read back.
    """

    #: Timers bound for disk buffered before one batched write.
    PENDING = 512

    def __init__(self, kind: int, spill: SpillArea) -> None:
        self.kind = kind
        self.spill = spill
        self.heap: list[tuple[int, int, Any, int | None]] = []
        self.live: dict[tuple[Any, int], int] = {}
        self.max_memory = sys.maxsize
        self.bound: tuple[int, int] | None = None
        #: (key, ts) -> (seq, hash) of timers at or after ``bound`` not written yet
        self.pending: dict[tuple[Any, int], tuple[int, int | None]] = {}
        self.on_disk = 0

    def add(self, key: Any, ts: int, seq: int, h: int | None) -> None:
        live = self.live
        if (key, ts) in live:
            return
        bound = self.bound
        if bound is not None and ts >= bound[0]:
            pending = self.pending
            if (key, ts) not in pending:
                pending[(key, ts)] = (seq, h)
                if len(pending) >= self.PENDING:
                    self._flush()
            return
        live[(key, ts)] = seq
        heap = self.heap
        heapq.heappush(heap, (ts, seq, key, h))
        if len(heap) > self.max_memory:
            self._spill()

    def _flush(self) -> None:
        """Write the pending timers (those the disk has already are ignored)."""
        if self.pending:
            rows = [(ts, seq, encode_key(key), h) for (key, ts), (seq, h) in self.pending.items()]
            self.on_disk += self.spill.store().add_timers(self.kind, rows)
            self.pending = {}

    def remove(self, key: Any, ts: int) -> None:
        if self.live.pop((key, ts), None) is None:
            if self.bound is not None and ts >= self.bound[0]:
                self.pending.pop((key, ts), None)
                if self.on_disk:
                    self.on_disk -= self.spill.store().remove_timer(self.kind, encode_key(key),
                                                                    ts)
                if not self.on_disk and not self.pending:
                    self.bound = None
            return
        if len(self.heap) > 64 and len(self.heap) > 2 * len(self.live):
            self.heap = [e for e in self.heap if self.live.get((e[2], e[0])) == e[1]]
            heapq.heapify(self.heap)

    def pop_due(self, limit: int) -> tuple[int, Any, int | None] | None:
        heap, live = self.heap, self.live
        while True:
            while heap and heap[0][0] <= limit:
                ts, seq, key, h = heapq.heappop(heap)
                if live.get((key, ts)) == seq:
                    del live[(key, ts)]
                    return ts, key, h
            if live or self.bound is None or self.bound[0] > limit:
                return None
            self._refill()
            heap, live = self.heap, self.live

    def _live_sorted(self) -> list[tuple[int, int, Any, int | None]]:
        live = self.live
        return sorted(e for e in self.heap if live.get((e[2], e[0])) == e[1])

    def _spill(self) -> None:
        """Keep the earliest half of ``max_memory`` timers in memory, move the rest to disk."""
        entries = self._live_sorted()
        keep = self.max_memory // 2
        move = entries[keep:]
        if move:
            self._flush()
            self._to_disk(move)
            self.spill.count_spill()
        self._set_heap(entries[:keep])

    def _to_disk(self, entries: list[tuple[int, int, Any, int | None]]) -> None:
        """Write ``entries`` (the latest timers, sorted) to disk; the first is the new bound."""
        self.on_disk += self.spill.store().add_timers(
            self.kind, [(ts, seq, encode_key(key), h) for ts, seq, key, h in entries])
        self.bound = (entries[0][0], entries[0][1])

    def _set_heap(self, entries: list[tuple[int, int, Any, int | None]]) -> None:
        """Hold ``entries`` (sorted, so a heap) in memory, all of them live."""
        self.heap = entries
        self.live = {(key, ts): seq for ts, seq, key, _h in entries}

    def _refill(self) -> None:
        """The heap is empty: read the earliest timers back from disk."""
        self._flush()
        store = self.spill.store()
        rows = store.take_first_timers(self.kind, max(1, self.max_memory // 2))
        self.on_disk -= len(rows)
        self._set_heap([(ts, seq, decode_key(k), h) for ts, seq, k, h in rows])
        self.bound = store.first_timer(self.kind) if self.on_disk else None

    def entries(self) -> list[tuple[int, int, Any, int | None]]:
        out = self._live_sorted()
        self._flush()
        if self.on_disk:
            out += [(ts, seq, decode_key(k), h)
                    for ts, seq, k, h in self.spill.store().timer_rows(self.kind)]
        return out

    def keys(self) -> set[Any]:
        self._flush()
        out = {k for (k, _ts) in self.live}
        if self.on_disk:
            out |= {decode_key(k) for _ts, _seq, k, _h in self.spill.store().timer_rows(self.kind)}
        return out

    def load(self, entries: list[tuple[int, int, Any, int | None]]) -> None:
        self.clear()
        entries = sorted((int(ts), int(seq), key, h) for ts, seq, key, h in entries)
        if len(entries) > self.max_memory:
            keep = self.max_memory // 2
            self._to_disk(entries[keep:])
            entries = entries[:keep]
        self._set_heap(entries)

    def clear(self) -> None:
        if self.on_disk:
            self.spill.store().clear_timers(self.kind)
        self.heap, self.live, self.pending = [], {}, {}
        self.bound, self.on_disk = None, 0

    def memory_bytes(self) -> int:
        return (len(self.heap) + len(self.pending)) * TIMER_BYTES

    def reserved_bytes(self) -> int:
        # a queue with timers on disk may read a batch back at any time: count its cap
        if self.bound is not None:
            return (max(len(self.heap), self.max_memory) + self.PENDING) * TIMER_BYTES
        return len(self.heap) * TIMER_BYTES

    def __len__(self) -> int:
        self._flush()  # pending timers may duplicate ones on disk
        return len(self.live) + self.on_disk


class TimerService:
    """Event-time and processing-time timers of the current key (deduplicated per key and time).

    Each queue keeps its earliest timers in memory, at most ``memory_limit / 4`` bytes'
    worth (``configure``); later ones wait on disk in the operator's ``SpillArea``.
    """

    def __init__(self, clock: Clock | None = None, spill: SpillArea | None = None,
                 key_source: KeyedStateStore | None = None) -> None:
        self.clock = clock or WallClock()
        self._key: Any = None
        self._hash: int | None = None
        #: whose current key (and hash) timers are registered for: a store's, or our own
        self._src: Any = key_source if key_source is not None else self
        self.watermark = MIN_TIME
        self._spill = spill if spill is not None else SpillArea()
        self._event = _TimerQueue(_EVENT, self._spill)
        self._proc = _TimerQueue(_PROCESSING, self._spill)
        self._seq = 0

    def configure(self, memory_limit: int) -> None:
        """Let the timers take at most half of ``memory_limit`` bytes in memory."""
        per_queue = max(0, int(memory_limit) // 4 // TIMER_BYTES)
        for q in (self._event, self._proc):
            q.max_memory = per_queue
            if len(q.heap) > per_queue:
                q._spill()

    @property
    def current_key(self) -> Any:
        """The key timers are registered for."""
        return self._src._key

    @current_key.setter
    def current_key(self, key: Any) -> None:
        self.set_current_key(key)

    def set_current_key(self, key: Any, key_hash: int | None = None) -> None:
        """Scope registrations to ``key`` (``key_hash``: its key-group hash, when known)."""
        if self._src is self:
            self._key = key
            self._hash = key_hash
        else:
            self._src.set_current_key(key, key_hash)

    # user-facing (scoped to the current key)
    def register_event_time_timer(self, timestamp: int) -> None:
        """Call ``on_timer`` once the watermark reaches ``timestamp`` (µs)."""
        src = self._src
        self._seq += 1
        self._event.add(src._key, _as_time(timestamp), self._seq, src._hash)

    def delete_event_time_timer(self, timestamp: int) -> None:
        """Cancel the current key's event-time timer at ``timestamp`` (no error when absent)."""
        self._event.remove(self._src._key, _as_time(timestamp))

    def register_processing_time_timer(self, timestamp: int) -> None:
        """Call ``on_timer`` once the clock reaches ``timestamp`` (µs)."""
        src = self._src
        self._seq += 1
        self._proc.add(src._key, _as_time(timestamp), self._seq, src._hash)

    def delete_processing_time_timer(self, timestamp: int) -> None:
        """Cancel the current key's processing-time timer at ``timestamp``."""
        self._proc.remove(self._src._key, _as_time(timestamp))

    def current_processing_time(self) -> int:
        """The clock's time (µs)."""
        return self.clock.now()

    def current_watermark(self) -> int:
        """The operator's current watermark (µs)."""
        return self.watermark

    # operator-facing
    def pop_event_timer(self, watermark: int) -> tuple[int, Any] | None:
        """The earliest event-time timer with timestamp <= watermark, removed; None if none."""
        due = self._event.pop_due(watermark)
        return None if due is None else (due[0], due[1])

    def pop_processing_timer(self, now: int) -> tuple[int, Any] | None:
        """The earliest processing-time timer with timestamp <= now, removed; None if none."""
        due = self._proc.pop_due(now)
        return None if due is None else (due[0], due[1])

    def pop_due_event(self, watermark: int) -> tuple[int, Any, int | None] | None:
        """Like ``pop_event_timer``, with the key's hash: (timestamp, key, hash)."""
        return self._event.pop_due(watermark)

    def pop_due_processing(self, now: int) -> tuple[int, Any, int | None] | None:
        """Like ``pop_processing_timer``, with the key's hash: (timestamp, key, hash)."""
        return self._proc.pop_due(now)

    def num_event_timers(self) -> int:
        """Pending event-time timers."""
        return len(self._event)

    def num_processing_timers(self) -> int:
        """Pending processing-time timers."""
        return len(self._proc)

    def memory_bytes(self) -> int:
        """Estimated bytes of the timers held in memory."""
        return self._event.memory_bytes() + self._proc.memory_bytes()

    def reserved_bytes(self) -> int:
        """Bytes to set aside for timers: what they hold, or their cap once they spilled."""
        return self._event.reserved_bytes() + self._proc.reserved_bytes()

    def num_spilled_timers(self) -> int:
        """Timers waiting on disk (or about to be written there)."""
        return (self._event.on_disk + len(self._event.pending) + self._proc.on_disk
                + len(self._proc.pending))

    def snapshot(self) -> dict[str, Any]:
        """Pending timers (on disk too) and the watermark (picklable)."""
        return {"version": 2, "event": self._event.entries(), "processing": self._proc.entries(),
                "seq": self._seq, "watermark": self.watermark}

    def restore(self, snapshot: dict[str, Any],
                key_hashes: dict[Any, int] | None = None) -> None:
        """Replace the timers with a ``snapshot()`` (``key_hashes``: hashes for version 1)."""
        self._event.load(_with_hashes(snapshot["event"], key_hashes))
        self._proc.load(_with_hashes(snapshot["processing"], key_hashes))
        self._seq = snapshot["seq"]
        self.watermark = snapshot["watermark"]

    def timer_keys(self) -> set[Any]:
        """Every key with a pending timer."""
        return self._event.keys() | self._proc.keys()

    def snapshot_groups(self, key_groups: int) -> dict[int, dict[str, Any]]:
        """``snapshot()`` split by key group (hash mod ``key_groups``): one per group with timers."""
        out: dict[int, dict[str, Any]] = {}
        computed: dict[Any, int] = {}
        for kind, queue in (("event", self._event), ("processing", self._proc)):
            for entry in queue.entries():
                h = entry[3]
                if h is None:
                    h = computed.get(entry[2])
                    if h is None:
                        h = computed[entry[2]] = python_key_hash(entry[2])
                    entry = (*entry[:3], h)
                snap = out.setdefault(h % key_groups, {
                    "version": 2, "event": [], "processing": [], "seq": self._seq,
                    "watermark": self.watermark})
                snap[kind].append(entry)
        return out

    def restore_many(self, snapshots: list[dict[str, Any]], watermark: int = MIN_TIME,
                     key_hashes: dict[Any, int] | None = None) -> None:
        """Replace the timers with the union of several snapshots (of disjoint keys)."""
        self._event.load([e for s in snapshots for e in _with_hashes(s["event"], key_hashes)])
        self._proc.load([e for s in snapshots
                         for e in _with_hashes(s["processing"], key_hashes)])
        self._seq = max([self._seq, *(s["seq"] for s in snapshots)])
        self.watermark = max([watermark, *(s["watermark"] for s in snapshots)])

    def close(self) -> None:
        """Forget all timers (the operator deletes the spill file)."""
        for q in (self._event, self._proc):
            q.heap, q.live, q.pending, q.bound, q.on_disk = [], {}, {}, None, 0


def _with_hashes(entries: list[tuple[Any, ...]],
                 key_hashes: dict[Any, int] | None) -> list[tuple[int, int, Any, int | None]]:
    """Timer entries as (ts, seq, key, hash); version-1 entries (ts, seq, key) get ``key_hashes``."""
    hashes = key_hashes or {}
    return [e if len(e) == 4 else (e[0], e[1], e[2], hashes.get(e[2])) for e in entries]


def _as_time(ts: Any) -> int:
    if isinstance(ts, np.integer):
        return int(ts)
    if isinstance(ts, bool) or not isinstance(ts, int):
        raise PlanError(f"timer timestamps are int microseconds since the epoch, got "
                        f"{type(ts).__name__} {ts!r}")
    return ts
