"""Column expressions compiled to ``pyarrow.compute``.

Build expressions with :func:`col`, :func:`lit`, operators and methods, e.g.
``(col("price") * col("qty")).alias("total")`` or ``col("name").str.lower()``, then
evaluate them on a record batch with :meth:`Expr.evaluate`, or translate them into a
``pyarrow.compute.Expression`` with :meth:`Expr.to_arrow` for filter pushdown.

Conventions:

- Nulls follow SQL/Arrow: arithmetic and comparisons with null give null; ``&`` and
  ``|`` use Kleene logic; ``when`` treats a null condition as false.
- Inside operators and methods a plain Python value is a literal (``col("s") == "x"``
  compares with the string ``"x"``); pass ``col(...)`` to refer to a column. Only
  :func:`to_expr`, :func:`when`'s condition and the aggregate constructors read a
  ``str`` as a column name.
- Every expression is an immutable tree of plain objects that pickles with ``pickle``
  and ``cloudpickle``; operations are stored by name, never as functions.
"""

from __future__ import annotations

import builtins
import datetime
import re
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from millstream.core.arrow import empty_batch
from millstream.errors import PlanError, SchemaError

__all__ = [
    "AggExpr",
    "Expr",
    "When",
    "avg",
    "col",
    "collect_list",
    "count",
    "count_distinct",
    "first",
    "lit",
    "max",
    "mean",
    "min",
    "parse_type",
    "sum",
    "to_expr",
    "when",
]

Datum = pa.Array | pa.Scalar

_NULL_BOOL = pa.nulls(1, pa.bool_())[0]  # (pa.scalar would import pandas)
_F64 = pa.float64()


# --------------------------------------------------------------------------- types

_TYPE_ALIASES: dict[str, pa.DataType] = {
    "int": pa.int64(),
    "integer": pa.int64(),
    "long": pa.int64(),
    "float": pa.float64(),
    "double": pa.float64(),
    "str": pa.string(),
    "string": pa.string(),
    "utf8": pa.string(),
    "large_str": pa.large_string(),
    "bool": pa.bool_(),
    "boolean": pa.bool_(),
    "bytes": pa.binary(),
    "binary": pa.binary(),
    "date": pa.date32(),
    "datetime": pa.timestamp("us"),
    "timestamp": pa.timestamp("us"),
}

_PY_TYPES: dict[type, pa.DataType] = {
    int: pa.int64(),
    float: pa.float64(),
    str: pa.string(),
    bool: pa.bool_(),
    bytes: pa.binary(),
    datetime.date: pa.date32(),
    datetime.datetime: pa.timestamp("us"),
    datetime.timedelta: pa.duration("us"),
}

_TS_RE = re.compile(r"^timestamp\[(s|ms|us|ns)(?:,\s*tz=([^\]]+))?\]$")
_DEC_RE = re.compile(r"^decimal(128|256)?\(\s*(\d+)\s*,\s*(-?\d+)\s*\)$")
_DUR_RE = re.compile(r"^duration\[(s|ms|us|ns)\]$")


def parse_type(t: pa.DataType | str | type) -> pa.DataType:
    """Turn a pa.DataType, a type name ("int64", "timestamp[us, tz=UTC]", ...) or a Python type into a pa.DataType."""
    if isinstance(t, pa.DataType):
        return t
    if isinstance(t, type) and t in _PY_TYPES:
        return _PY_TYPES[t]
    if isinstance(t, builtins.str):
        s = t.strip()
        key = s.lower()
        if key in _TYPE_ALIASES:
            return _TYPE_ALIASES[key]
        m = _TS_RE.match(key)
        if m:
            tz = s[s.index("tz=") + 3 : -1].strip() if m.group(2) else None
            return pa.timestamp(m.group(1), tz=tz)
        m = _DEC_RE.match(key)
        if m:
            make = pa.decimal256 if m.group(1) == "256" else pa.decimal128
            return make(int(m.group(2)), int(m.group(3)))
        m = _DUR_RE.match(key)
        if m:
            return pa.duration(m.group(1))
        try:
            return pa.type_for_alias(key)
        except (ValueError, KeyError):
            pass
    raise PlanError(
        f"unknown data type {t!r}; use a pyarrow DataType or a name such as "
        f"'int64', 'float64', 'string', 'bool', 'date32', 'timestamp[us]'"
    )


# --------------------------------------------------------------------------- helpers


def _q(s: str) -> str:
    """Quote a string with double quotes for reprs."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _fmt(v: Any) -> str:
    """Render a parameter value for a repr."""
    if isinstance(v, builtins.str):
        return _q(v)
    if isinstance(v, pa.DataType):
        return _q(builtins.str(v))
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, tuple):
        return "(" + ", ".join(_fmt(x) for x in v) + ("," if len(v) == 1 else "") + ")"
    return repr(v)


def _broadcast(x: Datum, n: int) -> pa.Array:
    """Return x as an array of length n (scalars are repeated)."""
    if isinstance(x, pa.ChunkedArray):
        return x.combine_chunks()
    if isinstance(x, pa.Scalar):
        return pa.repeat(x, n)
    return x


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def _to_float(x: Datum) -> Datum:
    """Cast integer, decimal and null data to float64; leave floats and other types alone."""
    t = x.type
    if pa.types.is_integer(t) or pa.types.is_decimal(t) or pa.types.is_null(t):
        return x.cast(_F64)
    return x


def _to_f64(x: Datum) -> Datum:
    """Cast numeric and null data to float64; leave other types alone."""
    t = x.type
    if t != _F64 and (_is_numeric(t) or pa.types.is_null(t)):
        return x.cast(_F64)
    return x


def _null_to_bool(x: Datum) -> Datum:
    """Give a null-typed datum the boolean type, so the logical kernels accept it."""
    return x.cast(pa.bool_()) if pa.types.is_null(x.type) else x




# --------------------------------------------------------------------------- Expr


class Expr:
    """A column expression: a lazily evaluated, picklable tree compiled to pyarrow.compute."""

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

    def to_arrow(self) -> pc.Expression | None:
        """The same expression as a pyarrow.compute.Expression, or None when it cannot be expressed."""
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

    # ---- aggregations (descriptors; the engine computes them)

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
        """First value of the group."""
        return AggExpr("first", self)

    def collect_list(self) -> AggExpr:
        """All values of the group as a list."""
        return AggExpr("collect_list", self)

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

    def to_arrow(self) -> pc.Expression | None:
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

    def to_arrow(self) -> pc.Expression | None:
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

    def to_arrow(self) -> pc.Expression | None:
        """The same expression as a pyarrow.compute.Expression (names do not matter there)."""
        return self.child.to_arrow()

    def __repr__(self) -> str:
        return f"{self.child!r}.alias({_q(self.name)})"


# --------------------------------------------------------------------------- operations


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
    _OPS[name] = _Op(kind, sym, eval, arrow, pos, default or {}, bool_args)


class _Func(Expr):
    """A named operation applied to argument expressions, with plain-data parameters."""

    def __init__(self, op: str, args: tuple[Expr, ...], params: dict[str, Any] | None = None):
        if op not in _OPS:
            raise PlanError(f"unknown expression operation {op!r}")
        self.op = op
        self.args = tuple(args)
        self.params = dict(params or {})

    def _children(self) -> tuple[Expr, ...]:
        return self.args

    def _eval(self, batch: pa.RecordBatch) -> Datum:
        spec = _OPS[self.op]
        vals = [a._eval(batch) for a in self.args]
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

    def to_arrow(self) -> pc.Expression | None:
        """The same expression as a pyarrow.compute.Expression, or None when it cannot be expressed."""
        spec = _OPS[self.op]
        if spec.arrow is None:
            return None
        args = []
        for a in self.args:
            if spec.bool_args and isinstance(a, Literal) and pa.types.is_null(a.scalar.type):
                args.append(pc.scalar(_NULL_BOOL))
                continue
            e = a.to_arrow()
            if e is None:
                return None
            args.append(e)
        return spec.arrow(args, self.params)

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


# ---- arithmetic


def _py_divmod(kind: str, a: Datum, b: Datum, n: int) -> Datum:
    """Floor division or modulo with Python semantics; integer division by zero gives null."""
    t = pc.subtract(pa.array([], a.type), pa.array([], b.type)).type
    if pa.types.is_null(t):
        return pa.nulls(n)
    is_int = pa.types.is_integer(t)
    if not (is_int or pa.types.is_floating(t)):
        raise pa.ArrowNotImplementedError(f"'{kind}' supports integer and floating types, not {t}")
    a = _broadcast(a.cast(t), n)
    b = _broadcast(b.cast(t), n)
    valid = pc.and_(pc.is_valid(a), pc.is_valid(b))
    bv = pc.fill_null(b, 1).to_numpy(zero_copy_only=False)
    if is_int:
        zero = bv == 0
        if zero.any():
            valid = pc.and_(valid, pa.array(~zero))
            bv = np.where(zero, 1, bv)
    av = pc.fill_null(a, 0).to_numpy(zero_copy_only=False)
    with np.errstate(all="ignore"):
        out = np.floor_divide(av, bv) if kind == "floordiv" else np.remainder(av, bv)
    mask = None if pc.all(valid).as_py() is not False else pc.invert(valid).to_numpy(
        zero_copy_only=False)
    return pa.array(out, type=t, mask=mask)


_register("add", "bin", "+", lambda v, p, n: pc.add_checked(v[0], v[1]),
          lambda e, p: pc.add_checked(e[0], e[1]))
_register("sub", "bin", "-", lambda v, p, n: pc.subtract_checked(v[0], v[1]),
          lambda e, p: pc.subtract_checked(e[0], e[1]))
_register("mul", "bin", "*", lambda v, p, n: pc.multiply_checked(v[0], v[1]),
          lambda e, p: pc.multiply_checked(e[0], e[1]))
_register("truediv", "bin", "/", lambda v, p, n: pc.divide(_to_float(v[0]), _to_float(v[1])),
          lambda e, p: pc.divide(e[0].cast(_F64), e[1].cast(_F64)))
_register("floordiv", "bin", "//", lambda v, p, n: _py_divmod("floordiv", v[0], v[1], n))
_register("mod", "bin", "%", lambda v, p, n: _py_divmod("mod", v[0], v[1], n))
_register("pow", "bin", "**", lambda v, p, n: pc.power(_to_f64(v[0]), _to_f64(v[1])),
          lambda e, p: pc.power(e[0].cast(_F64), e[1].cast(_F64)))
_register("neg", "prefix", "-", lambda v, p, n: pc.negate_checked(v[0]),
          lambda e, p: pc.negate_checked(e[0]))
_register("abs", "method", "abs", lambda v, p, n: pc.abs_checked(v[0]),
          lambda e, p: pc.abs_checked(e[0]))
_register("round", "method", "round",
          lambda v, p, n: pc.round(v[0], ndigits=p["ndigits"], round_mode="half_to_even"),
          lambda e, p: pc.round(e[0], ndigits=p["ndigits"], round_mode="half_to_even"),
          pos=("ndigits",))

# ---- comparison and logic

for _name, _sym, _fn in [("eq", "==", pc.equal), ("ne", "!=", pc.not_equal), ("lt", "<", pc.less),
                         ("le", "<=", pc.less_equal), ("gt", ">", pc.greater),
                         ("ge", ">=", pc.greater_equal)]:
    _register(_name, "bin", _sym,
              (lambda f: lambda v, p, n: f(v[0], v[1]))(_fn),
              (lambda f: lambda e, p: f(e[0], e[1]))(_fn))

_register("and", "bin", "&", lambda v, p, n: pc.and_kleene(v[0], v[1]),
          lambda e, p: pc.and_kleene(e[0], e[1]), bool_args=True)
_register("or", "bin", "|", lambda v, p, n: pc.or_kleene(v[0], v[1]),
          lambda e, p: pc.or_kleene(e[0], e[1]), bool_args=True)
_register("xor", "bin", "^", lambda v, p, n: pc.xor(v[0], v[1]),
          lambda e, p: pc.xor(e[0], e[1]), bool_args=True)
_register("not", "prefix", "~", lambda v, p, n: pc.invert(v[0]),
          lambda e, p: pc.invert(e[0]), bool_args=True)

# ---- nulls, membership, cast


def _fill_null(v: list[Datum], p: dict[str, Any], n: int) -> Datum:
    x, fill = v
    if pa.types.is_null(x.type):
        x = x.cast(fill.type)
    if fill.type != x.type and not pa.types.is_null(x.type):
        try:
            fill = fill.cast(x.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            pass
    return pc.coalesce(x, fill)


def _is_in(v: list[Datum], p: dict[str, Any], n: int) -> Datum:
    x = v[0]
    values = p["values"]
    if not values:
        hit: Datum = pa.scalar(False)
    else:
        try:
            value_set = pa.array(values, type=x.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError,
                ValueError, OverflowError):
            value_set = pa.array(values)
        hit = pc.is_in(x, value_set=value_set, skip_nulls=True)
    return pc.if_else(pc.is_valid(x), hit, _NULL_BOOL)


def _is_in_arrow(e: list[pc.Expression], p: dict[str, Any]) -> pc.Expression | None:
    values = p["values"]
    if not values:
        hit = pc.scalar(False)
    else:
        try:
            value_set = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
            return None
        hit = pc.is_in(e[0], value_set=value_set, skip_nulls=True)
    return pc.if_else(pc.is_valid(e[0]), hit, pc.scalar(_NULL_BOOL))


_register("is_null", "method", "is_null", lambda v, p, n: pc.is_null(v[0]),
          lambda e, p: pc.is_null(e[0]))
_register("is_not_null", "method", "is_not_null", lambda v, p, n: pc.is_valid(v[0]),
          lambda e, p: pc.is_valid(e[0]))
_register("fill_null", "method", "fill_null", _fill_null, lambda e, p: pc.coalesce(e[0], e[1]))
_register("is_in", "method", "is_in", _is_in, _is_in_arrow, pos=("values",))
_register("cast", "method", "cast", lambda v, p, n: v[0].cast(p["dtype"]),
          lambda e, p: e[0].cast(p["dtype"]), pos=("dtype",))

# ---- strings


def _split_whitespace(x: Datum, n: int) -> pa.Array:
    """Split on runs of whitespace and drop empty parts, like Python's str.split()."""
    # Arrow collapses inner runs of whitespace but keeps empty parts at the edges: trim first,
    # so only blank strings still yield [""] (fast path when there are none).
    trimmed = pc.utf8_trim_whitespace(_broadcast(x, n))
    blank = pc.equal(trimmed, "")
    if not pc.any(blank).as_py():
        return pc.utf8_split_whitespace(trimmed)
    lists = pc.utf8_split_whitespace(trimmed)
    flat = lists.flatten()
    keep = pc.greater(pc.utf8_length(flat), 0)
    parents = pc.list_parent_indices(lists).filter(keep).to_numpy(zero_copy_only=False)
    counts = np.bincount(parents.astype(np.int64), minlength=len(lists))
    offsets = np.zeros(len(lists) + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    mask = pc.is_null(lists) if lists.null_count else None
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), flat.filter(keep), mask=mask)


def _split(v: list[Datum], p: dict[str, Any], n: int) -> Datum:
    if p["by"] is None:
        return _split_whitespace(v[0], n)
    return pc.split_pattern(v[0], pattern=p["by"])


def _split_arrow(e: list[pc.Expression], p: dict[str, Any]) -> pc.Expression | None:
    if p["by"] is None:
        return None
    return pc.split_pattern(e[0], pattern=p["by"])


def _strip(kind: str) -> tuple[Callable[..., Datum], Callable[..., pc.Expression]]:
    ws = getattr(pc, f"utf8_{kind}_whitespace")
    chars = getattr(pc, f"utf8_{kind}")

    def ev(v: list[Datum], p: dict[str, Any], n: int) -> Datum:
        c = p["chars"]
        return ws(v[0]) if c is None else chars(v[0], characters=c)

    def ar(e: list[pc.Expression], p: dict[str, Any]) -> pc.Expression:
        c = p["chars"]
        return ws(e[0]) if c is None else chars(e[0], characters=c)

    return ev, ar


def _as_string(x: Datum) -> Datum:
    t = x.type
    return x if pa.types.is_string(t) or pa.types.is_large_string(t) else x.cast(pa.string())


_register("str_lower", "method", "str.lower", lambda v, p, n: pc.utf8_lower(v[0]),
          lambda e, p: pc.utf8_lower(e[0]))
_register("str_upper", "method", "str.upper", lambda v, p, n: pc.utf8_upper(v[0]),
          lambda e, p: pc.utf8_upper(e[0]))
_register("str_strip", "method", "str.strip", *_strip("trim"), default={"chars": None})
_register("str_lstrip", "method", "str.lstrip", *_strip("ltrim"), default={"chars": None})
_register("str_rstrip", "method", "str.rstrip", *_strip("rtrim"), default={"chars": None})
_register("str_len", "method", "str.len", lambda v, p, n: pc.utf8_length(v[0]).cast(pa.int64()),
          lambda e, p: pc.utf8_length(e[0]).cast(pa.int64()))
_register("str_contains", "method", "str.contains",
          lambda v, p, n: (pc.match_substring_regex if p["regex"] else pc.match_substring)(
              v[0], pattern=p["pattern"]),
          lambda e, p: (pc.match_substring_regex if p["regex"] else pc.match_substring)(
              e[0], pattern=p["pattern"]),
          pos=("pattern",), default={"regex": False})
_register("str_starts_with", "method", "str.starts_with",
          lambda v, p, n: pc.starts_with(v[0], pattern=p["prefix"]),
          lambda e, p: pc.starts_with(e[0], pattern=p["prefix"]), pos=("prefix",))
_register("str_ends_with", "method", "str.ends_with",
          lambda v, p, n: pc.ends_with(v[0], pattern=p["suffix"]),
          lambda e, p: pc.ends_with(e[0], pattern=p["suffix"]), pos=("suffix",))
_register("str_replace", "method", "str.replace",
          lambda v, p, n: (pc.replace_substring_regex if p["regex"] else pc.replace_substring)(
              v[0], pattern=p["pattern"], replacement=p["replacement"], max_replacements=p["n"]),
          lambda e, p: (pc.replace_substring_regex if p["regex"] else pc.replace_substring)(
              e[0], pattern=p["pattern"], replacement=p["replacement"], max_replacements=p["n"]),
          pos=("pattern", "replacement"), default={"regex": False, "n": None})
_register("str_split", "method", "str.split", _split, _split_arrow, default={"by": None})
_register("str_slice", "method", "str.slice",
          lambda v, p, n: pc.utf8_slice_codeunits(v[0], start=p["start"], stop=p["stop"]),
          lambda e, p: pc.utf8_slice_codeunits(e[0], start=p["start"], stop=p["stop"]),
          pos=("start",), default={"length": None})
_register("str_concat", "method", "str.concat",
          lambda v, p, n: pc.binary_join_element_wise(*[_as_string(x) for x in v], ""),
          lambda e, p: pc.binary_join_element_wise(*[x.cast(pa.string()) for x in e],
                                                   pc.scalar("")))

# ---- dates and times

_DT_FIELDS = {
    "year": pc.year, "month": pc.month, "day": pc.day, "hour": pc.hour, "minute": pc.minute,
    "second": pc.second, "millisecond": pc.millisecond, "day_of_week": pc.day_of_week,
    "day_of_year": pc.day_of_year,
}
for _name, _fn in _DT_FIELDS.items():
    _register(f"dt_{_name}", "method", f"dt.{_name}",
              (lambda f: lambda v, p, n: f(v[0]))(_fn),
              (lambda f: lambda e, p: f(e[0]))(_fn))

_UNITS = {
    "ns": "nanosecond", "us": "microsecond", "µs": "microsecond", "ms": "millisecond",
    "s": "second", "m": "minute", "min": "minute", "h": "hour", "d": "day", "w": "week",
    "mo": "month", "q": "quarter", "y": "year",
}
_EVERY_RE = re.compile(r"^\s*(\d*)\s*([a-zµ]+)\s*$")


def _parse_every(every: str) -> tuple[int, str]:
    """Parse "15m", "1h", "1d", "1mo", "hour" ... into (multiple, Arrow temporal unit)."""
    m = _EVERY_RE.match(every) if isinstance(every, builtins.str) else None
    if m:
        unit = m.group(2)
        if unit in _UNITS:
            unit = _UNITS[unit]
        elif unit.endswith("s") and unit[:-1] in _UNITS.values():
            unit = unit[:-1]  # "hours" -> "hour"
        if unit in _UNITS.values():
            k = int(m.group(1) or 1)
            if k > 0:
                return k, unit
    raise PlanError(
        f"cannot read the interval {every!r}; use e.g. '1ns', '1us', '1ms', '1s', '15m', '1h', "
        f"'1d', '1w', '1mo', '1q', '1y'"
    )


_register("dt_truncate", "method", "dt.truncate",
          lambda v, p, n: pc.floor_temporal(v[0], multiple=p["multiple"], unit=p["unit"]),
          lambda e, p: pc.floor_temporal(e[0], multiple=p["multiple"], unit=p["unit"]),
          pos=("every",))


class _StrNamespace:
    """String functions of an expression: ``col("s").str.lower()``."""

    def __init__(self, expr: Expr):
        self._expr = expr

    def _f(self, op: str, *args: Expr, **params: Any) -> Expr:
        return _Func(op, (self._expr, *args), params)

    def lower(self) -> Expr:
        """Lowercase."""
        return self._f("str_lower")

    def upper(self) -> Expr:
        """Uppercase."""
        return self._f("str_upper")

    def strip(self, chars: str | None = None) -> Expr:
        """Remove leading and trailing whitespace (or the given characters)."""
        return self._f("str_strip", chars=chars)

    def lstrip(self, chars: str | None = None) -> Expr:
        """Remove leading whitespace (or the given characters)."""
        return self._f("str_lstrip", chars=chars)

    def rstrip(self, chars: str | None = None) -> Expr:
        """Remove trailing whitespace (or the given characters)."""
        return self._f("str_rstrip", chars=chars)

    def len(self) -> Expr:
        """Length in characters (code points), as int64."""
        return self._f("str_len")

    def contains(self, pattern: str, regex: bool = False) -> Expr:
        """True where the string contains pattern (a substring, or an RE2 regex if regex=True)."""
        return self._f("str_contains", pattern=pattern, regex=bool(regex))

    def starts_with(self, prefix: str) -> Expr:
        """True where the string starts with prefix."""
        return self._f("str_starts_with", prefix=prefix)

    def ends_with(self, suffix: str) -> Expr:
        """True where the string ends with suffix."""
        return self._f("str_ends_with", suffix=suffix)

    def replace(self, pattern: str, replacement: str, regex: bool = False,
                n: int | None = None) -> Expr:
        """Replace all (or the first n) occurrences of pattern; RE2 regex with \\1 groups if regex=True."""
        return self._f("str_replace", pattern=pattern, replacement=replacement,
                       regex=bool(regex), n=n)

    def split(self, by: str | None = None) -> Expr:
        """Split into list<string>: on a separator, or like str.split() on whitespace when by is None."""
        if by is not None and by == "":
            raise PlanError("str.split: empty separator")
        return self._f("str_split", by=by)

    def slice(self, start: int, length: int | None = None) -> Expr:
        """Substring of length characters from start (negative start counts from the end)."""
        if length is not None and length < 0:
            raise PlanError(f"str.slice: length must be >= 0, got {length}")
        stop = None if length is None else start + length
        if start < 0 and stop is not None and stop >= 0:
            stop = None
        return self._f("str_slice", start=int(start), stop=stop, length=length)

    def concat(self, *others: Any) -> Expr:
        """Concatenate with other strings (Exprs or literals); null if any part is null."""
        return self._f("str_concat", *[_lit_or_expr(o) for o in others])


class _DtNamespace:
    """Date and time functions of an expression: ``col("t").dt.year()``."""

    def __init__(self, expr: Expr):
        self._expr = expr

    def _f(self, op: str, **params: Any) -> Expr:
        return _Func(op, (self._expr,), params)

    def year(self) -> Expr:
        """Year."""
        return self._f("dt_year")

    def month(self) -> Expr:
        """Month, 1-12."""
        return self._f("dt_month")

    def day(self) -> Expr:
        """Day of the month, 1-31."""
        return self._f("dt_day")

    def hour(self) -> Expr:
        """Hour, 0-23."""
        return self._f("dt_hour")

    def minute(self) -> Expr:
        """Minute, 0-59."""
        return self._f("dt_minute")

    def second(self) -> Expr:
        """Whole seconds, 0-59."""
        return self._f("dt_second")

    def millisecond(self) -> Expr:
        """Milliseconds within the second, 0-999."""
        return self._f("dt_millisecond")

    def day_of_week(self) -> Expr:
        """Day of the week, Monday=0 ... Sunday=6 (like datetime.weekday())."""
        return self._f("dt_day_of_week")

    def day_of_year(self) -> Expr:
        """Day of the year, 1-366."""
        return self._f("dt_day_of_year")

    def truncate(self, every: str) -> Expr:
        """Round down to a multiple of an interval such as "15m", "1h", "1d", "1w", "1mo", "1y"."""
        k, unit = _parse_every(every)
        return self._f("dt_truncate", every=every, multiple=k, unit=unit)


# --------------------------------------------------------------------------- when


class When(Expr):
    """A conditional expression: ``when(c1, v1).when(c2, v2).otherwise(v)``; no match gives null."""

    def __init__(self, branches: tuple[tuple[Expr, Expr], ...], otherwise: Expr | None = None):
        self.branches = tuple(branches)
        self.otherwise_value = otherwise

    def when(self, condition: Any, value: Any) -> When:
        """Add a branch, tried after the earlier ones."""
        if self.otherwise_value is not None:
            raise PlanError("when(...) after otherwise(...): add all branches before otherwise")
        return When((*self.branches, (to_expr(condition), _lit_or_expr(value))))

    def otherwise(self, value: Any) -> When:
        """The value where no condition is true."""
        if self.otherwise_value is not None:
            raise PlanError("otherwise(...) given twice")
        return When(self.branches, _lit_or_expr(value))

    def _children(self) -> tuple[Expr, ...]:
        values = [v for _, v in self.branches]
        if self.otherwise_value is not None:
            values.append(self.otherwise_value)
        return (*values, *(c for c, _ in self.branches))

    def _eval(self, batch: pa.RecordBatch) -> Datum:
        result: Datum = (self.otherwise_value._eval(batch) if self.otherwise_value is not None
                         else pa.scalar(None))
        for cond, value in reversed(self.branches):
            c = _null_to_bool(cond._eval(batch))
            v = value._eval(batch)
            try:
                c = pc.fill_null(c, False)
                result = pc.if_else(c, v, result)
            except (pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
                raise SchemaError(
                    f"cannot evaluate {self!r}: conditions must be boolean and values of "
                    f"compatible types (got condition {c.type}, values {v.type} and "
                    f"{result.type}): {e}") from e
        return result

    def to_arrow(self) -> pc.Expression | None:
        """The same expression as nested pyarrow.compute if_else Expressions."""
        if self.otherwise_value is None:
            result = pc.scalar(None)
        else:
            result = self.otherwise_value.to_arrow()
        if result is None:
            return None
        for cond, value in reversed(self.branches):
            if isinstance(cond, Literal) and pa.types.is_null(cond.scalar.type):
                c = pc.scalar(False)
            else:
                c = cond.to_arrow()
                if c is None:
                    return None
                c = pc.coalesce(c, pc.scalar(False))
            v = value.to_arrow()
            if v is None:
                return None
            result = pc.if_else(c, v, result)
        return result

    def __repr__(self) -> str:
        s = "".join(f"{'.' if i else ''}when({c!r}, {v!r})"
                    for i, (c, v) in enumerate(self.branches))
        if self.otherwise_value is not None:
            s += f".otherwise({self.otherwise_value!r})"
        return s


# --------------------------------------------------------------------------- aggregates

AGG_FUNCS = frozenset(
    {"sum", "mean", "min", "max", "count", "count_all", "count_distinct", "first", "collect_list"}
)


class AggExpr:
    """An aggregate descriptor: func applied to arg, output column name; the engine computes it."""

    def __init__(self, func: str, arg: Expr | None, name: str | None = None):
        if func not in AGG_FUNCS:
            raise PlanError(f"unknown aggregate {func!r}; expected one of {sorted(AGG_FUNCS)}")
        if (arg is None) != (func == "count_all"):
            raise PlanError("count_all takes no argument; every other aggregate takes one")
        if arg is not None and not isinstance(arg, Expr):
            raise PlanError(f"aggregate argument must be an Expr, got {arg!r}")
        self.func = func
        self.arg = arg
        self.name = name if name is not None else self.default_name

    @property
    def default_name(self) -> str:
        """The name used without alias: the input's output_name, or "count" for count_all."""
        return "count" if self.arg is None else self.arg.output_name

    def alias(self, name: str) -> AggExpr:
        """The same aggregate with another output name."""
        return AggExpr(self.func, self.arg, name)

    def columns(self) -> set[str]:
        """Names of the columns the aggregate reads."""
        return set() if self.arg is None else self.arg.columns()

    def __repr__(self) -> str:
        s = "count()" if self.arg is None else f"{self.arg!r}.{self.func}()"
        if self.name != self.default_name:
            s += f".alias({_q(self.name)})"
        return s


# --------------------------------------------------------------------------- constructors


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


def when(condition: Any, value: Any) -> When:
    """Start a conditional expression; condition is an Expr (a str names a boolean column)."""
    return When(((to_expr(condition), _lit_or_expr(value)),))


def _agg(func: str, c: str | Expr) -> AggExpr:
    if not isinstance(c, (builtins.str, Expr)):
        raise PlanError(f"{func}() expects a column name or an Expr, got {c!r}")
    return AggExpr(func, to_expr(c))


def sum(c: str | Expr) -> AggExpr:
    """Sum of the non-null values of a column."""
    return _agg("sum", c)


def mean(c: str | Expr) -> AggExpr:
    """Mean of the non-null values of a column."""
    return _agg("mean", c)


avg = mean


def min(c: str | Expr) -> AggExpr:
    """Smallest non-null value of a column."""
    return _agg("min", c)


def max(c: str | Expr) -> AggExpr:
    """Largest non-null value of a column."""
    return _agg("max", c)


def count(c: str | Expr | None = None) -> AggExpr:
    """Number of non-null values of a column; count() or count("*") counts rows."""
    if c is None or (isinstance(c, builtins.str) and c == "*"):
        return AggExpr("count_all", None)
    return _agg("count", c)


def count_distinct(c: str | Expr) -> AggExpr:
    """Number of distinct non-null values of a column."""
    return _agg("count_distinct", c)


def first(c: str | Expr) -> AggExpr:
    """First value of a column in each group."""
    return _agg("first", c)


def collect_list(c: str | Expr) -> AggExpr:
    """All values of a column in each group, as a list."""
    return _agg("collect_list", c)
