"""FROM: tables, subqueries and table functions as relations, and their joins: explicit
JOINs (ON, USING, NATURAL, CROSS; a condition on one side of an outer join goes into
that side when it may), and comma-separated items joined on the WHERE clause's
equalities between them, in the order written (each joins the first relation before it
that it has an equality with); WHERE parts common to every branch of an OR are taken
out of it first, so they can be keys too.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import pyarrow as pa
from sqlglot import exp

from millstream.expr.nodes import Column, Expr
from millstream.io.memory import TableSource
from millstream.plan import logical as L
from millstream.sql import joins as J
from millstream.sql.exprs import Translator, walk_level
from millstream.sql.scope import Field, NotFound, Relation, Scope

if TYPE_CHECKING:
    from millstream.sql.exprs import Env
    from millstream.sql.planner import Planner

_ONE = "__sql_one"


def one_row() -> Relation:
    """A relation of one row and no visible column (SELECT without FROM)."""
    return Relation(L.Scan(TableSource(pa.table({_ONE: pa.array([0], pa.int8())}), 1,
                                       "one row")), [])


def has_subquery(node: exp.Expr) -> bool:
    """True when ``node`` holds a subquery of this query level."""
    if isinstance(node, (exp.Select, exp.Subquery, exp.SetOperation)):
        return True
    for sub in walk_level(node):
        if isinstance(sub, exp.Exists) or (isinstance(sub, exp.In)
                                           and sub.args.get("query") is not None):
            return True
        if any(isinstance(child, (exp.Select, exp.Subquery, exp.SetOperation))
               for child in sub.iter_expressions()):
            return True
    return False


def conjuncts(node: exp.Expr | None) -> list[exp.Expr]:
    """The AND-ed parts of a condition, with the parts common to every branch of an OR
    taken out of it (``(a AND b) OR (a AND c)`` is ``a AND (b OR c)``)."""
    if node is None:
        return []
    while isinstance(node, exp.Paren):
        node = node.this
    if isinstance(node, exp.And):
        return conjuncts(node.this) + conjuncts(node.expression)
    if isinstance(node, exp.Or):
        branches = _disjuncts(node)
        parts = [conjuncts(b) for b in branches]
        texts = [{p.sql() for p in ps} for ps in parts]
        common_text = set.intersection(*texts) if texts else set()
        if common_text:
            common = [p for p in parts[0] if p.sql() in common_text]
            seen: set[str] = set()
            common = [p for p in common if not (p.sql() in seen or seen.add(p.sql()))]
            rests = [[p for p in ps if p.sql() not in common_text] for ps in parts]
            if any(not r for r in rests):  # a branch that is only the common part
                return common
            ors = None
            for r in rests:
                branch = r[0]
                for p in r[1:]:
                    branch = exp.And(this=branch, expression=p)
                ors = branch if ors is None else exp.Or(this=ors, expression=exp.Paren(
                    this=branch))
            return common + [ors]
    return [node]


def _disjuncts(node: exp.Expr) -> list[exp.Expr]:
    while isinstance(node, exp.Paren):
        node = node.this
    if isinstance(node, exp.Or):
        return _disjuncts(node.this) + _disjuncts(node.expression)
    return [node]


def is_unbounded(node: L.Node) -> bool:
    """True when the plan reads a stream (an unbounded source)."""
    if isinstance(node, L.Scan):
        return not node.source.bounded
    return any(is_unbounded(c) for c in node.children)



class FromClause:
    """The FROM clause of a :class:`~millstream.sql.select.SelectBuilder` (a mixin: the
    builder has ``p``, ``sel``, ``outer``, ``env`` and ``translator``)."""

    p: Planner
    sel: exp.Select
    outer: Scope | None
    env: Env
    deferred: list[exp.Expr]

    def translator(self, clause: str, rel: Relation | None = None, holder=None,
                   **kw) -> Translator:  # pragma: no cover - the builder's
        raise NotImplementedError

    def from_items(self) -> list[Relation]:
        """The FROM clause as components: comma-separated items apart (to be joined on
        the WHERE clause's equalities), explicit JOINs applied to the item before them."""
        from_ = self.sel.args.get("from_") or self.sel.args.get("from")
        if from_ is None:
            if self.sel.args.get("joins"):
                raise self.p.error("JOIN without FROM", self.sel)
            return [one_row()]
        components = [self.from_item(from_.this)]
        for j in self.sel.args.get("joins") or []:
            right = self.from_item(j.this)
            kind = (j.args.get("kind") or "").upper()
            side = (j.args.get("side") or "").upper()
            method = (j.args.get("method") or "").upper()
            if not (kind or side or method) and j.args.get("on") is None \
                    and not j.args.get("using"):
                components.append(right)  # a comma: joined with the WHERE conditions
                continue
            if not side and kind in ("", "INNER") and not method and j.args.get("on") \
                    is not None and is_unbounded(components[-1].node) \
                    and is_unbounded(right.node):
                # two streams: the time bounds of their join may be in WHERE
                self.deferred.extend(conjuncts(j.args["on"]))
                components.append(right)
                continue
            components[-1] = self.explicit_join(components[-1], right, j, kind, side, method)
        return components

    def from_item(self, item: exp.Expr) -> Relation:
        from millstream.sql import windowing

        alias = item.args.get("alias")
        alias_name = alias.name if alias is not None and alias.name else None
        if isinstance(item, exp.Table):
            if isinstance(item.this, exp.Func):
                rel = windowing.table_function(self, item.this)
                name = alias_name
            else:
                if item.args.get("db") or item.args.get("catalog"):
                    raise self.p.error("schema-qualified table names are not supported", item)
                rel = self.p.table(item.name, item.this)
                name = alias_name or item.name
        elif isinstance(item, exp.Subquery):
            rel = self.p.query(item.this)
            rel = self.p._order_limit(item, rel) if item.args.get("order") or \
                item.args.get("limit") else rel
            name = alias_name
        elif isinstance(item, exp.Values):
            rel = self.p.values(item)
            name = alias_name
        else:
            raise self.p.error(f"unsupported FROM item {type(item).__name__}", item)
        if alias is not None and alias.columns:
            rel = self.p.rename_columns(rel, [c.name for c in alias.columns], item)
        return rel.requalified(name) if name is not None or not isinstance(item, exp.Table) \
            else rel

    def explicit_join(self, left: Relation, right: Relation, j: exp.Join, kind: str,
                      side: str, method: str) -> Relation:
        from millstream.sql import streaming

        if kind in ("ASOF", "POSITIONAL", "ARRAY") or method == "ASOF":
            raise self.p.error(f"{kind or method} JOIN is not supported", j)
        if not (is_unbounded(left.node) and is_unbounded(right.node)):
            left, right = self.plain(left), self.plain(right)
        how = {"LEFT": "left", "RIGHT": "right", "FULL": "outer"}.get(side, "inner")
        if kind == "SEMI":
            how = "semi"
        elif kind == "ANTI":
            how = "anti"
        if kind == "CROSS" or (how == "inner" and j.args.get("on") is None
                               and not j.args.get("using") and method != "NATURAL"):
            if is_unbounded(left.node) and is_unbounded(right.node):
                raise streaming.stream_join_error(self, j)
            return J.cross(left, right)
        using = [u.name for u in j.args.get("using") or []]
        if method == "NATURAL":
            lnames = {f.name.lower() for f in left.visible()}
            using = [f.name for f in right.visible() if f.name.lower() in lnames]
        if using:
            return self.using_join(left, right, using, how, j)
        on = conjuncts(j.args.get("on"))
        return self.join_on(left, right, on, how, j)

    def plain(self, rel: Relation) -> Relation:
        """A windowing function's relation with its window columns computed (for a join
        that is not a window join)."""
        from millstream.sql.windowing import materialize

        if rel.window is not None and not rel.window.materialized:
            return materialize(self, rel)  # type: ignore[arg-type]
        return rel

    def using_join(self, left: Relation, right: Relation, names: list[str], how: str,
                   j: exp.Join) -> Relation:
        """``JOIN ... USING (names)`` (and NATURAL JOIN): the right keys answer only to
        their qualified names; after a right or full join an unqualified key is the
        coalesced pair."""
        right = J.distinct_from(left, right)
        ls, rs = Scope(left), Scope(right)
        lk, rk = [], []
        for n in names:
            try:
                lk.append(ls.resolve(None, n)[0])
                rk.append(rs.resolve(None, n)[0])
            except NotFound as exc:
                raise self.p.error(f"USING ({n}): {exc.message}", j) from None
        rel = self.join_relations(left, right, [Column(f.internal) for f in lk],
                                  [Column(f.internal) for f in rk], how, [], j)
        nleft = len(left.fields)
        lower = {n.lower() for n in names}
        fields = list(rel.fields)
        for i in range(nleft, len(fields)):
            if fields[i].name.lower() in lower:
                fields[i] = dataclasses.replace(fields[i], hidden=True)
        if how not in ("right", "outer"):
            return Relation(rel.node, fields)
        extra = []
        for lf, n in zip(lk, names):
            rfield = next(f for f in fields[nleft:] if f.name.lower() == n.lower())
            merged = self.p.fresh("using")
            value = Column(rfield.internal) if how == "right" else \
                Column(lf.internal).fill_null(Column(rfield.internal))
            extra.append(value.alias(merged))
            fields = [dataclasses.replace(f, hidden=True) if f.internal == lf.internal else f
                      for f in fields]
            fields.append(Field(lf.name, None, merged))
        return Relation(L.WithColumns(rel.node, tuple(extra)), fields)

    def join_on(self, left: Relation, right: Relation, on: list[exp.Expr], how: str,
                j: exp.Expr) -> Relation:
        """``left JOIN right ON ...`` (inner, outer, semi, anti): equalities between the
        sides are keys; a condition on one side of an outer join goes into that side when
        it may (the side whose rows it can drop), else it is a residual condition."""
        from millstream.sql import streaming

        if is_unbounded(left.node) and is_unbounded(right.node):
            return streaming.stream_join(self, left, right, on, how, j)
        right = J.distinct_from(left, right)
        lkeys, rkeys, rest = [], [], []
        for c in on:
            if has_subquery(c):
                raise self.p.error("a subquery in a JOIN's ON condition is not supported; "
                                   "move it to WHERE", c)
            pair = self.key_pair(c, left, right)
            if pair is not None:
                lkeys.append(pair[0])
                rkeys.append(pair[1])
                continue
            rest.append(c)
        pre_left, pre_right, residual = [], [], []
        for c in rest:
            sides = self.sides(c, [left, right])
            if sides == {1} and how in ("inner", "left", "semi", "anti"):
                pre_right.append(self.translator("ON", right).build(c))
            elif sides == {0} and how in ("inner", "right"):
                pre_left.append(self.translator("ON", left).build(c))
            else:
                residual.append(c)
        if pre_left:
            left = left.with_node(L.Filter(left.node, J.conjoin(pre_left)))
        if pre_right:
            right = right.with_node(L.Filter(right.node, J.conjoin(pre_right)))
        return self.join_relations(left, right, lkeys, rkeys, how, residual, j)

    def join_relations(self, left: Relation, right: Relation, lkeys: list[Expr],
                       rkeys: list[Expr], how: str, residual: list[exp.Expr],
                       node: exp.Expr) -> Relation:
        """The join, the residual conditions translated over both sides' columns."""
        right = J.distinct_from(left, right)
        condition = None
        if residual:
            both = Relation(left.node, [*left.fields, *right.fields])
            tr = Translator(self.env, Scope(both, self.outer), None, "ON")
            condition = J.conjoin([tr.build(c) for c in residual])
        return J.join(left, right, lkeys, rkeys, how, condition,
                      error=lambda m: self.p.error(m, node))

    def key_pair(self, c: exp.Expr, left: Relation, right: Relation
                 ) -> tuple[Expr, Expr] | None:
        """``(left key, right key)`` when ``c`` is an equality of an expression over one
        side with one over the other."""
        inner = c
        while isinstance(inner, exp.Paren):
            inner = inner.this
        if not isinstance(inner, exp.EQ):
            return None
        a, b = inner.this, inner.expression
        sa, sb = self.sides(a, [left, right]), self.sides(b, [left, right])
        if sa == {0} and sb == {1}:
            tl, tr_ = self.translator("ON", left), self.translator("ON", right)
            ka, kb = tl.build(a), tr_.build(b)
        elif sa == {1} and sb == {0}:
            tl, tr_ = self.translator("ON", left), self.translator("ON", right)
            ka, kb = tl.build(b), tr_.build(a)
        else:
            return None
        if not _same_kind(ka, kb, left.schema, right.schema):
            return None
        return ka, kb

    def sides(self, c: exp.Expr, rels: list[Relation]) -> set[int] | None:
        """Which of ``rels`` the columns of ``c`` come from (None: an outer scope's, or a
        name none has)."""
        out: set[int] = set()
        for col in walk_level(c):
            if not isinstance(col, exp.Column) or isinstance(col.this, exp.Star):
                continue
            found = None
            for i, r in enumerate(rels):
                if Scope(r).candidates(col.table or None, col.name):
                    found = i
                    break
            if found is None:
                return None
            out.add(found)
        return out

    def join_components(self, components: list[Relation], where: list[exp.Expr]
                        ) -> tuple[Relation, list[exp.Expr]]:
        """The comma-separated FROM items joined, each with the first relation before it
        it has WHERE equalities with (those equalities are its keys); the WHERE parts not
        used as keys."""
        from millstream.sql import streaming

        if len(components) == 1:
            return components[0], where
        rest = list(where)
        joined = components[0]
        pending = components[1:]
        while pending:
            pick, pairs = None, []
            for idx, comp in enumerate(pending):
                if not (is_unbounded(joined.node) and is_unbounded(comp.node)):
                    joined, comp = self.plain(joined), self.plain(comp)
                comp = pending[idx] = J.distinct_from(joined, comp)
                pairs = []
                for c in rest:
                    if has_subquery(c):
                        continue
                    pair = self.key_pair(c, joined, comp)
                    if pair is not None:
                        pairs.append((c, pair))
                if pairs:
                    pick = idx
                    break
            if pick is None:
                comp = pending.pop(0)
                if is_unbounded(joined.node) and is_unbounded(comp.node):
                    joined = streaming.where_stream_join(self, joined, comp, rest)
                    continue
                joined = J.cross(joined, comp)
                continue
            comp = pending.pop(pick)
            if is_unbounded(joined.node) and is_unbounded(comp.node):
                joined = streaming.where_stream_join(self, joined, comp, rest)
                continue
            used = {id(c) for c, _ in pairs}
            rest = [c for c in rest if id(c) not in used]
            joined = self.join_relations(joined, comp, [p[0] for _, p in pairs],
                                         [p[1] for _, p in pairs], "inner", [], self.sel)
        return joined, rest


def _same_kind(a: Expr, b: Expr, left: pa.Schema | None, right: pa.Schema | None) -> bool:
    """Whether two join keys may be compared by hashing (same kind of type)."""
    try:
        ta = a.output_type(left) if left is not None else None
        tb = b.output_type(right) if right is not None else None
    except Exception:  # noqa: BLE001
        return True
    if ta is None or tb is None:
        return True

    def kind(t: pa.DataType) -> str:
        if pa.types.is_integer(t):
            return "int"
        if pa.types.is_floating(t) or pa.types.is_decimal(t):
            return "num" if pa.types.is_floating(t) else "dec"
        if pa.types.is_string(t) or pa.types.is_large_string(t) or str(t) == "string_view":
            return "str"
        return str(t)

    return kind(ta) == kind(tb)
