"""Task outputs in the Ray object store: shuffle map outputs and materialized blocks held
by reference, and how a reader notices that an object was lost with its node."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from millstream.core.shuffle import (
    BlockRef,
    BlockWriter,
    MapOutput,
    Partitioner,
    ShuffleWriter,
    _stream_batches,
)
from millstream.errors import FetchFailedError
from millstream.runners.ray.connect import _INLINE_LIMIT, import_ray

# ------------------------------------------------------------------ object handles
_LOST_OBJECTS: set[str] = set()
_dead: dict[str, Any] = {"at": 0.0, "nodes": frozenset()}
_dead_lock = threading.Lock()


def _dead_nodes() -> frozenset[str]:
    """IDs of the cluster's dead nodes (asked at most once a second)."""
    with _dead_lock:
        now = time.monotonic()
        if now - _dead["at"] > 1.0:
            ray = import_ray()
            try:
                _dead["nodes"] = frozenset(n["NodeID"] for n in ray.nodes() if not n.get("Alive"))
            except Exception:  # noqa: BLE001 - no answer: assume nothing died
                _dead["nodes"] = frozenset()
            _dead["at"] = now
        return _dead["nodes"]


def _object_lost(ref: Any, node_id: str, size: int) -> bool:
    """Whether an object is gone: released, reported lost by a reader, or on a dead node.

    Objects are produced with ``max_retries=0``, so Ray does not rebuild them by lineage
    (that would re-run attempts behind our back); the scheduler recomputes them instead.
    Small objects live with their owner (the driver), not on the producing node.
    """
    if ref is None:
        return True
    if not import_ray().is_initialized():  # the Ray session that held it is gone
        return True
    if ref.hex() in _LOST_OBJECTS:
        return True
    return size >= _INLINE_LIMIT and bool(node_id) and node_id in _dead_nodes()


def _fetch(ref: Any, what: str, stage_id: int | None = None, map_index: int | None = None) -> Any:
    """``ray.get`` of an output object; a lost object becomes FetchFailedError."""
    ray = import_ray()
    if ref is None:
        raise FetchFailedError(f"{what} was released", stage_id=stage_id, map_index=map_index)
    if not ray.is_initialized():
        # never connect a process to Ray just to read an object: a process outside the Ray
        # session that made it (a local worker) cannot have it, so it is lost for us
        raise FetchFailedError(f"{what} lives in a Ray object store this process is not "
                               f"connected to", stage_id=stage_id, map_index=map_index)
    try:
        return ray.get(ref)
    except (ray.exceptions.ObjectLostError, ray.exceptions.ReferenceCountingAssertionError,
            ray.exceptions.ObjectFetchTimedOutError) as exc:
        _LOST_OBJECTS.add(ref.hex())
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        err = FetchFailedError(f"{what} is gone (Ray object {ref.hex()}): {type(exc).__name__}: "
                               f"{first}", stage_id=stage_id, map_index=map_index)
        err.lost_objects = [ref.hex()]  # type: ignore[attr-defined]
        raise err from exc


@dataclass
class RayMapOutput(MapOutput):
    """A shuffle map output kept in the Ray object store (the indexed shuffle file's bytes)."""

    node_id: str = ""
    size: int = 0
    ref: Any = field(default=None, repr=False, compare=False)
    _payload: Any = field(default=None, repr=False, compare=False)

    def read_slice(self, partition: int) -> Iterator[pa.RecordBatch]:
        """The batches of reduce partition ``partition`` (zero-copy from the object store)."""
        data = _fetch(self.ref, f"shuffle output of stage {self.stage_id} map task {self.map_index}",
                      self.stage_id, self.map_index)
        offset, length = self.offsets[partition]
        yield from _stream_batches(data.slice(offset, length))

    def is_lost(self) -> bool:
        """Whether the object is gone (see ``_object_lost``)."""
        return _object_lost(self.ref, self.node_id, self.size)


@dataclass
class RayBlockRef(BlockRef):
    """A materialized partition kept in the Ray object store (an Arrow IPC stream)."""

    node_id: str = ""
    cached: bool = False
    ref: Any = field(default=None, repr=False, compare=False)
    _payload: Any = field(default=None, repr=False, compare=False)

    def read(self) -> Iterator[pa.RecordBatch]:
        """Stream the block's batches (zero-copy from the object store)."""
        data = _fetch(self.ref, "cached partition" if self.cached else "materialized block")
        yield from _stream_batches(data)

    def is_lost(self) -> bool:
        """Whether the object is gone (see ``_object_lost``)."""
        return _object_lost(self.ref, self.node_id, self.nbytes)


def _take_file(path: str) -> pa.Buffer:
    """The bytes of a file as a memory-mapped buffer; the file is unlinked at once.

    Ray copies the buffer into the object store when the task returns; the worker's heap
    never holds the whole output.
    """
    size = os.path.getsize(path)
    if size == 0:
        os.unlink(path)
        return pa.py_buffer(b"")
    with pa.memory_map(path, "r") as mm:
        buf = mm.read_buffer(size)
    os.unlink(path)
    return buf


def _node_id() -> str:
    """The ID of the Ray node this process runs on ('' outside Ray)."""
    try:
        return import_ray().get_runtime_context().get_node_id() or ""
    except Exception:  # noqa: BLE001 - outside a Ray worker
        return ""


@dataclass
class RayShuffleOutput:
    """Output spec of a shuffle map task: the indexed shuffle file, kept as a Ray object."""

    partitioner: Partitioner

    def write(self, batches: Iterator[pa.RecordBatch], ctx: Any) -> RayMapOutput:
        """Partition the task's output; return the handle, with the bytes as its payload."""
        path = ctx.scratch_path("shuffle", ".arrow")
        out = ShuffleWriter(ctx, self.partitioner, path).write_all(batches)
        data = _take_file(path)
        return RayMapOutput("", out.offsets, out.rows, out.stage_id, out.map_index,
                            node_id=_node_id(), size=data.size, _payload=data)


@dataclass
class RayBlockOutput:
    """Output spec of a materializing task (collect, cache, broadcast): an IPC stream object."""

    cached: bool = False
    compression: str | None = None

    def write(self, batches: Iterator[pa.RecordBatch], ctx: Any) -> RayBlockRef:
        """Write the task's output as one block; return the handle, with the bytes as payload."""
        path = ctx.scratch_path("block", ".arrow")
        ref = BlockWriter(ctx, path, self.compression).write_all(batches)
        data = _take_file(path)
        return RayBlockRef("", ref.rows, ref.nbytes, ref.schema_names, node_id=_node_id(),
                           cached=self.cached, _payload=data)


def _near(node: str) -> Any:
    """Run on ``node`` when it has a free CPU, elsewhere at once when it is busy or gone
    (locality without waiting, as Ray itself does for a task's direct arguments)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    try:
        return NodeAffinitySchedulingStrategy(node, soft=True, _spill_on_unavailable=True)
    except TypeError:  # an older Ray: prefer the node, wait for it when busy
        return NodeAffinitySchedulingStrategy(node, soft=True)
