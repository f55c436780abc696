"""How a streaming job's error reaches the user: once.

``await_termination`` raises it as a batch action does (the message says where and what
failed; the coordinator's internal frames only with ``MILLSTREAM_DEBUG=1``). An error
nobody took that way is logged when the interpreter exits, as asyncio does with a task's
exception that was never retrieved, so a job left running in the background still tells.
"""

from __future__ import annotations

import atexit
import logging
from typing import NoReturn

from millstream.errors import MillstreamError
from millstream.runtime.runner import debugging

_log = logging.getLogger("millstream.runtime.streaming.job")

#: job id -> error text, of failed jobs whose error nobody has taken yet
_UNTAKEN: dict[str, str] = {}


def note_failure(job_id: str, text: str) -> None:
    """A job failed: log its error at exit unless :func:`raise_taken_error` takes it."""
    if not _UNTAKEN:
        atexit.register(_log_untaken)
    _UNTAKEN[job_id] = text


def raise_taken_error(job_id: str, error: BaseException) -> NoReturn:
    """Raise a failed job's error to the caller (and no log line at exit)."""
    _UNTAKEN.pop(job_id, None)
    if isinstance(error, MillstreamError) and not debugging():
        raise error.with_traceback(None) from None
    raise error


def _log_untaken() -> None:
    for job_id, text in list(_UNTAKEN.items()):
        _log.error("streaming job %s failed: %s", job_id, text)
    _UNTAKEN.clear()
