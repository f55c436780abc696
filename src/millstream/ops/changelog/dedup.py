"""Deduplication: one row per key of ``subset`` columns (``Dataset.drop_duplicates``).

``keep="first"`` passes the first row of each key (in arrival order) and drops the later
ones: its output is append-only. ``keep="last"`` holds the latest row of each key: a new
key's row is an insert (+I); a later, different row replaces it with an update pair (-U
the held row, +U the new one); several rows of a key in one input batch give one change
(the batch's last row); an identical row changes nothing.

``within`` (µs; None: keep the state forever) bounds the state: a key's state expires
``within`` after the row it keeps, by event time when the stream has a watermark (the
state goes once the watermark passes the row's event time + ``within``, as Spark's
``dropDuplicatesWithinWatermark``) and by processing time otherwise. After that a row
of the key counts as new again: keep first passes it, keep last inserts it (the earlier
result row is not retracted: state expiry is forgetting, as Flink's state TTL).

In batch mode (``final=True``) keep last emits each key's last row at the end, as plain
rows; the state is never expired (a bounded input has no watermark to measure against).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from millstream.core.arrow import event_time_micros, table_to_batches
from millstream.core.changelog import INSERT, UPDATE_AFTER, UPDATE_BEFORE, without_kinds
from millstream.core.time import Clock
from millstream.core.units import format_duration
from millstream.errors import PlanError
from millstream.ops.base import Batches
from millstream.ops.changelog.keyed import (
    KeyedChangeOperator,
    build_batch,
    group_rows,
    merge_schema,
    row_tuples,
)
from millstream.ops.state.store import CHECK_EVERY

_EMPTY: tuple[pa.RecordBatch, ...] = ()


class Deduplicate(KeyedChangeOperator):
    """One row per key: the first (append-only output) or the last (updates); see the
    module docstring. ``time_column``: event time for the state's expiry (``within``)."""

    kind = "Deduplicate"
    accepts_updates = False

    def __init__(self, subset: list[str], keep: str = "first", within: int | None = None,
                 time_column: str | None = None, final: bool = False,
                 clock: Clock | None = None, name: str | None = None,
                 state_memory_limit: int | None = None) -> None:
        if keep not in ("first", "last"):
            raise PlanError(f"drop_duplicates: keep must be 'first' or 'last', got {keep!r}")
        if not subset:
            raise PlanError("drop_duplicates: the key columns (subset) are empty")
        ttl = f", within={format_duration(within)}" if within else ""
        super().__init__(subset, name or f"Deduplicate(subset={list(subset)}, keep={keep}{ttl})",
                         state_memory_limit, clock)
        self.keep = keep
        self.within = within
        self.time_column = time_column
        self.final = final
        self._state = self.store.value_state("kept")
        self._schema: pa.Schema | None = None

    @property
    def emits_updates(self) -> bool:  # type: ignore[override]
        return self.keep == "last" and not self.final

    def _extra_state(self) -> dict[str, Any]:
        return {"schema": self._schema}

    def _restore_extra(self, states: list[dict[str, Any]]) -> None:
        schemas = [st.get("schema") for st in states if st.get("schema") is not None]
        if schemas:
            self._schema = schemas[0]

    # ----------------------------------------------------------------- rows

    def _times(self, batch: pa.RecordBatch) -> np.ndarray | None:
        """When each row happened, for the expiry: event time or processing time (µs)."""
        if not self.within or self.final:
            return None
        if self.time_column is None:
            return np.full(batch.num_rows, self.timers.clock.now(), dtype=np.int64)
        t, valid = event_time_micros(batch.column(self.time_column), self.time_column)
        if valid is not None:  # a row without a time expires with the watermark's next move
            t = np.where(valid, t, self.watermark)
        return t

    def _alive(self, held: Any) -> bool:
        """Whether a key's state has not expired (its timer may not have fired yet)."""
        if held is None:
            return False
        if not self.within or self.final:
            return True
        now = self.watermark if self.time_column is not None else self.timers.clock.now()
        return held[0] > now

    def _expire_at(self, expiry: int) -> None:
        """A timer that drops the current key's state at ``expiry``."""
        if self.time_column is not None:
            self.timers.register_event_time_timer(expiry)
        else:
            self.timers.register_processing_time_timer(expiry)

    def _cancel(self, held: Any) -> None:
        """Cancel the expiry timer of the state ``held`` (being replaced)."""
        if held is None or not self.within or self.final:
            return
        if self.time_column is not None:
            self.timers.delete_event_time_timer(held[0])
        else:
            self.timers.delete_processing_time_timer(held[0])

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        if batch.num_rows == 0:
            return _EMPTY
        batch = without_kinds(batch)
        self._schema = merge_schema(self._schema, batch)
        groups = group_rows(batch, self.keys)
        times = self._times(batch)
        if self.keep == "first":
            return self._first(batch, groups, times)
        return self._last(batch, groups, times)

    def _first(self, batch: pa.RecordBatch, groups: Any, times: np.ndarray | None) -> Batches:
        store, handle = self.store, self._state
        passed: list[int] = []
        for i, key in enumerate(groups.keys):
            store.set_current_key(key, groups.hashes[i])
            held = handle.value()
            if self._alive(held):
                continue
            row = int(groups.rows_of(i)[0])
            self._cancel(held)
            if times is None:
                handle.update((None,))
            else:
                expiry = int(times[row]) + self.within
                handle.update((expiry,))
                self._expire_at(expiry)
            passed.append(row)
            if i % CHECK_EVERY == CHECK_EVERY - 1:
                store.maintain()
        store.maintain()
        if not passed:
            return _EMPTY
        return (batch.take(pa.array(sorted(passed), pa.int64())),)

    def _last(self, batch: pa.RecordBatch, groups: Any, times: np.ndarray | None) -> Batches:
        store, handle = self.store, self._state
        last = np.array([groups.rows_of(i)[-1] for i in range(len(groups))], dtype=np.int64)
        rows = row_tuples(batch.take(pa.array(last)))
        out: list[tuple] = []
        out_kinds: list[int] = []
        for i, key in enumerate(groups.keys):
            store.set_current_key(key, groups.hashes[i])
            held = handle.value()
            row = rows[i]
            expiry = None if times is None else int(times[last[i]]) + self.within
            alive = self._alive(held)
            self._cancel(held)
            handle.update((expiry, row))
            if expiry is not None:
                self._expire_at(expiry)
            if self.final:
                continue
            if not alive:
                out.append(row)
                out_kinds.append(INSERT)
            elif held[1] != row:
                out += (held[1], row)
                out_kinds += (UPDATE_BEFORE, UPDATE_AFTER)
            if i % CHECK_EVERY == CHECK_EVERY - 1:
                store.maintain()
        store.maintain()
        if not out:
            return _EMPTY
        return (build_batch(self._schema, out, out_kinds),)

    # ----------------------------------------------------------------- time

    def _expire(self, pop: Any, now: int) -> None:
        """Drop the state of keys whose expiry timer is due (unless renewed since)."""
        n = 0
        while True:
            due = pop(now)
            if due is None:
                break
            ts, key, h = due
            self.store.set_current_key(key, h)
            held = self._state.value()
            if held is not None and held[0] == ts:
                self._state.clear()
            n += 1
            if n % CHECK_EVERY == 0:
                self.store.maintain()
        self.store.maintain()

    def on_watermark(self, watermark: int) -> Batches:
        super().on_watermark(watermark)
        if self.within and self.time_column is not None:
            self._expire(self.timers.pop_due_event, self.watermark)
        return _EMPTY

    def advance_processing_time(self) -> Batches:
        """Expire processing-time state the clock has reached (the task calls this)."""
        if self.within and self.time_column is None:
            self._expire(self.timers.pop_due_processing, self.timers.clock.now())
        return _EMPTY

    def finish(self) -> Batches:
        """Batch mode, keep last: every key's last row."""
        if not self.final or self.keep != "last" or self._schema is None:
            return _EMPTY
        rows = []
        for key in self.store.keys("kept"):
            self.store.set_current_key(key)
            held = self._state.value()
            if held is not None:
                rows.append(held[1])
        if not rows:
            return _EMPTY
        table = pa.Table.from_batches([build_batch(self._schema, rows)])
        return table_to_batches(table, self.ctx.batch_size if self.ctx else 65536)
