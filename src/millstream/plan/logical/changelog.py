"""Nodes of continuous queries with updates: deduplication, top-N per group, and the
conversions between a changelog and rows with a visible change column.

In a streaming job their operators (``ops.changelog``) emit changes as rows come; in
batch mode the same nodes give the final result (deduplication and top-N) or read a
changelog as the rows it leaves (``FromChangelog``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pyarrow as pa

from millstream.core.changelog import VISIBLE
from millstream.core.units import format_duration
from millstream.errors import SchemaError
from millstream.plan import schema as S
from millstream.plan.logical.base import Unary


@dataclass(frozen=True, eq=False)
class Deduplicate(Unary):
    """One row per distinct ``subset``: the first (an append-only output) or the last (an
    updating one); a key's state expires ``within`` µs after its kept row (event time of
    ``time_column`` when set, else processing time)."""

    subset: tuple[str, ...]
    keep: str = "first"
    within: int | None = None
    time_column: str | None = None

    @property
    def emits_updates(self) -> bool:
        return self.keep == "last"

    def label(self) -> str:
        ttl = f" within={format_duration(self.within)}" if self.within else ""
        on = f" on {self.time_column!r}" if self.within and self.time_column else ""
        return f"Deduplicate subset={list(self.subset)} keep={self.keep}{ttl}{on}"

    def references(self) -> frozenset[str] | None:
        return frozenset([*self.subset, *([self.time_column] if self.time_column else [])])

    def compute_schema(self) -> pa.Schema | None:
        schema = self.input_schema()
        if schema is not None:
            S.require(schema, self.references() or (), self.label())
        return schema


@dataclass(frozen=True, eq=False)
class TopN(Unary):
    """The first ``n`` rows of each group of ``per`` in the order of ``by`` (SQL's
    ``ROW_NUMBER() OVER (PARTITION BY per ORDER BY by) <= n``), with their rank in
    ``rank_column`` when given; in a streaming job, updated as the groups change."""

    n: int
    by: tuple[str, ...]
    descending: tuple[bool, ...]
    per: tuple[str, ...] = ()
    rank_column: str | None = None
    nulls_last: bool | None = None

    accepts_updates: ClassVar[bool] = True
    produces_updates: ClassVar[bool] = True

    def label(self) -> str:
        order = ", ".join(c + (" desc" if d else "") for c, d in zip(self.by, self.descending))
        rank = f" rank={self.rank_column!r}" if self.rank_column else ""
        return f"TopN {self.n} by {order} per={list(self.per)}{rank}"

    def references(self) -> frozenset[str] | None:
        return frozenset([*self.by, *self.per])

    def compute_schema(self) -> pa.Schema | None:
        schema = self.input_schema()
        if schema is None:
            return None
        S.require(schema, [*self.per, *self.by], self.label())
        if not self.rank_column:
            return schema
        if self.rank_column in schema.names:
            raise SchemaError(f"{self.label()}: the input already has a column "
                              f"{self.rank_column!r}; name the rank otherwise")
        return schema.append(pa.field(self.rank_column, pa.int64()))


@dataclass(frozen=True, eq=False)
class ToChangelog(Unary):
    """The input's changes as plain rows: the change kind of each row (+I, -U, +U, -D;
    +I for an append-only input) in the string column ``column``."""

    column: str = VISIBLE

    accepts_updates: ClassVar[bool] = True

    @property
    def emits_updates(self) -> bool:
        return False

    def label(self) -> str:
        return f"ToChangelog column={self.column!r}"

    def references(self) -> frozenset[str] | None:
        return frozenset()

    def compute_schema(self) -> pa.Schema | None:
        schema = self.input_schema()
        if schema is None:
            return None
        if self.column in schema.names:
            raise SchemaError(f"{self.label()}: the input already has a column "
                              f"{self.column!r}; name the change column otherwise")
        return schema.append(pa.field(self.column, pa.string()))


@dataclass(frozen=True, eq=False)
class FromChangelog(Unary):
    """Rows that are changes: the string column ``column`` (+I, -U, +U, -D) says what each
    row is. A streaming job carries them as updates; in batch mode they are read as the
    rows they leave (each +I/+U adds a copy of its row, each -U/-D takes one away)."""

    column: str = VISIBLE

    produces_updates: ClassVar[bool] = True

    def label(self) -> str:
        return f"FromChangelog column={self.column!r}"

    def references(self) -> frozenset[str] | None:
        return frozenset([self.column])

    def compute_schema(self) -> pa.Schema | None:
        schema = self.input_schema()
        if schema is None:
            return None
        S.require(schema, [self.column], self.label())
        t = schema.field(self.column).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t)
                or pa.types.is_string_view(t) or pa.types.is_dictionary(t)):
            raise SchemaError(f"{self.label()}: the change column {self.column!r} is {t}, not "
                              f"strings (+I, -U, +U, -D)")
        return schema.remove(schema.get_field_index(self.column))
