"""The progress display: a live line on a terminal, an updating HTML block in Jupyter.

A subscriber of the event bus (:mod:`millstream.runtime.events`) for the jobs it is told
to :func:`watch` (those whose ``progress`` setting is on; by default when stderr is a
terminal or the process is a Jupyter kernel). A batch stage shows tasks done of total,
rows and bytes read so far (workers report while their tasks run), the read rate and an
ETA; a streaming job shows records/s in and out, the watermark and its lag, the last
checkpoint and restarts.
"""

from __future__ import annotations

import datetime as dt
import html
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from millstream.runtime.events import BUS, Event

#: redraws at most this often (s)
DRAW_EVERY_S = 0.1


def _scaled(n: float, base: int, units: tuple[str, ...]) -> str:
    for i, unit in enumerate(units):
        if abs(n) < base or i == len(units) - 1:
            return f"{n:.0f}{unit}" if i == 0 else f"{n:.1f}{unit}"
        n /= base
    return ""


def human(n: float) -> str:
    """A count with a K/M/G suffix (``1.5M``)."""
    return _scaled(n, 1000, ("", "K", "M", "G", "T", "P"))


def human_bytes(n: float) -> str:
    """A byte size in binary units (``12.0MiB``)."""
    return _scaled(n, 1024, ("B", "KiB", "MiB", "GiB", "TiB", "PiB"))


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (IPython with a kernel attached)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:  # noqa: BLE001
        return False
    return shell is not None and getattr(shell, "kernel", None) is not None


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "ETA ?"
    if seconds >= 3600:
        return f"ETA {seconds / 3600:.1f}h"
    if seconds >= 60:
        return f"ETA {seconds / 60:.0f}m{seconds % 60:02.0f}s"
    return f"ETA {seconds:.0f}s"


def stage_line(ev: Event) -> tuple[str, float]:
    """The text of a ``stage_progress`` event, and the fraction of tasks done."""
    total, done, elapsed = ev["total"], ev["done"], max(ev["elapsed"], 1e-9)
    frac = done / total if total else 1.0
    eta = None if not done else (0.0 if done >= total else elapsed * (1 - frac) / frac)
    rate = ev["rows_read"] / elapsed
    retries = f" retries {ev['retries']}" if ev["retries"] else ""
    text = (f"{done}/{total} tasks {human(ev['rows_read'])} rows "
            f"{human_bytes(ev['bytes_read'])} read {human(rate)} rows/s "
            f"{elapsed:5.1f}s {_eta(eta) if done < total else 'done'}{retries}")
    return text, frac


def _wall(micros: int | None) -> str:
    if micros is None:
        return "-"
    return dt.datetime.fromtimestamp(micros / 1e6, dt.timezone.utc).strftime("%H:%M:%S")


class _StreamRates:
    """records/s in and out of a streaming job from its successive metrics."""

    def __init__(self) -> None:
        self.last: tuple[float, int, int] | None = None
        self.rates = (0.0, 0.0)

    def update(self, ts: float, rin: int, rout: int) -> tuple[float, float]:
        if self.last is not None and ts > self.last[0]:
            dt_s = ts - self.last[0]
            self.rates = (max(0, rin - self.last[1]) / dt_s, max(0, rout - self.last[2]) / dt_s)
        self.last = (ts, rin, rout)
        return self.rates


def stream_line(ev: Event, rates: tuple[float, float]) -> str:
    """The text of a ``stream_metrics`` event."""
    m = ev["metrics"]
    lag = m.get("watermark_lag_s")
    wm = m.get("watermark")
    from millstream.core.time import MAX_WATERMARK, MIN_WATERMARK

    wm_text = _wall(wm) if wm is not None and MIN_WATERMARK < wm < MAX_WATERMARK else "-"
    ckpt = m.get("last_checkpoint_epoch")
    ckpt_text = (f"checkpoint {ckpt} ({m.get('last_checkpoint_seconds') or 0:.2f}s)"
                 if ckpt is not None else "no checkpoint yet")
    return (f"in {human(rates[0])}/s out {human(rates[1])}/s "
            f"({human(m.get('records_in', 0))} / {human(m.get('records_out', 0))}) "
            f"watermark {wm_text} lag {'-' if lag is None else f'{lag:.1f}s'} "
            f"{ckpt_text} restarts {m.get('restarts', 0)}")


def summary_line(m: dict) -> str:
    """A streaming job's metrics in a line: records in and out, checkpoints (the last
    one's size and time), late records, restarts."""
    n = m.get("checkpoints", 0)
    line = (f"{m.get('records_in', 0):,} records in, {m.get('records_out', 0):,} rows out; "
            f"{n} checkpoint{'' if n == 1 else 's'}")
    if m.get("last_checkpoint_bytes") is not None:
        line += (f" (the last {m['last_checkpoint_bytes'] / 1024:,.1f} KiB in "
                 f"{m.get('last_checkpoint_seconds') or 0.0:.2f} s)")
    return line + (f"; {m.get('late_records', 0):,} late records; "
                   f"{m.get('restarts', 0)} restarts")


class _Terminal:
    """One line on stderr, redrawn in place."""

    def __init__(self) -> None:
        self.open_line = False

    def draw(self, key: str, label: str, text: str, frac: float | None, final: bool) -> None:
        bar = ""
        if frac is not None:
            width = 24
            filled = int(width * min(1.0, frac))
            bar = "[" + "#" * filled + "-" * (width - filled) + "] "
        sys.stderr.write(f"\r{label[:38]:<38} {bar}{text}\033[K")
        if final:
            sys.stderr.write("\n")
        sys.stderr.flush()
        self.open_line = not final


class _Notebook:
    """An HTML block per stage or streaming job, updated in place (IPython.display)."""

    def __init__(self) -> None:
        self.handles: dict[str, Any] = {}

    def draw(self, key: str, label: str, text: str, frac: float | None, final: bool) -> None:
        from IPython.display import HTML, display

        bar = ""
        if frac is not None:
            bar = (f'<progress value="{min(1.0, frac):.3f}" max="1" '
                   f'style="width:14em;vertical-align:middle"></progress> ')
        body = HTML(f'<div style="font-family:monospace"><b>{html.escape(label)}</b> '
                    f'{bar}{html.escape(text)}</div>')
        handle = self.handles.get(key)
        if handle is None:
            self.handles[key] = display(body, display_id=True)
        else:
            handle.update(body)
        if final:
            self.handles.pop(key, None)


class ProgressDisplay:
    """Draws the watched jobs' progress from their events."""

    def __init__(self, notebook: bool) -> None:
        self.out: Any = _Notebook() if notebook else _Terminal()
        self.jobs: set[str] = set()
        self.lock = threading.Lock()
        self._last_draw: dict[str, float] = {}
        self._rates: dict[str, _StreamRates] = {}
        self._stage_open = False

    def __call__(self, ev: Event) -> None:
        if ev.get("job") not in self.jobs:
            return
        kind = ev["type"]
        if kind == "stage_progress":
            key = f"{ev['job']}:{ev['stage']}"
            final = bool(ev.get("final"))
            if not self._due(key, final or ev["done"] in (0, ev["total"])):
                return
            text, frac = stage_line(ev)
            with self.lock:
                self._stage_open = not final
                self.out.draw(key, ev["name"], text, frac, final)
        elif kind == "stream_metrics":
            rates = self._rates.setdefault(ev["job"], _StreamRates()).update(
                ev["ts"], ev["metrics"].get("records_in", 0), ev["metrics"].get("records_out", 0))
            final = bool(ev.get("final"))
            with self.lock:
                if self._stage_open and isinstance(self.out, _Terminal):
                    return  # a batch stage's bar has the line
                self.out.draw(ev["job"], f"stream {ev['job']}", stream_line(ev, rates), None,
                              final)

    def _due(self, key: str, force: bool) -> bool:
        now = time.monotonic()
        if not force and now - self._last_draw.get(key, 0.0) < DRAW_EVERY_S:
            return False
        self._last_draw[key] = now
        return True


_display: ProgressDisplay | None = None
_lock = threading.Lock()


def watch(job_id: str) -> Callable[[], None]:
    """Show ``job_id``'s progress until the returned function is called."""
    global _display
    with _lock:
        if _display is None:
            _display = ProgressDisplay(in_notebook())
            BUS.subscribe(_display)
        _display.jobs.add(job_id)

    def unwatch() -> None:
        global _display
        with _lock:
            if _display is None:
                return
            _display.jobs.discard(job_id)
            _display._rates.pop(job_id, None)
            if not _display.jobs:
                BUS.unsubscribe(_display)
                _display = None

    return unwatch
