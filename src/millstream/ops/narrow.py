"""Narrow (per-batch) operators: row functions, vectorized batch functions, expressions.

They keep no state across batches, so a chain of them is fused into one task.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from millstream.core.arrow import batch_to_rows, rows_to_batch
from millstream.errors import SchemaError, UserCodeFailure
from millstream.ops.base import Batches, Operator

_EMPTY: tuple[pa.RecordBatch, ...] = ()


def function_name(fn: Any) -> str:
    """A readable name for a user function, for explain() and error messages."""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if name is None:
        name = type(fn).__name__
    return name


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class MapRows(Operator):
    """``map(fn)``: one output row (dict, or any value -> column ``value``) per input row."""

    kind = "Map"

    def __init__(self, fn: Callable[[dict], Any]) -> None:
        super().__init__(f"{self.kind}({function_name(fn)})")
        self.fn = fn

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        fn = self.fn
        rows = batch_to_rows(batch)
        out = []
        try:
            for row in rows:
                out.append(fn(row))
        except Exception as exc:
            raise UserCodeFailure(self.name, function_name(fn), exc, _short(row)) from exc
        if not out:
            return _EMPTY
        return (rows_to_batch(out),)


class FlatMapRows(MapRows):
    """``flat_map(fn)``: zero or more output rows per input row."""

    kind = "FlatMap"

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        fn = self.fn
        rows = batch_to_rows(batch)
        out: list[Any] = []
        extend = out.extend
        try:
            for row in rows:
                res = fn(row)
                if res is not None:
                    extend(res)
        except Exception as exc:
            raise UserCodeFailure(self.name, function_name(fn), exc, _short(row)) from exc
        if not out:
            return _EMPTY
        return (rows_to_batch(out),)


class FilterRows(MapRows):
    """``filter(fn)`` with a Python predicate on dict rows."""

    kind = "Filter"

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        fn = self.fn
        rows = batch_to_rows(batch)
        try:
            mask = [bool(fn(row)) for row in rows]
        except Exception as exc:
            # find the failing row for the message
            bad = None
            for row in rows:
                try:
                    fn(row)
                except Exception:
                    bad = row
                    break
            raise UserCodeFailure(self.name, function_name(fn), exc, _short(bad)) from exc
        if all(mask):
            return (batch,)
        if not any(mask):
            return (batch.slice(0, 0),)  # keep the schema: joins and aggregates need the columns
        return (batch.filter(pa.array(mask, type=pa.bool_())),)


def _to_record_batch(result: Any, fmt: str) -> list[pa.RecordBatch]:
    if result is None:
        return []
    if isinstance(result, pa.RecordBatch):
        return [result]
    if isinstance(result, pa.Table):
        return result.to_batches()
    mod = type(result).__module__
    if mod.startswith("pandas"):
        return pa.Table.from_pandas(result, preserve_index=False).to_batches()
    if mod.startswith("polars"):
        return result.to_arrow().to_batches()
    if isinstance(result, dict):
        return pa.Table.from_pydict({k: (list(v) if not isinstance(v, (pa.Array, pa.ChunkedArray))
                                         else v) for k, v in result.items()}).to_batches()
    if isinstance(result, list):
        return [rows_to_batch(result)] if result else []
    raise TypeError(f"map_batches function must return a pyarrow Table/RecordBatch, a pandas or "
                    f"polars DataFrame, a dict of columns or a list of rows; got "
                    f"{type(result).__name__}")


class MapBatches(Operator):
    """``map_batches(fn, batch_format=...)``: a vectorized function over whole batches."""

    def __init__(self, fn: Callable[..., Any], batch_format: str = "pyarrow",
                 fn_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__(f"MapBatches({function_name(fn)}, {batch_format})")
        if batch_format not in ("pyarrow", "pandas", "polars", "numpy"):
            raise ValueError(f"batch_format must be 'pyarrow', 'pandas', 'polars' or 'numpy', "
                             f"got {batch_format!r}")
        self.fn = fn
        self.batch_format = batch_format
        self.fn_kwargs = fn_kwargs or {}

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        fmt = self.batch_format
        if fmt == "pyarrow":
            arg: Any = pa.Table.from_batches([batch])
        elif fmt == "pandas":
            arg = batch.to_pandas()
        elif fmt == "polars":
            import polars as pl

            arg = pl.from_arrow(pa.Table.from_batches([batch]))
        else:
            arg = {name: col.to_numpy(zero_copy_only=False)
                   for name, col in zip(batch.schema.names, batch.columns)}
        try:
            result = self.fn(arg, **self.fn_kwargs)
        except Exception as exc:
            raise UserCodeFailure(self.name, function_name(self.fn), exc,
                                  f"<batch of {batch.num_rows} rows>") from exc
        out = _to_record_batch(result, fmt)
        # drop empty batches, but keep one when all are empty: it carries the schema
        return [b for b in out if b.num_rows] or out[:1] or _EMPTY


def _evaluate(expr: Any, batch: pa.RecordBatch, op: str) -> pa.Array:
    try:
        return expr.evaluate(batch)
    except SchemaError as exc:
        raise SchemaError(f"{op}: {exc}") from None


class Project(Operator):
    """``select(*exprs)``: the output has exactly these columns."""

    def __init__(self, exprs: list[Any]) -> None:
        super().__init__("Project(" + ", ".join(repr(e) for e in exprs) + ")")
        self.exprs = exprs

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        arrays = [_evaluate(e, batch, self.name) for e in self.exprs]
        names = [e.output_name for e in self.exprs]
        return (pa.RecordBatch.from_arrays(arrays, names=names),)


class WithColumns(Operator):
    """``with_columns(*exprs)``: add or replace columns, keep the others."""

    def __init__(self, exprs: list[Any]) -> None:
        super().__init__("WithColumns(" + ", ".join(repr(e) for e in exprs) + ")")
        self.exprs = exprs

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        names = list(batch.schema.names)
        arrays = list(batch.columns)
        for e in self.exprs:
            arr = _evaluate(e, batch, self.name)
            n = e.output_name
            if n in names:
                arrays[names.index(n)] = arr
            else:
                names.append(n)
                arrays.append(arr)
        return (pa.RecordBatch.from_arrays(arrays, names=names),)


class FilterExpr(Operator):
    """``filter(expr)``: keep rows where the boolean expression is true (null counts as false)."""

    def __init__(self, expr: Any) -> None:
        super().__init__(f"Filter({expr!r})")
        self.expr = expr

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        mask = _evaluate(self.expr, batch, self.name)
        if not pa.types.is_boolean(mask.type):
            raise SchemaError(f"{self.name}: the filter expression must be boolean, got {mask.type}")
        if not mask.null_count and mask.true_count == len(mask):
            return (batch,)  # every row passes: no copy
        out = batch.filter(mask, null_selection_behavior="drop")
        # an empty result still carries the schema, so a join or aggregate downstream knows
        # the columns of an empty side
        return (out,)


class Drop(Operator):
    """``drop(*columns)``."""

    def __init__(self, columns: list[str]) -> None:
        super().__init__(f"Drop({', '.join(columns)})")
        self.columns = columns

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        keep = [i for i, n in enumerate(batch.schema.names) if n not in self.columns]
        return (batch.select(keep),)


class Rename(Operator):
    """``rename({old: new})``."""

    def __init__(self, mapping: dict[str, str]) -> None:
        super().__init__(f"Rename({mapping})")
        self.mapping = mapping

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        names = [self.mapping.get(n, n) for n in batch.schema.names]
        return (batch.rename_columns(names),)


class Explode(Operator):
    """``explode(column)``: one row per element of a list column (empty/null lists vanish)."""

    def __init__(self, column: str) -> None:
        super().__init__(f"Explode({column})")
        self.column = column

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        idx = batch.schema.get_field_index(self.column)
        if idx < 0:
            raise SchemaError(f"{self.name}: no column {self.column!r}; columns are "
                              f"{batch.schema.names}")
        lists = batch.column(idx)
        if not (pa.types.is_list(lists.type) or pa.types.is_large_list(lists.type)):
            raise SchemaError(f"{self.name}: column {self.column!r} is {lists.type}, not a list")
        values = pc.list_flatten(lists)
        if len(values) == 0:
            schema = batch.schema.set(idx, pa.field(self.column, lists.type.value_type))
            return (pa.RecordBatch.from_pylist([], schema=schema),)
        if batch.num_columns == 1:
            return (pa.RecordBatch.from_arrays([values], names=[self.column]),)
        taken = batch.take(pc.list_parent_indices(lists))
        arrays = list(taken.columns)
        arrays[idx] = values
        return (pa.RecordBatch.from_arrays(arrays, names=batch.schema.names),)


class LocalLimit(Operator):
    """Stop after ``n`` rows in this task (the global limit follows after a merge)."""

    def __init__(self, n: int) -> None:
        super().__init__(f"Limit({n})")
        self.n = n
        self.seen = 0

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        remaining = self.n - self.seen
        if remaining <= 0:
            # nothing more to pass, but an empty batch still tells what follows the columns
            return (batch.slice(0, 0),) if not self.seen else _EMPTY
        if batch.num_rows > remaining:
            batch = batch.slice(0, remaining)
        self.seen += batch.num_rows
        return (batch,)

    @property
    def done(self) -> bool:
        """True when no more input is needed (lets the task stop reading early)."""
        return self.seen >= self.n

