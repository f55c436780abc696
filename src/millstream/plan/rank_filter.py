"""SQL's Top-N shape in a streaming plan: a filter ``rn <= n`` over a ``Window`` computing
``rn = ROW_NUMBER() OVER (PARTITION BY per ORDER BY by)`` becomes a :class:`TopN` node
(the window function needs whole partitions, which a stream never has; the top ``n`` of
each partition can be kept up to date). ``rn < n``, ``n >= rn`` and ``rn = 1`` are
recognized too; the rank stays in ``rn``. Batch plans keep the window function.
"""

from __future__ import annotations

from millstream.expr.nodes import Alias, Column, Literal, _Func
from millstream.plan import logical as L

#: comparisons ``rn OP n`` that keep ranks 1..n', with n' from n
_BOUNDS = {"le": lambda n: n, "lt": lambda n: n - 1, "eq": lambda n: 1 if n == 1 else 0}
#: the same comparisons written ``n OP rn``
_FLIPPED = {"ge": "le", "gt": "lt", "eq": "eq"}


def _limit(predicate: object, rank: str) -> int | None:
    """The ``n`` of a predicate keeping ranks 1..n of column ``rank``, else None."""
    while isinstance(predicate, Alias):
        predicate = predicate.child
    if not isinstance(predicate, _Func) or len(predicate.args) != 2:
        return None
    op, (a, b) = predicate.op, predicate.args
    if isinstance(b, Column) and isinstance(a, Literal):
        if op not in _FLIPPED:
            return None
        op, a, b = _FLIPPED[op], b, a
    if op not in _BOUNDS or not (isinstance(a, Column) and a.name == rank) \
            or not isinstance(b, Literal):
        return None
    n = b.scalar.as_py()
    if isinstance(n, bool) or not isinstance(n, int):
        return None
    bound = _BOUNDS[op](n)
    return bound if bound >= 1 else None


def _rewrite(node: L.Node) -> L.Node:
    if not (isinstance(node, L.Filter) and isinstance(node.child, L.Window)):
        return node
    window = node.child
    if len(window.functions) != 1:
        return node
    fn = window.functions[0]
    if fn.func != "row_number" or not fn.order_by:
        return node
    n = _limit(node.predicate, fn.name)
    if n is None:
        return node
    descending = fn.descending or tuple(False for _ in fn.order_by)
    return L.TopN(window.child, n, tuple(fn.order_by), tuple(descending),
                  tuple(window.partition_by), fn.name, fn.nulls_last)


def rank_filters_to_top_n(node: L.Node) -> L.Node:
    """``node`` with every row-number filter over a window as a TopN node."""
    return node.transform_up(_rewrite)
