"""Projection pruning: every node computes and carries only the columns the plan above it
needs. Unused ``select`` and ``with_columns`` expressions and unused aggregates are
dropped, a ``select`` that changes nothing disappears, and a ``select`` of the needed
columns goes below a shuffle (a join side, a union input, a sort) whose input would carry
more (a Python function's output, say); scans are narrowed by ``projection_into_scan``.

A shared sub-plan (``Shared``, from the reuse rule) is narrowed to the union of what its
consumers read, found in a first walk over the plan; it stays one object, so it still runs
once."""

from __future__ import annotations

import threading
from dataclasses import replace

from millstream.expr.nodes import Column
from millstream.plan.logical import (
    Aggregate,
    Drop,
    Explode,
    Filter,
    Join,
    Limit,
    Node,
    Project,
    Rename,
    Repartition,
    Scan,
    Shared,
    Sort,
    TopK,
    Union,
    WithColumns,
    WithWatermark,
)
from millstream.plan.rules.base import Rule, RuleContext
from millstream.plan.rules.columns import Required, child_requirements, shared_requirements
from millstream.plan.rules.common import rebuilt, same_schema

#: Nodes that narrow their own output when their input is narrowed (so a ``select``
#: above them would change nothing), looking through the per-row nodes on top of them.
_SELF_PRUNING = (Scan, Project, Aggregate, Join, Union)
_LOOK_THROUGH = (Filter, Sort, TopK, Limit, Repartition, WithWatermark, Explode, Drop, Rename,
                 WithColumns)
#: Nodes that move their input's rows around (a select below them saves moving columns).
_SHUFFLES = (Sort, TopK, Repartition)


class ProjectionPruning(Rule):
    """Nodes compute and carry only the columns needed above them."""

    name = "projection_pruning"

    def apply(self, node: Node, ctx: RuleContext) -> Node:
        _SHARED.needs, _SHARED.built = shared_requirements(node), {}
        try:
            return _prune(node, None)
        finally:
            _SHARED.needs, _SHARED.built = {}, {}


class _SharedState(threading.local):
    """While the rule runs (per thread): per shared sub-plan, the union of its consumers'
    needs, and the narrowed node once built (the same object at every use)."""

    def __init__(self) -> None:
        self.needs: dict[int, Required] = {}
        self.built: dict[int, Node] = {}


_SHARED = _SharedState()


def _shared(node: Shared) -> Node:
    key = id(node)
    if key not in _SHARED.built:
        need = _SHARED.needs.get(key)
        child = _narrowed(_prune(node.child, need), need)
        _SHARED.built[key] = node if child is node.child else replace(node, child=child)
    return _SHARED.built[key]


def _prune(node: Node, required: Required) -> Node:
    if isinstance(node, Shared):
        return _shared(node)
    if isinstance(node, Project):
        return _project(node, required)
    if isinstance(node, WithColumns) and required is not None:
        keep = tuple(e for e in node.exprs if e.output_name in required)
        if not keep:
            return _prune(node.child, required)  # none of its columns is used
        if len(keep) != len(node.exprs):
            node = replace(node, exprs=keep)
    if isinstance(node, Aggregate) and required is not None:
        keep_specs = tuple(s for s in node.specs if s.name in required)
        if not keep_specs and not node.keys:
            keep_specs = node.specs[:1]  # one row of no aggregate is not a thing: keep one
        if len(keep_specs) != len(node.specs):
            node = replace(node, specs=keep_specs)
    if isinstance(node, Join):
        return _join(node, required)
    reqs = child_requirements(node, required)
    children = []
    for c, r in zip(node.children, reqs):
        new = _prune(c, r)
        if isinstance(node, (*_SHUFFLES, Union)):
            new = _narrowed(new, r)
        children.append(new)
    return rebuilt(node, children)


def _project(node: Project, required: Required) -> Node:
    if required is not None:
        keep = tuple(e for e in node.exprs if e.output_name in required) or node.exprs[:1]
        if len(keep) != len(node.exprs):
            node = replace(node, exprs=keep)
    child = _prune(node.child, child_requirements(node, required)[0])
    schema = child.schema
    if schema is not None and [getattr(e, "name", None) for e in node.exprs] == schema.names \
            and all(type(e) is Column for e in node.exprs):
        return child  # selects every column as it is
    return rebuilt(node, (child,))


def _join(node: Join, required: Required) -> Node:
    reqs = child_requirements(node, required)
    left, right = (_narrowed(_prune(c, r), r) for c, r in zip(node.children, reqs))
    new = rebuilt(node, (left, right))
    if new is not node and required is not None and not _shows(new, node, required):
        # the narrowed inputs changed a needed column's name or type: keep them whole
        new = rebuilt(node, (_prune(node.left, None), _prune(node.right, None)))
    return new


def _shows(new: Node, old: Node, required: frozenset[str]) -> bool:
    """Whether ``new`` gives the ``required`` columns as ``old`` does (names and types)."""
    a, b = new.schema, old.schema
    if a is None or b is None:
        return same_schema(a, b) or a is b
    for name in required:
        if a.get_field_index(name) < 0 or b.get_field_index(name) < 0 or \
                not a.field(name).type.equals(b.field(name).type):
            return False
    return True


def _narrowed(node: Node, required: Required) -> Node:
    """``node`` under a ``select`` of ``required`` when it would carry more columns and
    cannot narrow itself (a Python function, a cache, ...)."""
    if required is None or not required or _self_pruning(node, required):
        return node
    schema = node.schema
    if schema is None:
        return node
    cols = [c for c in schema.names if c in required]
    if len(cols) == len(schema.names) or not cols:
        return node
    return Project(node, tuple(Column(c) for c in cols))


def _self_pruning(node: Node, required: frozenset[str] | None = None) -> bool:
    """Whether ``node`` narrows its own output to ``required`` (through the per-row nodes
    on top; not through a filter reading other columns, which its input keeps for it)."""
    while isinstance(node, _LOOK_THROUGH):
        if required is not None and isinstance(node, Filter) \
                and not node.predicate.columns() <= required:
            return False
        node = node.children[0]
    return isinstance(node, _SELF_PRUNING)
