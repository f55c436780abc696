"""Pushdown helpers shared by the file sources: predicates as Arrow expressions, the
columns they read, and checks of requested columns."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from millstream.errors import SchemaError


def arrow_expression(predicate: Any) -> pc.Expression | None:
    """A ``pyarrow.compute.Expression`` for a predicate (an Expr or an Expression), or None."""
    if predicate is None:
        return None
    if isinstance(predicate, pc.Expression):
        return predicate
    to_arrow = getattr(predicate, "to_arrow", None)
    return to_arrow() if to_arrow is not None else None


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

