"""Planning reads of line-oriented files: byte ranges, split sizes, small files packed.

A large uncompressed file is cut into byte ranges that many tasks read in parallel.
Lines are assigned to ranges by where they start: a range ``[start, end)`` owns every
line whose first byte lies in it (see :mod:`millstream.io.files.lines` for how a reader
finds them). Compressed files (``.gz``, ``.bz2``, ``.zst``, ``.lz4``) are not
splittable and are read whole by one task.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from millstream.errors import PlanError
from millstream.io import fs as msfs
from millstream.io.base import Split

#: Smallest split planned automatically (a split_size argument overrides it).
DEFAULT_MIN_SPLIT_SIZE = 8 << 20
#: Cost, in bytes, charged per file when packing small files into one split.
FILE_OPEN_COST = 256 << 10
#: Hadoop's slop: the last split of a file may be up to 10% larger than the split size.
SPLIT_SLOP = 1.1

COMPRESSION_BY_EXTENSION = {
    ".gz": "gzip", ".gzip": "gzip", ".bz2": "bz2", ".zst": "zstd", ".zstd": "zstd",
    ".lz4": "lz4", ".br": "brotli",
}


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


def format_size(n: int) -> str:
    """Human-readable byte size."""
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover

