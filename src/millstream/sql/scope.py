"""Relations and name resolution: the columns a FROM clause makes visible, under which
table names, and the node columns that hold them.

A :class:`Relation` is a plan node plus the SQL columns it offers (:class:`Field`: name,
table qualifier, and the node's column holding it, unique within the node). A
:class:`Scope` resolves a column reference against a relation and, for correlated
subqueries, against the scopes around it; an unknown or ambiguous name raises an SQLError
pointing at the reference, naming what is available and the closest match.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa

from millstream.plan import logical as L


@dataclass(frozen=True)
class Field:
    """A column a relation offers: ``name`` as SQL sees it, ``qualifier`` (the table name or
    alias), ``internal`` (the node's column). ``hidden`` columns (the right key of a USING
    join) answer only to their qualified name and are left out of ``*``."""

    name: str
    qualifier: str | None
    internal: str
    hidden: bool = False


@dataclass
class WindowInfo:
    """A windowing table-valued function's relation: the assigner, the event-time column
    (internal name), and the window columns it offers (internal names, computed when the
    windows are grouped or materialized)."""

    assigner: Any
    time_column: str
    kind: str
    params: dict[str, int]
    columns: dict[str, str] = field(default_factory=dict)
    #: the window columns exist in the node (after a window aggregate or per-row windows)
    materialized: bool = False


@dataclass
class Relation:
    """A plan node with the SQL columns it offers (see the module docstring)."""

    node: L.Node
    fields: list[Field]
    window: WindowInfo | None = None

    @property
    def schema(self) -> pa.Schema | None:
        return self.node.schema

    def visible(self) -> list[Field]:
        """The columns ``*`` expands to."""
        return [f for f in self.fields if not f.hidden]

    def with_node(self, node: L.Node) -> Relation:
        return replace(self, node=node)

    def requalified(self, qualifier: str | None) -> Relation:
        """The same columns under one table name (a FROM item's alias)."""
        return Relation(self.node, [Field(f.name, qualifier, f.internal, f.hidden)
                                    for f in self.fields], self.window)

    def internals(self) -> set[str]:
        names = set(self.node.schema.names) if self.node.schema is not None else set()
        return names | {f.internal for f in self.fields}


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate most like ``name`` (case-insensitive), if any is close."""
    cands = list(dict.fromkeys(candidates))
    lowered = {c.lower(): c for c in cands}
    hit = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[hit[0]] if hit else None


def listing(names: Iterable[str], limit: int = 40) -> str:
    """Names for a message (at most ``limit``, then how many more)."""
    names = list(dict.fromkeys(names))
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


class NotFound(Exception):
    """A name that no scope has (``kind`` "column" or "table"); carries the message."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class Scope:
    """Resolves column references in one relation, then in the scopes around it."""

    def __init__(self, relation: Relation, parent: Scope | None = None):
        self.relation = relation
        self.parent = parent

    def candidates(self, qualifier: str | None, name: str) -> list[Field]:
        out = []
        for f in self.relation.fields:
            if qualifier is not None:
                if f.qualifier is None or f.qualifier.lower() != qualifier.lower():
                    continue
            elif f.hidden:
                continue
            if f.name == name:
                out.append(f)
        if not out:
            for f in self.relation.fields:
                if qualifier is not None and (f.qualifier is None
                                              or f.qualifier.lower() != qualifier.lower()):
                    continue
                if qualifier is None and f.hidden:
                    continue
                if f.name.lower() == name.lower():
                    out.append(f)
        unique = {f.internal: f for f in out}
        return list(unique.values())

    def has_qualifier(self, qualifier: str) -> bool:
        return any(f.qualifier is not None and f.qualifier.lower() == qualifier.lower()
                   for f in self.relation.fields)

    def resolve(self, qualifier: str | None, name: str) -> tuple[Field, int]:
        """The field a reference names and how many scopes out it was found (0: here)."""
        scope: Scope | None = self
        depth = 0
        while scope is not None:
            found = scope.candidates(qualifier, name)
            if len(found) == 1:
                return found[0], depth
            if len(found) > 1:
                tables = ", ".join(sorted({f.qualifier or "?" for f in found}))
                raise NotFound(f"column {name!r} is ambiguous: tables {tables} all have it; "
                               f"qualify it (e.g. {found[0].qualifier or 't'}.{name})")
            scope = scope.parent
            depth += 1
        raise NotFound(self._unknown(qualifier, name))

    def _unknown(self, qualifier: str | None, name: str) -> str:
        fields = self.relation.fields
        if qualifier is not None and not any(s.has_qualifier(qualifier) for s in self._chain()):
            tables = sorted({f.qualifier for s in self._chain() for f in s.relation.fields
                             if f.qualifier})
            near = closest(qualifier, tables)
            hint = f" (did you mean {near!r}?)" if near else ""
            return (f"unknown table {qualifier!r} in {qualifier}.{name}{hint}; tables here: "
                    f"{listing(tables) or 'none'}")
        if qualifier is not None:
            names = [f.name for s in self._chain() for f in s.relation.fields
                     if f.qualifier and f.qualifier.lower() == qualifier.lower()]
            near = closest(name, names)
            hint = f" (did you mean {qualifier}.{near}?)" if near else ""
            return (f"table {qualifier!r} has no column {name!r}{hint}; its columns: "
                    f"{listing(names)}")
        names = [f.name for f in fields if not f.hidden]
        outer = [f.name for s in self._chain()[1:] for f in s.relation.fields if not f.hidden]
        near = closest(name, names + outer)
        hint = f" (did you mean {near!r}?)" if near else ""
        return f"unknown column {name!r}{hint}; columns here: {listing(names) or 'none'}"

    def _chain(self) -> list[Scope]:
        out, s = [], self
        while s is not None:
            out.append(s)
            s = s.parent
        return out
