"""Top-k: ``sort(...).limit(n)`` becomes a :class:`~millstream.plan.logical.TopK` node,
planned as a top-``n`` per partition and one merge of those (no full sort, no sampling
pass for range boundaries). Only for ``n`` up to :data:`MAX_ROWS` (the rows are held in
memory) and never in a streaming plan."""

from __future__ import annotations

from millstream.plan.logical import Limit, Node, Sort, TopK
from millstream.plan.rules.base import Rule, RuleContext
from millstream.plan.rules.common import streaming

#: Largest ``n`` planned as a top-k (each task holds up to about twice that many rows);
#: a larger limit stays a sort (which spills) and a limit.
MAX_ROWS = 100_000


class SortLimitToTopK(Rule):
    """A limit right above a sort becomes a top-k."""

    name = "topk"

    def apply(self, node: Node, ctx: RuleContext) -> Node:
        if streaming(ctx):
            return node
        return node.transform_up(_topk)


def _topk(node: Node) -> Node:
    if isinstance(node, Limit) and isinstance(node.child, Sort) and node.n <= MAX_ROWS:
        s = node.child
        return TopK(s.child, s.by, s.descending, node.n, s.nulls_last)
    return node
