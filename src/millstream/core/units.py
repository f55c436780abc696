"""Durations and sizes as users write them ("5s", "1h30m", "2GB"), in microseconds and bytes."""

from __future__ import annotations

import datetime as _dt
import os
import re

import numpy as np

from millstream.errors import PlanError

_UNIT_MICROS = {
    "us": 1, "µs": 1, "ms": 1_000, "s": 1_000_000, "sec": 1_000_000, "m": 60_000_000,
    "min": 60_000_000, "h": 3_600_000_000, "hr": 3_600_000_000, "d": 86_400_000_000,
    "w": 604_800_000_000,
}
#: the words Flink's and SQL's durations use ("30 min", "1 hour", "2 days")
_UNIT_WORDS = {"microsecond": "us", "millisecond": "ms", "second": "s", "minute": "m",
               "hour": "h", "day": "d", "week": "w"}
_PART_RE = re.compile(r"\s*(\d+(?:\.\d*)?)\s*(microseconds?|milliseconds?|seconds?|minutes?|"
                      r"hours?|days?|weeks?|secs?|mins?|hrs?|us|µs|ms|s|m|h|d|w)\s*")


def _unit(word: str) -> int:
    """Microseconds per ``word`` (a unit, its name, its plural)."""
    word = _UNIT_WORDS.get(word.rstrip("s"), word)
    return _UNIT_MICROS[word if word in _UNIT_MICROS else word.rstrip("s")]


def parse_duration(value: str | int | _dt.timedelta, what: str = "duration") -> int:
    """A duration ("5s", "1m", "1h30m", "500ms", "2d", timedelta, or int µs) in microseconds."""
    if isinstance(value, bool):
        raise PlanError(f"{what}: expected a duration such as '5s', got {value!r}")
    if isinstance(value, _dt.timedelta):
        micros = (value.days * 86_400 + value.seconds) * 1_000_000 + value.microseconds
    elif isinstance(value, (int, np.integer)):
        micros = int(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        pos, micros, matched = 0, 0.0, False
        while pos < len(text):
            m = _PART_RE.match(text, pos)
            if not m:
                break
            micros += float(m.group(1)) * _unit(m.group(2))
            pos, matched = m.end(), True
        if not matched or pos != len(text):
            raise PlanError(f"{what}: cannot read the duration {value!r}; use e.g. '500ms', "
                            f"'5s', '10m', '1h', '1h30m', '2d', '1w' (units us, ms, s, m, h, d, w)")
        if micros != int(micros):
            raise PlanError(f"{what}: {value!r} is not a whole number of microseconds")
        micros = int(micros)
    else:
        raise PlanError(f"{what}: expected a duration string such as '5s', a datetime.timedelta "
                        f"or an int of microseconds, got {type(value).__name__} {value!r}")
    if micros < 0:
        raise PlanError(f"{what}: must not be negative, got {value!r}")
    return micros


def format_duration(micros: int) -> str:
    """Microseconds as the shortest whole unit ("90s" -> "90s", 60_000_000 -> "1m")."""
    for unit, k in (("d", 86_400_000_000), ("h", 3_600_000_000), ("m", 60_000_000),
                    ("s", 1_000_000), ("ms", 1_000)):
        if micros and micros % k == 0:
            return f"{micros // k}{unit}"
    return f"{micros}us"



def parse_size(value: int | str | None) -> int | None:
    """A size in bytes from an int or a string such as "512MB", "2GiB", "64k" (None stays None)."""
    if value is None or isinstance(value, int):
        return value
    text = str(value).strip().upper().replace("IB", "").replace("B", "")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if text and text[-1] in mult:
        return int(float(text[:-1]) * mult[text[-1]])
    return int(text)


def format_size(n: float) -> str:
    """Bytes for people: ``1.2 MB``, ``512 B``."""
    for unit, div in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)} B"


def default_memory_limit() -> int:
    """A quarter of the machine's physical memory (at least 256 MiB)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return max(256 << 20, total // 4)


