"""Process control shared by the test services (:mod:`.kafka`, :mod:`.seaweedfs`).

Free loopback ports, starting a server binary in its own session with its output appended
to a log file (and, on Linux, killed with its parent), signalling its process group, and
the log tails and descriptions that go into failure messages. No pytest dependency.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

T = TypeVar("T")

HOST = "127.0.0.1"

#: Proxy variables a loopback service must not inherit (compared lower-case).
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy")


def free_port() -> int:
    """A TCP port free right now on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free right now on every interface (held open together)."""
    socks: list[socket.socket] = []
    try:
        while len(socks) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("0.0.0.0", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class PortConflict(Exception):
    """Mixed into a service's error: a port was taken between choosing and binding it."""


def start_with_retries(start_once: Callable[[Path], T], tmpdir: str | os.PathLike[str], *,
                       prefix: str, attempts: int, what: str, error: type[Exception]) -> T:
    """``start_once(base)`` in a fresh directory ``base`` under ``tmpdir`` (named
    ``prefix...``), again with a new directory (and new ports) when it raises
    :class:`PortConflict`; ``error`` when every attempt collided."""
    last: Exception | None = None
    for _ in range(attempts):
        base = Path(tempfile.mkdtemp(prefix=prefix, dir=os.fspath(tmpdir)))
        try:
            return start_once(base)
        except PortConflict as exc:
            last = exc
    raise error(f"{what}: ports kept colliding: {last}")


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """A preexec_fn that makes the child die with its parent (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except Exception:
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGKILL))

    return preexec


_PREEXEC = _pdeathsig_preexec()


def spawn_logged(args: Sequence[str], *, cwd: Path, env: Mapping[str, str], log: IO[bytes],
                 die_with_parent: bool = True) -> subprocess.Popen[bytes]:
    """Start ``args`` in a new session (process group == PID), stdout and stderr appended
    to the open binary file ``log`` after a '=== time command' header line; with
    ``die_with_parent`` it also gets SIGKILL when the thread that started it exits (Linux).
    """
    log.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(args)}\n".encode())
    return subprocess.Popen(
        list(args), cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True,
        preexec_fn=_PREEXEC if die_with_parent else None)


def signal_group(popen: subprocess.Popen[bytes], sig: int) -> None:
    """Send ``sig`` to the process group of ``popen`` and to the process itself, unless
    it has been reaped (its PID may then belong to someone else)."""
    if popen.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, sig)
    with contextlib.suppress(ProcessLookupError):
        popen.send_signal(sig)


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file, '(no log)' when it cannot be read."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def describe(name: str, popen: subprocess.Popen[bytes] | None, log_path: Path,
             command: str) -> str:
    """Name, PID, exit code, command line and log tail of a process, for failure messages."""
    pid = popen.pid if popen else None
    code = popen.poll() if popen else None
    return (f"--- {name} (pid {pid}, exit {code}) log {log_path}:\n"
            f"$ {command}\n{log_tail(log_path)}")


class StopAtExit:
    """The services started and not yet stopped, stopped at interpreter exit: a safety
    net for tests that forget. Services have ``stop(timeout=...)``."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self._running: set[Any] = set()
        self._lock = threading.Lock()
        atexit.register(self.stop_all)

    def add(self, service: Any) -> None:
        with self._lock:
            self._running.add(service)

    def discard(self, service: Any) -> None:
        with self._lock:
            self._running.discard(service)

    def stop_all(self) -> None:
        with self._lock:
            services = list(self._running)
        for service in services:
            with contextlib.suppress(Exception):
                service.stop(timeout=self.timeout)
