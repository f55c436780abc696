"""The stream-table join (:class:`BroadcastTableJoin`): every batch of a stream joined with
a bounded table computed once when the job starts (inner, left, semi or anti)."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from millstream.core.arrow import table_to_batches
from millstream.errors import PlanError
from millstream.ops.base import Batches, Operator
from millstream.ops.join import join_tables
from millstream.ops.stream_join.output import _EMPTY, _check_how


class BroadcastTableJoin(Operator):
    """Joins each batch of a stream with a bounded table computed once (inner/left/semi/anti).

    ``table`` is the bounded side; a streaming scheduler computes it from ``table_node``
    (:func:`millstream.runtime.streaming.resolve_broadcast_tables`) before the job runs.
    """

    def __init__(self, left_on: list[str], right_on: list[str], how: str = "inner",
                 suffix: str = "_right", table: pa.Table | None = None,
                 table_node: Any = None) -> None:
        how = _check_how(how, ("inner", "left", "semi", "anti"), "join of a stream with a table")
        super().__init__(f"StreamTableJoin({how}, left_on={list(left_on)}, "
                         f"right_on={list(right_on)})")
        self.left_on, self.right_on, self.how, self.suffix = (list(left_on), list(right_on),
                                                              how, suffix)
        self.table = table
        self.table_node = table_node

    def open(self, ctx: Any) -> None:
        super().open(ctx)
        if self.table is None:
            raise PlanError(f"{self.name}: the bounded side of the join was not computed; the "
                            f"streaming scheduler must call resolve_broadcast_tables(stages) "
                            f"before it creates operators")

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        """Join the batch with the table."""
        if batch.num_rows == 0:
            return _EMPTY
        right = self.table
        left = pa.Table.from_batches([batch])
        if right.num_columns == 0:  # the bounded side had no rows and no schema
            right = pa.table({r: pa.array([], left.column(k).type)
                              for k, r in zip(self.left_on, self.right_on)})
        out = join_tables(left, right, self.left_on, self.right_on, self.how, self.suffix)
        return table_to_batches(out, self.ctx.batch_size if self.ctx else 65536)
