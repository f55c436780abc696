"""The optimizer: the rules of :mod:`millstream.plan.rules`, applied to a fixed point.

``optimize(node)`` returns the optimized plan; :func:`optimize_traced` also returns the
names of the rules that changed it, in the order they fired (``explain()`` shows them).
``disabled`` leaves rules out by name (``"all"``: none run), which tests use to check that
results do not depend on the optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from millstream.errors import PlanError
from millstream.plan.logical import Node
from millstream.plan.rules import RULES, Rule, RuleContext

#: Passes over the rules before the driver gives up on reaching a fixed point.
MAX_PASSES = 10


def optimize_traced(node: Node, settings: Any = None, disabled: Iterable[str] = (),
                    rules: tuple[Rule, ...] | None = None) -> tuple[Node, list[str]]:
    """The optimized plan of ``node`` and the rules that fired (in order, repeats kept once
    per pass in which they changed the plan)."""
    node = node.transform_up(_checked_renames)
    off = set(disabled)
    pool = rules if rules is not None else RULES
    unknown = off - {r.name for r in pool} - {"all"}
    if unknown:
        raise PlanError(f"unknown optimizer rule(s) {sorted(unknown)}; the rules are "
                        f"{[r.name for r in pool]} (or 'all')")
    active = [r for r in pool if "all" not in off and r.name not in off]
    ctx = RuleContext(settings)
    fired: list[str] = []
    for _ in range(MAX_PASSES):
        changed = False
        for rule in active:
            new = rule.apply(node, ctx)
            if new is not node:
                fired.append(rule.name)
                node, changed = new, True
        if not changed:
            break
    return node, fired


def optimize(node: Node, settings: Any = None, disabled: Iterable[str] = ()) -> Node:
    """An equivalent plan of ``node``, optimized."""
    return optimize_traced(node, settings, disabled)[0]


def _checked_renames(node: Node) -> Node:
    """A strict drop or rename whose input columns are known was checked when it was built:
    it becomes lenient, so rules may prune the columns it names below it (a drop of a
    column no one reads any more). After a Python function it stays strict (checked when
    the rows come)."""
    from dataclasses import replace

    from millstream.plan.logical import Drop, Rename

    if isinstance(node, (Drop, Rename)) and node.strict and node.child.schema is not None:
        return replace(node, strict=False)
    return node
