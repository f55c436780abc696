"""CSV files: byte-range splits cut at line boundaries, parsed in blocks by pyarrow.

By default (``multiline=False``, as in Spark and pyarrow) a record never spans lines, so
large files are split into byte ranges like text files and read in parallel. Each task
parses blocks of a few MB of complete lines with ``pyarrow.csv.read_csv`` using one
schema fixed on the driver (``schema=`` or inferred from the start of the first file),
so every split produces the same column types. ``multiline=True`` allows quoted line
breaks; each file is then read whole by one task with pyarrow's streaming reader.

Text is decoded from ``encoding`` (UTF-8 by default) under ``encoding_errors`` (see
:mod:`millstream.io.files.decoding`): a line that does not decode is a bad record, never
a ``binary`` column.
"""

from __future__ import annotations

import csv as _pycsv
import io
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from millstream.core.context import TaskContext
from millstream.errors import BadRecordError, PlanError, SchemaError
from millstream.io import fs as msfs
from millstream.io.base import Split
from millstream.io.files.badrecords import (
    BadRecordHandler,
    parse_line_chunk,
    parse_with_recovery,
)
from millstream.io.files.dead_letters import check_policy
from millstream.io.files.decoding import (
    TranscodingStream,
    check_encoding,
    check_encoding_errors,
    decode_chunk,
)
from millstream.io.files.line_source import LineFileSource
from millstream.io.files.lines import LineChunk, LineReader, count_nonempty_lines
from millstream.io.files.ranges import FileRange, LineSplitInfo, compression_of
from millstream.io.files.union import in_threads, unify_by_name

#: Bytes of the first file read on the driver to infer column names and types.
DEFAULT_INFER_BYTES = 1 << 20


def fast_nonempty_lines(data: bytes, lo: int = 0, hi: int | None = None) -> int:
    """Number of non-empty lines in ``data[lo:hi]`` (a memchr-speed count in the usual case)."""
    piece = data if lo == 0 and hi in (None, len(data)) else data[lo:hi]
    if piece.startswith((b"\n", b"\r\n")) or b"\n\n" in piece or b"\n\r\n" in piece:
        return count_nonempty_lines(piece)
    return piece.count(b"\n") + (0 if piece.endswith(b"\n") or not piece else 1)


class CsvSource(LineFileSource):
    """CSV files (one or many, by path, directory or glob) as a table source."""

    name = "csv"

    def __init__(self, uri: str | Sequence[str], header: bool = True, delimiter: str = ",",
                 schema: pa.Schema | None = None, columns: Sequence[str] | None = None,
                 on_bad_records: str = "error", *, quote_char: str | bool = '"',
                 escape_char: str | bool = False, double_quote: bool = True,
                 null_values: Sequence[str] | None = None,
                 true_values: Sequence[str] | None = None,
                 false_values: Sequence[str] | None = None,
                 timestamp_parsers: Sequence[str] | None = None,
                 multiline: bool = False, encoding: str = "utf-8",
                 encoding_errors: str = "strict", union_by_name: bool = False,
                 split_size: int | None = None, block_size: int | None = None,
                 infer_bytes: int = DEFAULT_INFER_BYTES,
                 partitioning: str | None = "hive",
                 storage_options: dict[str, Any] | None = None):
        super().__init__(uri, split_size=split_size, block_size=block_size,
                         partitioning=partitioning, storage_options=storage_options)
        if len(delimiter) != 1:
            raise PlanError(f"delimiter must be one character, got {delimiter!r}")
        self.header = bool(header)
        self.delimiter = delimiter
        self.user_schema = schema
        self.on_bad_records = check_policy(on_bad_records)
        self.quote_char = quote_char
        self.escape_char = escape_char
        self.double_quote = double_quote
        self.null_values = list(null_values) if null_values is not None else None
        self.true_values = list(true_values) if true_values is not None else None
        self.false_values = list(false_values) if false_values is not None else None
        self.timestamp_parsers = list(timestamp_parsers) if timestamp_parsers else None
        self.multiline = bool(multiline)
        self.encoding = check_encoding(encoding)
        self.encoding_errors = check_encoding_errors(encoding_errors)
        self.infer_bytes = int(infer_bytes)
        self.union_by_name = bool(union_by_name)
        if self.union_by_name and not self.header:
            raise PlanError("union_by_name=True matches columns by the files' headers: it "
                            "needs header=True")
        self._schema: pa.Schema | None = schema
        self._inferred_from: str | None = None
        #: union_by_name: the columns of each file whose header differs from the schema's
        self._file_columns: dict[str, tuple[str, ...]] = {}
        if columns is not None:
            self.columns = list(columns)

    # -- schema ---------------------------------------------------------------------------

    def data_schema(self) -> pa.Schema:
        """The given schema, or names and types inferred from the first file's first block."""
        if self._schema is None:
            self._schema = self._infer_schema()
        return self._schema

    def _parse_options(self, newlines_in_values: bool = False,
                       invalid_row_handler: Any = None) -> pacsv.ParseOptions:
        return pacsv.ParseOptions(delimiter=self.delimiter, quote_char=self.quote_char,
                                  double_quote=self.double_quote, escape_char=self.escape_char,
                                  newlines_in_values=newlines_in_values,
                                  ignore_empty_lines=True,
                                  invalid_row_handler=invalid_row_handler)

    def _convert_options(self, types: pa.Schema | None,
                         include: list[str] | None) -> pacsv.ConvertOptions:
        kwargs: dict[str, Any] = {}
        if self.null_values is not None:
            kwargs["null_values"] = self.null_values
        if self.true_values is not None:
            kwargs["true_values"] = self.true_values
        if self.false_values is not None:
            kwargs["false_values"] = self.false_values
        if self.timestamp_parsers is not None:
            kwargs["timestamp_parsers"] = self.timestamp_parsers
        if types is not None:
            kwargs["column_types"] = {f.name: f.type for f in types}
        if include is not None:
            kwargs["include_columns"] = include
        return pacsv.ConvertOptions(**kwargs)

    def _read_options(self, names: list[str] | None, **extra: Any) -> pacsv.ReadOptions:
        # (the data reaching pyarrow is always UTF-8: chunks are transcoded before)
        return pacsv.ReadOptions(column_names=names,
                                 autogenerate_column_names=names is None and not self.header,
                                 **extra)

    def _sample(self, entry: msfs.FileEntry, nbytes: int) -> bytes:
        """Up to ``nbytes`` of the file's first complete lines, as UTF-8."""
        frange = FileRange(entry.uri, entry.path, 0, None if _compressed(entry) else entry.size,
                           entry.size, _compressed(entry))
        chunks = LineReader(frange, self.storage_options, max(1, nbytes), strip_bom=True).chunks()
        chunk = next(chunks, None)
        chunks.close()
        return (decode_chunk(chunk.data, self.encoding, self.encoding_errors).data
                if chunk is not None else b"")

    def _header(self, where: str, data: bytes) -> tuple[list[str] | None, bytes]:
        """The column names of a file's sample (its header, or autogenerated) and the
        rows after the header."""
        if self.header:
            end = data.find(b"\n")
            head, rest = (data, b"") if end == -1 else (data[:end + 1], data[end + 1:])
            if not head.strip():
                if not data.strip():
                    return None, b""
                raise PlanError(f"csv {where}: empty header line; pass header=False "
                                f"or schema=...")
            table = pacsv.read_csv(pa.BufferReader(head), read_options=self._read_options(None),
                                   parse_options=self._parse_options())
            return table.column_names, rest
        if not data.strip():
            return None, b""
        first_line = data[:data.find(b"\n") + 1]
        table = pacsv.read_csv(pa.BufferReader(first_line), read_options=self._read_options(None),
                               parse_options=self._parse_options(),
                               convert_options=self._convert_options(None, None))
        return table.column_names, data

    def _infer_types(self, names: list[str], data: bytes) -> pa.Schema:
        """Column types inferred from rows (a column empty in the sample is null-typed)."""
        types = pa.schema([(n, pa.null()) for n in names])
        if count_nonempty_lines(data):
            def parse(buf: pa.Buffer) -> pa.Table:
                return pacsv.read_csv(pa.BufferReader(buf),
                                      read_options=self._read_options(names),
                                      parse_options=self._parse_options(),
                                      convert_options=self._convert_options(None, None))
            tables = parse_with_recovery(data, parse, lambda lo, hi, why: None,
                                         expected_rows=fast_nonempty_lines)
            schemas = [t.schema for t in tables if t.num_rows]
            if schemas:
                types = merge_inferred(schemas)
        return types

    def _infer_schema(self) -> pa.Schema:
        files = self.files()
        if not files:
            raise PlanError(f"csv {self.uri}: no data files, so no schema can be inferred; "
                            f"pass schema=...")
        if self.union_by_name:
            types = self._infer_union([f for f in files if f.size > 0] or files[:1])
        else:
            first = next((f for f in files if f.size > 0), files[0])
            data = self._sample(first, self.infer_bytes)
            self._inferred_from = f"the first {len(data)} bytes of {first.uri}"
            names, rows = self._header(first.uri, data)
            if names is None:
                raise PlanError(f"csv {first.uri}: the file is empty, so no schema can be "
                                f"inferred; pass schema=...")
            if self.header:
                self._check_headers(first, names, files)
            types = self._infer_types(names, rows)
        # A column that was empty in the sample may hold anything later: read it as text.
        return pa.schema([pa.field(f.name, pa.string()) if pa.types.is_null(f.type) else f
                          for f in types])

    def _check_headers(self, first: msfs.FileEntry, names: list[str],
                       files: list[msfs.FileEntry]) -> None:
        """Every file's header names the first file's columns, in its order: a CSV row
        is read by position, so a file whose header differs would fill the wrong columns."""
        others = [f for f in files if f.size > 0 and f is not first]
        headers = in_threads(lambda f: self._header(f.uri, self._sample(f, 64 << 10))[0],
                             others)
        differ = [(f, h) for f, h in zip(others, headers) if h is not None and h != names]
        if not differ:
            return
        shown = "; ".join(f"{f.uri} has {h}" for f, h in differ[:3])
        more = f" (and {len(differ) - 3} more files)" if len(differ) > 3 else ""
        raise SchemaError(
            f"csv {self.uri}: the files' headers differ from {first.uri}'s {names}: "
            f"{shown}{more}. Pass union_by_name=True to match columns by name (a column "
            f"missing from a file reads as null), or schema=... to read them by position")

    def _infer_union(self, files: list[msfs.FileEntry]) -> pa.Schema:
        """``union_by_name``: each file's header and types, unified by name."""
        per_file = min(self.infer_bytes, max(64 << 10, self.infer_bytes // len(files)))
        samples = in_threads(lambda f: self._sample(f, per_file), files)
        named: list[tuple[str, pa.Schema]] = []
        self._file_columns = {}
        for f, data in zip(files, samples):
            names, rows = self._header(f.uri, data)
            if names is None:
                continue
            named.append((f.uri, self._infer_types(names, rows)))
            self._file_columns[f.path] = tuple(names)
        if not named:
            raise PlanError(f"csv {self.uri}: every file is empty, so no schema can be "
                            f"inferred; pass schema=...")
        schema = unify_by_name(f"csv {self.uri}", named)
        order = tuple(schema.names)
        self._file_columns = {p: n for p, n in self._file_columns.items() if n != order}
        self._inferred_from = (f"the first {per_file} bytes of each of {len(named)} files "
                               f"(union_by_name)")
        return schema

    # -- reading --------------------------------------------------------------------------

    def _splittable(self) -> bool:
        return not self.multiline

    def _split_extra(self) -> tuple[tuple[str, Any], ...]:
        return (("_inferred_from", self._inferred_from), ("_file_columns", self._file_columns))

    def _handler(self, ctx: TaskContext) -> BadRecordHandler:
        return BadRecordHandler(self.on_bad_records, ctx, "CSV", self.storage_options,
                                output=self.dead_letters)

    def _hint(self, reason: str, record: str) -> str:
        if self._inferred_from and "conversion" in reason.lower():
            return (f"{reason} (column types were inferred from {self._inferred_from}; "
                    f"pass schema=... to fix them)")
        if ("columns, got" in reason or "unterminated" in reason) and isinstance(
                self.quote_char, str) and self.quote_char in record:
            return f"{reason} (if quoted fields contain line breaks, pass multiline=True)"
        return reason

    def _read_range(self, frange: FileRange, info: LineSplitInfo, ctx: TaskContext,
                    needed: list[str] | None, handler: Any) -> Iterator[pa.Table]:
        schema = info.schema if info.schema is not None else self.data_schema()
        names, convert_options, conform = self._file_layout(frange, schema, needed)
        if self.multiline:
            for table in self._read_multiline(frange, names, convert_options, handler):
                yield conform(table)
            return
        read_options = self._read_options(names)
        small_read_options = self._read_options(names, use_threads=False)
        parse_options = self._parse_options()
        quote = (self.quote_char.encode() if isinstance(self.quote_char, str) else None)
        string_columns = [f.name for f in schema if f.name in names and
                          (pa.types.is_string(f.type) or pa.types.is_large_string(f.type))]
        if needed is not None:
            string_columns = [c for c in string_columns if c in needed]

        def parse(buf: pa.Buffer) -> pa.Table:
            options = read_options if buf.size > (1 << 20) else small_read_options
            return pacsv.read_csv(pa.BufferReader(buf), read_options=options,
                                  parse_options=parse_options, convert_options=convert_options)

        def validate(table: pa.Table, data: bytes, lo: int, hi: int) -> str | None:
            # Without multiline, a quote must close on its own line: a value holding a line
            # break means an unterminated quote swallowed the next line(s).
            if quote is None or data.find(quote, lo, hi) == -1:
                return None
            for name in string_columns:
                if pc.any(pc.match_substring(table.column(name), "\n")).as_py():
                    return "unterminated quoted field (a quote is not closed on its line)"
            return None

        reader = LineReader(frange, self.storage_options, self.block_size,
                            skip_header=self.header, strip_bom=True)
        prescreen = self._prescreen(len(names))  # (the file's own columns)
        for chunk in reader.chunks():
            if not _has_content(chunk):
                continue
            for table in parse_line_chunk(chunk, reader, parse, handler,
                                          expected_rows=fast_nonempty_lines, validate=validate,
                                          hint=self._hint, prescreen=prescreen,
                                          encoding=self.encoding,
                                          encoding_errors=self.encoding_errors):
                yield conform(table)

    def _file_layout(self, frange: FileRange, schema: pa.Schema, needed: list[str] | None
                     ) -> tuple[list[str], pacsv.ConvertOptions, Any]:
        """How one file is parsed: its column names, the conversion, and a function that
        puts a parsed table in the schema's columns (union_by_name: a file with other
        columns gets nulls for the ones it lacks)."""
        columns = self._file_columns.get(frange.path) if self._file_columns else None
        if columns is None:
            return schema.names, self._convert_options(schema, needed), lambda t: t
        want = list(needed) if needed is not None else schema.names
        have = [c for c in want if c in columns]
        types = pa.schema([schema.field(c) for c in columns if c in schema.names])
        options = self._convert_options(types, have or list(columns[:1]))

        def conform(table: pa.Table) -> pa.Table:
            n = table.num_rows
            return pa.Table.from_arrays(
                [table.column(c) if c in have else pa.nulls(n, schema.field(c).type)
                 for c in want], schema=pa.schema([schema.field(c) for c in want]))

        return list(columns), options, conform

    def _prescreen(self, ncols: int) -> Any:
        """A cheap suspect test for the bad-record search: wrong field count or quoting."""
        kwargs: dict[str, Any] = {"delimiter": self.delimiter, "strict": True,
                                  "doublequote": self.double_quote}
        if isinstance(self.quote_char, str):
            kwargs["quotechar"] = self.quote_char
        else:
            kwargs["quoting"] = _pycsv.QUOTE_NONE
        if isinstance(self.escape_char, str):
            kwargs["escapechar"] = self.escape_char
        def suspect(line: bytes) -> bool:  # (lines are UTF-8 by now)
            try:
                fields = next(_pycsv.reader([line.decode("utf-8", errors="replace")],
                                            **kwargs), [])
            except _pycsv.Error:
                return True
            return len(fields) != ncols

        return suspect

    def _read_multiline(self, frange: FileRange, names: list[str],
                        convert_options: pacsv.ConvertOptions,
                        handler: BadRecordHandler) -> Iterator[pa.Table]:
        fs, _ = msfs.resolve(frange.uri, **self.storage_options)

        def on_invalid(row: Any) -> str:
            if handler.raises:
                return "error"
            handler.report(path=frange.uri, line=None, offset=None,
                           reason=(f"expected {row.expected_columns} columns, got "
                                   f"{row.actual_columns}"
                                   + (f" (row {row.number})" if row.number else "")),
                           record=row.text)
            return "skip"

        stream = msfs.open_input_stream(fs, frange.path, compression=frange.compression)
        text: Any = stream
        if not (self.encoding == "utf-8" and self.encoding_errors == "strict"):
            text = io.BufferedReader(TranscodingStream(stream, self.encoding,
                                                       self.encoding_errors, frange.uri),
                                     buffer_size=1 << 20)
        def batches() -> Iterator[pa.RecordBatch]:
            reader = pacsv.open_csv(
                text,
                read_options=self._read_options(names, skip_rows=1 if self.header else 0,
                                                block_size=self.block_size, use_threads=False),
                parse_options=self._parse_options(newlines_in_values=True,
                                                  invalid_row_handler=on_invalid),
                convert_options=convert_options)
            while True:
                try:
                    yield reader.read_next_batch()
                except StopIteration:
                    return

        try:
            for batch in batches():
                if batch.num_rows:
                    yield pa.Table.from_batches([batch])
        except pa.ArrowInvalid as exc:
            if "invalid UTF8" in str(exc):
                self._raise_bad_utf8(fs, frange)
            raise BadRecordError(
                f"malformed CSV in {frange.uri}: {exc}\n  To skip malformed rows pass "
                f"on_bad_records=\"skip\" or a dead-letter directory (only rows with a wrong "
                f"number of fields can be skipped with multiline=True).",
                path=frange.uri) from exc
        finally:
            stream.close()

    def _raise_bad_utf8(self, fs: Any, frange: FileRange) -> None:
        """Find the first invalid UTF-8 of a file pyarrow refused, to name its line."""
        stream = msfs.open_input_stream(fs, frange.path, compression=frange.compression)
        try:
            check = TranscodingStream(stream, "utf-8", "strict", frange.uri)
            while check.read(1 << 20):
                pass
        finally:
            stream.close()

    def plan_splits(self, target_splits: int) -> list[Split]:
        """Byte-range splits (one split per file with ``multiline=True``)."""
        return super().plan_splits(target_splits)


def merge_inferred(schemas: list[pa.Schema], conflict: str = "string") -> pa.Schema:
    """Unify schemas inferred from parts of a sample, by field name in first-seen order.

    Types are promoted permissively (int64 + double -> double); a clash that cannot be
    promoted gives a string column (``conflict="string"``) or keeps the first type seen
    (``conflict="first"``).
    """
    merged: dict[str, pa.Field] = {}
    for schema in schemas:
        for field in schema:
            have = merged.get(field.name)
            if have is None:
                merged[field.name] = field
                continue
            try:
                merged[field.name] = pa.unify_schemas(
                    [pa.schema([have]), pa.schema([field])], promote_options="permissive"
                ).field(0)
            except (pa.ArrowTypeError, pa.ArrowInvalid):
                if conflict == "string":
                    merged[field.name] = pa.field(field.name, pa.string())
    return pa.schema(list(merged.values()))


def _compressed(entry: msfs.FileEntry) -> str | None:
    return compression_of(entry.path)


def _has_content(chunk: LineChunk) -> bool:
    return bool(chunk.data.strip(b"\r\n"))
