"""The stream-table join (:class:`BroadcastTableJoin`): every batch of a stream joined with
a bounded table computed once when the job starts (inner, left, semi or anti), indexed
once when the operator opens."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from millstream.core.arrow import table_to_batches
from millstream.errors import PlanError
from millstream.ops.base import Batches, Operator
from millstream.ops.join.probe import JoinProbe
from millstream.ops.stream_join.output import _EMPTY, _check_how


class BroadcastTableJoin(Operator):
    """Joins each batch of a stream with a bounded table computed once (inner/left/semi/anti).

    ``table`` is the bounded side; a streaming scheduler computes it from ``table_node``
    (:func:`millstream.runtime.streaming.resolve_broadcast_tables`) before the job runs.
    ``condition``: a residual condition on the pairs (named as in
    :mod:`millstream.ops.join.probe`).
    """

    def __init__(self, left_on: list[str], right_on: list[str], how: str = "inner",
                 suffix: str = "_right", table: pa.Table | None = None,
                 table_node: Any = None, condition: Any = None) -> None:
        how = _check_how(how, ("inner", "left", "semi", "anti"), "join of a stream with a table")
        text = f"StreamTableJoin({how}, left_on={list(left_on)}, right_on={list(right_on)}"
        super().__init__(text + (f", condition={condition!r})" if condition is not None
                                 else ")"))
        self.left_on, self.right_on, self.how, self.suffix = (list(left_on), list(right_on),
                                                              how, suffix)
        self.condition = condition
        self.table = table
        self.table_node = table_node
        self.core: JoinProbe | None = None

    def open(self, ctx: Any) -> None:
        super().open(ctx)
        if self.table is None:
            raise PlanError(f"{self.name}: the bounded side of the join was not computed; the "
                            f"streaming scheduler must call resolve_broadcast_tables(stages) "
                            f"before it creates operators")
        # the table is indexed once, on the first batch (its key types meet the stream's)
        self.core = JoinProbe(self.left_on, self.right_on, self.how, self.suffix,
                              self.condition)
        self.core.build(self.table)

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        """Join the batch with the table."""
        if batch.num_rows == 0:
            return _EMPTY
        bs = self.ctx.batch_size if self.ctx else 65536
        return [b for t in self.core.probe(batch) for b in table_to_batches(t, bs)]
