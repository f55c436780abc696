"""A conjunct of a join's own condition that reads one input goes into that input where
the join type allows it (predicate_pushdown), and the columns only it read are not carried
past it (projection_pruning); results equal the plan as written."""

from __future__ import annotations

import pyarrow as pa
import pytest

import millstream as ms
from millstream.plan.logical import Filter, Join, Project
from millstream.plan.optimizer import optimize

col = ms.col


def _sides():
    left = ms.from_arrow(pa.table({"k": [1, 1, 2, 3, 4, None], "a": [5, 15, 25, 35, 45, 55]}),
                         num_partitions=2)
    right = ms.from_arrow(pa.table({"rk": [1, 2, 2, 3, 5, None],
                                    "note": ["x", "special", "y", "special", "z", "w"],
                                    "b": [1, 2, 3, 4, 5, 6]}), num_partitions=2)
    return left, right


def _join_of(node):
    while not isinstance(node, Join):
        node = node.children[0]
    return node


def _filtered(node) -> bool:
    """Whether a Filter sits on this join input (under any selects)."""
    while isinstance(node, Project):
        node = node.child
    return isinstance(node, Filter)


def _rows(ds, **kw):
    return sorted(map(repr, (tuple(sorted(r.items())) for r in ds.collect(**kw))))


# (join type, where the right-only conjunct goes, where the left-only one goes)
CASES = [("inner", True, True), ("left", True, False), ("right", False, True),
         ("semi", True, True), ("anti", True, False), ("outer", False, False)]


@pytest.mark.parametrize("how, right_down, left_down", CASES)
def test_one_sided_condition_conjuncts_go_into_the_inputs_they_can(how, right_down, left_down):
    left, right = _sides()
    cond = (col("note") != "special") & (col("a") > 10) & (col("a") > col("b"))
    ds = left.join(right, left_on="k", right_on="rk", how=how, condition=cond)
    join = _join_of(optimize(ds._node))
    assert _filtered(join.right) == right_down
    assert _filtered(join.left) == left_down
    # the two-sided conjunct stays on the join (and the whole condition when nothing moved)
    assert join.condition is not None and "b" in join.condition.columns()
    assert _rows(ds) == _rows(ds, optimizer=False)


def test_a_column_read_only_by_a_pushed_condition_is_not_shuffled():
    left, right = _sides()
    ds = (left.join(right, left_on="k", right_on="rk", how="left",
                    condition=~col("note").str.contains("spec"))
          .group_by("k").agg(ms.count("b").alias("n")))
    plan = ds.explain(print_plan=False).split("== Optimized plan ==")[1].split("== Rules")[0]
    below = plan.split("Join left")[1]
    assert "Filter(" in below and 'Project(col("rk"), col("b"))' in below
    assert _rows(ds) == _rows(ds, optimizer=False)
