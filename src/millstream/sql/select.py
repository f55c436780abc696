"""SELECT: FROM (tables, subqueries, joins), WHERE (filters, subqueries), GROUP BY and
HAVING (``sql.grouping``), the select list with window functions, QUALIFY, DISTINCT,
ORDER BY, LIMIT and OFFSET, to logical plan nodes.

Comma-separated FROM items are joined on the WHERE clause's equalities between them,
in the order written (a table joins the first table before it that it has an equality
with); the optimizer pushes the remaining filters down. A correlated subquery is
translated here too, with its correlated WHERE conditions handed to its
:class:`~millstream.sql.subqueries.Correlation` instead of filtering.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlglot import exp

from millstream.api import analytic
from millstream.expr.nodes import Column, Expr
from millstream.plan import logical as L
from millstream.sql import joins as J
from millstream.sql.aggregates import window_expr
from millstream.sql.exprs import Translator, contains_aggregate
from millstream.sql.fromclause import FromClause, conjuncts, has_subquery, is_unbounded, one_row
from millstream.sql.ordering import apply_limit, sort_by
from millstream.sql.scope import Field, Relation, Scope

if TYPE_CHECKING:
    from millstream.sql.planner import Planner
    from millstream.sql.subqueries import Correlation



def output_name(node: exp.Expr, dialect: str) -> str:
    """The column name SQL gives a select item without an alias."""
    if isinstance(node, exp.Alias):
        return node.alias
    if isinstance(node, exp.Column):
        return node.name
    inner = node
    while isinstance(inner, exp.Paren):
        inner = inner.this
    if isinstance(inner, exp.Column):
        return inner.name
    try:
        return node.sql(dialect=dialect, normalize_functions="lower")
    except Exception:  # noqa: BLE001 - a name is all we need
        return node.sql()


def select(p: Planner, sel: exp.Select, outer: Scope | None,
           correlation: Correlation | None = None, only_carried: bool = False) -> Relation:
    """The relation of a SELECT (see the module docstring)."""
    return SelectBuilder(p, sel, outer, correlation, only_carried).build()


class SelectBuilder(FromClause):
    """One SELECT's translation, clause by clause."""

    def __init__(self, p: Planner, sel: exp.Select, outer: Scope | None,
                 correlation: Correlation | None, only_carried: bool):
        self.p = p
        self.sel = sel
        self.outer = outer
        self.correlation = correlation
        self.only_carried = only_carried
        self.rel: Relation = one_row()
        #: ON conditions of inner joins of two streams, decided with the WHERE clause's
        self.deferred: list[exp.Expr] = []

    @property
    def env(self):
        return self.p.env

    def scope(self, rel: Relation | None = None) -> Scope:
        return Scope(rel or self.rel, self.outer)

    def translator(self, clause: str, rel: Relation | None = None, holder: Any = None,
                   **kw: Any) -> Translator:
        """A translator of expressions over ``rel`` (default: the FROM relation); a
        subquery in them joins into ``holder.rel`` (a :class:`Holder` of ``rel``)."""
        from millstream.sql.subqueries import Holder, SubqueryHandler

        rel = rel or self.rel
        tr = Translator(self.env, self.scope(rel), rel.schema, clause, **kw)
        if "subquery" not in kw:
            handler = SubqueryHandler(self, clause, holder or Holder(rel), tr)
            tr.subquery = handler.expression
        return tr

    # ------------------------------------------------------------------ the clauses
    def build(self) -> Relation:
        from millstream.sql import grouping, streaming, windowing

        sel = self.sel
        for key in ("into", "distribute", "cluster", "sort", "connect", "prewhere"):
            if sel.args.get(key):
                raise self.p.error(f"{key.upper()} is not supported", sel.args[key])
        if sel.args.get("laterals") or any(isinstance(j.this, exp.Lateral)
                                           for j in sel.args.get("joins") or []):
            raise self.p.error("LATERAL is not supported; write the subquery in WHERE or as "
                               "a join", sel)
        where = conjuncts(sel.args["where"].this) if sel.args.get("where") else []
        components = self.from_items()
        if self.correlation is not None:
            where = self.correlation.split(self, components, where)
        where = where + self.deferred
        self.rel, where = self.join_components(components, where)
        group = sel.args.get("group")
        by_window = windowing.groups_by_window(self, group)
        window = self.rel.window
        if window is not None and not window.materialized and not by_window:
            self.rel = windowing.materialize(self, self.rel)
        self.rel = self.apply_where(where)
        aggregated = group is not None or sel.args.get("having") is not None or any(
            contains_aggregate(e, self.env) for e in sel.expressions)
        if by_window:
            post, hook = grouping.aggregate(self, group, window=self.rel.window)
        elif aggregated:
            if is_unbounded(self.rel.node):
                raise streaming.unwindowed_aggregate_error(self, group or sel)
            post, hook = grouping.aggregate(self, group)
        else:
            post, hook = self.rel, None
        if sel.args.get("having") is not None:
            from millstream.sql.subqueries import Holder

            holder = Holder(post)
            tr = self.translator("HAVING", post, holder, hook=hook)
            cond = tr.build(sel.args["having"].this)
            post = Relation(L.Filter(holder.rel.node, cond), holder.rel.fields, post.window)
        return self.finish(post, hook)

    def resolve_group_item(self, e: exp.Expr) -> exp.Expr:
        """A GROUP BY item: an ordinal or a select list alias stands for that select item."""
        items = self.sel.expressions
        if isinstance(e, exp.Literal) and not e.is_string:
            k = int(e.this)
            if not 1 <= k <= len(items):
                raise self.p.error(f"GROUP BY {k}: the select list has {len(items)} items", e)
            item = items[k - 1]
            return item.this if isinstance(item, exp.Alias) else item
        if isinstance(e, exp.Column) and not e.table:
            if not self.scope().candidates(None, e.name):
                for item in items:
                    if isinstance(item, exp.Alias) and item.alias.lower() == e.name.lower():
                        return item.this
        return e

    # ------------------------------------------------------------------ WHERE
    def apply_where(self, where: list[exp.Expr]) -> Relation:
        from millstream.sql.subqueries import SubqueryHandler

        plain = [c for c in where if not has_subquery(c)]
        nested = [c for c in where if has_subquery(c)]
        rel = self.rel
        if plain:
            tr = self.translator("WHERE")
            for c in plain:
                if contains_aggregate(c, self.env):
                    raise self.p.error("aggregate functions are not allowed in WHERE; use "
                                       "HAVING", c)
            rel = Relation(L.Filter(rel.node, J.conjoin([tr.build(c) for c in plain])),
                           rel.fields, rel.window)
        self.rel = rel
        handler = SubqueryHandler(self, "WHERE", self, None)
        for c in nested:
            handler.conjunct(c)
        return self.rel

    # ------------------------------------------------------------------ SELECT list
    def items(self, rel: Relation) -> list[tuple[exp.Expr | Field, str]]:
        """The select list with stars expanded: (expression or field, output name)."""
        out: list[tuple[exp.Expr | Field, str]] = []
        for e in self.sel.expressions:
            star = e if isinstance(e, exp.Star) else (
                e if isinstance(e, exp.Column) and isinstance(e.this, exp.Star) else None)
            if star is None:
                out.append((e, output_name(e, self.env.dialect)))
                continue
            qualifier = star.table if isinstance(star, exp.Column) else None
            target = star.this if isinstance(star, exp.Column) else star
            fields = [f for f in rel.visible() if qualifier is None or (
                f.qualifier is not None and f.qualifier.lower() == qualifier.lower())]
            if qualifier and not fields:
                raise self.p.error(f"unknown table {qualifier!r} in {qualifier}.*", star)
            excluded = {c.name.lower() for c in target.args.get("except_") or
                        target.args.get("except") or []}
            if target.args.get("replace") or target.args.get("rename"):
                raise self.p.error("* REPLACE/RENAME is not supported", star)
            out.extend((f, f.name) for f in fields if f.name.lower() not in excluded)
        return out

    def finish(self, rel: Relation, hook: Any) -> Relation:
        """The select list, QUALIFY, DISTINCT, ORDER BY and LIMIT over ``rel`` (after the
        group-by when there is one)."""
        from millstream.sql.subqueries import Holder

        sel = self.sel
        holder = Holder(rel)
        tr = self.translator("the select list", rel, holder, hook=hook)
        tr.window = lambda node: window_expr(tr, node)
        if self.only_carried:
            items: list[tuple[exp.Expr | Field, str]] = []
        else:
            items = self.items(self.rel if hook is None else rel)
        names = J.unique_names([n for _, n in items])
        exprs: list[Expr] = []
        for (item, _), name in zip(items, names):
            e = Column(item.internal) if isinstance(item, Field) else tr.build(item)
            exprs.append(e.alias(name))
        carried = self.correlation.carried_exprs(self, rel, hook) \
            if self.correlation is not None else []
        visible = list(names)
        hidden: list[Expr] = list(carried)
        qualify = sel.args.get("qualify")
        if qualify is not None:
            qname = self.p.fresh("qualify")
            hidden.append(tr.build(qualify.this).alias(qname))
        order = sel.args.get("order")
        sort_keys: list[tuple[str, bool, bool]] = []
        if order is not None:
            if is_unbounded(rel.node):
                from millstream.sql.streaming import unsupported_on_stream

                raise unsupported_on_stream(self, "ORDER BY", order)
            sort_keys = self.order_items(order.expressions, items, names, exprs, tr, hidden)
        rel = holder.rel  # with the joins of subqueries in the select list
        if is_unbounded(rel.node):  # window Top-N: keyed state, not the batch Window node
            from millstream.sql.topn import lower_stream_windows

            base, lowered, _ = lower_stream_windows(self, rel, [*exprs, *hidden])
            exprs, hidden = lowered[:len(exprs)], lowered[len(exprs):]
            node = L.Project(base, tuple([*exprs, *hidden]))
        else:
            node = analytic.select(rel.node, [*exprs, *hidden])
        if qualify is not None:
            node = L.Drop(L.Filter(node, Column(qname)), (qname,))
            hidden = [h for h in hidden if h.output_name != qname]
        if sel.args.get("distinct") is not None:
            if sel.args["distinct"].args.get("on"):
                raise self.p.error("DISTINCT ON is not supported", sel.args["distinct"])
            if any(h.output_name not in {c.output_name for c in carried} for h in hidden):
                raise self.p.error("for SELECT DISTINCT, ORDER BY expressions must appear in "
                                   "the select list", order)
            node = L.Distinct(node)
        out_fields = [Field(n, None, n) for n in visible]
        carried_names = {c.output_name for c in carried}
        out_fields += [Field(c, None, c, hidden=True) for c in carried_names]
        from millstream.sql.windowing import carried_window

        result = Relation(node, out_fields, carried_window(rel, exprs, names))
        if sort_keys:
            result = sort_by(result, sort_keys)
        result = apply_limit(self.p, sel, result, sort_keys)
        drop = [h.output_name for h in hidden if h.output_name not in carried_names]
        if drop:
            result = result.with_node(L.Drop(result.node, tuple(drop)))
        return result

    def order_items(self, ordered: list[exp.Ordered], items: list, names: list[str],
                    exprs: list[Expr], tr: Translator, hidden: list[Expr]
                    ) -> list[tuple[str, bool, bool]]:
        """ORDER BY items as (column, descending, nulls first): an ordinal or an output
        name is that column; an expression equal to a select item is its column; any other
        is computed into a hidden column."""
        keys = []
        by_repr = {repr(_strip(e)): n for e, n in zip(exprs, names)}
        lowered = {}
        for n in names:
            lowered.setdefault(n.lower(), n)
        for o in ordered:
            target = o.this
            desc = bool(o.args.get("desc"))
            nulls_first = bool(o.args.get("nulls_first"))
            name = None
            if isinstance(target, exp.Literal) and not target.is_string:
                k = int(target.this)
                if not 1 <= k <= len(names):
                    raise self.p.error(f"ORDER BY {k}: the select list has {len(names)} "
                                       f"columns", target)
                name = names[k - 1]
            elif isinstance(target, exp.Column) and not target.table \
                    and target.name.lower() in lowered:
                name = lowered[target.name.lower()]
            else:
                e = tr.build(target)
                name = by_repr.get(repr(_strip(e)))
                if name is None:
                    name = self.p.fresh("order")
                    hidden.append(e.alias(name))
            keys.append((name, desc, nulls_first))
        return keys


def _strip(e: Expr) -> Expr:
    from millstream.plan.rules.exprs import strip_alias

    return strip_alias(e)
