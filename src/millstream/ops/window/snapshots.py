"""Checkpoints of the window operators: the whole state, or split by key group.

A snapshot is one Arrow table of partial states plus small picklable metadata
(watermark, time zone, counters, undrained side output). Split by key group (hash of
the key columns mod the job's key groups), it can be restored at another parallelism;
with spilled state, groups are produced one at a time from per-group files on disk, and
restored one at a time from blob references (lazily), so neither needs the whole state
in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from millstream.core.arrow import normalize_key
from millstream.core.context import TaskContext
from millstream.core.keygroups import key_hashes
from millstream.core.spill import GroupFiles
from millstream.core.time import MIN_WATERMARK
from millstream.errors import PlanError
from millstream.ops.window.tables import _WS, WindowState, _concat, _split_by_value


class WindowSnapshots:
    """Snapshot and restore (whole, or by key group) for a window operator that keeps its
    state in a :class:`~millstream.ops.window.tables.WindowState` (``_store``)."""

    name: str
    keys: list[str]
    side_outputs: tuple[str, ...]
    watermark: int
    late_records: int
    invalid_records: int
    _tz: str | None
    _side: dict[str, list[pa.RecordBatch]]
    _store: WindowState

    def _reset(self) -> None:
        raise NotImplementedError

    def _spill_context(self) -> TaskContext:
        raise NotImplementedError

    def snapshot(self) -> dict[str, Any]:
        """The whole state (spilled parts included): one Arrow table of partial states plus
        small metadata (picklable)."""
        tables = [t for t in self._store.state_tables() if t.num_rows]
        state = _concat(tables).combine_chunks() if tables else None
        return {"version": 1, "operator": "WindowAggregate", "watermark": self.watermark,
                "tz": self._tz, "late_records": self.late_records,
                "invalid_records": self.invalid_records, "state": state,
                "seq": self._store.seq, "side": {k: list(v) for k, v in self._side.items()}}

    def restore(self, state: dict[str, Any]) -> None:
        """Rebuild the state from ``snapshot()`` output; the operator continues as the original."""
        if not isinstance(state, dict) or state.get("operator") != "WindowAggregate":
            raise PlanError(f"{self.name}: cannot restore from {type(state).__name__}: not a "
                            f"WindowAggregate snapshot")
        self._reset()
        self.watermark = state["watermark"]
        self._tz = state["tz"]
        self.late_records = state["late_records"]
        self.invalid_records = state["invalid_records"]
        self._side = {k: list(v) for k, v in state["side"].items()}
        self._store.seq = int(state.get("seq", 0))
        table: pa.Table | None = state["state"]
        if table is None or table.num_rows == 0:
            return
        self._store.load(table)

    @property
    def is_keyed(self) -> bool:
        """True when the state is keyed (``keys`` given): it can be split by key group."""
        return bool(self.keys)

    def snapshot_by_key_group(self, key_groups: int) -> dict[int, dict[str, Any]]:
        """``snapshot()`` split by key group (hash of the key columns mod ``key_groups``).

        Every group's snapshot carries the watermark, time zone and arrival counter; the
        counters and any undrained side output rows go with the smallest group (group 0 when
        there is no state).
        """
        if not self.keys:
            raise PlanError(f"{self.name}: a window without keys has no key groups; its state "
                            f"can only be restored at the same parallelism")
        full = self.snapshot()
        table: pa.Table | None = full["state"]
        groups: dict[int, dict[str, Any]] = {}
        if table is not None and table.num_rows:
            table, hashes = self._canonical_order(table)
            gids = (hashes % np.uint64(key_groups)).astype(np.int64)
            for g, part in _split_by_value(table, gids):
                groups[g] = self._group_snapshot(g, part.combine_chunks())
        first = min(groups, default=0)
        groups.setdefault(first, self._group_snapshot(first, None))
        groups[first].update(late_records=full["late_records"],
                             invalid_records=full["invalid_records"], side=full["side"])
        return groups

    def iter_key_group_snapshots(self, key_groups: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """``snapshot_by_key_group`` one group at a time, in group order, with memory for
        one window (or session file) and one group: when state has spilled, each window's
        state is split by key group into per-group files on disk first, and each group is
        read back only when its turn comes (the caller writes it out before the next)."""
        if not self._store.has_spills():
            yield from sorted(self.snapshot_by_key_group(key_groups).items())
            return
        if not self.keys:
            raise PlanError(f"{self.name}: a window without keys has no key groups; its state "
                            f"can only be restored at the same parallelism")
        with GroupFiles(self._spill_context(), "snapshot-group") as files:
            for table in self._store.iter_state_tables():
                if not table.num_rows:
                    continue
                hashes = key_hashes([normalize_key(table.column(k)) for k in self.keys],
                                    table.num_rows)
                for g, part in _split_by_value(table, (hashes % np.uint64(key_groups))
                                               .astype(np.int64)):
                    files.put(g, part)
            first = min(files.groups(), default=0)
            for g in sorted({*files.groups(), first}):
                state = files.take(g)
                if state is not None:
                    state = self._canonical_order(state)[0].combine_chunks()
                snap = self._group_snapshot(g, state)
                if g == first:
                    snap.update(late_records=self.late_records,
                                invalid_records=self.invalid_records,
                                side={k: list(v) for k, v in self._side.items()})
                yield g, snap

    def _canonical_order(self, table: pa.Table) -> tuple[pa.Table, np.ndarray]:
        """Rows by (key hash, window start), and their key hashes: a group whose state did
        not change snapshots to the same bytes (incremental checkpoints store it once)."""
        hashes = key_hashes([normalize_key(table.column(k)) for k in self.keys],
                            table.num_rows)
        starts = (table.column(_WS).to_numpy() if _WS in table.schema.names
                  else np.zeros(table.num_rows, np.int64))
        order = np.lexsort((starts, hashes))
        return table.take(pa.array(order)), hashes[order]

    def _group_snapshot(self, group: int, state: pa.Table | None) -> dict[str, Any]:
        """One key group's snapshot (counters and side output go with the first group)."""
        return {"version": 1, "operator": "WindowAggregate", "watermark": self.watermark,
                "tz": self._tz, "late_records": 0, "invalid_records": 0, "state": state,
                "seq": self._store.seq, "side": {k: [] for k in self._side},
                "key_group": group}

    #: ``restore_key_groups`` takes ``load``: the groups' state tables may still be blob
    #: references, read one group at a time (spilling as they come in)
    restores_key_groups_lazily = True

    def restore_key_groups(self, states: list[dict[str, Any]], load: Any = None) -> None:
        """Restore from ``snapshot_by_key_group`` states of the key groups this instance owns.

        With ``load`` (resolves checkpoint blob references in a value, passes anything
        else through), each group's state is read and put in place before the next, and
        spills over the memory limit as usual: a restore needs memory for one group."""
        for st in states:
            if not isinstance(st, dict) or st.get("operator") != "WindowAggregate" \
                    or "key_group" not in st:
                raise PlanError(f"{self.name}: cannot restore from {type(st).__name__}: not a "
                                f"WindowAggregate key-group snapshot")
        if load is not None:  # side-output batches may be blobs too
            states = [{**st, "side": load(st["side"])} for st in states]
            self.restore(self._merged_group_meta(states, None))
            for st in states:
                table = load(st["state"])
                if table is not None and table.num_rows:
                    self._store.add(table)
            return
        tables = [st["state"] for st in states if st["state"] is not None and st["state"].num_rows]
        self.restore(self._merged_group_meta(states, _concat(tables) if tables else None))

    def _merged_group_meta(self, states: list[dict[str, Any]], state: pa.Table | None
                           ) -> dict[str, Any]:
        """One ``snapshot()``-shaped dict from several key groups' snapshots."""
        return {
            "version": 1, "operator": "WindowAggregate",
            "watermark": max([MIN_WATERMARK, *(st["watermark"] for st in states)]),
            "tz": next((st["tz"] for st in states if st["tz"] is not None), None),
            "late_records": sum(st["late_records"] for st in states),
            "invalid_records": sum(st["invalid_records"] for st in states),
            "state": state,
            "seq": max([0, *(st.get("seq", 0) for st in states)]),
            "side": {k: [b for st in states for b in st["side"].get(k, [])]
                     for k in self.side_outputs},
        }
