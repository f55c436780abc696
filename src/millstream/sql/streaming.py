"""Joins of two streams in SQL, and the errors for what a stream cannot do in this version.

Two streams join as a window join when both are windowed alike and the condition equates
their window bounds (two windowing functions: the engine's window join; two window
aggregates: a window join keyed by the bounds, in tumbling buckets that close with the
windows); as an interval join when the condition bounds one side's time by the other's
(``a.ts BETWEEN b.ts - INTERVAL '5' MINUTE AND b.ts + INTERVAL '10' MINUTE``); and a join on
keys alone (inner, left, right, full) as a regular join of two streams (``L.Join``, run
by ``ops/stream_join/regular.py``: both sides kept for the job's life, as Flink's regular
join; outer ones emit updates, so the sink must take them); ``SET state_ttl = '1h'``
gives the regular joins of later queries a state TTL (``sql/statements.py``).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from sqlglot import exp

from millstream.errors import SQLError
from millstream.expr.nodes import Column, Expr
from millstream.expr.windows import Tumbling
from millstream.plan import logical as L
from millstream.sql import joins as J
from millstream.sql.scope import Field, Relation, Scope, WindowInfo
from millstream.sql.windowing import _plus, _spacing

if TYPE_CHECKING:
    from millstream.sql.select import SelectBuilder

_CHANGELOG = ("changelog streams (updates and retractions, the streaming-v2 work) are not "
              "in this version")


# ---------------------------------------------------------------------- errors
def stream_join_error(b: SelectBuilder, node: exp.Expr) -> SQLError:
    return b.p.error("a join of two streams needs equal keys (a regular join keeps its "
                     "state per key), a time bound (a.ts BETWEEN b.ts - INTERVAL ... AND "
                     "b.ts + INTERVAL ...) or the same window (window_start and window_end "
                     "equal); a cross join, a condition without keys, or a semi or anti "
                     "join of two streams is not supported", node)


def unsupported_on_stream(p: Any, what: str, node: exp.Expr) -> SQLError:
    planner = getattr(p, "p", p)
    return planner.error(f"{what} on a stream is not supported (a stream has no end)", node)


# ---------------------------------------------------------------------- stream joins
def _window_pair(b: SelectBuilder, c: exp.Expr, left: Relation, right: Relation
                 ) -> str | None:
    """The window role two sides' columns an equality compares (None otherwise)."""
    inner = c
    while isinstance(inner, exp.Paren):
        inner = inner.this
    if not isinstance(inner, exp.EQ) or left.window is None or right.window is None:
        return None
    roles = []
    for side in (inner.this, inner.expression):
        if not isinstance(side, exp.Column):
            return None
        role = None
        for rel in (left, right):
            found = Scope(rel).candidates(side.table or None, side.name)
            if len(found) == 1:
                for r, internal in rel.window.columns.items():
                    if found[0].internal == internal:
                        role = (r, rel is left)
        roles.append(role)
    if roles[0] is None or roles[1] is None or roles[0][0] != roles[1][0] \
            or roles[0][1] == roles[1][1]:
        return None
    return roles[0][0]


def _same_windows(a: WindowInfo, b: WindowInfo) -> bool:
    return a.kind == b.kind and a.params == b.params


def stream_join(b: SelectBuilder, left: Relation, right: Relation, on: list[exp.Expr],
                how: str, node: exp.Expr) -> Relation:
    """A join of two streams: a window join (both windowed alike, equal window bounds), an
    interval join (time bounds between the sides), else an error."""
    right = J.distinct_from(left, right)
    roles = {}
    rest = []
    for c in on:
        role = _window_pair(b, c, left, right)
        if role is not None:
            roles[role] = c
        else:
            rest.append(c)
    if {"window_start", "window_end"} <= set(roles):
        if not _same_windows(left.window, right.window):  # type: ignore[arg-type]
            raise b.p.error("a window join needs the same windows on both sides", node)
        return _window_join(b, left, right, rest, how, node)
    left, right = b.plain(left), b.plain(right)
    bounds, others = _time_bounds(b, left, right, on)
    if bounds is not None:
        return _interval_join(b, left, right, bounds, others, how, node)
    if how in ("inner", "left", "right", "outer"):
        # equal keys alone: a regular join of two streams (both sides kept, no state TTL;
        # an outer one emits updates: padded rows taken back when their partner comes)
        lk, rk, rest = _keys(b, left, right, on)
        if lk:
            return b.join_relations(left, right, lk, rk, how, rest, node)
    raise stream_join_error(b, node)


def where_stream_join(b: SelectBuilder, left: Relation, right: Relation,
                      where: list[exp.Expr]) -> Relation:
    """Two streams in FROM joined by WHERE conditions (a window or interval join); the
    conditions used are taken out of ``where``."""
    usable = [c for c in where if b.sides(c, [left, right]) == {0, 1}]
    joined = stream_join(b, left, right, usable, "inner", b.sel)
    for c in usable:
        where.remove(c)
    return joined


def _keys(b: SelectBuilder, left: Relation, right: Relation, conds: list[exp.Expr]
          ) -> tuple[list[Expr], list[Expr], list[exp.Expr]]:
    lk, rk, rest = [], [], []
    for c in conds:
        pair = b.key_pair(c, left, right)
        if pair is None:
            rest.append(c)
        else:
            lk.append(pair[0])
            rk.append(pair[1])
    return lk, rk, rest


def _window_join(b: SelectBuilder, left: Relation, right: Relation, conds: list[exp.Expr],
                 how: str, node: exp.Expr) -> Relation:
    if how not in ("inner", "left", "right", "outer"):
        raise b.p.error(f"a {how} window join is not supported", node)
    lk, rk, rest = _keys(b, left, right, conds)
    linfo, rinfo = left.window, right.window
    assert linfo is not None and rinfo is not None
    taken = left.internals() | right.internals()
    left, lnames = J.with_key_columns(left, lk, "__sql_lkey", taken)
    right, rnames = J.with_key_columns(right, rk, "__sql_rkey", taken)
    if not linfo.materialized and not rinfo.materialized:
        # two windowing functions: the engine's window join assigns the windows itself
        if linfo.kind not in ("tumble", "hop"):
            raise b.p.error(f"a window join of {linfo.kind.upper()} windows is not supported "
                            f"(TUMBLE and HOP are)", node)
        if not lk:
            raise b.p.error("a window join needs equal keys besides the window bounds", node)
        out: L.Node = L.WindowJoin(left.node, right.node, tuple(lnames), tuple(rnames),
                                   linfo.assigner, linfo.time_column, rinfo.time_column, how)
        out = L.Rename(out, (("window_start", linfo.columns["window_start"]),
                             ("window_end", linfo.columns["window_end"])))
        out = L.WithColumns(out, (_plus(Column(linfo.columns["window_end"]), -1)
                                  .alias(linfo.columns["window_time"]),))
        rcols = rinfo.columns
        fields = [f for f in left.fields] + [
            Field(f.name, f.qualifier, linfo.columns[_role(rcols, f.internal)])
            if _role(rcols, f.internal) else f for f in right.fields]
        info = dataclasses.replace(linfo, materialized=True)
    else:
        if not (linfo.materialized and rinfo.materialized):
            raise b.p.error("a window join needs both sides windowed alike (both windowing "
                            "functions, or both window aggregates)", node)
        # two window aggregates: rows of a window share its start; a tumbling bucket of the
        # windows' spacing holds exactly one window start, the bounds join as keys
        spacing = _spacing(linfo)
        if spacing is None:
            raise b.p.error("a join of SESSION window aggregates is not supported", node)
        lnames += [linfo.columns["window_start"], linfo.columns["window_end"]]
        rnames += [rinfo.columns["window_start"], rinfo.columns["window_end"]]
        lt, rt = b.p.fresh("ltime"), b.p.fresh("rtime")
        lnode = L.WithColumns(left.node, (_plus(Column(linfo.columns["window_end"]), -1)
                                          .alias(lt),))
        rnode = L.WithColumns(right.node, (_plus(Column(rinfo.columns["window_end"]), -1)
                                           .alias(rt),))
        out = L.WindowJoin(lnode, rnode, tuple(lnames), tuple(rnames),
                           Tumbling(spacing[0], spacing[1]), lt, rt, how)
        out = L.Drop(out, ("window_start", "window_end", lt, rt))
        fields = [*left.fields, *right.fields]
        info = linfo
    rel = Relation(out, fields, info)
    if rest:
        from millstream.sql.exprs import Translator

        tr = Translator(b.env, Scope(rel, b.outer), rel.schema, "the join condition")
        if how != "inner":
            raise b.p.error("an outer window join takes only equalities", rest[0])
        rel = Relation(L.Filter(rel.node, J.conjoin([tr.build(c) for c in rest])), rel.fields,
                       rel.window)
    return rel


def _role(columns: dict[str, str], internal: str) -> str | None:
    for role, name in columns.items():
        if name == internal:
            return role
    return None


def _time_column(b: SelectBuilder, node: exp.Expr, rels: list[Relation]
                 ) -> tuple[int, str] | None:
    if not isinstance(node, exp.Column):
        return None
    for i, rel in enumerate(rels):
        found = Scope(rel).candidates(node.table or None, node.name)
        if len(found) == 1:
            return i, found[0].internal
    return None


def _offset_of(b: SelectBuilder, node: exp.Expr, rels: list[Relation]
               ) -> tuple[tuple[int, str], int] | None:
    """``column [+|- INTERVAL]`` as ((side, column), µs)."""
    while isinstance(node, exp.Paren):
        node = node.this
    if isinstance(node, (exp.Add, exp.Sub)) and isinstance(node.expression, exp.Interval):
        col = _time_column(b, node.this, rels)
        if col is None:
            return None
        micros = _micros_signed(b, node.expression)
        return col, (micros if isinstance(node, exp.Add) else -micros)
    col = _time_column(b, node, rels)
    return None if col is None else (col, 0)


def _micros_signed(b: SelectBuilder, node: exp.Interval) -> int:
    from millstream.sql.exprs import Translator

    iv = Translator(b.env, b.scope(), None, "an interval").interval(node)
    micros = iv.fixed_micros()
    if micros is None:
        raise b.p.error("an interval of months cannot bound a join", node)
    return micros


def _time_bounds(b: SelectBuilder, left: Relation, right: Relation, conds: list[exp.Expr]
                 ) -> tuple[tuple[str, str, int, int] | None, list[exp.Expr]]:
    """From conditions such as ``l.t BETWEEN r.t - INTERVAL x AND r.t + INTERVAL y``, the
    interval join's ``(left time, right time, lower, upper)`` with ``left.t + lower <=
    right.t <= left.t + upper``; the other conditions."""
    rels = [left, right]
    lows: list[int] = []
    highs: list[int] = []
    times: set[tuple[str, str]] = set()
    rest = []

    def bound(a: exp.Expr, op: str, c: exp.Expr, strict: bool = False) -> bool:
        """Record ``a op c`` (op: ge or le); False when it is no time bound."""
        x, y = _offset_of(b, a, rels), _offset_of(b, c, rels)
        if x is None or y is None or x[0][0] == y[0][0]:
            return False
        (xs, xc), xo = x
        (ys, yc), yo = y
        # x + xo  op  y + yo, as right.t - left.t  rop  value
        if xs == 1:
            value, rop, lt, rt = yo - xo, op, yc, xc
        else:
            value, rop, lt, rt = xo - yo, ("le" if op == "ge" else "ge"), xc, yc
        if strict:  # a strict bound lets in from one microsecond further
            value += 1 if rop == "ge" else -1
        times.add((lt, rt))
        (lows if rop == "ge" else highs).append(value)
        return True

    for c in conds:
        inner = c
        while isinstance(inner, exp.Paren):
            inner = inner.this
        ok = False
        if isinstance(inner, exp.Between) and not inner.args.get("negate"):
            lo, hi = inner.args["low"], inner.args["high"]
            ok = _offset_of(b, inner.this, rels) is not None and bound(
                inner.this, "ge", lo) and bound(inner.this, "le", hi)
        elif isinstance(inner, (exp.GTE, exp.GT, exp.LTE, exp.LT)):
            op = "ge" if isinstance(inner, (exp.GTE, exp.GT)) else "le"
            ok = bound(inner.this, op, inner.expression,
                       strict=isinstance(inner, (exp.GT, exp.LT)))
        if not ok:
            rest.append(c)
    if not lows or not highs or len(times) != 1:
        return None, conds
    lt, rt = times.pop()
    return (lt, rt, max(lows), min(highs)), rest


def _interval_join(b: SelectBuilder, left: Relation, right: Relation,
                   bounds: tuple[str, str, int, int], conds: list[exp.Expr], how: str,
                   node: exp.Expr) -> Relation:
    lt, rt, lower, upper = bounds
    if lower > upper:
        raise b.p.error("the time bounds of this join leave no room between them", node)
    if how not in ("inner", "left", "right", "outer"):
        raise b.p.error(f"a {how} interval join is not supported", node)
    lk, rk, rest = _keys(b, left, right, conds)
    if not lk:
        raise b.p.error("an interval join of two streams needs equal keys besides the time "
                        "bounds", node)
    taken = left.internals() | right.internals()
    left, lnames = J.with_key_columns(left, lk, "__sql_lkey", taken)
    right, rnames = J.with_key_columns(right, rk, "__sql_rkey", taken)
    out: L.Node = L.IntervalJoin(left.node, right.node, tuple(lnames), tuple(rnames), lower,
                                 upper, lt, rt, how)
    rel = Relation(out, [*left.fields, *right.fields])
    if rest:
        if how != "inner":
            raise b.p.error("an outer interval join takes only equalities and time bounds",
                            rest[0])
        from millstream.sql.exprs import Translator

        tr = Translator(b.env, Scope(rel, b.outer), rel.schema, "the join condition")
        rel = Relation(L.Filter(rel.node, J.conjoin([tr.build(c) for c in rest])), rel.fields)
    return rel
