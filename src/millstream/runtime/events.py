"""The event stream: what running jobs publish and who listens (progress, dashboard, logs).

The batch scheduler, the runners (through :class:`~millstream.runtime.progress.StageProgress`)
and the streaming coordinator publish plain ``dict`` events here; subscribers (the
progress display, the dashboard's live state, the event log writer, the Prometheus
metrics) receive them synchronously in the publishing thread, so they must be quick and
thread-safe. Nobody listening costs one attribute test per publishing site: publishers
check :data:`BUS` ``.active`` before they build an event.

Every event has ``type`` and ``ts`` (wall-clock seconds); the others depend on the type:

* batch: ``job_start`` (job, name, runner, stages, plan), ``stage_start``, ``task_start``,
  ``task_progress`` (rows and bytes read so far by a running attempt), ``task_end``,
  ``stage_end``, ``job_end`` (status, error);
* streaming: ``stream_start`` (job, graph), ``stream_metrics`` (a snapshot of
  ``job.metrics()`` and per-task detail, about every second), ``checkpoint``,
  ``restart``, ``stream_end``.

Events are JSON-serializable (the event log writes them as JSON lines).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

_log = logging.getLogger(__name__)

Event = dict[str, Any]
Subscriber = Callable[[Event], None]


class EventBus:
    """A small in-process publish/subscribe bus (one per process: :data:`BUS`)."""

    def __init__(self) -> None:
        self._subscribers: tuple[Subscriber, ...] = ()
        self._lock = threading.Lock()
        #: whether anybody listens (publishers test this before building an event)
        self.active = False

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        """Call ``fn(event)`` for every event from now on; returns the unsubscribe function."""
        with self._lock:
            self._subscribers = (*self._subscribers, fn)
            self.active = True
        return lambda: self.unsubscribe(fn)

    def unsubscribe(self, fn: Subscriber) -> None:
        """Stop calling ``fn`` (nothing happens when it was not subscribed)."""
        with self._lock:
            subs = list(self._subscribers)
            if fn in subs:
                subs.remove(fn)
            self._subscribers = tuple(subs)
            self.active = bool(subs)

    def publish(self, event: Event) -> None:
        """Hand ``event`` to every subscriber; a subscriber that raises is logged, never
        allowed to fail the job that published."""
        event.setdefault("ts", time.time())
        for fn in self._subscribers:
            try:
                fn(event)
            except Exception:  # noqa: BLE001 - observers must not break jobs
                _log.warning("event subscriber %r failed on %s", fn, event.get("type"),
                             exc_info=True)


#: The process's event bus.
BUS = EventBus()


def publish(type_: str, **fields: Any) -> None:
    """Publish an event of ``type_`` when anybody listens (callers on hot paths test
    ``BUS.active`` first, so the keyword arguments are not even built)."""
    if BUS.active:
        BUS.publish({"type": type_, "ts": time.time(), **fields})


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def call_site() -> str:
    """Where the user's code started this job, Spark-style: ``"count at job.py:12"`` (the
    last Millstream function called from outside the package, and the caller's file and
    line); "" when no user frame is on the stack."""
    frame = sys._getframe(1)
    api_name = ""
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if filename.startswith(_PACKAGE):
            name = frame.f_code.co_name
            if not name.startswith("_") and name not in ("<genexpr>", "<lambda>", "call",
                                                         "stream", "wrapper"):
                api_name = name
        elif api_name:
            return f"{api_name} at {os.path.basename(filename)}:{frame.f_lineno}"
        frame = frame.f_back
    return api_name


def error_text(exc: BaseException) -> str:
    """An error as the dashboard shows it: type and message (the message of a user
    function's failure carries the user's traceback)."""
    return f"{type(exc).__name__}: {exc}"
