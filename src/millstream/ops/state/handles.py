"""Handles on the keyed state of the current key: ``ValueState``, ``ListState``, ``MapState``.

A handle holds a ``KeyedStateStore`` and a state name, and reads and writes the entry of
the store's current key (which the operator sets before calling user code), so a handle
taken once in ``open()`` follows the key of each element, as in Flink.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from millstream.ops.state.store import KeyedStateStore

#: What the store's raw accessors return for an entry that is not set.
MISSING = object()


class ValueState:
    """One value for the current key."""

    def __init__(self, store: KeyedStateStore, name: str, default: Any = None) -> None:
        self._store = store
        self.name = name
        self.default = default

    def value(self) -> Any:
        """The value, or (a copy of) the default when unset."""
        v = self._store._get(self.name)
        return copy.deepcopy(self.default) if v is MISSING else v

    get = value

    def update(self, value: Any) -> None:
        """Set the value (``None`` clears it)."""
        if value is None:
            self._store._del(self.name)
        else:
            self._store._set(self.name, value)

    set = update

    def clear(self) -> None:
        """Forget the value of the current key."""
        self._store._del(self.name)


class ListState:
    """A list of values for the current key."""

    def __init__(self, store: KeyedStateStore, name: str) -> None:
        self._store = store
        self.name = name

    def _list(self) -> list[Any]:
        return self._store._get(self.name, None) or []

    def get(self) -> list[Any]:
        """A copy of the list (empty when unset)."""
        return list(self._list())

    def __iter__(self) -> Iterator[Any]:
        return iter(self.get())

    def __len__(self) -> int:
        return len(self._list())

    def add(self, value: Any) -> None:
        """Append one value."""
        cur = self._store._get(self.name, None)
        if cur is None:
            self._store._set(self.name, [value])
        else:
            cur.append(value)

    def add_all(self, values: Iterable[Any]) -> None:
        """Append values."""
        values = list(values)
        if values:
            cur = self._store._get(self.name, None)
            if cur is None:
                self._store._set(self.name, values)
            else:
                cur.extend(values)

    def update(self, values: Iterable[Any]) -> None:
        """Replace the list (an empty one clears it)."""
        values = list(values)
        if values:
            self._store._set(self.name, values)
        else:
            self._store._del(self.name)

    def clear(self) -> None:
        """Forget the list of the current key."""
        self._store._del(self.name)


class MapState:
    """A dict for the current key."""

    def __init__(self, store: KeyedStateStore, name: str) -> None:
        self._store = store
        self.name = name

    def _map(self, create: bool = False) -> dict[Any, Any]:
        cur = self._store._get(self.name, None)
        if cur is None:
            cur = {}
            if create:
                self._store._set(self.name, cur)
        return cur

    def get(self, key: Any, default: Any = None) -> Any:
        """The value under ``key`` or ``default``."""
        return self._map().get(key, default)

    def put(self, key: Any, value: Any) -> None:
        """Set ``key`` to ``value``."""
        self._map(create=True)[key] = value

    def put_all(self, mapping: dict[Any, Any]) -> None:
        """Set several entries."""
        if mapping:
            self._map(create=True).update(mapping)

    def remove(self, key: Any) -> None:
        """Delete ``key`` (no error when absent)."""
        m = self._map()
        m.pop(key, None)
        if not m:
            self._store._del(self.name)

    def contains(self, key: Any) -> bool:
        """True when ``key`` is present."""
        return key in self._map()

    __contains__ = contains

    def keys(self) -> list[Any]:
        """The map's keys."""
        return list(self._map().keys())

    def values(self) -> list[Any]:
        """The map's values."""
        return list(self._map().values())

    def items(self) -> list[tuple[Any, Any]]:
        """The map's (key, value) pairs."""
        return list(self._map().items())

    def is_empty(self) -> bool:
        """True when the current key has no entries."""
        return not self._map()

    def __len__(self) -> int:
        return len(self._map())

    def __iter__(self) -> Iterator[Any]:
        return iter(self.keys())

    def clear(self) -> None:
        """Forget the map of the current key."""
        self._store._del(self.name)
