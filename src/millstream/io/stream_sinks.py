"""Streaming sinks (the :class:`~millstream.io.base.StreamSink` protocol) that are not
connectors: rows collected in memory, a function per committed epoch, the console, and
:func:`make_sink`, which turns what the user passed into a sink.

:class:`CollectingSink` keeps committed rows in memory (tests); :class:`CallbackSink`
(``ms.sink(fn)``) calls ``fn`` with each committed epoch's rows and :class:`ConsoleSink`
(``ms.console()``) prints them; these three run in the driver (they have no
``for_subtask``) and take updating results: each row's change kind is in the column
``change`` ("+I", "-U", "+U", "-D"; the column is absent while a result is
append-only). The streaming file sink is
:class:`~millstream.io.files.stream_sink.FileStreamSink`.
"""

from __future__ import annotations

import inspect
import sys
import threading
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from millstream.core.arrow import batch_to_rows, concat_batches, format_table
from millstream.core.changelog import RETRACT, materialize, to_visible
from millstream.errors import PlanError, StreamingError
from millstream.io.files.stream_sink import FileStreamSink


class CollectingSink:
    """Keeps the rows of committed epochs in memory (tests); commits are idempotent per epoch.

    The rows of an epoch wait here between its pre-commit and its commit; they are not in
    the checkpoint (``recommit_on_restore = False``: a restart resumes from the newest
    checkpoint whose commit is known and replays the epochs after it). An updating
    result's rows keep their change kind (column ``change``); :meth:`final_rows` applies
    the changes.
    """

    recommit_on_restore = False
    changelog_mode = RETRACT

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[pa.RecordBatch] = []
        self._staged: dict[int, pa.Table | None] = {}
        self._committed: dict[int, pa.Table] = {}

    def begin(self, epoch: int) -> None:
        """Start collecting ``epoch``; drops what an unfinished earlier attempt wrote."""
        self._pending = []

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        """Buffer rows of the current epoch."""
        batches = batch.to_batches() if isinstance(batch, pa.Table) else [batch]
        self._pending.extend(b for b in batches if b.num_rows)

    def pre_commit(self, epoch: int) -> dict[str, Any]:
        """Hold the epoch's rows until its commit; the handle names the epoch only."""
        self._staged[epoch] = concat_batches(self._pending) if self._pending else None
        self._pending = []
        return {"epoch": epoch}

    def commit(self, handle: dict[str, Any]) -> None:
        """Make the epoch's rows visible (once)."""
        epoch = handle["epoch"]
        table = self._staged.pop(epoch, None)
        with self._lock:
            if epoch not in self._committed and table is not None:
                self._committed[epoch] = table
            self._committed.setdefault(epoch, pa.table({}))

    def abort(self, handle: dict[str, Any] | None = None) -> None:
        """Drop the pending rows."""
        self._pending = []

    def to_arrow(self) -> pa.Table:
        """Committed rows in epoch order (an updating result's with column ``change``)."""
        with self._lock:
            tables = [t for _, t in sorted(self._committed.items()) if t.num_rows]
        if not tables:
            return pa.table({})
        return to_visible(pa.concat_tables(tables, promote_options="permissive"))

    def rows(self) -> list[dict[str, Any]]:
        """Committed rows as dicts, in epoch order."""
        return batch_to_rows(self.to_arrow())

    def final_table(self, keys: list[str] | None = None) -> pa.Table:
        """The result the committed changes leave, without the ``change`` column: each
        +I/+U adds its row, each -U/-D takes one copy away; with ``keys`` (an upsert
        view) the last change of each key wins. An append-only result is returned whole."""
        return materialize(self.to_arrow(), keys)

    def final_rows(self, keys: list[str] | None = None) -> list[dict[str, Any]]:
        """:meth:`final_table` as dicts."""
        return batch_to_rows(self.final_table(keys))

    def committed_epochs(self) -> list[int]:
        """Epochs committed so far."""
        with self._lock:
            return sorted(self._committed)




def _positional_arity(fn: Callable[..., Any]) -> int:
    """How many positional arguments ``fn`` accepts (2 for ``*args``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 1
    n = 0
    for p in params:
        if p.kind == p.VAR_POSITIONAL:
            return 2
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            n += 1
    return n


class CallbackSink:
    """Calls ``fn(table)`` or ``fn(table, epoch)`` once per committed epoch, in the driver.

    ``table`` is a ``pyarrow.Table`` of the epoch's rows (Spark's ``foreachBatch``). The
    call happens in ``commit``, after the epoch's checkpoint is complete, so nothing is
    delivered that a restart would roll back. The rows wait in memory between the
    pre-commit and the call, not in the checkpoint: after a crash before or during the
    call, the restarted job resumes from the newest checkpoint whose commit is known
    (``recommit_on_restore = False``) and replays the epochs after it, so ``fn`` gets those
    epochs again (same epoch numbers and rows, for a deterministic source); a crash after
    the call but before the commit is recorded repeats it too. So delivery is
    at-least-once; an ``fn`` idempotent per epoch (e.g. overwrite the output of epoch ``e``)
    makes it exactly-once. Epochs without rows are skipped unless ``skip_empty=False``. A
    raising ``fn`` fails the job. An updating result's rows come with their change kind
    in column ``change`` ("+I", "-U", "+U", "-D"), in order.
    """

    recommit_on_restore = False
    changelog_mode = RETRACT

    def __init__(self, fn: Callable[..., Any], skip_empty: bool = True) -> None:
        if not callable(fn):
            raise PlanError(f"ms.sink(fn) needs a function of the epoch's rows, got {fn!r}")
        self.fn = fn
        self.skip_empty = skip_empty
        self._with_epoch = _positional_arity(fn) >= 2
        self._pending: list[pa.RecordBatch] = []
        self._staged: dict[int, pa.Table | None] = {}
        self._schema: pa.Schema | None = None
        #: the newest epoch delivered by this instance (a re-commit of it is skipped)
        self._delivered: int | None = None

    def begin(self, epoch: int) -> None:
        """Start ``epoch``; drops what an unfinished earlier attempt wrote."""
        self._pending = []

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        """Buffer rows of the current epoch."""
        batches = batch.to_batches() if isinstance(batch, pa.Table) else [batch]
        for b in batches:
            if self._schema is None:
                self._schema = b.schema
            if b.num_rows:
                self._pending.append(b)

    def pre_commit(self, epoch: int) -> dict[str, Any]:
        """Hold the epoch's rows until its commit; the handle names the epoch only."""
        self._staged[epoch] = concat_batches(self._pending) if self._pending else None
        self._pending = []
        return {"epoch": epoch}

    def commit(self, handle: dict[str, Any]) -> None:
        """Call the function with the epoch's rows (once per epoch in this process)."""
        epoch = handle["epoch"]
        table = self._staged.pop(epoch, None)
        if self._delivered is not None and epoch <= self._delivered:
            return
        if table is None:
            if self.skip_empty:
                self._delivered = epoch
                return
            table = self._schema.empty_table() if self._schema is not None else pa.table({})
        table = to_visible(table)
        try:
            if self._with_epoch:
                self.fn(table, epoch)
            else:
                self.fn(table)
        except Exception as exc:
            raise StreamingError(f"the sink function {getattr(self.fn, '__name__', self.fn)!r} "
                                 f"failed on epoch {epoch} ({table.num_rows} rows): "
                                 f"{type(exc).__name__}: {exc}; a restart from the checkpoint "
                                 f"delivers this epoch again") from exc
        self._delivered = epoch

    def abort(self, handle: dict[str, Any] | None = None) -> None:
        """Drop the pending rows."""
        self._pending = []


class ImmediateSink:
    """Calls ``fn(table)`` with every output batch as soon as it is made, in the task that
    made it (a worker process on the parallel executor): the lowest latency, no wait for a
    checkpoint. At-least-once: rows replayed after a restart are delivered again.
    ``ms.sink(fn, delivery="immediate")`` makes one."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        if not callable(fn):
            raise PlanError(f"ms.sink(fn) needs a function of the rows, got {fn!r}")
        self.fn = fn
        self.subtask: int | None = None

    def for_subtask(self, index: int) -> ImmediateSink:
        """A copy for parallel sink instance ``index`` (each task calls ``fn`` itself)."""
        sub = ImmediateSink(self.fn)
        sub.subtask = index
        return sub

    def begin(self, epoch: int) -> None:
        """Nothing to stage."""

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        """Deliver the rows now."""
        table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
        if not table.num_rows:
            return
        try:
            self.fn(table)
        except Exception as exc:
            raise StreamingError(f"the sink function {getattr(self.fn, '__name__', self.fn)!r} "
                                 f"failed on {table.num_rows} rows: {type(exc).__name__}: "
                                 f"{exc}") from exc

    def pre_commit(self, epoch: int) -> dict[str, Any]:
        """Everything was delivered already."""
        return {"epoch": epoch}

    def commit(self, handle: dict[str, Any]) -> None:
        """Nothing to make visible."""

    def abort(self, handle: dict[str, Any] | None = None) -> None:
        """Nothing staged."""


class ConsoleSink(CallbackSink):
    """Prints the rows of each committed epoch as a table (Spark's console sink; debugging)."""

    def __init__(self, num_rows: int = 20, truncate: bool = True, file: Any = None) -> None:
        if num_rows < 1:
            raise PlanError(f"console sink: num_rows must be >= 1, got {num_rows}")
        self.num_rows = int(num_rows)
        self.truncate = truncate
        self.file = file
        super().__init__(self._print)

    def _print(self, table: pa.Table, epoch: int) -> None:
        bar = "-" * 43
        print(f"{bar}\nEpoch: {epoch}\n{bar}\n"
              f"{format_table(table, self.num_rows, self.truncate)}\n",
              file=self.file if self.file is not None else sys.stdout, flush=True)


def make_sink(sink: Any) -> Any:
    """A streaming sink from what the user passed.

    None: collect in memory; "console": print; another string: a Parquet directory; a
    function: called with each committed epoch's rows (:class:`CallbackSink`); or an
    object with ``begin``/``write``/``pre_commit``/``commit``.
    """
    if sink is None:
        return CollectingSink()
    if isinstance(sink, str):
        if sink == "console":
            return ConsoleSink()
        return FileStreamSink(sink)  # (appends only: ms.file_sink(path, changelog=True))
    protocol = ("begin", "write", "pre_commit", "commit")
    missing = [m for m in protocol if not hasattr(sink, m)]
    if len(missing) == len(protocol) and callable(sink):
        return CallbackSink(sink)
    if missing:
        raise PlanError(f"sink {sink!r} cannot be used by a streaming job: it lacks {missing} "
                        f"(use a path, 'console', a function of each epoch's rows "
                        f"(ms.sink(fn)), FileStreamSink, CollectingSink or KafkaSink)")
    return sink


