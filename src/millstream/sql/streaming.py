"""Streaming SQL in Flink's syntax: the windowing table-valued functions TUMBLE, HOP,
CUMULATE and SESSION (``FROM TABLE(TUMBLE(TABLE bids, DESCRIPTOR(ts), INTERVAL '10'
SECOND))``), their window aggregation (GROUP BY window_start, window_end, ...), window
joins, interval joins (``a.ts BETWEEN b.ts - INTERVAL ... AND b.ts + INTERVAL ...``), and
the errors for what a stream cannot do in this version.

A windowing function's relation offers the input's columns plus ``window_start``,
``window_end`` and ``window_time`` (``window_end`` minus 1 µs, the last instant inside
the window; Flink's is minus 1 ms). Grouped by window_start and window_end they become one
``WindowAggregate`` node (CUMULATE: its windows listed per row, then a tumbling window of
the cumulation's size keyed by window end); used otherwise the window columns are
computed per row (HOP and CUMULATE: a row per window). The results carry which columns
are window bounds through projections, so two window-aggregated streams join as a
window join on them. The same queries run in batch mode on bounded inputs with the same
answers.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from sqlglot import exp

from millstream.errors import SQLError
from millstream.expr.nodes import Column, Expr, Literal
from millstream.expr.temporal import temporal
from millstream.expr.windows import Session, Sliding, Tumbling
from millstream.plan import logical as L
from millstream.sql import catalog as C
from millstream.sql import joins as J
from millstream.sql.scope import Field, NotFound, Relation, Scope, WindowInfo

if TYPE_CHECKING:
    from millstream.sql.select import SelectBuilder

_CHANGELOG = ("changelog streams (updates and retractions, the streaming-v2 work) are not "
              "in this version")
WINDOW_FUNCTIONS = ("tumble", "hop", "cumulate", "session")
ROLES = ("window_start", "window_end", "window_time")
_READERS = {"readparquet": "parquet", "read_parquet": "parquet", "readcsv": "csv",
            "read_csv": "csv", "read_csv_auto": "csv", "readjson": "json",
            "read_json": "json", "read_json_auto": "json", "read_ndjson": "json"}


# ---------------------------------------------------------------------- errors
def unwindowed_aggregate_error(b: SelectBuilder, node: exp.Expr) -> SQLError:
    return b.p.error("a GROUP BY over a stream without a window emits updates as rows "
                     "arrive, which needs " + _CHANGELOG + "; group by window_start, "
                     "window_end of TUMBLE/HOP/CUMULATE/SESSION", node)


def stream_join_error(b: SelectBuilder, node: exp.Expr) -> SQLError:
    return b.p.error("a regular join of two streams keeps both sides forever and emits "
                     "updates, which needs " + _CHANGELOG + "; join within a time bound "
                     "(a.ts BETWEEN b.ts - INTERVAL ... AND b.ts + INTERVAL ...) or within "
                     "the same window (window_start and window_end equal)", node)


def unsupported_on_stream(p: Any, what: str, node: exp.Expr) -> SQLError:
    planner = getattr(p, "p", p)
    return planner.error(f"{what} on a stream is not supported (a stream has no end)", node)


# ---------------------------------------------------------------------- table functions
def table_function(b: SelectBuilder, func: exp.Func) -> Relation:
    """A table function in FROM: ``TABLE(TUMBLE(...))`` and its kin, or a file reader
    (``read_parquet('path')``)."""
    if isinstance(func, exp.Anonymous) and func.name.upper() == "TABLE":
        if len(func.expressions) != 1 or not isinstance(func.expressions[0], exp.Func):
            raise b.p.error("TABLE(...) takes a table function call", func)
        func = func.expressions[0]
    name = func.name.lower() if isinstance(func, exp.Anonymous) else func.sql_name().lower()
    if name in WINDOW_FUNCTIONS:
        return window_function(b, name, func)
    if name in _READERS:
        args = func.expressions or ([func.this] if func.this is not None else [])
        if not args or not isinstance(args[0], exp.Literal):
            raise b.p.error(f"{name}() takes a path or URI string", func)
        uri = args[0].this
        return b.p._table_relation(C.file_table(uri, _READERS[name]), uri, func)
    raise b.p.error(f"unknown table function {name}(); known: "
                    f"{', '.join(n.upper() for n in WINDOW_FUNCTIONS)}, read_parquet, "
                    f"read_csv, read_json", func)


_PARAMS = {"tumble": ("data", "timecol", "size", "offset"),
           "hop": ("data", "timecol", "slide", "size", "offset"),
           "cumulate": ("data", "timecol", "step", "size", "offset"),
           "session": ("data", "timecol", "gap")}


def _arguments(b: SelectBuilder, name: str, func: exp.Func) -> dict[str, exp.Expr]:
    params = _PARAMS[name]
    out: dict[str, exp.Expr] = {}
    positional = True
    for i, arg in enumerate(func.expressions):
        if isinstance(arg, (exp.Kwarg, exp.PropertyEQ)):
            positional = False
            key = arg.this.name.lower()
            if key not in params:
                raise b.p.error(f"{name.upper()} has no parameter {key.upper()}; its "
                                f"parameters: {', '.join(p.upper() for p in params)}", arg)
            out[key] = arg.expression
        elif not positional:
            raise b.p.error("positional arguments after named ones", arg)
        elif i >= len(params):
            raise b.p.error(f"{name.upper()} takes at most {len(params)} arguments", arg)
        else:
            out[params[i]] = arg
    need = [p for p in params if p != "offset" and p not in out]
    if need:
        raise b.p.error(f"{name.upper()} needs {', '.join(p.upper() for p in need)} "
                        f"({name.upper()}(TABLE t, DESCRIPTOR(time column), "
                        f"{', '.join('INTERVAL ...' for _ in params[2:])}))", func)
    return out


def _micros(b: SelectBuilder, node: exp.Expr, what: str) -> int:
    from millstream.sql.exprs import Translator

    if not isinstance(node, exp.Interval):
        raise b.p.error(f"{what} is an INTERVAL", node)
    tr = Translator(b.env, b.scope(), None, what)
    iv = tr.interval(node)
    micros = iv.fixed_micros()
    if micros is None or micros <= 0:
        raise b.p.error(f"{what} must be a positive interval of fixed length (not months)",
                        node)
    return micros


def window_function(b: SelectBuilder, name: str, func: exp.Func) -> Relation:
    """The relation of TUMBLE/HOP/CUMULATE/SESSION over a table (module docstring)."""
    args = _arguments(b, name, func)
    data = args["data"]
    if isinstance(data, exp.Column) and not data.table:
        rel = b.p.table(data.name, data)
    elif isinstance(data, exp.Table):
        rel = b.p.table(data.name, data)
    elif isinstance(data, (exp.Subquery, exp.Select)):
        rel = b.p.query(data.this if isinstance(data, exp.Subquery) else data)
    else:
        raise b.p.error(f"{name.upper()}'s first argument is TABLE name or a subquery", data)
    if rel.window is not None and not rel.window.materialized:
        rel = materialize(b, rel)
    timecol = args["timecol"]
    if not (isinstance(timecol, exp.Anonymous) and timecol.name.upper() == "DESCRIPTOR"
            and len(timecol.expressions) == 1 and isinstance(timecol.expressions[0],
                                                             exp.Column)):
        raise b.p.error("the time column is given as DESCRIPTOR(column)", timecol)
    col = timecol.expressions[0]
    try:
        field, _ = Scope(rel).resolve(col.table or None, col.name)
    except NotFound as exc:
        raise b.p.error(exc.message, col) from None
    schema = rel.node.schema
    if schema is not None:
        t = schema.field(field.internal).type
        if not (pa.types.is_timestamp(t) or pa.types.is_integer(t) or pa.types.is_date(t)):
            raise b.p.error(f"the time column {col.name!r} is {t}, not a timestamp", col)
    offset = _micros(b, args["offset"], "OFFSET") if "offset" in args else 0
    params: dict[str, int] = {"offset": offset}
    if name == "tumble":
        params["size"] = _micros(b, args["size"], "SIZE")
        assigner: Any = Tumbling(params["size"], offset)
    elif name == "hop":
        params["size"] = _micros(b, args["size"], "SIZE")
        params["step"] = _micros(b, args["slide"], "SLIDE")
        if params["step"] > params["size"]:
            raise b.p.error("HOP's SLIDE is larger than its SIZE", args["slide"])
        assigner = Sliding(params["size"], params["step"], offset)
    elif name == "cumulate":
        params["size"] = _micros(b, args["size"], "SIZE")
        params["step"] = _micros(b, args["step"], "STEP")
        if params["size"] % params["step"]:
            raise b.p.error("CUMULATE's SIZE must be a whole multiple of its STEP", func)
        assigner = Tumbling(params["size"], offset)
    else:
        if "offset" in args:
            raise b.p.error("SESSION takes no offset", func)
        params["gap"] = _micros(b, args["gap"], "the session gap")
        assigner = Session(params["gap"])
    columns = {role: b.p.fresh(role) for role in ROLES}
    info = WindowInfo(assigner, field.internal, name, params, columns)
    fields = [*rel.fields, *(Field(role, None, columns[role]) for role in ROLES)]
    return Relation(rel.node, fields, info)


def _as_timestamp(e: Expr, t: pa.DataType | None) -> Expr:
    """An event-time expression as timestamp[us] (integers are epoch milliseconds)."""
    if t is not None and pa.types.is_integer(t):
        return (e.cast(pa.int64()) * Literal(1000)).cast(pa.timestamp("us"))
    if t is not None and pa.types.is_date(t):
        return e.cast(pa.timestamp("us"))
    return e


def materialize(b: SelectBuilder, rel: Relation) -> Relation:
    """A windowing function's relation with its window columns computed per row (one row
    per window for HOP and CUMULATE); SESSION windows exist only grouped."""
    info = rel.window
    assert info is not None
    if info.materialized:
        return rel
    if info.kind == "session":
        raise b.p.error("SESSION windows are only defined for a GROUP BY window_start, "
                        "window_end (window aggregation)", b.sel)
    schema = rel.node.schema
    t = schema.field(info.time_column).type if schema is not None else None
    ts = _as_timestamp(Column(info.time_column), t)
    cols = info.columns
    size, step, offset = info.params["size"], info.params.get("step"), info.params["offset"]
    node = rel.node
    if info.kind == "tumble":
        start = temporal("window_start", ts, size=size, offset=offset)
        node = L.WithColumns(node, (start.alias(cols["window_start"]),))
        node = L.WithColumns(node, (_plus(Column(cols["window_start"]), size)
                                    .alias(cols["window_end"]),))
    else:
        kind = "hop" if info.kind == "hop" else "cumulate"
        bound = cols["window_start"] if kind == "hop" else cols["window_end"]
        node = L.WithColumns(node, (temporal("window_bounds", ts, kind=kind, size=size,
                                             step=step, offset=offset).alias(bound),))
        node = L.Explode(node, bound)
        if kind == "hop":
            other = _plus(Column(cols["window_start"]), size).alias(cols["window_end"])
        else:
            other = temporal("window_start", ts, size=size, offset=offset).alias(
                cols["window_start"])
        node = L.WithColumns(node, (other,))
    node = L.WithColumns(node, (_plus(Column(cols["window_end"]), -1)
                                .alias(cols["window_time"]),))
    return Relation(node, rel.fields, dataclasses.replace(info, materialized=True))


def _plus(e: Expr, micros: int) -> Expr:
    return temporal("add_interval", e, micros=micros)


# ---------------------------------------------------------------------- window aggregation
def groups_by_window(b: SelectBuilder, group: exp.Group | None) -> bool:
    """Whether the query groups a windowing function's rows by window_start and
    window_end (a window aggregation)."""
    from millstream.sql import grouping

    info = b.rel.window
    if info is None or info.materialized or group is None:
        return False
    scope = b.scope()
    roles = set()
    for item in group.expressions:
        if isinstance(item, (exp.Rollup, exp.Cube, exp.GroupingSets)):
            return False
        target = grouping._resolve_item(b, item)
        if isinstance(target, exp.Column):
            try:
                field, depth = scope.resolve(target.table or None, target.name)
            except NotFound:
                continue
            for role, internal in info.columns.items():
                if depth == 0 and field.internal == internal:
                    roles.add(role)
    return {"window_start", "window_end"} <= roles


def window_aggregate(b: SelectBuilder, node: L.Node, info: WindowInfo, keys: list[str],
                     specs: tuple) -> L.Node:
    """The WindowAggregate of a windowing function's group-by; its window columns are
    named as the relation's window fields."""
    cols = info.columns
    schema = node.schema
    clash = [n for n in ("window_start", "window_end") if schema is not None
             and n in schema.names]
    if clash:  # the input has columns of those names (a window over a window's result)
        node = L.Rename(node, tuple((n, b.p.fresh(n)) for n in clash))
    keys = [k for k in keys if k not in cols.values()]
    time_column = info.time_column
    if info.kind == "cumulate":
        t = schema.field(time_column).type if schema is not None else None
        ts = _as_timestamp(Column(time_column), t)
        ends = temporal("window_bounds", ts, kind="cumulate", size=info.params["size"],
                        step=info.params["step"], offset=info.params["offset"])
        node = L.Explode(L.WithColumns(node, (ends.alias(cols["window_end"]),)),
                         cols["window_end"])
        keys = [*keys, cols["window_end"]]
        out: L.Node = L.WindowAggregate(node, info.assigner, tuple(keys), specs, time_column)
        out = L.Drop(out, ("window_end",))
        out = L.Rename(out, (("window_start", cols["window_start"]),))
    else:
        out = L.WindowAggregate(node, info.assigner, tuple(keys), specs, time_column)
        out = L.Rename(out, (("window_start", cols["window_start"]),
                             ("window_end", cols["window_end"])))
    return L.WithColumns(out, (_plus(Column(cols["window_end"]), -1)
                               .alias(cols["window_time"]),))


def carried_window(rel: Relation, exprs: list[Expr], names: list[str]) -> WindowInfo | None:
    """The window bounds among a projection's outputs (plain columns of ``rel``'s window
    columns), so a query over the projection still knows them."""
    info = rel.window
    if info is None or not info.materialized:
        return None
    from millstream.plan.rules.exprs import strip_alias

    found: dict[str, str] = {}
    for e, n in zip(exprs, names):
        inner = strip_alias(e)
        if type(inner) is Column:
            for role, internal in info.columns.items():
                if inner.name == internal and role not in found:  # type: ignore[attr-defined]
                    found[role] = n
    if "window_start" not in found or "window_end" not in found:
        return None
    return dataclasses.replace(info, columns=found)


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
        spacing = linfo.params.get("step") if linfo.kind == "hop" else linfo.params.get(
            "size", linfo.params.get("gap"))
        if linfo.kind == "session" or not spacing:
            raise b.p.error("a join of SESSION window aggregates is not supported", node)
        lnames += [linfo.columns["window_start"], linfo.columns["window_end"]]
        rnames += [rinfo.columns["window_start"], rinfo.columns["window_end"]]
        bucket = Tumbling(spacing, linfo.params.get("offset", 0))
        ls, rs = linfo.columns["window_start"], rinfo.columns["window_start"]
        out = L.WindowJoin(left.node, right.node, tuple(lnames), tuple(rnames), bucket, ls,
                           rs, how)
        out = L.Drop(out, ("window_start", "window_end"))
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
