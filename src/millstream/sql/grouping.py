"""GROUP BY: the Aggregate node of a query, and how the select list, HAVING and ORDER BY
read its result: an aggregate call is the column the group-by computes for it, an
expression equal to a grouping expression is that key's column, and any other column
is an error naming it.

GROUPING SETS, ROLLUP and CUBE are one Aggregate per set over the same input (one node,
computed once when sub-plans are reused), the keys a set leaves out null, in a UNION ALL;
``grouping(...)`` reads which set a row comes from.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING

import pyarrow as pa
from sqlglot import exp

from millstream.errors import SQLError
from millstream.expr.nodes import Column, Expr, Literal
from millstream.plan import logical as L
from millstream.sql.aggregates import AggCall, agg_call
from millstream.sql.exprs import contains_aggregate, is_aggregate, walk_level
from millstream.sql.scope import Field, Relation, WindowInfo

if TYPE_CHECKING:
    from millstream.sql.select import SelectBuilder

Hook = Callable[[exp.Expr], "Expr | None"]


def _group_items(b: SelectBuilder, group: exp.Group | None
                 ) -> tuple[list[exp.Expr], list[list[int]] | None]:
    """The distinct grouping expressions and, for GROUPING SETS/ROLLUP/CUBE, the sets (as
    indices into them)."""
    if group is None:
        return [], None
    exprs: list[exp.Expr] = []
    texts: dict[str, int] = {}

    def index(e: exp.Expr) -> int:
        e = b.resolve_group_item(e)
        key = e.sql()
        if key not in texts:
            texts[key] = len(exprs)
            exprs.append(e)
        return texts[key]

    if group.args.get("all"):
        for e in b.sel.expressions:
            if not contains_aggregate(e, b.env) and not isinstance(e, exp.Star):
                index(e.this if isinstance(e, exp.Alias) else e)
        return exprs, None
    base: list[int] = []
    choices: list[list[list[int]]] = []
    for item in group.expressions:
        if isinstance(item, exp.Rollup):
            cols = [index(e) for e in item.expressions]
            choices.append([cols[:i] for i in range(len(cols), -1, -1)])
        elif isinstance(item, exp.Cube):
            cols = [index(e) for e in item.expressions]
            subsets = []
            for r in range(len(cols), -1, -1):
                subsets.extend(list(c) for c in itertools.combinations(cols, r))
            choices.append(subsets)
        elif isinstance(item, exp.GroupingSets):
            sets = []
            for s in item.expressions:
                members = s.expressions if isinstance(s, exp.Tuple) else (
                    [s.this] if isinstance(s, exp.Paren) else [s])
                sets.append([index(e) for e in members])
            choices.append(sets)
        else:
            base.append(index(item))
    for key in ("rollup", "cube", "grouping_sets"):
        if group.args.get(key):
            raise b.p.error(f"GROUP BY ... WITH {key.upper()} is not supported; write "
                            f"{key.upper()} (...)", group)
    if not choices:
        return exprs, None
    sets = []
    for combo in itertools.product(*choices):
        members = list(base)
        for part in combo:
            members += [i for i in part if i not in members]
        sets.append(members)
    return exprs, sets


def _aggregate_calls(b: SelectBuilder) -> list[exp.Expr]:
    """The aggregate calls of the select list, HAVING, QUALIFY and ORDER BY."""
    sel = b.sel
    roots: list[exp.Expr] = list(sel.expressions)
    for key in ("having", "qualify"):
        if sel.args.get(key) is not None:
            roots.append(sel.args[key].this)
    if sel.args.get("order") is not None:
        roots.extend(o.this for o in sel.args["order"].expressions)
    found: list[exp.Expr] = []
    stack = list(reversed(roots))
    while stack:
        node = stack.pop()
        if is_aggregate(node, b.env):
            found.append(node)
            inner = node
            while isinstance(inner, (exp.Filter, exp.IgnoreNulls, exp.RespectNulls,
                                     exp.WithinGroup)):
                inner = inner.this
            for sub in walk_level(node):
                if sub is not node and sub is not inner and is_aggregate(sub, b.env) \
                        and not _wraps(sub, inner):
                    raise b.p.error("an aggregate function cannot hold another aggregate",
                                    sub)
            continue
        for child in node.iter_expressions():
            if not isinstance(child, (exp.Select, exp.Subquery, exp.SetOperation)):
                stack.append(child)
    return found


def _wraps(node: exp.Expr, inner: exp.Expr) -> bool:
    """Whether ``node`` is one of the wrappers (FILTER, IGNORE NULLS) around ``inner``."""
    while isinstance(node, (exp.Filter, exp.IgnoreNulls, exp.RespectNulls, exp.WithinGroup)):
        if node.this is inner:
            return True
        node = node.this
    return False


def aggregate(b: SelectBuilder, group: exp.Group | None, window: WindowInfo | None = None
              ) -> tuple[Relation, Hook]:
    """The grouped relation of ``b``'s query and the hook that reads it (``window``: a
    windowing function's relation grouped by its window bounds: a window aggregate)."""
    rel = b.rel
    pre = b.translator("GROUP BY", rel)
    pre.subquery = None
    group_exprs, sets = _group_items(b, group)
    for g in group_exprs:
        if contains_aggregate(g, b.env):
            raise b.p.error("aggregate functions are not allowed in GROUP BY", g)
    keys: list[str] = []
    computed: list[Expr] = []
    key_of: dict[str, str] = {}
    key_types: list[pa.DataType | None] = []
    for g in group_exprs:
        e = pre.build(g)
        r = repr(e)
        if r in key_of:
            keys.append(key_of[r])
        elif type(e) is Column:
            keys.append(e.name)  # type: ignore[attr-defined]
        else:
            name = b.p.fresh("group")
            computed.append(e.alias(name))
            keys.append(name)
        key_of.setdefault(r, keys[-1])
        key_types.append(pre.type_of(e))
    carried = b.correlation.group_keys(b, pre) if b.correlation is not None else []
    for name, e in carried:
        computed.append(e.alias(name))
    calls = _aggregate_calls(b)
    by_key: dict[str, str] = {}
    by_id: dict[int, str] = {}
    specs: list[tuple[AggCall, str]] = []
    for node in calls:
        call = agg_call(pre, node)
        k = call.key()
        if k not in by_key:
            by_key[k] = b.p.fresh("agg")
            specs.append((call, by_key[k]))
        by_id[id(node)] = by_key[k]
    node = rel.node
    if computed:
        node = L.WithColumns(node, tuple(computed))
    all_keys = list(dict.fromkeys(keys)) + [n for n, _ in carried]
    if window is not None and (sets is not None or any(c.distinct for c, _ in specs)):
        raise b.p.error("GROUPING SETS and aggregates of DISTINCT values are not supported "
                        "in a window aggregation", group)
    node, specs = _distinct_aggregates(b, node, all_keys, specs, group)
    groupings: dict[int, str] = {}
    if window is not None:
        from millstream.sql.windowing import window_aggregate

        out: L.Node = window_aggregate(b, node, window, all_keys,
                                       tuple(c.spec(n) for c, n in specs))
    elif sets is None:
        out = L.Aggregate(node, tuple(all_keys), tuple(c.spec(n) for c, n in specs))
    else:
        if carried:
            raise b.p.error("GROUPING SETS/ROLLUP/CUBE in a correlated subquery is not "
                            "supported", group)
        grouping_nodes = [n for root in _roots(b) for n in walk_level(root)
                          if isinstance(n, exp.Grouping)]
        for gnode in grouping_nodes:
            groupings[id(gnode)] = b.p.fresh("grouping")
        out = _grouping_sets(b, node, keys, key_types, sets, specs, grouping_nodes,
                             groupings, group_exprs)
    posts = [c.post(Column(n)).alias(n) for c, n in specs if c.post is not None]
    if posts:
        out = L.WithColumns(out, tuple(posts))
    fields = _post_fields(b, group_exprs, keys)
    post_rel = Relation(out, fields + [Field(n, None, n, hidden=True) for _, n in carried],
                        dataclasses.replace(window, materialized=True) if window else None)
    hook = _hook(b, pre, key_of, by_id, groupings)
    return post_rel, hook


def _roots(b: SelectBuilder) -> list[exp.Expr]:
    sel = b.sel
    roots = list(sel.expressions)
    for key in ("having", "qualify"):
        if sel.args.get(key) is not None:
            roots.append(sel.args[key].this)
    if sel.args.get("order") is not None:
        roots.extend(o.this for o in sel.args["order"].expressions)
    return roots


def _post_fields(b: SelectBuilder, group_exprs: list[exp.Expr], keys: list[str]
                 ) -> list[Field]:
    """The grouped relation's columns: the keys that are plain columns, under their names
    (for subqueries in HAVING); computed keys hidden."""
    fields = []
    scope = b.scope()
    for g, k in zip(group_exprs, keys):
        if isinstance(g, exp.Column):
            try:
                f, depth = scope.resolve(g.table or None, g.name)
            except Exception:  # noqa: BLE001 - reported when the key was translated
                continue
            if depth == 0:
                fields.append(Field(f.name, f.qualifier, k))
                continue
        fields.append(Field(k, None, k, hidden=True))
    return fields


def _distinct_aggregates(b: SelectBuilder, node: L.Node, keys: list[str],
                         specs: list[tuple[AggCall, str]], group: exp.Expr | None
                         ) -> tuple[L.Node, list[tuple[AggCall, str]]]:
    """``sum(DISTINCT x)`` and the like: the rows made distinct on the keys and ``x``
    first, when every aggregate of the query reads distinct values of the same ``x``."""
    distinct = [(c, n) for c, n in specs if c.distinct]
    if not distinct:
        return node, specs
    args = {repr(c.arg) for c, _ in distinct}
    others = [c for c, _ in specs if not c.distinct and c.func not in ("count_distinct",)]
    if len(args) > 1 or others or any(c.func == "count_distinct" and repr(c.arg) not in args
                                      for c, _ in specs):
        raise b.p.error("an aggregate of DISTINCT values (other than count) is supported "
                        "when all the query's aggregates read the same DISTINCT values",
                        group if group is not None else b.sel)
    value = b.p.fresh("distinct")
    arg = distinct[0][0].arg
    node = L.Distinct(L.Project(node, tuple([Column(k) for k in keys] + [arg.alias(value)])))
    out = []
    for c, n in specs:
        func = "count" if c.func == "count_distinct" else c.func
        out.append((AggCall(func, Column(value), c.params, False, c.post, c.sql_name), n))
    return node, out


def _grouping_sets(b: SelectBuilder, node: L.Node, keys: list[str],
                   key_types: list[pa.DataType | None], sets: list[list[int]],
                   specs: list[tuple[AggCall, str]], grouping_nodes: list[exp.Grouping],
                   groupings: dict[int, str], group_exprs: list[exp.Expr]) -> L.Node:
    branches = []
    distinct_keys = list(dict.fromkeys(keys))
    for members in sets:
        present = [keys[i] for i in members]
        present = list(dict.fromkeys(present))
        agg = L.Aggregate(node, tuple(present), tuple(c.spec(n) for c, n in specs))
        cols: list[Expr] = []
        for k in distinct_keys:
            if k in present:
                cols.append(Column(k))
            else:
                t = key_types[keys.index(k)]
                cols.append(Literal(None, t).alias(k) if t is not None else
                            Literal(None).alias(k))
        cols += [Column(n) for _, n in specs]
        for gnode in grouping_nodes:
            value = 0
            for arg in gnode.expressions:
                idx = _group_index(b, arg, group_exprs)
                value = value * 2 + (0 if idx in members else 1)
            cols.append(Literal(value).alias(groupings[id(gnode)]))
        branches.append(L.Project(agg, tuple(cols)))
    return L.Union(tuple(branches)) if len(branches) > 1 else branches[0]


def _group_index(b: SelectBuilder, arg: exp.Expr, group_exprs: list[exp.Expr]) -> int:
    text = b.resolve_group_item(arg).sql()
    for i, g in enumerate(group_exprs):
        if g.sql() == text:
            return i
    raise b.p.error(f"grouping({arg.sql()}): not a grouping expression", arg)


def _hook(b: SelectBuilder, pre, key_of: dict[str, str], by_id: dict[int, str],
          groupings: dict[int, str]) -> Hook:
    def hook(node: exp.Expr) -> Expr | None:
        if id(node) in by_id:
            return Column(by_id[id(node)])
        if isinstance(node, exp.Grouping):
            if id(node) not in groupings:
                return Literal(0)
            return Column(groupings[id(node)])
        if is_aggregate(node, b.env) or isinstance(node, (exp.Window, exp.Subquery,
                                                          exp.Exists, exp.Select)):
            return None
        if contains_aggregate(node, b.env) or any(
                isinstance(n, (exp.Window, exp.Subquery, exp.Exists, exp.Select))
                or (isinstance(n, exp.In) and n.args.get("query") is not None)
                for n in walk_level(node)):
            return None
        if isinstance(node, (exp.Literal, exp.Null, exp.Boolean, exp.Star, exp.Interval)):
            return None
        try:
            e = pre.build(node)
        except SQLError:
            if isinstance(node, exp.Column):
                raise
            return None
        key = key_of.get(repr(e))
        if key is not None:
            return Column(key)
        if isinstance(node, exp.Column):
            raise b.p.error(f"column {node.sql()} must appear in GROUP BY or be used in an "
                            f"aggregate function", node)
        if not e.columns():
            return e
        return None

    return hook
