"""The query translator: a parsed query (SELECT, set operations, VALUES, WITH) to a
:class:`~millstream.sql.scope.Relation`, i.e. a logical plan node and its columns.

:class:`Planner` holds what one statement's translation shares: the environment (text,
dialect, catalog), the tables passed by keyword, the common table expressions in scope
(each translated once: a CTE used twice is the same node twice), and fresh private
names. SELECT itself is in ``sql.select``; set operations and VALUES are here.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from sqlglot import exp

from millstream.errors import PlanError
from millstream.expr.nodes import Column, Expr, Literal
from millstream.io.memory import TableSource
from millstream.plan import logical as L
from millstream.plan.rules.exprs import fold
from millstream.sql import catalog as C
from millstream.sql.exprs import Env, Translator
from millstream.sql.joins import join, unique_names
from millstream.sql.scope import Field, Relation, Scope, closest, listing


@dataclass
class CTE:
    """A common table expression: its query, column names, and its relation once built."""

    name: str
    query: exp.Expr
    columns: list[str] | None
    ctes: list[dict[str, CTE]]
    relation: Relation | None = None
    building: bool = False


class Planner:
    """Translates the queries of one statement (see the module docstring)."""

    def __init__(self, env: Env, tables: dict[str, Any]):
        self.env = env
        self.tables = {k.lower(): (k, v) for k, v in tables.items()}
        self.ctes: list[dict[str, CTE]] = []
        self._ids = itertools.count()

    # ------------------------------------------------------------------ names
    def fresh(self, prefix: str) -> str:
        """A private column name no query column has."""
        return f"__sql_{prefix}{next(self._ids)}"

    def error(self, message: str, node: exp.Expr | None = None):
        return self.env.error(message, node)

    # ------------------------------------------------------------------ queries
    def query(self, q: exp.Expr, outer: Scope | None = None, **select_options: Any
              ) -> Relation:
        """The relation of a query expression (``outer``: the scope of an enclosing query,
        for correlated subqueries)."""
        with_ = q.args.get("with_") or q.args.get("with")
        if with_ is not None:
            self.push_ctes(with_)
            try:
                return self._query(q, outer, **select_options)
            finally:
                self.ctes.pop()
        return self._query(q, outer, **select_options)

    def _query(self, q: exp.Expr, outer: Scope | None, **select_options: Any) -> Relation:
        from millstream.sql.select import select

        if isinstance(q, exp.Subquery):
            rel = self.query(q.this, outer, **select_options)
            return self._order_limit(q, rel)
        if isinstance(q, exp.Select):
            return select(self, q, outer, **select_options)
        if isinstance(q, exp.SetOperation):
            if select_options.get("correlation") is not None:
                raise self.error("a correlated subquery with UNION/INTERSECT/EXCEPT is not "
                                 "supported", q)
            return self.set_operation(q, outer)
        if isinstance(q, exp.Values):
            return self.values(q)
        raise self.error(f"unsupported query {type(q).__name__}", q)

    def push_ctes(self, with_: exp.With) -> None:
        if with_.args.get("recursive"):
            raise self.error("WITH RECURSIVE is not supported", with_)
        frame: dict[str, CTE] = {}
        self.ctes.append(frame)
        for cte in with_.expressions:
            alias = cte.args.get("alias")
            name = alias.name
            columns = [c.name for c in alias.columns] if alias is not None and alias.columns \
                else None
            # a CTE sees the ones before it in the same WITH (and those around it)
            frame[name.lower()] = CTE(name, cte.this, columns, [dict(f) for f in self.ctes])

    def cte_relation(self, cte: CTE, node: exp.Expr) -> Relation:
        """The CTE's relation, translated on first use and the same node after."""
        if cte.relation is not None:
            return cte.relation
        if cte.building:
            raise self.error(f"the common table expression {cte.name!r} refers to itself "
                             f"(WITH RECURSIVE is not supported)", node)
        cte.building = True
        saved, self.ctes = self.ctes, cte.ctes
        try:
            rel = self.query(cte.query)
        finally:
            self.ctes = saved
            cte.building = False
        if cte.columns is not None:
            rel = self.rename_columns(rel, cte.columns, node)
        cte.relation = rel
        return rel

    def rename_columns(self, rel: Relation, names: list[str], node: exp.Expr) -> Relation:
        """The relation's visible columns under new names (a column alias list)."""
        visible = rel.visible()
        if len(names) > len(visible):
            raise self.error(f"{len(names)} column names given for {len(visible)} columns",
                             node)
        renamed = {f.internal: n for f, n in zip(visible, names)}
        return Relation(rel.node, [Field(renamed.get(f.internal, f.name), f.qualifier,
                                         f.internal, f.hidden) for f in rel.fields],
                        rel.window)

    # ------------------------------------------------------------------ tables
    def table(self, name: str, node: exp.Expr) -> Relation:
        """The relation a table name (or a quoted path) in FROM stands for."""
        key = name.lower()
        for frame in reversed(self.ctes):
            if key in frame:
                return self.cte_relation(frame[key], node)
        if key in self.tables:
            return self._table_relation(self.tables[key][1], name, node)
        entry = C.CATALOG.lookup(name)
        if entry is not None:
            if isinstance(entry, tuple) and entry and entry[0] == "view":
                _, view_node, columns = entry
                return Relation(view_node, [Field(c, None, c) for c in columns])
            return self._table_relation(entry, name, node)
        if C.format_of(name) is not None or any(ch in name for ch in "/*:\\"):
            return self._table_relation(C.file_table(name), name, node)
        raise self.error(self._unknown_table(name), node)

    def _unknown_table(self, name: str) -> str:
        names = [n for frame in self.ctes for n in (c.name for c in frame.values())]
        names += [v[0] for v in self.tables.values()] + C.CATALOG.names()
        near = closest(name, names)
        hint = f" (did you mean {near!r}?)" if near else ""
        return (f"unknown table {name!r}{hint}; tables: {listing(sorted(set(names))) or 'none'}"
                f" (pass one as ms.sql(..., {name}=data) or register it with "
                f"ms.register({name!r}, data))")

    def _table_relation(self, data: Any, name: str, node: exp.Expr) -> Relation:
        try:
            plan = C.read_file_table(data) if isinstance(data, C.FileTable) \
                else C.as_node(data, name)
        except PlanError as exc:
            raise self.error(str(exc), node) from None
        except OSError as exc:
            raise self.error(f"cannot read {name!r}: {exc}", node) from None
        schema = plan.schema
        if schema is None:
            raise self.error(f"the columns of table {name!r} are not known before it runs (a "
                             f"Python function computes them); give it a schema, or select "
                             f"its columns in the Dataset API first", node)
        return Relation(plan, [Field(n, None, n) for n in schema.names])

    # ------------------------------------------------------------------ VALUES
    def values(self, q: exp.Values) -> Relation:
        rows = []
        scope = Scope(Relation(L.Scan(TableSource(pa.table({}), None, "values")), []))
        tr = Translator(self.env, scope, None, "VALUES")
        width = None
        for tup in q.expressions:
            items = tup.expressions if isinstance(tup, exp.Tuple) else [tup]
            if width is not None and len(items) != width:
                raise self.error("VALUES rows must all have the same number of values", tup)
            width = len(items)
            row = []
            for item in items:
                e = tr.build(item)
                value = e if type(e) is Literal else fold(e)
                if value is None:
                    raise self.error("VALUES takes constants", item)
                row.append(value.scalar)  # type: ignore[attr-defined]
            rows.append(row)
        alias = q.args.get("alias")
        names = [c.name for c in alias.columns] if alias is not None and alias.columns else []
        names += [f"col{i}" for i in range(len(names), width or 0)]
        arrays = []
        for i in range(width or 0):
            values = [r[i] for r in rows]
            types = [v.type for v in values if not pa.types.is_null(v.type)]
            t = types[0] if types else pa.null()
            for other in types[1:]:
                if not other.equals(t):
                    t = pa.unify_schemas([pa.schema([("x", t)]), pa.schema([("x", other)])],
                                         promote_options="permissive").field("x").type
            arrays.append(pa.array([v.as_py() for v in values], type=t))
        table = pa.table(arrays, names=names[: width or 0])
        rel = Relation(L.Scan(TableSource(table, None, "values")),
                       [Field(n, None, n) for n in table.column_names])
        return rel.requalified(alias.name if alias is not None and alias.name else None)

    # ------------------------------------------------------------------ set operations
    def set_operation(self, q: exp.SetOperation, outer: Scope | None) -> Relation:
        left = self.query(q.this, outer)
        right = self.query(q.expression, outer)
        lf, rf = left.visible(), right.visible()
        if len(lf) != len(rf):
            raise self.error(f"{q.key.upper()}: the queries have {len(lf)} and {len(rf)} "
                             f"columns", q)
        names = [f.name for f in lf]
        out_names = unique_names(names)
        lnode = L.Project(left.node, tuple(Column(f.internal).alias(n)
                                           for f, n in zip(lf, out_names)))
        rnode = L.Project(right.node, tuple(Column(f.internal).alias(n)
                                            for f, n in zip(rf, out_names)))
        lrel = Relation(lnode, [Field(n, None, n) for n in out_names])
        rrel = Relation(rnode, [Field(n, None, n) for n in out_names])
        distinct = q.args.get("distinct") is not False
        if isinstance(q, exp.Union):
            node: L.Node = L.Union((lnode, rnode))
            if distinct:
                node = L.Distinct(node)
            rel = Relation(node, [Field(n, None, n) for n in out_names])
        else:
            if not distinct:
                raise self.error(f"{q.key.upper()} ALL is not supported; {q.key.upper()} "
                                 f"(distinct) is", q)
            how = "semi" if isinstance(q, exp.Intersect) else "anti"
            rel = self.null_safe_match(Relation(L.Distinct(lnode), lrel.fields),
                                       Relation(L.Distinct(rnode), rrel.fields), how, q)
        return self._order_limit(q, rel)

    def null_safe_match(self, left: Relation, right: Relation, how: str, q: exp.Expr
                        ) -> Relation:
        """Left rows that have (semi) or lack (anti) an equal right row, nulls equal to
        nulls (INTERSECT and EXCEPT): joined on each column's null flag and its value with
        nulls filled in."""
        schema = left.node.schema
        lkeys: list[Expr] = []
        rkeys: list[Expr] = []
        for lf, rf in zip(left.fields, right.fields):
            fill = _fill_value(schema.field(lf.internal).type) if schema is not None else None
            lkeys.append(Column(lf.internal).is_null())
            rkeys.append(Column(rf.internal).is_null())
            if fill is not None:
                lkeys.append(Column(lf.internal).fill_null(fill))
                rkeys.append(Column(rf.internal).fill_null(fill))
            else:
                lkeys.append(Column(lf.internal))
                rkeys.append(Column(rf.internal))
        return join(left, right, lkeys, rkeys, how,
                    error=lambda m: self.error(m, q))

    def _order_limit(self, q: exp.Expr, rel: Relation) -> Relation:
        """ORDER BY / LIMIT / OFFSET attached to a set operation or parenthesized query."""
        from millstream.sql.ordering import apply_limit, sort_relation

        order = q.args.get("order")
        if order is not None:
            rel = sort_relation(self, rel, order.expressions)
        return apply_limit(self, q, rel)


def _fill_value(t: pa.DataType) -> Any:
    """A value of type ``t`` to stand for null in a join key (None when there is none)."""
    import datetime as _dt
    import decimal

    if pa.types.is_integer(t):
        return Literal(0, t)
    if pa.types.is_floating(t):
        return Literal(0.0, t)
    if pa.types.is_decimal(t):
        return Literal(decimal.Decimal(0), t)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return Literal("", t)
    if pa.types.is_boolean(t):
        return Literal(False)
    if pa.types.is_date(t):
        return Literal(_dt.date(1970, 1, 1), t)
    if pa.types.is_timestamp(t):
        return Literal(_dt.datetime(1970, 1, 1), t)
    return None
