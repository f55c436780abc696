"""Common sub-expression elimination at evaluation time.

``sum(price * (1 - discount))`` and ``sum(price * (1 - discount) * (1 + tax))`` in one
aggregate share ``price * (1 - discount)``; evaluated one by one, it is computed twice.
Inside :func:`shared_subexpressions` an operation node that occurs more than once among
the given expressions (the same text, so the same operation on the same inputs) is
computed once per batch and its value reused. Only deterministic operations take part
(node classes that set ``shareable = True``: the registered operations of
``expr.nodes._Func``; Python UDFs are never shared).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

_state = threading.local()


class Memo:
    """The values of the repeated nodes for the batches evaluated in one context."""

    __slots__ = ("keys", "values")

    def __init__(self, keys: dict[int, str]) -> None:
        self.keys = keys  # id(node) -> its text, for the nodes that occur more than once
        self.values: dict[tuple[str, int, str], Any] = {}

    def get(self, node: Any, batch: Any, *forms: str) -> Any:
        """The value of ``node`` on ``batch`` in the first of ``forms`` computed, else None."""
        key = self.keys.get(id(node))
        if key is None:
            return None
        for form in forms:
            out = self.values.get((key, id(batch), form))
            if out is not None:
                return out
        return None

    def put(self, node: Any, batch: Any, form: str, value: Any) -> None:
        """Keep ``node``'s value (when it is a repeated node)."""
        key = self.keys.get(id(node))
        if key is not None:
            self.values[(key, id(batch), form)] = value


def active() -> Memo | None:
    """The memo of the enclosing :func:`shared_subexpressions`, or None."""
    return getattr(_state, "memo", None)


def _walk(e: Any, shareable: Any, out: list[tuple[Any, str]]) -> None:
    if shareable(e):
        out.append((e, repr(e)))
    children = getattr(e, "_children", None)
    for c in (children() if children is not None else ()):
        _walk(c, shareable, out)


def repeated_nodes(exprs: Iterable[Any], shareable: Any) -> dict[int, str]:
    """id -> text of the ``shareable`` nodes whose text occurs more than once."""
    nodes: list[tuple[Any, str]] = []
    for e in exprs:
        _walk(e, shareable, nodes)
    counts = Counter(text for _, text in nodes)
    return {id(n): text for n, text in nodes if counts[text] > 1}


@contextmanager
def shared_subexpressions(exprs: Iterable[Any]) -> Iterator[None]:
    """Within the block, evaluating ``exprs`` computes each repeated sub-expression once
    per batch. The expressions must stay alive (and unchanged) for the block."""
    keys = repeated_nodes(exprs, lambda e: getattr(type(e), "shareable", False))
    if not keys:
        yield
        return
    prev = active()
    _state.memo = Memo(keys)
    try:
        yield
    finally:
        _state.memo = prev
