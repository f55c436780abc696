"""Optimizer rules, one per module, applied by :mod:`millstream.plan.optimizer` to a fixed
point.

A rule is a :class:`Rule`: a name (what ``explain()`` lists when it fired) and
``apply(node, ctx)``, which returns an equivalent plan (the same object when it does not
apply). Rules are listed in :data:`RULES` in the order one pass applies them; the driver
repeats passes until no rule changes the plan (or a pass limit is reached).
"""

from __future__ import annotations

from millstream.plan.rules.base import Rule, RuleContext
from millstream.plan.rules.join_order import JoinOrder
from millstream.plan.rules.pushdown import FilterIntoScan, ProjectionIntoScan
from millstream.plan.rules.reuse import ReuseSubplans

#: The rules of one optimizer pass, in order. Join ordering follows the filter pushdown
#: (its estimates see the filters where they run); rules that need the plan's final shape
#: (projection pruning into scans, then sharing what is still equal) come last.
RULES: tuple[Rule, ...] = (FilterIntoScan(), JoinOrder(), ProjectionIntoScan(),
                           ReuseSubplans())

__all__ = ["RULES", "Rule", "RuleContext"]
