"""Line-oriented files: the text source, and the byte-range machinery CSV and JSON share.

A large uncompressed file is cut into byte ranges that many tasks read in parallel.
Lines are assigned to ranges by where they start: a range ``[start, end)`` owns every
line whose first byte lies in it. A reader of a range starting at ``start > 0`` looks at
the byte before ``start`` and skips up to and including the first newline (the Hadoop
rule, shifted by one byte so that a line starting exactly at ``start`` is not lost); it
then reads past ``end`` to finish its last line. Every line is read exactly once
whatever the split size. Compressed files (``.gz``, ``.bz2``, ``.zst``, ``.lz4``) are
not splittable and are read whole by one task.
"""

from __future__ import annotations

import codecs
import copy
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from millstream.core.context import TaskContext
from millstream.errors import BadRecordError, PlanError, SchemaError
from millstream.io import fs as msfs
from millstream.io.base import Source, Split

if TYPE_CHECKING:
    from millstream.expr.nodes import Expr

#: Smallest split planned automatically (a split_size argument overrides it).
DEFAULT_MIN_SPLIT_SIZE = 8 << 20
#: Bytes read per I/O call; also about the bytes parsed per batch.
DEFAULT_BLOCK_SIZE = 4 << 20
#: Cost, in bytes, charged per file when packing small files into one split.
FILE_OPEN_COST = 256 << 10
#: Lines longer than this are refused rather than buffered.
MAX_LINE_BYTES = 1 << 30
#: Hadoop's slop: the last split of a file may be up to 10% larger than the split size.
SPLIT_SLOP = 1.1

COMPRESSION_BY_EXTENSION = {
    ".gz": "gzip", ".gzip": "gzip", ".bz2": "bz2", ".zst": "zstd", ".zstd": "zstd",
    ".lz4": "lz4", ".br": "brotli",
}
_UTF8_BOM = b"\xef\xbb\xbf"


def compression_of(path: str) -> str | None:
    """The codec implied by a file name's extension, or None."""
    lower = path.lower()
    for ext, codec in COMPRESSION_BY_EXTENSION.items():
        if lower.endswith(ext):
            return codec
    return None


# ----------------------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FileRange:
    """Bytes ``[start, end)`` of one file (``end`` None: to the end, for compressed files)."""

    uri: str
    path: str
    start: int
    end: int | None
    file_size: int
    compression: str | None = None
    #: Values of the hive partition columns (``key=value`` directories) of this file.
    partition: tuple[Any, ...] = ()

    def label(self) -> str:
        """Short text for split descriptions."""
        if self.start == 0 and (self.end is None or self.end >= self.file_size):
            return self.uri
        return f"{self.uri}[{self.start}:{self.end}]"


@dataclass(frozen=True)
class LineSplitInfo:
    """What a line-based split reads: file ranges, and the schema every task must produce."""

    ranges: tuple[FileRange, ...]
    schema: pa.Schema | None = None
    partition_schema: pa.Schema | None = None
    #: Facts the driver learnt while planning (e.g. how the schema was inferred).
    extra: tuple[tuple[str, Any], ...] = ()


def choose_split_size(total_bytes: int, target_splits: int, split_size: int | None) -> int:
    """``split_size`` when given, else total/target but at least DEFAULT_MIN_SPLIT_SIZE."""
    if split_size is not None:
        if split_size <= 0:
            raise PlanError(f"split_size must be positive, got {split_size}")
        return int(split_size)
    target = max(1, int(target_splits))
    return max(DEFAULT_MIN_SPLIT_SIZE, math.ceil(total_bytes / target))


def plan_file_ranges(files: Sequence[msfs.FileEntry], target_splits: int,
                     split_size: int | None, splittable: bool = True,
                     partitions: dict[str, tuple[Any, ...]] | None = None
                     ) -> list[list[FileRange]]:
    """Cut files into byte ranges of about the split size; pack small files together.

    Empty files are left out. Compressed files (and all files when ``splittable`` is
    False) are never cut.
    """
    size = choose_split_size(sum(f.size for f in files), target_splits, split_size)
    open_cost = min(FILE_OPEN_COST, max(1, size // 8))
    groups: list[list[FileRange]] = []
    pack: list[FileRange] = []
    pack_bytes = 0

    def flush() -> None:
        nonlocal pack, pack_bytes
        if pack:
            groups.append(pack)
        pack, pack_bytes = [], 0

    for f in files:
        if f.size == 0:
            continue
        codec = compression_of(f.path)
        values = partitions.get(f.path, ()) if partitions else ()
        if codec is not None or not splittable or f.size <= size * SPLIT_SLOP:
            cost = f.size + open_cost
            if pack and pack_bytes + cost > size:
                flush()
            pack.append(FileRange(f.uri, f.path, 0, None if codec else f.size, f.size, codec,
                                  values))
            pack_bytes += cost
            continue
        flush()
        start = 0
        while (f.size - start) / size > SPLIT_SLOP:
            groups.append([FileRange(f.uri, f.path, start, start + size, f.size, None, values)])
            start += size
        groups.append([FileRange(f.uri, f.path, start, f.size, f.size, None, values)])
    flush()
    return groups


def splits_from_ranges(groups: list[list[FileRange]], schema: pa.Schema | None,
                       partition_schema: pa.Schema | None = None,
                       extra: tuple[tuple[str, Any], ...] = ()) -> list[Split]:
    """Wrap planned range groups into :class:`Split` objects."""
    splits = []
    for i, group in enumerate(groups):
        nbytes = sum((r.end if r.end is not None else r.file_size) - r.start for r in group)
        desc = group[0].label() if len(group) == 1 else (
            f"{len(group)} files: {group[0].label()} .. {group[-1].label()}")
        splits.append(Split(i, LineSplitInfo(tuple(group), schema, partition_schema, extra),
                            nbytes, desc))
    return splits


# ----------------------------------------------------------------------------------------
# Reading byte ranges line by line
# ----------------------------------------------------------------------------------------

@dataclass
class LineChunk:
    """Complete lines, each ending with '\\n' (a missing final newline is added).

    ``offset`` is the byte offset of ``data[0]`` in the (uncompressed) file and
    ``first_line`` the index of its first line counted from the first line the range owns.
    """

    data: bytes
    offset: int
    first_line: int


class _ResumableStream:
    """A sequential (decompressing) stream that reopens and skips ahead after a transient error."""

    def __init__(self, fs: Any, path: str, codec: str | None, what: str):
        self.fs, self.path, self.codec, self.what = fs, path, codec, what
        self.pos = 0
        self.stream: Any = None

    def _read(self, n: int) -> bytes:
        try:
            if self.stream is None:
                self.stream = self.fs.open_input_stream(self.path, compression=self.codec)
                skip = self.pos
                while skip > 0:
                    got = self.stream.read(min(skip, 8 << 20))
                    if not got:
                        raise EOFError(f"{self.what}: file shrank while being read")
                    skip -= len(got)
            return self.stream.read(n)
        except Exception:
            self.close()
            raise

    def read(self, n: int) -> bytes:
        data = msfs.call(self.fs, lambda: self._read(n), self.what)
        self.pos += len(data)
        return data

    def close(self) -> None:
        if self.stream is not None:
            try:
                self.stream.close()
            except OSError:
                pass
            self.stream = None


class LineReader:
    """Reads the lines a :class:`FileRange` owns, in chunks of about ``block_size`` bytes."""

    def __init__(self, frange: FileRange, storage_options: dict[str, Any] | None = None,
                 block_size: int = DEFAULT_BLOCK_SIZE, skip_header: bool = False,
                 strip_bom: bool = False):
        self.frange = frange
        self.storage_options = storage_options or {}
        self.block_size = max(1, int(block_size))
        self.skip_header = skip_header
        self.strip_bom = strip_bom
        self.fs, _ = msfs.resolve(frange.uri, **self.storage_options)
        self._first_offset: int | None = None
        self._first_line_number: int | None = None
        self._file: Any = None

    def _what(self, start: int | None = None) -> str:
        return f"reading {self.frange.uri}" + (f" at byte {start}" if start is not None else "")

    def _read_at(self, pos: int, n: int) -> bytes:
        f = self._file
        return msfs.call(self.fs, lambda: f.read_at(n, pos), self._what(pos))

    def chunks(self) -> Iterator[LineChunk]:
        """Yield the owned lines in chunks of complete lines."""
        fr = self.frange
        end = fr.end if fr.end is not None else sys.maxsize
        stream: _ResumableStream | None = None
        size: int | None
        if fr.compression is not None:
            stream = _ResumableStream(self.fs, fr.path, fr.compression, self._what())
            size = None
        else:
            self._file = msfs.open_input_file(self.fs, fr.path)
            size = self._file.size()
            end = min(end, size)

        def read(pos: int, n: int) -> bytes:
            if stream is not None:
                return stream.read(n)
            if size is not None and pos >= size:
                return b""
            return self._read_at(pos, n)

        try:
            yield from self._chunks(read, end, size)
        finally:
            if stream is not None:
                stream.close()

    def _chunks(self, read: Any, end: int, size: int | None) -> Iterator[LineChunk]:
        fr = self.frange
        pos = fr.start
        if pos > 0:
            pos -= 1  # the byte before the range: a newline there means a line starts at start
            while True:
                data = read(pos, min(self.block_size, 1 << 16))
                if not data:
                    return
                k = data.find(b"\n")
                if k >= 0:
                    pos += k + 1
                    break
                pos += len(data)
            if pos >= end:
                return
        self._first_offset = pos
        header_pending = self.skip_header and fr.start == 0
        bom_pending = self.strip_bom and fr.start == 0
        carry = b""
        buf_off = pos
        line_rel = 0
        while True:
            data = read(pos, self.block_size)
            pos += len(data)
            eof = not data or (size is not None and pos >= size)
            buf = carry + data if carry else data
            carry = b""
            if bom_pending and (len(buf) >= 3 or eof):
                bom_pending = False
                if buf.startswith(_UTF8_BOM):
                    buf = buf[3:]
                    buf_off += 3
                    self._first_offset = buf_off
            if header_pending:
                k = buf.find(b"\n")
                if k == -1 and not eof:
                    carry = buf
                    continue
                header_pending = False
                if k == -1:
                    return
                buf = buf[k + 1:]
                buf_off += k + 1
                line_rel = 1
                if buf_off >= end:
                    return
            search_from = end - 1 - buf_off
            if search_from < len(buf):
                k = buf.find(b"\n", max(0, search_from))
                if k >= 0:
                    yield LineChunk(buf[:k + 1], buf_off, line_rel)
                    return
            if eof:
                if buf:
                    yield LineChunk(buf if buf.endswith(b"\n") else buf + b"\n", buf_off, line_rel)
                return
            last = buf.rfind(b"\n")
            if last >= 0:
                yield LineChunk(buf[:last + 1], buf_off, line_rel)
                line_rel += buf.count(b"\n", 0, last + 1)
                carry = buf[last + 1:]
                buf_off += last + 1
            else:
                carry = buf
                if len(carry) > MAX_LINE_BYTES:
                    raise BadRecordError(
                        f"line longer than {MAX_LINE_BYTES} bytes in {fr.uri} starting at byte "
                        f"offset {buf_off}; is this a line-oriented file?",
                        path=fr.uri, offset=buf_off)

    def line_number(self, chunk: LineChunk, index_in_chunk: int) -> int:
        """1-based line number within the file of line ``index_in_chunk`` of ``chunk``.

        For a range not starting at byte 0 this counts the newlines before the range
        (once; only error paths call this).
        """
        if self._first_line_number is None:
            if self.frange.start == 0 or not self._first_offset:
                self._first_line_number = 1
            else:
                count, pos = 0, 0
                if self._file is None:
                    self._file = msfs.open_input_file(self.fs, self.frange.path)
                while pos < self._first_offset:
                    block = self._read_at(pos, min(8 << 20, self._first_offset - pos))
                    if not block:
                        break
                    count += block.count(b"\n")
                    pos += len(block)
                self._first_line_number = count + 1
        return self._first_line_number + chunk.first_line + index_in_chunk


# ----------------------------------------------------------------------------------------
# Vectorized line splitting
# ----------------------------------------------------------------------------------------

def line_bounds(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive, terminator stripped) of each line of a chunk.

    ``data`` must end with '\\n'. A '\\r' right before a '\\n' is part of the terminator.
    """
    arr = np.frombuffer(data, dtype=np.uint8)
    newlines = np.flatnonzero(arr == 10)
    starts = np.empty(len(newlines), dtype=np.int64)
    if len(newlines):
        starts[0] = 0
        starts[1:] = newlines[:-1] + 1
    ends = newlines.astype(np.int64)
    if data.find(b"\r") != -1 and len(newlines):
        cr = (ends > starts) & (arr[np.maximum(ends - 1, 0)] == 13)
        ends = ends - cr
    return starts, ends


def count_nonempty_lines(data: bytes, lo: int = 0, hi: int | None = None) -> int:
    """Number of lines of ``data[lo:hi]`` that are not empty (ignoring terminators)."""
    piece = data[lo:hi] if (lo or hi is not None) else data
    if not piece:
        return 0
    if not piece.endswith(b"\n"):
        piece += b"\n"
    starts, ends = line_bounds(piece)
    return int(np.count_nonzero(ends > starts))


def split_lines(data: bytes) -> tuple[pa.Array, np.ndarray]:
    """Split a chunk into a binary array of lines (terminators removed) and line starts."""
    starts, ends = line_bounds(data)
    n = len(starts)
    if data.find(b"\r") != -1:
        payload = data.replace(b"\r\n", b"\n").replace(b"\n", b"")
    else:
        payload = data.replace(b"\n", b"")
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(ends - starts, out=offsets[1:])
    array = pa.Array.from_buffers(pa.binary(), n,
                                  [None, pa.py_buffer(offsets), pa.py_buffer(payload)])
    return array, starts


def _check_encoding(encoding: str) -> str:
    try:
        name = codecs.lookup(encoding).name
    except LookupError as exc:
        raise PlanError(f"unknown encoding {encoding!r}") from exc
    if "\n".encode(name) != b"\n" or "\r".encode(name) != b"\r":
        raise PlanError(f"encoding {encoding!r} is not ASCII-compatible; only encodings where "
                        f"a newline is the byte 0x0A are supported (convert the file to UTF-8)")
    return name


# ----------------------------------------------------------------------------------------
# Pushdown helpers shared by the file sources
# ----------------------------------------------------------------------------------------

def arrow_expression(predicate: Any) -> pc.Expression | None:
    """A ``pyarrow.compute.Expression`` for a predicate (an Expr or an Expression), or None."""
    if predicate is None:
        return None
    if isinstance(predicate, pc.Expression):
        return predicate
    to_arrow = getattr(predicate, "to_arrow", None)
    return to_arrow() if to_arrow is not None else None


def predicate_columns(predicate: Any) -> set[str] | None:
    """The columns a predicate reads, or None when unknown."""
    columns = getattr(predicate, "columns", None)
    if callable(columns):
        return set(columns())
    return None


def check_columns(columns: Sequence[str] | None, schema: pa.Schema, what: str) -> None:
    """Raise SchemaError when a requested column is not in ``schema``."""
    if columns is None:
        return
    missing = [c for c in columns if schema.get_field_index(c) == -1]
    if missing:
        raise SchemaError(f"{what}: no column(s) {missing}; available: {schema.names}")


def format_size(n: int) -> str:
    """Human-readable byte size."""
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def infer_partition_type(values: Sequence[str | None]) -> pa.DataType:
    """int32 (or int64) when every value is an integer, else string (like pyarrow's discovery)."""
    present = [v for v in values if v is not None]
    if not present:
        return pa.string()
    try:
        ints = [int(v) for v in present]
    except ValueError:
        return pa.string()
    if any(not v.strip().lstrip("-").isdigit() for v in present):
        return pa.string()
    return pa.int32() if all(-(2 ** 31) <= i < 2 ** 31 for i in ints) else pa.int64()


class LineFileSource(Source):
    """Base of the line-oriented file sources (text, CSV, JSON lines): planning, pushdown.

    Files under ``key=value`` directories of the given directory get those keys as
    columns (hive partitioning, as Spark does), unless ``partitioning=None``.
    """

    name = "lines"

    def __init__(self, uri: str | Sequence[str], *, split_size: int | None = None,
                 block_size: int | None = None, partitioning: str | None = "hive",
                 storage_options: dict[str, Any] | None = None):
        if partitioning not in ("hive", None):
            raise PlanError(f"partitioning must be 'hive' or None, got {partitioning!r}")
        self.uri = uri
        self.split_size = split_size
        self.block_size = int(block_size or DEFAULT_BLOCK_SIZE)
        self.partitioning = partitioning
        self.storage_options = dict(storage_options or {})
        self.columns: list[str] | None = None
        self.predicate: Expr | None = None
        self._files: list[msfs.FileEntry] | None = None
        self._partitions: tuple[pa.Schema, dict[str, tuple[Any, ...]]] | None = None

    # -- subclasses -----------------------------------------------------------------------

    def data_schema(self) -> pa.Schema:
        """The schema of what the files hold (without partition columns)."""
        raise NotImplementedError

    def _splittable(self) -> bool:
        return True

    def _read_range(self, frange: FileRange, info: LineSplitInfo, ctx: TaskContext,
                    needed: list[str] | None, handler: Any) -> Iterator[pa.Table]:
        raise NotImplementedError

    def _handler(self, ctx: TaskContext) -> Any:
        return None

    def _split_extra(self) -> tuple[tuple[str, Any], ...]:
        """Planning facts the workers need (attribute name, value); see ``read_split``."""
        return ()

    # -- schema ---------------------------------------------------------------------------

    def partition_info(self) -> tuple[pa.Schema, dict[str, tuple[Any, ...]]]:
        """Hive partition columns and each file's values (empty when not partitioned)."""
        if self._partitions is None:
            schema, values = pa.schema([]), {}
            files = self.files()
            base = (msfs.hive_base(self.uri, **self.storage_options)
                    if self.partitioning == "hive" and files else None)
            if base is not None:
                pairs = {f.path: msfs.hive_values(base, f.path) for f in files}
                key_sets = {tuple(k for k, _ in kv) for kv in pairs.values()}
                if len(key_sets) == 1 and (keys := next(iter(key_sets))):
                    raw = {p: [v for _, v in kv] for p, kv in pairs.items()}
                    types = [infer_partition_type([vals[i] for vals in raw.values()])
                             for i in range(len(keys))]
                    schema = pa.schema(list(zip(keys, types)))
                    values = {p: tuple(None if v is None else (int(v) if pa.types.is_integer(t)
                                                               else v)
                                       for v, t in zip(vals, types))
                              for p, vals in raw.items()}
            self._partitions = (schema, values)
        return self._partitions

    def full_schema(self) -> pa.Schema:
        """The data columns followed by the hive partition columns."""
        data = self.data_schema()
        part, _ = self.partition_info()
        extra = [f for f in part if data.get_field_index(f.name) == -1]
        return pa.schema(list(data) + extra) if extra else data

    def schema(self) -> pa.Schema:
        """The schema of the rows read (after projection)."""
        full = self.full_schema()
        if self.columns is None:
            return full
        check_columns(self.columns, full, f"{self.name} {self.uri}")
        return pa.schema([full.field(c) for c in self.columns])

    # -- Source ---------------------------------------------------------------------------

    def files(self) -> list[msfs.FileEntry]:
        """The data files of this source (listed once, then cached)."""
        if self._files is None:
            self._files = msfs.expand_all(self.uri, **self.storage_options)
        return self._files

    def plan_splits(self, target_splits: int) -> list[Split]:
        """Byte-range splits of about total size / target (small files packed together)."""
        full = self.full_schema()
        if self.columns is not None:
            check_columns(self.columns, full, f"{self.name} {self.uri}")
        part_schema, values = self.partition_info()
        groups = plan_file_ranges(self.files(), target_splits, self.split_size,
                                  self._splittable(), values)
        data_schema = self.data_schema()
        return splits_from_ranges(groups, data_schema, part_schema, self._split_extra())

    def _needed_columns(self) -> list[str] | None:
        if self.columns is None:
            return None
        needed = list(self.columns)
        extra = predicate_columns(self.predicate) if self.predicate is not None else None
        if self.predicate is not None and extra is None:
            return None
        for c in sorted(extra or ()):
            if c not in needed:
                needed.append(c)
        return needed

    def read_split(self, split: Split, ctx: TaskContext) -> Iterator[pa.RecordBatch]:
        """Stream the rows of one split in batches of at most ``ctx.batch_size`` rows."""
        info: LineSplitInfo = split.info
        for attribute, value in info.extra:  # the driver's planning facts (if not pickled)
            setattr(self, attribute, value)
        needed = self._needed_columns()
        part_fields = [f for f in (info.partition_schema or pa.schema([]))
                       if info.schema is None or info.schema.get_field_index(f.name) == -1]
        part_names = {f.name for f in part_fields}
        data_needed = None if needed is None else [c for c in needed if c not in part_names]
        if part_fields and needed is not None:
            part_fields = [f for f in part_fields if f.name in needed]
        expr = arrow_expression(self.predicate)
        handler = self._handler(ctx)
        try:
            for frange in info.ranges:
                all_values = dict(zip((f.name for f in info.partition_schema or ()),
                                      frange.partition))
                for table in self._read_range(frange, info, ctx, data_needed, handler):
                    for f in part_fields:
                        table = table.append_column(
                            f, pa.repeat(pa.scalar(all_values.get(f.name), f.type),
                                         table.num_rows))
                    if expr is not None:
                        table = table.filter(expr)
                    if self.columns is not None:
                        table = table.select(self.columns)
                    if table.num_rows:
                        yield from table.to_batches(max_chunksize=max(1, ctx.batch_size))
        finally:
            if handler is not None:
                handler.close()

    def with_pushdown(self, columns: list[str] | None, predicate: Expr | None
                      ) -> tuple[Source, bool, bool]:
        """Accept a projection, and a predicate that has an Arrow form (applied after parsing)."""
        full = self.full_schema()
        check_columns(columns, full, f"{self.name} {self.uri}")
        new = copy.copy(self)
        if columns is not None:
            new.columns = list(columns)
        applied = False
        if predicate is not None and arrow_expression(predicate) is not None:
            cols = predicate_columns(predicate)
            if cols is not None:
                check_columns(sorted(cols), full, f"{self.name} {self.uri}")
            new.predicate = predicate if self.predicate is None else _and(self.predicate,
                                                                         predicate)
            applied = True
        return new, columns is not None, applied

    def estimated_size_bytes(self) -> int | None:
        """The total size of the files (compressed sizes for compressed files)."""
        return sum(f.size for f in self.files())

    def describe(self) -> str:
        """e.g. ``text /data/logs (12 files, 1.2 GB) columns=[text]``."""
        uri = self.uri if isinstance(self.uri, str) else ", ".join(self.uri)
        try:
            files = self.files()
            size = format_size(sum(f.size for f in files))
            text = f"{self.name} {uri} ({len(files)} files, {size})"
        except (OSError, PlanError):
            text = f"{self.name} {uri}"
        if self.columns is not None:
            text += f" columns=[{','.join(self.columns)}]"
        expr = arrow_expression(self.predicate)
        if expr is not None:
            text += f" filter={expr}"
        return text


class _AndPredicate:
    """Conjunction of two pushed predicates (only their Arrow forms are used here)."""

    def __init__(self, a: Any, b: Any):
        self.a, self.b = a, b

    def columns(self) -> set[str]:
        return (predicate_columns(self.a) or set()) | (predicate_columns(self.b) or set())

    def to_arrow(self) -> pc.Expression | None:
        ea, eb = arrow_expression(self.a), arrow_expression(self.b)
        return None if ea is None or eb is None else ea & eb


def _and(a: Any, b: Any) -> Any:
    return _AndPredicate(a, b)


# ----------------------------------------------------------------------------------------
# The text source
# ----------------------------------------------------------------------------------------

class TextSource(LineFileSource):
    """Lines of text files: column ``text`` (and ``path``, ``offset`` with ``with_offsets``)."""

    name = "text"

    def __init__(self, uri: str | Sequence[str], encoding: str = "utf-8",
                 split_size: int | None = None, *, with_offsets: bool = False,
                 encoding_errors: str = "strict", block_size: int | None = None,
                 partitioning: str | None = "hive",
                 storage_options: dict[str, Any] | None = None):
        super().__init__(uri, split_size=split_size, block_size=block_size,
                         partitioning=partitioning, storage_options=storage_options)
        self.encoding = _check_encoding(encoding)
        if encoding_errors not in ("strict", "replace"):
            raise PlanError(f"encoding_errors must be 'strict' or 'replace', "
                            f"got {encoding_errors!r}")
        self.encoding_errors = encoding_errors
        self.with_offsets = with_offsets

    def data_schema(self) -> pa.Schema:
        """``text: string`` plus ``path: string, offset: int64`` with offsets."""
        fields = [pa.field("text", pa.string())]
        if self.with_offsets:
            fields += [pa.field("path", pa.string()), pa.field("offset", pa.int64())]
        return pa.schema(fields)

    def _decode(self, reader: LineReader, chunk: LineChunk) -> tuple[pa.Array, np.ndarray]:
        data = chunk.data
        if self.encoding == "utf-8" and self.encoding_errors == "strict":
            lines, starts = split_lines(data)
            try:
                return lines.cast(pa.string()), starts
            except pa.ArrowInvalid:
                self._raise_bad_encoding(reader, chunk)
        try:
            utf8 = data.decode(self.encoding, errors=self.encoding_errors).encode("utf-8")
        except UnicodeDecodeError:
            self._raise_bad_encoding(reader, chunk)
        lines, _ = split_lines(utf8)
        starts, _ = line_bounds(data)
        return lines.cast(pa.string()), starts

    def _raise_bad_encoding(self, reader: LineReader, chunk: LineChunk) -> None:
        pos = 0
        for i, line in enumerate(chunk.data.split(b"\n")):
            try:
                line.decode(self.encoding)
            except UnicodeDecodeError as exc:
                uri = reader.frange.uri
                number = reader.line_number(chunk, i)
                offset = chunk.offset + pos
                raise BadRecordError(
                    f"cannot decode line {number} of {uri} (byte offset {offset}) as "
                    f"{self.encoding}: {exc.reason} at byte {exc.start} of the line; pass "
                    f"encoding=... or encoding_errors=\"replace\"",
                    path=uri, line=number, offset=offset,
                    record=line.decode(self.encoding, errors="replace")) from None
            pos += len(line) + 1
        raise BadRecordError(f"cannot decode {reader.frange.uri} as {self.encoding}",
                             path=reader.frange.uri, offset=chunk.offset)

    def _read_range(self, frange: FileRange, info: LineSplitInfo, ctx: TaskContext,
                    needed: list[str] | None, handler: Any) -> Iterator[pa.Table]:
        # blocks shrink with the task's memory budget: downstream operators (split, explode)
        # multiply a block's size several times
        block = min(self.block_size, max(256 << 10, ctx.memory_budget // 32))
        reader = LineReader(frange, self.storage_options, block)
        want_offsets = self.with_offsets and (needed is None or "path" in needed
                                              or "offset" in needed)
        for chunk in reader.chunks():
            lines, starts = self._decode(reader, chunk)
            n = len(lines)
            if not n:
                continue
            columns: dict[str, pa.Array] = {"text": lines}
            if self.with_offsets:
                if want_offsets:
                    path = pa.repeat(pa.scalar(frange.uri, pa.string()), n)
                    offsets = pa.array(starts + chunk.offset, pa.int64())
                else:
                    path = pa.nulls(n, pa.string())
                    offsets = pa.nulls(n, pa.int64())
                columns["path"] = path
                columns["offset"] = offsets
            yield pa.table(columns)
