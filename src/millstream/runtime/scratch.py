"""Scratch space of this process, and leaving nothing behind.

Every temporary file of a process lives under one directory, ``millstream-<pid>-*`` in
the spill directory (jobs' shuffle files and spills, streaming tasks' spilled state,
cached datasets on disk), plus ``millstream-cache-<pid>-*`` in ``/dev/shm`` for cached
datasets kept in memory. Both go when the session shuts down: at exit, on ``ms.shutdown()``,
and on SIGTERM (the handler cleans up, then the process dies of the signal as it would
have). Scratch of processes that no longer exist (killed with SIGKILL, a machine that
lost power) is removed when a session next creates its own.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import threading
from collections.abc import Callable, Iterable

_log = logging.getLogger(__name__)

#: ``millstream-<pid>-...`` and ``millstream-cache-<pid>-...``: names that carry their owner.
_OWNED = re.compile(r"^millstream-(?:cache-)?(\d+)-")


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(bases: Iterable[str]) -> list[str]:
    """Remove the scratch directories and files under ``bases`` whose owning process is gone;
    returns what was removed."""
    removed = []
    for base in bases:
        try:
            names = os.listdir(base)
        except OSError:
            continue
        for name in names:
            m = _OWNED.match(name)
            if m is None or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
                continue
            path = os.path.join(base, name)
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
                removed.append(path)
            except OSError:  # another process cleaning up at the same time, or not ours
                continue
    if removed:
        _log.info("removed %d scratch path(s) of processes that no longer exist", len(removed))
    return removed


_installed = False


def install_termination_cleanup(cleanup: Callable[[], None]) -> None:
    """On SIGTERM, run ``cleanup`` and then die of the signal as the process would have.

    Installed once, from the main thread, and only where the program left SIGTERM at its
    default (a program with its own handler keeps it). SIGINT needs nothing here: Python
    raises KeyboardInterrupt and the exit handlers clean up.
    """
    global _installed
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    try:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return

        def on_term(signum: int, frame: object) -> None:
            try:
                cleanup()
            finally:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)

        signal.signal(signal.SIGTERM, on_term)
        _installed = True
    except (ValueError, OSError):  # not the main thread of the main interpreter
        return


def stop_helper_processes() -> None:
    """At exit: stop multiprocessing's fork server and resource tracker and wait for them, so
    no process of ours outlives the driver (not even as a zombie nobody reaps)."""
    from multiprocessing import forkserver, resource_tracker

    server = forkserver._forkserver  # noqa: SLF001
    pid = getattr(server, "_forkserver_pid", None)
    if pid is not None:
        # it holds nothing to flush (the workers it forked are gone), but asked to stop it
        # shuts its interpreter down with pyarrow and pandas loaded: 0.5 s of every
        # program's exit. SIGTERM ends it at once (it has no handler for it)
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    for helper in (server, resource_tracker._resource_tracker):  # noqa: SLF001
        try:
            helper._stop()  # noqa: SLF001 - no public way to stop and reap them
        except Exception:  # noqa: BLE001 - another Python: the helpers end with the driver anyway
            _log.debug("could not stop %r", helper, exc_info=True)
