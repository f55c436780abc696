"""Event time and processing time: the watermark bounds and the clocks operators read.

Times are int64 microseconds since the epoch. ``WallClock`` is the machine's clock;
``VirtualClock`` only moves when told to (tests, replays).
"""

from __future__ import annotations

import mmap
import os
import struct
import tempfile
import time
import weakref
from typing import Any

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
    """A clock that only moves when told to (tests, replays).

    Once pickled (a streaming task in another process), the time lives in a small shared
    file that every copy on this machine reads, so ``advance``/``set`` in the test are seen
    by the tasks.
    """

    def __init__(self, start: int = 0) -> None:
        self._now = int(start)
        self._path: str | None = None
        self._map: Any = None

    def now(self) -> int:
        if self._map is not None:
            return struct.unpack_from("<q", self._map, 0)[0]
        return self._now

    def _store(self, micros: int) -> int:
        self._now = int(micros)
        if self._map is not None:
            struct.pack_into("<q", self._map, 0, self._now)
        return self._now

    def advance(self, micros: int) -> int:
        """Move forward by ``micros`` (>= 0); returns the new time."""
        if micros < 0:
            raise ValueError(f"VirtualClock.advance: cannot go back in time ({micros} µs)")
        return self._store(self.now() + int(micros))

    def set(self, micros: int) -> int:
        """Jump to ``micros`` (not before the current time); returns it."""
        now = self.now()
        if micros < now:
            raise ValueError(f"VirtualClock.set: {micros} is before the current time {now}")
        return self._store(micros)

    def _share(self) -> str:
        """The shared file holding the time (created on first use, removed with this clock)."""
        if self._path is None:
            fd, path = tempfile.mkstemp(prefix=f"millstream-{os.getpid()}-clock-")
            os.write(fd, struct.pack("<q", self._now))
            os.close(fd)
            self._path = path
            self._open()
            weakref.finalize(self, _remove, path)
        return self._path

    def _open(self) -> None:
        with open(self._path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), 8)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self._share(), "now": self.now()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._now = state["now"]
        self._path = state["path"]
        self._map = None
        try:
            self._open()
        except OSError:  # another machine: the time as it was when sent
            self._map = None


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
