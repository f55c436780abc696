"""Streaming task hosts on Ray: an actor per task with a bounded inbox, outboxes that batch
messages to a peer (one call in flight), and the coordinator's mailbox."""

from __future__ import annotations

import threading
import time
from typing import Any

from millstream.errors import WorkerLostError
from millstream.runners.ray.connect import _first_line, _forwarded_env, _set_env
from millstream.runners.ray.objects import _node_id
from millstream.runtime.streaming.wire import from_wire, to_wire, wire_bytes


# ------------------------------------------------------------------ streaming task hosts
class _Mailbox:
    """The coordinator's inbox (an actor): tasks append, the driver drains. One thread, so
    the messages of each task keep their order."""

    def __init__(self) -> None:
        self.items: list[tuple] = []

    def push_many(self, msgs: list[tuple]) -> None:
        """Several messages of one task, in order (what an :class:`_Outbox` sends)."""
        self.items.extend(msgs)

    def drain(self) -> list[tuple]:
        out, self.items = self.items, []
        return out


class _StreamHost:
    """An actor hosting one streaming task: its loop runs in ``run``; peers ``push`` into
    its bounded inbox from other threads (a full inbox blocks the pushing peer)."""

    def __init__(self, capacity: int, env: dict[str, str | None]) -> None:
        import queue

        from millstream.runners.processes import STREAM_DECAY_MS, release_memory_promptly

        _set_env(env)
        release_memory_promptly(STREAM_DECAY_MS)
        self.inbox: Any = queue.Queue(maxsize=capacity)
        self.controls: Any = queue.Queue()
        self.peers: list[Any] = []
        self.mailbox: Any = None

    def wire(self, peers: list[Any], mailbox: Any) -> str:
        self.peers = peers
        self.mailbox = mailbox
        return _node_id()

    def push(self, msg: tuple) -> None:
        self.inbox.put(msg)

    def push_many(self, msgs: list[tuple]) -> None:
        """Several messages of one peer, in order (blocks while the inbox is full)."""
        for msg in msgs:
            self.inbox.put(msg)

    def control(self, msg: tuple) -> None:
        self.controls.put(msg)

    def run(self, payload: bytes, index: int) -> None:
        import cloudpickle

        from millstream.runners.local_stream import run_stream_task_fn

        channels = _ActorChannels(self)
        run_stream_task_fn(cloudpickle.loads(payload), channels, index)
        channels.flush()  # what the task sent last (its end of input) reaches the peers


class _Outbox:
    """The messages a task sends one peer, pushed in order by one thread with one call in
    flight: messages that queue up meanwhile travel together in the next call, so a task
    does not wait a round trip per batch. Bounded: a full outbox blocks the task (the
    backpressure of the peer's full inbox reaches it)."""

    #: most messages, and bytes of batch data, in one push
    max_messages = 64
    max_bytes = 8 << 20

    def __init__(self, ray: Any, peer: Any, capacity: int) -> None:
        import queue

        self._ray = ray
        self.peer = peer
        self.queue: Any = queue.Queue(maxsize=max(1, capacity))
        self.error: BaseException | None = None
        threading.Thread(target=self._loop, daemon=True, name="millstream-outbox").start()

    def put(self, msg: tuple) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(msg)

    def flush(self) -> None:
        """Wait until every message put so far was delivered into the peer's inbox."""
        self.queue.join()
        if self.error is not None:
            raise self.error

    @staticmethod
    def _size(msg: tuple) -> int:
        """Bytes of batch data in a message (Arrow IPC buffers)."""
        return wire_bytes(msg)

    def _loop(self) -> None:
        import queue

        while True:
            batch = [self.queue.get()]
            size = self._size(batch[0])
            while len(batch) < self.max_messages and size < self.max_bytes:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
                size += self._size(batch[-1])
            try:
                if self.error is None:
                    self._ray.get(self.peer.push_many.remote(batch))
            except BaseException as exc:  # noqa: BLE001 - the peer died: the task learns it
                # (as a lost host: the coordinator restarts the job, it does not fail it)
                self.error = WorkerLostError(f"a streaming task's peer was lost: "
                                             f"{_first_line(exc)}")
            finally:
                for _ in batch:
                    self.queue.task_done()


class _ActorChannels:
    """A streaming task's channels inside a :class:`_StreamHost` actor."""

    #: messages queued per peer before ``send`` blocks
    outbox_capacity = 8
    #: messages queued for the coordinator's mailbox (not bounded by an inbox over there)
    mailbox_capacity = 64

    def __init__(self, host: _StreamHost) -> None:
        import ray

        self._ray = ray
        self.host = host
        self._outboxes: dict[int, _Outbox] = {}
        # one outbox for the coordinator too: its messages keep their order (rows of an
        # epoch before the acknowledgement), and a call carries what queued up meanwhile
        # (a call costs ~1.6 ms for a 400 KB batch; ten in one call, 0.13 ms each)
        self._mailbox = _Outbox(ray, host.mailbox, self.mailbox_capacity)
        #: seconds spent waiting for room in full outboxes (backpressure)
        self.blocked_s = 0.0

    def flush(self) -> None:
        """Wait until every message sent so far is in its peer's inbox (or the mailbox)."""
        for box in [*self._outboxes.values(), self._mailbox]:
            box.flush()

    def recv(self, timeout: float) -> tuple | None:
        import queue

        try:
            return from_wire(self.host.inbox.get(timeout=timeout))
        except queue.Empty:
            return None

    def recv_control(self, timeout: float = 0.0) -> tuple | None:
        import queue

        try:
            if timeout <= 0:
                return self.host.controls.get_nowait()
            return self.host.controls.get(timeout=timeout)
        except queue.Empty:
            return None

    def send(self, dest: int, msg: tuple) -> None:
        """Queue ``msg`` for peer ``dest`` (in order; blocks while its outbox is full)."""
        box = self._outboxes.get(dest)
        if box is None:
            box = self._outboxes[dest] = _Outbox(self._ray, self.host.peers[dest],
                                                 self.outbox_capacity)
        data = to_wire(msg)
        start = time.perf_counter()
        box.put(data)  # blocks while the outbox is full (the peer's inbox is)
        self.blocked_s += time.perf_counter() - start

    def to_coordinator(self, msg: tuple) -> None:
        self._mailbox.put(to_wire(msg))


def _on_node(node: str) -> Any:
    """Place a host on ``node``, elsewhere only when that node is gone. Not the batch
    tasks' ``_near``, which also goes elsewhere when the node is busy: a host lives as long
    as the job, so a busy moment must not put a job on one node. (Ray honours this only
    for an actor that asks for some resource: see ``_HOST_RESOURCES``.)"""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node, soft=True)


#: What a host asks of its node. No CPU: a job's tasks are long-lived and mostly wait on
#: each other, and a job must not be unschedulable because it has more tasks than the
#: cluster has CPUs. One byte of Ray's logical ``memory`` resource (bookkeeping only,
#: nothing is reserved): Ray's raylet places an actor that asks for nothing at all on a
#: random node and ignores a soft node affinity (and SPREAD) for it, so a job's hosts
#: landed on one node now and then (1 job in 9 with three tasks on three nodes).
_HOST_RESOURCES: dict[str, Any] = {"num_cpus": 0, "memory": 1}

_HOST_START_TIMEOUT_S = 120.0  # actors need no CPU; this only waits for worker processes


class RayStreamHosts:
    """The actors hosting a streaming job's tasks (spread over nodes), and their mailbox."""

    def __init__(self, ray: Any, payloads: list[bytes], inbox_capacity: int) -> None:
        self._ray = ray
        n = len(payloads)
        # Tasks go round the live nodes (_HOST_RESOURCES: why a host asks for a byte of
        # memory); a node gone meanwhile is passed over.
        host_cls = ray.remote(**_HOST_RESOURCES, max_restarts=0,
                              max_concurrency=n + 4)(_StreamHost)
        nodes = sorted(node["NodeID"] for node in ray.nodes() if node.get("Alive"))
        self.mailbox = ray.remote(num_cpus=0, max_restarts=0)(_Mailbox).remote()
        env = _forwarded_env()
        self.runs: list[Any] = []  # (set before anything can fail: shutdown reads them)
        self._finished: set[int] = set()
        self._dead: dict[int, str] = {}
        self._controls: list[Any] = []  # control calls in flight
        self.actors = [host_cls.options(scheduling_strategy=_on_node(nodes[i % len(nodes)]))
                       .remote(inbox_capacity, env) if nodes else
                       host_cls.remote(inbox_capacity, env) for i in range(n)]
        try:
            self.nodes = ray.get([a.wire.remote(self.actors, self.mailbox)
                                  for a in self.actors], timeout=_HOST_START_TIMEOUT_S)
        except ray.exceptions.RayError as exc:
            # an actor placed on a node that is going away (a removed node takes a while
            # to be noticed): the coordinator restarts, as for a host lost while running
            self.shutdown()
            raise WorkerLostError(f"a streaming task's Ray actor died while starting: "
                                  f"{_first_line(exc)}") from None
        self.runs = [a.run.remote(p, i) for i, (a, p) in enumerate(zip(self.actors, payloads))]

    def send_control(self, index: int, msg: tuple) -> None:
        """Put a coordinator message into task ``index``'s control queue."""
        self._controls.append(self.actors[index].control.remote(msg))
        if len(self._controls) > 256:  # keep the list short: settle the delivered ones
            done, self._controls = self._ray.wait(self._controls, num_returns=len(
                self._controls), timeout=0)
            self._settle(done)

    def poll(self, timeout: float) -> list[tuple]:
        """Messages from the tasks (sleeps ``timeout`` when there are none)."""
        try:
            out = self._ray.get(self.mailbox.drain.remote())
        except Exception as exc:  # noqa: BLE001 - the mailbox's node died
            self._dead.setdefault(-1, f"the coordinator mailbox was lost: {_first_line(exc)}")
            return []
        if not out:
            time.sleep(timeout)
        return [from_wire(m) for m in out]

    def dead(self) -> list[tuple[int, str]]:
        """Tasks whose actor died (its node was lost, its process killed)."""
        pending = [r for i, r in enumerate(self.runs)
                   if i not in self._finished and i not in self._dead]
        if pending:
            ready, _ = self._ray.wait(pending, num_returns=len(pending), timeout=0)
            index = {r: i for i, r in enumerate(self.runs)}
            for ref in ready:
                i = index[ref]
                try:
                    self._ray.get(ref)
                    self._finished.add(i)
                except Exception as exc:  # noqa: BLE001 - RayActorError and friends
                    self._dead[i] = f"its Ray actor died: {_first_line(exc)}"
        out = sorted(self._dead.items())
        return [(max(i, 0), why) for i, why in out]

    def _settle(self, refs: list[Any]) -> None:
        """Take the outcome of finished calls, so Ray does not report the errors of calls to
        actors that died (and were recovered from) as unhandled."""
        for ref in refs:
            try:
                self._ray.get(ref, timeout=0)
            except Exception:  # noqa: BLE001 - the job already dealt with a dead actor
                pass

    def shutdown(self) -> None:
        """Kill every actor of the job (finished ones are gone already), then settle the
        outcome of every call made to them."""
        for a in [*self.actors, self.mailbox]:
            try:
                self._ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        refs = [*self.runs, *self._controls]
        self._controls = []
        try:
            done, _ = self._ray.wait(refs, num_returns=len(refs), timeout=10)
        except Exception:  # noqa: BLE001
            return
        self._settle(done)
