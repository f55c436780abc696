"""A task slot: several tasks of a streaming job stepped in turn by one thread.

A slot holds, as Flink's task slots do, one partition of every stage of a job (its share
of the source partitions and of the key groups). Messages between tasks of the same slot
pass by reference through in-process queues (no bytes move); messages to tasks of other
slots go through the host's channels (worker processes: pipes of Arrow IPC; Ray: actor
calls), sent by a writer thread per peer slot and received by a reader thread, so the
slot's own loop never blocks on another slot. Backpressure: a task whose output would
land in a full queue (a local consumer's inbox, or the outbox to a peer slot) is not
stepped until it drains; a full inbox stops the reader of that peer (and so, through its
pipe, the peer's writer and its producing task). Since a job's stages form a DAG whose
last stage never waits on output, this cannot deadlock.

The inline executor is one slot holding every task, with no peers, stepped round by round
in the driver (deterministic). The parallel executor runs one slot per worker process
(or Ray actor), ``parallelism`` of them.

A round: the coordinator's messages (barriers, commits) are handled first; every source
task polls once; the other tasks run until their inboxes are empty; then the sources'
watermarks move and the others run again. With ``deterministic`` set (inline), a round
with coordinator messages handles only those, so a checkpoint completes before the
sources read on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from millstream.core.time import Clock
from millstream.runtime.streaming.spec import TaskSpec, close_quietly, failure_message
from millstream.runtime.streaming.task import StreamTask

_log = logging.getLogger(__name__)

#: How long an idle slot waits for input before it ticks processing time (s).
IDLE_WAIT_S = 0.02


@dataclass
class SlotSpec:
    """The tasks a slot runs and where every task of the job lives."""

    index: int
    tasks: list[TaskSpec]
    #: task index -> slot index, for every task of the job
    route: dict[int, int] = field(default_factory=dict)
    #: inline: rounds as the in-process executor has them, no limits, no threads
    deterministic: bool = False
    #: messages queued for a task, or for a peer slot, before its producers wait
    capacity: int = 8
    #: how long an idle slot waits before it polls its sources again (s)
    idle_wait_s: float = IDLE_WAIT_S


class _TaskChannels:
    """What one task of a slot talks through (see ``spec.Channels``)."""

    __slots__ = ("slot", "index")

    def __init__(self, slot: Slot, index: int) -> None:
        self.slot = slot
        self.index = index

    def recv(self, timeout: float) -> tuple | None:
        box = self.slot.inboxes[self.index]
        if not box:
            return None
        msg = box.popleft()
        if self.slot.readers_waiting:
            self.slot.room.set()
        return msg

    def recv_control(self, timeout: float = 0.0) -> tuple | None:
        box = self.slot.controls[self.index]
        return box.popleft() if box else None

    def send(self, dest: int, msg: tuple) -> None:
        slot = self.slot
        box = slot.inboxes.get(dest)
        if box is not None:
            box.append(msg)
        else:
            slot._peer(slot.spec.route[dest]).put((dest, *msg))

    def to_coordinator(self, msg: tuple) -> None:
        self.slot.up(msg)


class _Outbox:
    """Messages for one peer slot, sent in order by a thread of their own (the peer's inbox
    may be full: then this thread waits, the slot's loop does not)."""

    def __init__(self, channels: Any, peer: int) -> None:
        self.channels = channels
        self.peer = peer
        self.queue: deque[tuple] = deque()
        self.ready = threading.Condition()
        self.error: BaseException | None = None
        self.sending = 0
        self.closed = False
        self.thread = threading.Thread(target=self._loop, daemon=True,
                                       name=f"millstream-slot-out-{peer}")
        self.thread.start()

    def __len__(self) -> int:
        return len(self.queue) + self.sending

    def put(self, msg: tuple) -> None:
        if self.error is not None:
            raise self.error
        with self.ready:
            self.queue.append(msg)
            self.ready.notify()

    def _loop(self) -> None:
        while True:
            with self.ready:
                while not self.queue and not self.closed:
                    self.ready.wait()
                if not self.queue and self.closed:
                    return
                msg = self.queue.popleft()
                self.sending = 1
            try:
                self.channels.send(self.peer, msg)
            except BaseException as exc:  # noqa: BLE001 - the peer is gone: the task learns it
                from millstream.errors import WorkerLostError

                self.error = exc if isinstance(exc, WorkerLostError) else \
                    WorkerLostError(f"sending to task slot {self.peer} failed: {exc}")
                with self.ready:
                    self.queue.clear()
                    self.sending = 0
                return
            finally:
                self.sending = 0

    def flush(self, timeout: float = 60.0) -> None:
        """Wait until every message put so far was sent."""
        deadline = time.monotonic() + timeout
        while len(self) and self.error is None and time.monotonic() < deadline:
            time.sleep(0.002)

    def close(self) -> None:
        with self.ready:
            self.closed = True
            self.ready.notify()


class Slot:
    """Runs ``spec.tasks``; ``channels`` connect it to the other slots and the coordinator
    (None: every task of the job is here, and coordinator messages are collected in
    ``outgoing``)."""

    def __init__(self, spec: SlotSpec, channels: Any = None, clock: Clock | None = None) -> None:
        self.spec = spec
        self.channels = channels
        self.deterministic = spec.deterministic
        self.capacity = spec.capacity if not spec.deterministic else 1 << 62
        self.inboxes: dict[int, deque[tuple]] = {t.index: deque() for t in spec.tasks}
        self.controls: dict[int, deque[tuple]] = {t.index: deque() for t in spec.tasks}
        self.outboxes: dict[int, _Outbox] = {}
        self.outgoing: list[tuple] = []
        self.rounds = 0
        #: set when a reader waits for room in an inbox (the loop then signals ``room``)
        self.readers_waiting = 0
        self.room = threading.Event()
        self.wake = threading.Event()
        self.tasks = {t.index: StreamTask(t, _TaskChannels(self, t.index), clock)
                      for t in spec.tasks}
        self._sources = [t for t in self.tasks.values() if t.spec.source is not None]
        self._inner = [t for t in self.tasks.values() if t.spec.source is None]
        self._live = set(self.tasks)
        # the local tasks each task's output reaches, and the peer slots it reaches
        self._local_out: dict[int, list[int]] = {}
        self._remote_out: dict[int, list[int]] = {}
        for t in self.tasks.values():
            out = t.spec.output.consumers if t.spec.output.kind == "exchange" else []
            self._local_out[t.spec.index] = [c for c in out if c in self.inboxes]
            self._remote_out[t.spec.index] = sorted({spec.route[c] for c in out
                                                     if c not in self.inboxes})
        self._reader: threading.Thread | None = None
        self._stopping = False

    # ------------------------------------------------------------------ plumbing

    def up(self, msg: tuple) -> None:
        """A message for the coordinator."""
        if self.channels is None:
            self.outgoing.append(msg)
        else:
            self.channels.to_coordinator(msg)

    def _peer(self, slot: int) -> _Outbox:
        box = self.outboxes.get(slot)
        if box is None:
            box = self.outboxes[slot] = _Outbox(self.channels, slot)
        return box

    def _read_peers(self) -> None:
        """Reader thread: messages from other slots into the tasks' inboxes (waits while the
        destination's inbox is full, which holds the sending slot back)."""
        ch = self.channels
        while not self._stopping:
            msg = ch.recv(0.05)
            if msg is None:
                continue
            dest, body = msg[0], msg[1:]
            box = self.inboxes[dest]
            while len(box) >= self.capacity and not self._stopping:
                self.readers_waiting += 1
                self.room.clear()
                self.room.wait(0.05)
                self.readers_waiting -= 1
            box.append(body)
            self.wake.set()

    def _guard(self, task: StreamTask, fn: Any, *args: Any) -> Any:
        """Run ``fn`` of ``task``; an exception ends the task and goes to the coordinator."""
        index = task.spec.index
        if index not in self._live:
            return False
        try:
            did = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - the coordinator decides what happens
            self._live.discard(index)
            self.up(failure_message(index, exc, in_process=self.channels is None))
            return True
        if task.stopped:
            self._live.discard(index)
            self._finish_task(task)
        return did

    def _finish_task(self, task: StreamTask) -> None:
        """A task is done: close it and tell the coordinator, after what it sent left."""
        task.close()
        for slot in self._remote_out[task.spec.index]:
            self._peer(slot).flush()
        self.up(("done", task.spec.index))

    def _runnable(self, task: StreamTask) -> bool:
        """Whether ``task`` may run: it is live and its output has room (backpressure)."""
        index = task.spec.index
        if index not in self._live or task._awaiting_commit is not None:
            return False
        cap = self.capacity
        for c in self._local_out[index]:
            if len(self.inboxes[c]) >= cap:
                return False
        for s in self._remote_out[index]:
            box = self.outboxes.get(s)
            if box is not None and len(box) >= cap:
                return False
        return True

    # ------------------------------------------------------------------ the loop

    def open(self) -> None:
        """Open every task (restore state, open readers and sinks)."""
        for t in self.tasks.values():
            self._guard(t, t.open)
        if self.channels is not None and len(self.spec.route) > len(self.tasks):
            self._reader = threading.Thread(target=self._read_peers, daemon=True,
                                            name=f"millstream-slot-in-{self.spec.index}")
            self._reader.start()

    def _drain(self) -> bool:
        """Run the non-source tasks while input waits for them; then tick the others."""
        did = False
        busy = True
        while busy:
            busy = False
            for t in self._inner:
                box = self.inboxes[t.spec.index]
                while (box or t._ahead is not None) and self._runnable(t):
                    self._guard(t, t.step, 0.0)
                    busy = did = True
        for t in self._inner:  # processing time moves on where no input came
            if not self.inboxes[t.spec.index] and self._runnable(t):
                self._guard(t, t.step, 0.0)
        return did

    def _control_round(self) -> bool:
        pending = [t for t in self.tasks.values()
                   if self.controls[t.spec.index] or t._awaiting_commit is not None]
        for t in pending:
            self._guard(t, t.control_step)
        return bool(pending)

    def round(self) -> bool:
        """One round (see the module docstring); True when anything happened."""
        if self.channels is not None:
            self._take_controls()
        controls = self._control_round()
        if controls and self.deterministic:
            self._drain()
            return True
        read = False
        for t in self._sources:
            if self._runnable(t):
                read = bool(self._guard(t, t.poll_source, 0.0)) or read
        did = self._drain()
        for t in self._sources:
            if self._runnable(t):
                self._guard(t, t.source_watermark)
        did = self._drain() or did
        self.rounds += 1
        return controls or read or did

    def _take_controls(self) -> None:
        """The coordinator's messages for this slot's tasks, into their control queues."""
        while True:
            msg = self.channels.recv_control(0.0)
            if msg is None:
                return
            if msg[0] == "shutdown":
                for t in self.tasks.values():
                    self.controls[t.spec.index].append(("shutdown",))
            else:
                self.controls[msg[0]].append(msg[1:])

    @property
    def finished(self) -> bool:
        """Every task of the slot has ended (or failed)."""
        return not self._live

    def run(self) -> None:
        """A host of its own: open, then rounds until every task ended; wait when idle."""
        try:
            self.open()
            while not self.finished:
                if not self.round():
                    self.wake.wait(min(IDLE_WAIT_S, self.spec.idle_wait_s))
                    self.wake.clear()
        finally:
            self.close()

    def close(self, crashed: bool = False) -> None:
        """Stop the reader and writers (after what was queued was sent) and close the tasks
        still open (not after a simulated crash: a killed process cleans nothing up)."""
        if crashed:
            return
        for index in list(self._live):
            self._live.discard(index)
            close_quietly(self.tasks[index], f"task {index}")
        for box in self.outboxes.values():
            box.flush()
            box.close()
        self._stopping = True
        self.room.set()


def run_slot(spec: SlotSpec, channels: Any) -> None:
    """What a slot's host runs (module-level, so it pickles)."""
    Slot(spec, channels, spec.tasks[0].clock if spec.tasks else None).run()
