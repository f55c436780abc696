"""Structural fingerprints of logical plans: equal for sub-plans that compute the same
rows the same way, so the reuse rule can run such a sub-plan once.

Two nodes are equal when they are of the same type with equal parameters over equal
inputs. Plain data compares by value (numbers, strings, tuples, Arrow types and
schemas, expressions, aggregate specs and other dataclasses); a source compares by its
own ``fingerprint()`` (the same files, columns and filters); a Python function, a table
or any other opaque object only when it is the same object. A ``Shared`` node is its
input (so a shared sub-plan and a copy of it are equal).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Hashable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from millstream.expr.nodes import Expr
from millstream.io.base import Source
from millstream.plan import logical as L


class Fingerprints:
    """Fingerprints of nodes, as small integers: equal integers, equal sub-plans (within
    one instance, which interns the structures it has seen)."""

    def __init__(self) -> None:
        self._table: dict[Hashable, int] = {}
        self._memo: dict[int, tuple[L.Node, int]] = {}

    def of(self, node: L.Node) -> int:
        """The fingerprint of ``node`` (computed once per node object)."""
        hit = self._memo.get(id(node))
        if hit is not None and hit[0] is node:
            return hit[1]
        if isinstance(node, L.Shared):
            fp = self.of(node.child)
        else:
            fields = tuple((f.name, self._token(getattr(node, f.name)))
                           for f in dataclasses.fields(node))  # type: ignore[arg-type]
            fp = self._intern(("node", type(node).__qualname__, fields))
        self._memo[id(node)] = (node, fp)
        return fp

    def _intern(self, key: Hashable) -> int:
        fp = self._table.get(key)
        if fp is None:
            fp = self._table[key] = len(self._table)
        return fp

    def _token(self, v: Any) -> Hashable:
        """A hashable value equal for parameters that mean the same."""
        if v is None or isinstance(v, (bool, int, str, bytes)):
            return (type(v).__name__, v)
        if isinstance(v, float):
            return ("float", v) if v == v else ("nan",)
        if isinstance(v, L.Node):
            return ("n", self.of(v))
        if isinstance(v, (tuple, list)):
            return (type(v).__name__, tuple(self._token(x) for x in v))
        if isinstance(v, dict):
            return ("dict", tuple(sorted(((repr(k), self._token(x)) for k, x in v.items()),
                                         key=lambda kv: kv[0])))
        if isinstance(v, (set, frozenset)):
            return ("set", frozenset(self._token(x) for x in v))
        if isinstance(v, Source):
            return ("source", type(v).__qualname__, v.fingerprint())
        if isinstance(v, Expr):
            return ("expr", type(v).__qualname__,
                    tuple(sorted((k, self._token(x)) for k, x in vars(v).items())))
        if isinstance(v, (pa.DataType, pa.Schema, pa.Field, pc.Expression)):
            return ("arrow", type(v).__name__, str(v))
        if isinstance(v, pa.Scalar):
            try:
                value = v.as_py()
                hash(value)
            except Exception:  # noqa: BLE001 - an unhashable or unconvertible value
                return ("id", id(v))
            return ("scalar", str(v.type), type(value).__name__, value)
        if isinstance(v, enum.Enum):
            return ("enum", type(v).__qualname__, v.name)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return ("dc", type(v).__qualname__,
                    tuple((f.name, self._token(getattr(v, f.name))) for f in dataclasses.fields(v)))
        return ("id", id(v))  # a function, a table, anything opaque: the same object


def fingerprint(node: L.Node) -> int:
    """The fingerprint of one plan (comparable only with others of the same call: use
    :class:`Fingerprints` to compare sub-plans)."""
    return Fingerprints().of(node)
