"""Event-time and streaming parts of the Dataset API: watermarks, windows, keyed process
functions, and ``start`` (run a pipeline as a streaming job).

Windowed aggregation and process functions run in batch mode too (``collect()`` on a
bounded source: shuffle by key, then the operator, whose ``finish()`` acts as watermark
+infinity), so a bounded pipeline gives the same result in batch and streaming mode
(as long as no event is late for the watermark the stream had).
"""

from __future__ import annotations

import datetime as _dt
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from millstream.core.units import parse_duration
from millstream.errors import PlanError
from millstream.expr.agg_functions import plan_aggregates
from millstream.expr.nodes import Expr, col, contains_aggregate
from millstream.expr.windows import (
    CountTrigger,
    EventTimeTrigger,
    GlobalWindow,
    ProcessingTimeTrigger,
    Session,
    Sliding,
    Trigger,
    Tumbling,
    WindowAssigner,
)
from millstream.plan import logical as L

if TYPE_CHECKING:
    from millstream.api.dataset import Dataset

Duration = str | int | _dt.timedelta


def tumbling(size: Duration, offset: Duration = 0) -> Tumbling:
    """Fixed, non-overlapping windows of ``size`` ("1m", "1h", timedelta or µs)."""
    return Tumbling(size, offset)


def sliding(size: Duration, every: Duration, offset: Duration = 0) -> Sliding:
    """Windows of ``size`` starting every ``every``."""
    return Sliding(size, every, offset)


def session(gap: Duration) -> Session:
    """Per-key sessions closed after ``gap`` without events."""
    return Session(gap)


def global_window(trigger: Trigger | list[Trigger] | None = None,
                  accumulate: bool = False) -> GlobalWindow:
    """One window per key over all time, emitted whenever ``trigger`` fires and at the end of input.

    ``trigger``: ``ms.count_trigger(n)``, ``ms.processing_time_trigger(interval)``,
    ``ms.event_time_trigger(every)``, or several joined with ``|`` (fire when any fires);
    None fires only at the end of a bounded input. ``accumulate=False`` (default) emits the
    aggregate of the elements since the key's previous firing ("discarding" panes, Flink's
    FIRE_AND_PURGE); ``accumulate=True`` emits the aggregate of all the key's elements so far
    and adds ``is_update`` (True when the row supersedes an earlier row of the key). Results
    have the group keys and the aggregates, and no ``window_start``/``window_end``: a
    global window has no bounds.
    """
    return GlobalWindow(trigger, accumulate)


def count_trigger(count: int) -> CountTrigger:
    """Fire a key's global window every ``count`` elements of that key."""
    return CountTrigger(count)


def processing_time_trigger(interval: Duration) -> ProcessingTimeTrigger:
    """Fire a key's global window at the next multiple of ``interval`` of processing time
    (aligned to the epoch) after the first element since its previous firing."""
    return ProcessingTimeTrigger(interval)


def event_time_trigger(every: Duration, offset: Duration = 0) -> EventTimeTrigger:
    """Fire a key's global window when the watermark reaches the next multiple of ``every``
    (plus ``offset``) after the earliest event time since its previous firing."""
    return EventTimeTrigger(every, offset)


def watermark_column(node: L.Node) -> str | None:
    """The event-time column set by the nearest ``with_watermark`` upstream of ``node``."""
    while True:
        if isinstance(node, L.WithWatermark):
            return node.column
        if isinstance(node, (L.WindowAggregate, L.KeyedProcess)) or len(node.children) != 1:
            return None
        node = node.children[0]


def with_watermark(node: L.Node, column: str, delay: Duration = "5s",
                   idle_timeout: Duration | None = None) -> L.WithWatermark:
    """Declare ``column`` the event time; watermark = max event time seen - ``delay``."""
    if not isinstance(column, str):
        raise PlanError(f"with_watermark: column must be a column name, got {column!r}")
    idle = None if idle_timeout is None else parse_duration(idle_timeout, "idle_timeout")
    return L.WithWatermark(node, column, parse_duration(delay, "delay"), idle)


def _items(aggs: tuple[Any, ...], named: dict[str, Any]) -> list[Expr]:
    items: list[Any] = []
    for a in aggs:
        items.extend(a if isinstance(a, (list, tuple)) else [a])
    for name, a in named.items():
        if not isinstance(a, Expr) or not contains_aggregate(a):
            raise PlanError(f"agg({name}=...) needs an aggregate such as ms.sum('x'), got {a!r}")
        items.append(a.alias(name))
    for a in items:
        if not isinstance(a, Expr) or not contains_aggregate(a):
            raise PlanError(f"window(...).agg() takes aggregates such as ms.sum('x'), or "
                            f"expressions over them, got {a!r}")
    if not items:
        raise PlanError("window(...).agg() needs at least one aggregate")
    return items


def _string_keys(keys: list[Any], what: str) -> tuple[str, ...]:
    if not all(isinstance(k, str) for k in keys):
        raise PlanError(f"{what} needs group_by keys that are column names, got {keys!r}; add "
                        f"computed keys with with_columns(...) first")
    return tuple(keys)


class WindowedDataset:
    """``window(...)`` of a Dataset or a grouped Dataset; ``agg(...)`` makes the result."""

    def __init__(self, ds: Dataset, keys: tuple[str, ...], window: WindowAssigner,
                 on: str | None, allowed_lateness: int) -> None:
        self._ds = ds
        self._keys = keys
        self._window = window
        self._on = on
        self._lateness = allowed_lateness

    def agg(self, *aggs: Any, **named: Any) -> Dataset:
        """One row per key and window: ``window_start``, ``window_end``, keys, aggregates
        (global windows: one row per key and firing, keys and aggregates)."""
        items = _items(aggs, named)
        plan = plan_aggregates(items, list(self._keys), "window(...).agg()")
        node: L.Node = L.WindowAggregate(self._ds._node, self._window, self._keys,
                                         plan.specs, self._on, self._lateness)
        if plan.projection is not None:
            # expressions over aggregates: computed from the window's results, in agg() order
            glob = isinstance(self._window, GlobalWindow)
            flags = ((["is_update"] if self._window.accumulate else []) if glob else
                     (["is_update"] + (["is_retraction"] if self._window.merging else [])
                      if self._lateness > 0 else []))
            bounds = [] if glob else ["window_start", "window_end"]
            node = L.Project(node, (*(col(c) for c in bounds), *plan.projection,
                                    *(col(c) for c in flags)))
        return type(self._ds)(node)

    def count(self) -> Dataset:
        """Rows per key and window, in column ``count``."""
        from millstream.expr.agg_functions import count

        return self.agg(count().alias("count"))


def window(ds: Dataset, assigner: WindowAssigner, on: str | None = None,
           allowed_lateness: Duration | None = None, keys: list[Any] | None = None
           ) -> WindowedDataset:
    """Window ``ds`` by event time (``on``: the column; default: the ``with_watermark`` one).

    A global window needs no event-time column unless it has an ``event_time_trigger``.
    """
    if not isinstance(assigner, WindowAssigner):
        raise PlanError(f"window() needs ms.tumbling(...), ms.sliding(...), ms.session(...) or "
                        f"ms.global_window(...), got {assigner!r}")
    lateness = 0 if allowed_lateness is None else parse_duration(allowed_lateness,
                                                                 "allowed_lateness")
    on = on or watermark_column(ds._node)
    if isinstance(assigner, GlobalWindow):
        if lateness:
            raise PlanError("window(ms.global_window(...)): a global window never closes, so "
                            "allowed_lateness does not apply to it; leave it out")
        if assigner.every is None:
            on = None  # the event time plays no part
        elif on is None:
            raise PlanError("window(ms.global_window(trigger=ms.event_time_trigger(...))): "
                            "give the event-time column with on=... or call "
                            "with_watermark(column, ...) first")
        return WindowedDataset(ds, _string_keys(keys or [], "window()"), assigner, on, 0)
    if on is None:
        raise PlanError("window(): give the event-time column with on=... or call "
                        "with_watermark(column, ...) first")
    return WindowedDataset(ds, _string_keys(keys or [], "window()"), assigner, on, lateness)


def process(node: L.Node, keys: list[Any], fn: Any, time_column: str | None = None,
            output_schema: pa.Schema | None = None, on_timer: Any = None) -> L.KeyedProcess:
    """Run a keyed process function (``KeyedProcessFunction`` or ``fn(row, ctx)``) per key."""
    names = _string_keys(keys, "process()")
    if not names:
        raise PlanError("process() needs group_by(...) keys")
    time_column = time_column or watermark_column(node)
    return L.KeyedProcess(node, fn, names, time_column, output_schema, on_timer)


def start(node: L.Node, checkpoint: str | None = None, checkpoint_interval: Duration = "10s",
          sink: Any = None, executor: str | None = None, **options: Any) -> Any:
    """Run the plan ``node`` as a streaming job.

    ``executor="parallel"`` (the default) runs every stage partition as a long-lived task
    on the session's runner (worker processes, or Ray actors); ``executor="inline"`` runs
    the same tasks in this process, round by round and deterministically (test sources,
    virtual clocks and fault points need it, and pick it by themselves).
    """
    from millstream.runtime.streaming.job import StreamingJob
    from millstream.runtime.streaming.layout import choose_executor

    chosen = choose_executor(node, executor, options)
    fault = options.pop("_fault", None)
    return StreamingJob(node, checkpoint, checkpoint_interval, sink, executor=chosen,
                        fault=fault, **options).start()
