"""Aggregate functions: their names, their parameters, and :class:`AggSpec`, the resolved
aggregate the logical plan holds and the aggregation operators (``ops.aggregate``,
``ops.window``) compute.

The user-facing side lives above this module: :class:`~millstream.expr.nodes.AggExpr` is the
aggregate as an expression node (``ms.sum("x")``, ``col("x").std()``, and expressions over
aggregates such as ``ms.sum("a") / ms.sum("b")``), and ``expr.agg_functions`` holds the
constructors and turns ``agg(...)`` items into specs plus a projection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from millstream.errors import PlanError
from millstream.expr.types import _fmt

#: the aggregate functions, in the order error messages list them
SUPPORTED = ("sum", "mean", "min", "max", "count", "count_all", "count_distinct", "first",
             "last", "collect_list", "any_value", "std", "var", "median", "quantile",
             "approx_count_distinct", "approx_quantile")
AGG_FUNCS = frozenset(SUPPORTED)

#: the parameters each function takes, with their defaults
PARAMS: dict[str, dict[str, Any]] = {
    "std": {"ddof": 1},
    "var": {"ddof": 1},
    "quantile": {"q": None, "interpolation": "linear"},
    "approx_quantile": {"q": None},
}

#: how ``quantile`` picks a value between the two closest ranks: "linear" (DuckDB's
#: ``quantile_cont``, Spark's ``percentile``), "discrete" (SQL's ``percentile_disc``, DuckDB's
#: ``quantile_disc``: the first value whose cumulative share reaches q), and numpy's "lower",
#: "higher", "midpoint", "nearest"
INTERPOLATIONS = ("linear", "discrete", "lower", "higher", "midpoint", "nearest")


def check_params(func: str, params: dict[str, Any] | None) -> dict[str, Any]:
    """The parameters of an aggregate with defaults filled in; PlanError when one is bad."""
    allowed = PARAMS.get(func, {})
    given = dict(params or {})
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise PlanError(f"{func}() takes no parameter(s) {unknown}"
                        + (f"; it takes {sorted(allowed)}" if allowed else ""))
    out = {**allowed, **given}
    if "ddof" in out:
        ddof = out["ddof"]
        if isinstance(ddof, bool) or not isinstance(ddof, int) or ddof < 0:
            raise PlanError(f"{func}(): ddof must be a non-negative int, got {ddof!r}")
    if "q" in out:
        q = out["q"]
        if isinstance(q, bool) or not isinstance(q, (int, float)) or math.isnan(q) \
                or not 0.0 <= q <= 1.0:
            raise PlanError(f"{func}(): q must be a number between 0 and 1, got {q!r}")
        out["q"] = float(q)
    if "interpolation" in out and out["interpolation"] not in INTERPOLATIONS:
        raise PlanError(f"{func}(): interpolation must be one of {list(INTERPOLATIONS)}, got "
                        f"{out['interpolation']!r}")
    return out


def params_text(func: str, params: dict[str, Any]) -> str:
    """The parameters as they print in a call: positional ``q``, others only when not default."""
    defaults = PARAMS.get(func, {})
    parts = []
    for k, v in params.items():
        if k == "q":
            parts.insert(0, _fmt(v))
        elif v != defaults.get(k):
            parts.append(f"{k}={_fmt(v)}")
    return ", ".join(parts)


@dataclass
class AggSpec:
    """A resolved aggregate: function, input (an expression, or None for count(*)), output
    name, and the function's parameters (``q`` of a quantile, ``ddof`` of std and var)."""

    func: str
    arg: Any  # Expr or None
    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.func not in SUPPORTED:
            raise PlanError(f"unknown aggregate {self.func!r}; supported: {', '.join(SUPPORTED)}")
        self.params = check_params(self.func, self.params)

    def text(self) -> str:
        """``func(arg, params)`` as explain() prints it."""
        if self.arg is None:
            return "count(*)"
        extra = params_text(self.func, self.params)
        return f"{self.func}({self.arg!r}{', ' + extra if extra else ''})"
