"""What the keyed stream joins (interval, window, latest-value) share: :class:`_KeyedJoin`.

Their keys and input checks, output rows and rows without a partner, the "late" and
"invalid" side outputs, and the checkpoint interface (whole snapshots, and snapshots and
restores one key group at a time). The buffered rows and their spilling are a
:class:`~millstream.ops.stream_join.state.JoinState` each join composes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from millstream.core.arrow import event_time_micros, table_to_batches
from millstream.core.context import TaskContext
from millstream.core.keygroups import key_hashes
from millstream.core.time import MAX_WATERMARK, MIN_WATERMARK
from millstream.errors import PlanError, SchemaError
from millstream.ops.base import Batches, Operator
from millstream.ops.stream_join.buffer import _Buffer
from millstream.ops.stream_join.keys import _strip, data_schema, join_key_names
from millstream.ops.stream_join.output import _EMPTY, assemble_rows
from millstream.ops.stream_join.state import JoinState

#: Column added to late rows in the side output: which input they came from.
SIDE_COLUMN = "join_side"
_SIDES = ("left", "right")
#: The key group under which a broadcast join checkpoints its broadcast input's rows
#: (taken by the task of partition 0 only; every task restores them whole).
BROADCAST_GROUP = -1


class _KeyedJoin(Operator):
    """What the keyed stream joins share: keys, output assembly, side outputs, key groups."""

    num_inputs = 2
    input_order: tuple[int, ...] = (1, 0)
    #: Its state is keyed: checkpointed per key group, restorable at another parallelism.
    is_keyed = True
    side_outputs: tuple[str, ...] = ()
    #: event-time columns of the (left, right) inputs (interval and window joins)
    time_columns: tuple[str, str] = ("", "")
    #: time zone of the event-time column, once seen (window bounds carry it)
    _tz: str | None = None
    _kind = "StreamJoin"

    def __init__(self, left_on: list[str], right_on: list[str], how: str, suffix: str,
                 name: str, state_memory_limit: int | None = None,
                 broadcast: int | None = None,
                 input_schemas: tuple[pa.Schema | None, pa.Schema | None] = (None, None)
                 ) -> None:
        if len(left_on) != len(right_on) or not left_on:
            raise PlanError(f"{name}: left keys {left_on} and right keys {right_on} must be "
                            f"non-empty and as many")
        if broadcast not in (None, 0, 1):
            raise PlanError(f"{name}: broadcast must be None, 0 (left) or 1 (right), got "
                            f"{broadcast!r}")
        #: the input port every task of the join receives whole (a broadcast exchange; the
        #: other input stays in the tasks that made its rows), or None (both keyed)
        self.broadcast_input = broadcast
        self.how = how
        if broadcast is not None and self._outer(broadcast):
            raise PlanError(f"{name}: the {_SIDES[broadcast]} input of a {how} join cannot "
                            f"be broadcast (whether its rows found a partner is known only "
                            f"to all tasks together)")
        if broadcast is not None:
            name += f" [{_SIDES[broadcast]} input broadcast]"
        if state_memory_limit is not None and int(state_memory_limit) < 0:
            raise PlanError(f"{name}: state_memory_limit must be >= 0 bytes, got "
                            f"{state_memory_limit}")
        super().__init__(name)
        self.left_on, self.right_on = list(left_on), list(right_on)
        self.suffix = suffix
        self.hidden = join_key_names(len(self.left_on))
        #: the buffered rows of both inputs, in memory and spilled
        self._state = self._new_state()
        self.state_memory_limit = None if state_memory_limit is None else int(state_memory_limit)
        self.watermark = MIN_WATERMARK
        #: the user columns of each input, once seen (the output of an unmatched row needs them)
        self._schemas: list[pa.Schema | None] = [None, None]
        #: ... and as the plan knows them (a task that never sees a batch of one input
        #: still pads the other's unmatched rows with its columns)
        self._planned = [data_schema(s) for s in input_schemas]
        self._side: dict[str, list[pa.RecordBatch]] = {t: [] for t in self.side_outputs}
        self._counts = {"late_records": 0, "invalid_records": 0}
        self._emitted = False

    def _new_state(self) -> JoinState:
        """The state this join buffers its rows in (numpy columns, spill order)."""
        return JoinState(("h",))

    # ------------------------------------------------------------------ state

    @property
    def _bufs(self) -> list[_Buffer]:
        """The buffered rows of the (left, right) inputs."""
        return self._state.bufs

    @property
    def state_memory_limit(self) -> int | None:
        """Bytes of buffered rows kept in memory (None: half the task's memory budget)."""
        return self._state.limit

    @state_memory_limit.setter
    def state_memory_limit(self, value: int | None) -> None:
        self._state.limit = value

    @property
    def spill_work_min_bytes(self) -> int:
        """Transient bytes beyond the limit for merges, snapshots and firings (tests lower it)."""
        return self._state.work_min_bytes

    @spill_work_min_bytes.setter
    def spill_work_min_bytes(self, value: int) -> None:
        self._state.work_min_bytes = value

    @property
    def peak_state_memory_bytes(self) -> int:
        """The largest in-memory state seen (bytes, before spilling)."""
        return self._state.peak_bytes

    def open(self, ctx: TaskContext) -> None:
        super().open(ctx)
        self._state.ctx = ctx

    def state_memory_bytes(self) -> int:
        """Bytes of join state in memory: buffered rows, and the index of the spilled ones."""
        return self._state.memory_bytes()

    def spill_stats(self) -> dict[str, int]:
        """Rows in memory, runs on disk and rows in them, bytes of their files, runs
        written and rows moved to disk so far."""
        return self._state.stats()

    # ------------------------------------------------------------------ helpers

    def _keys_of(self, table: pa.Table) -> list[pa.Array]:
        return [table.column(n).combine_chunks() for n in self.hidden]

    def _check_input(self, batch: pa.RecordBatch, port: int, timed: bool = False) -> None:
        """Check an input batch (``timed``: of an event-time join, which takes no rows after
        ``finish()``) and note its input's columns."""
        if timed and self.watermark == MAX_WATERMARK:
            raise PlanError(f"{self.name}: process() called after finish()")
        missing = [n for n in self.hidden if n not in batch.schema.names]
        if missing:
            keys = self.left_on if port == 0 else self.right_on
            raise SchemaError(f"{self.name}: the {_SIDES[port]} input lacks the join key "
                              f"columns of {keys} (it must pass JoinKeys before the key "
                              f"exchange); columns are {batch.schema.names}")
        if self._schemas[port] is None:
            self._schemas[port] = _strip(pa.Table.from_batches([batch]).slice(0, 0)).schema

    def _hash(self, table: pa.Table) -> np.ndarray:
        return key_hashes([table.column(n) for n in self.hidden], table.num_rows)

    def _schema(self, port: int) -> pa.Schema | None:
        """Input ``port``'s columns: as its batches have them, else as planned."""
        s = self._schemas[port]
        return s if s is not None else self._planned[port]

    def _empty(self, port: int) -> pa.Table:
        s = self._schema(port)
        return s.empty_table() if s is not None else pa.table({})

    def _outer(self, port: int) -> bool:
        return self.how == "outer" or self.how == ("left", "right")[port]

    def _assemble(self, left: pa.Table, li: np.ndarray, right: pa.Table, ri: np.ndarray,
                  prefix: list[tuple[str, pa.Array]] | None = None) -> pa.Table:
        """Output rows: ``prefix`` columns, left columns, right columns (-1: nulls)."""
        return assemble_rows(left, li, right, ri, self.left_on, self.right_on, self.how,
                             self.suffix, prefix)

    def _unmatched(self, port: int, rows: pa.Table,
                   prefix: list[tuple[str, pa.Array]] | None = None) -> pa.Table:
        """Rows of input ``port`` without a partner, the other input's columns null."""
        n = rows.num_rows
        mine = np.arange(n, dtype=np.int64)
        none = np.full(n, -1, dtype=np.int64)
        if port == 0:
            return self._assemble(rows, mine, self._empty(1), none, prefix)
        return self._assemble(self._empty(0), none, rows, mine, prefix)

    def _advance(self, watermark: int) -> bool:
        """Move the watermark to ``watermark``; False when that is not ahead of it."""
        w = int(watermark)
        if w <= self.watermark:
            return False
        self.watermark = w
        return True

    def _emit(self, tables: list[pa.Table]) -> Batches:
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return _EMPTY
        self._emitted = True
        out = tables[0] if len(tables) == 1 else pa.concat_tables(
            tables, promote_options="permissive")
        return table_to_batches(out, self.ctx.batch_size if self.ctx else 65536)

    def _keeps_broadcast(self) -> bool:
        """Whether this task speaks for the broadcast input (every task has its rows): the
        task of partition 0 checkpoints them and sends their late or invalid rows on."""
        return self.ctx is None or self.ctx.partition == 0

    def _to_side(self, tag: str, rows: pa.Table, port: int, counter: str) -> None:
        if port == self.broadcast_input and not self._keeps_broadcast():
            return  # (partition 0 reports the broadcast rows, once)
        rows = _strip(rows)
        if SIDE_COLUMN not in rows.column_names:
            rows = rows.append_column(SIDE_COLUMN, pa.array([_SIDES[port]] * rows.num_rows,
                                                            pa.string()))
        self._side[tag].extend(rows.combine_chunks().to_batches())
        self._counts[counter] += rows.num_rows
        if self.ctx is not None:
            self.ctx.increment_counter("millstream", counter, rows.num_rows)

    def _times(self, table: pa.Table, port: int) -> tuple[pa.Table, np.ndarray]:
        """Rows with a valid event time and their times (µs); the others go to "invalid"."""
        col = self.time_columns[port]
        if col not in table.column_names:
            raise SchemaError(f"{self.name}: the {_SIDES[port]} input has no time column "
                              f"{col!r}; columns are {_strip(table).column_names}")
        c = table.column(col)
        if self._tz is None and pa.types.is_timestamp(c.type) and c.type.tz:
            self._tz = c.type.tz
        t, valid = event_time_micros(c, col)
        if valid is not None and not valid.all():
            self._to_side("invalid", table.filter(pa.array(~valid)), port, "invalid_records")
            table, t = table.filter(pa.array(valid)), t[valid]
        return table, t

    def _final_empty(self) -> Batches:
        """A typed empty batch when nothing was emitted (batch mode: later stages see columns)."""
        if self._emitted or self._schema(0) is None or self._schema(1) is None:
            return _EMPTY
        out = self._assemble(self._empty(0), np.zeros(0, np.int64), self._empty(1),
                             np.zeros(0, np.int64), self._prefix_empty())
        return (pa.RecordBatch.from_arrays([pa.array([], f.type) for f in out.schema],
                                           schema=out.schema),)

    def _prefix_empty(self) -> list[tuple[str, pa.Array]] | None:
        return None

    # ------------------------------------------------------------------ interface

    def take_side_output(self, tag: str = "late") -> list[pa.RecordBatch]:
        """Rows routed to side output ``tag`` since the last call ("late", "invalid")."""
        if tag not in self._side:
            raise PlanError(f"{self.name}: no side output {tag!r}; it has {list(self._side)}")
        out, self._side[tag] = self._side[tag], []
        return out

    @property
    def late_records(self) -> int:
        """Rows sent to the "late" side output so far."""
        return self._counts["late_records"]

    def _meta(self) -> dict[str, Any]:
        return {"version": 1, "operator": self._kind, "watermark": self.watermark,
                "schemas": list(self._schemas), "tz": self._tz, "extra": self._extra_state()}

    def _extra_state(self) -> Any:
        return None

    def _load_extra(self, extras: list[Any]) -> None:
        """Merge operator-specific state of restored snapshots."""

    def snapshot(self) -> dict[str, Any]:
        """Buffered rows of both inputs, watermark, schemas, undrained side outputs."""
        return {**self._meta(), "sides": [self._state.snapshot(p) for p in (0, 1)],
                "side": {k: list(v) for k, v in self._side.items()},
                "counts": dict(self._counts)}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from ``snapshot()`` output."""
        self._check_snapshot(state, False)
        self._restore([state])

    def snapshot_by_key_group(self, key_groups: int) -> dict[int, dict[str, Any]]:
        """``snapshot()`` split by key group (hash of the normalized keys mod ``key_groups``).

        Every group carries the watermark and schemas; counters and undrained side output
        rows go with the smallest group (group 0 when no row is buffered).
        """
        return dict(self._group_states(self._state.by_key_group(key_groups)))

    def iter_key_group_snapshots(self, key_groups: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """``snapshot_by_key_group`` one group at a time, in group order: when rows have
        spilled, both inputs' rows are first split by group into files on disk, so a
        checkpoint needs memory for one group, not the whole state."""
        yield from self._group_states(self._state.iter_key_groups(key_groups))

    def _group_states(self, groups: Any) -> Iterator[tuple[int, dict[str, Any]]]:
        """The snapshots of ``groups`` ((group, [left rows, right rows]) in group order).

        A broadcast join's groups hold the rows of its other input only; the broadcast
        input's rows follow whole as group :data:`BROADCAST_GROUP`, from partition 0's
        task (every task has them), and every task restores them."""
        b = self.broadcast_input
        for i, (g, sides) in enumerate(groups):
            if b is not None:
                sides = [None if port == b else t for port, t in enumerate(sides)]
            yield g, self._group_state(g, sides, i == 0)
        if b is not None and self._keeps_broadcast():
            sides = [None, None]
            sides[b] = self._state.snapshot(b)
            yield BROADCAST_GROUP, self._group_state(BROADCAST_GROUP, sides, False)

    def _group_state(self, g: int, sides: list[pa.Table | None], first: bool
                     ) -> dict[str, Any]:
        """The snapshot of key group ``g``; the ``first`` (smallest) group carries the
        counters and the undrained side output rows."""
        st = {**self._meta(), "key_group": g, "sides": sides,
              "side": {k: [] for k in self._side}, "counts": {k: 0 for k in self._counts}}
        if first:
            st["side"] = {k: list(v) for k, v in self._side.items()}
            st["counts"] = dict(self._counts)
        return st

    #: ``restore_key_groups`` takes ``load``: blob references are read one group at a time
    restores_key_groups_lazily = True

    def restore_key_groups(self, states: list[dict[str, Any]], load: Any = None) -> None:
        """Restore from the ``snapshot_by_key_group`` states of the groups this instance owns.

        With ``load`` (resolves checkpoint blob references in a value), each group's rows
        are read and put in place (spilling over the limit) before the next group's."""
        for st in states:
            self._check_snapshot(st, True)
        if load is None:
            self._restore(states)
            return
        meta = [{**st, "sides": [None, None], "side": load(st["side"])} for st in states]
        self._restore(meta)
        for st in states:
            for port in (0, 1):
                t = load(st["sides"][port])
                if t is not None and t.num_rows:
                    self._bufs[port].add_snapshot(t)
            self._state.maybe_spill()

    def _check_snapshot(self, st: Any, keyed: bool) -> None:
        if not isinstance(st, dict) or st.get("operator") != self._kind or \
                (keyed and "key_group" not in st):
            what = "key-group snapshot" if keyed else "snapshot"
            raise PlanError(f"{self.name}: cannot restore from {type(st).__name__}: not a "
                            f"{self._kind} {what}")

    def _restore(self, states: list[dict[str, Any]]) -> None:
        self.watermark = max([MIN_WATERMARK, *(st["watermark"] for st in states)])
        for port in (0, 1):
            self._schemas[port] = next((st["schemas"][port] for st in states
                                        if st["schemas"][port] is not None), None)
            self._state.load(port, [st["sides"][port] for st in states])
        self._tz = next((st["tz"] for st in states if st["tz"] is not None), None)
        self._side = {t: [b for st in states for b in st["side"].get(t, [])]
                      for t in self.side_outputs}
        self._counts = {k: sum(st["counts"].get(k, 0) for st in states) for k in self._counts}
        self._load_extra([st["extra"] for st in states])
        self._state.maybe_spill()

    def close(self) -> None:
        """Drop the state and delete the spill files."""
        self._state.reset()

    def describe(self) -> str:
        return self.name
