"""Top-k: the first ``n`` rows in a sort order, kept as batches arrive (bounded by about
``2n`` rows), so ``sort(...).limit(n)`` needs no full sort. A top-k per partition, then
one over the partial results (their concatenation), gives the global answer.

Ties keep their arrival order (the sort is stable and earlier rows are kept first), as a
global sort would order them.
"""

from __future__ import annotations

import pyarrow as pa

from millstream.core.arrow import concat_batches, empty_batch, table_to_batches
from millstream.core.sorting import check_sort_columns, order_indices
from millstream.ops.base import Batches, Operator

_EMPTY: tuple[pa.RecordBatch, ...] = ()
#: Rows collected before a compaction, at least (small ``n`` compact less often).
_MIN_BUFFER = 8192


class TopK(Operator):
    """The first ``n`` rows of the input in the order of ``by`` (see the module docstring)."""

    def __init__(self, by: list[str], descending: list[bool], n: int,
                 nulls_last: bool | None = None) -> None:
        order = ", ".join(c + (" desc" if d else "") for c, d in zip(by, descending))
        super().__init__(f"TopK({n}, {order})")
        self.by, self.descending, self.n, self.nulls_last = by, descending, n, nulls_last
        self.kept: list[pa.RecordBatch] = []
        self.rows = 0
        self.schema: pa.Schema | None = None

    def _top(self, data: pa.Table | pa.RecordBatch) -> pa.Table:
        check_sort_columns(data, self.by)
        table = data if isinstance(data, pa.Table) else pa.Table.from_batches([data])
        if table.num_rows == 0:
            return table
        idx = order_indices(table, self.by, self.descending, self.nulls_last)
        return table.take(idx[: self.n])

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        if self.schema is None and batch.num_columns:
            self.schema = batch.schema
        if batch.num_rows == 0 or self.n == 0:
            return _EMPTY
        if batch.num_rows > self.n:
            top = self._top(batch)
            self.kept.extend(top.to_batches())
            self.rows += top.num_rows
        else:
            self.kept.append(batch)
            self.rows += batch.num_rows
        if self.rows >= max(2 * self.n, _MIN_BUFFER):
            self._compact()
        return _EMPTY

    def _compact(self) -> None:
        top = self._top(concat_batches(self.kept))
        self.kept = top.to_batches()
        self.rows = top.num_rows

    def finish(self) -> Batches:
        if not self.kept:
            return [empty_batch(self.schema)] if self.schema is not None else _EMPTY
        top = self._top(concat_batches(self.kept))
        self.kept, self.rows = [], 0
        bs = self.ctx.batch_size if self.ctx else 65536
        return table_to_batches(top, bs)
