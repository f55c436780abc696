"""How a streaming job's error reaches the user: once.

``await_termination`` raises it as a batch action does (the message says where and what
failed; the coordinator's internal frames only with ``MILLSTREAM_DEBUG=1``). An error
nobody took that way is logged when the interpreter exits, as asyncio does with a task's
exception that was never retrieved, so a job left running in the background still tells.
"""

from __future__ import annotations

import atexit
import logging
from typing import TYPE_CHECKING, NoReturn

from millstream.errors import MillstreamError, StreamingError, UserFunctionError
from millstream.runtime.runner import debugging

if TYPE_CHECKING:
    from millstream.runtime.streaming.layout import Chain

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


class TaskFailed(Exception):
    """A task raised; carries its error for the driver (``error()``: what the user gets)."""

    def __init__(self, chain: Chain, text: str, tb: str, exc: BaseException | None,
                 user_tb: str | None = None) -> None:
        super().__init__(text)
        self.chain = chain
        self.text = text
        self.tb = tb
        self.exc = exc
        self.user_tb = user_tb

    def error(self) -> BaseException:
        c = self.chain
        where = f"stage {c.stage.id} ({c.stage.purpose}), partition {c.key[2]}"
        if self.user_tb is not None:  # a user function raised: ms.UserFunctionError, as in batch
            from millstream.core.pickling import restore_code_locations

            user_tb = restore_code_locations(self.user_tb, [(f.args, f.kwargs)
                                                            for f in c.pipe.ops])
            err = UserFunctionError(
                f"{self.text.split(': ', 1)[-1]}\n  in streaming task {where}\n\n{user_tb}",
                stage=f"{c.stage.id} ({c.stage.purpose})", partition=c.key[2],
                operator=getattr(self.exc, "operator", None), user_traceback=user_tb,
                cause_type=type(getattr(self.exc, "original", None)).__name__)
            err.original = getattr(self.exc, "original", self.exc)  # type: ignore[attr-defined]
            if debugging():
                err.add_note(f"task traceback:\n{self.tb}")
            return err
        if self.exc is not None:
            try:
                self.exc.add_note(f"in streaming task {where}; task traceback:\n{self.tb}")
            except AttributeError:  # pragma: no cover
                pass
            return self.exc
        return StreamingError(f"streaming task {where} failed: {self.text}\n{self.tb}")
