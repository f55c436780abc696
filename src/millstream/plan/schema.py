"""Output schemas of logical nodes: the column rules the physical operators follow.

The logical nodes (``plan/logical.py``) derive their schema bottom-up with these helpers;
each rule mirrors what its operator produces (where possible with the operator's own code:
aggregates run on no rows, joins use the operators' ``JoinLayout``), so ``Dataset.schema``
equals the schema of the result.
A missing column raises a :class:`~millstream.errors.SchemaError` naming it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa

from millstream.core.arrow import unify_schemas
from millstream.errors import SchemaError
from millstream.expr.aggregates import AggSpec
from millstream.expr.analytic import WindowFunction
from millstream.expr.nodes import Expr

#: Columns a window result starts with (window aggregates and window joins).
WINDOW_BOUNDS = ("window_start", "window_end")


def require(schema: pa.Schema, columns: Iterable[str], what: str) -> None:
    """Raise a SchemaError naming the ``columns`` that ``schema`` lacks."""
    missing = [c for c in columns if schema.get_field_index(c) < 0]
    if missing:
        raise SchemaError(f"{what}: no column(s) {missing}; columns are {schema.names}")


def expr_field(expr: Expr, schema: pa.Schema, what: str) -> pa.Field:
    """The field an expression computes on rows of ``schema``."""
    try:
        return pa.field(expr.output_name, expr.output_type(schema))
    except SchemaError as exc:
        raise SchemaError(f"{what}: {exc}") from None


def project_schema(schema: pa.Schema, exprs: Sequence[Expr], what: str) -> pa.Schema:
    """``select``: exactly the expressions' columns, in order."""
    return pa.schema([expr_field(e, schema, what) for e in exprs])


def with_columns_schema(schema: pa.Schema, exprs: Sequence[Expr], what: str) -> pa.Schema:
    """``with_columns``: every expression reads the input; a name already present is
    replaced in place, a new one is appended."""
    fields = list(schema)
    names = list(schema.names)
    for e in exprs:
        f = expr_field(e, schema, what)
        if f.name in names:
            fields[names.index(f.name)] = f
        else:
            names.append(f.name)
            fields.append(f)
    return pa.schema(fields)


def window_schema(schema: pa.Schema, partition_by: Sequence[str],
                  functions: Sequence[WindowFunction], what: str) -> pa.Schema:
    """Window functions (``Window``): as ``with_columns``, one column per function, typed
    as ``ops.analytic`` computes it (aggregates as the group-by types them)."""
    require(schema, partition_by, what)
    fields = list(schema)
    names = list(schema.names)
    for fn in functions:
        try:
            from millstream.ops.analytic import window_field

            f = window_field(fn, schema)
        except SchemaError as exc:
            raise SchemaError(f"{what}: {fn.describe()}: {exc}") from None
        if f.name in names:
            fields[names.index(f.name)] = f
        else:
            names.append(f.name)
            fields.append(f)
    return pa.schema(fields)


def filter_schema(schema: pa.Schema, predicate: Expr, what: str) -> pa.Schema:
    """``filter(expr)``: the input's columns; the predicate must be boolean."""
    t = expr_field(predicate, schema, what).type
    if not pa.types.is_boolean(t):
        raise SchemaError(f"{what}: the filter expression must be boolean, got {t}")
    return schema


def explode_schema(schema: pa.Schema, column: str, what: str) -> pa.Schema:
    """``explode``: the list column becomes its element type."""
    require(schema, [column], what)
    i = schema.get_field_index(column)
    t = schema.field(i).type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)):
        raise SchemaError(f"{what}: column {column!r} is {t}, not a list")
    return schema.set(i, pa.field(column, t.value_type))


def aggregate_schema(schema: pa.Schema, keys: Sequence[str], specs: Sequence[AggSpec],
                     what: str) -> pa.Schema | None:
    """Keys then aggregates, typed as the aggregation operators type them (None when
    Arrow cannot group these types: the job raises its own error)."""
    require(schema, keys, what)
    arg_types = [expr_field(s.arg, schema, what).type if s.arg is not None else None
                 for s in specs]
    memo_key = _aggregate_key(schema, keys, specs, arg_types)
    hit = _AGG_SCHEMAS.get(memo_key) if memo_key is not None else None
    if hit is not None:
        return hit
    try:
        from millstream.ops.aggregate import aggregate_result_schema

        out = aggregate_result_schema(schema, list(keys), list(specs))
    except SchemaError as exc:
        raise SchemaError(f"{what}: {exc}") from None
    except (pa.ArrowException, TypeError, ValueError):
        return None
    if memo_key is not None:
        if len(_AGG_SCHEMAS) >= 1024:
            _AGG_SCHEMAS.clear()
        _AGG_SCHEMAS[memo_key] = out
    return out


#: Aggregate output schemas by what they depend on (the keys' fields, each aggregate's
#: function, name, parameters and argument type): the optimizer rebuilds aggregates many
#: times, and typing one runs the aggregation on no rows (about a millisecond).
_AGG_SCHEMAS: dict[Any, pa.Schema] = {}


def _aggregate_key(schema: pa.Schema, keys: Sequence[str], specs: Sequence[AggSpec],
                   arg_types: list[pa.DataType | None]) -> Any:
    try:
        key = (tuple(schema.field(k) for k in keys),
               tuple((s.func, s.name, tuple(sorted(s.params.items())), t)
                     for s, t in zip(specs, arg_types)))
        hash(key)
    except (TypeError, KeyError):
        return None
    return key


def join_schema(left: pa.Schema, right: pa.Schema, left_on: Sequence[str],
                right_on: Sequence[str], how: str, suffix: str, what: str,
                condition: Expr | None = None) -> pa.Schema | None:
    """The joins' output (``ops.join.JoinLayout``, the layout the operators use): left
    columns, then right columns; same-named keys once; other clashes get ``suffix``; semi
    and anti joins the left columns only. A residual ``condition`` must be a boolean
    expression over the inner join's columns (right clashes carrying the suffix)."""
    require(left, left_on, f"{what} (left side)")
    require(right, right_on, f"{what} (right side)")
    try:
        from millstream.ops.join import JoinLayout

        layout = JoinLayout(left, right, list(left_on), list(right_on), how, suffix)
    except SchemaError as exc:
        raise SchemaError(f"{what}: {exc}") from None
    except (pa.ArrowException, TypeError, ValueError):
        return None
    if condition is not None:
        t = expr_field(condition, layout.pair_schema, f"{what} (condition)").type
        if not pa.types.is_boolean(t):
            raise SchemaError(f"{what}: the join condition must be boolean, got {t}")
    return layout.schema


def _common_type(a: pa.DataType, b: pa.DataType, name: str, what: str) -> pa.DataType:
    from millstream.ops.join.keys import unified_type

    t = unified_type(a, b)
    if t is None:
        raise SchemaError(f"{what}: key {name!r} is {a} on the left and {b} on the right; "
                          f"these cannot be compared, cast one side")
    return t


def stream_join_schema(left: pa.Schema, right: pa.Schema, left_on: Sequence[str],
                       right_on: Sequence[str], how: str, suffix: str, what: str,
                       prefix: Sequence[pa.Field] = ()) -> pa.Schema:
    """The stream joins' output (``ops.stream_join``): ``prefix``, the left columns (a
    same-named key coalesced for right and outer joins), the right columns without the
    same-named keys, a name already taken getting ``suffix``."""
    require(left, left_on, f"{what} (left side)")
    require(right, right_on, f"{what} (right side)")
    shared = {a for a, b in zip(left_on, right_on) if a == b}
    coalesce = how in ("right", "outer")
    fields = list(prefix)
    for f in left:
        if f.name in shared and coalesce and f.name in right.names:
            f = pa.field(f.name, _common_type(f.type, right.field(f.name).type, f.name, what))
        fields.append(f)
    taken = {f.name for f in fields}
    for f in right:
        if f.name in shared:
            continue
        fields.append(f if f.name not in taken else f.with_name(f.name + suffix))
    return pa.schema(fields)


def event_time_zone(schema: pa.Schema, column: str | None) -> str | None:
    """The time zone of a timestamp event-time column (window bounds carry it), else None."""
    if column is None or schema.get_field_index(column) < 0:
        return None
    t = schema.field(column).type
    return t.tz if pa.types.is_timestamp(t) else None


def window_bounds(tz: str | None) -> list[pa.Field]:
    """``window_start`` and ``window_end``: timestamps in microseconds."""
    ts = pa.timestamp("us", tz=tz)
    return [pa.field(n, ts) for n in WINDOW_BOUNDS]


def union_schema(schemas: Sequence[pa.Schema]) -> pa.Schema:
    """Inputs concatenated by column name (types widened as the result is concatenated)."""
    return unify_schemas(schemas)
