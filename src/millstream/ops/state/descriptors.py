"""State descriptors: the name, kind ("value", "list" or "map") and default of keyed state.

A process function passes a descriptor to ``ctx.get_state`` (``KeyedStateStore.get_state``)
to get the handle of that kind (``ops.state.handles``).
"""

from __future__ import annotations

from typing import Any

from millstream.errors import PlanError


class StateDescriptor:
    """Names a piece of keyed state and its kind ("value", "list" or "map")."""

    kind = "value"

    def __init__(self, name: str, default: Any = None) -> None:
        if not isinstance(name, str) or not name:
            raise PlanError(f"state name must be a non-empty string, got {name!r}")
        self.name = name
        self.default = default

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class ValueStateDescriptor(StateDescriptor):
    """A single value per key (``default`` when unset)."""

    kind = "value"


class ListStateDescriptor(StateDescriptor):
    """A list of values per key."""

    kind = "list"

    def __init__(self, name: str) -> None:
        super().__init__(name)


class MapStateDescriptor(StateDescriptor):
    """A dict per key."""

    kind = "map"

    def __init__(self, name: str) -> None:
        super().__init__(name)
