"""The local runner's streaming hosts: a worker process per task slot, wired by pipes.

Each ordered pair of slots has a pipe of its own: the sending slot's writer thread writes
frames to it (:func:`~millstream.runtime.streaming.wire.write_frame`: a small pickle and
the batches' Arrow IPC bytes, no queue feeder thread, no pickled copy of the bytes), and
the receiving slot's reader thread reads them. A full pipe blocks the writer thread: the
backpressure a bounded inbox gave. Coordinator messages (barriers, commits) and the
slots' messages to the coordinator (acknowledgements, metrics) are few and small: they
go through multiprocessing queues.
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import queue
import select
import signal
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import cloudpickle

from millstream.runners.processes import (
    STREAM_DECAY_MS,
    describe_exit,
    release_memory_promptly,
)
from millstream.runtime.streaming.wire import from_wire, read_frame, to_wire, write_frame


class _PipeChannels:
    """A task slot's channels (see ``millstream.runtime.streaming.spec.Channels``): a pipe
    from and to every peer slot, a control queue, and the coordinator's queue."""

    def __init__(self, index: int, readers: dict[int, Connection],
                 writers: dict[int, Connection], control: mp.Queue,
                 coordinator: mp.Queue) -> None:
        self.index = index
        # the connections stay referenced: they own the file descriptors
        self._readers = readers
        self._writers = writers
        self._out = {peer: c.fileno() for peer, c in writers.items()}
        self._fds = {c.fileno(): peer for peer, c in readers.items()}
        self._poll = select.poll()
        for fd in self._fds:
            self._poll.register(fd, select.POLLIN)
        self._ready: list[int] = []  # descriptors with data, served in turn
        self.control = control
        self.coordinator = coordinator
        #: seconds spent waiting for room in full pipes (backpressure)
        self.blocked_s = 0.0

    def recv(self, timeout: float) -> tuple | None:
        """The next message from any peer slot (the reader thread), or None."""
        if not self._ready:
            if not self._fds:
                time.sleep(timeout)
                return None
            events = self._poll.poll(max(0, int(timeout * 1000)))
            self._ready = [fd for fd, _ in events]
            if not self._ready:
                return None
        fd = self._ready.pop()
        try:
            return read_frame(fd)
        except EOFError:  # the peer's process ended (it is done, or it died)
            self._poll.unregister(fd)
            del self._fds[fd]
            return None

    def recv_control(self, timeout: float = 0.0) -> tuple | None:
        try:
            if timeout <= 0:
                return self.control.get_nowait()
            return self.control.get(timeout=timeout)
        except queue.Empty:
            return None

    def send(self, dest: int, msg: tuple) -> None:
        """``msg`` to peer slot ``dest`` (a writer thread; blocks while its pipe is full)."""
        start = time.perf_counter()
        write_frame(self._out[dest], msg)
        self.blocked_s += time.perf_counter() - start

    def to_coordinator(self, msg: tuple) -> None:
        self.coordinator.put(to_wire(msg))


def _exit_with_driver(driver: int) -> None:
    """End this host when the driver is gone (killed), so no task outlives its job (the
    fork server that started this process does not notice its driver's death)."""
    while True:
        time.sleep(0.5)
        try:
            os.kill(driver, 0)
        except ProcessLookupError:
            os._exit(3)
        except PermissionError:  # pragma: no cover - the pid was reused by another user
            os._exit(3)


def _stream_host_main(payload: bytes, index: int, readers: dict[int, Connection],
                      writers: dict[int, Connection], control: mp.Queue,
                      coordinator: mp.Queue, env: dict[str, str], driver: int) -> None:
    """A streaming host: run the slot's callable with its channels."""
    os.environ.update(env)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints where a task is stuck
    release_memory_promptly(STREAM_DECAY_MS)
    threading.Thread(target=_exit_with_driver, args=(driver,), daemon=True).start()
    fn = cloudpickle.loads(payload)
    run_stream_task_fn(fn, _PipeChannels(index, readers, writers, control, coordinator),
                       index)
    # at exit, the coordinator queue's feeder thread flushes what the slot sent last


def run_stream_task_fn(fn: Any, channels: Any, index: int) -> None:
    """Run a streaming task's callable; with ``MILLSTREAM_PROFILE_DIR`` set (a developer
    aid), under cProfile (CPU time of the slot's thread), into ``task-<index>.prof``."""
    profile_dir = os.environ.get("MILLSTREAM_PROFILE_DIR")
    if not profile_dir:
        fn(channels)
        return
    import cProfile

    prof = cProfile.Profile(time.thread_time)
    try:
        prof.runcall(fn, channels)
    finally:
        prof.dump_stats(os.path.join(profile_dir, f"task-{index}.prof"))


def _widen_pipe(fd: int) -> None:
    """Give a pipe a 1 MiB buffer (Linux; default 64 KiB), so a batch crosses it in one
    or two reads instead of a ping-pong of 64 KiB chunks between the two processes."""
    try:
        import fcntl

        size = 1 << 20
        try:
            with open("/proc/sys/fs/pipe-max-size") as f:
                size = min(size, int(f.read()))
        except OSError:
            pass
        fcntl.fcntl(fd, 1031, size)  # F_SETPIPE_SZ
    except (ImportError, OSError, AttributeError, ValueError):
        pass  # other platforms: the default pipe


class LocalStreamHosts:
    """The processes hosting a streaming job's task slots, and the coordinator's side."""

    def __init__(self, runner: Any, payloads: list[bytes], inbox_capacity: int) -> None:
        ctx = runner._mp
        n = len(payloads)
        readers: list[dict[int, Connection]] = [{} for _ in range(n)]
        writers: list[dict[int, Connection]] = [{} for _ in range(n)]
        for src in range(n):
            for dest in range(n):
                if src != dest:
                    r, w = ctx.Pipe(duplex=False)
                    _widen_pipe(r.fileno())
                    readers[dest][src], writers[src][dest] = r, w
        self.controls = [ctx.Queue() for _ in range(n)]
        self.coordinator = ctx.Queue()
        self.procs = []
        env = dict(os.environ)
        try:
            for i, payload in enumerate(payloads):
                proc = ctx.Process(target=_stream_host_main, daemon=True,
                                   name=f"millstream-stream-{i}",
                                   args=(payload, i, readers[i], writers[i], self.controls[i],
                                         self.coordinator, env, os.getpid()))
                runner._start(proc)
                self.procs.append(proc)
        finally:
            # the hosts have their ends now: a host's death closes its pipes (its peers
            # see end-of-file or a broken pipe)
            for conns in (*readers, *writers):
                for c in conns.values():
                    c.close()
        self._reported: set[int] = set()

    def pids(self) -> list[int]:
        """PIDs of the live host processes."""
        return [p.pid for p in self.procs if p.is_alive()]

    def send_control(self, index: int, msg: tuple) -> None:
        """Put a coordinator message into slot ``index``'s control queue."""
        self.controls[index].put(msg)

    def poll(self, timeout: float) -> list[tuple]:
        """Messages from the hosts (waits up to ``timeout`` for the first)."""
        out = []
        try:
            out.append(from_wire(self.coordinator.get(timeout=timeout)))
            while True:
                out.append(from_wire(self.coordinator.get_nowait()))
        except queue.Empty:
            pass
        return out

    def dead(self) -> list[tuple[int, str]]:
        """Hosts that exited without being told to: (slot index, why)."""
        out = []
        for i, p in enumerate(self.procs):
            if p.exitcode is not None and p.exitcode != 0 and i not in self._reported:
                out.append((i, describe_exit(p.exitcode)))
        return out

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop every host (they have ended, or the job is restarting)."""
        deadline = time.monotonic() + 0.5
        for p in self.procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.exitcode is None:
                p.kill()
        for p in self.procs:
            p.join(timeout=timeout)
        for q in [*self.controls, self.coordinator]:
            q.cancel_join_thread()
            q.close()
