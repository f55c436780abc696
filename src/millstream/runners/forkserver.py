"""Multiprocessing's fork server, forked from the driver instead of started afresh (Linux).

The stock fork server is a new interpreter that imports millstream, pyarrow and pandas
again (about 1 CPU-s per driver, most of a short streaming job's fixed cost). Forked from
the driver, it has them already. What a fork would also inherit is made clean before it
serves: every file descriptor but its own two and the standard streams now points at
``/dev/null`` (a worker or task-slot host forked from it then holds only what it is given:
a host holding another's pipe end hides that peer's death; the numbers stay open for
libraries that close their own at a fork), signal handlers go back to their defaults,
the standard streams are the process's own, and it leaves with ``os._exit`` (never the
driver's exit handlers). Then it runs multiprocessing's own fork-server loop, so the
``forkserver`` context works on it unchanged; if it dies, multiprocessing starts a stock
one.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from typing import Any

#: Set to ``0`` to start multiprocessing's stock fork server instead.
FORK_ENV = "MILLSTREAM_FORK_SERVER"


#: A driver with more resident memory than this gets the stock server: a forked one would
#: keep the driver's pages of the moment (a large frame the user drops later) for as long
#: as it lives.
MAX_DRIVER_RSS = 1 << 30

#: The state multiprocessing's fork server keeps, as this module sets it (Python 3.10-3.13;
#: an interpreter whose server keeps more, such as an authentication key, gets the stock one).
_SERVER_STATE = {"_forkserver_address", "_forkserver_alive_fd", "_forkserver_pid",
                 "_inherited_fds", "_lock", "_preload_modules"}


def available() -> bool:
    """Whether the fork server may be forked here: Linux, not switched off, an interpreter
    whose fork server this module knows, and a driver that is still small."""
    from multiprocessing import forkserver

    if not (sys.platform.startswith("linux") and hasattr(os, "fork")
            and os.environ.get(FORK_ENV, "1") != "0"):
        return False
    if set(vars(forkserver._forkserver)) != _SERVER_STATE:  # noqa: SLF001
        return False
    return _resident_bytes() <= MAX_DRIVER_RSS


def _resident_bytes() -> int:
    """This process's resident memory (Linux ``/proc``; unknown counts as too much)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return MAX_DRIVER_RSS + 1


def start_forked_server(preload: list[str]) -> bool:
    """Fork multiprocessing's fork server from this process unless one runs; whether this
    process now has a fork server of its own making (False: multiprocessing will start its
    stock one on first use)."""
    from multiprocessing import connection, forkserver, resource_tracker, util

    server: Any = forkserver._forkserver  # noqa: SLF001 - no public way to start it
    if not available() or server._forkserver_pid is not None:
        return False
    with server._lock:
        # the resource tracker first, as multiprocessing does: it is spawned, not forked
        resource_tracker.ensure_running()
        listener = socket.socket(socket.AF_UNIX)
        address = connection.arbitrary_address("AF_UNIX")
        listener.bind(address)
        if not util.is_abstract_socket_namespace(address):
            os.chmod(address, 0o600)
        listener.listen()
        alive_r, alive_w = os.pipe()
        try:
            pid = os.fork()
        except OSError:
            listener.close()
            os.close(alive_r)
            os.close(alive_w)
            raise
        if pid == 0:  # pragma: no cover - the server process (ends in os._exit)
            _serve(listener.fileno(), alive_r, preload)
        listener.close()
        os.close(alive_r)
        server._forkserver_address = address
        server._forkserver_alive_fd = alive_w
        server._forkserver_pid = pid
    return True


def _serve(listener_fd: int, alive_r: int, preload: list[str]) -> None:  # pragma: no cover
    """The forked server: make the process clean, then serve until the driver goes."""
    code = 0
    try:
        from multiprocessing import forkserver

        # the driver held it while forking: a process forked from here that starts one
        # of its own would wait for it forever
        forkserver._forkserver._lock = threading.Lock()  # noqa: SLF001
        _release_fds_except({0, 1, 2, listener_fd, alive_r})
        _default_signals()
        _fresh_standard_streams()
        import faulthandler

        if faulthandler.is_enabled():  # its file may have been one of the closed ones
            faulthandler.disable()
            if sys.stderr is not None:
                faulthandler.enable(sys.stderr)
        forkserver.main(listener_fd, alive_r, preload)
    except SystemExit:
        pass
    except BaseException:  # noqa: BLE001 - say why, then leave without the driver's atexit
        code = 1
        try:
            import traceback

            traceback.print_exc()
        except BaseException:  # noqa: BLE001
            pass
    finally:
        os._exit(code)


def _fresh_standard_streams() -> None:
    """New stream objects over descriptors 0-2: the driver's may have been mid-write in
    another thread at the fork, and their locks would then stay held here and in every
    process forked from here."""
    for name, fd, mode in (("stdin", 0, "r"), ("stdout", 1, "w"), ("stderr", 2, "w")):
        old = getattr(sys, f"__{name}__", None)
        try:
            line = mode == "w" and getattr(old, "line_buffering", False)
            stream = open(fd, mode, buffering=1 if line else -1,  # noqa: SIM115
                          encoding=getattr(old, "encoding", None) or "utf-8",
                          errors=getattr(old, "errors", None) or "strict", closefd=False)
        except (OSError, ValueError):
            stream = None
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def _release_fds_except(keep: set[int]) -> None:
    """Let go of every open descriptor of this process but ``keep``: each becomes
    ``/dev/null`` (the driver's pipe or file is no longer held here) rather than closed, so
    that a library whose fork handler later closes a descriptor it made in the driver
    (Arrow's self-pipe: a failed close aborts the process) finds one to close."""
    null = os.open(os.devnull, os.O_RDWR)
    try:
        try:
            open_fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
        except OSError:
            open_fds = list(range(os.sysconf("SC_OPEN_MAX")))
        for fd in open_fds:
            if fd in keep or fd == null:
                continue
            try:
                os.fstat(fd)  # (open: the listing's own descriptor is closed by now)
                os.dup2(null, fd, inheritable=False)
            except OSError:
                pass
    finally:
        os.close(null)


def _default_signals() -> None:
    """Signal handlers as a new interpreter has them (the driver's may clean up its files:
    not this process's business), and no wake-up descriptor."""
    signal.set_wakeup_fd(-1)
    for sig in signal.valid_signals():
        try:
            handler = signal.getsignal(sig)
        except (OSError, ValueError):
            continue
        if callable(handler) and handler is not signal.default_int_handler:
            try:
                signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError):
                pass
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    except (OSError, ValueError):
        pass
