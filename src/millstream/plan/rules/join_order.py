"""Join ordering: a chain of inner equi-joins runs in the order the estimates favour.

A chain of inner joins (with the filters and column selections between and above
them) is flattened into its inputs, the equalities that join them and the filters.
Equal columns form classes, so ``a = b`` and ``b = c`` also let ``a`` join ``c``
directly, and an equality between two inputs in a filter joins them too. Dynamic
programming over the subsets of inputs (greedy beyond ``DP_LIMIT`` inputs) picks the
tree with the fewest estimated intermediate rows (``plan/stats.py``); each join has the
smaller side on the right (the build or broadcast side); each filter sits where its
columns first meet; a projection on top restores the columns the query asked for, in its
order. Cross products are never introduced: a chain whose inputs do not all connect
stays as written. The plan changes only when the estimated cost drops below
``IMPROVEMENT`` times the written order's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations

from millstream.expr.nodes import Column, Expr, col, conjuncts
from millstream.plan import logical as L
from millstream.plan.fingerprint import Fingerprints
from millstream.plan.rules.base import Rule, RuleContext
from millstream.plan.stats import Estimator, estimator

#: Chains of at most this many inputs are ordered exactly (dynamic programming).
DP_LIMIT = 7
#: A new order must be estimated at most this share of the written order's cost.
IMPROVEMENT = 0.8

Origin = tuple[int, str]  # (input index, its column name)


class JoinOrder(Rule):
    """Chains of inner equi-joins reordered by estimated intermediate sizes."""

    name = "join_order"

    def apply(self, node: L.Node, ctx: RuleContext) -> L.Node:
        if getattr(ctx.settings, "streaming", False) or _reads_a_stream(node):
            return node  # a stream-table join keeps its stream on the left
        return _Orderer(estimator(ctx.settings, ctx.facts)).visit(node)


def _reads_a_stream(node: L.Node) -> bool:
    if isinstance(node, L.Scan):
        return not node.source.bounded
    return any(_reads_a_stream(c) for c in node.children)


def _joinable(node: L.Node) -> bool:
    """An inner equi-join the rule may move (not forced to broadcast, no residual)."""
    return (isinstance(node, L.Join) and node.how == "inner" and node.broadcast is None
            and bool(node.left_on) and getattr(node, "condition", None) is None)


def _plain_columns(node: L.Node) -> bool:
    """A projection that only selects columns by name (no renames, no computation)."""
    return isinstance(node, L.Project) and all(type(e) is Column for e in node.exprs) \
        and len({e.name for e in node.exprs}) == len(node.exprs)  # type: ignore[attr-defined]


def _over_chain(node: L.Node) -> bool:
    """Whether ``node`` is a join of a chain, or filters/selections over one."""
    while isinstance(node, (L.Filter, L.Drop)) or _plain_columns(node):
        node = node.children[0]
    return _joinable(node)


@dataclass
class _Chain:
    leaves: list[L.Node] = field(default_factory=list)
    names: list[list[str]] = field(default_factory=list)
    edges: list[tuple[Origin, Origin]] = field(default_factory=list)
    filters: list[Expr] = field(default_factory=list)
    joins: list[L.Node] = field(default_factory=list)


class _Abort(Exception):
    """The chain cannot be reordered safely (a column name clash, an unknown schema)."""


class _Orderer:
    def __init__(self, est: Estimator) -> None:
        self.est = est

    # ---------------------------------------------------------------- traversal
    def visit(self, node: L.Node) -> L.Node:
        if _over_chain(node):
            out = self._reorder(node)
            if out is not None:
                return out
        kids = tuple(self.visit(c) for c in node.children)
        if all(a is b for a, b in zip(kids, node.children)):
            return node
        return node.with_children(kids)

    def _flatten(self, node: L.Node, ch: _Chain) -> list[tuple[str, Origin]]:
        """The output columns of ``node`` (name, origin), the chain filled in."""
        if _joinable(node):
            ch.joins.append(node)
            left = self._flatten(node.left, ch)  # type: ignore[attr-defined]
            right = self._flatten(node.right, ch)  # type: ignore[attr-defined]
            lmap, rmap = dict(left), dict(right)
            for a, b in zip(node.left_on, node.right_on):  # type: ignore[attr-defined]
                if a not in lmap or b not in rmap:
                    raise _Abort()
                ch.edges.append((lmap[a], rmap[b]))
            same = {a for a, b in zip(node.left_on, node.right_on) if a == b}  # type: ignore[attr-defined]
            out = list(left)
            for name, origin in right:
                if name in same:
                    continue
                if name in lmap:
                    raise _Abort()  # the join would rename it with its suffix
                out.append((name, origin))
            return out
        if isinstance(node, L.Filter) and _over_chain(node.child):
            inner = self._flatten(node.child, ch)
            ch.filters.append(node.predicate)
            return inner
        if _plain_columns(node) and _over_chain(node.children[0]):
            inner = dict(self._flatten(node.children[0], ch))
            try:
                return [(e.name, inner[e.name]) for e in node.exprs]  # type: ignore[attr-defined]
            except KeyError:
                raise _Abort() from None
        if isinstance(node, L.Drop) and _over_chain(node.child):
            inner = self._flatten(node.child, ch)
            return [(n, o) for n, o in inner if n not in node.columns]
        schema = node.schema
        if schema is None or len(set(schema.names)) != len(schema.names):
            raise _Abort()
        i = len(ch.leaves)
        ch.leaves.append(self.visit(node))
        ch.names.append(list(schema.names))
        return [(n, (i, n)) for n in schema.names]

    # ---------------------------------------------------------------- reordering
    def _reorder(self, top: L.Node) -> L.Node | None:
        ch = _Chain()
        try:
            out = self._flatten(top, ch)
        except _Abort:
            return None
        n = len(ch.leaves)
        if n < 2:
            return None
        classes = _Classes()
        for a, b in ch.edges:
            classes.union(a, b)
        # an equality of two inputs' columns in a filter joins them as well
        owners: dict[str, set[int]] = {}
        for i, names in enumerate(ch.names):
            for name in names:
                owners.setdefault(name, set()).add(i)
        filters: list[Expr] = []
        for f in ch.filters:
            for c in conjuncts(f):
                a, b = getattr(c, "args", (None, None))[:2] if getattr(c, "op", None) == "eq" \
                    else (None, None)
                if type(a) is Column and type(b) is Column and a.name != b.name \
                        and len(owners.get(a.name, ())) == 1 and len(owners.get(b.name, ())) == 1 \
                        and owners[a.name] != owners[b.name]:
                    classes.union((next(iter(owners[a.name])), a.name),
                                  (next(iter(owners[b.name])), b.name))
                else:
                    filters.append(c)
        # a name that several inputs have must be one class (the joins merge it into one
        # column); else reordering could clash
        for name, who in owners.items():
            if len(who) > 1 and len({classes.find((i, name)) for i in who}) > 1:
                return None
            if len(who) > 1 and len({str(self._type(ch, i, name)) for i in who}) > 1:
                return None
        plan = _Planner(self.est, ch, classes, filters)
        best = plan.best()
        if best is None:
            return None
        cost, tree = best
        written = 0.0
        for j in ch.joins:
            rows = self.est.rows(j)
            written += rows if rows is not None else float("inf")
        if not cost < IMPROVEMENT * written:
            return None
        node = tree.node
        for f in filters:
            if not f.columns():  # a constant condition: on top
                node = L.Filter(node, f)
        wanted = [name for name, _ in out]
        if list(tree.names) != wanted:
            node = L.Project(node, tuple(col(c) for c in wanted))
        fps = Fingerprints()
        if fps.of(node) == fps.of(top):
            return None  # the order as written (the rule reaches a fixed point)
        return node

    @staticmethod
    def _type(ch: _Chain, i: int, name: str) -> object:
        schema = ch.leaves[i].schema
        return None if schema is None else schema.field(name).type


class _Classes:
    """Union-find over (input, column) origins: columns known equal."""

    def __init__(self) -> None:
        self.parent: dict[Origin, Origin] = {}

    def find(self, x: Origin) -> Origin:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: Origin, b: Origin) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def members(self) -> dict[Origin, list[Origin]]:
        out: dict[Origin, list[Origin]] = {}
        for x in list(self.parent):
            out.setdefault(self.find(x), []).append(x)
        return out


@dataclass
class _Tree:
    node: L.Node
    names: tuple[str, ...]
    mask: int


class _Planner:
    """Finds the cheapest join tree of a chain's inputs."""

    def __init__(self, est: Estimator, ch: _Chain, classes: _Classes,
                 filters: list[Expr]) -> None:
        self.est = est
        self.ch = ch
        self.n = len(ch.leaves)
        self.filters = [(f, frozenset(f.columns())) for f in filters]
        self.leaf_names = [frozenset(names) for names in ch.names]
        # per class: the inputs holding it, and their column names
        self.classes = [sorted(m) for m in classes.members().values() if len(m) > 1]
        self.placed: set[int] = set()

    def names_of(self, mask: int) -> frozenset[str]:
        out: frozenset[str] = frozenset()
        for i in range(self.n):
            if mask >> i & 1:
                out |= self.leaf_names[i]
        return out

    def leaf(self, i: int) -> _Tree:
        node = self.ch.leaves[i]
        names = self.leaf_names[i]
        for f, cols in self.filters:
            if cols and cols <= names:
                node = L.Filter(node, f)
        return _Tree(node, tuple(self.ch.names[i]), 1 << i)

    def keys(self, a: _Tree, b: _Tree) -> list[tuple[str, str]] | None:
        """Join keys of two disjoint trees (None: nothing connects them, or a clash)."""
        keys: list[tuple[str, str]] = []
        names_a, names_b = set(a.names), set(b.names)
        for members in self.classes:
            left = [name for i, name in members if a.mask >> i & 1 and name in names_a]
            right = [name for i, name in members if b.mask >> i & 1 and name in names_b]
            if not left or not right:
                continue
            same = sorted(set(left) & set(right))
            if same:
                keys.extend((s, s) for s in same)
            else:
                keys.append((left[0], right[0]))
        if not keys:
            return None
        merged = {x for x, y in keys if x == y}
        if (names_a & names_b) - merged:
            return None
        return keys

    def join(self, a: _Tree, b: _Tree) -> tuple[_Tree, float] | None:
        keys = self.keys(a, b)
        if keys is None:
            return None
        ba, bb = self.est.bytes(a.node), self.est.bytes(b.node)
        if ba is None or bb is None:
            return None
        if ba < bb or (ba == bb and a.mask > b.mask):
            a, b = b, a
            keys = [(y, x) for x, y in keys]
        node: L.Node = L.Join(a.node, b.node, tuple(k for k, _ in keys),
                              tuple(k for _, k in keys), "inner")
        merged = {x for x, y in keys if x == y}
        names = a.names + tuple(n for n in b.names if n not in merged)
        mask = a.mask | b.mask
        here, sa, sb = frozenset(names), frozenset(a.names), frozenset(b.names)
        for f, cols in self.filters:
            if cols <= here and not cols <= sa and not cols <= sb:
                node = L.Filter(node, f)
        rows = self.est.rows(node)
        if rows is None:
            return None
        return _Tree(node, names, mask), rows

    def best(self) -> tuple[float, _Tree] | None:
        leaves = [self.leaf(i) for i in range(self.n)]
        if any(self.est.rows(t.node) is None for t in leaves):
            return None
        if self.n <= DP_LIMIT:
            return self._dynamic(leaves)
        return self._greedy(leaves)

    def _dynamic(self, leaves: list[_Tree]) -> tuple[float, _Tree] | None:
        best: dict[int, tuple[float, _Tree]] = {1 << i: (0.0, t) for i, t in enumerate(leaves)}
        full = (1 << self.n) - 1
        for size in range(2, self.n + 1):
            for combo in combinations(range(self.n), size):
                mask = sum(1 << i for i in combo)
                low = mask & -mask
                sub = (mask - 1) & mask
                found: tuple[float, _Tree] | None = None
                while sub:
                    other = mask ^ sub
                    if sub & low and sub in best and other in best:  # each split once
                        (ca, ta), (cb, tb) = best[sub], best[other]
                        got = self.join(ta, tb)
                        if got is not None:
                            tree, rows = got
                            cost = ca + cb + rows
                            if found is None or cost < found[0]:
                                found = (cost, tree)
                    sub = (sub - 1) & mask
                if found is not None:
                    best[mask] = found
        return best.get(full)

    def _greedy(self, leaves: list[_Tree]) -> tuple[float, _Tree] | None:
        trees = [(0.0, t) for t in leaves]
        while len(trees) > 1:
            pick: tuple[float, int, int, _Tree] | None = None
            for i in range(len(trees)):
                for j in range(i + 1, len(trees)):
                    got = self.join(trees[i][1], trees[j][1])
                    if got is not None and (pick is None or got[1] < pick[0]):
                        pick = (got[1], i, j, got[0])
            if pick is None:
                return None  # not connected: no cross products
            rows, i, j, tree = pick
            cost = trees[i][0] + trees[j][0] + rows
            trees = [t for k, t in enumerate(trees) if k not in (i, j)] + [(cost, tree)]
        return trees[0]
