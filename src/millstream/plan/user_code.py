"""Whether a plan node runs the user's code (functions, generators, UDFs) or only the
engine's.

Small jobs of the engine's own operators keep pyarrow from importing pandas
(``core.lazy_pandas``); a user's function may import and use pandas, so plans with one run
as usual.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

from millstream.expr.nodes import Expr
from millstream.expr.udf import PythonFunction

_FUNCTIONS = (types.FunctionType, types.MethodType, types.BuiltinFunctionType, type)


def has_user_code(value: Any, skip: type, depth: int = 0,
                  seen: dict[int, bool] | None = None) -> bool:
    """Whether ``value`` (a node's field) holds a callable, a UDF expression or an object
    that may call one; values of type ``skip`` (child nodes, judged on their own) do not
    count. Unknown objects count as user code.

    Each expression is judged once (``seen``, by id): an expression's arguments are both its
    children and a field of it, and visiting them twice per level took time exponential in
    the depth (TPC-H Q19's filter: 32,000 visits and about 0.3 s per plan)."""
    if depth > 20 or value is None or isinstance(value, (str, bytes, int, float, bool, skip)):
        return False
    if isinstance(value, (PythonFunction, *_FUNCTIONS)):
        return True
    if seen is None:
        seen = {}
    if isinstance(value, Expr):
        hit = seen.get(id(value))
        if hit is not None:
            return hit
        seen[id(value)] = False  # (a cycle, if one existed, would not count)
        fields = [v for v in getattr(value, "__dict__", {}).values() if not isinstance(v, Expr)]
        found = any(has_user_code(c, skip, depth + 1, seen) for c in value._children()) or \
            any(has_user_code(v, skip, depth + 1, seen) for v in fields)
        seen[id(value)] = found
        return found
    if isinstance(value, (list, tuple, set, frozenset)):
        return any(has_user_code(v, skip, depth + 1, seen) for v in value)
    if isinstance(value, dict):
        return any(has_user_code(v, skip, depth + 1, seen) for v in value.values())
    if dataclasses.is_dataclass(value):
        return any(has_user_code(getattr(value, f.name), skip, depth + 1, seen)
                   for f in dataclasses.fields(value))
    return callable(value)


def fields_have_user_code(node: Any, skip: type) -> bool:
    """Whether a (dataclass) plan node's own fields hold user code (see :func:`has_user_code`)."""
    return any(has_user_code(getattr(node, f.name), skip) for f in dataclasses.fields(node))
