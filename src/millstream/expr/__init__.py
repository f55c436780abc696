"""Column expressions compiled to ``pyarrow.compute``, and aggregate specs (above ``core``).

Build expressions with :func:`col`, :func:`lit`, operators and methods, e.g.
``(col("price") * col("qty")).alias("total")`` or ``col("name").str.lower()``, then
evaluate them on a record batch with :meth:`Expr.evaluate`, or translate them into a
``pyarrow.compute.Expression`` with :meth:`Expr.to_arrow` for filter pushdown.

Conventions:

- Nulls follow SQL/Arrow: arithmetic and comparisons with null give null; ``&`` and
  ``|`` use Kleene logic; ``when`` treats a null condition as false.
- Inside operators and methods a plain Python value is a literal (``col("s") == "x"``
  compares with the string ``"x"``); pass ``col(...)`` to refer to a column. Only
  :func:`to_expr`, :func:`when`'s condition and the aggregate constructors read a
  ``str`` as a column name.
- Every expression is an immutable tree of plain objects that pickles with ``pickle``
  and ``cloudpickle``; operations are stored by name, never as functions.

Modules, lowest first: ``types`` (parse_type, datum helpers), ``decimals`` (the decimal
typing rules of arithmetic), ``registry`` (the table of named operations), ``functions``,
``strings`` and ``datetime`` (the registered operations, and the ``.str`` and ``.dt``
namespaces), ``aggregates`` (the aggregate functions' names and parameters, AggSpec),
``nodes`` (Expr, Column, Literal, Alias, the operation node, AggExpr; col, lit),
``conditional`` (when/otherwise), ``numeric``, ``text`` and ``temporal`` (more operations
with SQL's meaning: rounding, LIKE, interval arithmetic, EXTRACT ...), ``agg_functions``
(sum, mean, std, quantile, ...; the planning of ``agg(...)`` items that are expressions
over aggregates) and ``analytic`` (window functions: ``row_number()``, ``lag(...)``,
``sum(...).over(...)``, frames).
"""

from millstream.expr import numeric, temporal, text  # noqa: F401 - register their operations
from millstream.expr.agg_functions import (
    any_value,
    approx_count_distinct,
    approx_quantile,
    avg,
    collect_list,
    count,
    count_distinct,
    first,
    last,
    max,
    mean,
    median,
    min,
    quantile,
    std,
    stddev,
    sum,
    var,
    variance,
)
from millstream.expr.aggregates import AggSpec
from millstream.expr.analytic import (
    AnalyticFunction,
    Frame,
    WindowExpr,
    WindowFunction,
    cume_dist,
    dense_rank,
    first_value,
    lag,
    last_value,
    lead,
    nth_value,
    ntile,
    percent_rank,
    range_between,
    rank,
    row_number,
    rows,
)
from millstream.expr.conditional import When, when
from millstream.expr.nodes import AggExpr, Alias, Column, Expr, Literal, col, lit, to_expr
from millstream.expr.types import parse_type

__all__ = [
    "AggExpr",
    "AggSpec",
    "Alias",
    "AnalyticFunction",
    "Frame",
    "WindowExpr",
    "WindowFunction",
    "Column",
    "Expr",
    "Literal",
    "When",
    "any_value",
    "approx_count_distinct",
    "approx_quantile",
    "avg",
    "col",
    "collect_list",
    "count",
    "count_distinct",
    "cume_dist",
    "dense_rank",
    "first",
    "first_value",
    "lag",
    "last",
    "last_value",
    "lead",
    "lit",
    "max",
    "mean",
    "median",
    "min",
    "nth_value",
    "ntile",
    "parse_type",
    "percent_rank",
    "range_between",
    "rank",
    "row_number",
    "rows",
    "quantile",
    "std",
    "stddev",
    "sum",
    "to_expr",
    "var",
    "variance",
    "when",
]
