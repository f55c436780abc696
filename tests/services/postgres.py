"""A real PostgreSQL server for tests, on loopback, in a temporary data directory.

The server binaries come from the ``postgresql`` system package (``.ci/run`` installs it
when ``initdb`` is missing); they are looked up on PATH and in
``/usr/lib/postgresql/*/bin``. ``initdb`` makes a fresh cluster in a new temporary
directory, ``pg_ctl start`` runs it on a free 127.0.0.1 port with its unix socket in that
directory (never the system's), fsync off; ``stop`` stops it by PID (its process group),
then removes the directory. PostgreSQL refuses to run as root: as root the server runs
as the ``postgres`` user (or ``nobody``), which then owns the directory. No pytest
dependency::

    from services.postgres import PostgresServer

    server = PostgresServer.start()
    server.dsn              # 'host=127.0.0.1 port=PORT dbname=postgres user=millstream'
    server.execute("CREATE TABLE t (id int PRIMARY KEY)")
    server.query("SELECT count(*) FROM t")    # -> [(0,)]
    server.stop()
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from .process import HOST, PortConflict, StopAtExit, free_port, log_tail

USER = "millstream"


class PostgresServiceError(RuntimeError):
    """The server failed to start, answer or stop in time."""


def _bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return candidates[-1] if candidates else None


def postgres_missing() -> str | None:
    """Why the PostgreSQL tests cannot run here (no server binaries, no psycopg), or None."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'millstream[postgres]')"
    for name in ("initdb", "pg_ctl"):
        if _bin(name) is None:
            return f"no {name}: install the postgresql system package"
    return None


def _run_as() -> tuple[int, int] | None:
    """(uid, gid) of the user the server runs as when we are root, else None."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pw = pwd.getpwnam(name)
            return pw.pw_uid, pw.pw_gid
    raise PostgresServiceError("running as root, and there is no 'postgres' or 'nobody' user "
                               "to run the server as")


class PostgresServer:
    """One running PostgreSQL server (see the module doc)."""

    def __init__(self, base: Path, port: int, pid: int, owner: tuple[int, int] | None) -> None:
        self.base = base
        self.port = port
        self.pid = pid
        self.owner = owner
        self.dsn = f"host={HOST} port={port} dbname=postgres user={USER}"
        self._stopped = False

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    @property
    def log_path(self) -> Path:
        return self.base / "server.log"

    @classmethod
    def start(cls, attempts: int = 3, timeout: float = 60.0) -> PostgresServer:
        """Initialize a cluster in a fresh temporary directory and start it."""
        last: Exception | None = None
        for _ in range(attempts):
            try:
                return cls._start_once(timeout)
            except PortConflict as exc:
                last = exc
        raise PostgresServiceError(f"postgres: ports kept colliding: {last}")

    @classmethod
    def _start_once(cls, timeout: float) -> PostgresServer:
        initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
        if initdb is None or pg_ctl is None:
            raise PostgresServiceError("no initdb/pg_ctl: install the postgresql system package")
        owner = _run_as()
        base = Path(tempfile.mkdtemp(prefix="ms-pg-"))
        if owner is not None:
            os.chown(base, *owner)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        kwargs: dict[str, Any] = {"env": env, "cwd": base, "stdin": subprocess.DEVNULL}
        if owner is not None:
            kwargs.update(user=owner[0], group=owner[1], extra_groups=[])
        data = base / "data"
        log = base / "server.log"
        try:
            out = subprocess.run([initdb, "-D", str(data), "-U", USER, "--auth=trust",
                                  "-E", "UTF8", "--no-sync"],
                                 capture_output=True, text=True, timeout=timeout, **kwargs)
        except subprocess.TimeoutExpired as exc:
            shutil.rmtree(base, ignore_errors=True)
            raise PostgresServiceError(f"initdb took over {timeout:.0f} s") from exc
        if out.returncode != 0:
            shutil.rmtree(base, ignore_errors=True)
            raise PostgresServiceError(f"initdb failed ({out.returncode}):\n{out.stderr}")
        port = free_port()
        options = (f"-c listen_addresses={HOST} -c port={port} "
                   f"-c unix_socket_directories={base} -c fsync=off "
                   f"-c synchronous_commit=off -c full_page_writes=off "
                   f"-c max_connections=100 -c shared_buffers=32MB")
        subprocess.run([pg_ctl, "-D", str(data), "-l", str(log), "-o", options, "-w",
                        "-t", str(int(timeout)), "start"], capture_output=True, text=True,
                       timeout=timeout + 5, **kwargs)
        pidfile = data / "postmaster.pid"
        deadline = time.monotonic() + timeout
        server: PostgresServer | None = None
        while time.monotonic() < deadline:
            if pidfile.exists():
                with contextlib.suppress(ValueError, IndexError, OSError):
                    pid = int(pidfile.read_text().splitlines()[0])
                    server = cls(base, port, pid, owner)
                    if server.ready():
                        _running.add(server)
                        return server
            text = log_tail(log, 20)
            if "could not bind" in text or "Address already in use" in text:
                if server is not None:
                    server.stop()
                shutil.rmtree(base, ignore_errors=True)
                raise _PortConflict(f"port {port} taken")
            time.sleep(0.1)
        tail = log_tail(log, 40)
        if server is not None:
            server.stop()
        shutil.rmtree(base, ignore_errors=True)
        raise PostgresServiceError(f"postgres did not start within {timeout:.0f} s:\n{tail}")

    def ready(self) -> bool:
        """Whether the server answers a query."""
        try:
            self.query("SELECT 1")
            return True
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def connect(self, **kwargs: Any) -> Any:
        """A psycopg connection (autocommit) to the server."""
        import psycopg

        return psycopg.connect(self.dsn, autocommit=True, connect_timeout=5, **kwargs)

    def execute(self, sql: str, params: Any = None) -> None:
        """Run one statement (autocommit)."""
        with self.connect() as conn:
            conn.execute(sql, params)

    def query(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        """The rows of one query."""
        with self.connect() as conn:
            return list(conn.execute(sql, params).fetchall())

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server by PID (fast shutdown, then SIGKILL of its group) and remove its
        directory."""
        if self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self.pid, signal.SIGINT)   # postgres' "fast" shutdown
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(self.pid):
            time.sleep(0.05)
        if _alive(self.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, signal.SIGKILL)
        _running.discard(self)
        shutil.rmtree(self.base, ignore_errors=True)

    def __repr__(self) -> str:
        return f"<PostgresServer {self.dsn} pid={self.pid}>"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie of ours (pg_ctl daemonizes the server, so normally not our child)
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return True


class _PortConflict(PostgresServiceError, PortConflict):
    pass


_running = StopAtExit(timeout=5)
