"""The base of the line-oriented file sources (text, CSV, JSON lines): files listed by
URI, hive partition columns, byte-range splits, projection and predicate pushdown."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from millstream.core.context import TaskContext
from millstream.errors import PlanError
from millstream.io import fs as msfs
from millstream.io.base import Source, Split
from millstream.io.files.dead_letters import DeadLetter, StagedDeadLetters
from millstream.io.files.formats import list_files
from millstream.io.files.lines import DEFAULT_BLOCK_SIZE
from millstream.io.files.pushdown import arrow_expression, check_columns, predicate_columns
from millstream.io.files.ranges import (
    FileRange,
    LineSplitInfo,
    format_size,
    plan_file_ranges,
    splits_from_ranges,
)

if TYPE_CHECKING:
    from millstream.expr.nodes import Expr


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
        #: Where dead letters go instead of a file per task attempt (a streaming reader's
        #: staged output, see ``with_staged_dead_letters``).
        self.dead_letters: Any = None
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

    def with_staged_dead_letters(self, ctx: TaskContext, skip: int = 0
                                 ) -> tuple[Source, Any] | None:
        """A copy writing its dead letters to a per-epoch staged output (streaming)."""
        policy = getattr(self, "on_bad_records", None)
        if not isinstance(policy, DeadLetter):
            return None
        output = StagedDeadLetters(policy, ctx, self.storage_options, skip=skip)
        new = copy.copy(self)
        new.dead_letters = output
        return new, output

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
            self._files = list_files(self.uri, self.name, self.storage_options)
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

