"""Limit pushdown: ``limit(n)`` moves below the per-row nodes that keep every row (select,
with_columns, rename, drop), merges with a limit or top-k below it, is repeated on the
inputs of a union where that lets them stop early (a sort, a scan that can stop, another
limit), and tells a scan that can stop early (in-memory tables, ranges) to read no more
than ``n`` rows. A limit of 0 over a batch plan is an empty relation.

Never in a streaming plan (a limit there is not about the first rows of a finite input).
"""

from __future__ import annotations

from dataclasses import replace

from millstream.plan.logical import (
    Drop,
    Limit,
    Node,
    Project,
    Rename,
    Scan,
    Sort,
    TopK,
    Union,
    WithColumns,
)
from millstream.plan.rules.base import Rule, RuleContext
from millstream.plan.rules.common import bounded, empty_relation, rebuilt, streaming
from millstream.plan.rules.exprs import is_row_local

#: Per-row nodes that keep every row and its order.
_ROW_PRESERVING = (Project, WithColumns, Rename, Drop)


class LimitPushdown(Rule):
    """Limits move down, merge, and reach scans that can stop early."""

    name = "limit_pushdown"

    def apply(self, node: Node, ctx: RuleContext) -> Node:
        if streaming(ctx):
            return node
        return node.transform_up(_push)


def _row_preserving(node: Node) -> bool:
    if isinstance(node, (Project, WithColumns)):
        return all(is_row_local(e) for e in node.exprs)
    return isinstance(node, _ROW_PRESERVING)


def _push(node: Node) -> Node:
    if not isinstance(node, Limit):
        return node
    n, child = node.n, node.child
    if n == 0 and child.schema is not None and bounded(child):
        return empty_relation(child.schema)
    if isinstance(child, Limit):
        return Limit(child.child, min(n, child.n))
    if isinstance(child, TopK):
        return child if child.n <= n else replace(child, n=n)
    if _row_preserving(child):
        return child.with_children((_push(Limit(child.children[0], n)),))
    if isinstance(child, Union):
        inputs = tuple(_into_input(c, n) for c in child.inputs)
        return rebuilt(node, (rebuilt(child, inputs),))
    if isinstance(child, Scan):
        src = child.source.with_limit(n)
        return node if src is child.source else Limit(Scan(src), n)
    return node


def _into_input(node: Node, n: int) -> Node:
    """A union input with ``limit(n)`` on top where that lets it stop early."""
    if _absorbs(node, n):
        return _push(Limit(node, n))
    return node


def _absorbs(node: Node, n: int) -> bool:
    """Whether a limit of ``n`` right above ``node`` saves work there."""
    while _row_preserving(node):
        node = node.children[0]
    if isinstance(node, (Limit, TopK)):
        return node.n > n
    if isinstance(node, Sort):
        return True
    if isinstance(node, Scan):
        return node.source.with_limit(n) is not node.source
    if isinstance(node, Union):
        return any(_absorbs(c, n) for c in node.inputs)
    return False
