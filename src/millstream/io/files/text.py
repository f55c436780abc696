"""Text files as a source: one row per line (column ``text``), split into byte ranges
read in parallel (see :mod:`millstream.io.files.ranges`); lines are decoded from
``encoding`` under ``encoding_errors`` (see :mod:`millstream.io.files.decoding`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from millstream.core.context import TaskContext
from millstream.errors import BadRecordError
from millstream.io.files.decoding import check_encoding, check_encoding_errors, decode_chunk
from millstream.io.files.line_source import LineFileSource
from millstream.io.files.lines import LineChunk, LineReader, line_bounds, split_lines
from millstream.io.files.ranges import FileRange, LineSplitInfo


class TextSource(LineFileSource):
    """Lines of text files: column ``text`` (and ``path``, ``offset`` with ``with_offsets``)."""

    name = "text"
    #: reading lines calls no function of the user's (a job of the engine's own operators on
    #: text needs no pandas in the driver: ``core.lazy_pandas``)
    runs_user_code = False

    def __init__(self, uri: str | Sequence[str], encoding: str = "utf-8",
                 split_size: int | None = None, *, with_offsets: bool = False,
                 encoding_errors: str = "strict", block_size: int | None = None,
                 partitioning: str | None = "hive",
                 storage_options: dict[str, Any] | None = None):
        super().__init__(uri, split_size=split_size, block_size=block_size,
                         partitioning=partitioning, storage_options=storage_options)
        self.encoding = check_encoding(encoding)
        self.encoding_errors = check_encoding_errors(encoding_errors)
        self.with_offsets = with_offsets

    def data_schema(self) -> pa.Schema:
        """``text: string`` plus ``path: string, offset: int64`` with offsets."""
        fields = [pa.field("text", pa.string())]
        if self.with_offsets:
            fields += [pa.field("path", pa.string()), pa.field("offset", pa.int64())]
        return pa.schema(fields)

    def _decode(self, reader: LineReader, chunk: LineChunk) -> tuple[pa.Array, np.ndarray]:
        data = chunk.data
        if self.encoding == "utf-8":
            lines, starts = split_lines(data)
            try:
                return lines.cast(pa.string()), starts
            except pa.ArrowInvalid:
                pass
        decoded = decode_chunk(data, self.encoding, self.encoding_errors)
        if decoded.bad:
            lo, hi, reason = decoded.bad[0]
            uri = reader.frange.uri
            index = data.count(b"\n", 0, lo)
            number = reader.line_number(chunk, index)
            offset = chunk.offset + lo
            raise BadRecordError(
                f"cannot decode line {number} of {uri} (byte offset {offset}): {reason}",
                path=uri, line=number, offset=offset,
                record=data[lo:hi].rstrip(b"\r\n").decode(self.encoding, errors="replace"))
        lines, _ = split_lines(decoded.data)
        starts, _ = line_bounds(data)
        return lines.cast(pa.string()), starts

    def _read_range(self, frange: FileRange, info: LineSplitInfo, ctx: TaskContext,
                    needed: list[str] | None, handler: Any) -> Iterator[pa.Table]:
        # blocks shrink with the task's memory budget: downstream operators (split, explode)
        # multiply a block's size several times
        block = min(self.block_size, max(256 << 10, ctx.memory_budget // 32))
        reader = LineReader(frange, self.storage_options, block)
        want_offsets = self.with_offsets and (needed is None or "path" in needed
                                              or "offset" in needed)
        for chunk in reader.chunks():
            lines, starts = self._decode(reader, chunk)
            n = len(lines)
            if not n:
                continue
            columns: dict[str, pa.Array] = {"text": lines}
            if self.with_offsets:
                if want_offsets:
                    path = pa.repeat(pa.scalar(frange.uri, pa.string()), n)
                    offsets = pa.array(starts + chunk.offset, pa.int64())
                else:
                    path = pa.nulls(n, pa.string())
                    offsets = pa.nulls(n, pa.int64())
                columns["path"] = path
                columns["offset"] = offsets
            yield pa.table(columns)
