"""Named SQL functions (scalar): strings, math, dates, conditionals, and the Python
functions registered with ``ms.register_function``, mapped onto Millstream expressions.

:func:`function` translates a call; sqlglot gives most functions their own node class
(``exp.Upper``), and unknown names arrive as ``exp.Anonymous`` (looked up by name in the
registered Python functions, then in :data:`BY_NAME`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import pyarrow as pa
from sqlglot import exp

from millstream.expr.nodes import Expr, Literal, _Func
from millstream.expr.numeric import num
from millstream.expr.temporal import temporal
from millstream.expr.text import text
from millstream.expr.udf import PythonFunction
from millstream.sql import types as T
from millstream.sql.scope import closest

if TYPE_CHECKING:
    from millstream.sql.exprs import Translator

Builder = Callable[["Translator", exp.Expr], Expr]


def _arg(tr: Translator, node: exp.Expr, key: str = "this") -> Expr:
    value = node.args.get(key)
    if value is None:
        raise tr.error(f"{node.sql_name().lower()}() is missing an argument", node)
    return tr.build(value)


def _args(node: exp.Expr) -> list[exp.Expr]:
    """A call's arguments in order (``this``, then ``expression``/``expressions``)."""
    out = []
    if isinstance(node.args.get("this"), exp.Expr):
        out.append(node.this)
    for key in ("expression",):
        if isinstance(node.args.get(key), exp.Expr):
            out.append(node.args[key])
    out.extend(node.expressions)
    return out


def _const(tr: Translator, node: exp.Expr | None, what: str, default=None):
    if node is None:
        return default
    return tr.literal_value(node, what)


# ---------------------------------------------------------------------- strings
def _length(tr: Translator, node: exp.Expr) -> Expr:
    return _arg(tr, node).str.len()


def _trim(tr: Translator, node: exp.Expr) -> Expr:
    chars = _const(tr, node.args.get("expression"), "the characters to trim")
    position = (node.args.get("position") or "BOTH").upper()
    x = _arg(tr, node)
    if position == "LEADING":
        return x.str.lstrip(chars)
    if position == "TRAILING":
        return x.str.rstrip(chars)
    return x.str.strip(chars)


def _substring(tr: Translator, node: exp.Expr) -> Expr:
    start = _const(tr, node.args.get("start"), "substring's start", 1)
    length = _const(tr, node.args.get("length"), "substring's length")
    x = _arg(tr, node)
    if not isinstance(start, int) or (length is not None and not isinstance(length, int)):
        raise tr.error("substring() takes whole-number start and length", node)
    if start > 0:
        return x.str.slice(start - 1, length)
    if start == 0:  # SQL counts position 0 as one before the first character
        return x.str.slice(0, None if length is None else max(0, length - 1))
    return x.str.slice(start, length)


def _left(tr: Translator, node: exp.Expr) -> Expr:
    n = _const(tr, node.expression, "left()'s length")
    x = _arg(tr, node)
    if n >= 0:
        return x.str.slice(0, n)
    return _Func("str_slice", (x,), {"start": 0, "stop": n, "length": None})


def _right(tr: Translator, node: exp.Expr) -> Expr:
    n = _const(tr, node.expression, "right()'s length")
    x = _arg(tr, node)
    if n == 0:
        return x.str.slice(0, 0)
    if n > 0:
        return _Func("str_slice", (x,), {"start": -n, "stop": None, "length": None})
    return x.str.slice(-n)  # right(s, -k): all but the first k characters


def _concat(tr: Translator, node: exp.Expr) -> Expr:
    parts = [tr.build(e) for e in node.expressions]
    if not parts:
        return Literal("")
    # CONCAT skips nulls (DuckDB, Postgres); || does not
    return text("concat_ws", *parts, sep="")


def _concat_ws(tr: Translator, node: exp.Expr) -> Expr:
    args = node.expressions
    sep = _const(tr, args[0], "concat_ws()'s separator")
    return text("concat_ws", *[tr.build(e) for e in args[1:]], sep=sep)


def _replace(tr: Translator, node: exp.Expr) -> Expr:
    old = _const(tr, node.expression, "replace()'s pattern")
    new = _const(tr, node.args.get("replacement"), "replace()'s replacement", "")
    return _arg(tr, node).str.replace(old, new)


def _position(tr: Translator, node: exp.Expr) -> Expr:
    sub = _const(tr, node.args.get("substr"), "the string to find")
    if node.args.get("position") is not None:
        raise tr.error("position()/strpos() with a start position is not supported", node)
    return text("position", _arg(tr, node), pattern=sub)


def _pad(tr: Translator, node: exp.Expr) -> Expr:
    width = _const(tr, node.expression, "the padded width")
    fill = _const(tr, node.args.get("fill_pattern"), "the padding", " ")
    side = "left" if node.args.get("is_left") else "right"
    return text("pad", _arg(tr, node), width=int(width), fill=fill, side=side)


def _split_part(tr: Translator, node: exp.Expr) -> Expr:
    sep = _const(tr, node.args.get("delimiter"), "split_part()'s delimiter")
    index = _const(tr, node.args.get("part_index"), "split_part()'s index")
    return text("split_part", _arg(tr, node), sep=sep, index=int(index))


def _regexp_replace(tr: Translator, node: exp.Expr) -> Expr:
    pattern = _const(tr, node.expression, "the regular expression")
    repl = _const(tr, node.args.get("replacement"), "the replacement", "")
    modifiers = _const(tr, node.args.get("modifiers"), "the regexp flags", "") or ""
    global_ = "g" in modifiers or not node.args.get("single_replace")
    if "i" in modifiers:
        pattern = "(?i)" + pattern
    repl = repl.replace("$", "\\") if isinstance(repl, str) else repl
    return _arg(tr, node).str.replace(pattern, repl, regex=True, n=None if global_ else 1)


def _regexp_extract(tr: Translator, node: exp.Expr) -> Expr:
    pattern = _const(tr, node.expression, "the regular expression")
    group = _const(tr, node.args.get("group"), "the group", 0)
    return text("regexp_extract", _arg(tr, node), pattern=pattern, group=int(group))


def _regexp_matches(tr: Translator, node: exp.Expr) -> Expr:
    args = _args(node)
    pattern = _const(tr, args[1], "the regular expression")
    flags = _const(tr, args[2], "the regexp flags", "") if len(args) > 2 else ""
    return text("regexp_like", tr.build(args[0]), pattern=pattern,
                ignore_case="i" in (flags or ""))


def _starts_with(tr: Translator, node: exp.Expr) -> Expr:
    return _arg(tr, node).str.starts_with(_const(tr, node.expression, "the prefix"))


def _ends_with(tr: Translator, node: exp.Expr) -> Expr:
    return _arg(tr, node).str.ends_with(_const(tr, node.expression, "the suffix"))


def _contains(tr: Translator, node: exp.Expr) -> Expr:
    return _arg(tr, node).str.contains(_const(tr, node.expression, "the string to find"))


def _repeat(tr: Translator, node: exp.Expr) -> Expr:
    return text("repeat", _arg(tr, node), tr.build(node.args["times"]))


# ---------------------------------------------------------------------- math
def _round(tr: Translator, node: exp.Expr) -> Expr:
    digits = _const(tr, node.args.get("decimals"), "round()'s digits", 0)
    return num("round", _arg(tr, node), ndigits=int(digits))


def _log(tr: Translator, node: exp.Expr) -> Expr:
    if node.args.get("expression") is None:  # log(x): base 10 in DuckDB and Postgres
        return num("log10", _arg(tr, node))
    return num("log", _arg(tr, node), tr.build(node.expression))


def _unary(name: str) -> Builder:
    return lambda tr, node: num(name, _arg(tr, node))


def _pow(tr: Translator, node: exp.Expr) -> Expr:
    return _Func("pow", (_arg(tr, node), tr.build(node.expression)))


def _extreme(name: str) -> Builder:
    def build(tr: Translator, node: exp.Expr) -> Expr:
        args = [tr.build(e) for e in _args(node)]
        return num(name, *args)

    return build


def _abs(tr: Translator, node: exp.Expr) -> Expr:
    return _arg(tr, node).abs()


# ---------------------------------------------------------------------- dates
def extract(tr: Translator, field: str, value: Expr, node: exp.Expr) -> Expr:
    """EXTRACT(field FROM value)."""
    aliases = {"dayofweek": "dow", "weekday": "dow", "dayofyear": "doy", "yearday": "doy",
               "weekofyear": "week", "milliseconds": "millisecond",
               "microseconds": "microsecond", "isoweek": "week"}
    field = aliases.get(field, field)
    known = ("year", "quarter", "month", "week", "day", "dow", "isodow", "doy", "hour",
             "minute", "second", "millisecond", "microsecond", "epoch", "isoyear")
    if field not in known:
        raise tr.error(f"EXTRACT: unknown field {field!r}; known: {', '.join(known)}", node)
    return temporal("extract", value, field=field)



def _field(field: str) -> Builder:
    return lambda tr, node: extract(tr, field, _arg(tr, node), node)


def _date_diff(tr: Translator, node: exp.Expr) -> Expr:
    unit = T.unit_name((node.args.get("unit") or exp.var("day")).name)
    known = ("year", "quarter", "month", "week", "day", "hour", "minute", "second",
             "millisecond", "microsecond")
    if unit not in known:
        raise tr.error(f"date_diff: unknown unit {unit!r}; known: {', '.join(known)}", node)
    return temporal("diff", tr.build(node.expression), _arg(tr, node), unit=unit)


def _date_part(tr: Translator, node: exp.Expr) -> Expr:
    args = _args(node)
    if len(args) != 2:
        raise tr.error("date_part(field, value) takes two arguments", node)
    field = _const(tr, args[0], "date_part()'s field")
    return extract(tr, T.unit_name(str(field)), tr.build(args[1]), node)


def _time_to_str(tr: Translator, node: exp.Expr) -> Expr:
    fmt = _const(tr, node.args.get("format"), "the format")

    def strftime(arr: pa.Array) -> pa.Array:
        import pyarrow.compute as pc

        return pc.strftime(arr, format=fmt)

    return PythonFunction("strftime", strftime, (_arg(tr, node),), pa.string(), vectorized=True)


def _pi(tr: Translator, node: exp.Expr) -> Expr:
    return Literal(math.pi)


def _udf(tr: Translator, node: exp.Expr) -> Expr | None:
    fn = tr.env.catalog.functions.get(node.name.lower())
    if fn is None:
        return None
    if fn.kind == "aggregate":
        raise tr.error(f"aggregate function {fn.name}() is not allowed in {tr.clause}", node)
    args = tuple(tr.build(e) for e in node.expressions)
    return PythonFunction(fn.name, fn.fn, args, fn.return_type, fn.vectorized)


#: builders by sqlglot node class name
BY_CLASS: dict[str, Builder] = {
    "Length": _length, "Upper": lambda tr, n: _arg(tr, n).str.upper(),
    "Lower": lambda tr, n: _arg(tr, n).str.lower(), "Trim": _trim,
    "Substring": _substring, "Left": _left, "Right": _right, "Concat": _concat,
    "ConcatWs": _concat_ws, "Replace": _replace, "StrPosition": _position, "Pad": _pad,
    "Reverse": lambda tr, n: text("reverse", _arg(tr, n)),
    "Initcap": lambda tr, n: text("title", _arg(tr, n)), "SplitPart": _split_part,
    "RegexpReplace": _regexp_replace, "RegexpExtract": _regexp_extract,
    "StartsWith": _starts_with, "EndsWith": _ends_with, "Contains": _contains,
    "Repeat": _repeat, "Abs": _abs, "Round": _round, "Ceil": _unary("ceil"),
    "Floor": _unary("floor"), "Sqrt": _unary("sqrt"), "Cbrt": _unary("cbrt"),
    "Ln": _unary("ln"), "Log": _log, "Log2": _unary("log2"), "Log10": _unary("log10"),
    "Exp": _unary("exp"), "Pow": _pow, "Sign": _unary("sign"),
    "Greatest": _extreme("greatest"), "Least": _extreme("least"), "Pi": _pi,
    "Sin": _unary("sin"), "Cos": _unary("cos"), "Tan": _unary("tan"),
    "Asin": _unary("asin"), "Acos": _unary("acos"), "Atan": _unary("atan"),
    "Atan2": lambda tr, n: num("atan2", _arg(tr, n), tr.build(n.expression)),
    "Degrees": _unary("degrees"), "Radians": _unary("radians"),
    "Year": _field("year"), "Month": _field("month"), "Day": _field("day"),
    "Quarter": _field("quarter"), "DayOfWeek": _field("dow"),
    "DayOfWeekIso": _field("isodow"), "DayOfYear": _field("doy"),
    "WeekOfYear": _field("week"), "Week": _field("week"), "Hour": _field("hour"),
    "Minute": _field("minute"), "Second": _field("second"), "DateDiff": _date_diff,
    "TimeToStr": _time_to_str, "RegexpLike": _regexp_matches,
    "Trunc": _unary("trunc"),
}

#: builders of functions sqlglot does not know (by lower-case name)
BY_NAME: dict[str, Builder] = {
    "regexp_matches": _regexp_matches, "date_part": _date_part, "datepart": _date_part,
    "now": lambda tr, n: Literal(tr.env.now),
    "ceiling": _unary("ceil"), "truncate": _unary("trunc"),
}


def function(tr: Translator, node: exp.Func) -> Expr:
    """The expression of a function call ``node`` (SQLError naming an unknown function)."""
    if isinstance(node, exp.Anonymous):
        out = _udf(tr, node)
        if out is not None:
            return out
        builder = BY_NAME.get(node.name.lower())
        if builder is None:
            raise tr.error(_unknown_function(tr, node.name), node)
        return builder(tr, node)
    builder = BY_CLASS.get(type(node).__name__)
    if builder is None:
        raise tr.error(f"the function {node.sql_name().lower()}() is not supported", node)
    return builder(tr, node)


def _unknown_function(tr: Translator, name: str) -> str:
    known = sorted({*(k.lower() for k in BY_NAME),
                    *tr.env.catalog.functions})
    near = closest(name, known)
    hint = f" (did you mean {near}()?)" if near else ""
    return (f"unknown function {name}(){hint}; register a Python function with "
            f"ms.register_function({name.lower()!r}, fn, return_type=...)")
