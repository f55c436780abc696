"""Conditional expressions: ``when(c1, v1).when(c2, v2).otherwise(v)``, evaluated branch by
branch like SQL ``CASE WHEN``; a null condition counts as false and no match gives null."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from millstream.errors import PlanError, SchemaError
from millstream.expr.nodes import Expr, Literal, _lit_or_expr, to_expr
from millstream.expr.types import Datum, _null_to_bool


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

    def to_arrow(self, schema: pa.Schema | None = None) -> pc.Expression | None:
        """The same expression as nested pyarrow.compute if_else Expressions."""
        if self.otherwise_value is None:
            result = pc.scalar(None)
        else:
            result = self.otherwise_value.to_arrow(schema)
        if result is None:
            return None
        for cond, value in reversed(self.branches):
            if isinstance(cond, Literal) and pa.types.is_null(cond.scalar.type):
                c = pc.scalar(False)
            else:
                c = cond.to_arrow(schema)
                if c is None:
                    return None
                c = pc.coalesce(c, pc.scalar(False))
            v = value.to_arrow(schema)
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


def when(condition: Any, value: Any) -> When:
    """Start a conditional expression; condition is an Expr (a str names a boolean column)."""
    return When(((to_expr(condition), _lit_or_expr(value)),))
