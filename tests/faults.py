"""Helpers for fault tests: inject a fault at a state the test waits for, never at a time it
hopes for.

:class:`HeldRows` feeds a streaming job from a test source in two parts: the job cannot
end before :meth:`HeldRows.release`, so a fault injected between the two (after the
job reached the state the test waits for) always lands in the middle of the job, however
slow or busy the machine is.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from millstream.testing import TestSource


class HeldRows:
    """``rows`` as a test source of ``partitions`` partitions, in items of ``chunk`` rows; the
    first ``held_back`` fraction is there at once, the rest comes with :meth:`release`."""

    def __init__(self, rows: list[dict[str, Any]], partitions: int = 2, chunk: int = 40,
                 held_back: float = 0.5) -> None:
        self.src = TestSource(partitions=partitions)
        items = [rows[i:i + chunk] for i in range(0, len(rows), chunk)]
        cut = int(len(items) * (1 - held_back))
        self._rest = items[cut:]
        self.partitions = partitions
        for n, item in enumerate(items[:cut]):
            self.src.add(item, partition=n % partitions)
        self._next = cut
        self.fed = sum(len(item) for item in items[:cut])

    def dataset(self) -> Any:
        """The rows as a Dataset (start it with ``executor="parallel"`` or "inline")."""
        return self.src.dataset()

    def wait_until_checkpointed(self, job: Any, timeout: float = 60.0) -> None:
        """Wait until ``job`` has read every row fed so far and completed a checkpoint: the
        state a fault test injects its fault at. Both always come (the held rows keep the
        job running), but not necessarily a second checkpoint: the job checkpoints only
        after an epoch in which something happened, and a fast machine reads the first part
        within one."""
        wait_for(lambda: (m := job.metrics())["records_in"] >= self.fed
                 and m["checkpoints"] >= 1, timeout,
                 f"the {self.fed} rows fed first to be read and checkpointed")

    def release(self) -> None:
        """Feed the rest of the rows and end the stream."""
        for item in self._rest:
            self.src.add(item, partition=self._next % self.partitions)
            self._next += 1
        self._rest = []
        self.src.close()


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0, what: str = "") -> None:
    """Wait until ``predicate()`` holds; fail the test naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.02)


def straggler(release: Any, partition: int = 3) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A row function whose first attempt at ``partition`` waits until the file ``release``
    exists: only a backup attempt can finish the job before the test creates it (after the
    job), and a straggler that was not stopped ends then instead of holding a worker."""
    path = str(release)

    def fn(row: dict[str, Any]) -> dict[str, Any]:
        import os
        import time

        from millstream.core.context import current_context

        ctx = current_context()
        if ctx.partition == partition and ctx.attempt == 0:
            deadline = time.monotonic() + 3600
            while not os.path.exists(path) and time.monotonic() < deadline:
                time.sleep(0.05)
        return row

    return fn
