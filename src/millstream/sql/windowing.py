"""Flink's windowing table-valued functions: TUMBLE, HOP, CUMULATE and SESSION in FROM
(``TABLE(TUMBLE(TABLE bids, DESCRIPTOR(ts), INTERVAL '10' SECOND))``, positional or named
arguments), and their window aggregation (GROUP BY window_start, window_end, ...).

A windowing function's relation offers the input's columns plus ``window_start``,
``window_end`` and ``window_time`` (``window_end`` minus 1 µs, the last instant inside
the window; Flink's is minus 1 ms). Grouped by window_start and window_end they become one
``WindowAggregate`` node (CUMULATE: its windows listed per row, then a tumbling window of
the cumulation's size keyed by window end); used otherwise the window columns are
computed per row (HOP and CUMULATE: a row per window). The results carry which columns
are window bounds through projections (:func:`carried_window`), so a query over them can
group by them again (cascaded windows) or join two of them as a window join
(``sql.streaming``). File readers (``read_parquet('path')``) are table functions too.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from sqlglot import exp

from millstream.expr.nodes import Column, Expr, Literal
from millstream.expr.temporal import temporal
from millstream.expr.windows import Session, Sliding, Tumbling
from millstream.plan import logical as L
from millstream.sql import catalog as C
from millstream.sql.scope import Field, NotFound, Relation, Scope, WindowInfo

if TYPE_CHECKING:
    from millstream.sql.select import SelectBuilder

WINDOW_FUNCTIONS = ("tumble", "hop", "cumulate", "session")
ROLES = ("window_start", "window_end", "window_time")
_READERS = {"readparquet": "parquet", "read_parquet": "parquet", "readcsv": "csv",
            "read_csv": "csv", "read_csv_auto": "csv", "readjson": "json",
            "read_json": "json", "read_json_auto": "json", "read_ndjson": "json"}


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
    info = b.rel.window
    if info is None or group is None:
        return False
    scope = b.scope()
    roles = set()
    for item in group.expressions:
        if isinstance(item, (exp.Rollup, exp.Cube, exp.GroupingSets)):
            return False
        target = b.resolve_group_item(item)
        if isinstance(target, exp.Column):
            try:
                field, depth = scope.resolve(target.table or None, target.name)
            except NotFound:
                continue
            for role, internal in info.columns.items():
                if depth == 0 and field.internal == internal:
                    roles.add(role)
    return {"window_start", "window_end"} <= roles


def _spacing(info: WindowInfo) -> tuple[int, int] | None:
    """The distance between the ends of consecutive windows and the ends' offset (a
    tumbling bucket of that size holds the end of exactly one window); None for
    sessions."""
    p = info.params
    if info.kind == "tumble":
        return p["size"], p["offset"] % p["size"]
    if info.kind == "hop":
        return p["step"], (p["offset"] + p["size"]) % p["step"]
    if info.kind == "cumulate":
        return p["step"], p["offset"] % p["step"]
    return None


def window_aggregate(b: SelectBuilder, node: L.Node, info: WindowInfo, keys: list[str],
                     specs: tuple) -> L.Node:
    """The WindowAggregate of a group-by by window bounds; its window columns are named as
    the relation's window fields. Over a windowing function the engine assigns the
    windows; over the result of a window aggregation (the bounds are columns) the rows of
    a window are grouped by their bounds, in a tumbling bucket that closes with the
    window."""
    if not specs:  # GROUP BY without aggregates: the engine's window aggregate needs one
        from millstream.expr.aggregates import AggSpec

        dummy = b.p.fresh("rows")
        out = window_aggregate(b, node, info, keys, (AggSpec("count_all", None, dummy),))
        return L.Drop(out, (dummy,))
    cols = info.columns
    schema = node.schema
    clash = [n for n in ("window_start", "window_end") if schema is not None
             and n in schema.names]
    renamed = {n: b.p.fresh(n) for n in clash}
    if renamed:  # the input has columns of those names (a window over a window's result)
        node = L.Rename(node, tuple(renamed.items()))
        keys = [renamed.get(k, k) for k in keys]
    if info.materialized:
        spacing = _spacing(info)
        if spacing is None:
            raise b.p.error("a window aggregation over the result of a SESSION window "
                            "aggregation is not supported", b.sel)
        tcol = b.p.fresh("wtime")
        end = renamed.get(cols["window_end"], cols["window_end"])
        node = L.WithColumns(node, (_plus(Column(end), -1).alias(tcol),))
        out: L.Node = L.WindowAggregate(node, Tumbling(spacing[0], spacing[1]), tuple(keys),
                                        specs, tcol)
        out = L.Drop(out, ("window_start", "window_end"))
        if renamed:
            out = L.Rename(out, tuple((new, old) for old, new in renamed.items()))
        return out
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
        out = L.WindowAggregate(node, info.assigner, tuple(keys), specs, time_column)
        out = L.Drop(out, ("window_end",))
        out = L.Rename(out, (("window_start", cols["window_start"]),))
    else:
        out = L.WindowAggregate(node, info.assigner, tuple(keys), specs, time_column)
        out = L.Rename(out, (("window_start", cols["window_start"]),
                             ("window_end", cols["window_end"])))
    out = L.WithColumns(out, (_plus(Column(cols["window_end"]), -1)
                              .alias(cols["window_time"]),))
    if renamed:
        out = L.Rename(out, tuple((new, old) for old, new in renamed.items()))
    return out


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
