"""Malformed input records: fail with the exact place, skip and count, or dead-letter them.

Sources parse blocks of many lines at once with pyarrow. Only when a block fails to
parse does :func:`parse_with_recovery` bisect it, line-aligned, down to the offending
lines, which go to a :class:`BadRecordHandler`, which follows the ``on_bad_records``
policy (see :mod:`millstream.io.files.dead_letters`):

* ``"error"`` (default): raise :class:`BadRecordError` naming the file, the 1-based line
  number within the file, the byte offset and the record;
* ``"skip"``: drop the line and count it (counter ``millstream/bad_records_skipped``);
* a dead-letter directory: write the line with the reason as a JSON object ``{"path",
  "line", "offset", "reason", "record"}`` (one file per batch task attempt; staged per
  epoch and committed with the checkpoint in a streaming job) and count it (counter
  ``millstream/bad_records_dead_lettered``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from millstream.core.context import TaskContext
from millstream.errors import BadRecordError
from millstream.io.files.dead_letters import DeadLetterFile, check_policy
from millstream.io.files.decoding import decode_chunk

#: Counter group and names.
COUNTER_GROUP = "millstream"
SKIPPED = "bad_records_skipped"
DEAD_LETTERED = "bad_records_dead_lettered"

_SNIPPET = 200


def snippet(record: str, limit: int = _SNIPPET) -> str:
    """The start of a record, for messages."""
    return record if len(record) <= limit else record[:limit] + f"... ({len(record)} chars)"


class BadRecordHandler:
    """Routes the bad records found by one task attempt according to the policy.

    Dead letters go to ``output`` when given (a streaming reader's
    :class:`~millstream.io.files.dead_letters.StagedDeadLetters`, which its owner closes),
    else to a :class:`~millstream.io.files.dead_letters.DeadLetterFile` of this attempt.
    """

    def __init__(self, policy: Any, ctx: TaskContext, fmt: str,
                 storage_options: dict[str, Any] | None = None, output: Any = None):
        self.policy = check_policy(policy)
        self.ctx = ctx
        self.fmt = fmt
        self.storage_options = storage_options or {}
        self.count = 0
        self._output = output
        self._own_output = False

    @property
    def raises(self) -> bool:
        """True when a bad record stops the task."""
        return self.policy == "error"

    def report(self, *, path: str, line: int | None, offset: int | None, reason: str,
               record: str) -> None:
        """Handle one bad record: raise, count, or write it to the dead-letter output."""
        where = f"{path}"
        if line is not None:
            where += f", line {line}"
        if offset is not None:
            where += f" (byte offset {offset})"
        if self.policy == "error":
            raise BadRecordError(
                f"malformed {self.fmt} record in {where}: {reason}\n"
                f"  record: {snippet(record)!r}\n"
                f"  To skip malformed records pass on_bad_records=\"skip\" (they are counted), "
                f"or on_bad_records=\"./<directory>\" (a path or URI) to write each one to a "
                f"dead-letter file.",
                path=path, line=line, offset=offset, record=record)
        self.count += 1
        if self.policy == "skip":
            self.ctx.increment_counter(COUNTER_GROUP, SKIPPED)
            return
        if self._output is None:
            self._output = DeadLetterFile(self.policy, self.ctx, self.storage_options)
            self._own_output = True
        self._output.write({"path": path, "line": line, "offset": offset, "reason": reason,
                            "record": record})
        self.ctx.increment_counter(COUNTER_GROUP, DEAD_LETTERED)

    def close(self) -> None:
        """Flush the dead-letter file of this attempt (uploading it to an object store)."""
        if self._own_output and self._output is not None:
            self._output.close()

    def __enter__(self) -> BadRecordHandler:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


#: Called with (start, end) byte positions of a bad line inside the block and a reason.
BadLineCallback = Callable[[int, int, str], None]


def parse_with_recovery(data: bytes, parse: Callable[[pa.Buffer], pa.Table | None],
                        on_bad: BadLineCallback, *,
                        expected_rows: Callable[[bytes, int, int], int] | None = None,
                        validate: Callable[[pa.Table, bytes, int, int], str | None] | None = None,
                        errors: tuple[type[BaseException], ...] = (pa.ArrowInvalid,),
                        prescreen: Callable[[bytes], bool] | None = None,
                        ) -> list[pa.Table]:
    """Parse a block of complete lines; when that fails, find the bad lines.

    ``parse`` turns a buffer of complete lines into a table (or None for no rows) and
    raises one of ``errors`` on malformed input. ``expected_rows(data, lo, hi)``, when
    given, is the number of rows lines ``data[lo:hi]`` must produce; a different count
    (e.g. a quote swallowing a line break) counts as a failure, and so does a table for
    which ``validate(table, data, lo, hi)`` returns a reason. A single line that fails is
    passed to ``on_bad`` with the reason and dropped. Good rows come back in input order.

    When the block fails, ``prescreen(line)`` (a cheap Python check, True for a line that
    looks malformed) proposes suspects: the block is cut around them, each suspect is
    parsed alone and the runs of lines between them as wholes. The prescreen only picks
    the cuts; what is bad is always decided by ``parse``. Whatever still fails is
    bisected (line-aligned). Cost: one parse when the block is good; about two parses per
    suspect plus 2 * log2(lines) per bad line the prescreen missed.
    """
    view = memoryview(data)
    out: list[pa.Table] = []

    def attempt(lo: int, hi: int, check_rows: bool) -> tuple[pa.Table | None, str | None]:
        try:
            table = parse(pa.py_buffer(view[lo:hi]))
        except errors as exc:
            return None, _clean_reason(str(exc))
        if check_rows and expected_rows is not None:
            rows = 0 if table is None else table.num_rows
            want = expected_rows(data, lo, hi)
            if rows != want:
                return None, f"block gave {rows} rows for {want} lines"
        if table is not None and validate is not None:
            reason = validate(table, data, lo, hi)
            if reason is not None:
                return None, reason
        return table, None

    def solve(lo: int, hi: int, known_bad: bool) -> None:
        # Is data[lo:hi] a single line? (Its only newline, if any, is the last byte.)
        nl = data.find(b"\n", lo, hi - 1)
        if nl == -1:
            table, reason = attempt(lo, hi, check_rows=False)
            if table is None:
                on_bad(lo, hi, reason or "malformed record")
            elif table.num_rows:
                out.append(table)
            return
        if not known_bad:
            table, _ = attempt(lo, hi, check_rows=True)
            if table is not None:
                if table.num_rows:
                    out.append(table)
                return
        middle = lo + (hi - lo) // 2
        k = data.rfind(b"\n", lo, middle)
        if k == -1:
            k = data.find(b"\n", middle, hi - 1)
        solve(lo, k + 1, False)
        solve(k + 1, hi, False)

    table, _ = attempt(0, len(data), check_rows=True)
    if table is not None:
        return [table] if table.num_rows else []
    suspects = _suspects(data, prescreen) if prescreen is not None else []
    if not suspects:
        solve(0, len(data), True)
        return out
    cursor = 0
    for lo, hi in suspects:
        if lo > cursor:
            solve(cursor, lo, False)
        solve(lo, hi, False)
        cursor = hi
    if cursor < len(data):
        solve(cursor, len(data), False)
    return out


def _suspects(data: bytes, prescreen: Callable[[bytes], bool]) -> list[tuple[int, int]]:
    """(start, end) of the lines ``prescreen`` flags, end including the newline."""
    out = []
    pos = 0
    n = len(data)
    while pos < n:
        k = data.find(b"\n", pos)
        end = n if k == -1 else k + 1
        line = data[pos:end].rstrip(b"\r\n")
        if line and prescreen(line):
            out.append((pos, end))
        pos = end
    return out


def _clean_reason(message: str) -> str:
    message = message.strip()
    # pyarrow appends the offending row text after a colon; the record is reported apart.
    for prefix in ("CSV parse error: ", "JSON parse error: "):
        if message.startswith(prefix):
            message = message[len(prefix):]
    message = message.splitlines()[0] if message else "malformed record"
    message = re.sub(r"^Row #\d+: ", "", message)  # row numbers within a block mislead
    return re.sub(r"\s+in row \d+$", "", message)


def parse_line_chunk(chunk: Any, reader: Any, parse: Callable[[pa.Buffer], pa.Table | None],
                     handler: BadRecordHandler, *,
                     expected_rows: Callable[[bytes, int, int], int] | None = None,
                     validate: Callable[[pa.Table, bytes, int, int], str | None] | None = None,
                     hint: Callable[[str, str], str] | None = None,
                     prescreen: Callable[[bytes], bool] | None = None,
                     encoding: str = "utf-8", encoding_errors: str = "strict") -> list[pa.Table]:
    """Parse one :class:`~millstream.io.files.lines.LineChunk`, routing its bad lines to ``handler``.

    The chunk is first transcoded to UTF-8 (:func:`~millstream.io.files.decoding.decode_chunk`):
    lines that do not decode are bad records too. Line numbers and byte offsets (in the
    file as it is, before transcoding) are computed only when there are bad lines.
    """
    decoded = decode_chunk(chunk.data, encoding, encoding_errors)
    data: bytes = decoded.data
    origin = decoded.origin
    path = reader.frange.uri
    for lo, hi, reason in decoded.bad:
        index = int(np.searchsorted(origin, lo)) if origin is not None else \
            chunk.data.count(b"\n", 0, lo)
        record = chunk.data[lo:hi].rstrip(b"\r\n").decode(encoding, errors="replace")
        handler.report(path=path, line=reader.line_number(chunk, index),
                       offset=chunk.offset + lo, reason=reason, record=record)
    if decoded.bad and not data.strip():
        return []
    cursor = [0, 0]  # (position, newlines before it): bad lines arrive in order

    def on_bad(lo: int, hi: int, reason: str) -> None:
        pos, count = cursor
        if lo < pos:
            pos, count = 0, 0
        index = count + data.count(b"\n", pos, lo)
        cursor[0], cursor[1] = lo, index
        record = data[lo:hi]
        if record.endswith(b"\n"):
            record = record[:-1]
        if record.endswith(b"\r"):
            record = record[:-1]
        text = record.decode("utf-8", errors="replace")
        if text and reason.endswith(": " + text):  # pyarrow appends the row; we report it apart
            reason = reason[:-len(text) - 2]
        if hint is not None:
            reason = hint(reason, text)
        offset = int(origin[index]) if origin is not None and index < len(origin) else lo
        handler.report(path=path, line=reader.line_number(chunk, index),
                       offset=chunk.offset + offset, reason=reason, record=text)

    return parse_with_recovery(data, parse, on_bad, expected_rows=expected_rows,
                               validate=validate, prescreen=prescreen)
