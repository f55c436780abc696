"""Optimizer rules, one per module, applied by :mod:`millstream.plan.optimizer` to a fixed
point.

A rule is a :class:`Rule`: a name (what ``explain()`` lists when it fired) and
``apply(node, ctx)``, which returns an equivalent plan (the same object when it does not
apply). Rules are listed in :data:`RULES` in the order one pass applies them; the driver
repeats passes until no rule changes the plan (or a pass limit is reached).

Helpers shared by the rules: ``exprs`` (expressions: conjuncts, substitution, folding,
null rejection), ``common`` (nodes: rebuilding, empty relations, where a join's columns
come from) and ``columns`` (which input columns a node needs).
"""

from __future__ import annotations

from millstream.plan.rules.base import Rule, RuleContext
from millstream.plan.rules.disjunction_sides import DisjunctionSides
from millstream.plan.rules.filter_into_scan import FilterIntoScan
from millstream.plan.rules.join_keys import InferJoinKeys
from millstream.plan.rules.join_order import JoinOrder
from millstream.plan.rules.limit_pushdown import LimitPushdown
from millstream.plan.rules.outer_join import OuterJoinToInner
from millstream.plan.rules.predicate_pushdown import PredicatePushdown
from millstream.plan.rules.projection_into_scan import ProjectionIntoScan
from millstream.plan.rules.projection_pruning import ProjectionPruning
from millstream.plan.rules.reuse import ReuseSubplans
from millstream.plan.rules.semi_join_below_aggregate import SemiJoinBelowAggregate
from millstream.plan.rules.semi_join_pushdown import SemiJoinPushdown
from millstream.plan.rules.simplify import ConstantFolding
from millstream.plan.rules.topk import SortLimitToTopK

#: The rules of one optimizer pass, in order: expressions are simplified first (a filter
#: that is always true or false goes before anything moves it); filters then move down
#: (a disjunction that stays above a join adds the filters it implies on each input, which
#: the next pass moves down), narrow the outer joins they reject the nulls of and become join keys, and what reaches a
#: scan goes into it; semi and anti joins move onto the smaller join inputs they read; chains of inner joins are ordered from the estimates (which see the
#: filters where they now run); limits move down and a sort under a limit becomes a top-k;
#: sub-plans used more than once are shared (computed once; before the pruning, which
#: would make their uses differ); last, the columns nobody reads are pruned, down to the
#: scans (which needs the plan's final shape). An aggregate joined on its group keys with
#: a small side gets a semi join with that side below it (after the join order is known).
RULES: tuple[Rule, ...] = (
    ConstantFolding(),
    PredicatePushdown(),
    DisjunctionSides(),
    OuterJoinToInner(),
    InferJoinKeys(),
    FilterIntoScan(),
    SemiJoinPushdown(),
    JoinOrder(),
    SemiJoinBelowAggregate(),
    LimitPushdown(),
    SortLimitToTopK(),
    ReuseSubplans(),
    ProjectionPruning(),
    ProjectionIntoScan(),
)

__all__ = ["RULES", "Rule", "RuleContext"]
