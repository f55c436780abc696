"""Window specs: the assigners that map event times to windows (tumbling, sliding, session,
global) and the triggers that fire a global window (count, processing time, event time).

These are what ``ms.tumbling(...)``, ``ms.global_window(...)`` and the trigger functions
return and what the logical plan holds; the operators that run them are in
:mod:`millstream.ops.window`. Times and durations are int64 microseconds inside
(``"1m"``, a ``timedelta`` or µs outside).

Tumbling windows ``[start, start + size)`` are aligned to the epoch plus ``offset``;
sliding windows of ``size`` start every ``every``, so an event lies in about
``size / every`` of them. A session is ``[first event, last event + gap)`` per key, and
sessions that overlap merge (the only *merging* assigner). A global window is one window
per key over all time with no bounds; its trigger decides when a key's window emits:
``CountTrigger(n)`` every n elements of the key, ``ProcessingTimeTrigger(interval)`` at
the first multiple of ``interval`` of processing time after the first pending element,
``EventTimeTrigger(every, offset)`` when the watermark reaches the first multiple of
``every`` (plus ``offset``) after the earliest pending event time; several joined with
``|`` fire when any does.
"""

from __future__ import annotations

import datetime as _dt

import numpy as np

from millstream.core.units import format_duration, parse_duration
from millstream.errors import PlanError

# --------------------------------------------------------------------------- assigners


class WindowAssigner:
    """Maps event times to windows ``[start, end)`` (microseconds)."""

    #: Merging assigners (sessions) grow and merge windows per key.
    merging: bool = False

    def assign(self, t: np.ndarray) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """(row index per window or None for one window per row, starts, ends)."""
        raise NotImplementedError

    def describe(self) -> str:
        """Short text for explain()."""
        return type(self).__name__


class Tumbling(WindowAssigner):
    """Fixed, non-overlapping windows of ``size``, aligned to the epoch plus ``offset``."""

    def __init__(self, size: str | int | _dt.timedelta, offset: str | int | _dt.timedelta = 0
                 ) -> None:
        self.size = parse_duration(size, "Tumbling(size)")
        if self.size <= 0:
            raise PlanError(f"Tumbling(size): must be positive, got {size!r}")
        self.offset = parse_duration(offset, "Tumbling(offset)") % self.size

    def assign(self, t: np.ndarray) -> tuple[None, np.ndarray, np.ndarray]:
        start = np.floor_divide(t - self.offset, self.size) * self.size + self.offset
        return None, start, start + self.size

    def describe(self) -> str:
        off = f", offset={format_duration(self.offset)}" if self.offset else ""
        return f"Tumbling({format_duration(self.size)}{off})"


class Sliding(WindowAssigner):
    """Windows of ``size`` starting every ``every``: each event lies in about size/every windows."""

    def __init__(self, size: str | int | _dt.timedelta, every: str | int | _dt.timedelta,
                 offset: str | int | _dt.timedelta = 0) -> None:
        self.size = parse_duration(size, "Sliding(size)")
        self.every = parse_duration(every, "Sliding(every)")
        if self.size <= 0 or self.every <= 0:
            raise PlanError(f"Sliding: size and every must be positive, got size={size!r}, "
                            f"every={every!r}")
        if self.every > self.size:
            raise PlanError(f"Sliding: every ({every!r}) is larger than size ({size!r}); events "
                            f"between windows would belong to no window")
        self.offset = parse_duration(offset, "Sliding(offset)") % self.every

    def assign(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = len(t)
        k = -(-self.size // self.every)
        last = np.floor_divide(t - self.offset, self.every) * self.every + self.offset
        starts = last[:, None] - (np.arange(k, dtype=np.int64) * self.every)[None, :]
        inside = (starts + self.size > t[:, None]).ravel()
        idx = np.repeat(np.arange(n, dtype=np.int64), k)[inside]
        s = starts.ravel()[inside]
        return idx, s, s + self.size

    def describe(self) -> str:
        off = f", offset={format_duration(self.offset)}" if self.offset else ""
        return f"Sliding({format_duration(self.size)}, every={format_duration(self.every)}{off})"


class Session(WindowAssigner):
    """Per-key sessions: events less than ``gap`` apart share a window ``[first, last + gap)``."""

    merging = True

    def __init__(self, gap: str | int | _dt.timedelta) -> None:
        self.gap = parse_duration(gap, "Session(gap)")
        if self.gap <= 0:
            raise PlanError(f"Session(gap): must be positive, got {gap!r}")

    def assign(self, t: np.ndarray) -> tuple[None, np.ndarray, np.ndarray]:
        return None, t, t + self.gap

    def describe(self) -> str:
        return f"Session(gap={format_duration(self.gap)})"


# --------------------------------------------------------------------------- triggers


class Trigger:
    """When a global window emits a key's aggregate ("fires"); combine triggers with ``|``."""

    def parts(self) -> tuple[Trigger, ...]:
        """The single triggers this one fires on (any of them)."""
        return (self,)

    def describe(self) -> str:
        """Short text for explain()."""
        return type(self).__name__

    def __or__(self, other: Trigger) -> AnyTrigger:
        return AnyTrigger(self, other)

    def __repr__(self) -> str:
        return self.describe()


class CountTrigger(Trigger):
    """Fires a key every ``count`` elements of that key (in arrival order)."""

    def __init__(self, count: int) -> None:
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
            raise PlanError(f"count_trigger: count must be a positive int, got {count!r}")
        self.count = int(count)

    def describe(self) -> str:
        return f"count({self.count})"


class ProcessingTimeTrigger(Trigger):
    """Fires a key at the first multiple of ``interval`` of processing time (epoch-aligned)
    after the first element of its pending pane arrived."""

    def __init__(self, interval: str | int | _dt.timedelta) -> None:
        self.interval = parse_duration(interval, "processing_time_trigger(interval)")
        if self.interval <= 0:
            raise PlanError(f"processing_time_trigger: interval must be positive, got "
                            f"{interval!r}")

    def describe(self) -> str:
        return f"processing_time({format_duration(self.interval)})"


class EventTimeTrigger(Trigger):
    """Fires a key once the watermark reaches the first multiple of ``every`` (plus
    ``offset``) after the earliest event time in its pending pane."""

    def __init__(self, every: str | int | _dt.timedelta,
                 offset: str | int | _dt.timedelta = 0) -> None:
        self.every = parse_duration(every, "event_time_trigger(every)")
        if self.every <= 0:
            raise PlanError(f"event_time_trigger: every must be positive, got {every!r}")
        self.offset = parse_duration(offset, "event_time_trigger(offset)") % self.every

    def describe(self) -> str:
        off = f", offset={format_duration(self.offset)}" if self.offset else ""
        return f"event_time({format_duration(self.every)}{off})"


class AnyTrigger(Trigger):
    """Fires when any of its triggers fires (at most one of each kind)."""

    def __init__(self, *triggers: Trigger) -> None:
        flat: list[Trigger] = []
        for t in triggers:
            if not isinstance(t, Trigger):
                raise PlanError(f"a trigger is ms.count_trigger(...), "
                                f"ms.processing_time_trigger(...) or ms.event_time_trigger(...), "
                                f"got {t!r}")
            flat.extend(t.parts())
        kinds = [type(t).__name__ for t in flat]
        dup = sorted({k for k in kinds if kinds.count(k) > 1})
        if dup:
            raise PlanError(f"a trigger combines at most one trigger of each kind; {dup[0]} "
                            f"appears {kinds.count(dup[0])} times in {' | '.join(map(str, flat))}")
        self.triggers = tuple(flat)

    def parts(self) -> tuple[Trigger, ...]:
        return self.triggers

    def describe(self) -> str:
        return " | ".join(t.describe() for t in self.triggers)


class GlobalWindow(WindowAssigner):
    """One window per key over all time, emitted when its ``trigger`` fires and at the end of input.

    ``accumulate=False`` (default, discarding): each firing emits the aggregate of the
    key's elements since its previous firing, then forgets them. ``accumulate=True``:
    each firing emits the aggregate of all the key's elements so far (it supersedes the
    key's previous row). ``trigger=None``: fire only at the end of a bounded input.
    """

    def __init__(self, trigger: Trigger | list[Trigger] | tuple[Trigger, ...] | None = None,
                 accumulate: bool = False) -> None:
        if isinstance(trigger, (list, tuple)):
            trigger = AnyTrigger(*trigger) if trigger else None
        if trigger is not None and not isinstance(trigger, Trigger):
            raise PlanError(f"global_window(trigger=...): expected ms.count_trigger(n), "
                            f"ms.processing_time_trigger(interval), ms.event_time_trigger(every) "
                            f"or several combined with |, got {trigger!r}")
        if not isinstance(accumulate, bool):
            raise PlanError(f"global_window(accumulate=...): expected True or False, got "
                            f"{accumulate!r}")
        self.trigger = trigger
        self.accumulate = accumulate
        by = {type(t): t for t in (trigger.parts() if trigger is not None else ())}
        count = by.get(CountTrigger)
        proc = by.get(ProcessingTimeTrigger)
        event = by.get(EventTimeTrigger)
        #: elements per firing of a key (None: no count trigger)
        self.count: int | None = count.count if count is not None else None
        #: processing-time firing interval (µs; None: none)
        self.interval: int | None = proc.interval if proc is not None else None
        #: event-time firing period and offset (µs; every None: none)
        self.every: int | None = event.every if event is not None else None
        self.offset: int = event.offset if event is not None else 0

    def assign(self, t: np.ndarray) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        raise PlanError("a global window has no time bounds to assign")

    def describe(self) -> str:
        trig = self.trigger.describe() if self.trigger is not None else "end of input"
        mode = "accumulating" if self.accumulate else "discarding"
        return f"GlobalWindow(trigger={trig}, {mode})"
