"""Window operators: keyed event-time window aggregation (tumbling, sliding, session),
global windows with triggers, and map-side window combining.

The window and trigger specs themselves are in :mod:`millstream.expr.windows`. Modules:
``operator`` (:class:`WindowAggregate`: assignment, firing, lateness, side outputs),
``panes`` (tumbling and sliding state, spilled), ``sessions`` and ``session_spill``
(session state, spilled), ``snapshots`` (checkpoints, by key group), ``combiner``
(:class:`WindowCombiner`), ``global_window`` (:class:`GlobalWindowAggregate`,
:class:`ProcessingTimeService`), ``tables`` (state table helpers).

Conventions
-----------
* Event time comes from a timestamp column (any unit, with or without a time zone), an
  integer column of epoch milliseconds, or a date column; inside, it is int64 microseconds
  since the epoch (see :func:`millstream.core.arrow.event_time_micros`).
* A watermark ``W`` (int64 microseconds) says "no more events with event time <= W are
  expected". A window ``[start, end)`` fires when ``end <= W``. It is *expired* when
  ``end + allowed_lateness <= W``: its state is dropped and an event that would only fall
  into expired windows is *late*: it goes to the side output ``"late"`` (never dropped
  silently) and is counted in the ``("millstream", "late_records")`` counter.
* A sliding-window event lies in several windows; it is late only when all of them are
  expired, otherwise it counts in those still held (as in Flink).
* Rows with a null event time go to the side output ``"invalid"`` (counter
  ``invalid_time_records``).
* ``first`` and ``collect_list`` follow arrival order (for sessions that merged: the order
  of the merged sessions' first arrivals).
* Results have the columns ``window_start``, ``window_end`` (timestamp[us], with the time
  zone of the input column, if any), the group keys, the aggregates (named as their
  ``AggSpec.name``), and, when ``allowed_lateness > 0``, a boolean ``is_update``
  (global windows differ: see :mod:`~millstream.ops.window.global_window`).

Updates (``allowed_lateness > 0``): a window first fires with ``is_update = False``; an
allowed late event (its window already fired but is not expired) makes the operator emit,
at once, a new row for that key and window with ``is_update = True`` that *supersedes*
the earlier row for the same key and window (upsert semantics: a sink keyed by
``(window_start, window_end, *keys)`` keeps the last row). Tumbling and sliding windows
never move, so that is all they need. Session windows can grow or merge when a late
event arrives; their results then also carry ``is_retraction``: before the row of the
new window, the operator emits one row per window that session was emitted under
before, with ``is_retraction = True`` (aggregates null), meaning "delete the row with this
key and window". ``is_update`` is True exactly when a row for the same key and window
was emitted before and not retracted. With ``allowed_lateness = 0`` a window is emitted
once and neither column exists.

State is kept as Arrow tables of partial aggregation states, never a Python object per
event: tumbling and sliding windows keep one *pane* per window end, session windows keep
one table of sessions per hash bucket of the key; both spill to disk over
``state_memory_limit`` (default: half the task's ``memory_budget``).
"""

from millstream.ops.window.combiner import WindowCombiner
from millstream.ops.window.global_window import GlobalWindowAggregate, ProcessingTimeService
from millstream.ops.window.operator import WindowAggregate

__all__ = ["GlobalWindowAggregate", "ProcessingTimeService", "WindowAggregate", "WindowCombiner"]
