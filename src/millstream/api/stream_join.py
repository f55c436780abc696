"""Stream joins and streaming sinks of the Dataset API.

* ``left.interval_join(right, on, between=(lower, upper))``: stream-stream join of rows
  with equal keys and ``left.t + lower <= right.t <= left.t + upper`` (Flink's interval
  join; Spark expresses it as a join with a time-range condition).
* ``left.window_join(right, on, window=ms.tumbling("1m"))``: rows of both inputs in the
  same key and event-time window, emitted when the window closes (Flink's window join).
* ``left.join_latest(changelog, on)``: each left row joins the latest right row of its
  key seen so far (Flink's processing-time temporal join / a lookup into a table kept
  up to date by a changelog stream).
* ``stream.join(bounded)`` (the ordinary :meth:`Dataset.join`): in a streaming job the
  bounded right side is computed once when the job starts and broadcast to every task
  (Spark's stream-static join); inner, left, semi and anti joins.
* ``stream.join(other_stream, on, how, state_ttl="1h")``: a regular join of two streams
  (Flink's): every row is kept (until its state TTL) and joined with the other side's
  rows of its key whenever they come; outer joins emit updates (a row without a partner,
  taken back when its first partner comes); inputs may carry updates.

All of them also run in batch mode on bounded inputs, with the streaming result
whenever no row was late. Semantics in detail: :mod:`millstream.ops.stream_join`.

Sinks for ``start(sink=...)``: :func:`sink` (a function called with each committed
epoch's rows, like Spark's ``foreachBatch``) and :func:`console` (prints them).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from millstream.api.stream import watermark_column
from millstream.core.units import parse_duration
from millstream.errors import PlanError
from millstream.expr.nodes import Alias, Column
from millstream.expr.windows import Sliding, Tumbling, WindowAssigner
from millstream.plan import logical as L

if TYPE_CHECKING:
    from millstream.io.stream_sinks import ConsoleSink

Duration = str | int | _dt.timedelta
Keys = str | Sequence[str] | None

_STREAM_HOW = ("inner", "left", "right", "outer", "full")


def signed_duration(value: Duration, what: str) -> int:
    """A duration that may be negative ("-5s", "5s", timedelta, int µs) in microseconds."""
    if isinstance(value, str) and value.strip().startswith("-"):
        return -parse_duration(value.strip()[1:], what)
    if isinstance(value, _dt.timedelta) and value < _dt.timedelta(0):
        return -parse_duration(-value, what)
    if isinstance(value, int) and not isinstance(value, bool) and value < 0:
        return -parse_duration(-value, what)
    return parse_duration(value, what)


def _join_keys(on: Keys, left_on: Keys, right_on: Keys, what: str
               ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    def names(v: Any) -> tuple[str, ...]:
        out = (v,) if isinstance(v, str) else tuple(v)
        if not all(isinstance(k, str) for k in out):
            raise PlanError(f"{what}: keys must be column names, got {v!r}")
        return out

    if on is not None:
        if left_on is not None or right_on is not None:
            raise PlanError(f"{what}: give either on= or left_on=/right_on=, not both")
        lk = rk = names(on)
    else:
        if left_on is None or right_on is None:
            raise PlanError(f"{what} needs on= (same key names) or both left_on= and right_on=")
        lk, rk = names(left_on), names(right_on)
    if len(lk) != len(rk) or not lk:
        raise PlanError(f"{what}: left keys {list(lk)} and right keys {list(rk)} must be "
                        f"non-empty and as many")
    return lk, rk


def _times(left: L.Node, right: L.Node, left_time: str | None, right_time: str | None,
           what: str) -> tuple[str, str]:
    lt = left_time or watermark_column(left)
    rt = right_time or watermark_column(right)
    for side, t, arg in (("left", lt, "left_time"), ("right", rt, "right_time")):
        if t is None:
            raise PlanError(f"{what}: the {side} input has no event-time column; give "
                            f"{arg}=... or call with_watermark(column, ...) on it first")
        if not isinstance(t, str):
            raise PlanError(f"{what}: {arg} must be a column name, got {t!r}")
    return lt, rt


def event_time_column(node: L.Node) -> str | None:
    """The name, in ``node``'s output, of the column the nearest ``with_watermark``
    upstream declared the event time: followed through renames and ``select`` aliases of
    the plain column; None when there is none or a step drops or recomputes it."""
    path: list[L.Node] = []
    while not isinstance(node, L.WithWatermark):
        if isinstance(node, (L.WindowAggregate, L.KeyedProcess)) or len(node.children) != 1:
            return None
        path.append(node)
        node = node.children[0]
    name: str | None = node.column
    for step in reversed(path):
        if isinstance(step, L.Rename):
            name = dict(step.mapping).get(name, name)
        elif isinstance(step, L.Project):
            name = next((e.output_name for e in step.exprs
                         if isinstance(e.child if isinstance(e, Alias) else e, Column)
                         and (e.child if isinstance(e, Alias) else e).name == name), None)
        elif isinstance(step, L.Drop):
            name = None if name in step.columns else name
        elif isinstance(step, L.WithColumns):
            name = None if name in step.produced() else name
        if name is None:
            return None
    return name


def join_state_ttl(left: L.Node, right: L.Node, state_ttl: Duration | None
                   ) -> tuple[int | None, tuple[str | None, str | None]]:
    """A join's ``state_ttl`` in µs and the (left, right) event-time columns it runs on:
    each input's ``with_watermark`` column when both carry theirs, else (None, None) and
    the TTL runs on processing time."""
    if state_ttl is None:
        return None, (None, None)
    ttl = parse_duration(state_ttl, "state_ttl")
    if ttl <= 0:
        raise PlanError(f"join: state_ttl must be a positive duration, got {state_ttl!r}")
    lt, rt = event_time_column(left), event_time_column(right)
    return ttl, ((lt, rt) if lt is not None and rt is not None else (None, None))


def _how(how: str, allowed: tuple[str, ...], what: str) -> str:
    if how not in allowed:
        raise PlanError(f"{what}: how={how!r} is not one of {', '.join(allowed)}")
    return "outer" if how == "full" else how


def interval_join(left: L.Node, right: L.Node, on: Keys = None,
                  between: tuple[Duration, Duration] | None = None, *, left_on: Keys = None,
                  right_on: Keys = None, left_time: str | None = None,
                  right_time: str | None = None, how: str = "inner",
                  suffix: str = "_right") -> L.IntervalJoin:
    """Join rows with equal keys whose right time lies in [left time + lower, left time + upper].

    ``between=(lower, upper)``: durations, negative allowed ("-5m", "0s"), bounds
    inclusive. Event times default to each input's ``with_watermark`` column. ``how``:
    inner, left, right or outer (unmatched rows are emitted once the watermark shows
    they cannot match any more). Rows older than the watermark on arrival go to the
    "late" side output (with a ``join_side`` column). Unlike Flink, outer joins are
    supported and the output has all columns of both inputs (same-named keys once,
    other name clashes get ``suffix``).
    """
    what = "interval_join"
    lk, rk = _join_keys(on, left_on, right_on, what)
    if not isinstance(between, (tuple, list)) or len(between) != 2:
        raise PlanError(f"{what}: between=(lower, upper) is required, e.g. between=('-5m', "
                        f"'10m'), got {between!r}")
    lower = signed_duration(between[0], f"{what} lower bound")
    upper = signed_duration(between[1], f"{what} upper bound")
    if lower > upper:
        raise PlanError(f"{what}: between=(lower, upper) needs lower <= upper, got {between!r}")
    lt, rt = _times(left, right, left_time, right_time, what)
    return L.IntervalJoin(left, right, lk, rk, lower, upper, lt, rt,
                          _how(how, _STREAM_HOW, what), suffix)


def window_join(left: L.Node, right: L.Node, on: Keys = None,
                window: WindowAssigner | None = None, *, left_on: Keys = None,
                right_on: Keys = None, left_time: str | None = None,
                right_time: str | None = None, how: str = "inner",
                suffix: str = "_right") -> L.WindowJoin:
    """Join rows with equal keys in the same tumbling or sliding event-time window.

    A window's pairs are emitted when the watermark passes the window's end, with
    ``window_start`` and ``window_end`` first. ``how``: inner, left, right or outer
    (Flink's window join is inner only; its coGroup gives the outer forms). Rows whose
    windows all closed before they arrived go to the "late" side output.
    """
    what = "window_join"
    lk, rk = _join_keys(on, left_on, right_on, what)
    if not isinstance(window, (Tumbling, Sliding)):
        raise PlanError(f"{what}: window= needs ms.tumbling(...) or ms.sliding(...), got "
                        f"{window!r}; session and global windows are not supported (use "
                        f"interval_join(...))")
    lt, rt = _times(left, right, left_time, right_time, what)
    return L.WindowJoin(left, right, lk, rk, window, lt, rt, _how(how, _STREAM_HOW, what),
                        suffix)


def join_latest(left: L.Node, changelog: L.Node, on: Keys = None, *, left_on: Keys = None,
                right_on: Keys = None, how: str = "inner", version: str | None = None,
                deleted: str | None = None, suffix: str = "_right") -> L.LatestJoin:
    """Join each left row with the latest row of its key in ``changelog`` seen so far.

    Processing-time semantics (Flink's temporal join on a processing-time attribute):
    a left row meets the right row its key holds when the left row is processed, and is
    emitted at once; later updates do not change earlier results. In batch mode the
    changelog is read completely first, so every left row meets its key's last version.
    ``how``: inner or left. ``version``: a right column; a row replaces the held one
    only when its version is not smaller. ``deleted``: a boolean right column whose true
    value deletes the key. The changelog's event time does not hold back the job's
    watermark. The right state keeps one row per key, for the life of the job.
    """
    what = "join_latest"
    lk, rk = _join_keys(on, left_on, right_on, what)
    for arg, v in (("version", version), ("deleted", deleted)):
        if v is not None and not isinstance(v, str):
            raise PlanError(f"{what}: {arg}= must be a column name, got {v!r}")
    return L.LatestJoin(left, changelog, lk, rk, _how(how, ("inner", "left"), what), suffix,
                        version, deleted)


def sink(fn: Callable[..., Any], skip_empty: bool = True, delivery: str = "committed") -> Any:
    """A streaming sink calling ``fn`` with the job's rows, as one ``pyarrow.Table``.

    ``delivery="committed"`` (the default): ``fn(table)`` or ``fn(table, epoch)`` once per
    committed epoch, in the driver, after the epoch's checkpoint is complete (like Spark's
    ``foreachBatch``); after a restart an epoch may be delivered again with the same rows
    and epoch number: at-least-once, or exactly-once when ``fn`` is idempotent per epoch.
    ``delivery="immediate"``: ``fn(table)`` with every output batch as soon as it is made,
    in the task that made it (a worker process on the parallel executor): the lowest
    latency, at-least-once (rows replayed after a restart come again).
    """
    from millstream.errors import PlanError
    from millstream.io.stream_sinks import CallbackSink, ImmediateSink

    if delivery == "immediate":
        return ImmediateSink(fn)
    if delivery != "committed":
        raise PlanError(f"ms.sink: delivery must be 'committed' or 'immediate', got "
                        f"{delivery!r}")
    return CallbackSink(fn, skip_empty=skip_empty)


def console(num_rows: int = 20, truncate: bool = True, file: Any = None) -> ConsoleSink:
    """A streaming sink printing each committed epoch's rows as a table (debugging)."""
    from millstream.io.stream_sinks import ConsoleSink

    return ConsoleSink(num_rows=num_rows, truncate=truncate, file=file)
