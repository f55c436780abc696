"""Live progress per stage on a terminal: tasks done/total, rows, bytes; quiet otherwise."""

from __future__ import annotations

import sys
import time


def _scaled(n: float, base: int, units: tuple[str, ...]) -> str:
    for i, unit in enumerate(units):
        if abs(n) < base or i == len(units) - 1:
            return f"{n:.0f}{unit}" if i == 0 else f"{n:.1f}{unit}"
        n /= base
    return ""


def _human(n: float) -> str:
    return _scaled(n, 1000, ("", "K", "M", "G", "T", "P"))


def _human_bytes(n: float) -> str:
    return _scaled(n, 1024, ("B", "KiB", "MiB", "GiB", "TiB", "PiB"))


class StageProgress:
    """Progress of one stage; draws a one-line bar on stderr when enabled."""

    def __init__(self, name: str, total: int, enabled: bool) -> None:
        self.name = name
        self.total = total
        self.done = 0
        self.rows = 0
        self.bytes = 0
        self.retries = 0
        self.enabled = enabled
        self.start = time.perf_counter()
        self._last_draw = 0.0
        if enabled:
            self._draw(force=True)

    def task_done(self, rows: int, nbytes: int) -> None:
        self.done += 1
        self.rows += rows
        self.bytes += nbytes
        self._draw(force=self.done == self.total)

    def task_retried(self) -> None:
        self.retries += 1
        self._draw()

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        width = 24
        filled = int(width * self.done / self.total) if self.total else width
        bar = "#" * filled + "-" * (width - filled)
        extra = f" retries {self.retries}" if self.retries else ""
        line = (f"\r{self.name[:38]:<38} [{bar}] {self.done}/{self.total} tasks "
                f"{_human(self.rows)} rows {_human_bytes(self.bytes)} "
                f"{now - self.start:5.1f}s{extra}")
        sys.stderr.write(line)
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(force=True)
            sys.stderr.write("\n")
            sys.stderr.flush()


def progress_enabled(setting: bool | None) -> bool:
    """Progress bars are on when asked, or by default when stderr is a terminal."""
    if setting is not None:
        return setting
    try:
        return sys.stderr.isatty()
    except Exception:  # noqa: BLE001
        return False
