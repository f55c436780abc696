"""The hidden normalized join keys of the keyed stream joins.

:class:`JoinKeys` appends normalized copies of the join keys (``__ms_jk0, __ms_jk1, ...``)
to both inputs before the key exchange, so equal key values hash to the same key group
whatever type each side gives them; :func:`match_keys` pairs rows on them.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from millstream.core.arrow import event_time_micros
from millstream.core.changelog import CHANGE
from millstream.errors import SchemaError
from millstream.ops.base import Batches, Operator

#: Prefix of the hidden normalized key columns the key exchange of a stream join hashes.
JOIN_KEY_PREFIX = "__ms_jk"


def join_key_names(n: int) -> list[str]:
    """Names of the ``n`` hidden normalized key columns."""
    return [f"{JOIN_KEY_PREFIX}{i}" for i in range(n)]


def normalize_join_key(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    """A key column in the form both sides of a stream join hash and compare."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], arr.type)
    t = arr.type
    if pa.types.is_dictionary(t):
        arr = arr.cast(t.value_type)
        t = arr.type
    if pa.types.is_integer(t):
        if pa.types.is_uint64(t):
            mx = pc.max(arr).as_py()
            if mx is not None and mx >= 2**63:
                return arr
        return arr.cast(pa.int64())
    if pa.types.is_floating(t):
        arr = arr.cast(pa.float64())
        zero = pa.scalar(0.0, pa.float64())
        return pc.if_else(pc.equal(arr, zero), zero, arr)
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        vals, valid = event_time_micros(arr, "join key")
        return pa.array(vals, pa.int64(), mask=None if valid is None else ~valid)
    if pa.types.is_time(t) or pa.types.is_duration(t):
        unit = t.unit
        raw = arr.cast(pa.int64()) if pa.types.is_duration(t) else \
            arr.view(pa.int32() if t.bit_width == 32 else pa.int64()).cast(pa.int64())
        mult = {"s": 1_000_000, "ms": 1_000, "us": 1}.get(unit)
        return pc.multiply(raw, mult) if mult is not None else pc.divide(raw, 1000)
    if pa.types.is_decimal(t):
        return pa.array([None if v is None else str(v.normalize()) for v in arr.to_pylist()],
                        pa.string())
    return arr


def data_schema(schema: pa.Schema | None) -> pa.Schema | None:
    """``schema`` without the change kinds and the hidden key columns (an input's user
    columns)."""
    if schema is None:
        return None
    drop = [i for i, f in enumerate(schema)
            if f.name == CHANGE or f.name.startswith(JOIN_KEY_PREFIX)]
    for i in reversed(drop):
        schema = schema.remove(i)
    return schema


def _strip(table: pa.Table) -> pa.Table:
    """The user's columns (hidden key columns dropped)."""
    hidden = [n for n in table.column_names if n.startswith(JOIN_KEY_PREFIX)]
    return table.drop_columns(hidden) if hidden else table


def _common_types(left: list[pa.DataType], right: list[pa.DataType], left_on: list[str],
                  right_on: list[str]) -> list[pa.DataType]:
    out = []
    for i, (lt, rt) in enumerate(zip(left, right)):
        if lt.equals(rt):
            out.append(lt)
            continue
        if pa.types.is_null(lt) or pa.types.is_null(rt):
            out.append(rt if pa.types.is_null(lt) else lt)
            continue
        try:
            out.append(pa.unify_schemas([pa.schema([("x", lt)]), pa.schema([("x", rt)])],
                                        promote_options="permissive").field("x").type)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise SchemaError(f"stream join: key {left_on[i]!r} is {lt} on the left and "
                              f"{right_on[i]!r} is {rt} on the right; these cannot be "
                              f"compared, cast one side (e.g. with_columns(...cast(...)))"
                              ) from exc
    return out


def match_keys(left: list[pa.Array], right: list[pa.Array], left_on: list[str],
               right_on: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (left row, right row) whose key columns are equal (nulls never match)."""
    n_l, n_r = (len(left[0]), len(right[0])) if left and right else (0, 0)
    if not n_l or not n_r:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    types = _common_types([a.type for a in left], [a.type for a in right], left_on, right_on)
    names = [f"k{i}" for i in range(len(left))]

    def table(cols: list[pa.Array], n: int, idx: str) -> pa.Table:
        arrays = [c if c.type.equals(t) else c.cast(t) for c, t in zip(cols, types)]
        return pa.table([*arrays, pa.array(np.arange(n, dtype=np.int64))], names=[*names, idx])

    joined = table(left, n_l, "li").join(table(right, n_r, "ri"), names, join_type="inner",
                                         use_threads=False)
    li = np.asarray(joined.column("li").combine_chunks() if joined.num_rows else [], np.int64)
    ri = np.asarray(joined.column("ri").combine_chunks() if joined.num_rows else [], np.int64)
    return li, ri


def _keys_valid(table: pa.Table, names: list[str]) -> np.ndarray:
    """True for rows whose hidden keys are all non-null."""
    ok = np.ones(table.num_rows, dtype=bool)
    for n in names:
        c = table.column(n)
        if c.null_count:
            ok &= np.asarray(pc.is_valid(c), dtype=bool)
    return ok


class JoinKeys(Operator):
    """Appends the hidden normalized join key columns the key exchange hashes."""

    def __init__(self, keys: list[str], side: str = "") -> None:
        super().__init__(f"JoinKeys({side + ', ' if side else ''}{keys})")
        self.keys = list(keys)
        self.hidden = join_key_names(len(self.keys))

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        """The batch with the hidden key columns set."""
        names = batch.schema.names
        missing = [k for k in self.keys if k not in names]
        if missing:
            raise SchemaError(f"join: no key column {missing[0]!r}; columns are "
                              f"{[n for n in names if not n.startswith(JOIN_KEY_PREFIX)]}")
        keep = [i for i, n in enumerate(names) if n not in self.hidden]
        arrays = [batch.column(i) for i in keep]
        out_names = [names[i] for i in keep]
        for k, h in zip(self.keys, self.hidden):
            arrays.append(normalize_join_key(batch.column(k)))
            out_names.append(h)
        return (pa.RecordBatch.from_arrays(arrays, names=out_names),)
