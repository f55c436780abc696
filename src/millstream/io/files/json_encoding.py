"""JSON-lines encoding of Arrow data, vectorized per column (the JSON sinks, Kafka values,
values shown as JSON text)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_ESCAPES = (("\\", "\\\\"), ('"', '\\"'), ("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t"),
            ("\b", "\\b"), ("\f", "\\f"))


def _python_fragments(array: pa.Array) -> pa.Array:
    def default(value: Any) -> Any:
        if isinstance(value, (bytes, bytearray)):
            import base64
            return base64.b64encode(bytes(value)).decode("ascii")
        if hasattr(value, "isoformat"):
            return value.isoformat()
        return str(value)
    values = array.to_pylist()
    if pa.types.is_map(array.type):
        values = [dict(v) if v is not None else None for v in values]
    return pa.array([json.dumps(v, default=default, ensure_ascii=False, allow_nan=False)
                     if v is not None else "null" for v in values], pa.string())


def _string_fragments(array: pa.Array) -> pa.Array:
    s = array.cast(pa.string())
    for old, new in _ESCAPES:
        s = pc.replace_substring(s, old, new)
    if pc.any(pc.match_substring_regex(s, "[\\x00-\\x1f]")).as_py():
        return _python_fragments(array.cast(pa.string()))
    return pc.fill_null(pc.binary_join_element_wise('"', s, '"', ""), "null")


def json_fragments(array: pa.Array) -> pa.Array:
    """Each value of ``array`` as JSON text (nulls as ``null``), vectorized where possible."""
    t = array.type
    if pa.types.is_dictionary(t):
        return json_fragments(array.dictionary_decode())
    if pa.types.is_integer(t) or pa.types.is_decimal(t):
        return pc.fill_null(array.cast(pa.string()), "null")
    if pa.types.is_boolean(t):
        return pc.fill_null(array.cast(pa.string()), "null")
    if pa.types.is_floating(t):
        finite = pc.is_finite(array)
        s = array.cast(pa.string())
        s = pc.if_else(pc.match_substring_regex(s, "^-?[0-9]+$"),
                       pc.binary_join_element_wise(s, ".0", ""), s)
        return pc.fill_null(pc.if_else(finite, s, pa.scalar(None, pa.string())), "null")
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return _string_fragments(array)
    if (pa.types.is_date(t) or pa.types.is_timestamp(t) or pa.types.is_time(t)
            or pa.types.is_duration(t)):
        return _string_fragments(array.cast(pa.string()))
    if pa.types.is_null(t):
        return pa.array(["null"] * len(array), pa.string())
    return _python_fragments(array)


def encode_json_lines(table: pa.Table | pa.RecordBatch) -> pa.Buffer:
    """Encode rows as JSON lines (one object per line, each ending with a newline)."""
    n = table.num_rows
    if n == 0:
        return pa.py_buffer(b"")
    if table.num_columns == 0:
        return pa.py_buffer(b"{}\n" * n)
    parts: list[Any] = []
    for i, name in enumerate(table.schema.names):
        column = table.column(i)
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        key = json.dumps(name, ensure_ascii=False)
        parts.append(("{" if i == 0 else ",") + key + ":")
        parts.append(json_fragments(column))
    parts.append("}\n")
    lines = pc.binary_join_element_wise(*parts, "")
    if isinstance(lines, pa.ChunkedArray):
        lines = lines.combine_chunks()
    offsets = np.frombuffer(lines.buffers()[1], dtype=np.int32)[lines.offset:lines.offset + n + 1]
    return lines.buffers()[2].slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
