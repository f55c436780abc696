"""The analytic window node: window functions over partitions (``row_number``, ``lag``,
framed aggregates ...), computed by a partition shuffle and a sort within partitions."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from millstream.expr.analytic import WindowFunction
from millstream.plan import schema as S
from millstream.plan.logical.base import Unary


@dataclass(frozen=True, eq=False)
class Window(Unary):
    """Columns computed by window ``functions`` over the partitions of ``partition_by`` (one
    partition when empty); like ``with_columns``, each reads the input rows, a name
    already present is replaced in place and a new one appended. Functions with the same
    order share one sort."""

    partition_by: tuple[str, ...]
    functions: tuple[WindowFunction, ...]

    def label(self) -> str:
        return (f"Window partition_by={list(self.partition_by)} "
                f"[{', '.join(f.describe() for f in self.functions)}]")

    def references(self) -> frozenset[str] | None:
        out = set(self.partition_by)
        for f in self.functions:
            out |= f.columns()
        return frozenset(out)

    def produced(self) -> frozenset[str]:
        """Names of the columns the functions write."""
        return frozenset(f.name for f in self.functions)

    def sort_groups(self) -> list[list[WindowFunction]]:
        """The functions in groups of one sort each (see :func:`sort_groups`)."""
        return sort_groups(self.functions)

    def compute_schema(self) -> pa.Schema | None:
        schema = self.input_schema()
        return None if schema is None else S.window_schema(
            schema, self.partition_by, self.functions,
            f"Window partition_by={list(self.partition_by)}")


def sort_groups(functions: tuple[WindowFunction, ...] | list[WindowFunction]
                ) -> list[list[WindowFunction]]:
    """Functions grouped by their order (one sort each), first appearance first; functions
    without an order ride along with the first ordered group (any order of a partition
    serves them)."""
    groups: dict[tuple, list[WindowFunction]] = {}
    unordered: list[WindowFunction] = []
    for f in functions:
        if f.order_by:
            groups.setdefault(f.sort_spec, []).append(f)
        else:
            unordered.append(f)
    ordered = list(groups.values())
    if not ordered:
        return [unordered]
    ordered[0] += unordered
    return ordered
