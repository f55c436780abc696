"""Parquet files and directories: row-group splits, projection and predicate pushdown.

Planning (driver) lists the files, reads their footers (in parallel threads), prunes
hive partitions and row groups whose statistics cannot match the filter, and packs the
remaining row groups into splits of about total size / target. Reading (worker) reads
just the listed row groups of each file, only the projected columns, applying the filter
exactly: directly, the filter's columns first (:mod:`millstream.io.files.parquet_read`),
or with ``pyarrow.dataset`` where that cannot (hive partition columns, drifting schemas,
remote files). Filters on ``string_view`` columns are applied to the rows read (as plain
strings) but cannot prune row groups.

Files and schemas, checked at planning, where the footers show them:

* a directory or glob that holds files of another format (``a.csv``) is refused, naming
  them (see :mod:`millstream.io.files.formats`); a file that is not Parquet or is
  truncated is a :class:`~millstream.errors.StorageError` naming it;
* the dataset's schema is the first file's (plus hive partition columns). Every file
  must have the columns read, with the same types (or narrower ones that widen without
  loss, int32 into int64); a column only in some files, or a type that differs, is a
  :class:`~millstream.errors.SchemaError` naming the files and the column;
* ``union_by_name=True`` (DuckDB's option) reads drifting schemas instead: columns are
  matched by name over every file's footer, a column missing from a file is null there,
  types are widened to a common one (int64 and double give double); a type conflict
  that cannot be widened (int64 and string) is a SchemaError naming the files;
* ``schema=`` fixes the schema: files missing one of its columns give nulls, other
  columns are ignored, and types must convert.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from millstream.core.arrow import without_view_types
from millstream.core.context import TaskContext
from millstream.errors import PlanError, SchemaError, StorageError
from millstream.expr.filter_mask import filter_mask
from millstream.expr.nodes import Expr
from millstream.io import fs as msfs
from millstream.io.base import Source, SourceStatistics, Split
from millstream.io.files.formats import list_files
from millstream.io.files.parquet_agg import (
    aggregate_batch_rows,
    dictionary_candidates,
    dictionary_format,
    small_dictionary_columns,
)
from millstream.io.files.parquet_read import (
    DirectPlan,
    direct_plan,
    piece_reader,
    resumable,
    scan_errors,
)
from millstream.io.files.parquet_stats import footer_statistics
from millstream.io.files.pushdown import (
    arrow_expression,
    check_columns,
    predicate_columns,
    split_for_views,
)
from millstream.io.files.ranges import DEFAULT_MIN_SPLIT_SIZE, format_size
from millstream.io.files.union import converts, in_threads, unify_by_name

#: Footers read in parallel while planning (object stores are latency bound).
PLANNING_THREADS = 16


@dataclass(frozen=True)
class RowGroupPiece:
    """Some row groups of one file (``row_groups`` None: the whole file)."""

    path: str
    row_groups: tuple[int, ...] | None
    partition_expression: pc.Expression | None
    size_bytes: int
    num_rows: int
    #: columns these row groups store as small dictionaries (read as such when asked)
    dictionary: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ParquetSplitInfo:
    """What a parquet split reads, with the dataset schema every task must produce."""

    fs_uri: str
    pieces: tuple[RowGroupPiece, ...]
    schema: pa.Schema
    #: string columns read as Arrow dictionaries (a group-by's keys: see for_aggregation)
    dictionary_columns: tuple[str, ...] = ()


class ParquetSource(Source):
    """Parquet files, a directory of them (with hive partitions), or a glob."""

    name = "parquet"
    rereads_cheaply = True

    def __init__(self, uri: str | Sequence[str], columns: Sequence[str] | None = None,
                 filter: Any = None, *, partitioning: str | pa.Schema | None = "hive",
                 schema: pa.Schema | None = None, union_by_name: bool = False,
                 split_size: int | None = None,
                 storage_options: dict[str, Any] | None = None):
        self.uri = uri
        self.union_by_name = bool(union_by_name)
        self.columns: list[str] | None = list(columns) if columns is not None else None
        self.predicate: Any = None
        self._post_filters: list[Any] = []
        self.partitioning = partitioning
        self.user_schema = schema
        self.split_size = split_size
        self.storage_options = dict(storage_options or {})
        #: the constructor's filter with an Arrow form (an Expr, typed against the files'
        #: schema when the scan is planned, or an Arrow expression)
        self._filter: Any = None
        if filter is not None:
            expr = arrow_expression(filter)
            if expr is not None:
                self._filter = filter
            elif hasattr(filter, "evaluate"):
                self._post_filters.append(filter)
            else:
                raise PlanError(f"parquet filter must be an expression, got {filter!r}")
        self._files: list[msfs.FileEntry] | None = None
        self._dataset: ds.Dataset | None = None
        #: columns stored as string_view/binary_view: Arrow (26) cannot compare their
        #: statistics or values with a plain string, so filters on them are not pushed
        self._view_columns: frozenset[str] = frozenset()
        #: filters pushed in as expressions (the statistics do not reflect them yet)
        self._pushed: tuple[Any, ...] = ()
        #: pushed conjuncts on view-typed columns: applied to the rows read (as plain
        #: strings), never to the statistics
        self._exact: tuple[Any, ...] = ()
        #: statistics read from the footers, shared by the copies pushdown makes
        self._stats_box: dict[str, SourceStatistics | None] = {}
        # (files kept, row groups kept, row groups in kept files), known after planning
        self._plan_stats: tuple[int, int, int] | None = None
        self._dictionary_keys: tuple[str, ...] = ()  # read for a group-by: see for_aggregation
        self._for_aggregation = False

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_dataset"] = None  # rebuilt on demand; splits carry what workers need
        return state

    # -- metadata -------------------------------------------------------------------------

    def files(self) -> list[msfs.FileEntry]:
        """The parquet files (listed once; empty files are left out)."""
        if self._files is None:
            self._files = [f for f in list_files(self.uri, "parquet", self.storage_options)
                           if f.size > 0]
        return self._files

    def _fs_uri(self) -> str:
        return self.uri if isinstance(self.uri, str) else next(iter(self.uri))

    def _fs(self) -> Any:
        return msfs.resolve(self._fs_uri(), **self.storage_options)[0]

    def dataset(self) -> ds.Dataset:
        """The ``pyarrow.dataset`` over the listed files (built once, driver side)."""
        if self._dataset is None:
            files = self.files()
            if not files and self.user_schema is None:
                raise PlanError(f"parquet {self.uri}: no data files, so no schema is known; "
                                f"pass schema=...")
            partitioning: Any = None
            base = None
            if self.partitioning is not None:
                base = msfs.hive_base(self.uri, **self.storage_options)
                if base is not None:
                    if isinstance(self.partitioning, pa.Schema):
                        partitioning = ds.partitioning(self.partitioning, flavor="hive")
                    elif self.partitioning == "hive":
                        partitioning = ds.HivePartitioning.discover(infer_dictionary=False)
                    else:
                        raise PlanError(f"partitioning must be 'hive', a schema or None, "
                                        f"got {self.partitioning!r}")
            fs = self._fs()
            kwargs: dict[str, Any] = {}
            if partitioning is not None:
                kwargs.update(partitioning=partitioning, partition_base_dir=base)
            paths = [f.path for f in files]

            def build(schema: pa.Schema | None) -> ds.Dataset:
                try:
                    return msfs.call(
                        fs, lambda: ds.dataset(paths, schema=schema, format="parquet",
                                               filesystem=fs, **kwargs),
                        f"reading parquet metadata of {self.uri}")
                except (pa.ArrowInvalid, OSError) as exc:
                    if isinstance(exc, StorageError):
                        raise
                    raise self._unreadable(fs, files, exc) from exc

            dataset = build(self.user_schema)
            if self.union_by_name and self.user_schema is None and len(files) > 1:
                unified = self._unified_schema(fs, files)
                parts = _partition_names(dataset)
                extra = [f for f in dataset.schema
                         if f.name in parts and unified.get_field_index(f.name) == -1]
                dataset = build(pa.schema(list(unified) + extra))
            plain = without_view_types(dataset.schema) if self.user_schema is None else None
            if plain is not None:  # string_view columns are read as string
                self._view_columns = frozenset(
                    f.name for f, g in zip(dataset.schema, plain) if f.type != g.type)
                dataset = build(plain)
            self._dataset = dataset
        return self._dataset

    # -- file and schema checks -----------------------------------------------------------

    def _unreadable(self, fs: Any, files: list[msfs.FileEntry], exc: BaseException
                    ) -> StorageError:
        """The error for a file pyarrow could not open as Parquet, naming it."""
        match = re.search(r"from '([^']+)'", str(exc))
        bad = next((f for f in files if match and f.path == match.group(1)), None)
        if bad is None:  # find it
            for f in files:
                try:
                    msfs.call(fs, lambda f=f: pq.read_schema(f.path, filesystem=fs),
                              f"reading the footer of {f.uri}")
                except (pa.ArrowInvalid, OSError):
                    bad = f
                    break
        return _not_parquet(bad.uri if bad else str(self.uri), bad.size if bad else None, exc)

    def _unified_schema(self, fs: Any, files: list[msfs.FileEntry]) -> pa.Schema:
        """``union_by_name``: every file's columns by name, types widened."""
        def footer(f: msfs.FileEntry) -> pa.Schema:
            try:
                return msfs.call(fs, lambda: pq.read_schema(f.path, filesystem=fs),
                                 f"reading the footer of {f.uri}")
            except (pa.ArrowInvalid, OSError) as exc:
                if isinstance(exc, StorageError):
                    raise
                raise _not_parquet(f.uri, f.size, exc) from exc

        schemas = in_threads(footer, files)
        return unify_by_name(f"parquet {self.uri}",
                             [(f.uri, sc.remove_metadata()) for f, sc in zip(files, schemas)])

    def _check_file_schemas(self, schema: pa.Schema, physical: dict[str, pa.Schema],
                            files: list[msfs.FileEntry]) -> None:
        """Every file has the columns read, in types that convert (see module doc)."""
        part_names = _partition_names(self.dataset())
        if self.columns is None:
            names = [n for n in schema.names if n not in part_names]
        else:
            names = [c for c in self.columns if c not in part_names]
            for expr in (self.predicate, *self._post_filters, *self._exact):
                names += sorted((predicate_columns(expr) or set()) - set(names) - part_names)
            if self._filter is not None:
                names += sorted(c for c in schema.names if c not in names and
                                c not in part_names and re.search(rf"\b{re.escape(c)}\b",
                                                                  str(self._filter)))
        uri_of = {f.path: f.uri for f in files}
        lenient = self.user_schema is not None or self.union_by_name
        problems: list[str] = []
        first = files[0].uri if files else "the first file"
        for path, file_schema in physical.items():
            where = uri_of.get(path, path)
            for name in names:
                i = file_schema.get_field_index(name)
                if i == -1:
                    if not lenient and schema.get_field_index(name) != -1:
                        problems.append(f"column {name!r} is missing from {where}")
                    continue
                want = schema.field(name).type
                got = file_schema.field(i).type
                if got != want and not converts(got, want):
                    problems.append(f"column {name!r} is {got} in {where} but {want} in "
                                    f"{'the schema given' if self.user_schema is not None else 'the dataset'}")
            if self.columns is None and not lenient:
                extra = [n for n in file_schema.names if schema.get_field_index(n) == -1]
                problems += [f"column {n!r} of {where} is not in {first}" for n in extra]
        if problems:
            shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more"
                                              if len(problems) > 6 else "")
            advice = ("pass schema=... with types every file converts to"
                      if lenient else
                      f"The dataset's schema is that of {first}. Pass union_by_name=True to "
                      f"read the files by column name (missing columns as nulls, types "
                      f"widened), or schema=...")
            raise SchemaError(f"parquet {self.uri}: the files' schemas differ: {shown}. "
                              f"{advice}")

    def full_schema(self) -> pa.Schema:
        """Columns of the files plus hive partition columns."""
        return self.dataset().schema

    def schema(self) -> pa.Schema:
        """The schema of the rows read (after projection)."""
        full = self.full_schema()
        if self.columns is None:
            return full
        check_columns(self.columns, full, f"parquet {self.uri}")
        return pa.schema([full.field(c) for c in self.columns])

    def arrow_filter(self, schema: pa.Schema | None = None) -> pc.Expression | None:
        """The filter applied by the scan (constructor filter AND pushed predicate), with
        literals typed against ``schema`` (the files' columns) when given."""
        pushed = arrow_expression(self.predicate)
        own = self._own_filter(schema)
        if own is None:
            return pushed  # (a constructor filter without a typed Arrow form: post-filter)
        return own if pushed is None else (own & pushed)

    def _row_filters(self, schema: pa.Schema) -> list[Any]:
        """The filters applied to scanned batches: those without an Arrow form."""
        if self._filter is not None and self._own_filter(schema) is None:
            return [*self._post_filters, self._filter, *self._exact]
        return [*self._post_filters, *self._exact]

    def _own_filter(self, schema: pa.Schema | None) -> pc.Expression | None:
        """The constructor filter as an Arrow expression, or None when it has none or
        reads a view-typed column (then it filters the scanned batches)."""
        own = arrow_expression(self._filter, schema)
        if own is not None and self._view_columns and hasattr(self._filter, "columns") \
                and self._view_columns & self._filter.columns():
            return None
        return own

    # -- planning -------------------------------------------------------------------------

    def plan_splits(self, target_splits: int) -> list[Split]:
        """Row-group splits, after partition and statistics pruning."""
        dataset = self.dataset()
        schema = dataset.schema
        if self.columns is not None:
            check_columns(self.columns, schema, f"parquet {self.uri}")
        expr = self.arrow_filter(schema)
        fs = self._fs()
        sizes = {f.path: f.size for f in self.files()}
        fragments = list(dataset.get_fragments(filter=expr) if expr is not None
                         else dataset.get_fragments())

        def inspect(fragment: Any) -> tuple[list[RowGroupPiece], int, pa.Schema]:
            def load() -> tuple[list[RowGroupPiece], int, pa.Schema]:
                fragment.ensure_complete_metadata()
                groups = fragment.row_groups
                total_bytes = sum(g.total_byte_size for g in groups) or 1
                file_size = sizes.get(fragment.path, total_bytes)
                keep = groups
                if expr is not None:
                    try:
                        keep = fragment.subset(filter=expr, schema=schema).row_groups
                    except (pa.ArrowInvalid, pa.ArrowNotImplementedError,
                            pa.ArrowTypeError) as exc:
                        raise SchemaError(f"parquet {self.uri}: cannot apply the filter {expr} "
                                          f"to the row groups' statistics: {exc}") from exc
                small = small_dictionary_columns(fragment.metadata, [g.id for g in keep],
                                                 self._dictionary_keys)
                pieces = [RowGroupPiece(fragment.path, (g.id,), fragment.partition_expression,
                                        max(1, file_size * g.total_byte_size // total_bytes),
                                        g.num_rows, small) for g in keep]
                return pieces, len(groups), fragment.physical_schema
            try:
                return msfs.call(fs, load, f"reading the footer of {fragment.path}")
            except (pa.ArrowInvalid, OSError) as exc:
                if isinstance(exc, StorageError):
                    raise
                where = msfs.describe_path(fs, fragment.path)
                raise _not_parquet(where, sizes.get(fragment.path), exc) from exc

        with ThreadPoolExecutor(max_workers=min(PLANNING_THREADS, max(1, len(fragments)))) as ex:
            inspected = list(ex.map(inspect, fragments))
        self._check_file_schemas(schema, {f.path: s for f, (_, _, s) in
                                          zip(fragments, inspected)}, self.files())
        pieces = [p for ps, _, _ in inspected for p in ps]
        total_groups = sum(n for _, n, _ in inspected)
        self._plan_stats = (len(fragments), len(pieces), total_groups)
        total = sum(p.size_bytes for p in pieces)
        if self.split_size is not None:
            size = int(self.split_size)
        else:
            size = max(DEFAULT_MIN_SPLIT_SIZE, math.ceil(total / max(1, target_splits)))
        fs_uri = self._fs_uri()
        splits: list[Split] = []
        group: list[RowGroupPiece] = []
        group_bytes = 0

        def flush() -> None:
            nonlocal group, group_bytes
            if not group:
                return
            merged = _merge_pieces(group)
            paths = sorted({p.path for p in merged})
            desc = (f"{msfs.describe_path(fs, paths[0])} row groups "
                    f"{','.join(str(i) for i in merged[0].row_groups or ())}"
                    if len(paths) == 1 else f"{len(paths)} files, {len(group)} row groups")
            as_dict = tuple(c for c in self._dictionary_keys
                            if all(c in p.dictionary for p in merged))
            splits.append(Split(len(splits), ParquetSplitInfo(fs_uri, tuple(merged), schema,
                                                              as_dict),
                                group_bytes, desc))
            group, group_bytes = [], 0

        if self.split_size is not None:
            for piece in pieces:
                if group and group_bytes + piece.size_bytes > size:
                    flush()
                group.append(piece)
                group_bytes += piece.size_bytes
        else:
            # as many splits as asked (and worth it), cut where the running size crosses
            # equal shares: filling splits up to a size instead leaves a last, lone task
            # (10 equal row groups for 4 splits made 5 splits, 3 waves on 2 workers)
            n = max(1, min(target_splits, len(pieces), math.ceil(total / size)))
            done = 0
            current = 0
            for piece in pieces:
                share = min(n - 1, int((done + piece.size_bytes / 2) * n / max(1, total)))
                if group and share != current:
                    flush()
                current = share
                group.append(piece)
                group_bytes += piece.size_bytes
                done += piece.size_bytes
        flush()
        return splits

    # -- reading --------------------------------------------------------------------------

    def read_split(self, split: Split, ctx: TaskContext) -> Iterator[pa.RecordBatch]:
        """Scan the split's row groups: projected columns, filter applied."""
        info: ParquetSplitInfo = split.info
        fs = msfs.resolve(info.fs_uri, **self.storage_options)[0]
        expr = self.arrow_filter(info.schema)
        columns = self.columns
        scan_columns = columns
        row_filters = self._row_filters(info.schema)
        if row_filters and columns is not None:
            extra = set().union(*(predicate_columns(f) or set(info.schema.names)
                                  for f in row_filters))
            scan_columns = columns + sorted(c for c in extra if c not in columns)
        fmt, schema = dictionary_format(info.schema, info.dictionary_columns)
        batch_size = max(1, ctx.batch_size)
        if self._for_aggregation:
            batch_size = aggregate_batch_rows(info.pieces, batch_size, ctx.memory_budget)
        direct = self._direct_plan(schema, row_filters, batch_size, ctx.memory_budget)
        for piece in info.pieces:
            reader = None
            if direct is not None:
                try:
                    reader = piece_reader(fs, direct, piece, info.schema)
                except (pa.ArrowInvalid, OSError):
                    reader = None  # (the scan reports it)
            if reader is not None:
                for batch in scan_errors(resumable(
                        fs, reader, f"reading {msfs.describe_path(fs, piece.path)}"), fs, piece):
                    if batch.num_rows:
                        yield batch
                continue

            def scan(piece: RowGroupPiece = piece) -> Iterator[pa.RecordBatch]:
                fragment = fmt.make_fragment(
                    piece.path, filesystem=fs, partition_expression=piece.partition_expression,
                    row_groups=list(piece.row_groups) if piece.row_groups is not None else None)
                scanner = ds.Scanner.from_fragment(fragment, schema=schema,
                                                   columns=scan_columns, filter=expr,
                                                   batch_size=batch_size)
                return iter(scanner.to_batches())
            for batch in scan_errors(resumable(fs, scan, f"reading "
                                                     f"{msfs.describe_path(fs, piece.path)}"),
                                      fs, piece):
                for f in row_filters:
                    batch = batch.filter(pa.array(filter_mask(f, batch)) if isinstance(f, Expr)
                                         else f.evaluate(batch))
                if scan_columns is not columns and columns is not None:
                    batch = batch.select(columns)
                if batch.num_rows:
                    yield batch

    def _direct_plan(self, schema: pa.Schema, row_filters: list[Any], batch_size: int,
                     memory_budget: int) -> DirectPlan | None:
        """How ``parquet_read`` reads this source's splits directly (filter columns
        first), or None when a filter is only an Arrow expression."""
        predicates = [*self._post_filters]  # (row_filters' view conjuncts are in _pushed)
        if self._filter is not None:
            predicates.append(self._filter)
        predicates += [p for p in self._pushed if p is not None]
        # (all columns: a piece under hive partitions is left to the scan by piece_reader)
        columns = self.columns if self.columns is not None else schema.names
        return direct_plan(columns, schema, predicates, batch_size, memory_budget)

    # -- optimizer hooks ------------------------------------------------------------------

    def for_aggregation(self, keys: Sequence[str]) -> Source:
        """A copy read for a group-by on ``keys`` (``parquet_agg``): in larger batches, and
        string keys stored as small Parquet dictionaries read as Arrow dictionaries."""
        new = copy.copy(self)
        new._dictionary_keys = dictionary_candidates(self, keys)
        new._for_aggregation = True
        return new

    def with_pushdown(self, columns: list[str] | None, predicate: Expr | None
                      ) -> tuple[Source, bool, bool]:
        """Projection always; a predicate with an Arrow form prunes and filters exactly."""
        full = self.full_schema()
        if columns is not None:
            check_columns(columns, full, f"parquet {self.uri}")
        new = copy.copy(self)
        new._post_filters = list(self._post_filters)
        new._plan_stats = None
        if columns is not None:
            new.columns = list(columns)
        applied = False
        expr = arrow_expression(predicate, full)
        exact: list[Any] = []
        if expr is not None and self._view_columns:
            # conjuncts on view-typed columns filter the rows read (as plain strings), but
            # cannot prune: Arrow compares no string_view statistics with a string
            split = split_for_views(predicate, self._view_columns)
            if split is None:
                expr = None  # filtered above the scan
            else:
                plain, exact = split
                expr = arrow_expression(plain, full) if plain is not None else None
        if expr is not None or exact:
            cols = predicate_columns(predicate)
            if cols is not None:
                missing = sorted(c for c in cols if full.get_field_index(c) == -1)
                if missing:
                    raise SchemaError(f"parquet {self.uri}: filter uses unknown column(s) "
                                      f"{missing}; available: {full.names}")
            if expr is not None:
                pushed = arrow_expression(self.predicate)
                new.predicate = expr if pushed is None else (pushed & expr)
            new._exact = (*self._exact, *exact)
            new._pushed = (*self._pushed, predicate)
            applied = True
        return new, columns is not None, applied

    def estimated_size_bytes(self) -> int | None:
        """Sum of file sizes, scaled down by the share of columns projected."""
        total = sum(f.size for f in self.files())
        if self.columns is not None and self._dataset is not None:
            n = len(self._dataset.schema)
            if n:
                total = total * max(1, len(self.columns)) // n
        return total

    def statistics(self) -> SourceStatistics | None:
        """Row count and column min/max/null counts/sizes from the footers (read once per
        source and its pushdown copies; at most ``STATISTICS_FILES`` footers, scaled up)."""
        if "all" not in self._stats_box:
            try:
                self._stats_box["all"] = footer_statistics(self)
            except (OSError, PlanError, pa.ArrowException):
                self._stats_box["all"] = None
        base = self._stats_box["all"]
        if base is None:
            return None
        cols = base.columns
        if self.columns is not None:
            cols = {c: cols[c] for c in self.columns if c in cols}
        predicates = tuple(self._pushed) + tuple(self._post_filters)
        return SourceStatistics(base.num_rows, cols, predicates)

    def fingerprint(self) -> Any:
        """Equal for sources reading the same files, columns and filters."""
        uri = self.uri if isinstance(self.uri, str) else tuple(self.uri)
        return ("parquet", uri, None if self.columns is None else tuple(self.columns),
                str(self.arrow_filter()), tuple(id(f) for f in self._post_filters),
                tuple(repr(f) for f in self._exact),
                str(self.partitioning), str(self.user_schema), self.split_size,
                self._dictionary_keys, self._for_aggregation,
                tuple(sorted((k, repr(v)) for k, v in self.storage_options.items())))

    def describe(self) -> str:
        """e.g. ``parquet s3://b/x (12 files, 40 row groups) columns=[a,b] filter=(a > 3)``."""
        uri = self.uri if isinstance(self.uri, str) else ", ".join(self.uri)
        try:
            files = self.files()
            detail = f"{len(files)} files"
            if self._plan_stats is not None:
                kept_files, selected, total = self._plan_stats
                if kept_files < len(files):
                    detail += f" ({kept_files} after partition pruning)"
                detail += (f", {total} row groups" if selected == total
                           else f", {selected} of {total} row groups")
            else:
                detail += f", {format_size(sum(f.size for f in files))}"
            text = f"parquet {uri} ({detail})"
        except (OSError, PlanError):
            text = f"parquet {uri}"
        if self.columns is not None:
            text += f" columns=[{','.join(self.columns)}]"
        expr = self.arrow_filter()
        if expr is not None:
            text += f" filter={expr}"
        if self._exact:
            text += f" row_filter={' & '.join(repr(e) for e in self._exact)}"
        if self._post_filters:
            text += f" post_filter={len(self._post_filters)} expression(s)"
        return text


def _merge_pieces(pieces: list[RowGroupPiece]) -> list[RowGroupPiece]:
    """Merge consecutive pieces of the same file into one multi-row-group piece."""
    out: list[RowGroupPiece] = []
    for p in pieces:
        last = out[-1] if out else None
        if last is not None and last.path == p.path and last.row_groups is not None \
                and p.row_groups is not None:
            out[-1] = RowGroupPiece(p.path, last.row_groups + p.row_groups,
                                    p.partition_expression, last.size_bytes + p.size_bytes,
                                    last.num_rows + p.num_rows, last.dictionary & p.dictionary)
        else:
            out.append(p)
    return out


def _not_parquet(where: str, size: int | None, exc: BaseException) -> StorageError:
    """The error for a file that cannot be opened as Parquet."""
    text = str(exc)
    if "magic bytes" in text:
        reason = ("no Parquet footer (the 'PAR1' magic bytes) at its end: the file is "
                  "truncated, or is not Parquet")
    else:
        reason = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    sized = f" ({size} bytes)" if size is not None else ""
    return StorageError(f"{where}{sized} is not a readable Parquet file: {reason}")


def _partition_names(dataset: ds.Dataset) -> set[str]:
    """The hive partition columns of a dataset (from its fragments, without I/O)."""
    names: set[str] = set()
    for fragment in dataset.get_fragments():
        names.update(ds.get_partition_keys(fragment.partition_expression))
    return names
