"""Parsing SQL text with sqlglot, and errors that point into the text.

The default dialect is DuckDB's (close to Spark SQL and Postgres); ``dialect=`` takes any
dialect sqlglot knows ("spark", "postgres", "bigquery", ...). Flink's windowing
table-valued functions pass a table as ``TABLE name`` inside a call
(``TUMBLE(TABLE bids, DESCRIPTOR(ts), ...)``), which no sqlglot dialect reads: that keyword
is dropped from the tokens before parsing (the name stays, with its position).

:func:`error_at` builds an :class:`~millstream.errors.SQLError` whose message quotes the
line of the statement with a caret under the offending token.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import sqlglot
from sqlglot import exp
from sqlglot.errors import ErrorLevel, ParseError, TokenError
from sqlglot.tokens import TokenType

from millstream.errors import SQLError

#: The dialect queries are read in unless ``dialect=`` says otherwise.
DEFAULT_DIALECT = "duckdb"


@dataclass(frozen=True)
class Text:
    """The text of the statements being translated (for error positions)."""

    sql: str

    def line_col(self, offset: int) -> tuple[int, int]:
        """1-based line and column of a character offset."""
        offset = max(0, min(offset, len(self.sql)))
        line = self.sql.count("\n", 0, offset) + 1
        start = self.sql.rfind("\n", 0, offset) + 1
        return line, offset - start + 1

    def caret(self, start: int, end: int) -> str:
        """The line holding ``start`` with ``^`` under ``start..end`` (inclusive)."""
        line_start = self.sql.rfind("\n", 0, start) + 1
        line_end = self.sql.find("\n", start)
        if line_end < 0:
            line_end = len(self.sql)
        text = self.sql[line_start:line_end].expandtabs(1)
        width = max(1, min(end, line_end - 1) - start + 1)
        return f"    {text}\n    {' ' * (start - line_start)}{'^' * width}"

    def error(self, message: str, start: int | None, end: int | None = None) -> SQLError:
        """An SQLError at ``start..end`` (offsets), or without a place when unknown."""
        if start is None:
            return SQLError(message)
        end = start if end is None else end
        line, col = self.line_col(start)
        return SQLError(message, line=line, column=col,
                        context=f"  at line {line}, column {col}:\n{self.caret(start, end)}")


def span(node: exp.Expr | None) -> tuple[int, int] | None:
    """The character offsets (start, end inclusive) of a parsed node: its own token when
    sqlglot kept one, else the span of the tokens found inside it."""
    if node is None:
        return None
    meta = getattr(node, "_meta", None) or {}
    if "start" in meta:
        return meta["start"], meta["end"]
    starts, ends = [], []
    for sub in node.walk():
        m = getattr(sub, "_meta", None) or {}
        if "start" in m:
            starts.append(m["start"])
            ends.append(m["end"])
    if not starts:
        return None
    return min(starts), max(ends)


def error_at(text: Text, message: str, node: exp.Expr | None = None) -> SQLError:
    """An SQLError pointing at ``node`` in ``text`` (no place when the node has none)."""
    where = span(node)
    return text.error(message, *(where or (None, None)))


def _dialect(dialect: str | None) -> sqlglot.Dialect:
    try:
        return sqlglot.Dialect.get_or_raise(dialect or DEFAULT_DIALECT)
    except ValueError as exc:
        raise SQLError(f"unknown SQL dialect {dialect!r}: {exc}") from None


def dialect_of(dialect: str | None) -> sqlglot.Dialect:
    """The sqlglot dialect object of a name (None: the default)."""
    return _dialect(dialect)


_WINDOW_TVFS = ("TUMBLE", "HOP", "CUMULATE", "SESSION")


def _flink_table_args(tokens: list) -> list:
    """Tokens without the ``TABLE`` keyword of Flink's table arguments (``f(TABLE t, ...)``,
    ``DATA => TABLE t``: a ``TABLE`` after ``(``, ``,`` or ``=>`` and before a name), and
    without SESSION's ``PARTITION BY`` (the GROUP BY keys partition the sessions); the
    windowing functions' names read as names (SESSION is a keyword in some dialects)."""
    out: list = []
    after = {TokenType.L_PAREN, TokenType.COMMA, TokenType.FARROW}
    names = {TokenType.VAR, TokenType.IDENTIFIER}
    i, n = 0, len(tokens)
    while i < n:
        tok = tokens[i]
        nxt = tokens[i + 1] if i + 1 < n else None
        if tok.text.upper() in _WINDOW_TVFS and nxt is not None \
                and nxt.token_type == TokenType.L_PAREN and tok.token_type not in names:
            tok.token_type = TokenType.VAR
        if tok.token_type == TokenType.TABLE and out and out[-1].token_type in after \
                and nxt is not None and nxt.token_type in names:
            out.append(nxt)
            i += 2
            if i + 1 < n and tokens[i].token_type == TokenType.PARTITION_BY:
                i += 1
            elif i + 2 < n and tokens[i].text.upper() == "PARTITION" \
                    and tokens[i + 1].text.upper() == "BY":
                i += 2
            else:
                continue
            if i < n and tokens[i].token_type == TokenType.L_PAREN:
                depth = 0
                while i < n:
                    depth += {TokenType.L_PAREN: 1, TokenType.R_PAREN: -1}.get(
                        tokens[i].token_type, 0)
                    i += 1
                    if depth == 0:
                        break
            else:
                i += 1
            continue
        out.append(tok)
        i += 1
    return out


def _unterminated_quote(sql: str) -> int | None:
    """The offset of a string or quoted name's opening quote that is never closed."""
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        if ch == "-" and sql.startswith("--", i):
            j = sql.find("\n", i)
            i = n if j < 0 else j + 1
            continue
        if ch in ("'", '"'):
            j = i + 1
            while True:
                j = sql.find(ch, j)
                if j < 0:
                    return i
                if sql.startswith(ch * 2, j):
                    j += 2
                    continue
                break
            i = j + 1
            continue
        i += 1
    return None


class _SqlglotWarnings:
    """Holds back sqlglot's "falling back to parsing as a Command" warnings while parsing
    (such a statement is RESET or an unsupported one, with an SQLError of its own)."""

    def __enter__(self) -> None:
        self.logger = logging.getLogger("sqlglot")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        self.logger.setLevel(self.level)


def parse(sql: str, dialect: str | None = None) -> list[exp.Expr]:
    """The statements of ``sql`` (empty ones left out); SQLError with the place of a
    syntax error."""
    text = Text(sql)
    d = _dialect(dialect)
    try:
        tokens = _flink_table_args(d.tokenize(sql))
    except TokenError as exc:
        at = _unterminated_quote(sql)
        if at is not None:
            raise text.error("syntax error: a quoted string or name is never closed",
                             at) from None
        raise text.error(f"syntax error: {exc}", exc.end) from None
    quiet = _SqlglotWarnings()  # a statement it reads as a Command gets our own error
    try:
        with quiet:
            statements = d.parser(error_level=ErrorLevel.RAISE).parse(tokens, sql)
    except ParseError as exc:
        info = exc.errors[0] if exc.errors else {}
        description = info.get("description") or str(exc).splitlines()[0]
        line, col = info.get("line"), info.get("col")
        highlight = info.get("highlight") or ""
        if line is not None and col is not None:
            lines = sql.split("\n")
            # sqlglot's column is the end of the highlighted token
            start_col = max(1, col - len(highlight) + 1) if highlight else col
            offset = sum(len(x) + 1 for x in lines[:line - 1]) + start_col - 1
            end = offset + max(1, len(highlight)) - 1
            msg = f"syntax error: {_describe_parse_error(description, highlight)}"
            raise text.error(msg, offset, end) from None
        raise SQLError(f"syntax error: {description}") from None
    return [s for s in statements if s is not None]


def _describe_parse_error(description: str, highlight: str) -> str:
    near = f" at {highlight!r}" if highlight else " at the end of the query"
    if description.startswith("Invalid expression / Unexpected token"):
        return f"unexpected {highlight!r}" if highlight else "unexpected end of the query"
    m = re.match(r"Required keyword: '\w+' missing for <class '[\w.]*\.(\w+)'>", description)
    if m:
        return f"incomplete {m.group(1).upper()}{near}"
    m = re.match(r"Expecting (.+)", description)
    if m:
        return f"expected {m.group(1).strip()!r}{near}"
    return f"{description}{near}"
