"""Plan helpers the rules share: rebuilding a node only when its inputs changed, the empty
relation of a schema, where a join's output columns come from, and schema comparison."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import pyarrow as pa

from millstream.io.memory import TableSource
from millstream.plan.logical import Join, Node, Scan, WithWatermark
from millstream.plan.rules.base import RuleContext

LEFT, RIGHT = 0, 1
#: Join types whose output keeps only the rows where both sides matched (a cross join has
#: no keys: every pair matches).
INNER_LIKE = ("inner", "cross")


def rebuilt(node: Node, children: Iterable[Node]) -> Node:
    """``node`` over ``children``; the same object when they are the same."""
    children = tuple(children)
    if all(a is b for a, b in zip(children, node.children)):
        return node
    return node.with_children(children)


def streaming(ctx: RuleContext) -> bool:
    """Whether the plan being optimized runs as a streaming job."""
    return bool(getattr(ctx.settings, "streaming", False))


def bounded(node: Node) -> bool:
    """True when every source below ``node`` ends by itself and no event time is declared
    (so replacing the subtree by its result cannot change watermarks)."""
    if isinstance(node, Scan):
        return node.source.bounded
    if isinstance(node, WithWatermark):
        return False
    return all(bounded(c) for c in node.children)


def empty_relation(schema: pa.Schema) -> Node:
    """A relation with ``schema`` and no rows (what an always-false filter leaves)."""
    return Scan(TableSource(schema.empty_table(), 1, label="empty"))


def same_schema(a: pa.Schema | None, b: pa.Schema | None) -> bool:
    """Same column names and types, in order (field metadata and nullability aside)."""
    if a is None or b is None:
        return False
    return a.names == b.names and all(x.type.equals(y.type) for x, y in zip(a, b))


@dataclass
class JoinColumns:
    """Where each output column of a join comes from.

    ``source[name]`` maps an output column to the input columns holding the same value on
    every output row, by side (0 left, 1 right): a column of the side whose rows the join
    keeps (an inner join keeps both), and through an equi-key pair also the other side's
    key when the types agree. Columns a join may pad with nulls have no entry there but
    are listed in ``padded[side]``. ``both_required`` names the coalesced keys of an outer
    join: a predicate on them must go to both sides at once.
    """

    source: dict[str, dict[int, str]] = field(default_factory=dict)
    padded: tuple[set[str], set[str]] = field(default_factory=lambda: (set(), set()))
    both_required: set[str] = field(default_factory=set)
    #: sides whose rows the join keeps however the other side matches (outer joins: none)
    kept: tuple[int, ...] = ()
    #: output name -> (side, input name) of the column it shows (padded ones included)
    origin: dict[str, tuple[int, str]] = field(default_factory=dict)


def join_columns(join: Join) -> JoinColumns | None:
    """The :class:`JoinColumns` of ``join``; None when an input's schema is unknown."""
    left, right = join.left.schema, join.right.schema
    out = join.schema
    if left is None or right is None or out is None:
        return None
    how = join.how
    info = JoinColumns()
    lk, rk = list(join.left_on), list(join.right_on)
    shared = {a for a, b in zip(lk, rk) if a == b}
    if how in INNER_LIKE:
        info.kept = (LEFT, RIGHT)
    elif how in ("left", "semi", "anti"):
        info.kept = (LEFT,)
    elif how == "right":
        info.kept = (RIGHT,)
    else:
        info.kept = ()
    out_type = {f.name: f.type for f in out}

    def typed(side_schema: pa.Schema, name: str, out_name: str) -> bool:
        return out_name in out_type and side_schema.field(name).type.equals(out_type[out_name])

    # the output names of the right side's columns
    right_names: dict[str, str] = {}
    if how not in ("semi", "anti"):
        left_set = set(left.names)
        for n in right.names:
            if n in shared:
                continue
            right_names[n] = n if n not in left_set else n + join.suffix
    for n in left.names:
        info.origin[n] = (LEFT, n)
        if n in shared and how in ("right", "outer"):
            # coalesced: the key of whichever side the row has
            if how == "outer":
                if typed(left, n, n) and typed(right, n, n):
                    info.source[n] = {LEFT: n, RIGHT: n}
                    info.both_required.add(n)
                continue
            src = {RIGHT: n} if typed(right, n, n) else {}
            if src and typed(left, n, n):
                src[LEFT] = n
            if src:
                info.source[n] = src
            continue
        if LEFT in info.kept and typed(left, n, n):
            src = {LEFT: n}
            if n in lk:
                other = rk[lk.index(n)]
                if typed(right, other, n):
                    src[RIGHT] = other
            info.source[n] = src
        else:
            info.padded[LEFT].add(n)
    for n, o in right_names.items():
        info.origin[o] = (RIGHT, n)
        if RIGHT in info.kept and typed(right, n, o):
            src = {RIGHT: n}
            if n in rk:
                other = lk[rk.index(n)]
                if typed(left, other, o):
                    src[LEFT] = other
            info.source[o] = src
        else:
            info.padded[RIGHT].add(o)
    return info


def push_sides(info: JoinColumns, how: str, columns: set[str]) -> tuple[int, ...] | None:
    """The sides a condition on output ``columns`` can be applied to instead of above the
    join (every side listed must get it); None when it must stay above."""
    full = [all(c in info.source and s in info.source[c] for c in columns) for s in (0, 1)]
    if how in INNER_LIKE:
        sides = tuple(s for s in (LEFT, RIGHT) if full[s])
        return sides or None
    if how in ("left", "semi", "anti"):
        if not full[LEFT]:
            return None
        return (LEFT, RIGHT) if full[RIGHT] else (LEFT,)
    if how == "right":
        if not full[RIGHT]:
            return None
        return (LEFT, RIGHT) if full[LEFT] else (RIGHT,)
    if how == "outer":
        if columns and columns <= info.both_required and full[LEFT] and full[RIGHT]:
            return (LEFT, RIGHT)
        return None
    return None
