"""Subqueries as joins: IN / NOT IN / EXISTS / NOT EXISTS conditions of WHERE become semi
and anti joins, a scalar subquery a left join with its one row (per group of the
correlation keys, for a correlated aggregate), and IN / EXISTS elsewhere (inside OR, in
the select list) a left join with a marker column ("mark join").

A correlated subquery is decorrelated: its WHERE conditions that compare an inner
expression with an outer one by equality become join keys (and group keys, when it
aggregates); other correlated conditions become the join's residual condition, over the
inner columns carried out of the subquery.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlglot import exp

from millstream.expr.conditional import When
from millstream.expr.nodes import Column, Expr, Literal
from millstream.plan import logical as L
from millstream.sql import joins as J
from millstream.sql.exprs import Translator, walk_level
from millstream.sql.scope import Field, NotFound, Relation, Scope

if TYPE_CHECKING:
    from millstream.sql.select import SelectBuilder


class Holder:
    """The relation expressions are translated over; subqueries join into it."""

    def __init__(self, rel: Relation):
        self.rel = rel


class Correlation:
    """What a correlated subquery shares with its outer query (module docstring)."""

    def __init__(self, outer: Scope, kind: str):
        self.outer = outer
        self.kind = kind  # "scalar", "in", "exists"
        self.pairs: list[tuple[exp.Expr, exp.Expr, str]] = []  # (inner, outer, carried name)
        self.residual: list[exp.Expr] = []
        self.refs: dict[str, tuple[Field, str]] = {}  # inner internal -> (field, carried)
        self.aggregated = False
        self._n = 0

    @property
    def empty(self) -> bool:
        return not self.pairs and not self.residual

    def _name(self, b: SelectBuilder) -> str:
        return b.p.fresh("corr")

    def split(self, b: SelectBuilder, components: list[Relation], where: list[exp.Expr]
              ) -> list[exp.Expr]:
        """The subquery's WHERE parts without the correlated ones, which are kept here."""
        local = Relation(components[0].node, [f for c in components for f in c.fields])
        scope = Scope(local, self.outer)
        rest = []
        for c in where:
            depths = _depths(b, scope, c)
            if not depths or max(depths) == 0:
                rest.append(c)
                continue
            if max(depths) > 1:
                raise b.p.error("a subquery correlated with a query two levels out is not "
                                "supported", c)
            inner = c
            while isinstance(inner, exp.Paren):
                inner = inner.this
            if isinstance(inner, exp.EQ):
                da = _depths(b, scope, inner.this)
                db = _depths(b, scope, inner.expression)
                if da == {0} and db == {1}:
                    self.pairs.append((inner.this, inner.expression, self._name(b)))
                    continue
                if da == {1} and db == {0}:
                    self.pairs.append((inner.expression, inner.this, self._name(b)))
                    continue
            self.residual.append(c)
            for col in walk_level(c):
                if isinstance(col, exp.Column) and not isinstance(col.this, exp.Star):
                    field, depth = scope.resolve(col.table or None, col.name)
                    if depth == 0 and field.internal not in self.refs:
                        self.refs[field.internal] = (field, self._name(b))
        return rest

    def group_keys(self, b: SelectBuilder, pre: Translator) -> list[tuple[str, Expr]]:
        """The correlation keys as group keys of an aggregating subquery."""
        self.aggregated = True
        if self.residual:
            raise b.p.error("a correlated subquery that aggregates may compare outer columns "
                            "only by equality (a = outer.b)", self.residual[0])
        return [(name, pre.build(inner)) for inner, _, name in self.pairs]

    def carried_exprs(self, b: SelectBuilder, rel: Relation, hook: Any) -> list[Expr]:
        """The inner columns the outer query needs, as output columns of the subquery."""
        if self.aggregated:
            return [Column(name).alias(name) for _, _, name in self.pairs]
        tr = Translator(b.env, b.scope(b.rel), b.rel.schema, "the subquery")
        out = [tr.build(inner).alias(name) for inner, _, name in self.pairs]
        out += [Column(f.internal).alias(name) for f, name in self.refs.values()]
        return out


def _depths(b: SelectBuilder, scope: Scope, node: exp.Expr) -> set[int]:
    out = set()
    for col in walk_level(node):
        if isinstance(col, exp.Column) and not isinstance(col.this, exp.Star):
            try:
                _, depth = scope.resolve(col.table or None, col.name)
            except NotFound as exc:
                raise b.p.error(exc.message, col) from None
            out.add(depth)
    return out


def _strip(node: exp.Expr) -> exp.Expr:
    while isinstance(node, exp.Paren):
        node = node.this
    return node


def _query_of(node: exp.Expr) -> exp.Expr:
    q = node.args.get("query") if isinstance(node, exp.In) else node.this
    return q.this if isinstance(q, exp.Subquery) and not q.args.get("alias") else q


class SubqueryHandler:
    """Turns the subqueries of one clause into joins on ``holder.rel``."""

    def __init__(self, b: SelectBuilder, clause: str, holder: Any, tr: Translator | None):
        self.b = b
        self.p = b.p
        self.clause = clause
        self.holder = holder
        self.tr = tr

    def outer_scope(self) -> Scope:
        return Scope(self.holder.rel, self.b.outer)

    def translator(self) -> Translator:
        """A translator over the current relation (for the outer side of keys)."""
        rel = self.holder.rel
        tr = Translator(self.b.env, self.outer_scope(), rel.schema, self.clause)
        tr.subquery = self.expression
        return tr

    def _set(self, rel: Relation) -> None:
        self.holder.rel = rel
        if self.tr is not None:
            self.tr.schema = rel.schema

    def _subquery(self, node: exp.Expr, kind: str, **options: Any
                  ) -> tuple[Relation, Correlation]:
        corr = Correlation(self.outer_scope(), kind)
        q = _query_of(node)
        if kind == "exists" and isinstance(q, exp.Select):
            q = q.copy()
            q.set("limit", None)  # EXISTS (... LIMIT 1): the limit changes nothing
            q.set("order", None)
        rel = self.p.query(q, self.outer_scope(), correlation=corr, **options)
        if not corr.empty and isinstance(q, exp.Select) and (q.args.get("limit")
                                                              or q.args.get("offset")):
            raise self.p.error("LIMIT/OFFSET in a correlated subquery is not supported", q)
        return rel, corr

    def _keys(self, corr: Correlation) -> list[Expr]:
        tr = self.translator()
        return [tr.build(outer) for _, outer, _ in corr.pairs]

    def _residual(self, corr: Correlation, right: Relation) -> Expr | None:
        """The correlated conditions that are not key equalities, over the outer columns
        and the inner columns carried out (their names in ``right``, the joined side)."""
        if not corr.residual:
            return None
        carried = {name: f for f in right.fields for name in [f.internal]}
        inner_fields = []
        for field, name in corr.refs.values():
            if name in carried:
                inner_fields.append(Field(field.name, field.qualifier, name))
        scope = Scope(Relation(right.node, inner_fields), self.outer_scope())
        tr = Translator(self.b.env, scope, None, "a correlated condition", outer_columns=True)
        return J.conjoin([tr.build(c) for c in corr.residual])

    def _join(self, right: Relation, lkeys: list[Expr], rkeys: list[Expr], how: str,
              condition: Expr | None, node: exp.Expr) -> Relation:
        left = self.holder.rel
        rel = J.join(left, right, lkeys, rkeys, how, condition,
                     error=lambda m: self.p.error(m, node))
        n = len(left.fields)
        return Relation(rel.node, rel.fields[:n] + [Field(f.name, f.qualifier, f.internal, True)
                                                    for f in rel.fields[n:]], left.window)

    def _carried_columns(self, sub: Relation, corr: Correlation) -> list[Expr]:
        return [Column(name) for _, _, name in corr.pairs]

    # ------------------------------------------------------------------ WHERE conjuncts
    def conjunct(self, c: exp.Expr) -> None:
        """A WHERE condition holding a subquery: a semi or anti join when it is [NOT] IN
        or [NOT] EXISTS, else a filter whose subqueries join in first."""
        node, negated = _strip(c), False
        if isinstance(node, exp.Not):
            node, negated = _strip(node.this), True
        if isinstance(node, exp.Exists):
            return self._exists_join(node, negated)
        if isinstance(node, exp.In) and node.args.get("query") is not None:
            return self._in_join(node, negated)
        tr = self.translator()
        cond = tr.build(c)
        rel = self.holder.rel
        self._set(Relation(L.Filter(rel.node, cond), rel.fields, rel.window))

    def _exists_join(self, node: exp.Exists, negated: bool) -> None:
        sub, corr = self._subquery(node, "exists", only_carried=True)
        if corr.empty:
            rel, flag = self._uncorrelated_exists(sub, node)
            count = Column(flag).fill_null(0)
            cond = (count == Literal(0)) if negated else (count > Literal(0))
            self._set(Relation(L.Filter(rel.node, cond), rel.fields, rel.window))
            return
        how = "anti" if negated else "semi"
        rkeys = self._carried_columns(sub, corr)
        cond = self._residual(corr, sub)
        self._set(self._join(sub, self._keys(corr), rkeys, how, cond, node))

    def _uncorrelated_exists(self, sub: Relation, node: exp.Expr) -> tuple[Relation, str]:
        """The relation with a column counting the subquery's rows (0 or 1)."""
        from millstream.expr.aggregates import AggSpec

        flag = self.p.fresh("exists")
        counted = L.Aggregate(L.Limit(sub.node, 1), (), (AggSpec("count_all", None, flag),))
        rel = self._join(Relation(counted, [Field(flag, None, flag)]), [], [], "left", None,
                         node)
        return rel, rel.fields[-1].internal

    def _in_join(self, node: exp.In, negated: bool) -> None:
        sub, corr = self._subquery(node, "in")
        lhs = self._lhs(node)
        values = sub.visible()
        if len(values) != len(lhs):
            raise self.p.error(f"IN: {len(lhs)} value(s) on the left, the subquery returns "
                               f"{len(values)} column(s)", node)
        tr = self.translator()
        lkeys = [tr.build(x) for x in lhs]
        rkeys: list[Expr] = [Column(v.internal) for v in values]
        lkeys, rkeys = _coerced(tr, lkeys, rkeys, sub)
        lkeys += self._keys(corr)
        rkeys += self._carried_columns(sub, corr)
        cond = self._residual(corr, sub)
        if not negated:
            self._set(self._join(sub, lkeys, rkeys, "semi", cond, node))
            return
        # NOT IN: unknown (so no row) for a null left value unless the subquery is empty,
        # and for every row when the subquery has a null
        nullable = [v for v in values if _nullable(sub, v.internal)]
        lhs_nullable = any(_nullable_expr(k, self.holder.rel) for k in lkeys[:len(lhs)])
        if (nullable or lhs_nullable) and not corr.empty:
            raise self.p.error("NOT IN over a correlated subquery, with values that may be "
                               "null, is not supported; use NOT EXISTS", node)
        rel = self._join(sub, lkeys, rkeys, "anti", cond, node)
        self._set(rel)
        if not (nullable or lhs_nullable):
            return
        rows_col, nulls_col = self._counts(sub, nullable, node)
        rel = self.holder.rel
        keep = Column(nulls_col).fill_null(0) == Literal(0)
        if lhs_nullable:
            not_null = None
            for k in lkeys[:len(lhs)]:
                term = k.is_not_null()
                not_null = term if not_null is None else (not_null & term)
            keep = keep & (not_null | (Column(rows_col).fill_null(0) == Literal(0)))
        self._set(Relation(L.Filter(rel.node, keep), rel.fields, rel.window))

    def _counts(self, sub: Relation, nullable: list[Field], node: exp.Expr) -> tuple[str, str]:
        """The subquery's row count and count of rows with a null value, joined into the
        current relation as two columns (their names)."""
        from millstream.expr.aggregates import AggSpec

        n_rows, n_nulls = self.p.fresh("rows"), self.p.fresh("nulls")
        is_null = None
        for v in nullable:
            term = Column(v.internal).is_null()
            is_null = term if is_null is None else (is_null | term)
        specs = [AggSpec("count_all", None, n_rows)]
        specs.append(AggSpec("count", When(((is_null, Literal(1)),)), n_nulls)
                     if is_null is not None else AggSpec("count_all", None, n_nulls))
        counted: L.Node = L.Aggregate(sub.node, (), tuple(specs))
        if is_null is None:  # no nullable value: no null row
            counted = L.WithColumns(counted, (Literal(0).alias(n_nulls),))
        rel = self._join(Relation(counted, [Field(n_rows, None, n_rows),
                                            Field(n_nulls, None, n_nulls)]), [], [], "left",
                         None, node)
        self._set(rel)
        return rel.fields[-2].internal, rel.fields[-1].internal

    def _lhs(self, node: exp.In) -> list[exp.Expr]:
        x = _strip(node.this)
        return list(x.expressions) if isinstance(x, exp.Tuple) else [node.this]

    # ------------------------------------------------------------------ expressions
    def expression(self, node: exp.Expr) -> Expr:
        """A subquery inside an expression: a scalar subquery's value, or a mark join's
        truth for IN / EXISTS."""
        node = _strip(node)
        if isinstance(node, exp.Exists):
            return self._mark_exists(node)
        if isinstance(node, exp.In):
            return self._mark_in(node)
        if isinstance(node, (exp.Subquery, exp.Select)):
            return self._scalar(node if isinstance(node, exp.Subquery)
                                else exp.Subquery(this=node))
        raise self.p.error("unsupported subquery", node)

    def _scalar(self, node: exp.Subquery) -> Expr:
        sub, corr = self._subquery(node, "scalar")
        values = sub.visible()
        if len(values) != 1:
            raise self.p.error(f"a scalar subquery returns one column, this one "
                               f"{len(values)}", node)
        if corr.empty:
            rel = self._join(sub, [], [], "left", None, node)
            self._set(rel)
            return Column(_renamed(rel, sub, values[0]))
        if corr.residual:
            raise self.p.error("a scalar subquery correlated by other than equality is not "
                               "supported", corr.residual[0])
        if not corr.aggregated:
            raise self.p.error("a correlated scalar subquery must aggregate (e.g. SELECT "
                               "max(x) ...) so that it has one row per outer row", node)
        rel = self._join(sub, self._keys(corr), self._carried_columns(sub, corr), "left",
                         None, node)
        self._set(rel)
        value = Column(_renamed(rel, sub, values[0]))
        if _is_count(_query_of(node)):
            return value.fill_null(Literal(0))  # no group: count is 0, not null
        return value

    def _mark_exists(self, node: exp.Exists) -> Expr:
        sub, corr = self._subquery(node, "exists", only_carried=True)
        if corr.empty:
            rel, flag = self._uncorrelated_exists(sub, node)
            self._set(rel)
            return Column(flag) > Literal(0)
        if corr.residual:
            raise self.p.error("EXISTS inside OR or an expression may be correlated only by "
                               "equality; write it as a separate AND condition", node)
        return self._mark(sub, self._keys(corr), self._carried_columns(sub, corr), node)

    def _mark(self, sub: Relation, lkeys: list[Expr], rkeys: list[Expr], node: exp.Expr
              ) -> Expr:
        """True where a row of ``sub`` has equal keys: a left join with its distinct keys
        and a marker column."""
        marker = self.p.fresh("mark")
        names = [self.p.fresh("mkey") for _ in rkeys]
        keyed = L.Distinct(L.Project(sub.node, tuple(k.alias(n) for k, n in zip(rkeys, names))))
        keyed = L.WithColumns(keyed, (Literal(True).alias(marker),))
        right = Relation(keyed, [Field(n, None, n) for n in [*names, marker]])
        rel = self._join(right, lkeys, [Column(n) for n in names], "left", None, node)
        self._set(rel)
        return Column(rel.fields[-1].internal).is_not_null()

    def _mark_in(self, node: exp.In) -> Expr:
        sub, corr = self._subquery(node, "in")
        if corr.residual:
            raise self.p.error("IN inside OR or an expression may be correlated only by "
                               "equality", node)
        lhs = self._lhs(node)
        values = sub.visible()
        if len(values) != len(lhs):
            raise self.p.error(f"IN: {len(lhs)} value(s) on the left, the subquery returns "
                               f"{len(values)} column(s)", node)
        tr = self.translator()
        lkeys = [tr.build(x) for x in lhs]
        rkeys: list[Expr] = [Column(v.internal) for v in values]
        lkeys, rkeys = _coerced(tr, lkeys, rkeys, sub)
        nullable = [v for v in values if _nullable(sub, v.internal)]
        lhs_nullable = any(_nullable_expr(k, self.holder.rel) for k in lkeys)
        if (nullable or lhs_nullable) and not corr.empty:
            raise self.p.error("IN inside OR or an expression, over a correlated subquery "
                               "with values that may be null, is not supported", node)
        unknown = None
        if nullable or lhs_nullable:
            rows_col, nulls_col = self._counts(sub, nullable, node)
            any_null = None
            for k in lkeys:
                term = k.is_null()
                any_null = term if any_null is None else (any_null | term)
            unknown = Column(nulls_col).fill_null(0) > Literal(0)
            if any_null is not None:
                unknown = unknown | (any_null & (Column(rows_col).fill_null(0) > Literal(0)))
        hit = self._mark(sub, lkeys + self._keys(corr),
                         rkeys + self._carried_columns(sub, corr), node)
        if unknown is None:
            return hit
        return When(((hit, Literal(True)), (unknown, Literal(None))), Literal(False))


def _renamed(rel: Relation, sub: Relation, field: Field) -> str:
    """The name ``field`` of ``sub`` has in the joined relation ``rel``."""
    idx = sub.fields.index(field)
    return rel.fields[len(rel.fields) - len(sub.fields) + idx].internal


def _nullable_expr(e: Expr, rel: Relation) -> bool:
    """Whether an expression over ``rel`` may be null (unknown: yes)."""
    schema = rel.node.schema
    if type(e) is Column and schema is not None and schema.get_field_index(e.name) >= 0:  # type: ignore[attr-defined]
        return schema.field(e.name).nullable  # type: ignore[attr-defined]
    if type(e) is Literal:
        return not e.scalar.is_valid  # type: ignore[attr-defined]
    return True


def _nullable(rel: Relation, column: str) -> bool:
    schema = rel.node.schema
    if schema is None or schema.get_field_index(column) < 0:
        return True
    return schema.field(column).nullable


def _is_count(q: exp.Expr) -> bool:
    if not isinstance(q, exp.Select) or len(q.expressions) != 1:
        return False
    item = q.expressions[0]
    item = item.this if isinstance(item, exp.Alias) else item
    while isinstance(item, (exp.Paren, exp.Filter)):
        item = item.this
    return isinstance(item, exp.Count)


def _coerced(tr: Translator, lkeys: list[Expr], rkeys: list[Expr], sub: Relation
             ) -> tuple[list[Expr], list[Expr]]:
    """IN's left values cast to the subquery column types where they are literals."""
    out_l = []
    for lk, rk in zip(lkeys, rkeys):
        if type(lk) is Literal and sub.node.schema is not None:
            t = rk.output_type(sub.node.schema)
            from millstream.sql.types import literal_cast

            cast = literal_cast(lk, t)  # type: ignore[arg-type]
            out_l.append(cast if cast is not None else lk)
        else:
            out_l.append(lk)
    return out_l, rkeys
