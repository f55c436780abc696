"""The analytic window operator: the rows of one task (a hash partition of the window's
partition keys) sorted by (partition keys, order keys) with the external sort, then the
window functions computed over whole partitions, a chunk of partitions at a time.

Memory: the sort spills sorted runs beyond its share of the budget. A single partition
larger than a quarter of the budget goes to a spill file as it streams by, while only the
columns the functions read (keys, order keys, arguments) stay in memory; its results are
then attached to the rows as they are read back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa

from millstream.core.arrow import batch_nbytes, concat_batches, empty_batch, table_to_batches
from millstream.core.context import TaskContext
from millstream.core.spill import SpillFile
from millstream.errors import SchemaError
from millstream.expr.aggregates import AggSpec
from millstream.expr.analytic import FRAMED, OFFSET, RANKING, WindowFunction
from millstream.ops.aggregate import aggregate_result_schema
from millstream.ops.analytic.frames import check_frame, frame_bounds, order_key_array
from millstream.ops.analytic.kernels import (
    change_flags,
    frame_aggregate,
    positional,
    ranking,
    shifted,
    spans,
)
from millstream.ops.base import Batches, Operator
from millstream.ops.sort import Sort

_EMPTY: tuple[pa.RecordBatch, ...] = ()
_AGGREGATES = ("sum", "mean", "min", "max", "count", "count_all")


# ----------------------------------------------------------------------------- types
def result_type(fn: WindowFunction, schema: pa.Schema) -> pa.DataType:
    """The type of ``fn``'s column on input rows of ``schema`` (aggregates typed as the
    group-by types them). Raises SchemaError for a missing column, an argument of the wrong
    type or a frame the order key cannot take."""
    missing = [c for c in fn.order_by if schema.get_field_index(c) < 0]
    if missing:
        raise SchemaError(f"no order column(s) {missing}; columns are {schema.names}")
    check_frame(fn.frame, [(c, schema.field(c).type) for c in fn.order_by])
    if fn.func in ("row_number", "rank", "dense_rank", "ntile"):
        return pa.int64()
    if fn.func in ("percent_rank", "cume_dist"):
        return pa.float64()
    if fn.func in _AGGREGATES:
        return aggregate_result_schema(schema, [], [AggSpec(fn.func, fn.arg, fn.name)]).field(0).type
    arg_type = fn.arg.output_type(schema)
    if fn.default is not None:
        default_type = fn.default.output_type(schema)
        try:
            pa.array([], default_type).cast(arg_type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            raise SchemaError(f"{fn.func} default of type {default_type} does not fit the "
                              f"values' type {arg_type}") from exc
    return arg_type


def window_field(fn: WindowFunction, schema: pa.Schema) -> pa.Field:
    """The field of ``fn``'s output column."""
    return pa.field(fn.name, result_type(fn, schema))


# ----------------------------------------------------------------------------- computing
def _single(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(arr, pa.ChunkedArray):
        return arr.combine_chunks() if arr.num_chunks else pa.array([], arr.type)
    return arr


def compute_columns(table: pa.Table, partition_by: list[str], functions: list[WindowFunction],
                    types: list[pa.DataType] | None = None) -> list[tuple[str, pa.Array]]:
    """The window functions' columns for ``table``: whole partitions sorted by (partition
    keys, the functions' common order keys); ``types`` their result types when known."""
    if types is None:
        types = [result_type(fn, table.schema) for fn in functions]
    n = table.num_rows
    seg_flags = change_flags([table.column(k) for k in partition_by], n)
    order_by = list(next((f.order_by for f in functions if f.order_by), ()))
    peer_flags = seg_flags | change_flags([table.column(c) for c in order_by], n) \
        if order_by else seg_flags
    seg, ordered_peers = spans(seg_flags), spans(peer_flags)
    batch = pa.RecordBatch.from_arrays([_single(c) for c in table.columns], schema=table.schema)
    out = []
    for fn, out_type in zip(functions, types):
        peer = ordered_peers if fn.order_by else seg  # unordered: the partition are peers
        if fn.func in RANKING:
            arr = pa.array(ranking(fn.func, seg, peer, fn.n)).cast(out_type)
        elif fn.func in OFFSET:
            values = fn.arg.evaluate(batch)
            default = None if fn.default is None else fn.default.evaluate(batch).cast(values.type)
            arr = shifted(values, seg, fn.n if fn.func == "lag" else -fn.n, default)
        else:
            assert fn.func in FRAMED and fn.frame is not None
            column = fn.order_by[0] if fn.order_by else ""
            key = order_key_array(table, column) if fn.frame.has_offsets else None
            lo, hi = frame_bounds(fn.frame, seg, peer, key,
                                  bool(fn.descending and fn.descending[0]), column)
            values = None if fn.arg is None else fn.arg.evaluate(batch)
            if fn.func in ("first_value", "last_value", "nth_value"):
                arr = positional(fn.func, values, lo, hi, fn.n, fn.ignore_nulls)
            else:
                arr = frame_aggregate(fn.func, values, lo, hi, out_type)
        out.append((fn.name, arr.cast(out_type) if arr.type != out_type else arr))
    return out


def attach(table: pa.Table | pa.RecordBatch, columns: list[tuple[str, pa.Array]]
           ) -> pa.Table:
    """``table`` with ``columns`` replacing same-named ones in place, the others appended."""
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    for name, arr in columns:
        i = table.schema.get_field_index(name)
        field = pa.field(name, arr.type)
        table = table.set_column(i, field, arr) if i >= 0 else table.append_column(field, arr)
    return table


# ----------------------------------------------------------------------------- operator
class AnalyticWindow(Operator):
    """Window functions sharing partition keys and an order (or needing none), over one
    task's rows."""

    def __init__(self, partition_by: list[str], functions: list[WindowFunction],
                 output_columns: list[str] | None = None) -> None:
        # one order for all (functions without one accept any order of the partition)
        order_by, descending, nulls_last = next(
            (f.sort_spec for f in functions if f.order_by), functions[0].sort_spec)
        text = ", ".join(f.describe() for f in functions)
        super().__init__(f"AnalyticWindow(partition_by={list(partition_by)}, {text})")
        self.partition_by = list(partition_by)
        self.functions = list(functions)
        self.sort_by = self.partition_by + list(order_by)
        self.sort_desc = [False] * len(self.partition_by) + list(descending)
        self.nulls_last = nulls_last
        #: the column order of the output (the last of several operators of one Window node
        #: puts the columns in the node's order)
        self.output_columns = output_columns
        self.sorter: Sort | None = None
        self.chunker: _Chunker | None = None

    def open(self, ctx: TaskContext) -> None:
        super().open(ctx)
        if self.sort_by:
            self.sorter = Sort(self.sort_by, self.sort_desc, self.nulls_last)
            self.sorter.open(ctx)
        self.chunker = _Chunker(self, ctx)

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        if self.sorter is not None:
            return self.sorter.process(batch)
        return list(self.chunker.push(batch))  # one partition in any order: no sort

    def finish(self) -> Batches:
        if self.sorter is not None:
            for batch in self.sorter.finish():
                yield from self.chunker.push(batch)
        yield from self.chunker.finish()

    def close(self) -> None:
        if self.sorter is not None:
            self.sorter.close()
        if self.chunker is not None:
            self.chunker.close()


class _Chunker:
    """Cuts the sorted rows into chunks of whole partitions (about a batch each) and
    computes them; a partition over a quarter of the budget goes through a spill file."""

    def __init__(self, op: AnalyticWindow, ctx: TaskContext) -> None:
        self.op, self.ctx = op, ctx
        self.chunk_rows = max(1, ctx.batch_size)
        self.big_bytes = max(1 << 20, ctx.memory_budget // 4)
        self.pending: list[pa.RecordBatch] = []
        self.rows = self.bytes = 0
        self.last_start = 0  # where the last partition of the pending rows starts
        self.prev: pa.RecordBatch | None = None  # the partition keys of the last row seen
        self.schema: pa.Schema | None = None
        self.big: _BigPartition | None = None
        self.emitted = False
        self.types: tuple[pa.Schema, list[pa.DataType]] | None = None  # by input schema

    def _starts(self, batch: pa.RecordBatch) -> np.ndarray:
        """Positions in ``batch`` where a partition starts."""
        keys = self.op.partition_by
        n = batch.num_rows
        if self.prev is None:
            flags = change_flags([batch.column(k) for k in keys], n)
        elif not keys:
            flags = np.zeros(n, dtype=bool)
        else:
            cols = []
            for k in keys:
                cur = batch.column(k)
                prev = self.prev.column(k)
                if not prev.type.equals(cur.type):
                    prev = prev.cast(cur.type)
                cols.append(pa.concat_arrays([prev, cur]))
            flags = change_flags(cols, n + 1)[1:]
        self.prev = batch.slice(n - 1, 1).select(keys)
        return np.flatnonzero(flags)

    def push(self, batch: pa.RecordBatch) -> Iterator[pa.RecordBatch]:
        if self.schema is None:
            self.schema = batch.schema
        if batch.num_rows == 0:
            return
        starts = self._starts(batch)
        if self.big is not None:
            if not len(starts):
                self.big.add(batch)
                return
            first = int(starts[0])
            self.big.add(batch.slice(0, first))
            yield from self.big.finish(self._columns, self._attach)
            self.big, self.emitted = None, True
            batch, starts = batch.slice(first), starts - first
        if len(starts):
            self.last_start = self.rows + int(starts[-1])
        self.pending.append(batch)
        self.rows += batch.num_rows
        self.bytes += batch_nbytes(batch)
        if self.rows < self.chunk_rows:
            return
        if self.last_start > 0:
            table = concat_batches(self.pending)
            head, tail = table.slice(0, self.last_start), table.slice(self.last_start)
            yield from self._compute(head)
            self.pending = tail.combine_chunks().to_batches()
            self.rows, self.bytes, self.last_start = tail.num_rows, batch_nbytes(tail), 0
        elif self.bytes >= self.big_bytes:
            self.big = _BigPartition(self.ctx, self._narrow_columns(batch.schema))
            for b in self.pending:
                self.big.add(b)
            self.pending, self.rows, self.bytes = [], 0, 0
            self.ctx.increment_counter("millstream", "spills")

    def _narrow_columns(self, schema: pa.Schema) -> list[str]:
        """The columns the functions read: all a partition held in memory needs."""
        need = set(self.op.partition_by)
        for fn in self.op.functions:
            need |= fn.columns()
        return [n for n in schema.names if n in need]

    def _columns(self, table: pa.Table) -> list[tuple[str, pa.Array]]:
        if self.types is None or self.types[0] != table.schema:
            self.types = (table.schema, [result_type(fn, table.schema)
                                         for fn in self.op.functions])
        return compute_columns(table, self.op.partition_by, self.op.functions, self.types[1])

    def _attach(self, table: pa.Table | pa.RecordBatch,
                columns: list[tuple[str, pa.Array]]) -> pa.Table:
        out = attach(table, columns)
        return out if self.op.output_columns is None else out.select(self.op.output_columns)

    def _compute(self, table: pa.Table) -> Iterator[pa.RecordBatch]:
        self.emitted = True
        out = self._attach(table, self._columns(table))
        if out.num_rows == 0:
            yield empty_batch(out.schema)
            return
        yield from table_to_batches(out, self.ctx.batch_size)

    def finish(self) -> Iterator[pa.RecordBatch]:
        if self.big is not None:
            yield from self.big.finish(self._columns, self._attach)
            self.big, self.emitted = None, True
        if self.pending:
            table = concat_batches(self.pending)
            self.pending = []
            yield from self._compute(table)
        elif self.schema is not None and not self.emitted:
            yield from self._compute(self.schema.empty_table())  # no rows: pass the schema on

    def close(self) -> None:
        if self.big is not None:
            self.big.close()
            self.big = None


class _BigPartition:
    """One partition's rows in a spill file, its function inputs in memory."""

    def __init__(self, ctx: TaskContext, narrow: list[str]) -> None:
        self.spill = SpillFile(ctx, "window-partition")
        self.narrow_names = narrow
        self.narrow: list[pa.RecordBatch] = []
        self.batch_size = ctx.batch_size

    def add(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows:
            self.spill.write(batch)
            self.narrow.append(batch.select(self.narrow_names))

    def finish(self, columns: Callable, attach: Callable) -> Iterator[pa.RecordBatch]:
        table = concat_batches(self.narrow)
        self.narrow = []
        results = columns(table)
        offset = 0
        try:
            for b in self.spill.read():
                n = b.num_rows
                out = attach(b, [(name, arr.slice(offset, n)) for name, arr in results])
                offset += n
                yield from out.to_batches()
        finally:
            self.spill.delete()

    def close(self) -> None:
        self.spill.delete()
