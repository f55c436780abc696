"""More string operations, with SQL's meaning, registered as ``str_*`` operations beside
those of ``expr.strings``: LIKE / ILIKE patterns, 1-based positions, padding that
truncates, regular-expression extraction, ``split_part``, ``concat_ws`` (nulls skipped),
repeat, reverse and title case.

Build them with :func:`text` (``text("like", col("s"), pattern="a%")``).
"""

from __future__ import annotations

import re
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from millstream.expr.registry import _OPS, _register
from millstream.expr.types import Datum, _broadcast


def _s(x: Datum) -> Datum:
    """A string datum (null-typed input as an all-null string)."""
    t = x.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return x
    return x.cast(pa.string())


_register("str_like", "method", "str.like",
          lambda v, p, n: pc.match_like(_s(v[0]), pattern=p["pattern"],
                                        ignore_case=p["ignore_case"]),
          lambda e, p: pc.match_like(e[0], pattern=p["pattern"], ignore_case=p["ignore_case"]),
          pos=("pattern",), default={"ignore_case": False})
_register("str_regexp_like", "method", "str.regexp_like",
          lambda v, p, n: pc.match_substring_regex(_s(v[0]), pattern=p["pattern"],
                                                   ignore_case=p["ignore_case"]),
          lambda e, p: pc.match_substring_regex(e[0], pattern=p["pattern"],
                                                ignore_case=p["ignore_case"]),
          pos=("pattern",), default={"ignore_case": False})


def _find(v: list[Datum], p: dict[str, Any], n: int) -> Datum:
    """1-based position of the first occurrence (0 when absent)."""
    return pc.add(pc.find_substring(_s(v[0]), pattern=p["pattern"]), 1).cast(pa.int64())


_register("str_position", "method", "str.position", _find, pos=("pattern",))


def _pad(v: list[Datum], p: dict[str, Any], n: int) -> Datum:
    """SQL's lpad/rpad: pad to ``width`` characters with ``fill``, or cut to ``width``."""
    x, width, fill = _s(v[0]), p["width"], p["fill"]
    if width <= 0:
        return pc.if_else(pc.is_valid(x), "", pa.scalar(None, pa.string()))
    cut = pc.utf8_slice_codeunits(x, start=0, stop=width)
    if not fill:
        return cut
    if len(fill) == 1:
        fn = pc.utf8_lpad if p["side"] == "left" else pc.utf8_rpad
        return fn(cut, width=width, padding=fill)
    values = _broadcast(cut, n).to_pylist()
    out = []
    for s in values:
        if s is None:
            out.append(None)
            continue
        need = width - len(s)
        pad = (fill * (need // len(fill) + 1))[:need]
        out.append(pad + s if p["side"] == "left" else s + pad)
    return pa.array(out, pa.string())


_register("str_pad", "method", "str.pad", _pad, pos=("width", "fill"),
          default={"side": "left"})
_register("str_reverse", "method", "str.reverse", lambda v, p, n: pc.utf8_reverse(_s(v[0])),
          lambda e, p: pc.utf8_reverse(e[0]))
_register("str_title", "method", "str.title", lambda v, p, n: pc.utf8_title(_s(v[0])),
          lambda e, p: pc.utf8_title(e[0]))
_register("str_repeat", "method", "str.repeat",
          lambda v, p, n: pc.binary_repeat(_s(v[0]), pc.max_element_wise(v[1], 0)))


def _regexp_extract(v: list[Datum], p: dict[str, Any], n: int) -> Datum:
    """The ``group``-th group of the first match of ``pattern`` ('' when it does not
    match; DuckDB's regexp_extract)."""
    rx = re.compile(p["pattern"])
    group = p["group"]
    out = []
    for s in _broadcast(_s(v[0]), n).to_pylist():
        if s is None:
            out.append(None)
            continue
        m = rx.search(s)
        out.append("" if m is None else (m.group(group) or ""))
    return pa.array(out, pa.string())


_register("str_regexp_extract", "method", "str.regexp_extract", _regexp_extract,
          pos=("pattern",), default={"group": 0})


def _split_part(v: list[Datum], p: dict[str, Any], n: int) -> Datum:
    """The ``index``-th (1-based; negative from the end) part of the string split on
    ``sep`` ('' when there is no such part)."""
    sep, index = p["sep"], p["index"]
    out = []
    for s in _broadcast(_s(v[0]), n).to_pylist():
        if s is None:
            out.append(None)
            continue
        parts = s.split(sep) if sep else [s]
        i = index - 1 if index > 0 else len(parts) + index
        out.append(parts[i] if index != 0 and 0 <= i < len(parts) else "")
    return pa.array(out, pa.string())


_register("str_split_part", "method", "str.split_part", _split_part, pos=("sep", "index"))


def _concat_ws(v: list[Datum], p: dict[str, Any], n: int) -> Datum:
    """The non-null arguments joined by ``sep`` (null when every argument is null)."""
    args = [_s(x) for x in v]
    joined = pc.binary_join_element_wise(*args, p["sep"], null_handling="skip")
    if not args:
        return joined
    any_valid = pc.is_valid(args[0])
    for a in args[1:]:
        any_valid = pc.or_(any_valid, pc.is_valid(a))
    return pc.if_else(any_valid, joined, pa.scalar(None, pa.string()))


_register("str_concat_ws", "method", "str.concat_ws", _concat_ws, pos=("sep",))


def text(name: str, *args: Any, **params: Any) -> Any:
    """The string operation ``str_<name>`` on ``args`` (expressions or values)."""
    from millstream.expr.nodes import _Func, _lit_or_expr

    op = f"str_{name}"
    return _Func(op, tuple(_lit_or_expr(a) for a in args), {**_OPS[op].default, **params})
