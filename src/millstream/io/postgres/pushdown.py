"""Filters pushed into a PostgreSQL query: the conjuncts of a predicate that translate to
SQL with the same meaning (comparisons of a column with a literal, ``is_in``, null
tests, and/or/not), as a WHERE fragment with its parameters.

Strings compare with ``COLLATE "C"`` (byte order, as Arrow compares UTF-8), so a range
on a text column keeps the rows Arrow would keep. A float column's NaN compares
differently (PostgreSQL sorts it above every number and equal to itself), so a predicate
on a float column is pushed but not called exact: the filter stays above the scan too.
"""

from __future__ import annotations

import datetime as _dt
import decimal
from typing import Any

import pyarrow as pa

from millstream.expr.nodes import Column, Expr, Literal, conjuncts

_COMPARE = {"eq": "=", "ne": "<>", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
_FLIP = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le", "eq": "eq", "ne": "ne"}
_LITERALS = (bool, int, float, str, decimal.Decimal, _dt.date, _dt.datetime, _dt.time)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _fits(v: Any, t: pa.DataType) -> bool:
    """Whether literal ``v`` compares with a column of type ``t`` as Arrow would."""
    if pa.types.is_string(t):
        return isinstance(v, str)
    if pa.types.is_boolean(t):
        return isinstance(v, bool)
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return isinstance(v, (int, float, decimal.Decimal)) and not isinstance(v, bool)
    if pa.types.is_timestamp(t):
        return isinstance(v, _dt.datetime)
    if pa.types.is_date(t):
        return isinstance(v, _dt.date) and not isinstance(v, _dt.datetime)
    return pa.types.is_time(t) and isinstance(v, _dt.time)


class _Untranslatable(Exception):
    pass


class _Sql:
    """Translation of one predicate against the source's schema."""

    def __init__(self, schema: pa.Schema) -> None:
        self.schema = schema
        self.params: list[Any] = []
        self.exact = True

    def column(self, e: Expr) -> tuple[str, pa.DataType]:
        if not isinstance(e, Column) or e.name not in self.schema.names:
            raise _Untranslatable
        t = self.schema.field(e.name).type
        if pa.types.is_floating(t):
            self.exact = False
        if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
                or pa.types.is_string(t) or pa.types.is_boolean(t) or pa.types.is_date(t)
                or pa.types.is_timestamp(t) or pa.types.is_time(t)):
            raise _Untranslatable
        return _quote(e.name), t

    def literal(self, e: Expr, t: pa.DataType) -> str:
        if not isinstance(e, Literal):
            raise _Untranslatable
        v = e.value
        if v is None or not isinstance(v, _LITERALS):
            raise _Untranslatable
        if isinstance(v, float) and v != v:
            raise _Untranslatable
        if not _fits(v, t):
            raise _Untranslatable
        if pa.types.is_timestamp(t) and isinstance(v, _dt.datetime) and \
                (v.tzinfo is None) != (t.tz is None):
            raise _Untranslatable  # Arrow refuses to compare these; let it say so
        self.params.append(v)
        return "%s"

    def text(self, e: Expr) -> str:
        op = getattr(e, "op", None)
        args = getattr(e, "args", ())
        if op in ("and", "or"):
            return f"({self.text(args[0])} {op.upper()} {self.text(args[1])})"
        if op == "not":
            return f"(NOT {self.text(args[0])})"
        if op in ("is_null", "is_not_null"):
            col, _ = self.column(args[0])
            return f"({col} IS {'NOT ' if op == 'is_not_null' else ''}NULL)"
        if op == "is_in":
            col, t = self.column(args[0])
            values = list(getattr(e, "params", {}).get("values") or ())
            if not values or any(v is None for v in values):
                raise _Untranslatable
            marks = ", ".join(self.literal(Literal(v), t) for v in values)
            return f"({col} IN ({marks}))"
        if op in _COMPARE:
            a, b = args
            if isinstance(a, Literal):
                a, b, op = b, a, _FLIP[op]
            col, t = self.column(a)
            mark = self.literal(b, t)
            collate = ' COLLATE "C"' if pa.types.is_string(t) and op not in ("eq", "ne") else ""
            return f"({col}{collate} {_COMPARE[op]} {mark})"
        raise _Untranslatable


def to_sql(predicate: Expr, schema: pa.Schema) -> tuple[str, list[Any], bool] | None:
    """``(where_sql, params, exact)`` for the conjuncts of ``predicate`` that translate
    (``exact``: all of them did, with the same meaning); None when none does."""
    parts: list[str] = []
    params: list[Any] = []
    exact = True
    for c in conjuncts(predicate):
        tr = _Sql(schema)
        try:
            sql = tr.text(c)
        except _Untranslatable:
            exact = False
            continue
        parts.append(sql)
        params.extend(tr.params)
        exact = exact and tr.exact
    if not parts:
        return None
    return " AND ".join(parts), params, exact
