"""Arrow helpers shared by operators: schema unification, row <-> batch conversion, sizes.

Values Arrow cannot type travel pickled in a binary column whose field metadata marks
it; ``batch_to_rows`` unpickles them. That is the slow path, never the only path.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from typing import Any

import pyarrow as pa

PICKLED_KEY = b"millstream.pickled"


def without_view_types(schema: pa.Schema) -> pa.Schema | None:
    """``schema`` with ``string_view``/``binary_view`` columns as ``string``/``binary`` (what the
    engine's kernels take: Arrow cannot ``take`` or sort views everywhere yet), or None when
    it has none."""
    def plain(t: pa.DataType) -> pa.DataType:
        if pa.types.is_string_view(t):
            return pa.string()
        if pa.types.is_binary_view(t):
            return pa.binary()
        return t

    fields = [f.with_type(plain(f.type)) for f in schema]
    if all(a.type.equals(b.type) for a, b in zip(fields, schema)):
        return None
    return pa.schema(fields, metadata=schema.metadata)


#: Empty batches by schema (they are immutable): typing an expression evaluates it on one,
#: and the optimizer types the same expressions over the same schemas many times.
_EMPTY: dict[pa.Schema, pa.RecordBatch] = {}
EMPTY_CACHE_SIZE = 512


def empty_batch(schema: pa.Schema) -> pa.RecordBatch:
    """A record batch with ``schema`` and no rows (one per schema, shared)."""
    batch = _EMPTY.get(schema)
    if batch is None or not batch.schema.equals(schema, check_metadata=True):
        batch = pa.RecordBatch.from_arrays([pa.array([], type=f.type) for f in schema],
                                           schema=schema)
        if len(_EMPTY) >= EMPTY_CACHE_SIZE:
            _EMPTY.clear()
        _EMPTY[schema] = batch
    return batch


def batch_nbytes(batch: pa.RecordBatch | pa.Table) -> int:
    """Bytes held by a batch's buffers (cheap; counts shared buffers once per column)."""
    try:
        return batch.get_total_buffer_size()
    except Exception:  # pragma: no cover - very old pyarrow
        return batch.nbytes


def unify_schemas(schemas: Iterable[pa.Schema]) -> pa.Schema:
    """One schema all given schemas can be cast to (null -> any, int -> wider, ...)."""
    schemas = list(schemas)
    if not schemas:
        return pa.schema([])
    first = schemas[0]
    if all(s.equals(first) for s in schemas[1:]):
        return first
    try:
        return pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        # Same names, incompatible types (e.g. int vs string from row functions):
        # fall back to pickled binary for the conflicting columns.
        names: list[str] = []
        for s in schemas:
            for n in s.names:
                if n not in names:
                    names.append(n)
        fields = []
        for n in names:
            types = [s.field(n).type for s in schemas if n in s.names]
            try:
                t = pa.unify_schemas([pa.schema([(n, ty)]) for ty in types],
                                     promote_options="permissive").field(n).type
                fields.append(pa.field(n, t))
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                fields.append(pa.field(n, pa.binary(), metadata={PICKLED_KEY: b"1"}))
        return pa.schema(fields)


def cast_batch(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """Cast a batch to ``schema``, adding missing columns as nulls, ordering as the schema."""
    if batch.schema.equals(schema):
        return batch
    cols = []
    for field in schema:
        idx = batch.schema.get_field_index(field.name)
        if idx < 0:
            cols.append(pa.nulls(batch.num_rows, type=field.type))
            continue
        arr = batch.column(idx)
        if arr.type.equals(field.type):
            cols.append(arr)
        elif field.metadata and field.metadata.get(PICKLED_KEY) and not _is_pickled(
                batch.schema.field(idx)):
            cols.append(pa.array([None if v is None else pickle.dumps(v) for v in arr.to_pylist()],
                                 type=pa.binary()))
        else:
            cols.append(arr.cast(field.type))
    return pa.RecordBatch.from_arrays(cols, schema=schema)


def concat_batches(batches: list[pa.RecordBatch], schema: pa.Schema | None = None) -> pa.Table:
    """Concatenate batches that may differ in schema into one table."""
    if not batches:
        return pa.table({}) if schema is None else schema.empty_table()
    target = schema or unify_schemas(b.schema for b in batches)
    return pa.Table.from_batches([cast_batch(b, target) for b in batches], schema=target)


def _is_pickled(field: pa.Field) -> bool:
    return bool(field.metadata and field.metadata.get(PICKLED_KEY))


def batch_to_rows(batch: pa.RecordBatch | pa.Table) -> list[dict[str, Any]]:
    """Python dict rows of a batch, unpickling pickled columns."""
    rows = batch.to_pylist()
    pickled = [f.name for f in batch.schema if _is_pickled(f)]
    if pickled:
        for r in rows:
            for n in pickled:
                v = r.get(n)
                if v is not None:
                    r[n] = pickle.loads(v)
    return rows


def column_to_pylist(arr: pa.Array | pa.ChunkedArray, field: pa.Field) -> list[Any]:
    """Python values of a column, unpickling when the field is marked pickled."""
    values = arr.to_pylist()
    if _is_pickled(field):
        return [None if v is None else pickle.loads(v) for v in values]
    return values


def _column_from_values(name: str, values: list[Any]) -> tuple[pa.Field, pa.Array]:
    try:
        arr = pa.array(values)
        return pa.field(name, arr.type), arr
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError,
            TypeError, ValueError):
        arr = pa.array([None if v is None else pickle.dumps(v) for v in values], type=pa.binary())
        return pa.field(name, pa.binary(), metadata={PICKLED_KEY: b"1"}), arr


def rows_to_batch(rows: list[Any], schema: pa.Schema | None = None) -> pa.RecordBatch:
    """A record batch from dict rows; values Arrow cannot type are pickled.

    Non-dict rows become a single column ``value`` (so ``map(lambda r: r["x"] * 2)`` works).
    """
    if not rows:
        return pa.RecordBatch.from_pylist([], schema=schema)
    if not isinstance(rows[0], dict) or not all(isinstance(r, dict) for r in rows):
        rows = [r if isinstance(r, dict) else {"value": r} for r in rows]
    if schema is not None:
        try:
            return pa.RecordBatch.from_pylist(rows, schema=schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
            pass
    names: list[str] = []
    seen: set[str] = set()
    for r in rows:
        for k in r:
            if k not in seen:
                seen.add(k)
                names.append(k)
    try:
        if len(names) == len(rows[0]):
            return pa.RecordBatch.from_pylist(rows)
        # from_pylist takes the column names from the first row only: keys that first
        # appear in later rows would be dropped
        return pa.RecordBatch.from_pydict({n: [r.get(n) for r in rows] for n in names})
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError,
            TypeError, ValueError):
        pass
    fields, arrays = [], []
    for n in names:
        if not isinstance(n, str):
            raise TypeError(f"row keys must be strings, got {n!r} ({type(n).__name__})")
        f, a = _column_from_values(n, [r.get(n) for r in rows])
        fields.append(f)
        arrays.append(a)
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))


def table_to_batches(table: pa.Table, max_rows: int = 65536) -> list[pa.RecordBatch]:
    """Record batches of a table, combined into chunks of at most ``max_rows``."""
    if table.num_rows == 0:
        return []
    return table.combine_chunks().to_batches(max_chunksize=max_rows)


def normalize_key(arr: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """A key column as grouping and joining compare it: dictionaries decoded, string and
    binary views as plain strings and binaries, -0.0 as 0.0.

    Arrow's hash kernels compare floats bit by bit, so -0.0 and 0.0 would form two groups
    and never join; SQL (and our partitioner) treats them as equal.
    """
    import pyarrow.compute as pc

    t = arr.type
    if pa.types.is_dictionary(t):
        arr = arr.cast(t.value_type)
        t = arr.type
    if pa.types.is_string_view(t) or pa.types.is_binary_view(t):
        # Arrow's take and filter kernels have no view types yet (shuffles and merges take)
        arr = arr.cast(pa.string() if pa.types.is_string_view(t) else pa.binary())
        t = arr.type
    if pa.types.is_floating(t):
        zero = pa.scalar(0.0, t)
        arr = pc.if_else(pc.equal(arr, zero), zero, arr)
    return arr


# --------------------------------------------------------------------------- event time

_MICROS_PER_UNIT = {"s": 1_000_000, "ms": 1_000, "us": 1}


def event_time_micros(arr: pa.Array | pa.ChunkedArray, column: str
                      ) -> tuple[Any, Any]:
    """Event times as an int64 numpy array of epoch microseconds, and a bool validity mask or None.

    Accepts an Arrow timestamp column (any unit, with or without a time zone), an integer
    column of epoch milliseconds, or a date column. Nanoseconds are floored to microseconds.
    """
    import numpy as np

    from millstream.errors import SchemaError

    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], arr.type)
    t = arr.type
    valid = None
    if arr.null_count:
        valid = np.asarray(arr.is_valid(), dtype=bool)
    if pa.types.is_timestamp(t):
        raw = arr.view(pa.int64())
        vals = np.asarray(raw.fill_null(0) if valid is not None else raw, dtype=np.int64)
        if t.unit == "ns":
            vals = np.floor_divide(vals, 1000)
        elif _MICROS_PER_UNIT[t.unit] != 1:
            vals = vals * _MICROS_PER_UNIT[t.unit]
    elif pa.types.is_integer(t):
        raw = arr.cast(pa.int64())
        vals = np.asarray(raw.fill_null(0) if valid is not None else raw, dtype=np.int64) * 1000
    elif pa.types.is_date32(t):
        raw = arr.view(pa.int32()).cast(pa.int64())
        vals = np.asarray(raw.fill_null(0), dtype=np.int64) * 86_400_000_000
    elif pa.types.is_date64(t):
        raw = arr.view(pa.int64())
        vals = np.asarray(raw.fill_null(0), dtype=np.int64) * 1000
    else:
        raise SchemaError(f"event time column {column!r} has type {t}; expected a timestamp, "
                          f"a date, or an integer of epoch milliseconds")
    return np.ascontiguousarray(vals, dtype=np.int64), valid


def format_table(table: pa.Table, num_rows: int = 20, truncate: bool = True) -> str:
    """A text table of the first ``num_rows`` rows (Spark's ``show`` layout: columns at
    least 3 wide, values right-aligned, cut to 20 characters unless ``truncate=False``)."""
    names = table.column_names
    rows = batch_to_rows(table.slice(0, num_rows))

    def cell(v: Any) -> str:
        text = "null" if v is None else str(v)
        return text[:17] + "..." if truncate and len(text) > 20 else text

    cells = [[cell(r.get(n)) for n in names] for r in rows]
    widths = [max([3, len(n), *(len(c[i]) for c in cells)]) for i, n in enumerate(names)]
    sep = "+" + "+".join("-" * w for w in widths) + "+"
    lines = [sep, "|" + "|".join(n.rjust(w) for n, w in zip(names, widths)) + "|", sep]
    lines += ["|" + "|".join(v.rjust(w) for v, w in zip(c, widths)) + "|" for c in cells]
    lines.append(sep)
    if table.num_rows > num_rows:
        lines.append(f"only showing top {num_rows} rows")
    return "\n".join(lines)
