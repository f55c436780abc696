"""Analytic (window) functions: SQL's ``f(...) OVER (PARTITION BY ... ORDER BY ... frame)``.

A window expression computes, for every row, a value over the rows of its partition: a
rank, a neighbour's value, or an aggregate over a frame of rows around it::

    ms.row_number().over(partition_by="k", order_by="t").alias("rn")
    ms.lag("v", 1, default=0).over(partition_by="k", order_by="t")
    ms.col("v").sum().over(partition_by="k", order_by="t", frame=ms.rows(-2, 0))
    ms.mean("v").over("k")                       # the mean of the whole partition

- :class:`Frame` (``ms.rows(start, end)``, ``ms.range_between(start, end)``): bounds are
  offsets from the current row, negative before it (``-2``: 2 PRECEDING, ``0``: CURRENT
  ROW, ``3``: 3 FOLLOWING), ``None`` unbounded. ROWS counts rows; RANGE compares the
  (single) order key's value, and its CURRENT ROW includes the row's peers (rows with
  equal order keys). Without a frame, an ordered window is RANGE UNBOUNDED PRECEDING to
  CURRENT ROW and an unordered one the whole partition (as in SQL).
- Order keys sort as ``Dataset.sort`` sorts: nulls first ascending and last descending
  unless ``nulls_last`` says otherwise; NaN above every number.
- :class:`AnalyticFunction` is a ranking or offset function waiting for ``.over(...)``;
  :class:`WindowExpr` is the expression ``.over(...)`` returns (usable in ``with_columns``
  and ``select``, also inside larger expressions); :class:`WindowFunction` is its resolved
  form, which the logical plan's ``Window`` node holds and ``ops.analytic`` computes.
"""

from __future__ import annotations

import builtins
import datetime as _dt
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from millstream.core.units import format_duration, parse_duration
from millstream.errors import PlanError
from millstream.expr import nodes as _nodes
from millstream.expr.nodes import AggExpr, Column, Expr, _lit_or_expr, to_expr
from millstream.expr.types import Datum, _q

#: functions that look at positions and peers only: a frame does not apply to them
RANKING = ("row_number", "rank", "dense_rank", "percent_rank", "cume_dist", "ntile")
#: functions reading another row of the partition by offset (no frame either)
OFFSET = ("lag", "lead")
#: functions over the rows of the frame
FRAMED = ("first_value", "last_value", "nth_value", "sum", "mean", "min", "max", "count",
          "count_all")
FUNCTIONS = RANKING + OFFSET + FRAMED
#: the group-by aggregates that also work over a window, and their window function
_FROM_AGG = {"sum": "sum", "mean": "mean", "min": "min", "max": "max", "count": "count",
             "count_all": "count_all", "first": "first_value"}


# ----------------------------------------------------------------------------- frames
def _offset(value: Any, kind: str, what: str) -> Any:
    """A frame bound as stored: None (unbounded), an int/float, or a timedelta (RANGE)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise PlanError(f"{what}: a frame bound is an offset or None, got {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    if kind == "rows":
        raise PlanError(f"{what}: a ROWS frame bound is a whole number of rows (negative: "
                        f"preceding) or None (unbounded), got {value!r}")
    if isinstance(value, numbers.Real):
        value = float(value)
        if value != value:
            raise PlanError(f"{what}: a frame bound cannot be NaN")
        return int(value) if value == 0 else value
    if isinstance(value, _dt.timedelta):
        return value if value else 0
    if isinstance(value, builtins.str):
        text = value.strip()
        sign = -1 if text.startswith("-") else 1
        micros = parse_duration(text.lstrip("+-"), what)
        return _dt.timedelta(microseconds=sign * micros) if micros else 0
    raise PlanError(f"{what}: a RANGE frame bound is a number, a datetime.timedelta, a "
                    f"duration such as '-1h' (negative: preceding) or None, got {value!r}")


@dataclass(frozen=True)
class Frame:
    """The rows around the current row an aggregate reads: ``kind`` "rows" or "range",
    bounds ``start``/``end`` as offsets (negative precede the row, 0 is the current row,
    None is unbounded)."""

    kind: str
    start: Any = None
    end: Any = 0

    def __post_init__(self) -> None:
        if self.kind not in ("rows", "range"):
            raise PlanError(f"a frame is 'rows' or 'range', got {self.kind!r}")
        what = f"{self.kind} frame"
        object.__setattr__(self, "start", _offset(self.start, self.kind, what))
        object.__setattr__(self, "end", _offset(self.end, self.kind, what))

    @property
    def has_offsets(self) -> bool:
        """A bound other than unbounded and current row (RANGE then compares values)."""
        return any(b is not None and not _is_zero(b) for b in (self.start, self.end))

    def describe(self) -> str:
        """SQL's text of the frame, e.g. ``rows between 2 preceding and current row``."""
        return f"{self.kind} between {_bound(self.start, True)} and {_bound(self.end, False)}"

    def __repr__(self) -> str:
        maker = "rows" if self.kind == "rows" else "range_between"
        return f"{maker}({self.start!r}, {self.end!r})"


def _is_zero(b: Any) -> bool:
    return b == _dt.timedelta(0) if isinstance(b, _dt.timedelta) else b == 0


def _bound(b: Any, start: bool) -> str:
    if b is None:
        return "unbounded preceding" if start else "unbounded following"
    if _is_zero(b):
        return "current row"
    neg = b < _dt.timedelta(0) if isinstance(b, _dt.timedelta) else b < 0
    size = -b if neg else b
    if isinstance(size, _dt.timedelta):
        size = format_duration(size // _dt.timedelta(microseconds=1))
    return f"{size} {'preceding' if neg else 'following'}"


def rows(start: int | None = None, end: int | None = 0) -> Frame:
    """A ROWS frame: from ``start`` to ``end`` rows around the current row (``rows(-2, 0)``:
    the two rows before and the row itself; None: unbounded). ``rows()`` is a running frame."""
    return Frame("rows", start, end)


def range_between(start: Any = None, end: Any = 0) -> Frame:
    """A RANGE frame: rows whose order key lies within ``[key + start, key + end]`` (a number,
    a timedelta or a duration such as ``'-1h'`` for a temporal key; 0 is the current row
    and its peers; None unbounded). Offsets need exactly one order key."""
    return Frame("range", start, end)


# ----------------------------------------------------------------------------- specs
@dataclass(frozen=True, eq=False)
class WindowSpec:
    """``OVER (...)`` as given: partition and order expressions, directions, null placement
    (None: nulls first ascending, last descending) and the frame (None: SQL's default)."""

    partition_by: tuple[Expr, ...] = ()
    order_by: tuple[Expr, ...] = ()
    descending: tuple[bool, ...] = ()
    nulls_last: bool | None = None
    frame: Frame | None = None

    def describe(self, partition: bool = True) -> str:
        parts = []
        if partition and self.partition_by:
            parts.append("partition by " + ", ".join(_key_text(e) for e in self.partition_by))
        if self.order_by:
            parts.append("order by " + ", ".join(
                _key_text(e) + (" desc" if d else "") for e, d in zip(self.order_by,
                                                                     self.descending)))
            if self.nulls_last is not None:
                parts.append("nulls last" if self.nulls_last else "nulls first")
        if self.frame is not None:
            parts.append(self.frame.describe())
        return " ".join(parts)


def _key_text(e: Expr) -> str:
    return e.name if isinstance(e, Column) else repr(e)


def _keys(value: Any, what: str) -> tuple[Expr, ...]:
    if value is None:
        return ()
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    out = []
    for v in items:
        if isinstance(v, builtins.str):
            out.append(Column(v))
        elif isinstance(v, (WindowExpr, AnalyticFunction, AggExpr)):
            raise PlanError(f"over({what}=...): {v!r} is not a plain column or expression")
        elif isinstance(v, Expr):
            out.append(v)
        else:
            raise PlanError(f"over({what}=...) takes column names or expressions, got {v!r}")
    return tuple(out)


def window_spec(partition_by: Any = None, order_by: Any = None, descending: Any = False,
                nulls_last: bool | None = None, frame: Frame | None = None) -> WindowSpec:
    """A checked :class:`WindowSpec` from ``over(...)``'s arguments."""
    parts, order = _keys(partition_by, "partition_by"), _keys(order_by, "order_by")
    if isinstance(descending, bool):
        desc = (descending,) * len(order)
    else:
        desc = tuple(bool(d) for d in descending)
        if len(desc) != len(order):
            raise PlanError(f"over(): {len(order)} order key(s) but {len(desc)} descending "
                            f"flag(s)")
    if nulls_last is not None and not isinstance(nulls_last, bool):
        raise PlanError(f"over(nulls_last=...) is True, False or None, got {nulls_last!r}")
    if frame is not None and not isinstance(frame, Frame):
        raise PlanError(f"over(frame=...) takes ms.rows(start, end) or "
                        f"ms.range_between(start, end), got {frame!r}")
    if frame is not None and frame.kind == "range" and frame.has_offsets and len(order) != 1:
        raise PlanError(f"a RANGE frame with offsets ({frame.describe()}) needs exactly one "
                        f"order key, got {len(order)}")
    return WindowSpec(parts, order, desc, nulls_last, frame)


# ----------------------------------------------------------------------------- expressions
@dataclass(frozen=True, eq=False)
class WindowFunction:
    """A resolved window function, as the ``Window`` node holds it and ``ops.analytic``
    computes it: output ``name``, function, input ``arg`` (None for ranking functions and
    count(*)), ``n`` (lag/lead offset, ntile buckets, nth_value position), ``default``
    (lag/lead), ``ignore_nulls`` (first/last_value), order keys as column names, and the
    frame (SQL's default filled in; None for functions without one)."""

    name: str
    func: str
    arg: Expr | None
    order_by: tuple[str, ...] = ()
    descending: tuple[bool, ...] = ()
    nulls_last: bool | None = None
    frame: Frame | None = None
    n: int = 1
    default: Expr | None = None
    ignore_nulls: bool = False

    @property
    def sort_spec(self) -> tuple:
        """Functions with equal sort specs share one sort of the partition."""
        return (self.order_by, self.descending, self.nulls_last)

    def columns(self) -> set[str]:
        """The input columns the function reads (order keys included)."""
        out = set(self.order_by)
        for e in (self.arg, self.default):
            if e is not None:
                out |= e.columns()
        return out

    def describe(self) -> str:
        """``func(args) over (order by ... frame) as name`` for explain()."""
        spec = WindowSpec((), tuple(Column(c) for c in self.order_by), self.descending,
                          self.nulls_last, self.frame)
        return f"{_call_text(self.func, self.arg, self.n, self.default, self.ignore_nulls)} " \
               f"over ({spec.describe()}) as {_q(self.name)}"


def _call_text(func: str, arg: Expr | None, n: int, default: Expr | None,
               ignore_nulls: bool) -> str:
    args = [] if arg is None else [repr(arg)]
    if func in ("lag", "lead"):
        args.append(str(n))
        if default is not None:
            args.append(f"default={default!r}")
    elif func in ("ntile", "nth_value"):
        args.append(str(n))
    if ignore_nulls:
        args.append("ignore_nulls=True")
    name = "count" if func == "count_all" else func
    return f"{name}({', '.join(args)})"


class AnalyticFunction:
    """A ranking or offset function (``ms.row_number()``, ``ms.lag("v")``, ...); it becomes
    an expression with ``.over(partition_by=..., order_by=..., frame=...)``."""

    def __init__(self, func: str, arg: Expr | None = None, n: int = 1,
                 default: Expr | None = None, ignore_nulls: bool = False) -> None:
        if func not in FUNCTIONS:
            raise PlanError(f"unknown window function {func!r}; known: {', '.join(FUNCTIONS)}")
        self.func, self.arg, self.n = func, arg, n
        self.default, self.ignore_nulls = default, ignore_nulls

    def over(self, partition_by: Any = None, order_by: Any = None, *,
             descending: bool | Sequence[bool] = False, nulls_last: bool | None = None,
             frame: Frame | None = None) -> WindowExpr:
        """This function over the rows of each partition (all rows when ``partition_by`` is
        None), in ``order_by`` order, over ``frame`` (aggregates and first/last/nth_value
        only); see :mod:`millstream.expr.analytic`."""
        spec = window_spec(partition_by, order_by, descending, nulls_last, frame)
        if frame is not None and self.func not in FRAMED:
            raise PlanError(f"{self!r} does not take a frame (it sees the whole partition in "
                            f"order); frames apply to aggregates and first/last/nth_value")
        return WindowExpr(self.func, self.arg, spec, n=self.n, default=self.default,
                          ignore_nulls=self.ignore_nulls)

    def alias(self, name: str) -> AnalyticFunction:
        raise PlanError(f"{self!r} needs a window first: {self!r}.over(...).alias({name!r})")

    def __repr__(self) -> str:
        return _call_text(self.func, self.arg, self.n, self.default, self.ignore_nulls)


class WindowExpr(Expr):
    """A window function over a window (what ``.over(...)`` returns): an expression the
    Dataset computes with a partition shuffle and a sort (``with_columns``, ``select``);
    it cannot be evaluated batch by batch."""

    def __init__(self, func: str, arg: Expr | None, spec: WindowSpec, *, n: int = 1,
                 default: Expr | None = None, ignore_nulls: bool = False,
                 name: str | None = None) -> None:
        self.func, self.arg, self.spec, self.n = func, arg, spec, n
        self.default, self.ignore_nulls, self.name = default, ignore_nulls, name

    def _eval(self, batch: pa.RecordBatch) -> Datum:
        raise PlanError(f"{self!r} is a window function: it is computed by with_columns(...), "
                        f"select(...) or filter(...) of a Dataset, not batch by batch")

    def _name_hint(self) -> str | None:
        if self.name is not None:
            return self.name
        if self.func == "count_all":
            return "count"
        if self.arg is not None:
            return self.arg._name_hint()
        return self.func

    def _children(self) -> tuple[Expr, ...]:
        own = tuple(e for e in (self.arg, self.default) if e is not None)
        return own + self.spec.partition_by + self.spec.order_by

    def resolve(self, name: str, order_names: Sequence[str]) -> WindowFunction:
        """The resolved function computing column ``name``, the order keys being columns
        ``order_names`` (the window's own names, or computed ones)."""
        frame = self.spec.frame
        if self.func in FRAMED and frame is None:
            frame = Frame("range", None, 0 if self.spec.order_by else None)
        return WindowFunction(name, self.func, self.arg, tuple(order_names),
                              self.spec.descending, self.spec.nulls_last, frame, self.n,
                              self.default, self.ignore_nulls)

    def __repr__(self) -> str:
        text = _call_text(self.func, self.arg, self.n, self.default, self.ignore_nulls)
        return f"{text}.over({self.spec.describe()})" + \
            (f".alias({_q(self.name)})" if self.name is not None else "")


# ----------------------------------------------------------------------------- constructors
def _arg(c: Any, what: str) -> Expr:
    if not isinstance(c, (builtins.str, Expr)) or isinstance(c, WindowExpr):
        raise PlanError(f"{what}() expects a column name or an expression, got {c!r}")
    return to_expr(c)


def _count(n: Any, what: str, minimum: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < minimum:
        raise PlanError(f"{what}: expected a whole number >= {minimum}, got {n!r}")
    return n


def row_number() -> AnalyticFunction:
    """1, 2, 3, ... in the window's order (ties in any order)."""
    return AnalyticFunction("row_number")


def rank() -> AnalyticFunction:
    """1 + the number of rows ordered before the row (peers share a rank; gaps follow)."""
    return AnalyticFunction("rank")


def dense_rank() -> AnalyticFunction:
    """1 + the number of distinct order keys before the row (no gaps)."""
    return AnalyticFunction("dense_rank")


def percent_rank() -> AnalyticFunction:
    """``(rank - 1) / (rows in partition - 1)``, 0 for a partition of one row."""
    return AnalyticFunction("percent_rank")


def cume_dist() -> AnalyticFunction:
    """The fraction of the partition's rows ordered before the row or its peers."""
    return AnalyticFunction("cume_dist")


def ntile(buckets: int) -> AnalyticFunction:
    """The bucket 1..``buckets`` of the row, buckets as equal as can be (larger first)."""
    return AnalyticFunction("ntile", n=_count(buckets, "ntile", 1))


def lag(c: str | Expr, n: int = 1, default: Any = None) -> AnalyticFunction:
    """The value ``n`` rows before in the partition, ``default`` (a value or an expression)
    where there is none."""
    return AnalyticFunction("lag", _arg(c, "lag"), _count(n, "lag offset", 0),
                            None if default is None else _lit_or_expr(default))


def lead(c: str | Expr, n: int = 1, default: Any = None) -> AnalyticFunction:
    """The value ``n`` rows after in the partition, ``default`` where there is none."""
    return AnalyticFunction("lead", _arg(c, "lead"), _count(n, "lead offset", 0),
                            None if default is None else _lit_or_expr(default))


def first_value(c: str | Expr, ignore_nulls: bool = False) -> AnalyticFunction:
    """The value of the frame's first row (first non-null with ``ignore_nulls``)."""
    return AnalyticFunction("first_value", _arg(c, "first_value"), ignore_nulls=ignore_nulls)


def last_value(c: str | Expr, ignore_nulls: bool = False) -> AnalyticFunction:
    """The value of the frame's last row (last non-null with ``ignore_nulls``). With the
    default frame of an ordered window that is the last peer of the current row."""
    return AnalyticFunction("last_value", _arg(c, "last_value"), ignore_nulls=ignore_nulls)


def nth_value(c: str | Expr, n: int) -> AnalyticFunction:
    """The value of the frame's ``n``-th row (1-based), null when the frame is shorter."""
    return AnalyticFunction("nth_value", _arg(c, "nth_value"), _count(n, "nth_value", 1))


def _aggregate_over(agg: AggExpr, partition_by: Any = None, order_by: Any = None, *,
                    descending: bool | Sequence[bool] = False, nulls_last: bool | None = None,
                    frame: Frame | None = None) -> WindowExpr:
    """``AggExpr.over``: the aggregate over each row's frame."""
    func = _FROM_AGG.get(agg.func)
    if func is None:
        raise PlanError(f"{agg!r}: {agg.func} is not a window function; over a window: "
                        f"{', '.join(sorted(_FROM_AGG))}")
    spec = window_spec(partition_by, order_by, descending, nulls_last, frame)
    name = agg.name if agg.name != agg.default_name else None
    return WindowExpr(func, agg.arg, spec, name=name)


_nodes.register_window_constructor(_aggregate_over)
