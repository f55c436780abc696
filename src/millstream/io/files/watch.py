"""Directory watch: an unbounded source of the files that appear in a directory.

``ms.read_json(dir, watch=True)`` (and ``read_csv``, ``read_text``, ``read_parquet``)
lists ``dir`` by URI (:mod:`millstream.io.fs`, so ``s3://`` works too) every
``poll_interval`` and reads every new data file with the batch source of its format.

Semantics (streaming only; a batch ``collect()`` of a watch source is refused):

* **Which files.** Files below ``dir`` (recursively) whose path parts do not start with
  ``_`` or ``.``. A file whose extension names a format the reader cannot read
  (``x.parquet`` in a watched JSON directory) stops the job with an error naming it, as
  a batch read of the directory does (:mod:`millstream.io.files.formats`). A file is read once, when it is *settled*: it is non-empty and its
  size and modification time were the same in two consecutive listings (at least
  ``poll_interval`` apart). A writer that is still appending is therefore not read
  early as long as it writes more often than ``poll_interval``; the safest protocol is
  to write under a hidden name (``.x.json.tmp``, ``_x``) and rename into place. A file
  that changes after it was read is not read again (files are treated as immutable).
* **Order.** Settled files are read one after the other (one source partition) in
  order of modification time, then path.
* **Position** (what a checkpoint stores): the set of files fully read, the file being
  read and how many of its rows were delivered (and, with a dead-letter directory, how
  many of its bad records were reported), and the schema fixed by the first file
  (JSON and CSV infer it once, from the first file, unless ``schema=`` is given, so
  every file is parsed with the same types). After a restore the file in progress is
  re-read from its start and its first rows (and bad records) skipped, so with a
  two-phase sink every row is delivered exactly once.
* **Bad records** follow ``on_bad_records`` (JSON and CSV). Dead letters are staged per
  epoch and committed with the checkpoint, like the sink's output, so each one is
  written exactly once across stops, crashes and restores (see
  :mod:`millstream.io.files.dead_letters`).
* **Event time** comes from the data (``with_watermark``); the source has no watermark
  of its own.
* **End.** The source never ends, except with ``start(..., stop_at_end=True)``: then it
  ends at the first listing in which every non-empty file has been read.
* Hive partition columns (``key=value`` directories) are not added in watch mode.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from millstream.core.context import TaskContext
from millstream.core.units import parse_duration
from millstream.errors import PlanError, StorageNotFoundError
from millstream.io import fs as msfs
from millstream.io.base import Source, Split, StreamReader, StreamSource
from millstream.io.files.dead_letters import DeadLetter, StagedDeadLetters, check_policy
from millstream.io.files.formats import READS, format_of

#: Formats a directory can be watched in.
WATCH_FORMATS = ("json", "csv", "text", "parquet")


def _file_source(fmt: str, uri: str, options: dict[str, Any]) -> Source:
    """The batch source of one file of format ``fmt``."""
    if fmt == "json":
        from millstream.io.files.json import JsonSource

        return JsonSource(uri, **options)
    if fmt == "csv":
        from millstream.io.files.csv import CsvSource

        return CsvSource(uri, **options)
    if fmt == "text":
        from millstream.io.files.text import TextSource

        return TextSource(uri, **options)
    from millstream.io.files.parquet import ParquetSource

    return ParquetSource(uri, **options)


class WatchSource(Source):
    """New files of a directory, read with the batch source of their format (see module doc)."""

    name = "watch"

    def __init__(self, format: str, uri: str, options: dict[str, Any] | None = None,
                 poll_interval: str | int | float = "1s") -> None:
        if format not in WATCH_FORMATS:
            raise PlanError(f"watch=True: unknown format {format!r}; a directory can be "
                            f"watched as one of {WATCH_FORMATS}")
        if not isinstance(uri, str):
            raise PlanError(f"watch=True needs one directory URI, got {uri!r}")
        fs, path = msfs.resolve(uri, **dict((options or {}).get("storage_options") or {}))
        if msfs.has_glob(path):
            raise PlanError(f"watch=True needs a directory, not a glob pattern: {uri!r}")
        self.format = format
        self.uri = uri
        self.options = dict(options or {})
        self.options.setdefault("partitioning", None)
        if "on_bad_records" in self.options:  # a bad policy fails now, not in the job
            self.options["on_bad_records"] = check_policy(self.options["on_bad_records"])
        self.poll_interval_s = parse_duration(poll_interval, "poll_interval") / 1e6
        self._fs, self._path = fs, path.rstrip("/") or path

    # -- batch interface: refused ------------------------------------------------------

    def plan_splits(self, target_splits: int) -> list[Split]:
        raise PlanError(f"read_{self.format}({self.uri!r}, watch=True) is unbounded: run it "
                        f"with .start(...) (streaming), or drop watch=True for a batch job")

    def read_split(self, split: Split, ctx: TaskContext) -> Iterator[pa.RecordBatch]:
        raise PlanError(f"read_{self.format}(..., watch=True) has no batch splits")

    def describe(self) -> str:
        return f"watch {self.format} {self.uri} every {self.poll_interval_s:g}s"

    # -- listing ------------------------------------------------------------------------

    def list_files(self) -> dict[str, tuple[int, int]]:
        """Visible data files below the directory: relative path -> (size, mtime ns)."""
        info = msfs.get_info(self._fs, self._path)
        if info.type == pafs.FileType.NotFound:
            raise StorageNotFoundError(f"watch=True: no such directory: {self.uri!r}")
        if info.type != pafs.FileType.Directory:
            raise PlanError(f"watch=True needs a directory, but {self.uri!r} is a file")
        prefix = self._path + "/"
        out: dict[str, tuple[int, int]] = {}
        for entry in msfs.list_dir(self._fs, self._path, recursive=True):
            if entry.type != pafs.FileType.File or not entry.path.startswith(prefix):
                continue
            rel = entry.path[len(prefix):]
            if any(msfs.is_hidden(part) for part in rel.split("/")):
                continue
            mtime = entry.mtime_ns if entry.mtime_ns is not None else 0
            out[rel] = (entry.size or 0, mtime)
        foreign = [rel for rel in out if (f := format_of(rel)) is not None
                   and f not in READS[self.format]]
        if foreign:
            raise PlanError(f"read_{self.format}({self.uri!r}, watch=True): the directory holds "
                            f"files of another format: {', '.join(sorted(foreign)[:5])}; a "
                            f"reader reads one format (move them out, or watch another "
                            f"directory)")
        return out

    def file_uri(self, rel: str) -> str:
        """The URI of a file of the directory, by its relative path."""
        return msfs.uri_for(self.uri, msfs.join(self._path, rel))

    def open_file(self, rel: str, schema: pa.Schema | None) -> Source:
        """The batch source of one file; JSON and CSV parse with ``schema`` when given."""
        options = dict(self.options)
        if schema is not None and self.format in ("json", "csv") and \
                options.get("schema") is None:
            options["schema"] = schema
        return _file_source(self.format, self.file_uri(rel), options)

    bounded = False

    def as_stream(self, target_splits: int, stop_at_end: bool = False) -> Any:
        """The streaming view: one partition reading the settled new files in order."""

        src = self

        class _Stream(StreamSource):
            def partitions(self) -> list[Any]:
                return [0]

            def start_positions(self) -> dict[Any, Any]:
                return {0: {"done": (), "current": None, "schema": None}}

            def open(self, partition: Any, position: Any, ctx: TaskContext) -> Any:
                return _WatchReader(src, position, ctx, stop_at_end)

        return _Stream()


class _WatchReader(StreamReader):
    """Reads the settled new files of a watched directory one after the other."""

    def __init__(self, src: WatchSource, position: dict[str, Any], ctx: TaskContext,
                 stop_at_end: bool) -> None:
        self._src = src
        self._ctx = ctx
        self._stop_at_end = stop_at_end
        self._done: set[str] = set(position.get("done", ()))
        self._schema: pa.Schema | None = position.get("schema")
        current = position.get("current")
        self._current: str | None = None
        self._rows = 0
        self._batches: Iterator[pa.RecordBatch] | None = None
        self._queue: list[str] = []
        self._seen: dict[str, tuple[int, int]] = {}
        self._next_listing = 0.0
        self.watermark = None
        self.finished = False
        policy = src.options.get("on_bad_records")
        self._dead = (StagedDeadLetters(policy, ctx, src.options.get("storage_options"))
                      if isinstance(policy, DeadLetter) else None)
        src.list_files()  # fails early on a missing directory or a file
        if current is not None:
            self._start_file(current[0], int(current[1]),
                             int(current[2]) if len(current) > 2 else 0)

    @property
    def position(self) -> dict[str, Any]:  # type: ignore[override]
        """Files fully read, the file in progress with rows delivered, the fixed schema."""
        current: tuple[Any, ...] | None = None
        if self._current is not None:
            current = (self._current, self._rows)
            if self._dead is not None:
                current += (self._dead.count,)
        return {"done": tuple(sorted(self._done)), "current": current, "schema": self._schema}

    def begin(self, epoch: int) -> None:
        """Dead letters from here on belong to ``epoch``."""
        if self._dead is not None:
            self._dead.begin(epoch)

    def pre_commit(self, epoch: int) -> Any:
        """The epoch's staged dead letters (committed with the checkpoint), or None."""
        return self._dead.pre_commit(epoch) if self._dead is not None else None

    def close(self) -> None:
        if self._dead is not None:
            self._dead.close()

    def _start_file(self, rel: str, skip: int, skip_bad: int = 0) -> None:
        source = self._src.open_file(rel, self._schema)
        if self._schema is None and self._src.format in ("json", "csv"):
            self._schema = source.data_schema()  # type: ignore[attr-defined]
        if self._dead is not None:
            self._dead.reset(skip_bad)  # the file's bad records before the position: committed
            source.dead_letters = self._dead  # type: ignore[attr-defined]
        self._current, self._rows = rel, 0
        self._batches = self._read(source)
        while self._rows < skip:
            b = next(self._batches, None)
            if b is None:
                break
            take = min(b.num_rows, skip - self._rows)
            self._rows += take
            if take < b.num_rows:
                rest = b.slice(take)
                self._batches = _prepend(rest, self._batches)
                break

    def _read(self, source: Source) -> Iterator[pa.RecordBatch]:
        for split in source.plan_splits(1):
            yield from source.read_split(split, self._ctx)

    def _list(self) -> None:
        """List the directory; queue files settled since the previous listing."""
        listing = self._src.list_files()
        settled = [rel for rel, (size, mtime) in listing.items()
                   if rel not in self._done and rel != self._current and size > 0
                   and self._seen.get(rel) == (size, mtime) and rel not in self._queue]
        settled.sort(key=lambda rel: (listing[rel][1], rel))
        self._queue.extend(settled)
        self._seen = listing
        pending = [rel for rel, (size, _) in listing.items()
                   if size > 0 and rel not in self._done]
        if self._stop_at_end and not pending and self._current is None and not self._queue:
            self.finished = True

    def poll(self, max_records: int, timeout_s: float) -> pa.RecordBatch | None:
        """The next rows of the file in progress, or of the next settled file."""
        while True:
            if self._batches is not None:
                b = next(self._batches, None)
                if b is None:
                    self._done.add(self._current)  # type: ignore[arg-type]
                    self._current, self._batches, self._rows = None, None, 0
                    continue
                if b.num_rows > max_records:
                    self._batches = _prepend(b.slice(max_records), self._batches)
                    b = b.slice(0, max_records)
                self._rows += b.num_rows
                if b.num_rows:
                    return b
                continue
            if self._queue:
                self._start_file(self._queue.pop(0), 0)
                continue
            now = time.monotonic()
            if now < self._next_listing:
                return None
            self._next_listing = now + self._src.poll_interval_s
            self._list()
            if not self._queue:
                return None


def _prepend(first: pa.RecordBatch, rest: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    yield first
    yield from rest
