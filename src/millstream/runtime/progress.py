"""What the runners report about a stage's tasks while they run, published as events.

A runner calls :class:`StageProgress` when an attempt starts, reports rows and bytes read
so far, finishes, fails or is killed (a speculative copy that lost); the stage's counts
(tasks done, rows and bytes read, rows written, retries) are kept here and, when anybody
listens on the event bus (:mod:`millstream.runtime.events`), published: every task
attempt as ``task_start``/``task_progress``/``task_end`` and the stage as
``stage_progress`` (at most ten a second) for the progress display
(:mod:`millstream.runtime.display`) and the dashboard.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from millstream.runtime.events import BUS

#: ``stage_progress`` events at most this often (s), besides the first and the last
STAGE_EVERY_S = 0.1
#: how often a worker reports what its running task has read so far (s)
TASK_PROGRESS_EVERY_S = 0.25


class StageProgress:
    """Counts of one stage's tasks, fed by the runner; published when anybody listens."""

    def __init__(self, name: str, total: int, job_id: str = "", stage_id: int = 0) -> None:
        self.name = name
        self.total = total
        self.job_id = job_id
        self.stage_id = stage_id
        self.done = 0
        self.rows = 0  # rows written by finished tasks
        self.bytes = 0
        self.rows_read = 0  # rows read by finished tasks
        self.bytes_read = 0
        self.retries = 0
        self.start = time.perf_counter()
        #: task index -> (rows, bytes) read so far by its furthest running attempt
        self._partial: dict[int, tuple[int, int]] = {}
        #: (task, attempt) -> (start time, worker, speculative) of running attempts
        self._running: dict[tuple[int, int], tuple[float, str, bool]] = {}
        self._last_publish = 0.0
        self.publishing = BUS.active
        if self.publishing:
            self._publish_stage(force=True)

    # ------------------------------------------------------------------ runner side
    def task_started(self, index: int, attempt: int, worker: str = "",
                     speculative: bool = False) -> None:
        """An attempt of task ``index`` started on ``worker`` (a speculative copy when
        another attempt of it still runs)."""
        if not self.publishing:
            return
        now = time.time()
        self._running[(index, attempt)] = (now, worker, speculative)
        BUS.publish({"type": "task_start", "ts": now, "job": self.job_id,
                     "stage": self.stage_id, "task": index, "attempt": attempt,
                     "worker": worker, "speculative": speculative})

    def task_progress(self, index: int, attempt: int, rows: int, nbytes: int) -> None:
        """A running attempt has read ``rows`` rows, ``nbytes`` bytes so far."""
        if not self.publishing:
            return
        old = self._partial.get(index, (0, 0))
        if rows >= old[0]:
            self._partial[index] = (rows, nbytes)
        BUS.publish({"type": "task_progress", "ts": time.time(), "job": self.job_id,
                     "stage": self.stage_id, "task": index, "attempt": attempt,
                     "rows_read": rows, "bytes_read": nbytes})
        self._publish_stage()

    def task_done(self, index: int, attempt: int, result: Any) -> None:
        """An attempt finished first with ``result`` (a TaskResult): the task is done."""
        self.done += 1
        self.rows += result.rows_out
        self.bytes += result.bytes_out
        self.rows_read += result.rows_in
        self.bytes_read += getattr(result, "bytes_in", 0)
        if not self.publishing:
            return
        self._partial.pop(index, None)
        self._end(index, attempt, "succeeded", result=result)
        self._publish_stage(force=self.done == self.total)

    def task_failed(self, index: int, attempt: int, cause: str, retry: bool) -> None:
        """An attempt failed (``retry``: another attempt follows)."""
        if retry:
            self.retries += 1
        if self.publishing:
            self._end(index, attempt, "failed", error=cause)
            self._publish_stage()

    def task_killed(self, index: int, attempt: int, why: str) -> None:
        """An attempt was stopped (a speculative copy that lost the race)."""
        if self.publishing:
            self._end(index, attempt, "killed", error=why)

    def task_retried(self) -> None:
        """Count a retry (runners that report failures through :meth:`task_failed` do not
        call this)."""
        self.retries += 1

    # ------------------------------------------------------------------ reading
    @property
    def rows_read_so_far(self) -> int:
        """Rows read by finished tasks and, so far, by running ones."""
        return self.rows_read + sum(r for r, _ in self._partial.values())

    @property
    def bytes_read_so_far(self) -> int:
        """Bytes read by finished tasks and, so far, by running ones."""
        return self.bytes_read + sum(b for _, b in self._partial.values())

    def snapshot(self) -> dict[str, Any]:
        """The stage's counts as a ``stage_progress`` event's fields."""
        return {"job": self.job_id, "stage": self.stage_id, "name": self.name,
                "total": self.total, "done": self.done, "running": len(self._running),
                "rows_read": self.rows_read_so_far, "bytes_read": self.bytes_read_so_far,
                "rows_out": self.rows, "bytes_out": self.bytes, "retries": self.retries,
                "elapsed": time.perf_counter() - self.start}

    def close(self) -> None:
        """The stage ended (or failed): a last ``stage_progress`` event."""
        if self.publishing:
            self._publish_stage(force=True, final=True)

    # ------------------------------------------------------------------ publishing
    def _end(self, index: int, attempt: int, status: str, result: Any = None,
             error: str | None = None) -> None:
        started, worker, speculative = self._running.pop((index, attempt),
                                                         (time.time(), "", False))
        now = time.time()
        event: dict[str, Any] = {
            "type": "task_end", "ts": now, "job": self.job_id, "stage": self.stage_id,
            "task": index, "attempt": attempt, "status": status, "start": started, "end": now,
            "worker": getattr(result, "worker", "") or worker, "speculative": speculative}
        if result is not None:
            event.update(
                seconds=result.seconds, rows_in=result.rows_in, rows_out=result.rows_out,
                bytes_in=getattr(result, "bytes_in", 0), bytes_out=result.bytes_out,
                shuffle_read=getattr(result, "shuffle_read", 0),
                shuffle_write=shuffle_bytes(result.value),
                spills=result.counters.get(("millstream", "spills"), 0))
        if error is not None:
            event["error"] = error
        BUS.publish(event)

    def _publish_stage(self, force: bool = False, final: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last_publish < STAGE_EVERY_S:
            return
        self._last_publish = now
        BUS.publish({"type": "stage_progress", "ts": time.time(), "final": final,
                     **self.snapshot()})


def shuffle_bytes(value: Any) -> int:
    """Bytes a map task wrote to its shuffle output (0 for other outputs)."""
    try:
        return int(getattr(value, "total_bytes", 0) or 0)
    except (TypeError, ValueError):
        return 0


def progress_enabled(setting: bool | None) -> bool:
    """Progress is on when asked, or by default when stderr is a terminal or the process
    is a Jupyter kernel."""
    if setting is not None:
        return setting
    try:
        if sys.stderr.isatty():
            return True
    except Exception:  # noqa: BLE001
        pass
    from millstream.runtime.display import in_notebook

    return in_notebook()
