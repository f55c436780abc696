"""Python functions as expressions: :class:`PythonFunction` applies a user's function to
the values of its argument expressions, vectorized (``fn(*arrays) -> array``, over whole
Arrow arrays) or row by row (``fn(*values) -> value``), giving ``return_type`` values.

SQL calls registered functions through it (``ms.register_function``); an aggregate
function is applied, row by row, to the list of a group's values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow as pa

from millstream.errors import SchemaError
from millstream.expr.nodes import Expr
from millstream.expr.types import Datum, _broadcast


def _as_array(value: Any, n: int, dtype: pa.DataType | None) -> pa.Array:
    if isinstance(value, pa.ChunkedArray):
        value = value.combine_chunks()
    if isinstance(value, pa.Scalar):
        value = pa.repeat(value, n)
    if not isinstance(value, pa.Array):
        if type(value).__module__.split(".")[0] in ("pandas", "polars"):
            value = pa.array(value.to_numpy() if hasattr(value, "to_numpy") else list(value))
        else:
            value = pa.array(value, type=dtype, from_pandas=True)
    if dtype is not None and not value.type.equals(dtype):
        value = value.cast(dtype)
    if len(value) != n:
        raise SchemaError(f"the function returned {len(value)} values for {n} rows")
    return value


class PythonFunction(Expr):
    """``fn`` applied to the values of ``args``: vectorized over Arrow arrays, or row by row
    (nulls passed as None); the result is typed ``return_type`` (inferred from the values
    when None, then unknown before the job runs)."""

    def __init__(self, name: str, fn: Callable[..., Any], args: tuple[Expr, ...],
                 return_type: pa.DataType | None, vectorized: bool = False):
        self.name = name
        self.fn = fn
        self.args = tuple(args)
        self.return_type = return_type
        self.vectorized = vectorized

    def _children(self) -> tuple[Expr, ...]:
        return self.args

    def _name_hint(self) -> str | None:
        return self.name

    def _eval(self, batch: pa.RecordBatch) -> Datum:
        n = batch.num_rows
        values = [_broadcast(a._eval(batch), n) for a in self.args]
        if self.vectorized:
            return _as_array(self.fn(*values), n, self.return_type)
        columns = [v.to_pylist() for v in values]
        rows = zip(*columns) if columns else ([()] * n)
        out = [self.fn(*row) for row in rows]
        return _as_array(out, n, self.return_type)

    def output_type(self, schema: pa.Schema) -> pa.DataType:
        """``return_type``; without one, unknown until the function runs."""
        for a in self.args:
            a.output_type(schema)  # a missing column is an error now
        if self.return_type is None:
            raise LookupError(f"{self.name}() has no return_type: its type is known when it runs")
        return self.return_type

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(repr(a) for a in self.args)})"
