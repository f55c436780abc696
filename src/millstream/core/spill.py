"""Spilling record batches to local disk as compressed Arrow IPC, and reading them back."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pyarrow as pa

from millstream.core.arrow import cast_batch, unify_schemas
from millstream.core.context import TaskContext
from millstream.core.hashing import partition_ids, split_by_partition


def ipc_options(compression: str | None) -> pa.ipc.IpcWriteOptions:
    """IPC write options with the given buffer compression ("lz4", "zstd" or None)."""
    if compression in (None, "none", "uncompressed"):
        return pa.ipc.IpcWriteOptions()
    return pa.ipc.IpcWriteOptions(compression=compression)


class SpillFile:
    """An append-only run of batches on disk; schema drift is unified at write time."""

    def __init__(self, ctx: TaskContext, prefix: str = "spill", *, path: str | None = None,
                 compression: str | None | bool = True) -> None:
        self.path = path or ctx.scratch_path(prefix, ".arrows")
        self.compression = ctx.shuffle_compression if compression is True else compression
        self._sink: pa.NativeFile | None = None
        self._writer: pa.ipc.RecordBatchStreamWriter | None = None
        self._schema: pa.Schema | None = None
        self.rows = 0
        self.bytes = 0

    def write(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows == 0:
            return
        if self._writer is None:
            self._schema = batch.schema
            self._sink = pa.OSFile(self.path, "wb")
            self._writer = pa.ipc.new_stream(self._sink, self._schema,
                                             options=ipc_options(self.compression))
        elif not batch.schema.equals(self._schema):
            merged = unify_schemas([self._schema, batch.schema])
            if not merged.equals(self._schema):
                # rewrite what we have under the wider schema
                self.close()
                old = list(self._read_raw())
                self._writer = None
                os.unlink(self.path)
                self._schema = merged
                self._sink = pa.OSFile(self.path, "wb")
                self._writer = pa.ipc.new_stream(self._sink, merged,
                                                 options=ipc_options(self.compression))
                for b in old:
                    self._writer.write_batch(cast_batch(b, merged))
            batch = cast_batch(batch, self._schema)
        self._writer.write_batch(batch)
        self.rows += batch.num_rows
        self.bytes += batch.nbytes

    @property
    def schema(self) -> pa.Schema | None:
        """The schema written so far (None before the first row)."""
        return self._schema

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = None

    def _read_raw(self) -> Iterator[pa.RecordBatch]:
        if not os.path.exists(self.path):
            return
        with pa.OSFile(self.path, "rb") as f:
            reader = pa.ipc.open_stream(f)
            yield from reader

    def read(self) -> Iterator[pa.RecordBatch]:
        """Close for writing, then stream the batches back."""
        self.close()
        yield from self._read_raw()

    def delete(self) -> None:
        self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class GroupFiles:
    """Rows filed by group number (e.g. key group) in one spill file per group, then read
    back a group at a time: a snapshot of state larger than memory splits it by group
    with memory for one piece in and one group out. Use as a context manager (the files
    left are deleted on exit)."""

    def __init__(self, ctx: TaskContext, prefix: str = "groups") -> None:
        self.ctx = ctx
        self.prefix = prefix
        self.files: dict[int, SpillFile] = {}

    def put(self, group: int, table: pa.Table | None) -> None:
        """Append rows to ``group``'s file."""
        if table is None or table.num_rows == 0:
            return
        sf = self.files.get(group)
        if sf is None:
            sf = self.files[group] = SpillFile(self.ctx, self.prefix)
        for b in table.to_batches():
            sf.write(b)

    def groups(self) -> list[int]:
        """The groups that hold rows, ascending."""
        return sorted(self.files)

    def take(self, group: int) -> pa.Table | None:
        """``group``'s rows as one table (None when it has none); its file is deleted."""
        sf = self.files.pop(group, None)
        if sf is None:
            return None
        try:
            return pa.Table.from_batches(list(sf.read())).combine_chunks()
        finally:
            sf.delete()

    def close(self) -> None:
        for sf in self.files.values():
            sf.delete()
        self.files = {}

    def __enter__(self) -> GroupFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BucketSpiller:
    """Hash-partitions batches by key columns into ``num_buckets`` spill files.

    Used by aggregations and joins whose state outgrows memory (grace hashing): each
    bucket is later processed on its own, within the memory budget. ``salt`` makes the
    bucketing independent of the shuffle's own hash partitioning.
    """

    def __init__(self, ctx: TaskContext, keys: list[str], num_buckets: int, salt: int,
                 prefix: str = "bucket") -> None:
        self.ctx = ctx
        self.keys = keys
        self.num_buckets = num_buckets
        self.salt = salt
        self.files = [SpillFile(ctx, f"{prefix}{i}") for i in range(num_buckets)]

    def bucket_ids(self, batch: pa.RecordBatch):
        import numpy as np

        cols = [batch.column(k) for k in self.keys] if self.keys else list(batch.columns)
        cols = cols + [pa.array(np.full(batch.num_rows, self.salt, dtype=np.int64))]
        return partition_ids(cols, batch.num_rows, self.num_buckets)

    def write(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows == 0:
            return
        for b, part in split_by_partition(batch, self.bucket_ids(batch), self.num_buckets):
            self.files[b].write(part)

    def read_bucket(self, i: int) -> Iterator[pa.RecordBatch]:
        yield from self.files[i].read()

    def delete(self) -> None:
        for f in self.files:
            f.delete()
