"""Streaming jobs still running when the program exits: ended quietly, before
multiprocessing's own exit handler terminates their task hosts (which the coordinator would
take for lost hosts, and restart)."""

from __future__ import annotations

import atexit
import logging
import time
import weakref
from typing import Any

_log = logging.getLogger(__name__)

#: jobs started in this process (weakly: one that ended and was dropped goes)
_RUNNING: weakref.WeakSet[Any] = weakref.WeakSet()
_registered = False


def end_with_the_program(job: Any) -> None:
    """Remember a job that is starting, so that the program's exit ends it."""
    global _registered
    if not _registered:
        # atexit runs the last-registered handler first: multiprocessing's must be in place
        import multiprocessing.util  # noqa: F401

        atexit.register(end_running_jobs)
        _registered = True
    _RUNNING.add(job)


def end_running_jobs(timeout: float = 5.0) -> None:
    """End every running job now (no final checkpoint: a restart continues from the last
    one), saying so once per job, and wait up to ``timeout`` for them to let go of their
    hosts."""
    jobs = [j for j in list(_RUNNING) if j.is_active]
    for job in jobs:
        job.abandon()
        _log.warning("streaming job %s was still running when the program exited: ended "
                     "without a final checkpoint (stop() or await_termination() before "
                     "exiting avoids this)", job.job_id)
    deadline = time.monotonic() + timeout
    for job in jobs:
        job._thread.join(max(0.0, deadline - time.monotonic()))  # noqa: SLF001
