"""Keeping pyarrow from importing pandas in a small job that does not need it.

pyarrow imports pandas (when installed) the first time it builds an array or a scalar, to
check whether its input is a pandas object; that import costs more than the whole of a
small job (``ms.range(10).count()``). While pandas is not imported no object can be a
pandas object, so Millstream's own plan checks and small jobs run in a :class:`blocking`
block, in which ``import pandas`` fails: pyarrow then notes "no pandas" and goes on. As soon
as anything imports pandas (outside such a block), pyarrow's pandas support is re-armed
(:func:`ensure` does it at once). Jobs call :func:`ensure` unless they run in the driver on
columns that convert to Python values the same without pandas (pyarrow makes nanosecond
timestamps and durations pandas ``Timestamp``/``Timedelta`` objects when it has pandas:
see :func:`type_needs_pandas`); tasks on workers always do. ``MILLSTREAM_EAGER_PANDAS=1``
turns all this off.

What remains different: in a process that never imports pandas, after such a block,
pyarrow's own ``as_py()`` of a nanosecond timestamp in the user's code gives a
``datetime`` rather than a pandas ``Timestamp``.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

_state = {"deferred": False}
_local = threading.local()


class _PandasGate:
    """``import pandas`` fails inside a :class:`blocking` block; the first import outside
    one loads pandas as the other finders find it, then re-arms pyarrow."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "pandas" or not _state["deferred"]:
            return None
        if getattr(_local, "depth", 0):
            raise ImportError("pandas is not imported in this Millstream job")
        _remove_gates()
        spec = None
        for finder in list(sys.meta_path):  # as the import system looks, without this gate
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                break
        if spec is not None and spec.loader is not None:
            spec.loader = _RearmLoader(spec.loader)
        return spec


class _RearmLoader:
    """pandas' own loader, followed by re-arming pyarrow's pandas support (the finder and
    loader protocols need no base class: ``importlib.abc`` alone costs 20 ms to import)."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        _rearm()


def _remove_gates() -> None:
    for finder in [f for f in sys.meta_path if isinstance(f, _PandasGate)]:
        try:
            sys.meta_path.remove(finder)
        except ValueError:
            pass


def _rearm() -> None:
    """pyarrow looks for pandas again (now imported, or importable) and uses it."""
    if not _state["deferred"]:
        return
    _state["deferred"] = False
    _remove_gates()
    import pyarrow.lib

    shim = getattr(pyarrow.lib, "_pandas_api", None)
    lock = getattr(shim, "_lock", None)
    if shim is None or (lock is not None and lock.locked()):
        return  # pyarrow is importing pandas itself right now: it takes it as it comes
    try:
        shim.pd  # noqa: B018 - pyarrow retries its pandas import (a no-op when it has it)
    except ImportError:
        pass  # not installed (or too old): as pyarrow's own first check would find


def defer() -> None:
    """Start deferring (``import millstream`` calls it); a no-op when pandas is imported
    already or with ``MILLSTREAM_EAGER_PANDAS=1``."""
    if "pandas" in sys.modules or os.environ.get("MILLSTREAM_EAGER_PANDAS") == "1":
        return
    if not _state["deferred"]:
        _state["deferred"] = True
        sys.meta_path.insert(0, _PandasGate())


class blocking:
    """A block of Millstream's own work in which pyarrow does not import pandas (a no-op
    once pandas is imported). ``blocking(False)`` lifts it for a nested block that runs
    user code, which may import pandas itself."""

    def __init__(self, on: bool = True) -> None:
        self.on = on

    def __enter__(self) -> None:
        self.before = getattr(_local, "depth", 0)
        _local.depth = self.before + 1 if self.on else 0

    def __exit__(self, *exc: object) -> None:
        _local.depth = self.before


def ensure() -> None:
    """pyarrow with its pandas support (pandas imported if installed), now."""
    if _state["deferred"]:
        _rearm()


def ensure_for_task() -> None:
    """A task starts: pyarrow gets its pandas support, except in a :class:`blocking` block
    (a small job run in the driver whose plan needs no pandas)."""
    if _state["deferred"] and not getattr(_local, "depth", 0):
        _rearm()


def type_needs_pandas(t: Any) -> bool:
    """Whether pyarrow converts values of Arrow type ``t`` to Python differently with pandas
    (nanosecond timestamps and durations, also inside lists, structs and maps)."""
    import pyarrow as pa

    if pa.types.is_timestamp(t) or pa.types.is_duration(t):
        return t.unit == "ns"
    if pa.types.is_struct(t):
        return any(type_needs_pandas(t.field(i).type) for i in range(t.num_fields))
    if pa.types.is_map(t):
        return type_needs_pandas(t.key_type) or type_needs_pandas(t.item_type)
    value_type = getattr(t, "value_type", None)
    return value_type is not None and type_needs_pandas(value_type)
