"""The logical plan: an immutable tree built lazily by the Dataset API."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Any

from millstream.io.base import Source
from millstream.ops.base import OperatorFactory

_ids = itertools.count(1)


@dataclass(frozen=True, eq=False)
class Node:
    """Base of logical plan nodes; ``children`` are the inputs."""

    @property
    def children(self) -> tuple[Node, ...]:
        return ()

    def with_children(self, children: tuple[Node, ...]) -> Node:
        return self

    def label(self) -> str:
        return type(self).__name__

    def tree(self, indent: int = 0) -> str:
        """The plan as an indented tree, for explain()."""
        lines = ["  " * indent + self.label()]
        for c in self.children:
            lines.append(c.tree(indent + 1))
        return "\n".join(lines)


@dataclass(frozen=True, eq=False)
class Scan(Node):
    source: Source

    def label(self) -> str:
        return f"Scan {self.source.describe()}"


@dataclass(frozen=True, eq=False)
class Unary(Node):
    """A node with exactly one input, ``child``."""

    child: Node

    @property
    def children(self) -> tuple[Node, ...]:
        return (self.child,)

    def with_children(self, children: tuple[Node, ...]) -> Node:
        return replace(self, child=children[0])


@dataclass(frozen=True, eq=False)
class Narrow(Unary):
    """A per-batch operator. ``kind`` and ``payload`` let the optimizer reason about it."""

    factory: OperatorFactory
    kind: str  # map | flat_map | filter_fn | map_batches | project | with_columns | filter | drop | rename | explode
    payload: Any = None
    text: str = ""

    def label(self) -> str:
        return self.text or self.kind


@dataclass(frozen=True, eq=False)
class Aggregate(Unary):
    keys: list[str]
    specs: list[Any]  # AggSpec

    def label(self) -> str:
        aggs = ", ".join(f"{s.func}({s.arg!r}) as {s.name}" if s.arg is not None else f"count(*) as {s.name}"
                         for s in self.specs)
        return f"Aggregate keys={self.keys} [{aggs}]"


@dataclass(frozen=True, eq=False)
class Distinct(Unary):
    """Remove duplicate rows."""


@dataclass(frozen=True, eq=False)
class Join(Node):
    left: Node
    right: Node
    left_on: list[str]
    right_on: list[str]
    how: str
    suffix: str = "_right"
    broadcast: bool | None = None

    @property
    def children(self) -> tuple[Node, ...]:
        return (self.left, self.right)

    def with_children(self, children: tuple[Node, ...]) -> Node:
        return replace(self, left=children[0], right=children[1])

    def label(self) -> str:
        return f"Join {self.how} left_on={self.left_on} right_on={self.right_on}"


@dataclass(frozen=True, eq=False)
class Sort(Unary):
    by: list[str]
    descending: list[bool]
    nulls_last: bool | None = None

    def label(self) -> str:
        return "Sort " + ", ".join(c + (" desc" if d else "") for c, d in zip(self.by, self.descending))


@dataclass(frozen=True, eq=False)
class Union(Node):
    inputs: tuple[Node, ...]

    @property
    def children(self) -> tuple[Node, ...]:
        return self.inputs

    def with_children(self, children: tuple[Node, ...]) -> Node:
        return replace(self, inputs=tuple(children))


@dataclass(frozen=True, eq=False)
class Limit(Unary):
    n: int

    def label(self) -> str:
        return f"Limit {self.n}"


@dataclass(frozen=True, eq=False)
class Repartition(Unary):
    n: int
    by: list[str] | None = None

    def label(self) -> str:
        return f"Repartition {self.n}" + (f" by {self.by}" if self.by else " (round-robin)")


@dataclass(frozen=True, eq=False)
class Cache(Unary):
    cache_id: int = field(default_factory=lambda: next(_ids))

    def label(self) -> str:
        return f"Cache #{self.cache_id}"


@dataclass(frozen=True, eq=False)
class WithWatermark(Unary):
    """Event time is ``column``; watermark = max event time - ``delay`` µs (streaming)."""

    column: str
    delay: int
    idle_timeout: int | None = None

    def label(self) -> str:
        idle = f", idle_timeout={self.idle_timeout}us" if self.idle_timeout else ""
        return f"WithWatermark {self.column!r} delay={self.delay}us{idle}"


@dataclass(frozen=True, eq=False)
class WindowAggregate(Unary):
    """Keyed event-time window aggregation (``ops.window.WindowAggregate``)."""

    window: Any  # expr.windows.WindowAssigner
    keys: list[str]
    specs: list[Any]  # AggSpec
    time_column: str | None
    allowed_lateness: int = 0

    def label(self) -> str:
        aggs = ", ".join(f"{s.func} as {s.name}" for s in self.specs)
        on = f" on {self.time_column!r}" if self.time_column is not None else ""
        return (f"Window {self.window.describe()}{on} keys={self.keys} "
                f"[{aggs}]" + (f" allowed_lateness={self.allowed_lateness}us"
                               if self.allowed_lateness else ""))


@dataclass(frozen=True, eq=False)
class KeyedProcess(Unary):
    """A keyed process function with state and timers (``ops.process.KeyedProcess``)."""

    fn: Any
    keys: list[str]
    time_column: str | None = None
    output_schema: Any = None
    on_timer: Any = None

    def label(self) -> str:
        name = getattr(self.fn, "__name__", type(self.fn).__name__)
        return f"KeyedProcess {name} keys={self.keys}"


class _TwoInputs:
    """Children ``left`` and ``right`` (a mixin for the stream joins)."""

    left: Node
    right: Node

    @property
    def children(self) -> tuple[Node, ...]:
        return (self.left, self.right)

    def with_children(self, children: tuple[Node, ...]) -> Node:
        return replace(self, left=children[0], right=children[1])  # type: ignore[type-var]


@dataclass(frozen=True, eq=False)
class IntervalJoin(_TwoInputs, Node):
    """Stream-stream join on keys where ``left.t + lower <= right.t <= left.t + upper``
    (``ops.stream_join.IntervalJoin``)."""

    left: Node
    right: Node
    left_on: list[str]
    right_on: list[str]
    lower: int
    upper: int
    left_time: str
    right_time: str
    how: str = "inner"
    suffix: str = "_right"

    def label(self) -> str:
        return (f"IntervalJoin {self.how} left_on={self.left_on} right_on={self.right_on} "
                f"between=({self.lower}us, {self.upper}us) "
                f"time=({self.left_time!r}, {self.right_time!r})")


@dataclass(frozen=True, eq=False)
class WindowJoin(_TwoInputs, Node):
    """Stream-stream join of rows sharing a key and an event-time window
    (``ops.stream_join.WindowJoin``)."""

    left: Node
    right: Node
    left_on: list[str]
    right_on: list[str]
    window: Any  # expr.windows.WindowAssigner
    left_time: str
    right_time: str
    how: str = "inner"
    suffix: str = "_right"

    def label(self) -> str:
        return (f"WindowJoin {self.how} {self.window.describe()} left_on={self.left_on} "
                f"right_on={self.right_on} time=({self.left_time!r}, {self.right_time!r})")


@dataclass(frozen=True, eq=False)
class LatestJoin(_TwoInputs, Node):
    """Each left row joins the latest right row of its key so far (``ops.stream_join.LatestJoin``)."""

    left: Node
    right: Node
    left_on: list[str]
    right_on: list[str]
    how: str = "inner"
    suffix: str = "_right"
    version: str | None = None
    deleted: str | None = None

    def label(self) -> str:
        extra = (f" version={self.version!r}" if self.version else "") + \
            (f" deleted={self.deleted!r}" if self.deleted else "")
        return (f"LatestJoin {self.how} left_on={self.left_on} right_on={self.right_on}"
                f"{extra}")
