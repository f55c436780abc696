"""Which input columns a node needs, given the output columns the plan above it needs.

``required`` is a set of column names, or None for "all of them" (the plan's result, or
the input of a node that reads whole rows: a Python function, ``distinct``, a cache). An
empty set means rows are needed but no column (``count()``). The projection rules walk
the plan top-down with these sets.
"""

from __future__ import annotations

from collections.abc import Iterable

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
    Shared,
    Sort,
    TopK,
    Union,
    WindowAggregate,
    WithColumns,
    WithWatermark,
)
from millstream.plan.rules.common import LEFT, RIGHT, join_columns

Required = frozenset[str] | None


def _with(required: Required, extra: Iterable[str]) -> Required:
    return None if required is None else required | frozenset(extra)


def child_requirements(node: Node, required: Required) -> tuple[Required, ...]:
    """The columns each input of ``node`` must provide so that ``node`` gives ``required``
    of its output (None: all columns)."""
    n = len(node.children)
    refs = node.references()
    if isinstance(node, Project):
        return (frozenset(refs or ()),)
    if isinstance(node, (Filter, Sort, TopK, Repartition, Explode, WithWatermark, Limit)):
        return (_with(required, refs or ()),)
    if isinstance(node, WithColumns):
        if required is None:
            return (None,)  # (a replaced column keeps its input's position: keep them all)
        # a replaced column keeps its input's position only while the input has it: keep
        # the replaced ones that are used above (else a drop above reorders the columns)
        schema = node.child.schema
        replaced = required & node.produced() & frozenset(schema.names if schema else ())
        return (frozenset((required - node.produced()) | replaced | (refs or frozenset())),)
    if isinstance(node, Drop):
        if required is None:
            schema = node.child.schema
            if schema is None:
                return (None,)
            return (frozenset(c for c in schema.names if c not in node.columns),)
        return (required,)
    if isinstance(node, Rename):
        if required is None:
            return (None,)
        schema = node.child.schema
        if schema is None:
            return (None,)
        mapping = dict(node.mapping)
        back = {mapping.get(c, c): c for c in schema.names}
        return (frozenset(back.get(c, c) for c in required),)
    if isinstance(node, (Aggregate, WindowAggregate)):
        return (frozenset(refs or ()),)
    if isinstance(node, Union):
        return tuple(required for _ in node.inputs)
    if isinstance(node, Join):
        return join_requirements(node, required)
    return tuple(None for _ in range(n))


def join_requirements(join: Join, required: Required) -> tuple[Required, Required]:
    """The columns each side of ``join`` must provide: its keys, the columns of
    ``required`` it shows, and a same-named partner of a shown right column (which keeps
    the right one's suffixed name)."""
    left_keys, right_keys = frozenset(join.left_on), frozenset(join.right_on)
    by_condition: tuple[set[str], set[str]] = (set(), set())
    if getattr(join, "condition", None) is not None:
        found = condition_columns(join)
        if found is None:
            return None, None
        by_condition = found
    semi = join.how in ("semi", "anti")
    if required is None:
        wanted = right_keys | by_condition[RIGHT]
        return None, (frozenset(wanted) if semi and wanted else None)
    info = join_columns(join)
    if info is None:
        return None, None
    sides: tuple[set[str], set[str]] = (set(left_keys) | by_condition[LEFT],
                                        set(right_keys) | by_condition[RIGHT])
    for side, col in enumerate(join.time_columns):
        if col is not None:  # a streaming join's state TTL reads them
            sides[side].add(col)
    for name in required:
        origin = info.origin.get(name)
        if origin is None:
            return None, None  # not a column of this join: leave it to fail where it does
        side, col = origin
        sides[side].add(col)
        if side == RIGHT and col != name:  # suffixed: the left column of that name stays
            sides[LEFT].add(col)
    return frozenset(sides[LEFT]), frozenset(sides[RIGHT])


def condition_columns(join: Join) -> tuple[set[str], set[str]] | None:
    """The columns of each side a join's residual condition reads, which names them as the
    inner join outputs them (``JoinLayout.pair_sources``: a right column whose name the left
    has carries the suffix); the left column of such a name is kept too, so the suffix
    stays. None when a name or a schema is not known."""
    from millstream.errors import SchemaError
    from millstream.ops.join import JoinLayout

    left, right = join.left.schema, join.right.schema
    if left is None or right is None:
        return None
    try:
        sources = JoinLayout(left, right, list(join.left_on), list(join.right_on), "inner",
                             join.suffix).pair_sources
    except SchemaError:
        return None
    sides: tuple[set[str], set[str]] = (set(), set())
    for name in join.condition.columns():
        if name not in sources:
            return None
        side, col = sources[name]
        if side == "l":
            sides[LEFT].add(col)
        else:
            sides[RIGHT].add(col)
            if col != name:
                sides[LEFT].add(col)
    return sides


def shared_requirements(root: Node) -> dict[int, Required]:
    """Per ``Shared`` node of the plan (by id): the union of the columns its consumers
    need (None: one of them needs every column). Nested shared sub-plans are found in a
    later pass of the optimizer, once the outer one is narrowed."""
    needs: dict[int, Required] = {}

    def walk(node: Node, required: Required) -> None:
        if isinstance(node, Shared):
            key = id(node)
            if key in needs:
                before = needs[key]
                needs[key] = None if before is None or required is None else before | required
                return
            needs[key] = required
            walk(node.child, None)
            return
        for c, r in zip(node.children, child_requirements(node, required)):
            walk(c, r)

    walk(root, None)
    return needs
