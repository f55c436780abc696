"""Row, expression and relational nodes: map/filter-style per-batch operations, group-by,
joins, sorts, unions, limits, exchanges, caches, and MapReduce steps."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import pyarrow as pa

from millstream.core.units import format_duration
from millstream.errors import SchemaError
from millstream.expr.aggregates import AggSpec
from millstream.expr.nodes import Expr
from millstream.ops.narrow import function_name
from millstream.plan import schema as S
from millstream.plan.logical.base import Node, SameColumns, Scan, Unary, agg_text, spec_refs

_ids = itertools.count(1)


# ---------------------------------------------------------------------- row functions
@dataclass(frozen=True, eq=False)
class Map(Unary):
    """``fn(row) -> row`` (a dict; any other value lands in column ``value``)."""

    fn: Callable[[dict], Any]

    def label(self) -> str:
        return f"Map({function_name(self.fn)})"


@dataclass(frozen=True, eq=False)
class FlatMap(Unary):
    """``fn(row) -> iterable of rows``."""

    fn: Callable[[dict], Iterable[Any]]

    def label(self) -> str:
        return f"FlatMap({function_name(self.fn)})"


@dataclass(frozen=True, eq=False)
class FilterRows(SameColumns, Unary):
    """Rows for which the Python predicate ``fn(row)`` is true."""

    accepts_updates: ClassVar[bool] = True  # (each row keeps its change kind)

    fn: Callable[[dict], Any]

    def label(self) -> str:
        return f"Filter({function_name(self.fn)})"


@dataclass(frozen=True, eq=False)
class MapBatches(Unary):
    """A vectorized ``fn(batch, **fn_kwargs)`` over whole batches in ``batch_format``."""

    fn: Callable[..., Any]
    batch_format: str = "pyarrow"
    fn_kwargs: tuple[tuple[str, Any], ...] = ()

    def label(self) -> str:
        return f"MapBatches({function_name(self.fn)}, {self.batch_format})"


# ---------------------------------------------------------------------- expressions
@dataclass(frozen=True, eq=False)
class Filter(SameColumns, Unary):
    """Rows where the boolean expression is true (null counts as false)."""

    accepts_updates: ClassVar[bool] = True  # (each row keeps its change kind)

    predicate: Expr

    def label(self) -> str:
        return f"Filter({self.predicate!r})"

    def references(self) -> frozenset[str] | None:
        return frozenset(self.predicate.columns())

    def check(self, schema: pa.Schema) -> None:
        S.filter_schema(schema, self.predicate, self.label())


def _expr_refs(exprs: Iterable[Expr]) -> frozenset[str]:
    out: set[str] = set()
    for e in exprs:
        out |= e.columns()
    return frozenset(out)


@dataclass(frozen=True, eq=False)
class Project(Unary):
    """Exactly the columns the expressions compute (``select``)."""

    accepts_updates: ClassVar[bool] = True  # (each row keeps its change kind)

    exprs: tuple[Expr, ...]

    def label(self) -> str:
        return "Project(" + ", ".join(repr(e) for e in self.exprs) + ")"

    def references(self) -> frozenset[str] | None:
        return _expr_refs(self.exprs)

    def compute_schema(self) -> pa.Schema | None:
        schema = self.input_schema()
        return None if schema is None else S.project_schema(schema, self.exprs, self.label())


@dataclass(frozen=True, eq=False)
class WithColumns(Unary):
    """Columns added or replaced by expressions (all read the input); the others kept."""

    accepts_updates: ClassVar[bool] = True  # (each row keeps its change kind)

    exprs: tuple[Expr, ...]

    def label(self) -> str:
        return "WithColumns(" + ", ".join(repr(e) for e in self.exprs) + ")"

    def references(self) -> frozenset[str] | None:
        return _expr_refs(self.exprs)

    def produced(self) -> frozenset[str]:
        """Names of the columns the expressions write."""
        return frozenset(e.output_name for e in self.exprs)

    def compute_schema(self) -> pa.Schema | None:
        schema = self.input_schema()
        return None if schema is None else S.with_columns_schema(schema, self.exprs,
                                                                self.label())


@dataclass(frozen=True, eq=False)
class Drop(Unary):
    """The input without ``columns``; a name that is not there is a SchemaError unless not
    ``strict`` (then it is ignored)."""

    accepts_updates: ClassVar[bool] = True  # (each row keeps its change kind)

    columns: tuple[str, ...]
    strict: bool = True

    def label(self) -> str:
        return f"Drop({', '.join(self.columns)})"

    def references(self) -> frozenset[str] | None:
        return frozenset()

    def compute_schema(self) -> pa.Schema | None:
        schema = self.input_schema()
        if schema is None:
            return None
        if self.strict:
            _no_such_columns("drop", self.columns, schema)
        return pa.schema([f for f in schema if f.name not in self.columns])


@dataclass(frozen=True, eq=False)
class Rename(Unary):
    """Columns renamed by ``mapping`` pairs ``(old, new)``; an old name that is not there is
    a SchemaError unless not ``strict`` (then it is ignored)."""

    accepts_updates: ClassVar[bool] = True  # (each row keeps its change kind)

    mapping: tuple[tuple[str, str], ...]
    strict: bool = True

    def label(self) -> str:
        return f"Rename({dict(self.mapping)})"

    def references(self) -> frozenset[str] | None:
        return frozenset()

    def compute_schema(self) -> pa.Schema | None:
        schema = self.input_schema()
        if schema is None:
            return None
        if self.strict:
            _no_such_columns("rename", [old for old, _ in self.mapping], schema)
        names = dict(self.mapping)
        return pa.schema([f.with_name(names.get(f.name, f.name)) for f in schema])


@dataclass(frozen=True, eq=False)
class Explode(Unary):
    """One row per element of list ``column`` (empty and null lists give no row)."""

    accepts_updates: ClassVar[bool] = True  # (each row keeps its change kind)

    column: str

    def label(self) -> str:
        return f"Explode({self.column})"

    def references(self) -> frozenset[str] | None:
        return frozenset([self.column])

    def compute_schema(self) -> pa.Schema | None:
        schema = self.input_schema()
        return None if schema is None else S.explode_schema(schema, self.column, self.label())


#: Per-batch nodes (fused into the task of their input by the physical planner).
NARROW_NODES: tuple[type[Node], ...] = (Map, FlatMap, FilterRows, MapBatches, Filter, Project,
                                        WithColumns, Drop, Rename, Explode)


# ---------------------------------------------------------------------- relational

@dataclass(frozen=True, eq=False)
class Aggregate(Unary):
    """One row per distinct ``keys`` (one row in all without keys) with the aggregates."""

    #: in a streaming job: a result per key, updated as rows come (a changelog)
    accepts_updates: ClassVar[bool] = True
    produces_updates: ClassVar[bool] = True

    keys: tuple[str, ...]
    specs: tuple[AggSpec, ...]

    def label(self) -> str:
        return f"Aggregate keys={list(self.keys)} [{agg_text(self.specs)}]"

    def references(self) -> frozenset[str] | None:
        return spec_refs(self.keys, self.specs)

    def compute_schema(self) -> pa.Schema | None:
        schema = self.input_schema()
        return None if schema is None else S.aggregate_schema(schema, self.keys, self.specs,
                                                             self.label())


@dataclass(frozen=True, eq=False)
class Distinct(Unary):
    """Remove duplicate rows.

    In a streaming job: the first of each row on an append-only input; on an updating
    input, each distinct row held while some copy of it is (a row that goes away is
    deleted), so the output updates when the input does."""

    accepts_updates: ClassVar[bool] = True

    def compute_schema(self) -> pa.Schema | None:
        schema = self.input_schema()
        return None if schema is None else S.aggregate_schema(schema, schema.names, (),
                                                             self.label())


def reads_stream(node: Node) -> bool:
    """Whether ``node`` reads an unbounded source."""
    if isinstance(node, Scan):
        return not node.source.bounded
    return any(reads_stream(c) for c in node.children)


@dataclass(frozen=True, eq=False)
class Join(Node):
    """Join (inner, left, right, outer, semi, anti) on equal keys (null keys never match)
    and/or a residual ``condition`` on the candidate pairs; without keys every pair of rows
    is a candidate (a cross join when there is no condition either).

    ``condition`` names columns as the inner join outputs them: left names, right names,
    a right name the left side has too with ``suffix``, a same-named key (``on=``) once.

    In a streaming job it is a stream-table join (the bounded right side computed once and
    broadcast) or, when the right side reads a stream or ``broadcast`` is False, a regular
    join of two streams (:meth:`joins_streams`), whose state rows expire ``state_ttl`` µs
    after their time: the event time of ``time_columns`` (each side's ``with_watermark``
    column, when both have one) or their arrival.
    """

    left: Node
    right: Node
    left_on: tuple[str, ...]
    right_on: tuple[str, ...]
    how: str
    suffix: str = "_right"
    #: force (True) or forbid (False) broadcasting the right side; None: by size
    broadcast: bool | None = None
    condition: Expr | None = None
    #: a streaming regular join's state time-to-live (µs; None: rows are kept for ever)
    state_ttl: int | None = None
    #: the (left, right) event-time columns its state TTL runs on (None: processing time)
    time_columns: tuple[str | None, str | None] = (None, None)

    @property
    def children(self) -> tuple[Node, ...]:
        return (self.left, self.right)

    def with_children(self, children: tuple[Node, ...]) -> Node:
        return replace(self, left=children[0], right=children[1])

    @property
    def is_cross(self) -> bool:
        """A cross join: every pair of rows (no keys, no condition, inner)."""
        return not self.left_on and self.condition is None and self.how == "inner"

    def label(self) -> str:
        if self.is_cross:
            return "Join cross"
        text = f"Join {self.how}"
        if self.left_on:
            text += f" left_on={list(self.left_on)} right_on={list(self.right_on)}"
        if self.condition is not None:
            text += f" condition={self.condition!r}"
        if self.state_ttl:
            text += f" state_ttl={format_duration(self.state_ttl)}"
        return text

    def joins_streams(self) -> bool:
        """In a streaming job: a regular join of two streams (keyed state on both sides)
        rather than a stream-table join; when the right side reads an unbounded source or
        ``broadcast`` is False."""
        return self.broadcast is False or reads_stream(self.right)

    @property
    def accepts_updates(self) -> bool:  # type: ignore[override]
        """A regular join takes changelog inputs (a retraction takes back a stored row and
        the pairs it made); a stream-table join does not."""
        return self.joins_streams()

    @property
    def emits_updates(self) -> bool:
        """A regular outer join emits updates (an outer row taken back when its first
        partner comes); an inner one passes its inputs' on; a stream-table join none."""
        if not self.joins_streams():
            return False
        return self.how != "inner" or self.left.emits_updates or self.right.emits_updates

    def compute_schema(self) -> pa.Schema | None:
        left, right = self.left.checked_schema(), self.right.checked_schema()
        if left is None or right is None:
            return None
        return S.join_schema(left, right, self.left_on, self.right_on, self.how, self.suffix,
                             self.label(), self.condition)


@dataclass(frozen=True, eq=False)
class Sort(SameColumns, Unary):
    """Global order by columns (nulls first ascending, last descending, unless told)."""

    by: tuple[str, ...]
    descending: tuple[bool, ...]
    nulls_last: bool | None = None

    def label(self) -> str:
        return "Sort " + ", ".join(c + (" desc" if d else "") for c, d in zip(self.by, self.descending))

    def references(self) -> frozenset[str] | None:
        return frozenset(self.by)


@dataclass(frozen=True, eq=False)
class Union(Node):
    """All rows of the inputs (UNION ALL), columns matched by name."""

    accepts_updates: ClassVar[bool] = True  # (each row keeps its change kind)

    inputs: tuple[Node, ...]

    @property
    def children(self) -> tuple[Node, ...]:
        return self.inputs

    def with_children(self, children: tuple[Node, ...]) -> Node:
        return replace(self, inputs=tuple(children))

    def compute_schema(self) -> pa.Schema | None:
        schemas = [c.checked_schema() for c in self.inputs]
        if any(s is None for s in schemas):
            return None
        return S.union_schema(schemas)  # type: ignore[arg-type]


@dataclass(frozen=True, eq=False)
class Limit(SameColumns, Unary):
    """The first ``n`` rows."""

    n: int

    def label(self) -> str:
        return f"Limit {self.n}"

    def references(self) -> frozenset[str] | None:
        return frozenset()


@dataclass(frozen=True, eq=False)
class TopK(SameColumns, Unary):
    """The first ``n`` rows in the order of a sort by ``by`` (``sort(...).limit(n)``),
    found per partition and merged, without sorting everything."""

    by: tuple[str, ...]
    descending: tuple[bool, ...]
    n: int
    nulls_last: bool | None = None

    def label(self) -> str:
        return f"TopK {self.n} by " + ", ".join(c + (" desc" if d else "")
                                              for c, d in zip(self.by, self.descending))

    def references(self) -> frozenset[str] | None:
        return frozenset(self.by)


@dataclass(frozen=True, eq=False)
class Repartition(SameColumns, Unary):
    """``n`` partitions, by hash of ``by`` or round-robin."""

    n: int
    by: tuple[str, ...] | None = None

    def label(self) -> str:
        return f"Repartition {self.n}" + (f" by {list(self.by)}" if self.by else " (round-robin)")

    def references(self) -> frozenset[str] | None:
        return frozenset(self.by or ())


@dataclass(frozen=True, eq=False)
class Cache(SameColumns, Unary):
    """The input, materialized on first use and reused by later actions."""

    cache_id: int = field(default_factory=lambda: next(_ids))

    def label(self) -> str:
        return f"Cache #{self.cache_id}"

    def references(self) -> frozenset[str] | None:
        return frozenset()


@dataclass(frozen=True, eq=False)
class Shared(Unary):
    """A sub-plan the query uses more than once: the reuse rule (``plan/rules/reuse.py``)
    puts this same node at every place it is used, and the planner runs it once per
    action, each consumer reading its output (batch: materialized blocks; streaming: its
    rows go to every consumer)."""

    shared_id: int = 0
    uses: int = 2

    def label(self) -> str:
        return f"Shared #{self.shared_id} (used {self.uses} times)"

    def compute_schema(self) -> pa.Schema | None:
        return self.input_schema()


# ---------------------------------------------------------------------- MapReduce
@dataclass(frozen=True, eq=False)
class MapReduceStep(Unary):
    """One step of a MapReduce job over ``key``/``value`` pairs: the mapper (and combiner),
    then, unless the step is map-only (``num_reducers`` None), a hash shuffle by key (or
    by the step's partitioner) into ``num_reducers`` partitions and the reducer.

    ``payload`` is the cloudpickled ``(job, steps)`` the operators load; ``functions``
    names the step's functions for explain().
    """

    payload: bytes
    step: int
    job: str
    num_reducers: int | None
    partitioned: bool = False
    last: bool = True
    strict_types: bool = False
    functions: str = ""

    def label(self) -> str:
        shuffle = "map only" if self.num_reducers is None else f"reducers={self.num_reducers}"
        return f"MapReduce {self.job} step {self.step + 1} ({self.functions}) {shuffle}"


def _no_such_columns(call: str, names: Any, schema: pa.Schema) -> None:
    """A SchemaError naming the columns ``call`` names that ``schema`` lacks (with the
    closest existing ones), as Polars does; none: nothing."""
    missing = [n for n in names if schema.get_field_index(n) < 0]
    if not missing:
        return
    import difflib

    hints = []
    for n in missing:
        close = difflib.get_close_matches(n, schema.names, n=1)
        if close:
            hints.append(f"did you mean {close[0]!r} for {n!r}?")
    raise SchemaError(f"no column(s) {missing}; columns are {schema.names}"
                      + ("; " + " ".join(hints) if hints else "")
                      + f" (pass strict=False to {call} only the columns that exist)")
