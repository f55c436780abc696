"""JSON-lines files: byte-range splits cut at line boundaries, parsed in blocks by pyarrow.

Every split parses with one schema fixed on the driver (``schema=`` or inferred from the
first block of the first file), so all splits agree on column types. Fields missing from
a record are null; fields not in the schema are ignored (pass ``schema=`` when fields
first appear late in the data, or ``union_by_name=True`` when they differ between files:
the schema is then inferred from the start of every file and unified by name, see
:mod:`millstream.io.files.union`). A line that is not a JSON object, or whose values do
not fit the schema, is a bad record (see :mod:`millstream.io.files.badrecords`), and so is
a line that does not decode as ``encoding`` (UTF-8 by default; ``encoding_errors=`` says
what to do instead, see :mod:`millstream.io.files.decoding`).
"""

from __future__ import annotations

import json as _json
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson

from millstream.core.context import TaskContext
from millstream.errors import PlanError
from millstream.io.files.badrecords import (
    BadRecordHandler,
    parse_line_chunk,
    parse_with_recovery,
)
from millstream.io.files.csv import DEFAULT_INFER_BYTES, fast_nonempty_lines, merge_inferred
from millstream.io.files.dead_letters import check_policy
from millstream.io.files.decoding import check_encoding, check_encoding_errors, decode_chunk
from millstream.io.files.line_source import LineFileSource
from millstream.io.files.lines import LineReader, count_nonempty_lines
from millstream.io.files.ranges import FileRange, LineSplitInfo, compression_of
from millstream.io.files.union import in_threads, unify_by_name


def _as_text(column: pa.ChunkedArray) -> pa.Array:
    """A column of any type as strings: strings as they are, other values as JSON text."""
    array = column.combine_chunks()
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        return array.cast(pa.string())
    if pa.types.is_null(array.type):
        return pa.nulls(len(array), pa.string())
    from millstream.io.files.json_encoding import json_fragments
    return pc.if_else(array.is_null(), pa.scalar(None, pa.string()), json_fragments(array))


def _read_json(buf: pa.Buffer, schema: pa.Schema | None,
               infer_others: bool = False) -> pa.Table | None:
    if schema is not None:
        options = pajson.ParseOptions(
            explicit_schema=schema,
            unexpected_field_behavior="infer" if infer_others else "ignore")
    else:
        options = pajson.ParseOptions(unexpected_field_behavior="infer")
    return pajson.read_json(pa.BufferReader(buf),
                            read_options=pajson.ReadOptions(use_threads=buf.size > (1 << 20),
                                                            block_size=max(1 << 16,
                                                                           buf.size + 1)),
                            parse_options=options)


def _not_an_object(line: bytes) -> bool:
    """Cheap suspect test for the bad-record search: is this line not one JSON object?"""
    text = line.decode("utf-8", errors="replace").strip()
    if not text:
        return False
    if text[0] != "{" or text[-1] != "}":
        return True
    try:
        return not isinstance(_DECODER.decode(text), dict)
    except ValueError:
        return True


_DECODER = _json.JSONDecoder()


class JsonSource(LineFileSource):
    """JSON-lines files (one JSON object per line) as a table source."""

    name = "json"

    def __init__(self, uri: str | Sequence[str], schema: pa.Schema | None = None,
                 on_bad_records: str = "error", *, columns: Sequence[str] | None = None,
                 split_size: int | None = None, block_size: int | None = None,
                 infer_bytes: int = DEFAULT_INFER_BYTES,
                 encoding: str = "utf-8", encoding_errors: str = "strict",
                 union_by_name: bool = False,
                 partitioning: str | None = "hive",
                 storage_options: dict[str, Any] | None = None):
        super().__init__(uri, split_size=split_size, block_size=block_size,
                         partitioning=partitioning, storage_options=storage_options)
        self.user_schema = schema
        self.on_bad_records = check_policy(on_bad_records)
        self.encoding = check_encoding(encoding)
        self.encoding_errors = check_encoding_errors(encoding_errors)
        self.infer_bytes = int(infer_bytes)
        self.union_by_name = bool(union_by_name)
        self._schema: pa.Schema | None = schema
        self._inferred_from: str | None = None
        # Fields null in the whole inference sample: read as text, whatever they hold.
        self._late: tuple[str, ...] = ()
        if columns is not None:
            self.columns = list(columns)

    def data_schema(self) -> pa.Schema:
        """The given schema, or the one inferred from the first block of the first file."""
        if self._schema is None:
            self._schema = self._infer_schema()
        return self._schema

    def _sample(self, entry: Any, nbytes: int) -> bytes:
        """Up to ``nbytes`` of a file's first complete lines, as UTF-8."""
        codec = compression_of(entry.path)
        frange = FileRange(entry.uri, entry.path, 0, None if codec else entry.size,
                           entry.size, codec)
        chunks = LineReader(frange, self.storage_options, max(1, nbytes), strip_bom=True).chunks()
        chunk = next(chunks, None)
        chunks.close()
        return (decode_chunk(chunk.data, self.encoding, self.encoding_errors).data
                if chunk is not None else b"")

    @staticmethod
    def _sample_schema(data: bytes) -> pa.Schema | None:
        """The schema inferred from a sample's valid lines (None when there are none)."""
        tables = parse_with_recovery(data, lambda buf: _read_json(buf, None),
                                     lambda lo, hi, why: None,
                                     expected_rows=fast_nonempty_lines)
        schemas = [t.schema for t in tables if t.num_rows]
        if not schemas:
            return None
        return schemas[0] if len(schemas) == 1 else merge_inferred(schemas, conflict="first")

    def _infer_schema(self) -> pa.Schema:
        """Infer from up to ``infer_bytes`` of complete lines, taken from the first files
        (with ``union_by_name``, from the start of every file, unified by name).

        A field that is null everywhere in the sample is typed string; its values are
        kept as text (numbers, booleans and nested values as their JSON text).
        """
        if self.union_by_name:
            schema = self._infer_union()
        else:
            samples: list[bytes] = []
            budget = self.infer_bytes
            used: list[str] = []
            for entry in self.files():
                if budget <= 0:
                    break
                if entry.size == 0:
                    continue
                data = self._sample(entry, budget)
                if count_nonempty_lines(data):
                    samples.append(data)
                    used.append(entry.uri)
                    budget -= len(data)
            data = b"".join(samples)
            if not used:
                raise PlanError(f"json {self.uri}: no records, so no schema can be inferred; "
                                f"pass schema=...")
            self._inferred_from = (f"the first {len(data)} bytes of {used[0]}" if len(used) == 1
                                   else f"{len(data)} bytes from the first {len(used)} files")
            found = self._sample_schema(data)
            if found is None:
                raise PlanError(f"json {self.uri}: no valid JSON object in "
                                f"{self._inferred_from}; pass schema=...")
            schema = found
        self._late = tuple(f.name for f in schema if pa.types.is_null(f.type))
        return pa.schema([pa.field(f.name, pa.string()) if f.name in self._late else f
                          for f in schema])

    def _infer_union(self) -> pa.Schema:
        """``union_by_name``: each file's first records, their schemas unified by name."""
        files = [f for f in self.files() if f.size > 0]
        per_file = min(self.infer_bytes,
                       max(64 << 10, self.infer_bytes // max(1, len(files))))
        samples = in_threads(lambda f: self._sample(f, per_file), files)
        named = [(f.uri, sc) for f, data in zip(files, samples)
                 if (sc := self._sample_schema(data)) is not None]
        if not named:
            raise PlanError(f"json {self.uri}: no valid JSON object at the start of any file; "
                            f"pass schema=...")
        self._inferred_from = (f"the first {per_file} bytes of each of {len(files)} files "
                               f"(union_by_name)")
        return unify_by_name(f"json {self.uri}", named)

    def _split_extra(self) -> tuple[tuple[str, Any], ...]:
        return (("_inferred_from", self._inferred_from), ("_late", self._late))

    def _handler(self, ctx: TaskContext) -> BadRecordHandler:
        return BadRecordHandler(self.on_bad_records, ctx, "JSON", self.storage_options,
                                output=self.dead_letters)

    def _hint(self, reason: str, record: str) -> str:
        if self._inferred_from and ("changed from" in reason or "convert" in reason.lower()):
            return (f"{reason} (the schema was inferred from {self._inferred_from}; "
                    f"pass schema=... to fix it)")
        return reason

    def _read_range(self, frange: FileRange, info: LineSplitInfo, ctx: TaskContext,
                    needed: list[str] | None, handler: Any) -> Iterator[pa.Table]:
        schema = info.schema if info.schema is not None else self.data_schema()
        if needed is not None:
            schema = pa.schema([schema.field(c) for c in needed])
        late = [name for name in self._late if schema.get_field_index(name) != -1]
        fixed = pa.schema([f for f in schema if f.name not in late])

        def parse(buf: pa.Buffer) -> pa.Table | None:
            if not late:
                return _read_json(buf, schema)
            table = _read_json(buf, fixed, infer_others=True)
            columns = []
            for field in schema:
                if field.name in late:
                    i = table.schema.get_field_index(field.name)
                    columns.append(_as_text(table.column(i)) if i != -1
                                   else pa.nulls(table.num_rows, pa.string()))
                else:
                    columns.append(table.column(field.name))
            return pa.Table.from_arrays(columns, schema=schema)

        reader = LineReader(frange, self.storage_options, self.block_size, strip_bom=True)
        for chunk in reader.chunks():
            if not chunk.data.strip():
                continue
            yield from parse_line_chunk(chunk, reader, parse, handler,
                                        expected_rows=fast_nonempty_lines, hint=self._hint,
                                        prescreen=_not_an_object, encoding=self.encoding,
                                        encoding_errors=self.encoding_errors)
