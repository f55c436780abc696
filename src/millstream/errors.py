"""Exception types raised by Millstream.

Every error says what was wrong, where (file, line, operator, partition) and, when
there is one, what to do about it.
"""

from __future__ import annotations


class MillstreamError(Exception):
    """Base class of all Millstream errors."""


class PlanError(MillstreamError, ValueError):
    """The pipeline is invalid (unknown column, bad argument, unsupported combination)."""


class SchemaError(PlanError):
    """Columns or types do not fit the operation asked for."""


class NonRetryableError(MillstreamError):
    """A task failure that would fail again on retry (bad input data, bad config)."""


class BadRecordError(NonRetryableError):
    """A malformed input record, with the file, line number and byte offset where it was found."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 offset: int | None = None, record: str | None = None):
        super().__init__(message)
        self.path = path
        self.line = line
        self.offset = offset
        self.record = record


class StorageError(MillstreamError, OSError):
    """Reading or writing a file or object failed (after retries for transient errors)."""


class OutputExistsError(StorageError, FileExistsError):
    """The output location already holds data and mode='error' was asked for."""


class TaskError(MillstreamError):
    """A task failed on all of its attempts; the job was stopped.

    ``stage``, ``partition`` and ``operator`` say where; ``attempts`` holds one cause
    per attempt; ``user_traceback`` is the user's own code's traceback when a user
    function raised; ``original`` is the exception itself when it reached the driver
    (chained as ``__cause__`` only with ``MILLSTREAM_DEBUG=1``, so its internal frames do
    not bury the message).
    """

    #: What the failed task read ("input split ...", "reduce partition 3"); set by the
    #: batch scheduler.
    task_input: str | None = None
    #: How many tasks the failed task's stage had; set by the batch scheduler.
    stage_tasks: int | None = None

    def __init__(self, message: str, *, stage: str | None = None, partition: int | None = None,
                 operator: str | None = None, attempts: list[str] | None = None,
                 user_traceback: str | None = None, cause_type: str | None = None,
                 original: BaseException | None = None):
        super().__init__(message)
        self.stage = stage
        self.partition = partition
        self.operator = operator
        self.attempts = attempts or []
        self.user_traceback = user_traceback
        self.cause_type = cause_type
        self.original = original


class UserFunctionError(TaskError):
    """A user-supplied function (map, filter, map_batches, ...) raised an exception."""


class WorkerLostError(MillstreamError):
    """A worker process died while running a task (killed, out of memory, crashed)."""


class RunnerError(MillstreamError):
    """The runner could not be started or was asked for something it cannot do."""


class UserCodeFailure(MillstreamError):
    """Raised inside a task when a user function raised; wraps the original exception.

    The runner turns it into a :class:`UserFunctionError` on the driver, with the
    user's own traceback first.
    """

    def __init__(self, operator: str, function: str, original: BaseException,
                 record: str | None = None):
        detail = f" on record {record}" if record else ""
        super().__init__(f"{function} in operator {operator} raised "
                         f"{type(original).__name__}: {original}{detail}")
        self.operator = operator
        self.function = function
        self.original = original
        self.record = record

    def __reduce__(self) -> tuple:
        # picklable, so a streaming task in another process can hand it to the driver
        return (type(self), (self.operator, self.function, self.original, self.record))


class StreamingError(MillstreamError):
    """A streaming job failed (a sink function raised, a task could not be restarted, ...)."""


class SimulatedCrash(MillstreamError):
    """Raised inside a streaming job by fault injection (tests): the job dies at that point,
    cleaning nothing up, as a killed driver would."""


class FetchFailedError(NonRetryableError):
    """A shuffle map output could not be read (lost with its worker or disk); recompute it."""

    def __init__(self, message: str, *, stage_id: int | None = None, map_index: int | None = None):
        super().__init__(message)
        self.stage_id = stage_id
        self.map_index = map_index


class StorageNotFoundError(StorageError, FileNotFoundError):
    """A path, directory or glob pattern named no existing file."""


class SQLError(PlanError):
    """A SQL statement that cannot be parsed or translated (``ms.sql``): ``line`` and
    ``column`` (1-based) say where, and the message shows the line with a caret under the
    offending token, when the place is known."""

    def __init__(self, message: str, *, line: int | None = None, column: int | None = None,
                 context: str | None = None):
        text = message if context is None else f"{message}\n{context}"
        super().__init__(text)
        self.reason = message
        self.line = line
        self.column = column
