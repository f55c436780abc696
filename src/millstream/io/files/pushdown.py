"""Pushdown helpers shared by the file sources: predicates as Arrow expressions, the
columns they read, and checks of requested columns."""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from millstream.errors import SchemaError
from millstream.expr.nodes import Column, Literal, _Func, conjuncts


def arrow_expression(predicate: Any, schema: pa.Schema | None = None) -> pc.Expression | None:
    """A ``pyarrow.compute.Expression`` for a predicate (an Expr or an Expression), or None.

    With the data's ``schema``, literals are typed against the columns (an integer compared
    with a decimal column becomes a narrow decimal, which Arrow's scan can bind)."""
    if predicate is None:
        return None
    if isinstance(predicate, pc.Expression):
        return predicate
    to_arrow = getattr(predicate, "to_arrow", None)
    if to_arrow is None:
        return None
    if schema is not None:
        try:
            return to_arrow(schema)
        except TypeError:  # a predicate whose to_arrow() takes no schema
            pass
    return to_arrow()


def predicate_columns(predicate: Any) -> set[str] | None:
    """The columns a predicate reads, or None when unknown."""
    columns = getattr(predicate, "columns", None)
    if callable(columns):
        return set(columns())
    return None


def check_columns(columns: Sequence[str] | None, schema: pa.Schema, what: str) -> None:
    """Raise SchemaError when a requested column is not in ``schema``."""
    if columns is None:
        return
    missing = [c for c in columns if schema.get_field_index(c) == -1]
    if missing:
        raise SchemaError(f"{what}: no column(s) {missing}; available: {schema.names}")


def split_for_views(predicate: Any, view_columns: frozenset[str]) -> tuple[Any, list[Any]] | None:
    """A predicate's conjuncts on view-typed columns apart from the others: ``(the others
    as one AND or None, the view conjuncts)``; None when a view conjunct is more than
    comparisons with literals and ``is_in`` (see :func:`_compares_strings`)."""
    parts = conjuncts(predicate)
    exact = [p for p in parts if not hasattr(p, "columns") or view_columns & p.columns()]
    if not all(_compares_strings(p) for p in exact):
        return None
    plain = [p for p in parts if not any(p is e for e in exact)]
    return (functools.reduce(operator.and_, plain) if plain else None), exact


def _compares_strings(e: Any) -> bool:
    """Whether ``e`` is made of comparisons of columns with literals and ``is_in`` under
    AND/OR/NOT (what a view-typed column's filter may be to go into the scan: exact on the
    rows read, by dictionary code where they are dictionaries)."""
    if not isinstance(e, _Func):
        return False
    if e.op in ("and", "or", "not"):
        return all(_compares_strings(a) for a in e.args)
    if e.op == "is_in":
        return isinstance(e.args[0], Column)
    if e.op in ("eq", "ne", "lt", "le", "gt", "ge"):
        kinds = {type(a) for a in e.args}
        return kinds == {Column, Literal}
    return False
