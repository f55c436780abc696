"""Joins of relations: the Join nodes SQL's joins become, with every column name unique
across the two sides (a clashing right column is renamed), keys that are expressions
computed as columns first, and residual (non-equi) conditions.

Residual conditions and joins without keys (CROSS JOIN, a scalar subquery's single row)
use the Join node's ``condition`` and key-less form where the engine has them (the joins
of the query-core work, issue 10). Without them a cross join pairs rows on a constant
key (correct, but in one partition), an inner join's residual becomes a filter above
it, and other residual conditions raise an SQLError saying what is missing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from millstream.errors import SQLError
from millstream.expr.nodes import Column, Expr
from millstream.plan import logical as L
from millstream.plan.rules.exprs import conjoin, rename_columns
from millstream.sql.scope import Field, Relation

#: The engine's Join node takes a residual ``condition`` and joins without keys.


def fresh_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base_1``, ``base_2`` ... whichever is not taken."""
    if base not in taken:
        return base
    i = 1
    while f"{base}_{i}" in taken:
        i += 1
    return f"{base}_{i}"


def unique_names(names: list[str]) -> list[str]:
    """Names made unique by suffixes (``a``, ``a_1``, ...)."""
    out: list[str] = []
    taken: set[str] = set()
    for n in names:
        new = fresh_name(n, taken)
        taken.add(new)
        out.append(new)
    return out


def distinct_from(left: Relation, right: Relation) -> Relation:
    """``right`` with its node's columns renamed where ``left`` has the same names."""
    return renamed_apart(left, right)[0]


def renamed_apart(left: Relation, right: Relation) -> tuple[Relation, dict[str, str]]:
    """``right`` with its node's columns renamed where ``left`` has the same names, and
    the renaming (old name -> new name)."""
    taken = set(left.internals())
    rschema = right.node.schema
    names = list(rschema.names) if rschema is not None else [f.internal for f in right.fields]
    mapping: dict[str, str] = {}
    all_taken = taken | set(names)
    for n in names:
        if n in taken:
            new = fresh_name(n, all_taken)
            all_taken.add(new)
            mapping[n] = new
    if not mapping:
        return right, {}
    node = L.Rename(right.node, tuple(mapping.items()))
    fields = [dataclasses.replace(f, internal=mapping.get(f.internal, f.internal))
              for f in right.fields]
    window = right.window
    if window is not None:
        window = dataclasses.replace(
            window, time_column=mapping.get(window.time_column, window.time_column),
            columns={role: mapping.get(c, c) for role, c in window.columns.items()})
    return Relation(node, fields, window), mapping


def renamed_exprs(exprs: list[Expr], mapping: dict[str, str]) -> list[Expr]:
    """Expressions reading the renamed columns (see :func:`renamed_apart`)."""
    if not mapping:
        return exprs
    out = []
    for e in exprs:
        new = rename_columns(e, mapping)
        if new is None:
            raise SQLError(f"cannot rename the columns of {e!r}")
        out.append(new)
    return out


def with_key_columns(rel: Relation, keys: list[Expr], prefix: str,
                     taken: set[str]) -> tuple[Relation, list[str]]:
    """The relation with each key that is not a plain column computed into a column; the
    key column names."""
    names, computed = [], []
    for i, k in enumerate(keys):
        if type(k) is Column:
            names.append(k.name)  # type: ignore[attr-defined]
            continue
        name = fresh_name(f"{prefix}{i}", taken)
        taken.add(name)
        computed.append(k.alias(name))
        names.append(name)
    if computed:
        rel = rel.with_node(L.WithColumns(rel.node, tuple(computed)))
    return rel, names


def join(left: Relation, right: Relation, left_keys: list[Expr], right_keys: list[Expr],
         how: str, condition: Expr | None = None, *,
         error: Callable[[str], SQLError] | None = None) -> Relation:
    """``left`` joined with ``right`` (inner, left, right, outer, semi, anti) on equal keys
    (expressions over each side) and a residual ``condition`` over both sides' columns (by
    their node names). Semi and anti joins keep the left side's columns."""
    right, mapping = renamed_apart(left, right)
    right_keys = renamed_exprs(right_keys, mapping)
    if condition is not None and mapping:
        # the condition names the right side's columns as they were
        condition = renamed_exprs([condition], mapping)[0]
    taken = left.internals() | right.internals()
    left, lk = with_key_columns(left, left_keys, "__sql_lkey", taken)
    right, rk = with_key_columns(right, right_keys, "__sql_rkey", taken)
    computed = [n for n, k in zip(lk, left_keys) if type(k) is not Column]
    if how not in ("semi", "anti"):  # (a semi or anti join outputs the left side only)
        computed += [n for n, k in zip(rk, right_keys) if type(k) is not Column]
    fields = list(left.fields) if how in ("semi", "anti") else [*left.fields, *right.fields]
    node: L.Node = L.Join(left.node, right.node, tuple(lk), tuple(rk), how,
                          condition=condition)
    if computed:
        node = L.Drop(node, tuple(computed))
    return Relation(node, fields)


def cross(left: Relation, right: Relation, how: str = "inner") -> Relation:
    """Every row of ``left`` with every row of ``right`` (``how="left"``: a left row
    stays, with nulls, when ``right`` is empty)."""
    return join(left, right, [], [], how)


def conjunction(parts: list[Expr]) -> Expr | None:
    return conjoin(parts) if parts else None


def qualified(fields: list[Field], qualifier: str | None) -> list[Field]:
    return [dataclasses.replace(f, qualifier=qualifier) for f in fields]
