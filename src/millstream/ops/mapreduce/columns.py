"""A MapReduce job's columns at its edges: input records as (key, value) pairs, and the
natural Arrow types of its final output.
"""

from __future__ import annotations

import pickle
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from millstream.core.arrow import PICKLED_KEY, batch_to_rows
from millstream.errors import SchemaError
from millstream.ops.mapreduce.values import column_values, decode_values, tag_column

_NoneType = type(None)

# ----------------------------------------------------------------------------------------
# Input records
# ----------------------------------------------------------------------------------------

def input_pairs(batch: pa.RecordBatch) -> tuple[list[Any], list[Any]]:
    """The (key, value) records of an input batch.

    Exact-encoded ``key`` and ``value`` (from the previous step): those. Columns ``key``
    and ``value``: those. Text read with offsets (``text``, ``path``,
    ``offset``): key ``(path, byte offset)``, value the line. One column: key None, value
    the column's value. Otherwise key None, value the row as a dict.
    """
    names = batch.schema.names
    n = batch.num_rows
    schema = batch.schema
    kt, vt = tag_column("key"), tag_column("value")
    if kt in names and vt in names:
        return (decode_values(batch.column(names.index(kt)), batch.column(names.index("key"))),
                decode_values(batch.column(names.index(vt)), batch.column(names.index("value"))))
    if "key" in names and "value" in names:
        ki, vi = names.index("key"), names.index("value")
        return (column_values(batch.column(ki), schema.field(ki)),
                column_values(batch.column(vi), schema.field(vi)))
    if "text" in names and "path" in names and "offset" in names:
        texts = batch.column(names.index("text")).to_pylist()
        offsets = batch.column(names.index("offset")).to_pylist()
        paths = batch.column(names.index("path"))
        if n and pc.count_distinct(paths).as_py() == 1 and paths.null_count == 0:
            p = paths[0].as_py()
            return [(p, o) for o in offsets], texts
        return list(zip(paths.to_pylist(), offsets)), texts
    if batch.num_columns == 1:
        return [None] * n, column_values(batch.column(0), schema.field(0))
    return [None] * n, batch_to_rows(batch)


# ----------------------------------------------------------------------------------------
# Natural output columns (the job's final result)
# ----------------------------------------------------------------------------------------

_SCALAR_TYPES = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_(),
                 bytes: pa.binary()}


def natural_type(values: list[Any]) -> pa.DataType | None:
    """The Arrow type that holds ``values`` exactly, or None (they must be pickled)."""
    types = set(map(type, values))
    types.discard(_NoneType)
    if not types:
        return pa.null()
    if len(types) != 1:
        return None
    t = types.pop()
    if t in _SCALAR_TYPES:
        return _SCALAR_TYPES[t]
    if t is list:
        inner = {type(x) for v in values if v is not None for x in v}
        inner.discard(_NoneType)
        if not inner:
            return pa.list_(pa.null())
        if len(inner) == 1:
            it = inner.pop()
            if it in _SCALAR_TYPES:
                return pa.list_(_SCALAR_TYPES[it])
    return None


def _is_nullish(t: pa.DataType) -> bool:
    return pa.types.is_null(t) or (pa.types.is_list(t) and pa.types.is_null(t.value_type))


def pickled_array(values: list[Any]) -> pa.Array:
    """Values pickled into a binary array (None stays null)."""
    return pa.array([None if v is None else pickle.dumps(v, protocol=4) for v in values],
                    pa.binary())


class ColumnTyper:
    """Types one output column: the first typed batch fixes the Arrow type for the task.

    A later batch that does not fit is pickled (the engine then unifies the column to a
    pickled one) or, when ``strict`` (Parquet output needs one type per file), raises.
    """

    def __init__(self, name: str, strict: bool = False) -> None:
        self.name = name
        self.strict = strict
        self.type: pa.DataType | None = None
        self.pickled = False

    def field_and_array(self, values: list[Any]) -> tuple[pa.Field, pa.Array]:
        """An Arrow field and array for one batch of this column's values."""
        if self.pickled:
            return self._pickled(values)
        t = natural_type(values)
        if self.type is not None and (t is None or not (t == self.type or _is_nullish(t))):
            return self._mismatch(values, t)
        target = self.type or t
        if target is None:  # mixed types from the start: pickled for the whole task
            self.pickled = True
            return self._pickled(values)
        try:
            arr = pa.array(values, target)
        except (OverflowError, UnicodeError, pa.ArrowException):
            if self.type is None:  # e.g. ints beyond int64 in the first batch
                self.pickled = True
                return self._pickled(values)
            return self._mismatch(values, None)
        if self.type is None and not _is_nullish(target):
            self.type = target
        return pa.field(self.name, target), arr

    def _mismatch(self, values: list[Any], t: pa.DataType | None) -> tuple[pa.Field, pa.Array]:
        if self.strict:
            sample = next((v for v in values if v is not None), None)
            raise SchemaError(
                f"MapReduce output column {self.name!r} holds {self.type} values, then a batch "
                f"of {t if t is not None else 'mixed-type'} values (e.g. {sample!r}); Parquet "
                f"needs one type per column: yield values of one type, or write text output")
        return self._pickled(values)

    def _pickled(self, values: list[Any]) -> tuple[pa.Field, pa.Array]:
        return pa.field(self.name, pa.binary(), metadata={PICKLED_KEY: b"1"}), pickled_array(values)
