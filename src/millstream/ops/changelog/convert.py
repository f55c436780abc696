"""Between changelog streams and plain rows: the change kinds as a visible column and back,
and the batch-mode reading of a changelog (the rows it leaves).

* :class:`ToChangelog` (``Dataset.to_changelog()``): the hidden kinds become a string
  column (+I, -U, +U, -D; +I for rows of an append-only input): an append-only stream
  of changes that any operator (a Python ``map``, a window, a file) can take;
* :class:`FromChangelog` (``Dataset.from_changelog()``): a column of such strings becomes
  the hidden kinds, so the rows are changes to what they describe;
* :class:`ChangeSigns` and :class:`ExpandNet` around a batch aggregate: in batch mode a
  changelog is read as the multiset of rows it leaves (each +I/+U adds a copy of its row,
  each -U/-D takes one away), which is what the same plan leaves in a streaming sink.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from millstream.core.changelog import CHANGE, VISIBLE, from_visible, kinds, signs, to_visible
from millstream.errors import SchemaError
from millstream.ops.base import Batches, Operator

#: The column of net copies in the batch reading of a changelog.
NET = "__ms_net"


class ToChangelog(Operator):
    """The hidden change kinds as the string column ``column`` (always present)."""

    accepts_updates = True

    def __init__(self, column: str = VISIBLE) -> None:
        super().__init__(f"ToChangelog({column!r})")
        self.column = column

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        if self.column in batch.schema.names:
            raise SchemaError(f"{self.name}: the input already has a column {self.column!r}; "
                              f"name the change column otherwise (to_changelog(column=...))")
        if CHANGE not in batch.schema.names:
            kind = pa.array(np.full(batch.num_rows, "+I", dtype=object), pa.string())
            return (batch.append_column(self.column, kind),)
        out = to_visible(batch)
        if self.column != VISIBLE:
            out = out.rename_columns([*out.schema.names[:-1], self.column])
        return (out,)


def _hide(batch: pa.RecordBatch, column: str) -> pa.RecordBatch:
    if column not in batch.schema.names:
        raise SchemaError(f"from_changelog: no change column {column!r}; columns are "
                          f"{batch.schema.names}")
    if column != VISIBLE:
        if VISIBLE in batch.schema.names:
            batch = batch.drop_columns([VISIBLE])
        batch = batch.rename_columns([VISIBLE if n == column else n
                                      for n in batch.schema.names])
    return from_visible(batch)


class FromChangelog(Operator):
    """Rows whose string column ``column`` (+I, -U, +U, -D) says what change they are."""

    emits_updates = True

    def __init__(self, column: str = VISIBLE) -> None:
        super().__init__(f"FromChangelog({column!r})")
        self.column = column

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        return (_hide(batch, self.column),)


class ChangeSigns(Operator):
    """Batch reading of a changelog, first step: the change column becomes the int64
    column :data:`NET` (+1 adds a copy of the row, -1 takes one away)."""

    def __init__(self, column: str = VISIBLE) -> None:
        super().__init__(f"ChangeSigns({column!r})")
        self.column = column

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        hidden = _hide(batch, self.column)
        net = pa.array(signs(kinds(hidden)).astype(np.int64))
        return (hidden.drop_columns([CHANGE]).append_column(NET, net),)


class ExpandNet(Operator):
    """Batch reading of a changelog, last step: each distinct row as many times as its net
    count of copies (:data:`NET`, summed by a grouping by every column) says."""

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        net = np.asarray(batch.column(NET).fill_null(0), dtype=np.int64)
        data = batch.drop_columns([NET])
        if (net == 1).all():
            return (data,)
        idx = np.repeat(np.arange(batch.num_rows, dtype=np.int64), np.maximum(net, 0))
        return (data.take(pa.array(idx)),)
