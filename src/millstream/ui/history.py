"""The history server: the dashboard's pages for finished jobs, from their event logs.

``millstream ui --history DIR`` reads every ``<job>.jsonl`` in ``DIR`` (a path or storage
URI that ``ms.init(event_log_dir=...)`` wrote), replays it into a dashboard state and
serves the same pages as the live dashboard; it looks for new and grown logs every few
seconds, so jobs still running elsewhere show up as their logs grow.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from millstream.io import fs as storage
from millstream.runtime.eventlog import read_event_log
from millstream.ui.state import DashboardState

_log = logging.getLogger(__name__)

#: how often the logs are looked at again (s)
REFRESH_S = 5.0


class HistoryLoader:
    """Keeps a :class:`DashboardState` in step with the event logs under ``uri``."""

    def __init__(self, uri: str, state: DashboardState | None = None) -> None:
        self.uri = uri
        self.fs, self.base = storage.resolve(uri)
        self.state = state or DashboardState()
        self._seen: dict[str, int] = {}  # path -> size read
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> int:
        """Read the logs that are new or grew; returns how many were (re)read."""
        if not storage.exists(self.fs, self.base):
            raise FileNotFoundError(f"no event log directory {self.uri}")
        read = 0
        for info in storage.list_dir(self.fs, self.base):
            if not info.is_file or not info.base_name.endswith(".jsonl"):
                continue
            if self._seen.get(info.path) == info.size:
                continue
            try:
                events = read_event_log(self.fs, info.path)
            except Exception:  # noqa: BLE001 - one unreadable log must not hide the others
                _log.warning("cannot read the event log %s", info.path, exc_info=True)
                continue
            self._seen[info.path] = info.size
            job = info.base_name[: -len(".jsonl")]
            with self.state.lock:
                self.state.jobs.pop(job, None)
                self.state.replay(events)
            read += 1
        return read

    def start(self, every_s: float = REFRESH_S) -> HistoryLoader:
        """Refresh now, then every ``every_s`` seconds in a thread."""
        self.refresh()

        def loop() -> None:
            while not self._stop.wait(every_s):
                try:
                    self.refresh()
                except Exception:  # noqa: BLE001
                    _log.warning("refreshing the event logs of %s failed", self.uri,
                                 exc_info=True)

        self._thread = threading.Thread(target=loop, daemon=True, name="millstream-history")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()


def serve_history(uri: str, host: str = "127.0.0.1", port: int = 0,
                  token: str | None = None) -> tuple[Any, HistoryLoader]:
    """Serve the jobs of the event logs under ``uri``; returns (server, loader)."""
    from millstream.ui.server import DashboardServer

    loader = HistoryLoader(uri).start()
    server = DashboardServer(loader.state, host, port, token=token, mode="history",
                             info=lambda: {"history": uri}).start()
    return server, loader
