"""Event time and processing time: the watermark bounds and the clocks operators read.

Times are int64 microseconds since the epoch. ``WallClock`` is the machine's clock;
``VirtualClock`` only moves when told to (tests, replays).
"""

from __future__ import annotations

import time

#: The watermark before any was seen, and the one that ends a bounded input.
MIN_WATERMARK = -(2**63)
MAX_WATERMARK = 2**63 - 1

#: The same bounds under the names keyed state and timers use.
MIN_TIME = MIN_WATERMARK
MAX_TIME = MAX_WATERMARK


class Clock:
    """Source of processing time in int64 microseconds since the epoch."""

    def now(self) -> int:
        """Current processing time (µs)."""
        raise NotImplementedError


class WallClock(Clock):
    """The machine's real-time clock."""

    def now(self) -> int:
        return time.time_ns() // 1000


class VirtualClock(Clock):
    """A clock that only moves when told to (tests, replays)."""

    def __init__(self, start: int = 0) -> None:
        self._now = int(start)

    def now(self) -> int:
        return self._now

    def advance(self, micros: int) -> int:
        """Move forward by ``micros`` (>= 0); returns the new time."""
        if micros < 0:
            raise ValueError(f"VirtualClock.advance: cannot go back in time ({micros} µs)")
        self._now += int(micros)
        return self._now

    def set(self, micros: int) -> int:
        """Jump to ``micros`` (not before the current time); returns it."""
        if micros < self._now:
            raise ValueError(f"VirtualClock.set: {micros} is before the current time {self._now}")
        self._now = int(micros)
        return self._now
