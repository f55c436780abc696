"""``union_by_name=True``: one schema for files whose columns drift (DuckDB's option).

Columns are matched by name, in the order they are first seen; a column missing from a
file reads as null there; types are widened to a common one (int32 and int64 give
int64, int64 and double give double). A column whose types cannot be widened (int64 in
one file, string in another) is a :class:`~millstream.errors.SchemaError` naming the
column and the files of each type.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import pyarrow as pa

from millstream.errors import SchemaError

T = TypeVar("T")
R = TypeVar("R")

#: Files looked at in parallel while planning (object stores are latency bound).
PLANNING_THREADS = 16


def widen(a: pa.DataType, b: pa.DataType) -> pa.DataType:
    """The type both ``a`` and ``b`` widen to (ArrowTypeError/ArrowInvalid if none)."""
    if a == b:
        return a
    return pa.unify_schemas([pa.schema([("c", a)]), pa.schema([("c", b)])],
                            promote_options="permissive").field(0).type


def files_by_type(name: str, named: Sequence[tuple[str, pa.Schema]]) -> str:
    """``int64 in a.csv, b.csv; string in c.csv`` for column ``name``."""
    groups: dict[str, list[str]] = {}
    for where, schema in named:
        i = schema.get_field_index(name)
        if i != -1:
            groups.setdefault(str(schema.field(i).type), []).append(where)
    parts = []
    for type_name, wheres in groups.items():
        more = f" and {len(wheres) - 3} more" if len(wheres) > 3 else ""
        parts.append(f"{type_name} in {', '.join(wheres[:3])}{more}")
    return "; ".join(parts)


def unify_by_name(what: str, named: Sequence[tuple[str, pa.Schema]]) -> pa.Schema:
    """One schema for ``(file, schema)`` pairs (see module doc); ``what`` names the input."""
    fields: dict[str, pa.DataType] = {}
    for _, schema in named:
        for field in schema:
            have = fields.get(field.name)
            if have is None or pa.types.is_null(have):
                fields[field.name] = field.type
                continue
            if pa.types.is_null(field.type):
                continue
            try:
                fields[field.name] = widen(have, field.type)
            except (pa.ArrowTypeError, pa.ArrowInvalid):
                raise SchemaError(
                    f"{what}: column {field.name!r} has types that cannot be unified: "
                    f"{files_by_type(field.name, named)}; pass schema=... to read it as "
                    f"one type") from None
    return pa.schema(list(fields.items()))


def in_threads(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[fn(x) for x in items]``, in planning threads."""
    if len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(PLANNING_THREADS, len(items))) as ex:
        return list(ex.map(fn, items))


def is_stringish(t: pa.DataType) -> bool:
    """A string type (plain, large or view), or a dictionary of one."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    return (pa.types.is_string(t) or pa.types.is_large_string(t)
            or pa.types.is_string_view(t))


def is_binaryish(t: pa.DataType) -> bool:
    """A binary type (plain, large or view), or a dictionary of one."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    return (pa.types.is_binary(t) or pa.types.is_large_binary(t)
            or pa.types.is_binary_view(t))


def converts(got: pa.DataType, want: pa.DataType) -> bool:
    """Whether a file's column of type ``got`` reads without loss as ``want``."""
    if (is_stringish(got) and is_stringish(want)) or (is_binaryish(got) and is_binaryish(want)):
        return True
    if pa.types.is_dictionary(got):
        got = got.value_type
        if got == want:
            return True
    try:
        return widen(got, want) == want
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        return False
