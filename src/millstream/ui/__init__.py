"""The dashboard: jobs, stages, tasks, streaming operators and checkpoints in a browser,
``/metrics`` for Prometheus, and a history server over event logs.

``ms.init(ui=True)`` (or ``MILLSTREAM_UI=1``) starts it in the driver; ``ms.ui_url()``
tells where. This module stays light (the server library, ``aiohttp`` from the
``millstream[ui]`` extra, is imported only when the dashboard starts).
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

from millstream.runtime.events import BUS
from millstream.runtime.session import Settings, register_service

#: set to 1 to start the dashboard without ``ms.init(ui=True)``
UI_ENV = "MILLSTREAM_UI"
INSTALL_HINT = "pip install 'millstream[ui]'"

_lock = threading.Lock()
_live: dict[str, Any] = {}  # "server", "state", "key"


def ui_url() -> str | None:
    """The running dashboard's URL (with its token when it needs one), or None."""
    server = _live.get("server")
    return server.url if server is not None else None


def _wanted(settings: Settings) -> bool:
    if settings.ui is not None:
        return bool(settings.ui)
    return os.environ.get(UI_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _configure(settings: Settings) -> None:
    """Start, keep or stop the dashboard as a new session's settings say."""
    if not _wanted(settings):
        stop_dashboard()
        return
    key = (settings.ui_host or "127.0.0.1", int(settings.ui_port or 0))
    with _lock:
        if _live.get("key") == key or (_live and key[1] == 0 and _live["key"][0] == key[0]):
            return
    stop_dashboard()
    start_dashboard(*key)


def start_dashboard(host: str = "127.0.0.1", port: int = 0) -> Any:
    """Start the live dashboard (a subscriber of the event bus); print its URL once."""
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise ImportError(f"the dashboard (ui=True) needs its server library: {INSTALL_HINT}"
                          ) from None
    from millstream.ui.server import DashboardServer
    from millstream.ui.state import DashboardState

    with _lock:
        state = DashboardState()
        server = DashboardServer(state, host, port, info=_info).start()
        BUS.subscribe(state)
        _live.update(server=server, state=state, key=(host, port))
    sys.stderr.write(f"millstream: dashboard at {server.url}\n")
    sys.stderr.flush()
    return server


def stop_dashboard() -> None:
    """Stop the live dashboard, if one runs."""
    with _lock:
        server, state = _live.get("server"), _live.get("state")
        _live.clear()
    if state is not None:
        BUS.unsubscribe(state)
    if server is not None:
        server.stop()


def _info() -> dict[str, Any]:
    """Facts the pages show besides jobs: the Ray dashboard when the session runs on Ray."""
    info: dict[str, Any] = {"ray_dashboard": None}
    if "ray" in sys.modules:
        try:
            from millstream.runtime.session import get_session

            if "ray" in get_session().runners:
                from millstream.runners.ray.connect import dashboard_url

                info["ray_dashboard"] = dashboard_url()
        except Exception:  # noqa: BLE001 - a link, not a reason to fail a page
            pass
    return info


register_service("ui", _configure)

__all__ = ["start_dashboard", "stop_dashboard", "ui_url"]
