"""SQL expressions to Millstream expressions (``expr``): column references resolved in a
scope, literals typed as SQL types them, operators with SQL's coercions (a string
literal compared with a date is a date; a decimal literal beside a float is a float),
CASE, CAST, intervals, IN lists, LIKE, and the named functions of ``sql.functions``.

Aggregates, window functions and subqueries are handed to the caller's hooks: what an
aggregate or a subquery becomes depends on the query around it (``sql.select``).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from sqlglot import exp

from millstream.errors import SQLError
from millstream.expr.conditional import When
from millstream.expr.nodes import Column, Expr, Literal, _Func, lit
from millstream.expr.numeric import num
from millstream.expr.temporal import temporal
from millstream.expr.text import text
from millstream.plan.rules.exprs import fold
from millstream.sql import types as T
from millstream.sql.functions import extract, function
from millstream.sql.parse import Text, error_at
from millstream.sql.scope import NotFound, Scope

if TYPE_CHECKING:
    from millstream.sql.catalog import Catalog

#: aggregate functions by sqlglot class (their mapping is in ``sql.aggregates``)
AGGREGATE_CLASSES: tuple[type, ...] = (
    exp.AggFunc,
)


@dataclass
class Env:
    """What every expression of a statement shares: its text (for errors), the dialect,
    the catalog (for Python functions), the time the statement started (CURRENT_DATE)."""

    text: Text
    dialect: str
    catalog: Catalog
    now: _dt.datetime

    def error(self, message: str, node: exp.Expr | None = None) -> SQLError:
        return error_at(self.text, message, node)


def is_aggregate(node: exp.Expr, env: Env | None = None) -> bool:
    """True for an aggregate call (``sum(x)``, ``count(*) FILTER (...)``, a registered
    Python aggregate), not for one inside OVER (...)."""
    if isinstance(node, exp.Filter):
        return is_aggregate(node.this, env)
    if isinstance(node, (exp.IgnoreNulls, exp.RespectNulls)):
        return is_aggregate(node.this, env)
    if isinstance(node, exp.WithinGroup):
        return True
    if isinstance(node, exp.Grouping):  # which grouping set a row is of: not an aggregate
        return False
    if isinstance(node, exp.AggFunc):
        return not isinstance(node.parent, exp.Window) or node.parent.this is not node
    if isinstance(node, exp.Anonymous) and env is not None:
        fn = env.catalog.functions.get(node.name.lower())
        return fn is not None and fn.kind == "aggregate" and not isinstance(node.parent,
                                                                            exp.Window)
    return False


def contains_aggregate(node: exp.Expr, env: Env | None = None) -> bool:
    """True when ``node`` holds an aggregate of this query level (not in a subquery)."""
    for sub in walk_level(node):
        if is_aggregate(sub, env):
            return True
    return False


def walk_level(node: exp.Expr):
    """The nodes of ``node``'s tree, not descending into subqueries."""
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        for child in n.iter_expressions():
            if isinstance(child, (exp.Select, exp.Subquery, exp.SetOperation)) \
                    and child is not node:
                continue
            stack.append(child)


Hook = Callable[[exp.Expr], "Expr | None"]


class Translator:
    """Translates the expressions of one clause (see the module docstring).

    ``hook(node)`` is asked first for every node (aggregates and group keys after a
    GROUP BY); ``subquery(node)`` turns a subquery into an expression (joining what it
    needs into the relation); ``windows`` allows window functions (via ``window``).
    """

    def __init__(self, env: Env, scope: Scope, schema: pa.Schema | None, clause: str, *,
                 hook: Hook | None = None, subquery: Hook | None = None,
                 window: Hook | None = None, outer_columns: bool = False):
        self.env = env
        self.scope = scope
        self.schema = schema
        self.clause = clause
        self.hook = hook
        self.subquery = subquery
        self.window = window
        self.outer_columns = outer_columns  # columns of the scopes around may be read

    # ------------------------------------------------------------------ helpers
    def error(self, message: str, node: exp.Expr | None) -> SQLError:
        return self.env.error(message, node)

    def type_of(self, e: Expr) -> pa.DataType | None:
        if self.schema is None:
            return e.scalar.type if type(e) is Literal else None
        try:
            return e.output_type(self.schema)
        except Exception:  # noqa: BLE001 - unknown here: no coercion
            return None

    def literal_value(self, node: exp.Expr, what: str) -> Any:
        """The value of a constant argument (a pattern, a width ...)."""
        e = self.build(node)
        if type(e) is not Literal:
            folded = fold(e)
            if folded is None:
                raise self.error(f"{what} must be a constant", node)
            e = folded
        return e.value  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ entry
    def build(self, node: exp.Expr) -> Expr:
        """The Millstream expression of ``node``."""
        if self.hook is not None:
            hooked = self.hook(node)
            if hooked is not None:
                return hooked
        method = getattr(self, "_" + type(node).__name__, None)
        if method is not None:
            out = method(node)
            # sqlglot marks NOT LIKE, NOT BETWEEN ... with ``negate`` instead of a NOT
            return ~out if node.args.get("negate") is True else out
        if isinstance(node, exp.Window):
            if self.window is None:
                raise self.error(f"window functions are not allowed in {self.clause}", node)
            return self.window(node)
        if is_aggregate(node, self.env):
            raise self.error(f"aggregate function {_fname(node)}() is not allowed in "
                             f"{self.clause}", node)
        if isinstance(node, (exp.Subquery, exp.Exists, exp.Select)) or (
                isinstance(node, exp.In) and node.args.get("query") is not None):
            if self.subquery is None:
                raise self.error(f"a subquery is not allowed in {self.clause}", node)
            return self.subquery(node)
        if isinstance(node, exp.Func):
            return function(self, node)
        raise self.error(f"unsupported SQL construct {_construct(node)} in {self.clause}",
                         node)

    # ------------------------------------------------------------------ leaves
    def _Column(self, node: exp.Column) -> Expr:
        if isinstance(node.this, exp.Star):
            raise self.error("* is only allowed in the select list or count(*)", node)
        qualifier = node.table or None
        try:
            field, depth = self.scope.resolve(qualifier, node.name)
        except NotFound as exc:
            raise self.error(exc.message, node) from None
        if depth and not self.outer_columns:
            raise self.error(f"the correlated reference to {node.sql()} is not supported in "
                             f"{self.clause} (outer columns may appear in the subquery's "
                             f"WHERE conditions)", node)
        return Column(field.internal)

    def _Identifier(self, node: exp.Identifier) -> Expr:
        return self._Column(exp.Column(this=node))

    def _Literal(self, node: exp.Literal) -> Expr:
        if node.is_string:
            return Literal(node.this)
        try:
            return T.number_literal(node.this)
        except Exception:  # noqa: BLE001 - e.g. hexadecimal
            raise self.error(f"cannot read the number {node.this!r}", node) from None

    def _Boolean(self, node: exp.Boolean) -> Expr:
        return Literal(bool(node.this))

    def _Null(self, node: exp.Null) -> Expr:
        return Literal(None)

    def _Paren(self, node: exp.Paren) -> Expr:
        return self.build(node.this)

    def _Alias(self, node: exp.Alias) -> Expr:
        return self.build(node.this)

    def _Star(self, node: exp.Star) -> Expr:
        raise self.error("* is only allowed in the select list or count(*)", node)

    def _Placeholder(self, node: exp.Placeholder) -> Expr:
        raise self.error("query parameters (?) are not supported: put the values in the text",
                         node)

    # ------------------------------------------------------------------ operators
    def operands(self, node: exp.Expr) -> tuple[Expr, Expr]:
        a, b = self.build(node.this), self.build(node.expression)
        return self.coerce(a, b)

    def coerce(self, a: Expr, b: Expr) -> tuple[Expr, Expr]:
        """SQL's implicit casts between two operands: a string literal takes the other
        side's type (dates, times, numbers); a decimal literal beside a float is a float;
        a column-free side is folded to a literal."""
        a, b = _folded(a), _folded(b)
        ta, tb = self.type_of(a), self.type_of(b)
        return self._coerce_one(a, ta, tb), self._coerce_one(b, tb, ta)

    def _coerce_one(self, e: Expr, t: pa.DataType | None, other: pa.DataType | None) -> Expr:
        if type(e) is not Literal or t is None or other is None or t.equals(other):
            return e
        if pa.types.is_string(t) and not (pa.types.is_string(other)
                                          or pa.types.is_large_string(other)
                                          or pa.types.is_null(other)):
            cast = T.literal_cast(e, other)  # type: ignore[arg-type]
            return cast if cast is not None else e
        if pa.types.is_decimal(t) and pa.types.is_floating(other):
            return Literal(float(e.value))  # type: ignore[attr-defined]
        if pa.types.is_date(t) and pa.types.is_timestamp(other):
            cast = T.literal_cast(e, other)  # type: ignore[arg-type]
            return cast if cast is not None else e
        return e

    def _arith(self, op: str, node: exp.Expr) -> Expr:
        left, right = node.this, node.expression
        if op in ("add", "sub") and (_is_interval(left) or _is_interval(right)):
            return self._interval_arith(op, node)
        a, b = self.operands(node)
        if op == "sub":
            ta, tb = self.type_of(a), self.type_of(b)
            if ta is not None and tb is not None and pa.types.is_date(ta) \
                    and pa.types.is_date(tb):
                return temporal("diff", b, a, unit="day")  # date - date: days
        return _Func(op, (a, b))

    def _Add(self, node: exp.Add) -> Expr:
        return self._arith("add", node)

    def _Sub(self, node: exp.Sub) -> Expr:
        return self._arith("sub", node)

    def _Mul(self, node: exp.Mul) -> Expr:
        return self._arith("mul", node)

    def _Div(self, node: exp.Div) -> Expr:
        a, b = self.operands(node)
        if node.args.get("typed"):  # integer division of a dialect (e.g. Postgres' int / int)
            ta, tb = self.type_of(a), self.type_of(b)
            if ta is not None and tb is not None and pa.types.is_integer(ta) \
                    and pa.types.is_integer(tb):
                return num("intdiv", a, b)
        return _Func("truediv", (a, b))

    def _IntDiv(self, node: exp.IntDiv) -> Expr:
        a, b = self.operands(node)
        return num("intdiv", a, b)

    def _Mod(self, node: exp.Mod) -> Expr:
        a, b = self.operands(node)
        return num("mod", a, b)

    def _Neg(self, node: exp.Neg) -> Expr:
        inner = self.build(node.this)
        folded = fold(_Func("neg", (inner,)))
        return folded if folded is not None else _Func("neg", (inner,))

    def _DPipe(self, node: exp.DPipe) -> Expr:
        return _Func("str_concat", (self.build(node.this), self.build(node.expression)))

    def _compare(self, op: str, node: exp.Expr) -> Expr:
        if isinstance(node.expression, (exp.Any, exp.All)):
            raise self.error("comparisons with ANY/ALL (subquery) are not supported; use IN, "
                             "EXISTS or min()/max() in a scalar subquery", node.expression)
        a, b = self.operands(node)
        return _Func(op, (a, b))

    def _EQ(self, node: exp.EQ) -> Expr:
        return self._compare("eq", node)

    def _NEQ(self, node: exp.NEQ) -> Expr:
        return self._compare("ne", node)

    def _GT(self, node: exp.GT) -> Expr:
        return self._compare("gt", node)

    def _GTE(self, node: exp.GTE) -> Expr:
        return self._compare("ge", node)

    def _LT(self, node: exp.LT) -> Expr:
        return self._compare("lt", node)

    def _LTE(self, node: exp.LTE) -> Expr:
        return self._compare("le", node)

    def _NullSafeEQ(self, node: exp.NullSafeEQ) -> Expr:
        a, b = self.operands(node)
        return null_safe_eq(a, b)

    def _NullSafeNEQ(self, node: exp.NullSafeNEQ) -> Expr:
        a, b = self.operands(node)
        return ~null_safe_eq(a, b)

    def _And(self, node: exp.And) -> Expr:
        return self.build(node.this) & self.build(node.expression)

    def _Or(self, node: exp.Or) -> Expr:
        return self.build(node.this) | self.build(node.expression)

    def _Xor(self, node: exp.Xor) -> Expr:
        return self.build(node.this) ^ self.build(node.expression)

    def _Not(self, node: exp.Not) -> Expr:
        return ~self.build(node.this)

    def _Is(self, node: exp.Is) -> Expr:
        x = self.build(node.this)
        target = node.expression
        if isinstance(target, exp.Null):
            return x.is_null()
        if isinstance(target, exp.Boolean):
            return (x == Literal(bool(target.this))).fill_null(False)
        raise self.error(f"IS {target.sql()} is not supported", target)

    def _Between(self, node: exp.Between) -> Expr:
        x = self.build(node.this)
        lo, hi = self.build(node.args["low"]), self.build(node.args["high"])
        x1, lo = self.coerce(x, lo)
        x2, hi = self.coerce(x, hi)
        return (x1 >= lo) & (x2 <= hi)

    def _In(self, node: exp.In) -> Expr:
        if node.args.get("query") is not None:
            if self.subquery is None:
                raise self.error(f"a subquery is not allowed in {self.clause}", node)
            return self.subquery(node)
        if node.args.get("unnest") is not None or node.args.get("field") is not None:
            raise self.error("IN UNNEST(...) is not supported", node)
        x = self.build(node.this)
        items = [self.build(e) for e in node.expressions]
        items = [self.coerce(x, i)[1] for i in items]
        if items and all(type(i) is Literal for i in items):
            values = [i.value for i in items]  # type: ignore[attr-defined]
            if any(v is None for v in values):
                # x IN (..., NULL): true when it matches, else null (never false)
                hit = x.is_in([v for v in values if v is not None])
                return When(((hit, Literal(True)),), Literal(None, pa.bool_()))
            return x.is_in(values)
        out: Expr | None = None
        for i in items:
            term = x == i
            out = term if out is None else (out | term)
        return out if out is not None else Literal(False)

    def _Like(self, node: exp.Like) -> Expr:
        return self._like(node, ignore_case=False)

    def _ILike(self, node: exp.ILike) -> Expr:
        return self._like(node, ignore_case=True)

    def _like(self, node: exp.Expr, ignore_case: bool, escape: str | None = None) -> Expr:
        pattern = self.literal_value(node.expression, "a LIKE pattern")
        if not isinstance(pattern, str):
            raise self.error("a LIKE pattern must be a string", node.expression)
        if escape is not None and escape != "\\":
            pattern = _reescape(pattern, escape)
        return text("like", self.build(node.this), pattern=pattern, ignore_case=ignore_case)

    def _Escape(self, node: exp.Escape) -> Expr:
        esc = self.literal_value(node.expression, "an ESCAPE character")
        inner = node.this
        if not isinstance(inner, (exp.Like, exp.ILike)) or not isinstance(esc, str) \
                or len(esc) != 1:
            raise self.error("ESCAPE takes one character after LIKE or ILIKE", node)
        return self._like(inner, isinstance(inner, exp.ILike), esc)

    def _RegexpLike(self, node: exp.RegexpLike) -> Expr:
        pattern = self.literal_value(node.expression, "a regular expression")
        flag = node.args.get("flag")
        flags = self.literal_value(flag, "regexp flags") if flag is not None else ""
        return text("regexp_like", self.build(node.this), pattern=pattern,
                    ignore_case="i" in (flags or ""))

    def _RegexpILike(self, node: exp.Expr) -> Expr:
        pattern = self.literal_value(node.expression, "a regular expression")
        return text("regexp_like", self.build(node.this), pattern=pattern, ignore_case=True)

    def _SimilarTo(self, node: exp.SimilarTo) -> Expr:
        raise self.error("SIMILAR TO is not supported; use LIKE or regexp_matches()", node)

    # ------------------------------------------------------------------ conditionals
    def _Case(self, node: exp.Case) -> Expr:
        operand = node.this
        subject = self.build(operand) if operand is not None else None
        branches = []
        for branch in node.args.get("ifs") or []:
            cond_node, value_node = branch.this, branch.args["true"]
            if subject is not None:
                a, b = self.coerce(subject, self.build(cond_node))
                cond = a == b
            else:
                cond = self.build(cond_node)
            branches.append((cond, self.build(value_node)))
        default = node.args.get("default")
        return self._when(branches, self.build(default) if default is not None else None)

    def _when(self, branches: list[tuple[Expr, Expr]], default: Expr | None) -> Expr:
        values = [v for _, v in branches] + ([default] if default is not None else [])
        values = self._common_literals(values)
        n = len(branches)
        out = When(tuple((c, v) for (c, _), v in zip(branches, values[:n])),
                   values[n] if default is not None else None)
        return out

    def _common_literals(self, values: list[Expr]) -> list[Expr]:
        """Branch values of one type: decimal literals become floats beside floats,
        integer literals decimals beside decimals (Arrow's if_else takes one type)."""
        types = [self.type_of(v) for v in values]
        known = [t for t in types if t is not None and not pa.types.is_null(t)]
        if any(pa.types.is_floating(t) for t in known):
            return [Literal(float(v.value)) if type(v) is Literal and t is not None  # type: ignore[attr-defined]
                    and (pa.types.is_decimal(t) or pa.types.is_integer(t)) else v
                    for v, t in zip(values, types)]
        decs = [t for t in known if pa.types.is_decimal(t)]
        if decs:
            target = max(decs, key=lambda t: (t.scale, t.precision))
            out = []
            for v, t in zip(values, types):
                cast = None
                if type(v) is Literal and t is not None and (pa.types.is_integer(t)
                                                            or pa.types.is_decimal(t)):
                    cast = T.literal_cast(v, target)  # type: ignore[arg-type]
                out.append(cast if cast is not None else v)
            return out
        return values

    def _If(self, node: exp.If) -> Expr:
        cond = self.build(node.this)
        true = self.build(node.args["true"])
        false = node.args.get("false")
        return self._when([(cond, true)], self.build(false) if false is not None else None)

    def _Coalesce(self, node: exp.Coalesce) -> Expr:
        args = [self.build(node.this)] + [self.build(e) for e in node.expressions]
        args = self._common_literals(args)
        out = args[0]
        for a in args[1:]:
            out = out.fill_null(a)
        return out

    def _Nullif(self, node: exp.Nullif) -> Expr:
        a, b = self.operands(node)
        return When((((a != b).fill_null(True), a),))

    # ------------------------------------------------------------------ casts
    def _Cast(self, node: exp.Cast) -> Expr:
        return self._cast(node, try_=False)

    def _TryCast(self, node: exp.TryCast) -> Expr:
        raise self.error("TRY_CAST is not supported; use CAST", node)

    def _cast(self, node: exp.Cast, try_: bool) -> Expr:
        to = node.args["to"]
        if to.this == exp.DataType.Type.INTERVAL:
            raise self.error("CAST to INTERVAL is not supported; write INTERVAL '...' unit",
                             node)
        target = T.arrow_type(to)
        if target is None:
            raise self.error(f"unsupported type {to.sql()} in CAST", to)
        inner = self.build(node.this)
        if type(inner) is Literal:
            cast = T.literal_cast(inner, target)  # type: ignore[arg-type]
            if cast is None:
                raise self.error(f"cannot cast {node.this.sql()} to {to.sql()}", node)
            return cast
        source = self.type_of(inner)
        if pa.types.is_integer(target) and source is not None and (
                pa.types.is_floating(source) or pa.types.is_decimal(source)):
            return num("to_integer", inner, dtype=target)
        return inner.cast(target)

    # ------------------------------------------------------------------ time
    def interval(self, node: exp.Interval) -> T.Interval:
        """The value of an INTERVAL literal."""
        unit = node.args.get("unit")
        value = node.this
        try:
            if isinstance(unit, exp.IntervalSpan):
                raise ValueError("INTERVAL ... YEAR TO MONTH spans are not supported")
            unit_text = unit.name if unit is not None else None
            if isinstance(value, exp.Literal):
                return T.parse_interval_text(value.this, unit_text)
            if isinstance(value, exp.Neg) and isinstance(value.this, exp.Literal):
                return -T.parse_interval_text(value.this.this, unit_text)
        except ValueError as exc:
            raise self.error(str(exc), node) from None
        raise self.error("an INTERVAL's quantity must be a constant", node)

    def _Interval(self, node: exp.Interval) -> Expr:
        iv = self.interval(node)
        micros = iv.fixed_micros()
        if micros is None:
            raise self.error("an interval of months or years is only allowed added to or "
                             "subtracted from a date or timestamp", node)
        return Literal(_dt.timedelta(microseconds=micros), pa.duration("us"))

    def _interval_arith(self, op: str, node: exp.Expr) -> Expr:
        left, right = node.this, node.expression
        if _is_interval(left) and _is_interval(right):
            total = self.interval(left) + (self.interval(right) if op == "add"
                                            else -self.interval(right))
            micros = total.fixed_micros()
            if micros is None:
                raise self.error("a sum of month intervals is not a value", node)
            return Literal(_dt.timedelta(microseconds=micros), pa.duration("us"))
        if _is_interval(left):
            if op == "sub":
                raise self.error("an interval minus a date is not defined", node)
            left, right = right, left
        iv = self.interval(right)
        if op == "sub":
            iv = -iv
        return self.add_interval(self.build(left), iv)

    def add_interval(self, e: Expr, iv: T.Interval) -> Expr:
        """``e`` (a date or timestamp) plus an interval; folded when ``e`` is constant."""
        out = temporal("add_interval", e, months=iv.months, days=iv.days, micros=iv.micros)
        folded = fold(out)
        return folded if folded is not None else out

    def _DateAdd(self, node: exp.DateAdd) -> Expr:
        return self._date_shift(node, 1)

    def _DateSub(self, node: exp.DateSub) -> Expr:
        return self._date_shift(node, -1)

    def _date_shift(self, node: exp.Expr, sign: int) -> Expr:
        amount = node.expression
        if isinstance(amount, exp.Interval):
            iv = self.interval(amount)
        else:
            unit = node.args.get("unit")
            quantity = self.literal_value(amount, "the amount to add")
            try:
                iv = T.interval_of(quantity, unit.name if unit is not None else "day")
            except ValueError as exc:
                raise self.error(str(exc), node) from None
        return self.add_interval(self.build(node.this), iv if sign > 0 else -iv)

    def _CurrentDate(self, node: exp.Expr) -> Expr:
        return Literal(self.env.now.date())

    def _CurrentTimestamp(self, node: exp.Expr) -> Expr:
        return Literal(self.env.now)

    def _Extract(self, node: exp.Extract) -> Expr:
        field = T.unit_name(node.this.name)
        return extract(self, field, self.build(node.expression), node)

    def _TimestampTrunc(self, node: exp.Expr) -> Expr:
        return self._trunc(node)

    def _DateTrunc(self, node: exp.Expr) -> Expr:
        return self._trunc(node)

    def _trunc(self, node: exp.Expr) -> Expr:
        unit = T.unit_name(node.args["unit"].name)
        units = {"microsecond": "us", "millisecond": "ms", "second": "s", "minute": "m",
                 "hour": "h", "day": "d", "week": "w", "month": "mo", "quarter": "q",
                 "year": "y"}
        if unit not in units:
            raise self.error(f"date_trunc: unknown unit {unit!r}; known: {', '.join(units)}",
                             node)
        arrow_unit = {"us": "microsecond", "ms": "millisecond", "s": "second", "m": "minute",
                      "h": "hour", "d": "day", "w": "week", "mo": "month", "q": "quarter",
                      "y": "year"}[units[unit]]
        return _Func("dt_truncate", (self.build(node.this),),
                     {"every": units[unit], "multiple": 1, "unit": arrow_unit})


# ---------------------------------------------------------------------- helpers
def null_safe_eq(a: Expr, b: Expr) -> Expr:
    """``a IS NOT DISTINCT FROM b``: equal, or both null (never null itself)."""
    return When(((a.is_null() & b.is_null(), Literal(True)),
                 (a.is_null() | b.is_null(), Literal(False))), (a == b).fill_null(False))


def _folded(e: Expr) -> Expr:
    if type(e) is Literal or e.columns():
        return e
    f = fold(e)
    return f if f is not None else e


def _is_interval(node: exp.Expr) -> bool:
    while isinstance(node, exp.Paren):
        node = node.this
    return isinstance(node, exp.Interval)


def _reescape(pattern: str, escape: str) -> str:
    """A LIKE pattern with escape character ``escape`` rewritten for backslash escapes."""
    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == escape and i + 1 < len(pattern):
            out.append("\\" + pattern[i + 1])
            i += 2
            continue
        out.append("\\\\" if ch == "\\" else ch)
        i += 1
    return "".join(out)


def _fname(node: exp.Expr) -> str:
    while isinstance(node, (exp.Filter, exp.IgnoreNulls, exp.RespectNulls, exp.WithinGroup)):
        node = node.this
    if isinstance(node, exp.Anonymous):
        return node.name.lower()
    return node.sql_name().lower() if isinstance(node, exp.Func) else node.key


def _construct(node: exp.Expr) -> str:
    """How an unsupported node is named in a message."""
    if isinstance(node, exp.Func):
        return f"{_fname(node)}()"
    return f"{type(node).__name__} ({node.sql()[:40]})"


def literal(value: Any) -> Expr:
    """A literal expression (re-exported for the query translators)."""
    return lit(value)
