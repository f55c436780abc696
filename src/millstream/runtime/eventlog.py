"""The event log: every job's events as JSON lines in ``event_log_dir`` (history).

``ms.init(event_log_dir=...)`` (a local path or any storage URI) subscribes a writer to
the event bus; each job gets one file, ``<job id>.jsonl``, that ``millstream ui
--history DIR`` replays to serve the dashboard's pages for finished jobs (as Spark's
history server reads its event logs). Lines are written by a background thread, about
every second: appended on a local disk; on object stores (which cannot append) the
job's file is rewritten at most every few seconds and once when it ends. Running tasks'
progress reports are left out, and a streaming job's metrics snapshots are thinned to
one every few seconds (its last one is always kept).
"""

from __future__ import annotations

import atexit
import json
import logging
import threading
import time
from typing import Any

from millstream.runtime.events import BUS, Event

_log = logging.getLogger(__name__)

#: events that only matter while a job runs
SKIPPED = {"task_progress"}
#: a streaming job's metrics go to the log at most this often (s)
METRICS_EVERY_S = 5.0
#: how often the writer thread writes (s); object stores are rewritten at most every
REWRITE_EVERY_S = 5.0
FLUSH_EVERY_S = 1.0
#: events that end a job's log
END_EVENTS = {"job_end", "stream_end"}


class EventLogWriter:
    """A bus subscriber writing each job's events to ``<uri>/<job>.jsonl``."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None) -> None:
        from millstream.io import fs as storage  # (pyarrow.fs: only with an event log)

        self.uri = uri
        self.fs, self.base = storage.resolve(uri, **(storage_options or {}))
        storage.mkdirs(self.fs, self.base)
        self.local = storage.is_local(self.fs)
        self._lock = threading.Lock()
        self._pending: dict[str, list[Event]] = {}  # job -> events not yet written
        self._whole: dict[str, list[str]] = {}  # object stores: every line of the job
        self._ended: set[str] = set()
        self._last_metrics: dict[str, float] = {}
        self._last_rewrite: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name="millstream-event-log")
        self._thread.start()

    def path_of(self, job: str) -> str:
        """The log file of ``job``."""
        from millstream.io import fs as storage  # (pyarrow.fs: only with an event log)

        return storage.join(self.base, f"{job}.jsonl")

    def __call__(self, ev: Event) -> None:
        kind = ev.get("type")
        job = ev.get("job")
        if kind in SKIPPED or not job:
            return
        if kind == "stage_progress" and not ev.get("final"):
            return
        if kind == "stream_metrics" and not ev.get("final"):
            last = self._last_metrics.get(job, 0.0)
            if ev["ts"] - last < METRICS_EVERY_S:
                return
            self._last_metrics[job] = ev["ts"]
        with self._lock:  # encoded by the writer thread, off the job's path
            self._pending.setdefault(job, []).append(ev)
            if kind in END_EVENTS:
                self._ended.add(job)

    def _loop(self) -> None:
        while not self._stop.wait(FLUSH_EVERY_S):
            self.flush()

    def flush(self, force: bool = False) -> None:
        """Write what is pending (``force``: rewrite object-store files now)."""
        with self._lock:
            pending, self._pending = self._pending, {}
            ended, self._ended = self._ended, set()
        for job, events in pending.items():
            try:
                lines = [json.dumps(ev, default=str, separators=(",", ":")) for ev in events]
                self._write(job, lines, force or job in ended)
            except Exception:  # noqa: BLE001 - the log must never fail a job
                _log.warning("writing the event log of job %s to %s failed", job, self.uri,
                             exc_info=True)
            if job in ended:
                self._whole.pop(job, None)
                self._last_metrics.pop(job, None)
                self._last_rewrite.pop(job, None)

    def _write(self, job: str, lines: list[str], now: bool) -> None:
        from millstream.io import fs as storage  # (pyarrow.fs: only with an event log)

        text = "".join(line + "\n" for line in lines)
        if self.local:
            with open(self.path_of(job), "a", encoding="utf-8") as f:
                f.write(text)
            return
        whole = self._whole.setdefault(job, [])
        whole.append(text)
        t = time.monotonic()
        if now or t - self._last_rewrite.get(job, 0.0) >= REWRITE_EVERY_S:
            self._last_rewrite[job] = t
            storage.write_bytes(self.fs, self.path_of(job), "".join(whole).encode())

    def close(self) -> None:
        """Stop the thread and write everything."""
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            self._ended.update(self._pending)
        self.flush(force=True)


_writer: EventLogWriter | None = None
_lock = threading.Lock()


def configure_event_log(uri: str | None) -> EventLogWriter | None:
    """Write every job's events to ``uri`` from now on (None: stop writing)."""
    global _writer
    with _lock:
        if _writer is not None and _writer.uri == uri:
            return _writer
        if _writer is not None:
            BUS.unsubscribe(_writer)
            _writer.close()
            _writer = None
        if uri:
            _writer = EventLogWriter(uri)
            BUS.subscribe(_writer)
        return _writer


def read_event_log(fs: Any, path: str) -> list[Event]:
    """The events of one log file (a torn last line, of a job still writing, is skipped)."""
    from millstream.io import fs as storage  # (pyarrow.fs: only with an event log)

    events = []
    for line in storage.read_bytes(fs, path).decode("utf-8", "replace").splitlines():
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


@atexit.register
def _flush_at_exit() -> None:
    if _writer is not None:
        _writer.close()
