"""Shipping user functions to workers: cloudpickle, keeping where the code came from.

cloudpickle (3.1) replaces the file name of every code object it ships by value with
``<dynamic-code>``, so a user function's traceback from a worker would not say which file
it is in. :func:`dumps` pickles as cloudpickle does but keeps each code object's real file
name, so the user's frames read ``File "job.py", line 7, in parse`` wherever they ran.
"""

from __future__ import annotations

import io
import types
from typing import Any

_DYNAMIC = "<dynamic-code>"
_PICKLER: list[type] = []


def _pickler() -> type:
    """cloudpickle's pickler whose code objects keep their ``co_filename`` (built on first
    use: cloudpickle is imported by jobs that ship functions, not by ``import millstream``)."""
    if _PICKLER:
        return _PICKLER[0]
    import cloudpickle

    base_code = cloudpickle.Pickler.dispatch_table[types.CodeType]

    def code(obj: types.CodeType) -> tuple:
        reduced = base_code(obj)
        constructor, args = reduced[0], reduced[1]
        args = tuple(obj.co_filename if a == _DYNAMIC else a for a in args)
        return (constructor, args, *reduced[2:])

    class Pickler(cloudpickle.Pickler):
        dispatch_table = dict(cloudpickle.Pickler.dispatch_table)

    Pickler.dispatch_table[types.CodeType] = code
    _PICKLER.append(Pickler)
    return Pickler


def dumps(obj: Any, protocol: int | None = None) -> bytes:
    """``cloudpickle.dumps(obj)``, with the real file names of the code it ships by value."""
    import cloudpickle

    buf = io.BytesIO()
    _pickler()(buf, protocol=protocol if protocol is not None else cloudpickle.DEFAULT_PROTOCOL
               ).dump(obj)
    return buf.getvalue()


def _codes(obj: Any, out: dict[str, list[types.CodeType]], seen: set[int], depth: int) -> None:
    """Code objects reachable from ``obj`` (functions, methods, callables, containers), by
    name, including nested functions and lambdas."""
    if id(obj) in seen or depth < 0:
        return
    seen.add(id(obj))
    if isinstance(obj, types.CodeType):
        out.setdefault(obj.co_name, []).append(obj)
        for const in obj.co_consts:
            if isinstance(const, types.CodeType):
                _codes(const, out, seen, depth)
        return
    if isinstance(obj, types.MethodType):
        _codes(obj.__func__, out, seen, depth)
        return
    if isinstance(obj, types.FunctionType):
        _codes(obj.__code__, out, seen, depth)
        module = obj.__module__
        for name in obj.__code__.co_names:  # helpers of the same module it calls
            value = obj.__globals__.get(name)
            if isinstance(value, (types.FunctionType, type)) and \
                    getattr(value, "__module__", None) == module:
                _codes(value, out, seen, depth - 1)
        for cell in obj.__closure__ or ():
            try:
                _codes(cell.cell_contents, out, seen, depth - 1)
            except ValueError:  # an empty cell
                pass
        return
    if isinstance(obj, type):
        for value in vars(obj).values():
            if isinstance(value, (types.FunctionType, staticmethod, classmethod)):
                _codes(getattr(value, "__func__", value), out, seen, depth)
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        for item in obj:
            _codes(item, out, seen, depth)
        return
    if isinstance(obj, dict):
        for item in obj.values():
            _codes(item, out, seen, depth)
        return
    if callable(obj) or hasattr(obj, "__dict__"):
        if getattr(type(obj), "__module__", "").startswith("millstream"):
            for value in vars(obj).values() if hasattr(obj, "__dict__") else ():
                _codes(value, out, seen, depth)
        else:
            _codes(type(obj), out, seen, depth)


def restore_code_locations(text: str, *sources: Any) -> str:
    """``text`` (a formatted traceback) with ``<dynamic-code>`` frames of functions found in
    ``sources`` (operators, functions) given their real file names and source lines."""
    if _DYNAMIC not in text:
        return text
    import linecache
    import re

    codes: dict[str, list[types.CodeType]] = {}
    seen: set[int] = set()
    for src in sources:
        _codes(src, codes, seen, 2)

    def fix(m: re.Match[str]) -> str:
        line, name = int(m.group(1)), m.group(2)
        for code in codes.get(name, ()):
            lines = [ln for _, _, ln in code.co_lines() if ln is not None]
            if lines and min(lines + [code.co_firstlineno]) <= line <= max(lines):
                src = linecache.getline(code.co_filename, line).strip()
                return (f'  File "{code.co_filename}", line {line}, in {name}\n'
                        + (f"    {src}\n" if src else ""))
        return m.group(0)

    return re.sub(r'  File "<dynamic-code>", line (\d+), in (\S+)\n', fix, text)


def unpicklable_part(obj: Any, depth: int = 3) -> str | None:
    """Why ``obj`` cannot be pickled, naming the innermost culprit: a function's captured
    variable or global (``captures 'lock' (a _thread.lock)``), an attribute, an item; None
    when it pickles."""
    try:
        dumps(obj)
        return None
    except Exception as exc:  # noqa: BLE001 - any pickling failure is what we explain
        reason = f"{type(exc).__name__}: {exc}"
    if depth > 0:
        if isinstance(obj, types.MethodType):
            return unpicklable_part(obj.__func__, depth)
        if isinstance(obj, types.FunctionType):
            parts: list[tuple[str, Any]] = []
            for name, cell in zip(obj.__code__.co_freevars, obj.__closure__ or ()):
                try:
                    parts.append((f"captures {name!r}", cell.cell_contents))
                except ValueError:
                    continue
            for name in obj.__code__.co_names:
                if name in obj.__globals__:
                    parts.append((f"uses the global {name!r}", obj.__globals__[name]))
            parts += [(f"has the default {i}", d) for i, d in enumerate(obj.__defaults__ or ())]
            for label, value in parts:
                inner = unpicklable_part(value, depth - 1)
                if inner is not None:
                    what = f"{label} (a {type(value).__module__}.{type(value).__qualname__})"
                    return what if inner.startswith(("PicklingError", "TypeError")) \
                        else f"{what}, which {inner}"
        elif isinstance(obj, dict):
            for key, value in obj.items():
                inner = unpicklable_part(value, depth - 1)
                if inner is not None:
                    return f"holds {key!r}: {inner}"
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                inner = unpicklable_part(value, depth - 1)
                if inner is not None:
                    return inner
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            for key, value in vars(obj).items():
                inner = unpicklable_part(value, depth - 1)
                if inner is not None:
                    return f"has the attribute {key!r} (a {type(value).__qualname__}), which " \
                           f"{inner}" if not inner.startswith(("PicklingError", "TypeError")) \
                        else f"has the attribute {key!r} (a {type(value).__qualname__})"
    return reason
