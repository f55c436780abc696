"""Aggregates: what a group-by or a window computes per group.

- :class:`AggExpr` is the user's descriptor (``ms.sum("x").alias("total")``,
  ``col("x").max()``); the constructors ``ms.sum``/``ms.mean``/... are in ``expr.nodes``.
- :class:`AggSpec` is the resolved form the logical plan holds and the aggregation
  operators (``ops.aggregate``, ``ops.window``) compute.
- :class:`AggregateMethods` gives :class:`~millstream.expr.nodes.Expr` its aggregate methods;
  it lives here so that this module needs nothing from ``expr.nodes``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from millstream.errors import PlanError
from millstream.expr.types import _q

if TYPE_CHECKING:
    from millstream.expr.nodes import Expr

#: the aggregate functions, in the order error messages list them
SUPPORTED = ("sum", "mean", "min", "max", "count", "count_all", "count_distinct", "first",
             "last", "collect_list")
AGG_FUNCS = frozenset(SUPPORTED)


@dataclass
class AggSpec:
    """A resolved aggregate: function, input (an expression, or None for count(*)), output name."""

    func: str
    arg: Any  # Expr or None
    name: str

    def __post_init__(self) -> None:
        if self.func not in SUPPORTED:
            raise PlanError(f"unknown aggregate {self.func!r}; supported: {', '.join(SUPPORTED)}")


#: builds ``AggExpr.over``'s window expression; ``expr.analytic`` (which sits above this
#: module) registers it when the package loads
_window_constructor: Callable[..., Any] | None = None


def register_window_constructor(fn: Callable[..., Any]) -> None:
    """Called by ``expr.analytic``: ``fn(agg, partition_by, order_by, **options)``."""
    global _window_constructor
    _window_constructor = fn


class AggregateMethods:
    """The aggregate methods of an expression (descriptors; the engine computes them).

    :class:`~millstream.expr.nodes.Expr` is the one class that mixes this in, so an instance
    of it is an ``Expr``.
    """

    def sum(self) -> AggExpr:
        """Sum of non-null values."""
        return AggExpr("sum", self)

    def mean(self) -> AggExpr:
        """Mean of non-null values."""
        return AggExpr("mean", self)

    def min(self) -> AggExpr:
        """Smallest non-null value."""
        return AggExpr("min", self)

    def max(self) -> AggExpr:
        """Largest non-null value."""
        return AggExpr("max", self)

    def count(self) -> AggExpr:
        """Number of non-null values."""
        return AggExpr("count", self)

    def count_distinct(self) -> AggExpr:
        """Number of distinct non-null values."""
        return AggExpr("count_distinct", self)

    def first(self) -> AggExpr:
        """First value of the group."""
        return AggExpr("first", self)

    def last(self) -> AggExpr:
        """Last non-null value of the group (in arrival order)."""
        return AggExpr("last", self)

    def collect_list(self) -> AggExpr:
        """All values of the group as a list."""
        return AggExpr("collect_list", self)


class AggExpr:
    """An aggregate descriptor: func applied to arg, output column name; the engine computes it."""

    def __init__(self, func: str, arg: Expr | None, name: str | None = None):
        if func not in AGG_FUNCS:
            raise PlanError(f"unknown aggregate {func!r}; expected one of {sorted(AGG_FUNCS)}")
        if (arg is None) != (func == "count_all"):
            raise PlanError("count_all takes no argument; every other aggregate takes one")
        if arg is not None and not isinstance(arg, AggregateMethods):  # i.e. an Expr
            raise PlanError(f"aggregate argument must be an Expr, got {arg!r}")
        self.func = func
        self.arg = arg
        self.name = name if name is not None else self.default_name

    @property
    def default_name(self) -> str:
        """The name used without alias: the input's output_name, or "count" for count_all."""
        return "count" if self.arg is None else self.arg.output_name

    def alias(self, name: str) -> AggExpr:
        """The same aggregate with another output name."""
        return AggExpr(self.func, self.arg, name)

    def columns(self) -> set[str]:
        """Names of the columns the aggregate reads."""
        return set() if self.arg is None else self.arg.columns()

    def over(self, partition_by: Any = None, order_by: Any = None, **options: Any) -> Expr:
        """This aggregate over a window of rows around each row (SQL's ``OVER (...)``):
        ``ms.sum("v").over(partition_by="k", order_by="t", frame=ms.rows(-2, 0))``; see
        :mod:`millstream.expr.analytic`."""
        if _window_constructor is None:  # pragma: no cover - the package loads it
            raise PlanError("window functions are not loaded: import millstream.expr.analytic")
        return _window_constructor(self, partition_by, order_by, **options)

    def __repr__(self) -> str:
        s = "count()" if self.arg is None else f"{self.arg!r}.{self.func}()"
        if self.name != self.default_name:
            s += f".alias({_q(self.name)})"
        return s
