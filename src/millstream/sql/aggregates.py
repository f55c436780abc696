"""Aggregate and window function calls: which engine aggregate (``expr.aggregates``) or
window function (``expr.analytic``) a SQL call is, with its argument, parameters, FILTER
and DISTINCT; ORDER BY keys with SQL's per-key null placement.

The engine's aggregates are looked up by name, so a build without one (``std``,
``median`` ... come with the aggregates of issue 10) gets an SQLError naming it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
from sqlglot import exp

from millstream.expr import aggregates as engine_aggregates
from millstream.expr.aggregates import AggSpec
from millstream.expr.analytic import Frame, WindowExpr, window_spec
from millstream.expr.conditional import When
from millstream.expr.nodes import Expr, Literal
from millstream.expr.udf import PythonFunction
from millstream.sql import types as T

if TYPE_CHECKING:
    from millstream.sql.exprs import Translator


@dataclass
class AggCall:
    """One aggregate call resolved: the engine function, its argument (None for
    count(*)), parameters, DISTINCT, and ``post`` (a Python step applied to the
    aggregate's column after the group-by: string_agg, Python aggregates)."""

    func: str
    arg: Expr | None
    params: dict[str, Any] = field(default_factory=dict)
    distinct: bool = False
    post: Callable[[Expr], Expr] | None = None
    sql_name: str = ""

    def key(self) -> str:
        """Two calls with the same key compute the same column."""
        return f"{self.func}|{self.distinct}|{self.arg!r}|{sorted(self.params.items())}|" \
               f"{self.sql_name}"

    def spec(self, name: str) -> AggSpec:
        if self.params:
            return AggSpec(self.func, self.arg, name, self.params)  # type: ignore[call-arg]
        return AggSpec(self.func, self.arg, name)


#: SQL aggregate classes -> (engine function, parameters)
_SIMPLE: dict[str, tuple[str, dict[str, Any]]] = {
    "Sum": ("sum", {}), "Avg": ("mean", {}), "Min": ("min", {}), "Max": ("max", {}),
    "Stddev": ("std", {"ddof": 1}), "StddevSamp": ("std", {"ddof": 1}),
    "StddevPop": ("std", {"ddof": 0}), "Variance": ("var", {"ddof": 1}),
    "VarianceSamp": ("var", {"ddof": 1}), "VariancePop": ("var", {"ddof": 0}),
    "Median": ("median", {}), "ApproxDistinct": ("approx_count_distinct", {}),
    "AnyValue": ("any_value", {}), "First": ("first", {}), "ArrayAgg": ("collect_list", {}),
    "LogicalAnd": ("min", {}), "LogicalOr": ("max", {}),
}
_BY_NAME = {"arbitrary": "AnyValue", "any_value": "AnyValue", "list": "ArrayAgg",
            "collect_list": "ArrayAgg", "mean": "Avg", "std": "Stddev", "var_samp": "Variance",
            "every": "LogicalAnd"}


def _engine_has(func: str) -> bool:
    return func in engine_aggregates.AGG_FUNCS


def _need(tr: Translator, func: str, node: exp.Expr, sql_name: str) -> None:
    if not _engine_has(func):
        raise tr.error(f"{sql_name}() needs the engine aggregate {func!r}, which this build of "
                       f"Millstream does not have (it comes with the new aggregates of the "
                       f"query-core work); available: "
                       f"{', '.join(a for a in engine_aggregates.SUPPORTED if a != 'count_all')}",
                       node)


def agg_call(tr: Translator, node: exp.Expr) -> AggCall:
    """The aggregate a call (``node``, an aggregate per ``exprs.is_aggregate``) computes;
    its arguments are translated by ``tr`` (the scope before grouping)."""
    condition: Expr | None = None
    if isinstance(node, exp.Filter):
        condition = tr.build(node.expression.this)
        node = node.this
    ignore_nulls = False
    while isinstance(node, (exp.IgnoreNulls, exp.RespectNulls)):
        ignore_nulls = ignore_nulls or isinstance(node, exp.IgnoreNulls)
        node = node.this
    call = _plain_call(tr, node)
    if condition is not None:
        if call.arg is None:  # count(*) FILTER (WHERE c): count the rows where c holds
            call.func, call.arg = "count", When(((condition, Literal(1)),))
        else:
            call.arg = When(((condition, call.arg),))
    return call


def _plain_call(tr: Translator, node: exp.Expr) -> AggCall:
    from millstream.sql.exprs import _fname

    name = _fname(node)
    if isinstance(node, exp.Anonymous):
        fn = tr.env.catalog.functions.get(node.name.lower())
        if fn is not None and fn.kind == "aggregate":
            return _python_aggregate(tr, node, fn)
        cls = _BY_NAME.get(node.name.lower())
        if cls is None:
            raise tr.error(f"unknown aggregate function {node.name}()", node)
        node = getattr(exp, cls)(this=node.expressions[0] if node.expressions else None)
    if isinstance(node, exp.Count):
        target = node.this
        if target is None or isinstance(target, exp.Star):
            return AggCall("count_all", None, sql_name="count")
        if isinstance(target, exp.Distinct):
            if len(target.expressions) != 1:
                raise tr.error("count(DISTINCT ...) of several columns is not supported",
                               node)
            return AggCall("count_distinct", tr.build(target.expressions[0]),
                           sql_name="count")
        return AggCall("count", tr.build(target), sql_name="count")
    if isinstance(node, exp.WithinGroup):
        return _within_group(tr, node)
    cls = type(node).__name__
    if cls in ("PercentileCont", "PercentileDisc", "Quantile", "ApproxQuantile"):
        return _quantile(tr, node, cls)
    if cls == "GroupConcat":
        return _string_agg(tr, node)
    if cls not in _SIMPLE:
        raise tr.error(f"the aggregate function {name}() is not supported", node)
    func, params = _SIMPLE[cls]
    if func == "any_value" and not _engine_has("any_value"):
        func = "first"
    _need(tr, func, node, name)
    target = node.this
    distinct = False
    if isinstance(target, exp.Distinct):
        if len(target.expressions) != 1:
            raise tr.error(f"{name}(DISTINCT ...) of several columns is not supported", node)
        target, distinct = target.expressions[0], True
        if func in ("min", "max", "any_value", "first"):
            distinct = False  # the same either way
    arg = tr.build(target)
    if cls in ("LogicalAnd", "LogicalOr"):
        arg = arg.cast(pa.bool_())
    return AggCall(func, arg, dict(params), distinct, sql_name=name)


def _quantile(tr: Translator, node: exp.Expr, cls: str) -> AggCall:
    q = tr.literal_value(node.expression, "the quantile")
    if cls == "ApproxQuantile":
        _need(tr, "approx_quantile", node, "approx_quantile")
        return AggCall("approx_quantile", tr.build(node.this), {"q": float(q)},
                       sql_name="approx_quantile")
    _need(tr, "quantile", node, "quantile")
    interpolation = "discrete" if cls == "PercentileDisc" else "linear"
    return AggCall("quantile", tr.build(node.this), {"q": float(q),
                                                     "interpolation": interpolation},
                   sql_name="quantile")


def _within_group(tr: Translator, node: exp.WithinGroup) -> AggCall:
    inner, order = node.this, node.expression
    cls = type(inner).__name__
    if cls not in ("PercentileCont", "PercentileDisc") or not order.expressions:
        raise tr.error("WITHIN GROUP (ORDER BY ...) is supported for percentile_cont and "
                       "percentile_disc", node)
    ordered = order.expressions[0]
    if ordered.args.get("desc"):
        raise tr.error("percentile ... WITHIN GROUP (ORDER BY x DESC) is not supported", node)
    q = tr.literal_value(inner.this, "the percentile")
    _need(tr, "quantile", node, cls.lower())
    interpolation = "discrete" if cls == "PercentileDisc" else "linear"
    return AggCall("quantile", tr.build(ordered.this),
                   {"q": float(q), "interpolation": interpolation}, sql_name=cls.lower())


def _string_agg(tr: Translator, node: exp.Expr) -> AggCall:
    sep = tr.literal_value(node.args["separator"], "the separator") \
        if node.args.get("separator") is not None else ","
    target = node.this
    if isinstance(target, exp.Distinct):
        raise tr.error("string_agg(DISTINCT ...) is not supported", node)
    if isinstance(target, exp.Order):
        raise tr.error("string_agg(... ORDER BY ...) is not supported", node)

    def post(values: Expr) -> Expr:
        def join(arr: pa.Array) -> pa.Array:
            out = pc.binary_join(arr.cast(pa.list_(pa.string())), sep)
            return pc.if_else(pc.equal(pc.list_value_length(arr), 0),
                              pa.scalar(None, pa.string()), out)

        return PythonFunction("string_agg", join, (values,), pa.string(), vectorized=True)

    return AggCall("collect_list", tr.build(target).cast(pa.string()), post=post,
                   sql_name="string_agg")


def _python_aggregate(tr: Translator, node: exp.Anonymous, fn: Any) -> AggCall:
    if len(node.expressions) != 1:
        raise tr.error(f"the Python aggregate {fn.name}() takes one argument", node)
    user = fn.fn

    def post(values: Expr) -> Expr:
        return PythonFunction(fn.name, lambda xs: user(xs or []), (values,), fn.return_type)

    return AggCall("collect_list", tr.build(node.expressions[0]), post=post,
                   sql_name=fn.name)


# ---------------------------------------------------------------------- ordering
def order_keys(tr: Translator, items: list[exp.Ordered]) -> tuple[list[Expr], list[bool],
                                                                    bool | None]:
    """ORDER BY items as (keys, descending flags, nulls_last) for the engine's sorts, whose
    null placement is one setting for all keys: a key whose placement differs gets an
    ``is null`` key before it."""
    keys = [tr.build(o.this) for o in items]
    desc = [bool(o.args.get("desc")) for o in items]
    first = [bool(o.args.get("nulls_first")) for o in items]
    if all(not f for f in first):
        return keys, desc, True
    if all(first):
        return keys, desc, False
    if all(f == (not d) for f, d in zip(first, desc)):  # the engine's default
        return keys, desc, None
    out_keys, out_desc = [], []
    for k, d, f in zip(keys, desc, first):
        out_keys.append(k.is_null())
        out_desc.append(f)  # nulls first: true sorts first when descending
        out_keys.append(k)
        out_desc.append(d)
    return out_keys, out_desc, None


# ---------------------------------------------------------------------- windows
_RANKING = {"RowNumber": "row_number", "Rank": "rank", "DenseRank": "dense_rank",
            "PercentRank": "percent_rank", "CumeDist": "cume_dist"}
_WINDOW_AGG = {"Sum": "sum", "Avg": "mean", "Min": "min", "Max": "max"}


def window_expr(tr: Translator, node: exp.Window) -> Expr:
    """``f(...) OVER (PARTITION BY ... ORDER BY ... frame)`` as a window expression."""
    fn = node.this
    ignore_nulls = False
    while isinstance(fn, (exp.IgnoreNulls, exp.RespectNulls)):
        ignore_nulls = ignore_nulls or isinstance(fn, exp.IgnoreNulls)
        fn = fn.this
    if isinstance(fn, exp.Filter):
        raise tr.error("FILTER on a window function is not supported", node)
    partition = [tr.build(e) for e in node.args.get("partition_by") or []]
    order = node.args.get("order")
    keys, desc, nulls_last = order_keys(tr, order.expressions) if order is not None \
        else ([], [], None)
    frame = _frame(tr, node.args.get("spec"))
    cls = type(fn).__name__
    n, default, arg = 1, None, None
    if cls in _RANKING:
        func = _RANKING[cls]
    elif cls == "Ntile":
        func, n = "ntile", int(tr.literal_value(fn.this, "ntile()'s buckets"))
    elif cls in ("Lag", "Lead"):
        func = cls.lower()
        arg = tr.build(fn.this)
        offset = fn.args.get("offset")
        n = int(tr.literal_value(offset, "the offset")) if offset is not None else 1
        if fn.args.get("default") is not None:
            default = tr.build(fn.args["default"])
    elif cls in ("FirstValue", "LastValue"):
        func = "first_value" if cls == "FirstValue" else "last_value"
        arg = tr.build(fn.this)
    elif cls == "NthValue":
        func, arg = "nth_value", tr.build(fn.this)
        n = int(tr.literal_value(fn.args.get("offset"), "nth_value()'s position"))
    elif isinstance(fn, exp.Count):
        target = fn.this
        if isinstance(target, exp.Distinct):
            raise tr.error("count(DISTINCT ...) OVER (...) is not supported", node)
        if target is None or isinstance(target, exp.Star):
            func = "count_all"
        else:
            func, arg = "count", tr.build(target)
    elif cls in _WINDOW_AGG:
        if isinstance(fn.this, exp.Distinct):
            raise tr.error(f"{cls.lower()}(DISTINCT ...) OVER (...) is not supported", node)
        func, arg = _WINDOW_AGG[cls], tr.build(fn.this)
    else:
        from millstream.sql.exprs import _fname

        raise tr.error(f"{_fname(fn)}() is not supported as a window function", node)
    try:
        spec = window_spec(partition, keys, desc, nulls_last, frame)
        return WindowExpr(func, arg, spec, n=n, default=default, ignore_nulls=ignore_nulls)
    except Exception as exc:  # noqa: BLE001 - the engine's own message, placed in the SQL
        raise tr.error(str(exc), node) from None


def _bound(tr: Translator, value: Any, side: str | None, kind: str, node: exp.Expr) -> Any:
    if isinstance(value, str):
        v = value.upper()
        if v == "UNBOUNDED":
            return None
        if v == "CURRENT ROW":
            return 0
    sign = -1 if (side or "").upper() == "PRECEDING" else 1
    if isinstance(value, exp.Interval):
        iv = tr.interval(value)
        micros = iv.fixed_micros()
        if micros is None:
            raise tr.error("a RANGE frame of months is not supported", value)
        import datetime as _dt

        return _dt.timedelta(microseconds=sign * micros)
    if isinstance(value, exp.Expr):
        amount = tr.literal_value(value, "a frame bound")
        if kind == "rows" and not isinstance(amount, int):
            raise tr.error("a ROWS frame bound is a whole number of rows", value)
        return sign * (float(amount) if not isinstance(amount, int) else amount)
    raise tr.error(f"cannot read the frame bound {value!r}", node)


def _frame(tr: Translator, spec: exp.WindowSpec | None) -> Frame | None:
    if spec is None:
        return None
    kind = (spec.args.get("kind") or "rows").lower()
    if kind not in ("rows", "range"):
        raise tr.error(f"{kind.upper()} frames are not supported (ROWS and RANGE are)", spec)
    if spec.args.get("exclude"):
        raise tr.error("EXCLUDE in a window frame is not supported", spec)
    start = _bound(tr, spec.args.get("start"), spec.args.get("start_side"), kind, spec)
    end_value = spec.args.get("end")
    end = 0 if end_value is None else _bound(tr, end_value, spec.args.get("end_side"), kind,
                                             spec)
    if isinstance(spec.args.get("start"), str) and spec.args["start"].upper() == "UNBOUNDED" \
            and (spec.args.get("start_side") or "").upper() == "FOLLOWING":
        raise tr.error("a frame cannot start at UNBOUNDED FOLLOWING", spec)
    return Frame(kind, start, end)


def interval_literal(tr: Translator, node: exp.Interval) -> T.Interval:
    """An INTERVAL's value (for the windowing functions)."""
    return tr.interval(node)
