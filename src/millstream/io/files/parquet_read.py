"""Reading a Parquet split's row groups directly, the filter's columns first.

For each row group of a piece: read the columns the filter needs, compute the filter's
mask (:mod:`millstream.expr.filter_mask`: storage compares, strings by dictionary code);
skip the row group when no row is left, else read the other columns, keep the rows, and
only then decode what must be decoded. String columns that every row group of the piece
stores as a small Parquet dictionary are read as Arrow dictionaries (a tenth of the CPU
of building strings), compared by code, and decoded to strings for the surviving rows only.

It takes the pieces it can read exactly as the ``pyarrow.dataset`` scan reads them (no
hive partition column, every column in the file with a type that converts, filters that
are expressions, row groups of a bounded size); for the others :func:`direct_plan` or
:func:`piece_reader` returns None and the scan reads them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from millstream.errors import BadRecordError, StorageError
from millstream.expr.filter_mask import all_true
from millstream.expr.nodes import Expr
from millstream.io import fs as msfs
from millstream.io.files.parquet_agg import small_dictionary_columns
from millstream.io.files.parquet_footer import local_footer
from millstream.io.files.union import is_binaryish, is_stringish

#: A row group is read whole, so one larger than this (decoded bytes, or a share of the
#: task's memory budget) is left to the streaming scan.
MAX_ROW_GROUP_BYTES = 256 << 20
ROW_GROUP_BUDGET_SHARE = 4


@dataclass(frozen=True)
class DirectPlan:
    """What a split's direct read produces: ``columns`` typed as ``schema``, the rows
    where every predicate is true."""

    columns: tuple[str, ...]
    schema: pa.Schema
    predicates: tuple[Expr, ...]
    filter_columns: tuple[str, ...]
    batch_size: int
    max_row_group_bytes: int


def direct_plan(columns: Sequence[str], schema: pa.Schema, predicates: Sequence[Any],
                batch_size: int, memory_budget: int) -> DirectPlan | None:
    """The plan of a direct read, or None when a predicate is no expression."""
    if not all(isinstance(p, Expr) for p in predicates):
        return None
    needed: list[str] = []
    for p in predicates:
        for c in sorted(p.columns()):
            if c not in needed:
                needed.append(c)
    if predicates and not needed:  # (a constant filter: read a column to count its rows)
        if not columns:
            return None
        needed = [columns[0]]
    if any(schema.get_field_index(c) < 0 for c in (*columns, *needed)):
        return None
    out_schema = pa.schema([schema.field(c) for c in columns])
    limit = min(MAX_ROW_GROUP_BYTES, max(1, memory_budget // ROW_GROUP_BUDGET_SHARE))
    return DirectPlan(tuple(columns), out_schema, tuple(predicates), tuple(needed),
                      max(1, batch_size), limit)


def _text(t: pa.DataType) -> bool:
    """A string or binary type (not a dictionary)."""
    return not pa.types.is_dictionary(t) and (is_stringish(t) or is_binaryish(t))


def _reads_as(got: pa.DataType, want: pa.DataType) -> bool:
    """Whether a file column read as ``got`` becomes ``want`` as the scan would make it."""
    if got == want:
        return True
    if pa.types.is_dictionary(want):
        return _text(got) and _text(want.value_type)
    if _text(got) and _text(want):
        return is_binaryish(got) == is_binaryish(want)
    if pa.types.is_integer(got) and pa.types.is_integer(want):
        return want.bit_width >= got.bit_width and (
            pa.types.is_signed_integer(want) or pa.types.is_unsigned_integer(got))
    return False


def piece_reader(fs: Any, plan: DirectPlan, piece: Any, dataset_schema: pa.Schema
                 ) -> Callable[[], Iterator[pa.RecordBatch]] | None:
    """A function giving the piece's batches read directly, or None when the scan must
    read it (see the module docstring)."""
    if not msfs.is_local(fs):
        return None  # (remote files: the scan's pre-buffered, coalesced reads)
    expr = piece.partition_expression
    if expr is not None and ds.get_partition_keys(expr):
        return None
    metadata, file_schema = local_footer(piece.path)
    wanted = list(dict.fromkeys((*plan.filter_columns, *plan.columns)))
    for c in wanted:
        i = file_schema.get_field_index(c)
        if i < 0:
            return None
        target = plan.schema.field(c).type if c in plan.columns \
            else dataset_schema.field(c).type
        if not _reads_as(file_schema.field(i).type, target):
            return None
    groups = list(piece.row_groups) if piece.row_groups is not None \
        else list(range(metadata.num_row_groups))
    if any(metadata.row_group(g).total_byte_size > plan.max_row_group_bytes for g in groups):
        return None
    # (strings only: a filter's fallback path decodes dictionaries of strings, not bytes)
    strings = [c for c in wanted if pa.types.is_string(file_schema.field(c).type)
               or pa.types.is_large_string(file_schema.field(c).type)
               or pa.types.is_string_view(file_schema.field(c).type)]
    as_dict = sorted(small_dictionary_columns(metadata, groups, strings)
                     | {c for c in plan.columns if pa.types.is_dictionary(
                         plan.schema.field(c).type)})

    def read() -> Iterator[pa.RecordBatch]:
        pf = pq.ParquetFile(piece.path, metadata=metadata, read_dictionary=as_dict or None,
                            pre_buffer=False)
        # a selective filter leaves a few rows per row group: gathered into batches of
        # about the batch size, as the operators downstream pay per batch
        pending: list[pa.Table] = []
        rows = 0
        for g in groups:
            table = _row_group(pf, g, plan)
            if table is None:
                continue
            if table.num_rows >= plan.batch_size // 2:
                yield from table.to_batches(max_chunksize=plan.batch_size)
                continue
            pending.append(table)
            rows += table.num_rows
            if rows >= plan.batch_size // 2:
                yield from _gathered(pending, plan.batch_size)
                pending, rows = [], 0
        yield from _gathered(pending, plan.batch_size)

    return read


def _gathered(tables: list[pa.Table], batch_size: int) -> Iterator[pa.RecordBatch]:
    if tables:
        table = pa.concat_tables(tables).combine_chunks() if len(tables) > 1 else tables[0]
        yield from table.to_batches(max_chunksize=batch_size)


def _row_group(pf: pq.ParquetFile, g: int, plan: DirectPlan) -> pa.Table | None:
    """The rows of row group ``g`` the filter keeps, typed as the plan says (None: none)."""
    fcols = list(plan.filter_columns)
    first = pf.read_row_group(g, columns=fcols, use_threads=False) if fcols else None
    keep: np.ndarray | None = None
    if first is not None:
        keep = all_true(plan.predicates, _one_batch(first))
        if not keep.any():
            return None
        if keep.all():
            keep = None
    rest = [c for c in plan.columns if c not in fcols]
    second = pf.read_row_group(g, columns=rest, use_threads=False) if rest else None
    mask = None if keep is None else pa.array(keep, pa.bool_())
    arrays = []
    for field in plan.schema:
        table = first if first is not None and field.name in fcols else second
        arr = table.column(field.name)  # type: ignore[union-attr]
        if mask is not None and not pa.types.is_string_view(arr.type) \
                and not pa.types.is_binary_view(arr.type):
            arr = _convert(arr.filter(mask), field.type)
        else:
            arr = _convert(arr, field.type)  # (Arrow 26 cannot filter views: convert first)
            if mask is not None:
                arr = arr.filter(mask)
        arrays.append(arr)
    return pa.Table.from_arrays(arrays, schema=plan.schema)


def _one_batch(table: pa.Table) -> pa.RecordBatch:
    """A table's rows as one batch (a row group's columns are one chunk each)."""
    return pa.RecordBatch.from_arrays(
        [c.chunk(0) if c.num_chunks == 1 else c.combine_chunks() for c in table.columns],
        schema=table.schema)


def _convert(arr: Any, want: pa.DataType) -> Any:
    if arr.type == want:
        return arr
    if pa.types.is_dictionary(arr.type) and not pa.types.is_dictionary(want):
        arr = arr.cast(arr.type.value_type)
        if arr.type == want:
            return arr
    return arr.cast(want)


def scan_errors(batches: Iterator[pa.RecordBatch], fs: Any, piece: Any
                 ) -> Iterator[pa.RecordBatch]:
    """Batches of one piece; a file that does not decode is a BadRecordError naming it
    (not retried: it fails the same way every time)."""
    try:
        yield from batches
    except pa.ArrowInvalid as exc:
        where = msfs.describe_path(fs, piece.path)
        groups = (f" (row groups {','.join(map(str, piece.row_groups))})"
                  if piece.row_groups is not None else "")
        raise BadRecordError(f"cannot read Parquet file {where}{groups}: {exc}",
                             path=where) from exc


def resumable(fs: Any, make: Any, what: str) -> Iterator[pa.RecordBatch]:
    """Iterate ``make()``; after a transient storage error, rescan and skip rows already given.

    A scan of one fragment yields rows in file order, so skipping the first N rows
    resumes exactly where the failed scan stopped.
    """
    done = 0
    attempt = 0
    while True:
        skip = done
        try:
            for batch in make():
                if skip:
                    if batch.num_rows <= skip:
                        skip -= batch.num_rows
                        continue
                    batch = batch.slice(skip)
                    skip = 0
                done += batch.num_rows
                yield batch
            return
        except Exception as exc:
            if msfs.is_local(fs) or not msfs.is_transient(exc):
                raise
            attempt += 1
            if attempt >= msfs.RETRY_ATTEMPTS:
                raise StorageError(f"{what} failed after {attempt} attempts (transient storage "
                                   f"errors); last error: {type(exc).__name__}: {exc}") from exc
            msfs.backoff(attempt)
