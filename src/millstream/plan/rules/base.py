"""What an optimizer rule is: a name and a rewrite of a logical plan, given a context.

Rules must return an *equivalent* plan (same rows; same order where the plan orders),
and the very same node object when they do not apply, so the driver can tell a fixed
point from a change by identity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from millstream.plan.logical import Node


@dataclass
class RuleContext:
    """What rules may consult: planner settings (e.g. the broadcast threshold) and facts
    gathered while optimizing (estimates), shared by the rules of one optimization."""

    settings: Any = None
    facts: dict[str, Any] = field(default_factory=dict)


class Rule:
    """One rewrite; ``name`` is what explain() lists when it fired."""

    name: str = "rule"

    def apply(self, node: Node, ctx: RuleContext) -> Node:
        """An equivalent plan of ``node``, or ``node`` itself when the rule does not apply."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<rule {self.name}>"
