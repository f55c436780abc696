"""Character encodings of line-oriented files: checking and transcoding chunks of lines to UTF-8.

``read_text``, ``read_csv`` and ``read_json`` take ``encoding=`` (any ASCII-compatible
codec Python knows, ``"utf-8"`` by default) and ``encoding_errors=``:

* ``"strict"`` (default): a line that does not decode is a bad record, reported with its
  file, line and byte offset (``on_bad_records`` decides what happens to it; ``read_text``
  raises);
* ``"replace"``: undecodable bytes become U+FFFD;
* ``"ignore"``: undecodable bytes are dropped.

Valid UTF-8, the usual case, costs one vectorized validation per chunk and no copy.
"""

from __future__ import annotations

import codecs
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from millstream.errors import PlanError

#: The accepted values of ``encoding_errors``.
ENCODING_ERRORS = ("strict", "replace", "ignore")


def check_encoding(encoding: str) -> str:
    """The canonical name of an ASCII-compatible encoding (a PlanError otherwise)."""
    try:
        name = codecs.lookup(encoding).name
    except (LookupError, TypeError) as exc:
        raise PlanError(f"unknown encoding {encoding!r}") from exc
    if "\n".encode(name) != b"\n" or "\r".encode(name) != b"\r":
        raise PlanError(f"encoding {encoding!r} is not ASCII-compatible; only encodings where "
                        f"a newline is the byte 0x0A are supported (convert the file to UTF-8)")
    return name


def check_encoding_errors(value: str) -> str:
    """``encoding_errors`` if it is one of :data:`ENCODING_ERRORS` (a PlanError otherwise)."""
    if value not in ENCODING_ERRORS:
        raise PlanError(f"encoding_errors must be one of {', '.join(map(repr, ENCODING_ERRORS))}, "
                        f"got {value!r}")
    return value


def is_valid_utf8(data: bytes) -> bool:
    """Whether ``data`` is valid UTF-8 (vectorized; ASCII is checked first)."""
    if data.isascii():
        return True
    if len(data) >= 1 << 31:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True
    offsets = pa.py_buffer(np.array([0, len(data)], dtype=np.int32))
    array = pa.Array.from_buffers(pa.string(), 1, [None, offsets, pa.py_buffer(data)])
    try:
        array.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


@dataclass
class DecodedChunk:
    """A chunk of complete lines transcoded to UTF-8.

    ``origin`` (None when ``data`` is the chunk itself) gives, for each line, its start
    in the original chunk, so errors found later still name the file's byte offsets.
    ``bad`` lists the lines that did not decode (``encoding_errors="strict"``) as
    (start, end, reason) in the original chunk; they are left empty in ``data``, so line
    numbers stay right.
    """

    data: bytes
    origin: np.ndarray | None = None
    bad: list[tuple[int, int, str]] = field(default_factory=list)


def _line_starts(data: bytes) -> np.ndarray:
    arr = np.frombuffer(data, dtype=np.uint8)
    newlines = np.flatnonzero(arr == 10)
    starts = np.empty(len(newlines), dtype=np.int64)
    if len(newlines):
        starts[0] = 0
        starts[1:] = newlines[:-1] + 1
    return starts


def _reason(encoding: str, exc: UnicodeDecodeError) -> str:
    name = "UTF-8" if encoding == "utf-8" else encoding
    return (f"invalid {name}: {exc.reason} at byte {exc.start} of the line; pass "
            f"encoding=... (e.g. \"latin-1\") or encoding_errors=\"replace\"")


def decode_chunk(data: bytes, encoding: str = "utf-8", errors: str = "strict") -> DecodedChunk:
    """``data`` (complete lines, ending with a newline) as UTF-8 (see module doc)."""
    if encoding == "utf-8" and is_valid_utf8(data):
        return DecodedChunk(data)
    try:
        out: bytes | None = data.decode(encoding, errors=errors).encode("utf-8")
    except UnicodeDecodeError:
        out = None
    if out is not None and out.count(b"\n") == data.count(b"\n"):
        return DecodedChunk(out, _line_starts(data))
    # line by line: a line that does not decode (strict), or a decoder that swallowed a
    # newline into an invalid sequence
    parts: list[bytes] = []
    bad: list[tuple[int, int, str]] = []
    starts = _line_starts(data)
    for start in starts.tolist():
        end = data.find(b"\n", start) + 1
        try:
            text = data[start:end - 1].decode(encoding, errors=errors)
        except UnicodeDecodeError as exc:
            bad.append((start, end, _reason(encoding, exc)))
            parts.append(b"\n")
            continue
        parts.append(text.replace("\n", "").encode("utf-8") + b"\n")
    return DecodedChunk(b"".join(parts), starts, bad)


class TranscodingStream(io.RawIOBase):
    """A readable binary stream of ``raw`` (bytes in ``encoding``) as UTF-8, for readers that
    take a whole stream (multiline CSV). Under ``errors="strict"`` a byte sequence that
    does not decode raises :class:`~millstream.errors.BadRecordError` with the file, line
    and byte offset; ASCII passes through without decoding."""

    def __init__(self, raw: Any, encoding: str, errors: str, path: str) -> None:
        super().__init__()
        self._raw = raw
        self._encoding = encoding
        self._errors = errors
        self._path = path
        self._decoder = codecs.getincrementaldecoder(encoding)(errors=errors)
        self._pending = b""  # output not yet handed out
        self._consumed = 0  # input bytes read so far
        self._newlines = 0  # newlines in them
        self._eof = False

    def readable(self) -> bool:
        return True

    def _fill(self) -> None:
        while not self._pending and not self._eof:
            chunk = self._raw.read(1 << 20)
            if not isinstance(chunk, bytes):
                chunk = bytes(chunk)
            final = not chunk
            self._eof = final
            held = self._decoder.getstate()[0]
            if not held and chunk.isascii():
                out = chunk
            else:
                try:
                    out = self._decoder.decode(chunk, final).encode("utf-8")
                except UnicodeDecodeError as exc:
                    self._fail(held + chunk, len(held), exc)
            self._consumed += len(chunk)
            self._newlines += chunk.count(b"\n")
            self._pending = out

    def _fail(self, data: bytes, held: int, exc: UnicodeDecodeError) -> None:
        from millstream.errors import BadRecordError

        offset = self._consumed - held + exc.start
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        line = self._newlines - data.count(b"\n", 0, held) + data.count(b"\n", 0, exc.start) + 1
        end = data.find(b"\n", exc.start)
        record = data[line_start:end if end != -1 else len(data)]
        name = "UTF-8" if self._encoding == "utf-8" else self._encoding
        raise BadRecordError(
            f"cannot decode {self._path}, line {line} (byte offset {offset}) as {name}: "
            f"{exc.reason} at byte {exc.start - line_start} of the line; pass encoding=... "
            f"(e.g. \"latin-1\") or encoding_errors=\"replace\"",
            path=self._path, line=line, offset=offset,
            record=record.decode(self._encoding, errors="replace")) from None

    def readinto(self, buffer: Any) -> int:
        self._fill()
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n
