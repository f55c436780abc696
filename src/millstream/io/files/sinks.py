"""File sinks (Parquet, CSV, JSON lines) with an all-or-nothing commit.

How the engine drives a sink:

1. ``sink.prepare(job_id)`` on the driver, once, before any task runs: checks the target
   against ``mode`` and creates a staging directory *next to* the target
   (``<parent>/.<name>.staging-<job_id>/``). The prepared sink object (it now holds
   the staging location) is what must be shipped to the workers.
2. ``sink.write_partition(batches, ctx)`` in each task: writes the partition's files
   into ``<staging>/attempt-s{stage}-p{partition}-a{attempt}/`` and returns the list of
   written files relative to the staging directory (a picklable commit message).
3. ``sink.commit(messages)`` on the driver with the messages of the winning attempts
   only: publishes exactly those files, then writes ``_SUCCESS`` last. On the local
   disk (and HDFS) a new target appears with one directory rename. Or
   ``sink.abort()``: removes staging and leaves the target as it was.

Output layout: ``part-{partition:05d}-{job_id}.{ext}`` files, under hive directories
``col=value/`` with ``partition_by`` (partition columns are not stored in the files).
"""

from __future__ import annotations

import os
import posixpath
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from millstream.core.context import TaskContext
from millstream.errors import OutputExistsError, PlanError, SchemaError, StorageError
from millstream.io import fs as msfs
from millstream.io.base import Sink
from millstream.io.files.json_encoding import encode_json_lines

MODES = ("error", "overwrite", "append")
#: Name hive uses for a null partition value.
NULL_PARTITION = "__HIVE_DEFAULT_PARTITION__"
#: Marker prefix of the schema-carrying file a task writes for an empty partition.
EMPTY_MARKER = "_empty"
#: Files copied in parallel when committing to an object store.
COMMIT_THREADS = 16


def partition_dir(columns: Sequence[str], values: Sequence[Any]) -> str:
    """The hive directory ``a=1/b=x`` of one combination of partition values."""
    return "/".join(f"{c}={_format_value(v)}" for c, v in zip(columns, values))


def _format_value(value: Any) -> str:
    if value is None:
        return NULL_PARTITION
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif hasattr(value, "isoformat"):
        text = value.isoformat()
    else:
        text = str(value)
    return quote(text, safe="") or NULL_PARTITION


def split_by_columns(table: pa.Table, keys: Sequence[str]
                     ) -> Iterator[tuple[tuple[Any, ...], pa.Table]]:
    """Split a table by the values of ``keys``: (values, rows without the key columns)."""
    n = table.num_rows
    indexed = table.select(list(keys)).append_column("__row", pa.array(np.arange(n)))
    groups = indexed.group_by(list(keys), use_threads=False).aggregate([("__row", "list")])
    rest = table.drop_columns(list(keys))
    key_columns = [groups.column(k).to_pylist() for k in keys]
    rows = groups.column("__row_list")
    for i in range(groups.num_rows):
        values = tuple(col[i] for col in key_columns)
        yield values, rest.take(rows[i].values)


# ----------------------------------------------------------------------------------------
# Writing one file
# ----------------------------------------------------------------------------------------

class _OutFile:
    """One output file: written in place on local disk, else locally then uploaded."""

    def __init__(self, sink: FileSink, fs: pafs.FileSystem, path: str, schema: pa.Schema,
                 ctx: TaskContext):
        self.sink, self.fs, self.path, self.schema = sink, fs, path, schema
        self.tmp: str | None = None
        if msfs.is_local(fs):
            self.stream = msfs.open_output_stream(fs, path)
        else:
            self.tmp = ctx.scratch_path("sink", "." + sink.extension)
            self.stream = pa.OSFile(self.tmp, "wb")
        self.writer = sink._open_writer(self.stream, schema)
        self.buffered: list[pa.RecordBatch] = []
        self.buffered_bytes = 0
        self.rows = 0

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        if batch.schema != self.schema:
            try:
                batch = batch.select(self.schema.names).cast(self.schema)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, KeyError, ValueError) as exc:
                raise SchemaError(
                    f"{self.sink.name} sink: a batch with schema {batch.schema} does not fit "
                    f"the schema of the file being written ({self.schema}): {exc}") from exc
        self.rows += batch.num_rows
        if self.sink.buffers_row_groups:
            self.buffered.extend(batch.to_batches() if isinstance(batch, pa.Table) else [batch])
            self.buffered_bytes += batch.nbytes
        else:
            self.sink._write(self.writer, self.stream, batch)

    def flush(self) -> None:
        if self.buffered:
            table = pa.Table.from_batches(self.buffered, schema=self.schema)
            self.buffered, self.buffered_bytes = [], 0
            self.sink._write(self.writer, self.stream, table)

    def close(self) -> None:
        try:
            self.flush()
            if self.writer is not None:
                self.writer.close()
        finally:
            self.stream.close()
        if self.tmp is not None:
            try:
                msfs.upload_file(self.tmp, self.fs, self.path)
            finally:
                os.unlink(self.tmp)
                self.tmp = None

    def discard(self) -> None:
        # the writer first: a Parquet writer left open closes itself when collected and
        # then fails on the closed stream ("Exception ignored in ParquetWriter.__del__")
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception:  # noqa: BLE001 - the file is being thrown away
                pass
            self.writer = None
        try:
            self.stream.close()
        except OSError:
            pass
        if self.tmp is not None and os.path.exists(self.tmp):
            os.unlink(self.tmp)


# ----------------------------------------------------------------------------------------
# The sinks
# ----------------------------------------------------------------------------------------

class FileSink(Sink):
    """Base of the file sinks: staging, per-attempt files, atomic commit, abort."""

    name = "files"
    extension = "bin"
    #: Whether batches are gathered into large row groups before writing.
    buffers_row_groups = False

    def __init__(self, uri: str, partition_by: str | Sequence[str] | None = None,
                 mode: str = "error", *, schema: pa.Schema | None = None,
                 max_open_files: int = 64, storage_options: dict[str, Any] | None = None):
        if mode not in MODES:
            raise PlanError(f"mode must be one of {MODES}, got {mode!r}")
        if isinstance(partition_by, str):
            partition_by = [partition_by]
        self.partition_by = list(partition_by or [])
        for col in self.partition_by:
            if msfs.is_hidden(col):
                raise PlanError(f"partition column {col!r} starts with '_' or '.', so its "
                                f"directories would be ignored by readers; rename it")
        if schema is not None:
            self._check_partition_columns(schema)
        self.uri = uri
        self.mode = mode
        self.schema = schema
        self.max_open_files = max(1, int(max_open_files))
        self.storage_options = dict(storage_options or {})
        self.job_id: str | None = None
        self.staging: str | None = None
        self._old_aside: str | None = None

    # -- format hooks ---------------------------------------------------------------------

    def _open_writer(self, stream: Any, schema: pa.Schema) -> Any:
        raise NotImplementedError

    def _write(self, writer: Any, stream: Any, data: pa.RecordBatch | pa.Table) -> None:
        writer.write(data)

    def _writes_empty_file(self) -> bool:
        return False

    # -- helpers --------------------------------------------------------------------------

    def _fs_path(self) -> tuple[pafs.FileSystem, str]:
        return msfs.resolve(self.uri, **self.storage_options)

    def _check_partition_columns(self, schema: pa.Schema) -> None:
        missing = [c for c in self.partition_by if schema.get_field_index(c) == -1]
        if missing:
            raise SchemaError(f"partition_by column(s) {missing} not in the data; "
                              f"columns: {schema.names}")
        if self.partition_by and len(self.partition_by) == len(schema):
            raise SchemaError("partition_by names every column; no data would be left to write")

    def _file_name(self, partition: int, part: int) -> str:
        suffix = "" if part == 0 else f"-c{part}"
        return f"part-{partition:05d}-{self.job_id}{suffix}.{self.extension}"

    def _target_state(self, fs: pafs.FileSystem, path: str) -> str:
        """'missing', 'empty' (an empty directory), 'dir' or 'file'."""
        info = msfs.get_info(fs, path)
        if info.type == pafs.FileType.NotFound:
            return "missing"
        if info.type == pafs.FileType.File:
            return "file"
        staging = (self.staging or "").rstrip("/")
        entries = [e for e in msfs.list_dir(fs, path) if not staging or e.path.rstrip("/")
                   != staging]
        if any(e.type == pafs.FileType.File for e in entries):
            return "dir"
        if entries and msfs.has_atomic_rename(fs):
            return "dir"
        # Object stores may show empty "folders" (prefixes left by deleted objects): the
        # target is empty unless a file lies somewhere below.
        for e in entries:
            if any(f.type == pafs.FileType.File for f in msfs.list_dir(fs, e.path, True)):
                return "dir"
        return "empty"

    # -- Sink -----------------------------------------------------------------------------

    def prepare(self, job_id: str) -> None:
        """Check the target against ``mode`` and create the staging directory."""
        fs, path = self._fs_path()
        state = self._target_state(fs, path)
        if self.mode == "error" and state in ("dir", "file"):
            raise OutputExistsError(
                f"output {self.uri} already exists and is not empty; pass mode=\"overwrite\" "
                f"to replace it or mode=\"append\" to add to it")
        if self.mode == "append" and state == "file":
            raise OutputExistsError(f"cannot append to {self.uri}: it is a file, not a directory")
        self.job_id = job_id
        parent, name = msfs.parent_and_name(path)
        if parent:
            self.staging = msfs.join(parent, f".{name}.staging-{job_id}")
        else:  # the root of a bucket: stage inside it, under a hidden name
            self.staging = msfs.join(path, f".millstream-staging-{job_id}")
        if msfs.has_atomic_rename(fs):
            msfs.mkdirs(fs, self.staging)
        elif isinstance(fs, (pafs.S3FileSystem, pafs.GcsFileSystem)):
            # Object stores need no directories (and some keep empty "folders" around
            # once a marker was made); only make sure the bucket exists.
            msfs.mkdirs(fs, path.split("/")[0])
        else:
            msfs.mkdirs(fs, parent or path)

    def _require_prepared(self) -> tuple[str, str]:
        if self.staging is None or self.job_id is None:
            raise PlanError(f"{self.name} sink {self.uri}: prepare(job_id) was not called")
        return self.staging, self.job_id

    def write_partition(self, batches: Iterator[pa.RecordBatch], ctx: TaskContext) -> list[str]:
        """Write one partition into this attempt's staging directory; return its files.

        Paths are relative to the staging directory, e.g.
        ``attempt-s1-p3-a0/part-00003-<job>.parquet``. A partition without rows writes
        no file (but may write a schema-only ``_empty`` file, used only if the whole
        output is empty).
        """
        staging, _ = self._require_prepared()
        fs, _ = self._fs_path()
        attempt_rel = f"attempt-s{ctx.stage_id}-p{ctx.partition}-a{ctx.attempt}"
        attempt_dir = msfs.join(staging, attempt_rel)
        writers: OrderedDict[tuple[Any, ...], _OutFile] = OrderedDict()
        parts: dict[tuple[Any, ...], int] = {}
        written: list[str] = []
        schema = self.schema
        budget = max(8 << 20, ctx.memory_budget // 2)
        row_group_bytes = getattr(self, "row_group_bytes", 128 << 20)

        def writer_for(key: tuple[Any, ...], file_schema: pa.Schema) -> _OutFile:
            w = writers.get(key)
            if w is not None:
                writers.move_to_end(key)
                return w
            if len(writers) >= self.max_open_files:
                _, oldest = writers.popitem(last=False)
                oldest.close()
            part = parts.get(key, -1) + 1
            parts[key] = part
            rel = msfs.join(partition_dir(self.partition_by, key) if key else "",
                            self._file_name(ctx.partition, part))
            w = _OutFile(self, fs, msfs.join(attempt_dir, rel), file_schema, ctx)
            writers[key] = w
            written.append(f"{attempt_rel}/{rel}")
            return w

        def write(key: tuple[Any, ...], data: pa.Table | pa.RecordBatch) -> None:
            w = writer_for(key, data.schema)
            w.write(data)
            if self.buffers_row_groups:
                if w.buffered_bytes >= row_group_bytes:
                    w.flush()
                total = sum(x.buffered_bytes for x in writers.values())
                if total > budget:
                    max(writers.values(), key=lambda x: x.buffered_bytes).flush()

        ok = False
        try:
            for batch in batches:
                if schema is None:
                    schema = batch.schema
                    self._check_partition_columns(schema)
                if batch.num_rows == 0:
                    continue
                if not self.partition_by:
                    write((), batch)
                else:
                    table = pa.Table.from_batches([batch])
                    for key, rows in split_by_columns(table, self.partition_by):
                        write(key, rows)
            for w in list(writers.values()):
                w.close()
            writers.clear()
            if not written and schema is not None and self._writes_empty_file():
                file_schema = pa.schema([f for f in schema if f.name not in self.partition_by])
                rel = f"{EMPTY_MARKER}.{self.extension}"
                _OutFile(self, fs, msfs.join(attempt_dir, rel), file_schema, ctx).close()
                written.append(f"{attempt_rel}/{rel}")
            ok = True
            return written
        finally:
            if not ok:
                for w in writers.values():
                    w.discard()

    def commit(self, messages: list[Any]) -> None:
        """Publish the files of the winning attempts, then write ``_SUCCESS``."""
        staging, job_id = self._require_prepared()
        fs, target = self._fs_path()
        files = [rel for m in messages if m for rel in m]
        moves: list[tuple[str, str]] = []
        empties = []
        for rel in files:
            head, _, rest = rel.partition("/")
            if not head.startswith("attempt-") or not rest:
                raise StorageError(f"{self.name} sink: bad commit message entry {rel!r}")
            if posixpath.basename(rest).startswith(EMPTY_MARKER):
                empties.append(rel)
            else:
                moves.append((rel, rest))
        if not moves and empties:
            moves.append((empties[0], f"part-00000-{job_id}.{self.extension}"))
        destinations = [dst for _, dst in moves]
        if len(set(destinations)) != len(destinations):
            raise StorageError(f"{self.name} sink {self.uri}: two committed attempts wrote the "
                               f"same file; pass only the winning attempt of each task")
        state = self._target_state(fs, target)
        if self.mode == "error" and state in ("dir", "file"):
            raise OutputExistsError(f"output {self.uri} appeared while the job ran; "
                                    f"nothing was written to it")
        if msfs.has_atomic_rename(fs):
            self._commit_by_rename(fs, target, staging, moves, state)
        else:
            self._commit_by_copy(fs, target, staging, moves, state)
        msfs.delete_dir(fs, staging)

    def _commit_by_rename(self, fs: pafs.FileSystem, target: str, staging: str,
                          moves: list[tuple[str, str]], state: str) -> None:
        out = msfs.join(staging, "_output")
        msfs.mkdirs(fs, out)
        for src, dst in moves:
            msfs.move(fs, msfs.join(staging, src), msfs.join(out, dst))
        msfs.write_bytes(fs, msfs.join(out, "_SUCCESS"), b"")
        if state == "missing":
            msfs.move(fs, out, target)
        elif state == "empty" or (state == "dir" and self.mode == "overwrite") or (
                state == "file" and self.mode == "overwrite"):
            parent, name = msfs.parent_and_name(target)
            old = msfs.join(parent, f".{name}.old-{self.job_id}")
            msfs.move(fs, target, old)
            self._old_aside = old
            msfs.move(fs, out, target)
            self._old_aside = None
            if state == "file":
                msfs.delete_file(fs, old)
            else:
                msfs.delete_dir(fs, old)
        else:  # append into an existing directory: file renames, then _SUCCESS last
            for _, dst in moves:
                msfs.move(fs, msfs.join(out, dst), msfs.join(target, dst))
            msfs.move(fs, msfs.join(out, "_SUCCESS"), msfs.join(target, "_SUCCESS"))

    def _commit_by_copy(self, fs: pafs.FileSystem, target: str, staging: str,
                        moves: list[tuple[str, str]], state: str) -> None:
        old_files: list[str] = []
        if self.mode == "overwrite" and state == "file":
            msfs.delete_file(fs, target)
        elif self.mode == "overwrite" and state == "dir":
            old_files = [e.path for e in msfs.list_dir(fs, target, recursive=True)
                         if e.type == pafs.FileType.File]
        if state == "dir":
            msfs.delete_file(fs, msfs.join(target, "_SUCCESS"))

        def copy(pair: tuple[str, str]) -> None:
            src, dst = msfs.join(staging, pair[0]), msfs.join(target, pair[1])
            msfs.call(fs, lambda: fs.copy_file(src, dst),
                      f"copying {msfs.describe_path(fs, src)} to {msfs.describe_path(fs, dst)}")

        with ThreadPoolExecutor(max_workers=COMMIT_THREADS) as pool:
            list(pool.map(copy, moves))
            new = {msfs.join(target, dst) for _, dst in moves}
            staging_prefix = staging.rstrip("/") + "/"
            stale = [p for p in old_files if p not in new and not p.startswith(staging_prefix)]
            list(pool.map(lambda p: msfs.delete_file(fs, p), stale))
        msfs.write_bytes(fs, msfs.join(target, "_SUCCESS"), b"")

    def abort(self) -> None:
        """Delete staging; restore the old target if a commit stopped half way."""
        if self.staging is None:
            return
        fs, target = self._fs_path()
        if self._old_aside is not None and not msfs.exists(fs, target) and msfs.exists(
                fs, self._old_aside):
            msfs.move(fs, self._old_aside, target)
            self._old_aside = None
        msfs.delete_dir(fs, self.staging)

    def describe(self) -> str:
        """e.g. ``parquet sink /out mode=overwrite partition_by=[day]``."""
        text = f"{self.name} sink {self.uri} mode={self.mode}"
        if self.partition_by:
            text += f" partition_by=[{','.join(self.partition_by)}]"
        return text


class ParquetSink(FileSink):
    """Writes Parquet files (zstd by default), row groups of about ``row_group_bytes``."""

    name = "parquet"
    extension = "parquet"
    buffers_row_groups = True

    def __init__(self, uri: str, partition_by: str | Sequence[str] | None = None,
                 mode: str = "error", compression: str | None = "zstd", *,
                 compression_level: int | None = None, row_group_bytes: int = 128 << 20,
                 schema: pa.Schema | None = None, max_open_files: int = 64,
                 storage_options: dict[str, Any] | None = None):
        super().__init__(uri, partition_by, mode, schema=schema, max_open_files=max_open_files,
                         storage_options=storage_options)
        self.compression = compression or "none"
        self.compression_level = compression_level
        self.row_group_bytes = int(row_group_bytes)

    def _open_writer(self, stream: Any, schema: pa.Schema) -> Any:
        return pq.ParquetWriter(stream, schema, compression=self.compression,
                                compression_level=self.compression_level)

    def _write(self, writer: Any, stream: Any, data: pa.RecordBatch | pa.Table) -> None:
        table = data if isinstance(data, pa.Table) else pa.Table.from_batches([data])
        writer.write_table(table, row_group_size=max(1, table.num_rows))

    def _writes_empty_file(self) -> bool:
        return True


class CsvSink(FileSink):
    """Writes CSV files with a header line (by default)."""

    name = "csv"
    extension = "csv"

    def __init__(self, uri: str, partition_by: str | Sequence[str] | None = None,
                 mode: str = "error", *, header: bool = True, delimiter: str = ",",
                 schema: pa.Schema | None = None, max_open_files: int = 64,
                 storage_options: dict[str, Any] | None = None):
        super().__init__(uri, partition_by, mode, schema=schema, max_open_files=max_open_files,
                         storage_options=storage_options)
        self.header = header
        self.delimiter = delimiter

    def _open_writer(self, stream: Any, schema: pa.Schema) -> Any:
        nested = [f.name for f in schema if pa.types.is_nested(f.type)]
        if nested:
            raise SchemaError(f"csv sink {self.uri}: column(s) {nested} are nested (struct, "
                              f"list, map) and CSV cannot hold them; write JSON or Parquet, or "
                              f"flatten them first")
        return pacsv.CSVWriter(stream, schema, write_options=pacsv.WriteOptions(
            include_header=self.header, delimiter=self.delimiter))

    def _writes_empty_file(self) -> bool:
        return self.header


class JsonSink(FileSink):
    """Writes JSON-lines files: one object per row, one row per line."""

    name = "json"
    extension = "json"

    def _open_writer(self, stream: Any, schema: pa.Schema) -> Any:
        return None

    def _write(self, writer: Any, stream: Any, data: pa.RecordBatch | pa.Table) -> None:
        stream.write(encode_json_lines(data))
