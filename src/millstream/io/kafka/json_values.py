"""Kafka JSON values to Arrow: every value one line (pretty-printed ones re-serialized),
parsed in blocks with one schema, bad values found apart; schemas inferred from a sample
(a field null in the whole sample is typed string and read as text)."""

from __future__ import annotations

import bisect
import json
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.json as pajson

from millstream.io.files.badrecords import parse_with_recovery


def _looks_bad(line: bytes) -> bool:
    """Cheap suspect test for the bad-record search: not one JSON object on the line."""
    text = line.strip()
    return not text.startswith(b"{") or not text.endswith(b"}")


def _read_json(buf: pa.Buffer, schema: pa.Schema | None, infer_others: bool = False
               ) -> pa.Table:
    if schema is None:
        options = pajson.ParseOptions(unexpected_field_behavior="infer")
    else:
        options = pajson.ParseOptions(explicit_schema=schema,
                                      unexpected_field_behavior="infer" if infer_others
                                      else "ignore")
    read = pajson.ReadOptions(use_threads=False, block_size=max(1 << 16, buf.size + 1))
    return pajson.read_json(pa.BufferReader(buf), read_options=read, parse_options=options)


def _as_text(array: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Values of any type as text: strings unchanged, others as their JSON text."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        return array.cast(pa.string())
    if pa.types.is_null(array.type):
        return pa.nulls(len(array), pa.string())
    from millstream.io.files.json_encoding import json_fragments

    text = json_fragments(array)
    return pa.array([None if v is None else t for v, t in
                     zip(array.to_pylist(), text.to_pylist())], pa.string())


def _normalize_value(value: bytes) -> tuple[bytes | None, str | None]:
    """One JSON value as a single line, or (None, reason) when it cannot be one."""
    if not value.strip():
        return None, "empty value (not a JSON object)"
    if b"\n" in value or b"\r" in value:
        # Pretty-printed JSON: re-serialize on one line (raw newlines inside strings are
        # invalid JSON and stay errors).
        try:
            obj = json.loads(value)
        except (ValueError, UnicodeDecodeError) as exc:
            return None, f"invalid JSON: {exc}"
        if not isinstance(obj, dict):
            return None, f"a JSON {type(obj).__name__}, not an object"
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode(), None
    return value, None


@dataclass
class _Parsed:
    table: pa.Table | None          # data rows of the kept JSON values, in order
    kept: list[int]                 # message index of each kept JSON row
    bad: list[tuple[int, str]]      # (message index, reason)


def _parse_json_values(values: Sequence[bytes], schema: pa.Schema | None,
                       late: Sequence[str] = ()) -> _Parsed:
    """Parse JSON object values (none None) with ``schema`` (inferred when None).

    ``late`` fields are read as text, whatever JSON type their values have.
    """
    bad: list[tuple[int, str]] = []
    lines: list[bytes] = []
    index: list[int] = []
    for i, raw in enumerate(values):
        line, reason = _normalize_value(raw)
        if line is None:
            bad.append((i, reason or "malformed record"))
        else:
            lines.append(line)
            index.append(i)
    if not lines:
        return _Parsed(None, [], sorted(bad))
    data = b"\n".join(lines) + b"\n"
    starts = [0]
    for line in lines[:-1]:
        starts.append(starts[-1] + len(line) + 1)
    late_set = [name for name in late if schema is not None and name in schema.names]
    fixed = (pa.schema([f for f in schema if f.name not in late_set])
             if schema is not None else None)

    def parse(buf: pa.Buffer) -> pa.Table | None:
        if schema is None or not late_set:
            return _read_json(buf, schema)
        table = _read_json(buf, fixed, infer_others=True)
        columns = []
        for field in schema:
            i = table.schema.get_field_index(field.name)
            if field.name in late_set:
                columns.append(_as_text(table.column(i)) if i != -1
                               else pa.nulls(table.num_rows, pa.string()))
            else:
                columns.append(table.column(i))
        return pa.Table.from_arrays(columns, schema=schema)

    bad_lines: set[int] = set()

    def on_bad(lo: int, hi: int, reason: str) -> None:
        line_no = bisect.bisect_right(starts, lo) - 1
        text = lines[line_no].decode("utf-8", errors="replace")
        if reason.endswith(": " + text):  # pyarrow appends the row; it is reported apart
            reason = reason[:-len(text) - 2]
        bad_lines.add(line_no)
        bad.append((index[line_no], reason))

    tables = parse_with_recovery(data, parse, on_bad,
                                 expected_rows=lambda d, lo, hi: d.count(b"\n", lo, hi),
                                 prescreen=_looks_bad)
    kept = [index[j] for j in range(len(lines)) if j not in bad_lines]
    table = None
    if tables:
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
        if schema is not None and table.schema != schema:
            table = table.select(schema.names).cast(schema)
    return _Parsed(table, kept, sorted(bad))


def _infer_data_schema(values: Sequence[bytes]) -> tuple[pa.Schema | None, tuple[str, ...]]:
    """(schema, late fields) inferred from sample values; (None, ()) without a valid object.

    Parts of the sample parsed apart are unified (int + float -> float; an
    irreconcilable clash keeps the first type seen). A field null in the whole sample is
    typed string and read as text ("late").
    """
    from millstream.io.files.csv import merge_inferred

    lines = [line for line in (_normalize_value(v)[0] for v in values if v is not None)
             if line is not None]
    if not lines:
        return None, ()
    data = b"\n".join(lines) + b"\n"
    tables = parse_with_recovery(data, lambda buf: _read_json(buf, None),
                                 lambda lo, hi, why: None,
                                 expected_rows=lambda d, lo, hi: d.count(b"\n", lo, hi),
                                 prescreen=_looks_bad)
    schemas = [t.schema for t in tables if t.num_rows]
    if not schemas:
        return None, ()
    schema = schemas[0] if len(schemas) == 1 else merge_inferred(schemas, conflict="first")
    late = tuple(f.name for f in schema if pa.types.is_null(f.type))
    schema = pa.schema([pa.field(f.name, pa.string()) if f.name in late else f
                        for f in schema])
    return schema, late
