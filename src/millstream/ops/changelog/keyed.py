"""What the changelog operators (aggregate, deduplication, top-N) share: keyed state that
spills, timers, checkpoints split by key group, and batches grouped by key.

:class:`KeyedChangeOperator` keeps its state in a
:class:`~millstream.ops.state.store.KeyedStateStore` (least recently used keys spill to
a sqlite file beyond ``state_memory_limit``, default half the task's memory budget) and
its timers in a :class:`~millstream.ops.state.timers.TimerService`, both scoped to the
current key; snapshots are split by key group exactly as a keyed process function's, so
a job restores at another parallelism. :func:`group_rows` groups a batch's rows by key
(in arrival order within a key; keys in order of first appearance) with each key's
key-group hash (the hash the keyed exchange routes by); :func:`build_batch` turns Python
rows back into a batch, with change kinds.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from millstream.core.arrow import normalize_key, unify_schemas
from millstream.core.changelog import CHANGE, with_kinds, without_kinds
from millstream.core.keygroups import key_hashes
from millstream.core.time import MIN_TIME, Clock
from millstream.errors import PlanError, SchemaError
from millstream.ops.base import Batches, Operator
from millstream.ops.state.spill_store import SpillArea
from millstream.ops.state.store import KeyedStateStore, default_state_memory_limit
from millstream.ops.state.timers import TimerService

_EMPTY: tuple[pa.RecordBatch, ...] = ()


# --------------------------------------------------------------------------- batches by key


@dataclass
class KeyedRows:
    """A batch's rows grouped by key: group ``i`` has key ``keys[i]`` (a value for one key
    column, a tuple for several, ``()`` for none), key-group hash ``hashes[i]`` and rows
    ``rows[offsets[i]:offsets[i + 1]]`` (in arrival order); ``gids`` is each row's group."""

    keys: list[Any]
    hashes: list[int]
    offsets: np.ndarray
    rows: np.ndarray
    gids: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)

    def rows_of(self, i: int) -> np.ndarray:
        """The rows of group ``i``, in arrival order."""
        return self.rows[self.offsets[i]:self.offsets[i + 1]]


def _hashable(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, dict):
        return tuple((k, _hashable(x)) for k, x in v.items())
    return v


def _plain(t: pa.DataType) -> bool:
    """A key type whose values group as they hash (one column: dictionary encoding)."""
    return not (pa.types.is_floating(t) or pa.types.is_dictionary(t) or pa.types.is_nested(t)
                or pa.types.is_null(t))


def group_rows(batch: pa.RecordBatch, keys: list[str]) -> KeyedRows:
    """``batch``'s rows grouped by the ``keys`` columns (nulls are one key, as in grouping).

    Each key's key-group hash is that of its values in the batch (as the keyed exchange
    routes them), computed once per distinct key."""
    n = batch.num_rows
    if not keys:
        return KeyedRows([()], [0], np.array([0, n], dtype=np.int64),
                         np.arange(n, dtype=np.int64), np.zeros(n, dtype=np.int64))
    missing = [k for k in keys if k not in batch.schema.names]
    if missing:
        raise SchemaError(f"no key column(s) {missing}; columns are {batch.schema.names}")
    if len(keys) == 1 and _plain(batch.schema.field(keys[0]).type):
        enc = pc.dictionary_encode(batch.column(keys[0]), null_encoding="encode")
        gids = np.asarray(enc.indices, dtype=np.int64)
        key_list = enc.dictionary.to_pylist()
        hashes = key_hashes([enc.dictionary], len(enc.dictionary)).tolist()
    else:
        names = [f"__k{i}" for i in range(len(keys))]
        table = pa.table([*(normalize_key(batch.column(k)) for k in keys),
                          pa.array(np.arange(n, dtype=np.int64))], names=[*names, "__row"])
        grouped = table.group_by(names, use_threads=False).aggregate([("__row", "list")])
        lists = grouped.column("__row_list").combine_chunks()
        sizes = np.diff(np.asarray(lists.offsets, dtype=np.int64))
        gids = np.empty(n, dtype=np.int64)
        gids[np.asarray(pc.list_flatten(lists), dtype=np.int64)] = np.repeat(
            np.arange(len(lists), dtype=np.int64), sizes)
        values = [grouped.column(name).to_pylist() for name in names]
        key_list = values[0] if len(keys) == 1 else list(zip(*values))
        first = pc.list_element(lists, 0)
        hashes = key_hashes([batch.column(k).take(first) for k in keys], len(lists)).tolist()
    if key_list and not _is_hashable(key_list[0]):
        key_list = [_hashable(k) for k in key_list]
    counts = np.bincount(gids, minlength=len(key_list))
    offsets = np.zeros(len(key_list) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    rows = np.argsort(gids, kind="stable").astype(np.int64)
    return KeyedRows(key_list, hashes, offsets, rows, gids)


def _is_hashable(v: Any) -> bool:
    try:
        hash(v)
        return True
    except TypeError:
        return False


def data_schema(batch: pa.RecordBatch | pa.Schema) -> pa.Schema:
    """The columns of a batch without its change kinds."""
    schema = batch if isinstance(batch, pa.Schema) else batch.schema
    i = schema.get_field_index(CHANGE)
    return schema if i < 0 else schema.remove(i)


def merge_schema(known: pa.Schema | None, batch: pa.RecordBatch) -> pa.Schema:
    """The data schema seen so far, widened by ``batch``'s (a null column then ints, ...)."""
    schema = data_schema(batch)
    if known is None or known.equals(schema):
        return schema
    return unify_schemas([known, schema])


def row_tuples(batch: pa.RecordBatch | pa.Table) -> list[tuple]:
    """The data rows of a batch as tuples of Python values (column order)."""
    data = without_kinds(batch)
    if data.num_rows == 0:
        return []
    return list(zip(*(c.to_pylist() for c in data.columns)))


def build_batch(schema: pa.Schema, rows: list[tuple], kinds: list[int] | None = None
                ) -> pa.RecordBatch:
    """A batch of ``schema`` from row tuples; with ``kinds``, their change kinds."""
    if rows:
        cols = list(zip(*rows))
        arrays = [pa.array(list(c), type=f.type) for f, c in zip(schema, cols)]
    else:
        arrays = [pa.array([], type=f.type) for f in schema]
    batch = pa.RecordBatch.from_arrays(arrays, schema=schema)
    return batch if kinds is None else with_kinds(batch, np.asarray(kinds, dtype=np.int8))


# --------------------------------------------------------------------------- operator


class KeyedChangeOperator(Operator):
    """Base of the changelog operators: keyed state (spilling), timers, snapshots by key
    group. Subclasses implement ``process`` and may add small operator-wide values to the
    snapshots (``_extra_state`` / ``_restore_extra``)."""

    #: what the snapshots are tagged with (a restore checks it)
    kind = "KeyedChange"

    def __init__(self, keys: list[str], name: str, state_memory_limit: int | None = None,
                 clock: Clock | None = None) -> None:
        super().__init__(name)
        self.keys = list(keys)
        if state_memory_limit is not None and state_memory_limit < 0:
            raise PlanError(f"{name}: state_memory_limit must be >= 0 bytes, got "
                            f"{state_memory_limit}")
        #: bytes of keyed state and timers kept in memory (None: half the task memory budget)
        self.state_memory_limit = state_memory_limit
        self._spill = SpillArea()
        self.store = KeyedStateStore(spill=self._spill)
        self.timers = TimerService(clock, spill=self._spill, key_source=self.store)
        self.watermark = MIN_TIME
        self._configure_memory()

    @property
    def is_keyed(self) -> bool:
        """True with key columns: the state splits by key group (restore at another
        parallelism); without keys the one partition's state is restored as a whole."""
        return bool(self.keys)

    def open(self, ctx: Any) -> None:
        super().open(ctx)
        self._spill.configure(ctx)
        self._configure_memory()

    def _configure_memory(self) -> None:
        limit = (self.state_memory_limit if self.state_memory_limit is not None
                 else default_state_memory_limit(self.ctx))
        self.timers.configure(limit)
        self.store.configure(limit, reserved=self.timers.reserved_bytes)

    def spill_stats(self) -> dict[str, int]:
        """How much state is on disk: keys, moves to disk, keys read back, file bytes."""
        return {"spilled_keys": self.store.num_spilled_keys(), "spills": self._spill.spills,
                "keys_moved_out": self.store.spilled_keys,
                "keys_read_back": self.store.loaded_keys, "disk_bytes": self._spill.disk_bytes()}

    def on_watermark(self, watermark: int) -> Batches:
        self.watermark = max(self.watermark, int(watermark))
        self.timers.watermark = self.watermark
        return _EMPTY

    def close(self) -> None:
        """Drop the state and delete its spill file."""
        self.store.close()
        self.timers.close()
        self._spill.close()

    # ----------------------------------------------------------------- snapshots

    def _extra_state(self) -> dict[str, Any]:
        """Small operator-wide values every snapshot carries (e.g. the input's schema)."""
        return {}

    def _restore_extra(self, states: list[dict[str, Any]]) -> None:
        """Take back ``_extra_state`` values from one or several snapshots."""

    def _check(self, state: Any, grouped: bool) -> None:
        if not isinstance(state, dict) or state.get("operator") != self.kind or \
                (grouped and "key_group" not in state):
            raise PlanError(f"{self.name}: cannot restore from {type(state).__name__}: not a "
                            f"{self.kind} {'key-group ' if grouped else ''}snapshot")

    def snapshot(self) -> dict[str, Any]:
        """Keyed state and timers (spilled ones too), the watermark, operator values."""
        return {"version": 1, "operator": self.kind, "store": self.store.snapshot(),
                "timers": self.timers.snapshot(), "watermark": self.watermark,
                **self._extra_state()}

    def restore(self, state: dict[str, Any]) -> None:
        """Restore from ``snapshot()`` (before or after ``open``)."""
        self._check(state, False)
        self.store.restore(state["store"])
        self.timers.restore(state["timers"])
        self.watermark = state["watermark"]
        self._restore_extra([state])

    def _group_state(self, g: int, store: Any, timers: Any) -> dict[str, Any]:
        return {"version": 1, "operator": self.kind, "key_group": g, "store": store,
                "timers": timers, "watermark": self.watermark, **self._extra_state()}

    def snapshot_by_key_group(self, key_groups: int) -> dict[int, dict[str, Any]]:
        """State and timers split by key group (key hash mod ``key_groups``)."""
        stores = self.store.snapshot_groups(key_groups)
        timers = self.timers.snapshot_groups(key_groups)
        return {g: self._group_state(g, stores.get(g), timers.get(g))
                for g in sorted(set(stores) | set(timers))}

    def iter_key_group_snapshots(self, key_groups: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """``snapshot_by_key_group`` one group at a time, in group order (spilled state is
        split by group on disk first, so memory holds one group's spilled rows)."""
        timers = self.timers.snapshot_groups(key_groups)
        pending = sorted(timers)
        for g, store in self.store.iter_snapshot_groups(key_groups):
            while pending and pending[0] < g:
                t = pending.pop(0)
                yield t, self._group_state(t, None, timers[t])
            if pending and pending[0] == g:
                pending.pop(0)
            yield g, self._group_state(g, store, timers.get(g))
        for t in pending:
            yield t, self._group_state(t, None, timers[t])

    #: ``restore_key_groups`` takes ``load``: the groups' state is read one at a time
    restores_key_groups_lazily = True

    def restore_key_groups(self, states: list[dict[str, Any]], load: Any = None) -> None:
        """Restore from the ``snapshot_by_key_group`` states of the groups this instance
        owns (with ``load``, each group's keyed state is read and put in place, spilling
        as it comes, before the next)."""
        for st in states:
            self._check(st, True)
        if load is not None:
            states = [{**st, "timers": load(st["timers"])} for st in states]
        stores = (load(st["store"]) if load is not None else st["store"]
                  for st in states if st["store"] is not None)
        self.store.restore_many(stores)
        wm = max([MIN_TIME, *(st["watermark"] for st in states)])
        self.timers.restore_many([st["timers"] for st in states if st["timers"] is not None],
                                 wm)
        self.watermark = wm
        self._restore_extra(states)
