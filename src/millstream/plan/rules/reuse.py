"""Common sub-plan reuse: a sub-plan the query uses more than once runs once.

Equal sub-plans (by structural fingerprint, ``plan/fingerprint.py``: same operations,
same parameters, same or equal sources and functions) become one node object, and a
sub-plan that more than one consumer reads is wrapped in a ``Shared`` node (the same
object at every place). The physical planner then runs it once per action: in batch its
output is materialized once and read by each consumer (unless re-running it is cheaper:
a plain scan); in streaming its rows go to every consumer, so a source is read once.

The rule comes after the pushdown rules (filters are where they run) and before
projection pruning, which leaves a shared sub-plan's columns whole (each consumer selects
what it reads): pruned separately, two uses would no longer be equal. A sub-plan that is a
plain scan of a source cheap to read again (files, in-memory data) under per-row
operations is not shared: reading it again, narrowed to each consumer's columns, costs
less than materializing it.
"""

from __future__ import annotations

from millstream.plan import logical as L
from millstream.plan.fingerprint import Fingerprints
from millstream.plan.rules.base import Rule, RuleContext


class ReuseSubplans(Rule):
    """Equal sub-plans merged; those read by several consumers marked ``Shared``."""

    name = "reuse_subplans"

    def apply(self, node: L.Node, ctx: RuleContext) -> L.Node:
        fps = Fingerprints()
        uses = consumers(node, fps)
        next_id = [max((n.shared_id for n in _walk(node) if isinstance(n, L.Shared)),
                       default=0) + 1]
        built: dict[int, L.Node] = {}

        def build(n: L.Node) -> L.Node:
            original = n
            if isinstance(n, L.Shared):
                n = n.child
            fp = fps.of(n)
            hit = built.get(fp)
            if hit is not None:
                return hit
            kids = tuple(build(c) for c in n.children)
            m = n if all(a is b for a, b in zip(kids, n.children)) else n.with_children(kids)
            count = uses.get(fp, 0)
            if count >= 2 and not _plain_scan(m):
                if isinstance(original, L.Shared) and original.child is m \
                        and original.uses == count:
                    m = original
                else:
                    sid = original.shared_id if isinstance(original, L.Shared) else next_id[0]
                    if not isinstance(original, L.Shared):
                        next_id[0] += 1
                    m = L.Shared(m, sid, count)
            built[fp] = m
            return m

        return build(node)


def consumers(root: L.Node, fps: Fingerprints) -> dict[int, int]:
    """How many consumers read each distinct sub-plan once equal sub-plans are one: the
    distinct (consumer, input position) pairs that reference it (``Shared`` nodes are
    transparent)."""
    edges: dict[int, set[tuple[int, int]]] = {}
    seen: set[int] = set()

    def visit(n: L.Node) -> None:
        if isinstance(n, L.Shared):
            n = n.child
        fp = fps.of(n)
        if fp in seen:
            return
        seen.add(fp)
        for i, c in enumerate(n.children):
            inner = c.child if isinstance(c, L.Shared) else c
            edges.setdefault(fps.of(inner), set()).add((fp, i))
            visit(inner)

    visit(root)
    return {fp: len(e) for fp, e in edges.items()}


def _walk(node: L.Node) -> list[L.Node]:
    out = [node]
    for c in node.children:
        out.extend(_walk(c))
    return out


#: Per-row nodes a "plain scan" may have on top of it.
_PER_ROW = (L.Filter, L.Project, L.WithColumns, L.Drop, L.Rename)


def _plain_scan(node: L.Node) -> bool:
    """A scan of a source that is cheap to read again (files, in-memory data; not a
    generator or a topic) under per-row operations only."""
    while isinstance(node, _PER_ROW):
        node = node.child
    return isinstance(node, L.Scan) and bool(getattr(node.source, "rereads_cheaply", False))
