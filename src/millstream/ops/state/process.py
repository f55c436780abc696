"""Keyed process functions: user code per element with keyed state, timers and side outputs.

The primary API is Flink-like: subclass :class:`KeyedProcessFunction` and implement
``process_element(row, ctx)`` (and optionally ``open(ctx)``, ``on_timer(timestamp, ctx)``,
``close()``); each returns an iterable of output rows (dicts), a single dict, or None. A
plain function ``fn(row, ctx)`` works too for simple cases.

``ctx`` (a :class:`ProcessContext`) gives ``ctx.key``, ``ctx.timestamp`` (the element's
event time, or the timer's time, in µs), ``ctx.current_watermark``, ``ctx.time_domain``
("event_time" / "processing_time" inside ``on_timer``), ``ctx.timer_service()``,
``ctx.get_state(descriptor_or_name, default)``, ``ctx.get_list_state(name)``,
``ctx.get_map_state(name)`` and ``ctx.output(tag, row)`` for side outputs.

Elements are processed one by one in arrival order. Event-time timers fire in timestamp
order when a watermark reaches them (``on_watermark``; ``finish`` fires all of them);
processing-time timers fire when the scheduler calls ``advance_processing_time()`` and
the clock has reached them. State and timers are in ``snapshot()``; attributes of the
user's function object are not (keep what must survive a failure in keyed state).

Keyed state and timers are bounded by ``state_memory_limit`` bytes (default: half the
task's ``memory_budget``): beyond it, the least recently used keys' state and the latest
timers move to a sqlite file in the task's spill directory and come back when needed
(``ops.state.store``, ``ops.state.timers`` and ``ops.state.spill_store`` say how).
Results do not change; ``close()`` deletes the file. ``("millstream", "state_spills")``
counts the moves to disk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import cloudpickle
import pyarrow as pa

from millstream.core.arrow import batch_to_rows, event_time_micros, rows_to_batch
from millstream.core.keygroups import key_hashes
from millstream.core.time import MAX_TIME, MIN_TIME, Clock
from millstream.errors import PlanError, SchemaError, UserCodeFailure
from millstream.ops.base import Batches, Operator
from millstream.ops.narrow import _short, function_name
from millstream.ops.state.descriptors import StateDescriptor
from millstream.ops.state.handles import ListState, MapState, ValueState
from millstream.ops.state.spill_store import SpillArea
from millstream.ops.state.store import CHECK_EVERY, KeyedStateStore, default_state_memory_limit
from millstream.ops.state.timers import TimerService

_EMPTY: tuple[pa.RecordBatch, ...] = ()


class KeyedProcessFunction:
    """Base class of user process functions; override ``process_element`` (and ``on_timer``)."""

    def open(self, ctx: ProcessContext) -> None:
        """Called once before the first element (take state handles here)."""

    def process_element(self, row: dict[str, Any], ctx: ProcessContext) -> Iterable[dict] | None:
        """Handle one element of ``ctx.key``; return output rows."""
        raise NotImplementedError

    def on_timer(self, timestamp: int, ctx: ProcessContext) -> Iterable[dict] | None:
        """A timer of ``ctx.key`` registered for ``timestamp`` fired; return output rows."""
        return None

    def close(self) -> None:
        """Called once when the operator closes."""


class _FunctionAdapter(KeyedProcessFunction):
    """Runs a plain ``fn(row, ctx)`` (and an optional ``on_timer(ts, ctx)``) as a process function."""

    def __init__(self, fn: Callable[..., Any], on_timer: Callable[..., Any] | None = None) -> None:
        self.fn = fn
        self.timer_fn = on_timer

    def process_element(self, row: dict[str, Any], ctx: ProcessContext) -> Any:
        return self.fn(row, ctx)

    def on_timer(self, timestamp: int, ctx: ProcessContext) -> Any:
        if self.timer_fn is None:
            raise PlanError(f"a timer fired for key {ctx.key!r} at {timestamp}, but the process "
                            f"function {function_name(self.fn)} has no on_timer; pass "
                            f"KeyedProcess(fn, ..., on_timer=...) or subclass "
                            f"KeyedProcessFunction")
        return self.timer_fn(timestamp, ctx)


class ProcessContext:
    """What user code sees: the current key and time, state, timers and side outputs."""

    def __init__(self, op: KeyedProcess) -> None:
        self._op = op
        self.key: Any = None
        self.timestamp: int | None = None
        #: None while processing an element; "event_time" or "processing_time" in on_timer.
        self.time_domain: str | None = None

    @property
    def current_watermark(self) -> int:
        """The operator's watermark (µs; very negative before the first one)."""
        return self._op.watermark

    @property
    def task(self) -> Any:
        """The TaskContext of the running task (counters, partition)."""
        return self._op.ctx

    def timer_service(self) -> TimerService:
        """Timers of the current key."""
        return self._op.timers

    def current_processing_time(self) -> int:
        """The clock's time (µs)."""
        return self._op.timers.current_processing_time()

    def get_state(self, descriptor: StateDescriptor | str, default: Any = None
                  ) -> ValueState | ListState | MapState:
        """A state handle: from a descriptor, or a ``ValueState`` by name with a default."""
        if isinstance(descriptor, StateDescriptor):
            return self._op.store.get_state(descriptor)
        return self._op.store.value_state(descriptor, default)

    def get_list_state(self, name: str) -> ListState:
        """A ``ListState`` handle."""
        return self._op.store.list_state(name)

    def get_map_state(self, name: str) -> MapState:
        """A ``MapState`` handle."""
        return self._op.store.map_state(name)

    def output(self, tag: str, row: Any) -> None:
        """Send ``row`` to side output ``tag`` (drained with ``take_side_output(tag)``)."""
        if not isinstance(tag, str) or not tag:
            raise PlanError(f"side output tags are non-empty strings, got {tag!r}")
        self._op._side.setdefault(tag, []).append(row)


def _hashable(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, dict):
        return tuple((k, _hashable(x)) for k, x in v.items())
    return v


def _collect(res: Any, out: list[Any]) -> None:
    """Append what user code returned: None, one dict row, or an iterable of rows."""
    if res is None:
        return
    if isinstance(res, dict):
        out.append(res)
    elif isinstance(res, (str, bytes)) or not hasattr(res, "__iter__"):
        raise TypeError(f"a process function must return None, a dict row or an iterable of "
                        f"rows, got {type(res).__name__}")
    else:
        out.extend(res)


class KeyedProcess(Operator):
    """Runs a keyed process function over a stream keyed by ``key_by`` columns.

    ``fn`` is a :class:`KeyedProcessFunction` (instance or class) or a function
    ``fn(row, ctx)``; ``time_column`` (optional) gives ``ctx.timestamp``; ``clock`` drives
    processing-time timers (default: the wall clock); ``output_schema`` fixes the output
    types. The key is the column's value (a tuple for several key columns).
    ``state_memory_limit`` (bytes; default half the task's memory budget) bounds the keyed
    state and timers held in memory; the rest spills to local disk.
    """

    def __init__(self, fn: Any, key_by: list[str] | str, time_column: str | None = None,
                 clock: Clock | None = None, output_schema: pa.Schema | None = None,
                 on_timer: Callable[..., Any] | None = None, name: str | None = None,
                 state_memory_limit: int | None = None) -> None:
        if isinstance(fn, type) and issubclass(fn, KeyedProcessFunction):
            fn = fn()
        elif hasattr(fn, "process_element"):
            # every operator instance needs its own function object: state handles kept on
            # ``self`` in open() (the Flink pattern) must not be shared between partitions
            fn = cloudpickle.loads(cloudpickle.dumps(fn))
        if hasattr(fn, "process_element"):
            self.fn = fn
        elif callable(fn):
            self.fn = _FunctionAdapter(fn, on_timer)
        else:
            raise PlanError(f"KeyedProcess: fn must be a KeyedProcessFunction or a function "
                            f"fn(row, ctx), got {fn!r}")
        self.key_by = [key_by] if isinstance(key_by, str) else list(key_by)
        if not self.key_by:
            raise PlanError("KeyedProcess: key_by needs at least one column")
        self.time_column = time_column
        self.output_schema = output_schema
        self._fname = function_name(fn if not isinstance(self.fn, _FunctionAdapter)
                                    else self.fn.fn)
        super().__init__(name or f"KeyedProcess({self._fname}, key_by={self.key_by})")
        if state_memory_limit is not None and state_memory_limit < 0:
            raise PlanError(f"KeyedProcess: state_memory_limit must be >= 0 bytes, got "
                            f"{state_memory_limit}")
        #: bytes of keyed state and timers kept in memory (None: half the task memory budget)
        self.state_memory_limit = state_memory_limit
        self._spill = SpillArea()
        self.store = KeyedStateStore(spill=self._spill)
        # timers follow the store's current key: the per-element loop sets it once
        self.timers = TimerService(clock, spill=self._spill, key_source=self.store)
        self._configure_memory()
        self.watermark = MIN_TIME
        self._side: dict[str, list[Any]] = {}
        self._pctx = ProcessContext(self)
        self._opened = False

    # ----------------------------------------------------------------- interface

    def open(self, ctx: Any) -> None:
        super().open(ctx)
        self._spill.configure(ctx)
        self._configure_memory()
        self._call("open", None, lambda: self.fn.open(self._pctx))
        self._opened = True

    def _configure_memory(self) -> None:
        limit = (self.state_memory_limit if self.state_memory_limit is not None
                 else default_state_memory_limit(self.ctx))
        self.timers.configure(limit)
        self.store.configure(limit, reserved=self.timers.reserved_bytes)

    def state_memory_bytes(self) -> int:
        """Estimated bytes of keyed state and timers held in memory now."""
        return self.store.memory_bytes() + self.timers.memory_bytes()

    @property
    def peak_state_memory_bytes(self) -> int:
        """The largest estimate of state and timer bytes in memory seen at a budget check."""
        return self.store.peak_memory_bytes

    def spill_stats(self) -> dict[str, int]:
        """How much state is on disk: keys, timers, moves to disk, keys read back, file bytes."""
        return {"spilled_keys": self.store.num_spilled_keys(),
                "spilled_timers": self.timers.num_spilled_timers(),
                "spills": self._spill.spills, "keys_moved_out": self.store.spilled_keys,
                "keys_read_back": self.store.loaded_keys, "disk_bytes": self._spill.disk_bytes()}

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        """Run ``process_element`` on each row, in order; return the output rows as one batch."""
        if batch.num_rows == 0:
            return _EMPTY
        names = batch.schema.names
        missing = [k for k in self.key_by if k not in names]
        if missing:
            raise SchemaError(f"{self.name}: no key column(s) {missing}; columns are {names}")
        times: list[int | None] = [None] * batch.num_rows
        if self.time_column is not None:
            if self.time_column not in names:
                raise SchemaError(f"{self.name}: no time column {self.time_column!r}; columns "
                                  f"are {names}")
            t, valid = event_time_micros(batch.column(self.time_column), self.time_column)
            times = t.tolist()
            if valid is not None:
                times = [x if ok else None for x, ok in zip(times, valid.tolist())]
        rows = batch_to_rows(batch)
        if len(self.key_by) == 1:
            keys = [r[self.key_by[0]] for r in rows]
        else:
            keys = [tuple(r[k] for k in self.key_by) for r in rows]
        hashes = key_hashes([batch.column(k) for k in self.key_by], batch.num_rows).tolist()
        out: list[Any] = []
        pctx = self._pctx
        pctx.time_domain = None
        fn = self.fn.process_element
        store = self.store
        set_key = store.set_current_key
        step = CHECK_EVERY
        for start in range(0, len(rows), step):
            end = start + step
            for row, key, ts, h in zip(rows[start:end], keys[start:end], times[start:end],
                                       hashes[start:end]):
                try:
                    hash(key)
                except TypeError:
                    key = _hashable(key)
                set_key(key, h)
                pctx.key = key
                pctx.timestamp = ts
                try:
                    _collect(fn(row, pctx), out)
                except Exception as exc:
                    raise UserCodeFailure(self.name, f"{self._fname}.process_element", exc,
                                          _short(row)) from exc
            store.maintain()  # the memory limit is checked every ``step`` elements
        return self._batch(out)

    def on_watermark(self, watermark: int) -> Batches:
        """Advance event time; fire due event-time timers in timestamp order."""
        self.watermark = max(self.watermark, int(watermark))
        self.timers.watermark = self.watermark
        out: list[Any] = []
        self._fire_due(self.timers.pop_due_event, lambda: self.watermark, "event_time", out)
        return self._batch(out)

    def advance_processing_time(self) -> Batches:
        """Fire processing-time timers the clock has reached (call after the clock moves)."""
        out: list[Any] = []
        self._fire_due(self.timers.pop_due_processing, self.timers.clock.now,
                       "processing_time", out)
        return self._batch(out)

    def finish(self) -> Batches:
        """End of input: the watermark goes to +infinity, firing every event-time timer.

        Pending processing-time timers do not fire (the input ended before their time).
        """
        return self.on_watermark(MAX_TIME)

    def take_side_output(self, tag: str) -> list[pa.RecordBatch]:
        """Rows sent to side output ``tag`` since the last call, as record batches."""
        rows = self._side.pop(tag, [])
        return [rows_to_batch(rows)] if rows else []

    def side_output_tags(self) -> list[str]:
        """Tags that currently hold rows."""
        return [t for t, rows in self._side.items() if rows]

    def snapshot(self) -> dict[str, Any]:
        """Keyed state and timers (spilled ones too), watermark and undrained side outputs."""
        return {"version": 2, "operator": "KeyedProcess", "store": self.store.snapshot(),
                "timers": self.timers.snapshot(), "watermark": self.watermark,
                "side": cloudpickle.dumps(self._side)}

    def restore(self, state: dict[str, Any]) -> None:
        """Restore from ``snapshot()`` (before or after ``open``)."""
        if not isinstance(state, dict) or state.get("operator") != "KeyedProcess":
            raise PlanError(f"{self.name}: cannot restore from {type(state).__name__}: not a "
                            f"KeyedProcess snapshot")
        hashes = state.get("key_hashes")  # version 1 kept them here
        self.store.restore(state["store"], hashes)
        self.timers.restore(state["timers"], hashes)
        self.watermark = state["watermark"]
        self._side = cloudpickle.loads(state["side"])

    #: Its state is keyed, so it can be split by key group and restored at another parallelism.
    is_keyed = True

    def snapshot_by_key_group(self, key_groups: int) -> dict[int, dict[str, Any]]:
        """Keyed state and timers split by key group (hash of the key columns mod ``key_groups``).

        Spilled state is included (its rows are copied from disk as they are). Each group's
        snapshot also carries the watermark; undrained side output rows go with the
        smallest group (group 0 when no key holds state).
        """
        stores = self.store.snapshot_groups(key_groups)
        timers = self.timers.snapshot_groups(key_groups)
        groups = {g: self._group_state(g, stores.get(g), timers.get(g), None)
                  for g in sorted(set(stores) | set(timers))}
        if any(self._side.values()):
            first = min(groups, default=0)
            groups.setdefault(first, self._group_state(first, None, None, None))
            groups[first]["side"] = cloudpickle.dumps(self._side)
        return groups

    def iter_key_group_snapshots(self, key_groups: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """``snapshot_by_key_group`` one group at a time, in group order: spilled keyed
        state is split by group on disk first, so a checkpoint needs memory for one group's
        spilled rows (plus the resident state and the timers), not for all of it. Side
        output rows go with the first group."""
        timers = self.timers.snapshot_groups(key_groups)
        side = cloudpickle.dumps(self._side) if any(self._side.values()) else None
        first = True
        stores = self.store.iter_snapshot_groups(key_groups)
        pending = sorted(timers)

        def group(g: int, store: Any) -> dict[str, Any]:
            nonlocal first
            st = self._group_state(g, store, timers.get(g), side if first else None)
            first = False
            return st

        for g, store in stores:
            while pending and pending[0] < g:  # groups with timers but no state
                t = pending.pop(0)
                yield t, group(t, None)
            if pending and pending[0] == g:
                pending.pop(0)
            yield g, group(g, store)
        for t in pending:
            yield t, group(t, None)
        if first and side is not None:
            yield 0, group(0, None)

    def _group_state(self, g: int, store: Any, timers: Any, side: bytes | None
                     ) -> dict[str, Any]:
        """One key group's snapshot: its keyed state, timers, the watermark, side outputs."""
        return {"version": 2, "operator": "KeyedProcess", "key_group": g, "store": store,
                "timers": timers, "watermark": self.watermark, "side": side}

    #: ``restore_key_groups`` takes ``load``: blob references are read one group at a time
    restores_key_groups_lazily = True

    def restore_key_groups(self, states: list[dict[str, Any]], load: Any = None) -> None:
        """Restore from ``snapshot_by_key_group`` states of the key groups this instance owns.

        With ``load`` (resolves checkpoint blob references in a value), each group's keyed
        state is read and put in place (spilling as it comes in) before the next."""
        for st in states:
            if not isinstance(st, dict) or st.get("operator") != "KeyedProcess" \
                    or "key_group" not in st:
                raise PlanError(f"{self.name}: cannot restore from {type(st).__name__}: not a "
                                f"KeyedProcess key-group snapshot")
        if load is not None:  # the small parts at once, the keyed state group by group
            states = [{**st, "timers": load(st["timers"]), "side": load(st.get("side"))}
                      for st in states]
        hashes = {k: h for st in states for k, h in (st.get("key_hashes") or {}).items()}
        stores = (load(st["store"]) if load is not None else st["store"]
                  for st in states if st["store"] is not None)
        self.store.restore_many(stores, hashes)
        self.timers.restore_many([st["timers"] for st in states if st["timers"] is not None],
                                 max([MIN_TIME, *(st["watermark"] for st in states)]), hashes)
        self.watermark = max([MIN_TIME, *(st["watermark"] for st in states)])
        self._side = {}
        for st in states:
            if st.get("side"):
                for tag, rows in cloudpickle.loads(st["side"]).items():
                    self._side.setdefault(tag, []).extend(rows)

    def close(self) -> None:
        """Call the function's ``close()``, then drop the state and delete its spill file."""
        try:
            if self._opened:
                self._opened = False
                self._call("close", None, self.fn.close)
        finally:
            self.store.close()
            self.timers.close()
            self._spill.close()

    # ----------------------------------------------------------------- internals

    def _fire_due(self, pop: Callable[[int], tuple[int, Any, int | None] | None],
                  now: Callable[[], int], domain: str, out: list[Any]) -> None:
        """Fire the due timers ``pop(now())`` returns, in order; check memory as elements do."""
        fire = self._fire
        while True:
            for _ in range(CHECK_EVERY):
                due = pop(now())
                if due is None:
                    break
                fire(due[0], due[1], due[2], domain, out)
            else:
                self.store.maintain()
                continue
            break
        self.store.maintain()

    def _fire(self, ts: int, key: Any, h: int | None, domain: str, out: list[Any]) -> None:
        self._pctx.key = key
        self.store.set_current_key(key, h)
        self._pctx.timestamp = ts
        self._pctx.time_domain = domain
        try:
            _collect(self.fn.on_timer(ts, self._pctx), out)
        except Exception as exc:
            raise UserCodeFailure(self.name, f"{self._fname}.on_timer", exc,
                                  f"{domain} timer at {ts} for key {key!r}") from exc
        finally:
            self._pctx.time_domain = None

    def _call(self, what: str, record: str | None, thunk: Callable[[], Any]) -> Any:
        try:
            return thunk()
        except Exception as exc:
            raise UserCodeFailure(self.name, f"{self._fname}.{what}", exc, record) from exc

    def _batch(self, rows: list[Any]) -> Batches:
        if not rows:
            return _EMPTY
        return (rows_to_batch(rows, self.output_schema),)
