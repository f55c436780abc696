"""Keyed state for user process functions, and timers.

``KeyedStateStore`` holds every state of one operator instance in one Python dict keyed
by ``(state name, key)``; the ``ValueState``, ``ListState`` and ``MapState`` handles read
and write the entry of the store's *current key*, which the operator sets before calling
user code (so a handle taken in ``open()`` follows the key of each element, as in Flink).

``TimerService`` keeps event-time timers (fire when the watermark reaches their
timestamp) and processing-time timers (fire when the clock reaches it), at most one per
(key, timestamp) and kind. The clock is injectable: ``WallClock`` by default,
``VirtualClock`` in tests. Store and timers snapshot to picklable values and restore in
place, so handles stay valid across a restore.
"""

from __future__ import annotations

import copy
import heapq
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import cloudpickle
import numpy as np

from millstream.errors import PlanError

#: Watermark before any was seen / after the end of a bounded input (int64 microseconds).
MIN_TIME = -(2**63)
MAX_TIME = 2**63 - 1

_MISSING = object()

#: Key groups of a streaming job unless ``start(key_groups=...)`` says otherwise.
DEFAULT_KEY_GROUPS = 128


# --------------------------------------------------------------------------- key groups


def key_hashes(columns: list[Any], num_rows: int) -> np.ndarray:
    """The key-group hash (uint64) of every row's key columns, the same in every process."""
    from millstream.runtime.hashing import hash_columns

    return hash_columns(columns, num_rows)


def key_group_owners(key_groups: int, parallelism: int) -> np.ndarray:
    """Partition index owning each key group: ``g * parallelism // key_groups`` (contiguous)."""
    return (np.arange(key_groups, dtype=np.int64) * parallelism) // key_groups


def owned_key_groups(index: int, parallelism: int, key_groups: int) -> range:
    """The key groups partition ``index`` of ``parallelism`` owns."""
    return range((index * key_groups + parallelism - 1) // parallelism,
                 ((index + 1) * key_groups + parallelism - 1) // parallelism)


def python_key_hash(key: Any) -> int:
    """Key-group hash of a Python key value (fallback when the key's Arrow row was not seen)."""
    import pyarrow as pa

    values = list(key) if isinstance(key, tuple) else [key]
    return int(key_hashes([pa.array([v]) for v in values], 1)[0])


# --------------------------------------------------------------------------- clocks


class Clock:
    """Source of processing time in int64 microseconds since the epoch."""

    def now(self) -> int:
        """Current processing time (µs)."""
        raise NotImplementedError


class WallClock(Clock):
    """The machine's real-time clock."""

    def now(self) -> int:
        return time.time_ns() // 1000


class VirtualClock(Clock):
    """A clock that only moves when told to (tests, replays)."""

    def __init__(self, start: int = 0) -> None:
        self._now = int(start)

    def now(self) -> int:
        return self._now

    def advance(self, micros: int) -> int:
        """Move forward by ``micros`` (>= 0); returns the new time."""
        if micros < 0:
            raise ValueError(f"VirtualClock.advance: cannot go back in time ({micros} µs)")
        self._now += int(micros)
        return self._now

    def set(self, micros: int) -> int:
        """Jump to ``micros`` (not before the current time); returns it."""
        if micros < self._now:
            raise ValueError(f"VirtualClock.set: {micros} is before the current time {self._now}")
        self._now = int(micros)
        return self._now


# --------------------------------------------------------------------------- descriptors


class StateDescriptor:
    """Names a piece of keyed state and its kind ("value", "list" or "map")."""

    kind = "value"

    def __init__(self, name: str, default: Any = None) -> None:
        if not isinstance(name, str) or not name:
            raise PlanError(f"state name must be a non-empty string, got {name!r}")
        self.name = name
        self.default = default

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class ValueStateDescriptor(StateDescriptor):
    """A single value per key (``default`` when unset)."""

    kind = "value"


class ListStateDescriptor(StateDescriptor):
    """A list of values per key."""

    kind = "list"

    def __init__(self, name: str) -> None:
        super().__init__(name)


class MapStateDescriptor(StateDescriptor):
    """A dict per key."""

    kind = "map"

    def __init__(self, name: str) -> None:
        super().__init__(name)


# --------------------------------------------------------------------------- store and handles


class KeyedStateStore:
    """All keyed state of one operator instance: ``{(state name, key): value}``."""

    def __init__(self) -> None:
        self._data: dict[tuple[str, Any], Any] = {}
        self._kinds: dict[str, str] = {}
        self.current_key: Any = None

    def set_current_key(self, key: Any) -> None:
        """Scope every handle to ``key`` until the next call."""
        self.current_key = key

    def _register(self, name: str, kind: str) -> None:
        have = self._kinds.setdefault(name, kind)
        if have != kind:
            raise PlanError(f"state {name!r} is a {have} state; it cannot also be used as a "
                            f"{kind} state")

    def get_state(self, descriptor: StateDescriptor) -> ValueState | ListState | MapState:
        """The handle a descriptor names."""
        if descriptor.kind == "value":
            return self.value_state(descriptor.name, descriptor.default)
        if descriptor.kind == "list":
            return self.list_state(descriptor.name)
        if descriptor.kind == "map":
            return self.map_state(descriptor.name)
        raise PlanError(f"unknown state kind {descriptor.kind!r} of {descriptor!r}")

    def value_state(self, name: str, default: Any = None) -> ValueState:
        """A ``ValueState`` handle named ``name``."""
        self._register(name, "value")
        return ValueState(self, name, default)

    def list_state(self, name: str) -> ListState:
        """A ``ListState`` handle named ``name``."""
        self._register(name, "list")
        return ListState(self, name)

    def map_state(self, name: str) -> MapState:
        """A ``MapState`` handle named ``name``."""
        self._register(name, "map")
        return MapState(self, name)

    def keys(self, name: str) -> list[Any]:
        """Keys that currently hold state ``name``."""
        return [k for (n, k) in self._data if n == name]

    def clear_key(self, key: Any) -> None:
        """Drop every state of ``key``."""
        for entry in [e for e in self._data if e[1] == key]:
            del self._data[entry]

    def __len__(self) -> int:
        return len(self._data)

    # raw access used by the handles
    def _get(self, name: str, default: Any = _MISSING) -> Any:
        return self._data.get((name, self.current_key), default)

    def _set(self, name: str, value: Any) -> None:
        self._data[(name, self.current_key)] = value

    def _del(self, name: str) -> None:
        self._data.pop((name, self.current_key), None)

    def snapshot(self) -> dict[str, Any]:
        """A deep, picklable copy of the whole store (entries serialized with cloudpickle)."""
        try:
            blob = cloudpickle.dumps(self._data)
        except Exception as exc:
            bad = next((name for (name, _k), v in self._data.items() if not _picklable(v)), "?")
            raise PlanError(f"keyed state {bad!r} holds a value that cannot be pickled for a "
                            f"checkpoint: {exc}") from exc
        return {"version": 1, "data": blob, "kinds": dict(self._kinds)}

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Replace the contents with a ``snapshot()`` (in place: handles stay valid)."""
        self._data = cloudpickle.loads(snapshot["data"])
        self._kinds.update(snapshot["kinds"])

    def state_keys(self) -> set[Any]:
        """Every key that holds some state."""
        return {k for (_n, k) in self._data}

    def snapshot_split(self, group_of: Callable[[Any], int]) -> dict[int, dict[str, Any]]:
        """``snapshot()`` split by ``group_of(key)``: one snapshot per group holding state."""
        parts: dict[int, dict[tuple[str, Any], Any]] = {}
        for entry, value in self._data.items():
            parts.setdefault(group_of(entry[1]), {})[entry] = value
        out = {}
        for g, data in parts.items():
            try:
                blob = cloudpickle.dumps(data)
            except Exception as exc:
                bad = next((n for (n, _k), v in data.items() if not _picklable(v)), "?")
                raise PlanError(f"keyed state {bad!r} holds a value that cannot be pickled for "
                                f"a checkpoint: {exc}") from exc
            out[g] = {"version": 1, "data": blob, "kinds": dict(self._kinds)}
        return out

    def restore_many(self, snapshots: list[dict[str, Any]]) -> None:
        """Replace the contents with the union of several snapshots (of disjoint keys)."""
        self._data = {}
        for snap in snapshots:
            self._data.update(cloudpickle.loads(snap["data"]))
            self._kinds.update(snap["kinds"])


def _picklable(v: Any) -> bool:
    try:
        cloudpickle.dumps(v)
        return True
    except Exception:
        return False


class ValueState:
    """One value for the current key."""

    def __init__(self, store: KeyedStateStore, name: str, default: Any = None) -> None:
        self._store = store
        self.name = name
        self.default = default

    def value(self) -> Any:
        """The value, or (a copy of) the default when unset."""
        v = self._store._get(self.name)
        return copy.deepcopy(self.default) if v is _MISSING else v

    get = value

    def update(self, value: Any) -> None:
        """Set the value (``None`` clears it)."""
        if value is None:
            self._store._del(self.name)
        else:
            self._store._set(self.name, value)

    set = update

    def clear(self) -> None:
        """Forget the value of the current key."""
        self._store._del(self.name)


class ListState:
    """A list of values for the current key."""

    def __init__(self, store: KeyedStateStore, name: str) -> None:
        self._store = store
        self.name = name

    def _list(self) -> list[Any]:
        return self._store._get(self.name, None) or []

    def get(self) -> list[Any]:
        """A copy of the list (empty when unset)."""
        return list(self._list())

    def __iter__(self) -> Iterator[Any]:
        return iter(self.get())

    def __len__(self) -> int:
        return len(self._list())

    def add(self, value: Any) -> None:
        """Append one value."""
        cur = self._store._get(self.name, None)
        if cur is None:
            self._store._set(self.name, [value])
        else:
            cur.append(value)

    def add_all(self, values: Iterable[Any]) -> None:
        """Append values."""
        values = list(values)
        if values:
            cur = self._store._get(self.name, None)
            if cur is None:
                self._store._set(self.name, values)
            else:
                cur.extend(values)

    def update(self, values: Iterable[Any]) -> None:
        """Replace the list (an empty one clears it)."""
        values = list(values)
        if values:
            self._store._set(self.name, values)
        else:
            self._store._del(self.name)

    def clear(self) -> None:
        """Forget the list of the current key."""
        self._store._del(self.name)


class MapState:
    """A dict for the current key."""

    def __init__(self, store: KeyedStateStore, name: str) -> None:
        self._store = store
        self.name = name

    def _map(self, create: bool = False) -> dict[Any, Any]:
        cur = self._store._get(self.name, None)
        if cur is None:
            cur = {}
            if create:
                self._store._set(self.name, cur)
        return cur

    def get(self, key: Any, default: Any = None) -> Any:
        """The value under ``key`` or ``default``."""
        return self._map().get(key, default)

    def put(self, key: Any, value: Any) -> None:
        """Set ``key`` to ``value``."""
        self._map(create=True)[key] = value

    def put_all(self, mapping: dict[Any, Any]) -> None:
        """Set several entries."""
        if mapping:
            self._map(create=True).update(mapping)

    def remove(self, key: Any) -> None:
        """Delete ``key`` (no error when absent)."""
        m = self._map()
        m.pop(key, None)
        if not m:
            self._store._del(self.name)

    def contains(self, key: Any) -> bool:
        """True when ``key`` is present."""
        return key in self._map()

    __contains__ = contains

    def keys(self) -> list[Any]:
        """The map's keys."""
        return list(self._map().keys())

    def values(self) -> list[Any]:
        """The map's values."""
        return list(self._map().values())

    def items(self) -> list[tuple[Any, Any]]:
        """The map's (key, value) pairs."""
        return list(self._map().items())

    def is_empty(self) -> bool:
        """True when the current key has no entries."""
        return not self._map()

    def __len__(self) -> int:
        return len(self._map())

    def __iter__(self) -> Iterator[Any]:
        return iter(self.keys())

    def clear(self) -> None:
        """Forget the map of the current key."""
        self._store._del(self.name)


# --------------------------------------------------------------------------- timers


class _TimerQueue:
    """A min-heap of (timestamp, seq, key) with lazy deletion; one timer per (key, timestamp)."""

    def __init__(self) -> None:
        self.heap: list[tuple[int, int, Any]] = []
        self.live: dict[tuple[Any, int], int] = {}

    def add(self, key: Any, ts: int, seq: int) -> bool:
        if (key, ts) in self.live:
            return False
        self.live[(key, ts)] = seq
        heapq.heappush(self.heap, (ts, seq, key))
        return True

    def remove(self, key: Any, ts: int) -> None:
        self.live.pop((key, ts), None)
        if len(self.heap) > 64 and len(self.heap) > 2 * len(self.live):
            self.heap = [e for e in self.heap if self.live.get((e[2], e[0])) == e[1]]
            heapq.heapify(self.heap)

    def pop_due(self, limit: int) -> tuple[int, Any] | None:
        while self.heap and self.heap[0][0] <= limit:
            ts, seq, key = heapq.heappop(self.heap)
            if self.live.get((key, ts)) == seq:
                del self.live[(key, ts)]
                return ts, key
        return None

    def entries(self) -> list[tuple[int, int, Any]]:
        return sorted((ts, seq, key) for (key, ts), seq in self.live.items())

    def load(self, entries: list[tuple[int, int, Any]]) -> None:
        self.heap = [(int(ts), int(seq), key) for ts, seq, key in entries]
        heapq.heapify(self.heap)
        self.live = {(key, ts): seq for ts, seq, key in self.heap}

    def __len__(self) -> int:
        return len(self.live)


class TimerService:
    """Event-time and processing-time timers of the current key (deduplicated per key and time)."""

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock = clock or WallClock()
        self.current_key: Any = None
        self.watermark = MIN_TIME
        self._event = _TimerQueue()
        self._proc = _TimerQueue()
        self._seq = 0

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    # user-facing (scoped to the current key)
    def register_event_time_timer(self, timestamp: int) -> None:
        """Call ``on_timer`` once the watermark reaches ``timestamp`` (µs)."""
        self._event.add(self.current_key, _as_time(timestamp), self._next())

    def delete_event_time_timer(self, timestamp: int) -> None:
        """Cancel the current key's event-time timer at ``timestamp`` (no error when absent)."""
        self._event.remove(self.current_key, _as_time(timestamp))

    def register_processing_time_timer(self, timestamp: int) -> None:
        """Call ``on_timer`` once the clock reaches ``timestamp`` (µs)."""
        self._proc.add(self.current_key, _as_time(timestamp), self._next())

    def delete_processing_time_timer(self, timestamp: int) -> None:
        """Cancel the current key's processing-time timer at ``timestamp``."""
        self._proc.remove(self.current_key, _as_time(timestamp))

    def current_processing_time(self) -> int:
        """The clock's time (µs)."""
        return self.clock.now()

    def current_watermark(self) -> int:
        """The operator's current watermark (µs)."""
        return self.watermark

    # operator-facing
    def pop_event_timer(self, watermark: int) -> tuple[int, Any] | None:
        """The earliest event-time timer with timestamp <= watermark, removed; None if none."""
        return self._event.pop_due(watermark)

    def pop_processing_timer(self, now: int) -> tuple[int, Any] | None:
        """The earliest processing-time timer with timestamp <= now, removed; None if none."""
        return self._proc.pop_due(now)

    def num_event_timers(self) -> int:
        """Pending event-time timers."""
        return len(self._event)

    def num_processing_timers(self) -> int:
        """Pending processing-time timers."""
        return len(self._proc)

    def snapshot(self) -> dict[str, Any]:
        """Pending timers and the watermark (picklable)."""
        return {"version": 1, "event": self._event.entries(), "processing": self._proc.entries(),
                "seq": self._seq, "watermark": self.watermark}

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Replace the timers with a ``snapshot()``."""
        self._event.load(snapshot["event"])
        self._proc.load(snapshot["processing"])
        self._seq = snapshot["seq"]
        self.watermark = snapshot["watermark"]

    def timer_keys(self) -> set[Any]:
        """Every key with a pending timer."""
        return {k for (k, _ts) in self._event.live} | {k for (k, _ts) in self._proc.live}

    def snapshot_split(self, group_of: Callable[[Any], int]) -> dict[int, dict[str, Any]]:
        """``snapshot()`` split by ``group_of(key)``: one snapshot per group with timers."""
        out: dict[int, dict[str, Any]] = {}
        for kind, queue in (("event", self._event), ("processing", self._proc)):
            for entry in queue.entries():
                g = group_of(entry[2])
                snap = out.setdefault(g, {"version": 1, "event": [], "processing": [],
                                          "seq": self._seq, "watermark": self.watermark})
                snap[kind].append(entry)
        return out

    def restore_many(self, snapshots: list[dict[str, Any]], watermark: int = MIN_TIME) -> None:
        """Replace the timers with the union of several snapshots (of disjoint keys)."""
        self._event.load([e for s in snapshots for e in s["event"]])
        self._proc.load([e for s in snapshots for e in s["processing"]])
        self._seq = max([self._seq, *(s["seq"] for s in snapshots)])
        self.watermark = max([watermark, *(s["watermark"] for s in snapshots)])


def _as_time(ts: Any) -> int:
    if isinstance(ts, np.integer):
        return int(ts)
    if isinstance(ts, bool) or not isinstance(ts, int):
        raise PlanError(f"timer timestamps are int microseconds since the epoch, got "
                        f"{type(ts).__name__} {ts!r}")
    return ts
