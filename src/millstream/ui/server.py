"""The dashboard's web server (``aiohttp``, the ``millstream[ui]`` extra), in a thread of
the driver with its own event loop.

Pages (``/``, ``/jobs/<id>``) are one HTML shell whose script (``assets/app.js``) reads
the JSON API (``/api/jobs``, ``/api/jobs/<id>``, ``/api/info``) and follows changes
through server-sent events (``/api/events``); ``/metrics`` is the Prometheus text
format. Static files are served from the package's ``assets`` directory only, by name
from its listing (no path ever reaches the file system). Bound to another address than
loopback, every request needs the token printed in the URL (``?token=``; the browser
keeps it as a cookie, scripts may send ``Authorization: Bearer``): 401 without it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import mimetypes
import os
import secrets
import socket
import threading
from typing import Any

from millstream.ui.state import DashboardState

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
#: addresses that need no token (this machine only)
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
COOKIE = "millstream_token"
#: how often the server-sent event stream looks for changes (s)
SSE_POLL_S = 0.25
SSE_HEARTBEAT_S = 15.0
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; "
                               "style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'",
}


def needs_token(host: str) -> bool:
    """Whether a server bound to ``host`` asks for a token (anything but loopback)."""
    return host not in LOOPBACK_HOSTS


def _asset_names() -> dict[str, str]:
    """The files of the assets directory, by name (what ``/assets/<name>`` may serve)."""
    return {name: os.path.join(ASSETS, name) for name in os.listdir(ASSETS)
            if os.path.isfile(os.path.join(ASSETS, name))}


class DashboardServer:
    """Serves ``state`` on ``host:port`` (port 0: a free one) until :meth:`stop`."""

    def __init__(self, state: DashboardState, host: str = "127.0.0.1", port: int = 0,
                 token: str | None = None, mode: str = "live",
                 info: Any = None) -> None:
        from aiohttp import web  # noqa: F401 - fail here, clearly, when the extra is missing

        self.state = state
        self.host = host
        self.port = port
        self.token = token if token is not None else (
            secrets.token_urlsafe(24) if needs_token(host) else None)
        self.mode = mode
        self._info = info or (lambda: {})
        self._assets = _asset_names()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: Any = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stopping: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True,
                                        name="millstream-dashboard")
        self.bound: tuple[str, int] | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> DashboardServer:
        """Start serving; returns once the socket listens (raises what binding raised)."""
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self

    @property
    def url(self) -> str:
        """The dashboard's address, with the token when one is needed."""
        host, port = self.bound or (self.host, self.port)
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}/" + (f"?token={self.token}" if self.token else "")

    def stop(self) -> None:
        """Stop serving and close the socket."""
        loop = self._loop
        if loop is not None and self._stopping is not None and loop.is_running():
            loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout=10)

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self._error = exc
            self._ready.set()
        finally:
            loop.close()

    async def _main(self) -> None:
        from aiohttp import web

        self._stopping = asyncio.Event()
        app = web.Application(middlewares=[self._guard])
        app.router.add_get("/", self._page)
        app.router.add_get("/jobs/{job}", self._page)
        app.router.add_get("/api/info", self._api_info)
        app.router.add_get("/api/jobs", self._api_jobs)
        app.router.add_get("/api/jobs/{job}", self._api_job)
        app.router.add_get("/api/events", self._api_events)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/assets/{name}", self._asset)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                     shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        sock = site._server.sockets[0]  # the bound address (port 0: the one chosen)
        self.bound = sock.getsockname()[:2]
        self._ready.set()
        await self._stopping.wait()
        await self._runner.cleanup()

    # ------------------------------------------------------------------ security
    def _authorized(self, request: Any) -> tuple[bool, bool]:
        """(allowed, token given in the query) for ``request``."""
        if self.token is None:
            return True, False
        given = request.query.get("token")
        if given is not None and hmac.compare_digest(given, self.token):
            return True, True
        cookie = request.cookies.get(COOKIE)
        if cookie is not None and hmac.compare_digest(cookie, self.token):
            return True, False
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer ") and hmac.compare_digest(auth[7:], self.token):
            return True, False
        return False, False

    @property
    def _guard(self) -> Any:
        from aiohttp import web

        @web.middleware
        async def guard(request: Any, handler: Any) -> Any:
            if request.method not in ("GET", "HEAD"):
                return web.Response(status=405, text="the dashboard is read-only\n")
            allowed, from_query = self._authorized(request)
            if not allowed:
                return web.Response(status=401, text="a token is required: open the URL "
                                                     "the dashboard printed\n",
                                    headers={"WWW-Authenticate": "Bearer"})
            response = await handler(request)
            for k, v in SECURITY_HEADERS.items():
                response.headers.setdefault(k, v)
            if from_query:
                response.set_cookie(COOKIE, self.token, httponly=True, samesite="Strict",
                                    path="/")
            return response

        return guard

    # ------------------------------------------------------------------ handlers
    async def _page(self, request: Any) -> Any:
        from aiohttp import web

        if request.match_info.get("job") is not None and \
                self.state.detail(request.match_info["job"]) is None:
            return web.Response(status=404, text="no such job\n")
        with open(self._assets["index.html"], "rb") as f:
            return web.Response(body=f.read(), content_type="text/html", charset="utf-8")

    async def _asset(self, request: Any) -> Any:
        from aiohttp import web

        path = self._assets.get(request.match_info["name"])
        if path is None:
            return web.Response(status=404, text="no such asset\n")
        ctype = mimetypes.guess_type(path)[0] or "application/octet-stream"
        with open(path, "rb") as f:
            return web.Response(body=f.read(), content_type=ctype,
                                headers={"Cache-Control": "no-cache"})

    def _json(self, data: Any, status: int = 200) -> Any:
        from aiohttp import web

        return web.Response(text=json.dumps(data, default=str), status=status,
                            content_type="application/json")

    async def _api_info(self, request: Any) -> Any:
        return self._json({"mode": self.mode, "version": self.state.version, **self._info()})

    async def _api_jobs(self, request: Any) -> Any:
        return self._json({"version": self.state.version, "jobs": self.state.summary()})

    async def _api_job(self, request: Any) -> Any:
        detail = self.state.detail(request.match_info["job"])
        if detail is None:
            return self._json({"error": "no such job"}, status=404)
        return self._json({"version": self.state.version, "job": detail})

    async def _api_events(self, request: Any) -> Any:
        """Server-sent events: ``update`` with the state's version whenever it changed."""
        from aiohttp import web

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        for k, v in SECURITY_HEADERS.items():
            response.headers[k] = v
        await response.prepare(request)
        seen = -1
        quiet = 0.0
        try:
            while not self._stopping.is_set():
                version = self.state.version
                if version != seen:
                    seen = version
                    quiet = 0.0
                    await response.write(f"event: update\ndata: {version}\n\n".encode())
                elif quiet >= SSE_HEARTBEAT_S:
                    quiet = 0.0
                    await response.write(b": heartbeat\n\n")
                await asyncio.sleep(SSE_POLL_S)
                quiet += SSE_POLL_S
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        return response

    async def _metrics(self, request: Any) -> Any:
        from aiohttp import web

        try:
            from millstream.ui.metrics import CONTENT_TYPE, render

            body = render(self.state)
        except ImportError:
            return web.Response(status=501, text="/metrics needs prometheus-client: "
                                                 "pip install 'millstream[ui]'\n")
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})
