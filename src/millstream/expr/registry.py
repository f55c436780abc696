"""The table of named scalar operations behind ``_Func`` expression nodes.

An expression stores an operation by name (so it pickles as plain data); the table says how
that name evaluates on Arrow data, translates to a ``pyarrow.compute.Expression`` and prints.
``expr.functions``, ``expr.strings`` and ``expr.datetime`` fill it in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow.compute as pc

from millstream.expr.types import Datum


class _Op:
    """How one named operation evaluates, translates to Arrow and prints."""

    __slots__ = ("arrow", "bool_args", "default", "eval", "kind", "pos", "sym")

    def __init__(self, kind: str, sym: str, eval: Callable[..., Datum],
                 arrow: Callable[..., pc.Expression | None] | None,
                 pos: tuple[str, ...], default: dict[str, Any], bool_args: bool):
        self.kind = kind  # "bin", "prefix" or "method"
        self.sym = sym  # the operator symbol, or the method path ("is_null", "str.lower")
        self.eval = eval
        self.arrow = arrow
        self.pos = pos  # parameters shown positionally in the repr
        self.default = default  # keyword parameters, shown only when not at their default
        self.bool_args = bool_args  # null-typed arguments are read as booleans


_OPS: dict[str, _Op] = {}


def _register(name: str, kind: str, sym: str, eval: Callable[..., Datum],
              arrow: Callable[..., pc.Expression | None] | None = None, *,
              pos: tuple[str, ...] = (), default: dict[str, Any] | None = None,
              bool_args: bool = False) -> None:
    """Add the operation called name to the table (the arguments are the fields of _Op)."""
    _OPS[name] = _Op(kind, sym, eval, arrow, pos, default or {}, bool_args)
