"""Narrow (per-batch) operators: row functions, vectorized batch functions, expressions.

They keep no state across batches, so a chain of them is fused into one task.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from millstream.core.arrow import batch_to_rows, rows_to_batch
from millstream.core.changelog import CHANGE, without_kinds
from millstream.errors import NonRetryableError, SchemaError, UserCodeFailure
from millstream.expr.filter_mask import NotBoolean, filter_mask
from millstream.expr.nodes import Expr
from millstream.expr.subexpr import shared_subexpressions
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
        if isinstance(out[0], (types.GeneratorType, Iterator)) and not isinstance(out[0], dict):
            raise BadReturnValue(self.name, function_name(fn), TypeError(
                f"returned a generator for the row {_short(rows[0])}: map makes one row per "
                f"input row; to make zero or more rows per input row, use flat_map(...) with "
                f"the same function"), _short(rows[0]))
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
    """``filter(fn)`` with a Python predicate on dict rows (a row's change kind, if any,
    stays with it and is not shown to ``fn``)."""

    kind = "Filter"
    accepts_updates = True

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        fn = self.fn
        rows = batch_to_rows(without_kinds(batch))
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


#: What a ``map_batches`` function may return, for messages.
BATCH_RESULTS = ("a pyarrow Table/RecordBatch, a pandas/polars DataFrame, a dict of "
                 "equal-length columns, or a list of dict rows")


class BadBatchResult(TypeError):
    """A ``map_batches`` function returned something that is not a table."""


class BadReturnValue(UserCodeFailure, NonRetryableError):
    """A user function returned a value of the wrong kind: it would on every attempt."""

    def __init__(self, operator: str, function: str, original: BaseException,
                 record: str | None = None):
        super().__init__(operator, function, original, record)
        self.args = (f"{function} in operator {operator} {original}",)


def _describe(value: Any) -> str:
    kind = type(value)
    name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"
    return f"{name} {_short(value, 80)}"


def _is_column(value: Any) -> bool:
    """A sized, one-dimensional run of values (not a string, not a scalar)."""
    if isinstance(value, (pa.Array, pa.ChunkedArray, list, tuple, range)):
        return True
    ndim = getattr(value, "ndim", None)
    if ndim is not None:  # numpy arrays, pandas and polars Series
        return ndim == 1
    return False


def _column_result(result: dict) -> list[pa.RecordBatch]:
    columns: dict[str, Any] = {}
    for name, values in result.items():
        if not isinstance(name, str):
            raise BadBatchResult(f"returned a dict with key {name!r}: the keys of a dict of columns are "
                                 f"names (strings)")
        if not _is_column(values):
            raise BadBatchResult(f"returned a dict whose column {name!r} is a "
                                 f"{_describe(values)}, not a list or array of values")
        columns[name] = values if isinstance(values, (pa.Array, pa.ChunkedArray)) \
            else (values if getattr(values, "ndim", None) == 1 else list(values))
    lengths = {name: len(v) for name, v in columns.items()}
    if len(set(lengths.values())) > 1:
        raise BadBatchResult("returned columns of different lengths: "
                             + ", ".join(f"{n}: {k}" for n, k in lengths.items()))
    try:
        return pa.Table.from_pydict(columns).to_batches()
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
        raise BadBatchResult(f"returned columns that do not convert to Arrow: {exc}") from None


def _to_record_batch(result: Any) -> list[pa.RecordBatch]:
    """The batches of a ``map_batches`` result; :class:`BadBatchResult` if it is no table."""
    if isinstance(result, pa.RecordBatch):
        return [result]
    if isinstance(result, pa.Table):
        return result.to_batches() or [pa.RecordBatch.from_pylist([], schema=result.schema)]
    mod = type(result).__module__
    kind = type(result).__name__
    if mod.startswith(("pandas", "polars")):
        if kind == "DataFrame":
            table = (pa.Table.from_pandas(result, preserve_index=False) if mod.startswith("pandas")
                     else result.to_arrow())
            return table.to_batches() or [pa.RecordBatch.from_pylist([], schema=table.schema)]
        if kind == "Series":
            raise BadBatchResult(f"returned a {mod.split('.')[0]} Series; return a DataFrame "
                                 f"(series.to_frame()) or a dict of columns")
        if kind == "LazyFrame":
            raise BadBatchResult("returned a polars LazyFrame; return lazy_frame.collect()")
    if isinstance(result, dict):
        return _column_result(result)
    if isinstance(result, list):
        if all(isinstance(row, dict) for row in result):
            return [rows_to_batch(result)] if result else []
        bad = next(row for row in result if not isinstance(row, dict))
        raise BadBatchResult(
            f"returned a list of {len(result)} values that are not all rows (dicts), e.g. "
            f"{_describe(bad)}: a list is read as rows. Return a dict of columns "
            f"({{'value': [...]}}) for a table, or use flat_map for rows made from each row")
    if result is None:
        raise BadBatchResult("returned None (a missing return?); to drop a batch, return an "
                             "empty table such as batch.slice(0, 0)")
    raise BadBatchResult(f"returned a {_describe(result)}")


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
        try:
            out = _to_record_batch(result)
        except BadBatchResult as exc:
            code = getattr(self.fn, "__code__", None)
            where = f", defined at {code.co_filename}:{code.co_firstlineno}" if code else ""
            err = BadBatchResult(f"{exc} (for a batch of {batch.num_rows} rows{where}; "
                                 f"accepted: {BATCH_RESULTS})")
            raise BadReturnValue(self.name, function_name(self.fn), err) from None
        # drop empty batches, but keep one when all are empty: it carries the schema
        return [b for b in out if b.num_rows] or out[:1] or _EMPTY


def _evaluate(expr: Any, batch: pa.RecordBatch, op: str) -> pa.Array:
    try:
        return expr.evaluate(batch)
    except SchemaError as exc:
        raise SchemaError(f"{op}: {exc}") from None


class Project(Operator):
    """``select(*exprs)``: the output has exactly these columns (and the rows' change
    kinds, if they have them)."""

    accepts_updates = True

    def __init__(self, exprs: list[Any]) -> None:
        super().__init__("Project(" + ", ".join(repr(e) for e in exprs) + ")")
        self.exprs = exprs

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        with shared_subexpressions(self.exprs):
            arrays = [_evaluate(e, batch, self.name) for e in self.exprs]
        names = [e.output_name for e in self.exprs]
        i = batch.schema.get_field_index(CHANGE)
        if i >= 0 and CHANGE not in names:
            arrays.append(batch.column(i))
            names.append(CHANGE)
        return (pa.RecordBatch.from_arrays(arrays, names=names),)


class WithColumns(Operator):
    """``with_columns(*exprs)``: add or replace columns, keep the others."""

    accepts_updates = True

    def __init__(self, exprs: list[Any]) -> None:
        super().__init__("WithColumns(" + ", ".join(repr(e) for e in exprs) + ")")
        self.exprs = exprs

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        names = list(batch.schema.names)
        arrays = list(batch.columns)
        with shared_subexpressions(self.exprs):
            computed = [_evaluate(e, batch, self.name) for e in self.exprs]
        for e, arr in zip(self.exprs, computed):
            n = e.output_name
            if n in names:
                arrays[names.index(n)] = arr
            else:
                names.append(n)
                arrays.append(arr)
        return (pa.RecordBatch.from_arrays(arrays, names=names),)


class FilterExpr(Operator):
    """``filter(expr)``: keep rows where the boolean expression is true (null counts as false)."""

    accepts_updates = True

    def __init__(self, expr: Any) -> None:
        super().__init__(f"Filter({expr!r})")
        self.expr = expr

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        if isinstance(self.expr, Expr):  # (expr.filter_mask: storage compares, AND/OR masks)
            try:
                keep = filter_mask(self.expr, batch)
            except SchemaError as exc:
                raise SchemaError(f"{self.name}: {exc}") from None
            except NotBoolean as exc:
                raise SchemaError(f"{self.name}: {exc}") from None
            if keep.all():
                return (batch,)  # every row passes: no copy
            return (batch.filter(pa.array(keep, pa.bool_())),)
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

    accepts_updates = True

    def __init__(self, columns: list[str], strict: bool = False) -> None:
        super().__init__(f"Drop({', '.join(columns)})")
        self.columns = columns
        self.strict = strict

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        if self.strict:
            _require(self.name, self.columns, batch.schema)
        keep = [i for i, n in enumerate(batch.schema.names) if n not in self.columns]
        return (batch.select(keep),)


class Rename(Operator):
    """``rename({old: new})``."""

    accepts_updates = True

    def __init__(self, mapping: dict[str, str], strict: bool = False) -> None:
        super().__init__(f"Rename({mapping})")
        self.mapping = mapping
        self.strict = strict

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        if self.strict:
            _require(self.name, list(self.mapping), batch.schema)
        names = [self.mapping.get(n, n) for n in batch.schema.names]
        return (batch.rename_columns(names),)


class Explode(Operator):
    """``explode(column)``: one row per element of a list column (empty/null lists vanish)."""

    accepts_updates = True

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


def _require(operator: str, names: list[str], schema: pa.Schema) -> None:
    """A SchemaError when rows lack columns ``operator`` names (strict drop and rename, where
    the columns were not known when the plan was built)."""
    missing = [n for n in names if schema.get_field_index(n) < 0]
    if missing:
        raise SchemaError(f"{operator}: no column(s) {missing}; columns are {schema.names}")
