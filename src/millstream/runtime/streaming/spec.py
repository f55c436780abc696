"""What a streaming task is given and how it talks: its spec (operators, senders, output,
source, restored state), the channels a host provides, where its rows go (an exchange by
key group or partitioner, a sink, the driver), and small helpers shared by hosts."""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from millstream.core.hashing import split_by_partition
from millstream.core.keygroups import key_hashes
from millstream.core.time import MIN_WATERMARK, Clock
from millstream.ops.base import OperatorFactory

_log = logging.getLogger(__name__)

#: Watermarks go downstream at most this often (Flink's autoWatermarkInterval; 200 ms there).
WATERMARK_EVERY_S = 0.02


class Channels(Protocol):
    """What a host gives its task to talk to peers and to the coordinator."""

    def recv(self, timeout: float) -> tuple | None:
        """The next inbox message, or None after ``timeout`` seconds."""

    def recv_control(self, timeout: float = 0.0) -> tuple | None:
        """The next control message, or None (``timeout`` 0: do not wait)."""

    def send(self, dest: int, msg: tuple) -> None:
        """Deliver ``msg`` to task ``dest``'s inbox; blocks while that inbox is full."""

    def to_coordinator(self, msg: tuple) -> None:
        """Send ``msg`` to the coordinator (never blocks for long)."""


@dataclass
class Output:
    """Where a task's results go: a keyed/hash/round-robin exchange, a sink, or the driver."""

    kind: str  # "exchange" | "sink" | "driver"
    consumers: list[int] = field(default_factory=list)  # task indexes, by partition
    port: int = 0  # the consumers' input port fed by this stage
    partitioner: Any = None
    keys: list[str] | None = None  # keyed exchange: key columns
    owners: Any = None  # keyed exchange: key group -> consumer partition (np.ndarray)
    key_groups: int = 0
    sink: Any = None  # kind "sink": this task's sink instance (for_subtask copy)
    #: every row to every consumer (a broadcast exchange), not split among them
    broadcast: bool = False
    #: further exchanges fed the same rows (a shared sub-plan read by several consumers)
    more: list[Output] = field(default_factory=list)

    def routes(self) -> list[Output]:
        """This exchange and the further ones."""
        return [self, *self.more]

    def route(self, batch: pa.RecordBatch) -> list[tuple[int, pa.RecordBatch]]:
        """(consumer task, rows) pairs of one batch: by key group, by the partitioner, all
        to the one consumer, or (broadcast) the whole batch to each."""
        if len(self.consumers) == 1:
            return [(self.consumers[0], batch)]
        if self.broadcast:
            return [(c, batch) for c in self.consumers]
        if self.owners is not None:
            groups = key_hashes([batch.column(k) for k in self.keys], batch.num_rows) \
                % np.uint64(self.key_groups)
            ids = self.owners[groups.astype(np.int64)]
        else:
            ids = self.partitioner.assign(batch)
        return [(self.consumers[i], part) for i, part in
                split_by_partition(batch, np.asarray(ids, dtype=np.int64), len(self.consumers))]


@dataclass
class TaskSpec:
    """Everything a host needs to run one stage partition of a streaming job."""

    index: int  # global task index (channel address)
    key: tuple[int, int, int]  # (stage position, pipeline, partition), as checkpoints name it
    job_id: str
    stage_id: int
    stage_name: str
    ops: list[OperatorFactory]
    senders: list[int]  # upstream task indexes (empty for a source task)
    output: Output
    sender_ports: dict[int, int] = field(default_factory=dict)  # sender -> input port
    key_grouped: bool = False
    key_groups: int = 128
    #: source tasks: (StreamSource, partition id, position)
    source: tuple[Any, Any, Any] | None = None
    #: operator index -> ("plain", snapshot) | ("keyed", [key group states])
    restore: dict[int, tuple[str, Any]] = field(default_factory=dict)
    watermark: int = MIN_WATERMARK  # the job watermark of the restored checkpoint
    epoch: int = 1
    max_batch_records: int = 10_000
    poll_timeout_s: float = 0.05
    #: the checkpoint location (URI, storage options): the task writes its state blobs there
    checkpoint: tuple[str, dict[str, Any]] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    #: how often watermarks go downstream (s); 0: whenever they move (deterministic)
    watermark_interval_s: float = WATERMARK_EVERY_S
    #: processing time (None: the machine's clock)
    clock: Clock | None = None
    #: window combiners start (combine rows before the exchange); off, they pass rows on
    #: (in-process exchanges are cheap: a group-by per batch would only cost)
    combine: bool = True


def close_quietly(thing: Any, what: str) -> None:
    """Call ``thing.close()`` if it has one; a failure is logged, never raised (closing
    must not hide how a job or task ended)."""
    close = getattr(thing, "close", None)
    if callable(close):
        try:
            close()
        except Exception:  # noqa: BLE001
            _log.warning("closing %s failed", what, exc_info=True)


def counter_names(counters: dict[tuple[str, str], int]) -> dict[str, int]:
    """Task counters as ``{"group.name": value}`` (e.g. ``millstream.state_spills``)."""
    return {f"{group}.{name}": value for (group, name), value in counters.items()}


def state_bytes(value: Any) -> int:
    """Approximate size of a snapshot: its Arrow data and byte strings (the bulk of state)."""
    if isinstance(value, (pa.Table, pa.RecordBatch)):
        return int(value.nbytes)
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, dict):
        return sum(state_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(state_bytes(v) for v in value)
    return 0


def failure_message(index: int, exc: BaseException, in_process: bool = False) -> tuple:
    """The coordinator message of a task that raised ``exc``: its text, traceback, the
    exception itself when it stays in this process or survives pickling (the driver
    re-raises it), else None, and a user function's own traceback (or None)."""
    from millstream.errors import UserCodeFailure

    user_tb = None
    if isinstance(exc, UserCodeFailure):
        from millstream.runtime.task import describe_failure

        user_tb = describe_failure(exc).user_traceback
    return ("error", index, f"{type(exc).__name__}: {exc}", traceback.format_exc(),
            exc if in_process else _picklable(exc), user_tb)


def _picklable(exc: BaseException) -> BaseException | None:
    """``exc`` if it survives pickling (to re-raise it in the driver), else None."""
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return None
