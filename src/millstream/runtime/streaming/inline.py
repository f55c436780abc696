"""Inline hosts: every task of a streaming job in the calling process, stepped in turn.

Messages move through in-process queues and batches pass by reference. The schedule is
deterministic, round by round: a round lets every source task poll once (one batch,
or one item of a test source), then runs the other tasks until no input is left;
control messages (checkpoint barriers, commits) are handled in a round of their own,
so a checkpoint completes before the sources read on. Test sources, virtual clocks and
fault points need this executor (``executor="inline"``); it is also the cheapest for
small jobs (no processes, no serialization).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from millstream.core.time import Clock
from millstream.runtime.streaming.spec import TaskSpec, close_quietly, failure_message
from millstream.runtime.streaming.task import StreamTask


class _InlineChannels:
    """A task's channels over the hosts' in-process queues (unbounded: the round drains them)."""

    __slots__ = ("hosts", "index")

    def __init__(self, hosts: InlineHosts, index: int) -> None:
        self.hosts = hosts
        self.index = index

    def recv(self, timeout: float) -> tuple | None:
        box = self.hosts.inboxes[self.index]
        return box.popleft() if box else None

    def recv_control(self, timeout: float = 0.0) -> tuple | None:
        box = self.hosts.controls[self.index]
        return box.popleft() if box else None

    def send(self, dest: int, msg: tuple) -> None:
        self.hosts.inboxes[dest].append(msg)

    def to_coordinator(self, msg: tuple) -> None:
        self.hosts.outbox.append(msg)


class InlineHosts:
    """Runs the tasks of ``specs`` in this thread; the coordinator drives it with ``poll``."""

    def __init__(self, specs: list[TaskSpec], clock: Clock | None = None,
                 idle_sleep_s: float = 0.01) -> None:
        n = len(specs)
        self.inboxes: list[deque[tuple]] = [deque() for _ in range(n)]
        self.controls: list[deque[tuple]] = [deque() for _ in range(n)]
        self.outbox: list[tuple] = []
        self.idle_sleep_s = idle_sleep_s
        self.rounds = 0
        self.tasks = [StreamTask(spec, _InlineChannels(self, spec.index), clock)
                      for spec in specs]
        self._sources = [t for t in self.tasks if t.spec.source is not None]
        self._inner = [t for t in self.tasks if t.spec.source is None]
        self._live = set(range(n))
        for t in self.tasks:
            self._guard(t, t.open)

    def _guard(self, task: StreamTask, fn: Any, *args: Any) -> Any:
        """Run ``fn`` of ``task``; an exception ends the task and goes to the coordinator."""
        if task.spec.index not in self._live:
            return False
        try:
            did = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - the coordinator decides what happens
            self._live.discard(task.spec.index)
            self.outbox.append(failure_message(task.spec.index, exc, in_process=True))
            return True
        if task.stopped:
            self._live.discard(task.spec.index)
            task.close()
            self.outbox.append(("done", task.spec.index))
        return did

    def send_control(self, index: int, msg: tuple) -> None:
        """Queue a coordinator message for task ``index``."""
        self.controls[index].append(msg)

    def _drain(self) -> None:
        """Run the non-source tasks until every inbox is empty, then tick them once."""
        busy = True
        while busy:
            busy = False
            for t in self._inner:
                while self.inboxes[t.spec.index] or t._ahead is not None:
                    if t.spec.index not in self._live or t._awaiting_commit is not None:
                        break
                    self._guard(t, t.step, 0.0)
                    busy = True
        for t in self._inner:  # processing time moves on where no input came
            if not self.inboxes[t.spec.index]:
                self._guard(t, t.step, 0.0)

    def poll(self, timeout: float) -> list[tuple]:
        """One round; the messages the tasks sent the coordinator meanwhile."""
        if any(self.controls[i] for i in self._live) or \
                any(t._awaiting_commit is not None for t in self.tasks):
            for t in self.tasks:  # barriers and commits first, in a round of their own
                if self.controls[t.spec.index] or t._awaiting_commit is not None:
                    self._guard(t, t.control_step)
            self._drain()
        else:
            # every source reads once, the rows go all the way through, and only then the
            # sources' watermarks move: as a round of the in-process executor always did
            read = False
            for t in self._sources:
                read = bool(self._guard(t, t.poll_source, 0.0)) or read
            self._drain()
            for t in self._sources:
                self._guard(t, t.source_watermark)
            self._drain()
            self.rounds += 1
            if not read and not self.outbox:
                time.sleep(min(timeout, self.idle_sleep_s))
        out, self.outbox = self.outbox, []
        return out

    def dead(self) -> list[tuple[int, str]]:
        """Nothing dies here without the coordinator seeing its error."""
        return []

    def pids(self) -> list[int]:
        return []

    def shutdown(self, crashed: bool = False) -> None:
        """Close every task still open (not after a simulated crash: a killed process
        cleans nothing up)."""
        if crashed:
            return
        for t in self.tasks:
            if t.spec.index in self._live:
                self._live.discard(t.spec.index)
                close_quietly(t, f"task {t.spec.index}")
