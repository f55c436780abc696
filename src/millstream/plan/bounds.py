"""Sure upper bounds of a plan's rows, for choices that must not be wrong by much.

The estimates of ``plan/stats.py`` guess (selectivities, containment); the physical
planner runs a sort in one task only when its input is bounded for sure: a global
aggregate gives one row, a limit at most ``n``, a group-by at most the product of its
keys' distinct values (each plus one for null) where a value range bounds them (integers,
dates, decimals between a column's min and max: a source's distinct counts are guesses,
from dictionary sizes or samples), and the rows of a source are its statistics' count. Anything else is unbounded (None).
"""

from __future__ import annotations

import math

import pyarrow as pa

from millstream.expr.nodes import Alias, Column, Expr, Literal
from millstream.plan import logical as L
from millstream.plan.estimates import _domain_size

#: nodes whose rows are at most their (first) input's and whose columns keep their values
_SAME_VALUES = (L.Filter, L.FilterRows, L.Sort, L.Shared, L.Repartition, L.Cache,
                L.WithWatermark, L.Limit, L.TopK, L.Distinct, L.Drop)


def row_bound(node: L.Node) -> float | None:
    """At most this many rows come out of ``node`` (None: no sure bound)."""
    try:
        return _rows(node)
    except (pa.ArrowException, TypeError, ValueError, ArithmeticError, OverflowError):
        return None  # a bound is never worth a failed query


def _rows(node: L.Node) -> float | None:
    if isinstance(node, L.Aggregate):
        if not node.keys:
            return 1.0
        groups = 1.0
        for k in node.keys:
            d = _ndv(node.child, k)
            if d is None:
                groups = math.inf
                break
            groups *= d + 1  # (a null key is a group too)
        child = _rows(node.child)
        bound = min(groups, child if child is not None else math.inf)
        return None if math.isinf(bound) else bound
    if isinstance(node, (L.Limit, L.TopK)):
        child = _rows(node.child)
        return float(node.n) if child is None else min(float(node.n), child)
    if isinstance(node, L.Scan):
        st = node.source.statistics()
        return None if st is None else float(st.num_rows)
    if isinstance(node, L.Join) and node.how in ("semi", "anti"):
        return _rows(node.left)
    if isinstance(node, L.Union):
        parts = [_rows(c) for c in node.inputs]
        return None if any(p is None for p in parts) else sum(parts)  # type: ignore[misc]
    if isinstance(node, (*_SAME_VALUES, L.Project, L.WithColumns, L.Rename, L.Map)):
        return _rows(node.children[0])
    return None


def _ndv(node: L.Node, name: str) -> float | None:
    """At most this many distinct non-null values of column ``name`` (None: unbounded)."""
    if isinstance(node, L.Scan):
        st = node.source.statistics()
        cs = None if st is None else st.columns.get(name)
        if cs is None:
            return None
        # (not ``distinct_count``: sources guess it from dictionary sizes or a sample)
        schema = node.schema
        t = schema.field(name).type if schema is not None \
            and schema.get_field_index(name) >= 0 else None
        dom = _domain_size(cs.min, cs.max, t)
        return None if dom is None else min(dom, float(st.num_rows))
    if isinstance(node, _SAME_VALUES):
        return _ndv(node.children[0], name)
    if isinstance(node, L.Rename):
        back = {new: old for old, new in dict(node.mapping).items()}
        return _ndv(node.child, back.get(name, name))
    if isinstance(node, (L.Project, L.WithColumns)):
        for e in node.exprs:
            if e.output_name == name:
                return _expr_ndv(node.child, e)
        return _ndv(node.child, name) if isinstance(node, L.WithColumns) else None
    if isinstance(node, L.Aggregate):
        return _ndv(node.child, name) if name in node.keys else None
    if isinstance(node, L.Join):
        # an inner, left, semi or anti join's columns hold values of its inputs (plus
        # nulls, counted apart); a left column keeps its name, a right one too unless the
        # left has it (outer joins may fill a shared key from either side)
        if node.how in ("right", "outer", "full"):
            return None
        left, right = node.left.schema, node.right.schema
        if left is not None and left.get_field_index(name) >= 0:
            return _ndv(node.left, name)
        if node.how not in ("semi", "anti") and right is not None \
                and right.get_field_index(name) >= 0:
            return _ndv(node.right, name)
    return None


def _expr_ndv(child: L.Node, e: Expr) -> float | None:
    inner = e.child if isinstance(e, Alias) else e
    if isinstance(inner, Column):
        return _ndv(child, inner.name)
    if isinstance(inner, Literal):
        return 1.0
    return None
