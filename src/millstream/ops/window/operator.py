"""The keyed event-time window operator: assigns events to windows, fires them as the
watermark passes, handles lateness and the side outputs.

Its state lives in a holder chosen by the window: panes for tumbling and sliding windows
(:mod:`~millstream.ops.window.panes`), sessions for session windows
(:mod:`~millstream.ops.window.sessions`); snapshots come from
:mod:`~millstream.ops.window.snapshots`. Global windows have their own operator
(:mod:`~millstream.ops.window.global_window`). The semantics are in the package
docstring (:mod:`millstream.ops.window`).
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

import numpy as np
import pyarrow as pa

from millstream.core.arrow import event_time_micros, table_to_batches
from millstream.core.context import TaskContext
from millstream.core.time import MAX_WATERMARK, MIN_WATERMARK
from millstream.core.units import format_duration, parse_duration
from millstream.errors import MillstreamError, PlanError, SchemaError
from millstream.expr.aggregates import AggSpec
from millstream.expr.windows import GlobalWindow, WindowAssigner
from millstream.ops.aggregate import _AggCore
from millstream.ops.base import Batches, Operator
from millstream.ops.window.panes import PaneStore
from millstream.ops.window.sessions import SessionStore
from millstream.ops.window.snapshots import WindowSnapshots
from millstream.ops.window.tables import (
    _COMBINED,
    _EMPTY,
    _RESERVED,
    _WE,
    _WS,
    WindowState,
    _col_numpy,
    _concat,
)


class WindowAggregate(WindowSnapshots, Operator):
    """Keyed event-time window aggregation with watermarks, allowed lateness and a late side output.

    ``keys`` may be empty (one window per time range over all events). ``aggs`` are
    ``AggSpec``s or ``AggExpr``s (``ms.sum("x").alias("total")``). See the package
    docstring for the firing, lateness and update semantics. A global window takes
    :class:`~millstream.ops.window.global_window.GlobalWindowAggregate`.
    """

    #: Side output tags this operator fills; drain them with ``take_side_output(tag)``.
    side_outputs = ("late", "invalid")
    #: Merge a pane's state tables once it holds this many.
    compact_tables = 16
    #: Fewest sessions per session spill file (unless fewer are spilled).
    session_spill_min_rows = 64
    #: Whether this operator class runs global windows (only ``GlobalWindowAggregate`` does).
    global_windows = False

    def __init__(self, window: WindowAssigner, keys: list[str] | str | None, aggs: list[Any],
                 time_column: str, allowed_lateness: str | int | _dt.timedelta = 0,
                 emit: str = "final", name: str | None = None,
                 state_memory_limit: int | None = None) -> None:
        if not isinstance(window, WindowAssigner):
            raise PlanError(f"WindowAggregate: window must be Tumbling, Sliding or Session (or "
                            f"a GlobalWindow), got {window!r}")
        if isinstance(window, GlobalWindow) and not self.global_windows:
            raise PlanError(f"WindowAggregate: {window.describe()} is a global window; "
                            f"GlobalWindowAggregate runs those")
        if emit != "final":
            raise PlanError(f"WindowAggregate: emit={emit!r} is not supported; only 'final' "
                            f"(one result per window when the watermark passes its end)")
        keys = [keys] if isinstance(keys, str) else list(keys or [])
        specs = [a if isinstance(a, AggSpec) else self._to_spec(a) for a in aggs]
        if not specs:
            raise PlanError("WindowAggregate: at least one aggregate is needed")
        names = [*keys, *(s.name for s in specs)]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise PlanError(f"WindowAggregate: duplicate output column(s) {dup} among keys and "
                            f"aggregate names")
        clash = [n for n in names if n in _RESERVED or n.startswith("__millstream")]
        if clash:
            raise PlanError(f"WindowAggregate: column name(s) {clash} are reserved for the "
                            f"window result; rename them")
        self.window = window
        self.keys = keys
        self.specs = specs
        self.time_column = time_column
        self.allowed_lateness = parse_duration(allowed_lateness, "allowed_lateness")
        self.emit = emit
        #: bytes of in-memory pane state before spilling (None: half the task memory budget)
        self.state_memory_limit = state_memory_limit
        self._spill_ctx: TaskContext | None = None
        super().__init__(name or (
            f"WindowAggregate({window.describe()}, keys={keys}, time={time_column!r}, aggs=["
            + ", ".join(f"{s.func}:{s.name}" for s in specs) + "]"
            + (f", allowed_lateness={format_duration(self.allowed_lateness)}"
               if self.allowed_lateness else "") + ")"))
        self.core = _AggCore([_WS, _WE, *keys], specs)
        #: session windows with allowed lateness can move: earlier rows get retracted
        self.retractions = window.merging and self.allowed_lateness > 0
        self._reset()

    @staticmethod
    def _to_spec(agg: Any) -> AggSpec:
        func, arg, name = (getattr(agg, a, None) for a in ("func", "arg", "name"))
        if func is None or name is None:
            raise PlanError(f"WindowAggregate: aggregates must be AggSpec or AggExpr "
                            f"(e.g. ms.sum('x')), got {agg!r}")
        return AggSpec(func, arg, name, dict(getattr(agg, "params", None) or {}))

    def _new_store(self) -> WindowState:
        """An empty state holder for this operator's window."""
        return SessionStore(self) if self.window.merging else PaneStore(self)

    def _reset(self) -> None:
        store: WindowState | None = getattr(self, "_store", None)
        if store is not None:
            store.drop()
        self.watermark = MIN_WATERMARK
        self.late_records = 0
        self.invalid_records = 0
        self._tz: str | None = None
        self._side: dict[str, list[pa.RecordBatch]] = {t: [] for t in self.side_outputs}
        self._store = self._new_store()

    # ----------------------------------------------------------------- interface

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        """Add a batch of events; returns rows of windows the watermark has already passed."""
        if batch.num_rows == 0:
            return _EMPTY
        if self.watermark == MAX_WATERMARK:
            raise PlanError(f"{self.name}: process() called after finish()")
        if batch.schema.metadata and _COMBINED in batch.schema.metadata:
            return self._emit(self._process_combined(batch))
        batch, t = self._valid_times(batch)
        if batch.num_rows == 0:
            return _EMPTY
        return self._emit(self._store.process(batch, t))

    def on_watermark(self, watermark: int) -> Batches:
        """Fire every window with ``end <= watermark``; drop state of expired windows."""
        w = int(watermark)
        if w <= self.watermark:
            return _EMPTY
        old, self.watermark = self.watermark, w
        return self._emit(self._store.fire(old, w))

    def finish(self) -> Batches:
        """End of input (watermark +infinity): emit every window not yet emitted, in end order."""
        out = self._store.finish(self.watermark)
        self.watermark = MAX_WATERMARK
        return self._emit(out, sort=self.window.merging)

    def take_side_output(self, tag: str = "late") -> list[pa.RecordBatch]:
        """Rows routed to side output ``tag`` since the last call ("late" events, "invalid" times)."""
        if tag not in self._side:
            raise PlanError(f"{self.name}: no side output {tag!r}; it has {list(self._side)}")
        out, self._side[tag] = self._side[tag], []
        return out

    def close(self) -> None:
        self._store.close()

    def describe(self) -> str:
        return self.name

    # ----------------------------------------------------------------- events

    def _time_column(self, batch: pa.RecordBatch) -> pa.Array:
        i = batch.schema.get_field_index(self.time_column)
        if i < 0:
            raise SchemaError(f"{self.name}: no time column {self.time_column!r}; columns are "
                              f"{batch.schema.names}")
        missing = [k for k in self.keys if k not in batch.schema.names]
        if missing:
            raise SchemaError(f"{self.name}: no key column(s) {missing}; columns are "
                              f"{batch.schema.names}")
        col = batch.column(i)
        if self._tz is None and pa.types.is_timestamp(col.type) and col.type.tz:
            self._tz = col.type.tz
        return col

    def _expiry(self) -> int:
        """Windows with ``end <= this`` are expired (watermark minus allowed lateness)."""
        return max(self.watermark - self.allowed_lateness, MIN_WATERMARK)

    def _valid_times(self, batch: pa.RecordBatch) -> tuple[pa.RecordBatch, np.ndarray]:
        """The rows with an event time and their times (µs); rows without one go to the
        "invalid" side output."""
        t, valid = event_time_micros(self._time_column(batch), self.time_column)
        if valid is not None:
            bad = batch.filter(pa.array(~valid))
            self._to_side("invalid", bad, "invalid_time_records")
            self.invalid_records += bad.num_rows
            batch = batch.filter(pa.array(valid))
            t = t[valid]
        return batch, t

    def _to_side(self, tag: str, rows: pa.RecordBatch, counter: str) -> None:
        self._side[tag].append(rows)
        if self.ctx is not None:
            self.ctx.increment_counter("millstream", counter, rows.num_rows)

    def _late(self, batch: pa.RecordBatch, mask: np.ndarray) -> None:
        rows = batch.filter(pa.array(mask))
        self.late_records += rows.num_rows
        self._to_side("late", rows, "late_records")

    def _process_combined(self, batch: pa.RecordBatch) -> list[pa.Table]:
        """States a :class:`~millstream.ops.window.combiner.WindowCombiner` built upstream
        (never late here: it only combines rows whose windows outlive its watermark, which
        is never behind ours)."""
        tz = batch.schema.metadata[_COMBINED].decode()
        if tz and self._tz is None:
            self._tz = tz
        # (not merged here: a task may have joined several senders' state batches into
        # one, and a sliding window's combiner sends a row per pane of a window: the store
        # merges them when it reads the window's state, and every few batches)
        states = pa.Table.from_batches([batch.replace_schema_metadata(None)])
        expired = _col_numpy(states, _WE) <= self._expiry()
        if expired.any():  # a broken invariant; say so loudly rather than drop silently
            raise MillstreamError(
                f"{self.name}: {int(expired.sum())} pre-aggregated window states arrived "
                f"after their windows expired (watermark {self.watermark}); run with window "
                f"combining off (MILLSTREAM_WINDOW_COMBINER=0) and report this")
        if not isinstance(self._store, PaneStore):  # the combiner refuses other windows
            raise PlanError(f"{self.name}: pre-aggregated window states need a tumbling or "
                            f"sliding window")
        return self._store.add_states(states, unique=False)

    # ----------------------------------------------------------------- results

    def _result(self, states: pa.Table, is_update: Any) -> pa.Table:
        """Merged states -> result rows (window bounds as timestamps, keys, aggregates, flags)."""
        res = self.core.finalize(states)
        ts = pa.timestamp("us", tz=self._tz)
        arrays = [res.column(_WS).cast(ts), res.column(_WE).cast(ts)]
        names = ["window_start", "window_end"]
        for name in res.schema.names[2:]:
            arrays.append(res.column(name))
            names.append(name)
        if self.allowed_lateness > 0:
            flag = np.broadcast_to(np.asarray(is_update, dtype=bool), (res.num_rows,))
            arrays.append(pa.array(flag, pa.bool_()))
            names.append("is_update")
        if self.retractions:
            arrays.append(pa.array(np.zeros(res.num_rows, dtype=bool), pa.bool_()))
            names.append("is_retraction")
        return pa.table(arrays, names=names)

    def _emit(self, tables: list[pa.Table], sort: bool = False) -> Batches:
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return _EMPTY
        out = _concat(tables)
        if sort:
            out = out.sort_by([("window_end", "ascending"), ("window_start", "ascending")])
        return table_to_batches(out, self.ctx.batch_size if self.ctx else 65536)

    # ----------------------------------------------------------------- spilling

    def _memory_limit(self) -> int:
        """Bytes of in-memory state before spilling."""
        if self.state_memory_limit is not None:
            return int(self.state_memory_limit)
        budget = self.ctx.memory_budget if self.ctx is not None else TaskContext.memory_budget
        return budget // 2

    def _spill_context(self) -> TaskContext:
        if self._spill_ctx is None:
            self._spill_ctx = self.ctx if self.ctx is not None else TaskContext()
        return self._spill_ctx
