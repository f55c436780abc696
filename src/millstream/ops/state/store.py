"""The keyed state of one operator instance: in memory up to a limit, then spilled to disk.

``KeyedStateStore`` holds the state in one Python dict keyed by ``(state name, key)``; the
handles (``ops.state.handles``) read and write the entry of the store's *current key*.
Beyond its memory limit, the least recently used keys' state moves to a local sqlite
file (``ops.state.spill_store``) and comes back when its key is processed again. The
store snapshots to picklable values (spilled state included, whole or split by key
group) and restores in place, so handles stay valid across a restore.
"""

from __future__ import annotations

import itertools
import pickle
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import cloudpickle
import pyarrow as pa

from millstream.core.context import TaskContext
from millstream.core.keygroups import python_key_hash
from millstream.errors import PlanError
from millstream.ops.state.descriptors import StateDescriptor
from millstream.ops.state.handles import MISSING, ListState, MapState, ValueState
from millstream.ops.state.spill_store import (
    SpillArea,
    StateRow,
    StateSpillStore,
    decode_key,
    deep_size,
    dump_value,
    encode_key,
)

#: Elements (or timers) between two ``maintain()`` calls of an operator.
CHECK_EVERY = 128
#: ``maintain()`` calls between two samples of the size of one key's state.
_SAMPLE_EVERY = 2
#: Estimated bytes of one (state name, key) entry before its first size sample.
_INITIAL_ENTRY_BYTES = 256
#: Bytes a (state name, key) entry costs beyond its value: the tuple and the dict slot.
_ENTRY_OVERHEAD = 120
#: Bytes a key in memory costs beyond its entries: its slot in the LRU order and its hash.
_KEY_OVERHEAD = 100
#: When over the limit, spill down to this fraction of it (so spills come in batches).
_SPILL_TO = 0.8


def default_state_memory_limit(ctx: TaskContext | None) -> int:
    """Bytes of keyed state an operator keeps in memory: half the task's memory budget."""
    return (ctx.memory_budget if ctx is not None else TaskContext.memory_budget) // 2


class KeyedStateStore:
    """All keyed state of one operator instance, in memory up to a limit, then on disk.

    In memory: one dict ``{(state name, key): value}`` (the handles' fast path) and the
    keys in memory, each with its key-group hash (in least-recently-used order once
    something spilled). The size is estimated cheaply: entry count times the average
    entry size, sampled every other ``maintain()`` by measuring the current key's values
    (``deep_size``), plus fixed per-entry and per-key overheads. ``maintain()`` (the
    operator calls it every ``CHECK_EVERY`` elements) compares the estimate plus
    ``reserved()`` (the timers' bytes) with ``memory_limit``; when over, the least recently
    used keys move to the operator's ``SpillArea`` (a sqlite file, see
    ``ops.state.spill_store``), one pickled row per key, until the estimate is back at 80%
    of the limit. While something is on disk, every key switch keeps the LRU order, checks
    the limit, and moves a key's row back from disk when its key is not in memory; once the
    disk holds nothing, the fast path returns. A key is in memory or on disk, never both;
    snapshots include both. (So a key's values come back from disk as copies: keep no
    reference to one key's state objects while processing another key.)
    """

    def __init__(self, memory_limit: int | None = None, spill: SpillArea | None = None) -> None:
        self._data: dict[tuple[str, Any], Any] = {}
        self._kinds: dict[str, str] = {}
        #: keys whose state is in memory -> key-group hash (None: unknown); LRU order
        self._resident: dict[Any, int | None] = {}
        self._key: Any = None
        self._hash: int | None = None
        self._spill = spill if spill is not None else SpillArea()
        #: the database while some key's state is on disk, else None (the fast path)
        self._disk: StateSpillStore | None = None
        self._disk_keys = 0
        self.memory_limit = (int(memory_limit) if memory_limit is not None
                             else default_state_memory_limit(None))
        self._reserved: Callable[[], int] | None = None
        self._reserved_bytes = 0
        self._entry_bytes = float(_INITIAL_ENTRY_BYTES)
        self._samples = 0
        self._sample_due = 1
        #: the largest estimate seen at a check (bytes, including ``reserved()``)
        self.peak_memory_bytes = 0
        #: keys moved to disk / read back, over the store's life
        self.spilled_keys = 0
        self.loaded_keys = 0

    def configure(self, memory_limit: int | None = None,
                  reserved: Callable[[], int] | None = None) -> None:
        """Set the memory limit (bytes) and what else counts against it (``reserved()``)."""
        if memory_limit is not None:
            if memory_limit < 0:
                raise PlanError(f"state memory limit must be >= 0 bytes, got {memory_limit}")
            self.memory_limit = int(memory_limit)
        if reserved is not None:
            self._reserved = reserved

    @property
    def current_key(self) -> Any:
        """The key every handle is scoped to."""
        return self._key

    @current_key.setter
    def current_key(self, key: Any) -> None:
        self.set_current_key(key)

    def set_current_key(self, key: Any, key_hash: int | None = None) -> None:
        """Scope every handle to ``key`` until the next call (``key_hash``: its key-group hash)."""
        self._key = key
        self._hash = key_hash
        if self._disk is None:
            self._resident[key] = key_hash
        else:
            self._switch(key)

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
        """Keys that currently hold state ``name`` (in memory or on disk)."""
        out = [k for (n, k) in self._data if n == name]
        if self._disk is not None:
            out += [decode_key(k) for k, _h, _n, v in self._disk.state_rows()
                    if name in pickle.loads(v)]
        return out

    def clear_key(self, key: Any) -> None:
        """Drop every state of ``key``."""
        for name in self._kinds:
            self._data.pop((name, key), None)
        if not (key is self._key or key == self._key):  # the current key stays registered
            self._resident.pop(key, None)
        if self._disk is not None and self._disk.delete_state(encode_key(key)):
            self._disk_keys -= 1
            if self._disk_keys == 0:
                self._disk = None

    def __len__(self) -> int:
        n = len(self._data)
        if self._disk is not None:
            n += self._disk.num_state_entries()
        return n

    # raw access used by the handles (the fast path: one dict operation)
    def _get(self, name: str, default: Any = MISSING) -> Any:
        return self._data.get((name, self._key), default)

    def _set(self, name: str, value: Any) -> None:
        self._data[(name, self._key)] = value  # set_current_key registered the key

    def _del(self, name: str) -> None:
        self._data.pop((name, self._key), None)

    # ----------------------------------------------------------------- memory and disk

    def memory_bytes(self) -> int:
        """Estimated bytes of the state held in memory."""
        return int(len(self._data) * self._entry_bytes + len(self._resident) * _KEY_OVERHEAD)

    @property
    def spilled(self) -> bool:
        """True while some key's state is on disk."""
        return self._disk is not None

    def num_spilled_keys(self) -> int:
        """Keys whose state is on disk."""
        return self._disk_keys if self._disk is not None else 0

    def maintain(self) -> None:
        """Check the memory estimate against the limit (spilling when over); sample sizes."""
        self._sample_due -= 1
        if self._sample_due <= 0:
            self._sample_due = _SAMPLE_EVERY
            self._sample(self._key)
        self._reserved_bytes = self._reserved() if self._reserved is not None else 0
        self._enforce()

    def _switch(self, key: Any) -> None:
        """``set_current_key`` while something is on disk: LRU order, load, limit check."""
        resident = self._resident
        h = resident.pop(key, MISSING)
        if h is MISSING:
            self._load(key)
            if key not in resident:
                resident[key] = self._hash
        else:  # most recently used
            resident[key] = self._hash if self._hash is not None else h
        self._enforce()

    def _sample(self, key: Any) -> None:
        """Measure the state of ``key``; fold it into the average entry size."""
        data = self._data
        n = size = 0
        for name in self._kinds:
            v = data.get((name, key), MISSING)
            if v is not MISSING:
                n += 1
                size += deep_size(v)
        if n:
            self._fold_sample(size / n + _ENTRY_OVERHEAD)

    def _fold_sample(self, entry_bytes: float) -> None:
        self._samples += 1
        weight = max(1.0 / self._samples, 1.0 / 32)
        self._entry_bytes += (entry_bytes - self._entry_bytes) * weight

    def _resample(self, count: int = 32) -> None:
        """Re-estimate the entry size from the first ``count`` entries (after a restore)."""
        sizes = [deep_size(v) for v in itertools.islice(self._data.values(), count)]
        if sizes:
            self._samples = 0
            self._entry_bytes = float(_INITIAL_ENTRY_BYTES)
            for s in sizes:
                self._fold_sample(s + _ENTRY_OVERHEAD)

    def _enforce(self) -> None:
        """Spill least recently used keys while the estimate is over the limit."""
        total = (len(self._data) * self._entry_bytes + len(self._resident) * _KEY_OVERHEAD
                 + self._reserved_bytes)
        if total > self.peak_memory_bytes:
            self.peak_memory_bytes = int(total)
        if total > self.memory_limit and self._resident:
            self._evict(total - self.memory_limit * _SPILL_TO)

    def _evict(self, nbytes: float) -> None:
        """Move at least ``nbytes`` (estimated) of the least recently used keys to disk."""
        resident = self._resident
        data = self._data
        per_key = len(data) * self._entry_bytes / len(resident) + _KEY_OVERHEAD
        count = min(len(resident), int(nbytes / per_key) + 1)
        names = list(self._kinds)
        rows: list[StateRow] = []
        current = self._key
        # the current key stays: its handles may be in use (it is the most recent anyway)
        victims = [k for k in itertools.islice(resident, count + 1)
                   if not (k is current or k == current)][:count]
        for key in victims:
            entries = {}
            for name in names:
                v = data.get((name, key), MISSING)
                if v is not MISSING:
                    entries[name] = v
            if entries:
                rows.append((encode_key(key), resident[key], len(entries),
                             dump_value(entries, f"keyed state of key {key!r}")))
        if rows:
            if self._disk is None:
                self._disk = self._spill.store()
            self._disk.put_states(rows)
            self._disk_keys += len(rows)
            self.spilled_keys += len(rows)
            self._spill.count_spill()
        for key in victims:  # only now that they are safely on disk
            del resident[key]
            for name in names:
                data.pop((name, key), None)

    def _load(self, key: Any) -> None:
        """Move ``key``'s state from disk into memory (nothing when it has none there)."""
        row = self._disk.take_state(encode_key(key))
        if row is None:
            return
        h, blob = row
        data = self._data
        for name, v in pickle.loads(blob).items():
            data[(name, key)] = v
        self._resident[key] = self._hash if self._hash is not None else h
        self.loaded_keys += 1
        self._disk_keys -= 1
        if self._disk_keys == 0:
            self._disk = None

    def _live_hashes(self) -> tuple[dict[Any, int | None], set[Any]]:
        """(hashes of the keys in memory, the keys holding state); forgets keys whose state
        was cleared, but the current one."""
        live = {k for (_n, k) in self._data}
        if len(live) < len(self._resident):
            current = self._key
            self._resident = {k: h for k, h in self._resident.items()
                              if k in live or k is current or k == current}
        return self._resident, live

    def _reset(self) -> None:
        self._data = {}
        self._resident = {}
        if self._disk is not None:
            self._disk.clear_states()
            self._disk = None
        self._disk_keys = 0

    def close(self) -> None:
        """Forget all state (the operator deletes the spill file)."""
        self._data = {}
        self._resident = {}
        self._disk = None
        self._disk_keys = 0

    # ----------------------------------------------------------------- snapshots

    def snapshot(self) -> dict[str, Any]:
        """A deep, picklable copy of the whole store, spilled keys included."""
        hashes, live = self._live_hashes()
        return {"version": 2, "data": _dump_entries(self._data), "kinds": dict(self._kinds),
                "hashes": {k: h for k, h in hashes.items() if k in live},
                "spilled": list(self._disk.state_rows()) if self._disk is not None else []}

    def restore(self, snapshot: dict[str, Any],
                key_hashes: dict[Any, int] | None = None) -> None:
        """Replace the contents with a ``snapshot()`` (in place: handles stay valid).

        ``key_hashes`` gives key-group hashes for snapshots of version 1 (which hold none).
        """
        self.restore_many([snapshot], key_hashes)

    def state_keys(self) -> set[Any]:
        """Every key that holds some state."""
        keys = {k for (_n, k) in self._data}
        if self._disk is not None:
            keys |= {decode_key(k) for k, _h, _n, _v in self._disk.state_rows()}
        return keys

    def snapshot_groups(self, key_groups: int) -> dict[int, dict[str, Any]]:
        """``snapshot()`` split by key group (hash mod ``key_groups``): one per group with state."""
        spilled: dict[int, list[StateRow]] = {}
        if self._disk is not None:
            for row in self._disk.state_rows():
                g, row = self._spilled_group(row, key_groups)
                spilled.setdefault(g, []).append(row)
        parts, hashes = self._resident_groups(key_groups)
        return {g: self._group_snapshot(parts.get(g, {}), hashes,
                                        _rows_table(spilled[g]) if g in spilled else [])
                for g in sorted(set(parts) | set(spilled))}

    def iter_snapshot_groups(self, key_groups: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """``snapshot_groups`` one group at a time, in group order: the spilled rows are
        first split by group into files on disk (a chunk of rows at a time), so memory
        holds the resident state (bounded by the limit) and one group's spilled rows."""
        if self._disk is None:
            yield from sorted(self.snapshot_groups(key_groups).items())
            return
        from millstream.core.spill import GroupFiles

        ctx = self._spill.ctx if self._spill.ctx is not None else TaskContext()
        with GroupFiles(ctx, "snapshot-state-group") as files:
            chunk: dict[int, list[StateRow]] = {}
            n = 0
            for row in self._disk.state_rows():
                g, row = self._spilled_group(row, key_groups)
                chunk.setdefault(g, []).append(row)
                n += 1
                if n >= 10_000:
                    for cg, rows in chunk.items():
                        files.put(cg, _rows_table(rows))
                    chunk, n = {}, 0
            for cg, rows in chunk.items():
                files.put(cg, _rows_table(rows))
            parts, hashes = self._resident_groups(key_groups)
            for g in sorted(set(parts) | set(files.groups())):
                spilled = files.take(g)  # key order, as _rows_table gives:
                yield g, self._group_snapshot(parts.get(g, {}), hashes,
                                              [] if spilled is None else spilled.sort_by("k"))

    @staticmethod
    def _spilled_group(row: StateRow, key_groups: int) -> tuple[int, StateRow]:
        k, h, n, v = row
        if h is None:
            h = python_key_hash(decode_key(k))
        return h % key_groups, (k, h, n, v)

    def _resident_groups(self, key_groups: int
                         ) -> tuple[dict[int, dict[tuple[str, Any], Any]], dict[Any, int | None]]:
        """The state in memory by key group, and the keys' hashes."""
        hashes, _live = self._live_hashes()
        group: dict[Any, int] = {}
        parts: dict[int, dict[tuple[str, Any], Any]] = {}
        for entry, value in self._data.items():
            key = entry[1]
            g = group.get(key)
            if g is None:
                h = hashes.get(key)
                if h is None:
                    h = hashes[key] = python_key_hash(key)
                g = group[key] = h % key_groups
            parts.setdefault(g, {})[entry] = value
        return parts, hashes

    def _group_snapshot(self, data: dict[tuple[str, Any], Any], hashes: dict[Any, int | None],
                        spilled: Any) -> dict[str, Any]:
        return {"version": 2, "data": _dump_entries(data), "kinds": dict(self._kinds),
                "hashes": {k: hashes[k] for k in {e[1] for e in data}}, "spilled": spilled}

    def restore_many(self, snapshots: Iterable[dict[str, Any]],
                     key_hashes: dict[Any, int] | None = None) -> None:
        """Replace the contents with the union of several snapshots (of disjoint keys).

        Spilled rows go straight back to disk; the rest is loaded, then spilled as needed.
        """
        self._reset()
        for snap in snapshots:  # (an iterator works: one snapshot in memory at a time)
            data = cloudpickle.loads(snap["data"])
            self._kinds.update(snap["kinds"])
            hashes = snap.get("hashes") or key_hashes or {}
            resident = self._resident
            for (_n, k) in data:
                if k not in resident:
                    resident[k] = hashes.get(k)
            self._data.update(data)
            rows = snap.get("spilled")
            if isinstance(rows, pa.Table):
                rows = _table_rows(rows)
            if rows:
                if self._disk is None:
                    self._disk = self._spill.store()
                self._disk.put_states(rows)
                self._disk_keys += len(rows)
            if data:
                self._resample()
                self._enforce()
        # the current key is registered (and read back from disk if it is there)
        self.set_current_key(self._key, self._hash)


def _rows_table(rows: list[StateRow]) -> pa.Table:
    """Spilled state rows as one Arrow table, in key order: a key group's spilled state
    then travels as a checkpoint blob the task writes itself (not as many small Python
    values through the driver), and unchanged groups give the same bytes."""
    rows = sorted(rows, key=lambda r: r[0])
    return pa.table({"k": pa.array([r[0] for r in rows], pa.binary()),
                     "h": pa.array([r[1] for r in rows], pa.uint64()),
                     "n": pa.array([r[2] for r in rows], pa.int64()),
                     "v": pa.array([r[3] for r in rows], pa.binary())})


def _table_rows(table: pa.Table) -> list[StateRow]:
    """The rows of :func:`_rows_table`."""
    cols = [table.column(c).to_pylist() for c in ("k", "h", "n", "v")]
    return list(zip(*cols))


def _dump_entries(data: dict[tuple[str, Any], Any]) -> bytes:
    try:
        return cloudpickle.dumps(data)
    except Exception as exc:
        bad = next((name for (name, _k), v in data.items() if not _picklable(v)), "?")
        raise PlanError(f"keyed state {bad!r} holds a value that cannot be pickled for a "
                        f"checkpoint: {exc}") from exc


def _picklable(v: Any) -> bool:
    try:
        cloudpickle.dumps(v)
        return True
    except Exception:
        return False
