"""Pushdown helpers shared by the file sources: predicates as Arrow expressions, the
columns they read, and checks of requested columns."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from millstream.errors import SchemaError


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

