"""The streaming file sink: Parquet or JSON-lines files, exactly once per epoch (two-phase
commit: each epoch's files are staged, one staging directory per parallel instance, and
moved into the target at commit). With ``changelog=True`` it takes updating results and
writes each row's change kind in a ``change`` column; otherwise it takes appends only."""

from __future__ import annotations

import uuid
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from millstream.core.changelog import APPEND, CHANGE, RETRACT, VISIBLE, to_visible
from millstream.errors import PlanError, StorageError
from millstream.io import fs as msfs


class FileStreamSink:
    """Parquet or JSON-lines files under ``uri``, exactly once per epoch (two-phase commit).

    Files of epoch ``e`` are written to ``<uri>/_staging/epoch-<e>/`` and moved into
    ``<uri>/`` by ``commit`` (a file already moved is skipped, so a repeated commit after
    a crash is harmless). Readers skip ``_``-prefixed names, so staging stays invisible.

    ``changelog=True``: every row gets its change kind in column ``change`` ("+I", "-U",
    "+U", "-D"; "+I" for rows of an append-only result), so the files replay the result's
    changes in order (file names sort by epoch); without it, updates are refused.
    """

    def __init__(self, uri: str, format: str = "parquet",
                 storage_options: dict[str, Any] | None = None,
                 changelog: bool = False) -> None:
        if format not in ("parquet", "json"):
            raise PlanError(f"FileStreamSink: format must be 'parquet' or 'json', got {format!r}")
        self.uri = uri
        self.format = format
        self.storage_options = storage_options or {}
        self.changelog = bool(changelog)
        self.fs, self.path = msfs.resolve(uri, **self.storage_options)
        self._epoch: int | None = None
        self._files: list[str] = []
        #: parallel instance index (its own staging directory), None for a single instance
        self.subtask: int | None = None

    def for_subtask(self, index: int) -> FileStreamSink:
        """A copy for parallel sink instance ``index`` (file names are unique per instance;
        the coordinator commits every instance's handle)."""
        sub = FileStreamSink(self.uri, self.format, self.storage_options, self.changelog)
        sub.subtask = int(index)
        return sub

    @property
    def changelog_mode(self) -> str:
        """What it takes: every change with ``changelog=True``, else appends only."""
        return RETRACT if self.changelog else APPEND

    def _staging(self, epoch: int, subtask: int | None = None) -> str:
        d = msfs.join(self.path, "_staging", f"epoch-{epoch:010d}")
        return d if subtask is None else msfs.join(d, f"task-{subtask:05d}")

    def begin(self, epoch: int) -> None:
        """Start epoch ``epoch``; removes files an unfinished earlier attempt staged for it."""
        msfs.delete_dir(self.fs, self._staging(epoch, self.subtask))
        msfs.mkdirs(self.fs, self._staging(epoch, self.subtask))
        self._epoch, self._files = epoch, []

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        """Stage one file with these rows."""
        if self._epoch is None:
            raise StorageError("FileStreamSink.write before begin()")
        if batch.num_rows == 0:
            return
        table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
        if CHANGE in table.schema.names:
            if not self.changelog:
                raise PlanError(f"FileStreamSink({self.uri!r}) takes appends only, but got "
                                f"updates (-U/+U/-D rows); write with changelog=True")
            table = to_visible(table)
        elif self.changelog:
            table = table.append_column(VISIBLE, pa.array(["+I"] * table.num_rows, pa.string()))
        ext = "parquet" if self.format == "parquet" else "json"
        name = f"part-e{self._epoch:010d}-{len(self._files):05d}-{uuid.uuid4().hex[:6]}.{ext}"
        path = msfs.join(self._staging(self._epoch, self.subtask), name)
        if self.format == "parquet":
            with msfs.open_output_stream(self.fs, path) as out:
                pq.write_table(table, out, compression="zstd")
        else:
            from millstream.io.files.json_encoding import encode_json_lines

            msfs.write_bytes(self.fs, path, encode_json_lines(table).to_pybytes())
        self._files.append(name)

    def pre_commit(self, epoch: int) -> dict[str, Any]:
        """The handle of the staged epoch: its file names."""
        return {"epoch": epoch, "files": list(self._files), "subtask": self.subtask}

    def commit(self, handle: dict[str, Any]) -> None:
        """Move the epoch's staged files into the target (idempotent)."""
        staging = self._staging(handle["epoch"], handle.get("subtask"))
        for name in handle["files"]:
            src, dst = msfs.join(staging, name), msfs.join(self.path, name)
            if msfs.exists(self.fs, src):
                msfs.move(self.fs, src, dst)
            elif not msfs.exists(self.fs, dst):
                raise StorageError(f"FileStreamSink: committing epoch {handle['epoch']}: the "
                                   f"staged file {src} is missing and {dst} does not exist")
        msfs.delete_dir(self.fs, staging)
        if handle.get("subtask") is not None:  # the epoch directory, once every task's is gone
            parent = self._staging(handle["epoch"])
            try:
                if not msfs.list_dir(self.fs, parent):
                    msfs.delete_dir(self.fs, parent)
            except (OSError, StorageError):
                pass

    def abort(self, handle: dict[str, Any] | None = None) -> None:
        """Remove the staged files of the current epoch."""
        if self._epoch is not None:
            msfs.delete_dir(self.fs, self._staging(self._epoch, self.subtask))
