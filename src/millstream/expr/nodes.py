"""The expression tree: the :class:`Expr` base with its operators and methods, the nodes
:class:`Column`, :class:`Literal`, :class:`Alias`, ``_Func`` (a registered operation
applied to arguments) and :class:`AggExpr` (an aggregate over the rows of a group), and the
constructors :func:`col`, :func:`lit` and :func:`to_expr`.

The aggregate constructors (``ms.sum``, ``ms.std`` ...) are in ``expr.agg_functions``.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from millstream.core.arrow import empty_batch
from millstream.core.lazy_pandas import blocking
from millstream.errors import PlanError, SchemaError
from millstream.expr import decimals, fixed_point, subexpr
from millstream.expr import functions as _functions  # noqa: F401 - registers the operations
from millstream.expr.aggregates import AGG_FUNCS, SUPPORTED, check_params, params_text
from millstream.expr.datetime import _DtNamespace
from millstream.expr.registry import _OPS
from millstream.expr.strings import _StrNamespace
from millstream.expr.types import _NULL_BOOL, Datum, _broadcast, _fmt, _null_to_bool, _q, parse_type

#: operations whose integer literals take a decimal type next to a decimal operand
_DECIMAL_AWARE = frozenset({"add", "sub", "mul", "eq", "ne", "lt", "le", "gt", "ge"})
#: operations computed on unscaled int64 values through a tree of them (expr.fixed_point)
_FIXED_OPS = frozenset({"add", "sub", "mul"})


class Expr:
    """A column expression: a lazily evaluated, picklable tree compiled to pyarrow.compute.

    The aggregate methods (``col("x").sum()``, ``col("x").std()`` ...) make :class:`AggExpr`
    nodes, computed by ``group_by(...).agg(...)`` and ``window(...).agg(...)``.
    """

    # Make numpy scalars on the left (np.int64(1) + col("a")) defer to our reflected operators.
    __array_ufunc__ = None

    # ---- the interface the engine relies on

    def evaluate(self, batch: pa.RecordBatch) -> pa.Array:
        """Evaluate on a record batch; always returns an array of length batch.num_rows."""
        return _broadcast(self._eval(batch), batch.num_rows)

    @property
    def output_name(self) -> str:
        """Alias if set, a column's name, a function's first column input name, else "literal"."""
        name = self._name_hint()
        return "literal" if name is None else name

    def columns(self) -> set[str]:
        """Names of all columns this expression reads."""
        out: set[str] = set()
        for child in self._children():
            out |= child.columns()
        return out

    def to_arrow(self, schema: pa.Schema | None = None) -> pc.Expression | None:
        """The same expression as a pyarrow.compute.Expression, or None when it cannot be
        expressed. With the input's ``schema``, literals are typed as the evaluation types
        them (an integer against a decimal column becomes a narrow decimal: Arrow's own
        binding of such a comparison fails in scans), and decimal arithmetic that must be
        capped is left out (None)."""
        return None

    def output_type(self, schema: pa.Schema) -> pa.DataType:
        """The Arrow type this expression produces on input of the given schema."""
        return self.evaluate(empty_batch(schema)).type

    # ---- internals, overridden by subclasses

    def _eval(self, batch: pa.RecordBatch) -> Datum:
        raise NotImplementedError

    def _name_hint(self) -> str | None:
        for child in self._children():
            name = child._name_hint()
            if name is not None:
                return name
        return None

    def _children(self) -> tuple[Expr, ...]:
        return ()

    def _apply(self, op: str, /, *args: Any, **params: Any) -> Expr:
        """The registered operation op on this expression and args (plain values become literals)."""
        return _Func(op, (self, *(_lit_or_expr(a) for a in args)), params)

    # ---- Python protocol

    __hash__ = object.__hash__

    def __bool__(self) -> bool:
        raise TypeError(
            "the truth value of an Expr is ambiguous: use & | ~ instead of and/or/not, "
            "and .between(lo, hi) or .is_in([...]) instead of chained comparisons"
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"

    # ---- naming and casting

    def alias(self, name: str) -> Expr:
        """Rename the output of this expression."""
        if not isinstance(name, builtins.str):
            raise PlanError(f"alias name must be a str, got {name!r}")
        return Alias(self, name)

    def cast(self, dtype: pa.DataType | str | type) -> Expr:
        """Cast to another type (pa.DataType or a name such as "int64", "string", "timestamp[us]")."""
        return _Func("cast", (self,), {"dtype": parse_type(dtype)})

    # ---- null handling and membership

    def is_null(self) -> Expr:
        """True where the value is null (NaN is not null)."""
        return _Func("is_null", (self,))

    def is_not_null(self) -> Expr:
        """True where the value is not null."""
        return _Func("is_not_null", (self,))

    def fill_null(self, value: Any) -> Expr:
        """Replace nulls with a value (a literal, or an Expr)."""
        return _Func("fill_null", (self, _lit_or_expr(value)))

    def is_in(self, values: Iterable[Any]) -> Expr:
        """True where the value is one of ``values``; null input gives null."""
        if isinstance(values, (builtins.str, bytes)):
            raise PlanError("is_in expects a collection of values, not a single string")
        if isinstance(values, (pa.Array, pa.ChunkedArray)):
            vals = values.to_pylist()
        else:
            vals = list(values)
        if builtins.any(isinstance(v, Expr) for v in vals):
            raise PlanError("is_in accepts literal values only, not expressions")
        return _Func("is_in", (self,), {"values": vals})

    def between(self, lower: Any, upper: Any) -> Expr:
        """True where lower <= value <= upper (both ends inclusive)."""
        return (self >= lower) & (self <= upper)

    # ---- numeric

    def abs(self) -> Expr:
        """Absolute value."""
        return _Func("abs", (self,))

    def round(self, ndigits: int = 0) -> Expr:
        """Round to ndigits decimals, halves to even (like Python's round)."""
        return _Func("round", (self,), {"ndigits": int(ndigits)})

    # ---- operators

    def __add__(self, other: Any) -> Expr:
        return _Func("add", (self, _lit_or_expr(other)))

    def __radd__(self, other: Any) -> Expr:
        return _Func("add", (_lit_or_expr(other), self))

    def __sub__(self, other: Any) -> Expr:
        return _Func("sub", (self, _lit_or_expr(other)))

    def __rsub__(self, other: Any) -> Expr:
        return _Func("sub", (_lit_or_expr(other), self))

    def __mul__(self, other: Any) -> Expr:
        return _Func("mul", (self, _lit_or_expr(other)))

    def __rmul__(self, other: Any) -> Expr:
        return _Func("mul", (_lit_or_expr(other), self))

    def __truediv__(self, other: Any) -> Expr:
        return _Func("truediv", (self, _lit_or_expr(other)))

    def __rtruediv__(self, other: Any) -> Expr:
        return _Func("truediv", (_lit_or_expr(other), self))

    def __floordiv__(self, other: Any) -> Expr:
        return _Func("floordiv", (self, _lit_or_expr(other)))

    def __rfloordiv__(self, other: Any) -> Expr:
        return _Func("floordiv", (_lit_or_expr(other), self))

    def __mod__(self, other: Any) -> Expr:
        return _Func("mod", (self, _lit_or_expr(other)))

    def __rmod__(self, other: Any) -> Expr:
        return _Func("mod", (_lit_or_expr(other), self))

    def __pow__(self, other: Any) -> Expr:
        return _Func("pow", (self, _lit_or_expr(other)))

    def __rpow__(self, other: Any) -> Expr:
        return _Func("pow", (_lit_or_expr(other), self))

    def __neg__(self) -> Expr:
        return _Func("neg", (self,))

    def __pos__(self) -> Expr:
        return self

    def __abs__(self) -> Expr:
        return self.abs()

    def __eq__(self, other: Any) -> Expr:  # type: ignore[override]
        return _Func("eq", (self, _lit_or_expr(other)))

    def __ne__(self, other: Any) -> Expr:  # type: ignore[override]
        return _Func("ne", (self, _lit_or_expr(other)))

    def __lt__(self, other: Any) -> Expr:
        return _Func("lt", (self, _lit_or_expr(other)))

    def __le__(self, other: Any) -> Expr:
        return _Func("le", (self, _lit_or_expr(other)))

    def __gt__(self, other: Any) -> Expr:
        return _Func("gt", (self, _lit_or_expr(other)))

    def __ge__(self, other: Any) -> Expr:
        return _Func("ge", (self, _lit_or_expr(other)))

    def __and__(self, other: Any) -> Expr:
        return _Func("and", (self, _lit_or_expr(other)))

    def __rand__(self, other: Any) -> Expr:
        return _Func("and", (_lit_or_expr(other), self))

    def __or__(self, other: Any) -> Expr:
        return _Func("or", (self, _lit_or_expr(other)))

    def __ror__(self, other: Any) -> Expr:
        return _Func("or", (_lit_or_expr(other), self))

    def __xor__(self, other: Any) -> Expr:
        return _Func("xor", (self, _lit_or_expr(other)))

    def __rxor__(self, other: Any) -> Expr:
        return _Func("xor", (_lit_or_expr(other), self))

    def __invert__(self) -> Expr:
        return _Func("not", (self,))

    # ---- aggregates (descriptors: group_by(...).agg(...) computes them)

    def sum(self) -> AggExpr:
        """Sum of non-null values."""
        return AggExpr("sum", self)

    def mean(self) -> AggExpr:
        """Mean of non-null values."""
        return AggExpr("mean", self)

    def min(self) -> AggExpr:
        """Smallest non-null value."""
        return AggExpr("min", self)

    def max(self) -> AggExpr:
        """Largest non-null value."""
        return AggExpr("max", self)

    def count(self) -> AggExpr:
        """Number of non-null values."""
        return AggExpr("count", self)

    def count_distinct(self) -> AggExpr:
        """Number of distinct non-null values."""
        return AggExpr("count_distinct", self)

    def first(self) -> AggExpr:
        """First non-null value of the group."""
        return AggExpr("first", self)

    def last(self) -> AggExpr:
        """Last non-null value of the group (in arrival order)."""
        return AggExpr("last", self)

    def collect_list(self) -> AggExpr:
        """All values of the group as a list."""
        return AggExpr("collect_list", self)

    def any_value(self) -> AggExpr:
        """Some non-null value of the group (null only when all are null); the cheapest pick."""
        return AggExpr("any_value", self)

    def std(self, ddof: int = 1) -> AggExpr:
        """Standard deviation of non-null values (sample with ddof=1, population with ddof=0)."""
        return AggExpr("std", self, params={"ddof": ddof})

    def var(self, ddof: int = 1) -> AggExpr:
        """Variance of non-null values (sample with ddof=1, population with ddof=0)."""
        return AggExpr("var", self, params={"ddof": ddof})

    def median(self) -> AggExpr:
        """Exact median of non-null values, interpolated (``quantile(0.5)``)."""
        return AggExpr("median", self)

    def quantile(self, q: float, interpolation: str = "linear") -> AggExpr:
        """Exact q-quantile of non-null values; ``interpolation="linear"`` is DuckDB's
        ``quantile_cont``, "discrete" its ``quantile_disc`` (SQL's ``percentile_disc``);
        also numpy's "lower", "higher", "midpoint", "nearest"."""
        return AggExpr("quantile", self, params={"q": q, "interpolation": interpolation})

    def approx_count_distinct(self) -> AggExpr:
        """Estimated number of distinct non-null values (HyperLogLog, about 1.6% error)."""
        return AggExpr("approx_count_distinct", self)

    def approx_quantile(self, q: float) -> AggExpr:
        """Estimated q-quantile of non-null values (a t-digest; rank error about 0.5%)."""
        return AggExpr("approx_quantile", self, params={"q": q})

    # ---- namespaces (defined last so the names do not shadow builtins in this class body)

    @property
    def str(self) -> _StrNamespace:
        """String functions."""
        return _StrNamespace(self)

    @property
    def dt(self) -> _DtNamespace:
        """Date and time functions."""
        return _DtNamespace(self)


class Column(Expr):
    """A reference to an input column by name."""

    def __init__(self, name: str):
        if not isinstance(name, builtins.str):
            raise PlanError(f"column name must be a str, got {name!r}")
        self.name = name

    def _eval(self, batch: pa.RecordBatch) -> Datum:
        idx = batch.schema.get_field_index(self.name)
        if idx < 0:
            names = batch.schema.names
            if names.count(self.name) > 1:
                raise SchemaError(f"column {self.name!r} is ambiguous: the input has it {names.count(self.name)} times")
            raise SchemaError(f"column {self.name!r} not found; available columns: {names}")
        return batch.column(idx)

    def _name_hint(self) -> str | None:
        return self.name

    def columns(self) -> set[str]:
        """Names of all columns this expression reads."""
        return {self.name}

    def to_arrow(self, schema: pa.Schema | None = None) -> pc.Expression | None:
        """The same expression as a pyarrow.compute.Expression."""
        return pc.field(self.name)

    def __repr__(self) -> str:
        return f"col({_q(self.name)})"


class Literal(Expr):
    """A constant value, broadcast to the length of the batch."""

    def __init__(self, value: Any, dtype: pa.DataType | str | type | None = None):
        self.dtype = None if dtype is None else parse_type(dtype)
        if isinstance(value, pa.Scalar):
            scalar = value.cast(self.dtype) if self.dtype is not None else value
        else:
            try:
                with blocking():  # no pandas object without pandas imported
                    scalar = pa.scalar(value, type=self.dtype)
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as e:
                raise PlanError(f"cannot make an Arrow literal of {value!r}: {e}") from e
        self.scalar: pa.Scalar = scalar

    @property
    def value(self) -> Any:
        """The literal as a Python value."""
        return self.scalar.as_py()

    def _eval(self, batch: pa.RecordBatch) -> Datum:
        return self.scalar

    def to_arrow(self, schema: pa.Schema | None = None) -> pc.Expression | None:
        """The same expression as a pyarrow.compute.Expression."""
        return pc.scalar(self.scalar)

    def __repr__(self) -> str:
        try:
            shown = _fmt(self.scalar.as_py())
        except Exception:  # some scalars have no Python value
            shown = _q(builtins.str(self.scalar))
        if self.dtype is not None:
            return f"lit({shown}, {_fmt(self.dtype)})"
        return f"lit({shown})"


class Alias(Expr):
    """An expression with a new output name."""

    def __init__(self, child: Expr, name: str):
        self.child = child
        self.name = name

    def _eval(self, batch: pa.RecordBatch) -> Datum:
        return self.child._eval(batch)

    def _name_hint(self) -> str | None:
        return self.name

    def _children(self) -> tuple[Expr, ...]:
        return (self.child,)

    def to_arrow(self, schema: pa.Schema | None = None) -> pc.Expression | None:
        """The same expression as a pyarrow.compute.Expression (names do not matter there)."""
        return self.child.to_arrow(schema)

    def __repr__(self) -> str:
        return f"{self.child!r}.alias({_q(self.name)})"


class _Func(Expr):
    """A named operation applied to argument expressions, with plain-data parameters."""

    shareable = True  # computed once per batch where it repeats (expr.subexpr)

    def __init__(self, op: str, args: tuple[Expr, ...], params: dict[str, Any] | None = None):
        if op not in _OPS:
            raise PlanError(f"unknown expression operation {op!r}")
        self.op = op
        self.args = tuple(args)
        self.params = dict(params or {})

    def _children(self) -> tuple[Expr, ...]:
        return self.args

    def _eval(self, batch: pa.RecordBatch) -> Datum:
        memo = subexpr.active()
        out = memo.get(self, batch, "arrow") if memo is not None else None
        if out is None:
            if self.op in _FIXED_OPS:
                out = fixed_point.to_datum(self._eval_fixed(batch))
            else:
                out = self._compute([a._eval(batch) for a in self.args], batch)
            if memo is not None:
                memo.put(self, batch, "arrow", out)
        return out

    def _eval_fixed(self, batch: pa.RecordBatch) -> Datum | fixed_point.Fixed:
        """Decimal add/sub/mul kept in int64 (``expr.fixed_point``) through a tree of
        them; a plain datum when an operand is not a decimal or the result might not fit."""
        memo = subexpr.active()
        out = memo.get(self, batch, "fixed", "arrow") if memo is not None else None
        if out is None:
            vals = [a._eval_fixed(batch) if isinstance(a, _Func) and a.op in _FIXED_OPS
                    else a._eval(batch) for a in self.args]
            out = fixed_point.combine(self.op, vals)
            if out is None:
                out = self._compute([fixed_point.to_datum(v) for v in vals], batch)
            if memo is not None:
                memo.put(self, batch, "fixed" if isinstance(out, fixed_point.Fixed) else "arrow", out)
        return out

    def _compute(self, vals: list[Datum], batch: pa.RecordBatch) -> Datum:
        spec = _OPS[self.op]
        if self.op.startswith("str_"):
            # a column that is None in every row has Arrow's null type: treat it as strings
            vals = [v.cast(pa.string()) if pa.types.is_null(v.type) else v for v in vals]
        if spec.bool_args:
            vals = [_null_to_bool(v) for v in vals]
        try:
            return spec.eval(vals, self.params, batch.num_rows)
        except (pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
            types = ", ".join(builtins.str(v.type) for v in vals)
            raise SchemaError(f"cannot evaluate {self!r} on input types ({types}): {e}") from e

    def to_arrow(self, schema: pa.Schema | None = None) -> pc.Expression | None:
        """The same expression as a pyarrow.compute.Expression, or None when it cannot be
        expressed (see :meth:`Expr.to_arrow` for ``schema``)."""
        spec = _OPS[self.op]
        if spec.arrow is None:
            return None
        typed: dict[int, pa.Scalar] = {}
        if schema is not None and self.op in _DECIMAL_AWARE:
            try:
                types = [a.output_type(schema) for a in self.args]
            except (PlanError, SchemaError, pa.ArrowException):
                return None
            if builtins.any(pa.types.is_decimal(t) for t in types):
                if self.op in ("add", "sub", "mul") and builtins.all(
                        pa.types.is_decimal(t) or pa.types.is_integer(t) for t in types) \
                        and decimals.needs_cap(self.op, *types):
                    return None  # Arrow would overflow the precision; we round and cap
                for i, a in enumerate(self.args):
                    if isinstance(a, Literal) and pa.types.is_integer(a.scalar.type):
                        typed[i] = decimals.as_decimal(a.scalar)
        params = self.params
        if schema is not None and self.op == "is_in":
            try:
                params = {**params, "value_type": self.args[0].output_type(schema)}
            except (PlanError, SchemaError, pa.ArrowException):
                return None
        args = []
        for i, a in enumerate(self.args):
            if spec.bool_args and isinstance(a, Literal) and pa.types.is_null(a.scalar.type):
                args.append(pc.scalar(_NULL_BOOL))
                continue
            e = pc.scalar(typed[i]) if i in typed else a.to_arrow(schema)
            if e is None:
                return None
            args.append(e)
        return spec.arrow(args, params)

    def __repr__(self) -> str:
        spec = _OPS[self.op]
        if spec.kind == "bin":
            return f"({self.args[0]!r} {spec.sym} {self.args[1]!r})"
        if spec.kind == "prefix":
            return f"{spec.sym}{self.args[0]!r}"
        parts = [repr(a) for a in self.args[1:]]
        parts += [_fmt(self.params[k]) for k in spec.pos]
        parts += [f"{k}={_fmt(self.params[k])}" for k, d in spec.default.items()
                  if k in self.params and self.params[k] != d]
        return f"{self.args[0]!r}.{spec.sym}({', '.join(parts)})"


def _lit_or_expr(x: Any) -> Expr:
    """An Expr stays itself; anything else (str included) becomes a literal."""
    return x if isinstance(x, Expr) else Literal(x)


# ---- constructors


def col(name: str) -> Expr:
    """A reference to the column called name."""
    return Column(name)


def lit(value: Any, dtype: pa.DataType | str | type | None = None) -> Expr:
    """A literal value (optionally of the given type), broadcast to every row."""
    return Literal(value, dtype)


def to_expr(x: Any) -> Expr:
    """An Expr as is, a str as a column reference, anything else as a literal."""
    if isinstance(x, Expr):
        return x
    if isinstance(x, builtins.str):
        return Column(x)
    return Literal(x)



#: builds ``AggExpr.over``'s window expression; ``expr.analytic`` (which sits above this
#: module) registers it when the package loads
_window_constructor: Any = None


def register_window_constructor(fn: Any) -> None:
    """Called by ``expr.analytic``: ``fn(agg, partition_by, order_by, **options)``."""
    global _window_constructor
    _window_constructor = fn


class AggExpr(Expr):
    """An aggregate over the rows of a group: ``func`` applied to ``arg`` (None for count(*)),
    with the function's parameters and an output name.

    ``group_by(...).agg(...)`` and ``window(...).agg(...)`` compute it; there it may also be
    part of a larger expression (``(ms.sum("a") / ms.sum("b")).alias("ratio")``), which is
    computed from the aggregates' results. Evaluated on rows, it raises PlanError.
    """

    def __init__(self, func: str, arg: Expr | None, name: str | None = None,
                 params: dict[str, Any] | None = None):
        if func not in AGG_FUNCS:
            raise PlanError(f"unknown aggregate {func!r}; expected one of {list(SUPPORTED)}")
        if (arg is None) != (func == "count_all"):
            raise PlanError("count_all takes no argument; every other aggregate takes one")
        if arg is not None and not isinstance(arg, Expr):
            raise PlanError(f"aggregate argument must be an Expr, got {arg!r}")
        if arg is not None and contains_aggregate(arg):
            raise PlanError(f"{func}(): the argument {arg!r} is itself an aggregate; "
                            "aggregates do not nest")
        self.func = func
        self.arg = arg
        self.params = check_params(func, params)
        self.name = name if name is not None else self.default_name

    @property
    def default_name(self) -> str:
        """The name used without alias: the input's output_name, or "count" for count_all."""
        return "count" if self.arg is None else self.arg.output_name

    def alias(self, name: str) -> AggExpr:
        """The same aggregate with another output name."""
        if not isinstance(name, builtins.str):
            raise PlanError(f"alias name must be a str, got {name!r}")
        return AggExpr(self.func, self.arg, name, self.params)

    def columns(self) -> set[str]:
        """Names of the columns the aggregate reads."""
        return set() if self.arg is None else self.arg.columns()

    def key(self) -> tuple[Any, ...]:
        """What makes two aggregates compute the same values (the output name aside)."""
        return (self.func, repr(self.arg), tuple(sorted(self.params.items())))

    def _name_hint(self) -> str | None:
        return self.name

    def _eval(self, batch: pa.RecordBatch) -> Datum:
        raise PlanError(f"{self!r} is an aggregate: compute it with group_by(...).agg(...) or "
                        "window(...).agg(...), or over a window of rows with .over(...)")

    def over(self, partition_by: Any = None, order_by: Any = None, **options: Any) -> Expr:
        """This aggregate over a window of rows around each row (SQL's ``OVER (...)``):
        ``ms.sum("v").over(partition_by="k", order_by="t", frame=ms.rows(-2, 0))``; see
        :mod:`millstream.expr.analytic`."""
        if _window_constructor is None:  # pragma: no cover - the package loads it
            raise PlanError("window functions are not loaded: import millstream.expr.analytic")
        return _window_constructor(self, partition_by, order_by, **options)

    def __repr__(self) -> str:
        if self.arg is None:
            s = "count()"
        else:
            s = f"{self.arg!r}.{self.func}({params_text(self.func, self.params)})"
        if self.name != self.default_name:
            s += f".alias({_q(self.name)})"
        return s


def contains_aggregate(e: Expr) -> bool:
    """True when the expression has an aggregate (an :class:`AggExpr`) anywhere in it."""
    if isinstance(e, AggExpr):
        return True
    return builtins.any(contains_aggregate(c) for c in e._children())


def conjuncts(e: Expr) -> list[Expr]:
    """The parts of a conjunction ``a & b & ...`` (``[e]`` when ``e`` is no AND)."""
    if getattr(e, "op", None) == "and":
        return [p for a in e.args for p in conjuncts(a)]  # type: ignore[attr-defined]
    return [e]
