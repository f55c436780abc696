"""Shuffle: partitioners, the map-side writer and the reduce-side reader.

Each map task writes ONE file: for every reduce partition, in order, an Arrow IPC
stream (LZ4 or ZSTD compressed buffers) holding that partition's rows, followed by an
index footer. The task returns the index ((offset, length) per partition) as its map
output; reducer ``p`` memory-maps every map output and reads only its slice, in map
order, so results do not depend on timing. Buffers spill to per-partition runs when
the task's memory budget is exceeded.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from millstream.core.arrow import batch_nbytes, cast_batch, unify_schemas
from millstream.core.context import TaskContext
from millstream.core.hashing import partition_ids, split_by_partition
from millstream.core.spill import SpillFile, ipc_options
from millstream.errors import FetchFailedError

_MAGIC = b"MSSHUF01"


class Partitioner:
    """Decides the reduce partition of every row."""

    num_partitions: int = 1

    def assign(self, batch: pa.RecordBatch) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__


@dataclass
class HashPartitioner(Partitioner):
    """Rows with equal key values go to the same partition (all columns when keys is empty)."""

    keys: list[str]
    num_partitions: int

    def assign(self, batch: pa.RecordBatch) -> np.ndarray:
        from millstream.errors import SchemaError

        if self.keys:
            missing = [k for k in self.keys if k not in batch.schema.names]
            if missing:
                raise SchemaError(f"shuffle by {self.keys}: no column {missing[0]!r}; columns are "
                                  f"{batch.schema.names}")
            cols = [batch.column(k) for k in self.keys]
        else:
            cols = list(batch.columns)
        return partition_ids(cols, batch.num_rows, self.num_partitions)

    def describe(self) -> str:
        return f"hash({', '.join(self.keys) or '*'}) into {self.num_partitions}"


@dataclass
class RoundRobinPartitioner(Partitioner):
    """Spreads rows evenly, starting at a different partition in every task."""

    num_partitions: int
    _next: int = 0

    def assign(self, batch: pa.RecordBatch) -> np.ndarray:
        n = batch.num_rows
        ids = (np.arange(n, dtype=np.int64) + self._next) % self.num_partitions
        self._next = (self._next + n) % self.num_partitions
        return ids

    def describe(self) -> str:
        return f"round-robin into {self.num_partitions}"


@dataclass
class RangePartitioner(Partitioner):
    """Sort-key ranges; boundaries are filled in by the scheduler from a key sample."""

    by: list[str]
    descending: list[bool]
    nulls_last: bool | None
    num_partitions: int
    boundaries: pa.Table | None = None

    def assign(self, batch: pa.RecordBatch) -> np.ndarray:
        from millstream.core.sorting import range_partition_ids

        if self.boundaries is None:
            raise RuntimeError("range partitioner used before its boundaries were sampled")
        return range_partition_ids(batch, self.boundaries, self.by, self.descending, self.nulls_last)

    def describe(self) -> str:
        return f"range({', '.join(self.by)}) into {self.num_partitions} (sampled)"


@dataclass
class MapOutput:
    """Where one map task's shuffle output lives and the (offset, length) of each partition."""

    path: str
    offsets: list[tuple[int, int]]
    rows: list[int]
    stage_id: int = 0
    map_index: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(length for _, length in self.offsets)


class ShuffleWriter:
    """Partitions a task's output and writes it as one indexed file."""

    def __init__(self, ctx: TaskContext, partitioner: Partitioner, path: str) -> None:
        self.ctx = ctx
        self.partitioner = partitioner
        self.path = path
        n = partitioner.num_partitions
        self.buffers: list[list[pa.RecordBatch]] = [[] for _ in range(n)]
        self.spills: list[SpillFile | None] = [None] * n
        self.buffered = 0
        self.schema: pa.Schema | None = None
        self.rows = [0] * n

    def write(self, batch: pa.RecordBatch) -> None:
        if self.schema is None or not batch.schema.equals(self.schema):
            self.schema = batch.schema if self.schema is None else unify_schemas([self.schema, batch.schema])
        if batch.num_rows == 0:
            return
        pids = self.partitioner.assign(batch)
        for p, part in split_by_partition(batch, pids, self.partitioner.num_partitions):
            self.buffers[p].append(part)
            self.rows[p] += part.num_rows
        self.buffered += batch_nbytes(batch)
        if self.buffered > max(4 << 20, self.ctx.memory_budget // 2):
            self._spill()

    def _spill(self) -> None:
        for p, bufs in enumerate(self.buffers):
            if not bufs:
                continue
            if self.spills[p] is None:
                self.spills[p] = SpillFile(self.ctx, f"shufspill{p}")
            for b in bufs:
                self.spills[p].write(b)
            self.buffers[p] = []
        self.buffered = 0
        self.ctx.increment_counter("millstream", "spills")

    def write_all(self, batches: Iterable[pa.RecordBatch]) -> MapOutput:
        for b in batches:
            self.write(b)
        return self.close()

    def close(self) -> MapOutput:
        schema = self.schema or pa.schema([])
        opts = ipc_options(self.ctx.shuffle_compression)
        offsets: list[tuple[int, int]] = []
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as raw:
            sink = pa.PythonFile(raw, mode="w")
            for p in range(self.partitioner.num_partitions):
                start = raw.tell()
                w = pa.ipc.new_stream(sink, schema, options=opts)
                spill = self.spills[p]
                if spill is not None:
                    for b in spill.read():
                        w.write_batch(cast_batch(b, schema))
                    spill.delete()
                for b in self.buffers[p]:
                    w.write_batch(cast_batch(b, schema))
                w.close()
                sink.flush()
                offsets.append((start, raw.tell() - start))
                self.buffers[p] = []
            footer = json.dumps({"offsets": offsets, "rows": self.rows}).encode()
            raw.write(footer)
            raw.write(struct.pack("<Q", len(footer)))
            raw.write(_MAGIC)
        os.replace(tmp, self.path)
        return MapOutput(self.path, offsets, list(self.rows), self.ctx.stage_id, self.ctx.partition)


def _stream_batches(source: Any) -> Iterator[pa.RecordBatch]:
    """The batches of an IPC stream; a stream without rows yields one empty batch carrying the
    schema, so joins and aggregates still know the columns of an empty side."""
    reader = pa.ipc.open_stream(source)
    got = False
    for b in reader:
        got = True
        yield b
    if not got and reader.schema.names:
        yield pa.RecordBatch.from_pylist([], schema=reader.schema)


def read_map_output_slice(out: MapOutput, partition: int) -> Iterator[pa.RecordBatch]:
    """The batches of one reduce partition in one map output (memory-mapped, zero-copy)."""
    offset, length = out.offsets[partition]
    try:
        mm = pa.memory_map(out.path, "r")
    except (FileNotFoundError, OSError) as exc:
        raise FetchFailedError(f"shuffle output of stage {out.stage_id} map task {out.map_index} "
                               f"is gone ({out.path}): {exc}", stage_id=out.stage_id,
                               map_index=out.map_index) from exc
    with mm:
        mm.seek(offset)
        buf = mm.read_buffer(length)
    yield from _stream_batches(buf)


def read_shuffle_partition(outputs: list[MapOutput], partition: int) -> Iterator[pa.RecordBatch]:
    """All batches of one reduce partition, map output by map output (deterministic order)."""
    schema_sent = False
    for out in outputs:
        reader = getattr(out, "read_slice", None)
        batches = reader(partition) if reader is not None else read_map_output_slice(out, partition)
        for b in batches:
            if b.num_rows == 0:
                if schema_sent:
                    continue
            schema_sent = True
            yield b


@dataclass
class BlockRef:
    """A materialized partition (collect results, cache, broadcast): one IPC stream file."""

    path: str
    rows: int
    nbytes: int
    schema_names: list[str] = field(default_factory=list)


class BlockWriter:
    """Writes a task's output as one Arrow IPC stream file, unifying schema drift."""

    def __init__(self, ctx: TaskContext, path: str, compression: str | None = None) -> None:
        self.ctx = ctx
        self.path = path
        self.compression = compression

    def write_all(self, batches: Iterable[pa.RecordBatch]) -> BlockRef:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        spill = SpillFile(self.ctx, path=self.path + ".tmp", compression=self.compression)
        seen: pa.Schema | None = None  # an empty batch still names the columns
        for b in batches:
            seen = seen or b.schema
            spill.write(b)
        spill.close()
        schema = spill.schema or seen or pa.schema([])
        if spill.schema is None:
            # no rows: write a schema-only stream
            with pa.OSFile(spill.path, "wb") as f:
                pa.ipc.new_stream(f, schema).close()
        os.replace(spill.path, self.path)
        names = list(schema.names)
        return BlockRef(self.path, spill.rows, os.path.getsize(self.path), names)


def read_block(ref: BlockRef) -> Iterator[pa.RecordBatch]:
    """Stream a block's batches (memory-mapped); an empty block yields its schema."""
    reader = getattr(ref, "read", None)
    if reader is not None:  # a runner's own handle (e.g. an object in a cluster's store)
        yield from reader()
        return
    try:
        mm = pa.memory_map(ref.path, "r")
    except (FileNotFoundError, OSError) as exc:
        raise FetchFailedError(f"materialized block {ref.path} is gone: {exc}") from exc
    yield from _stream_batches(mm)
