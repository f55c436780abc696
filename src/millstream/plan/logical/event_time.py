"""Event-time nodes: watermarks, window aggregation, keyed process functions and the
stream-stream joins (interval, window, latest value)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa

from millstream.expr.aggregates import AggSpec
from millstream.expr.windows import GlobalWindow, WindowAssigner
from millstream.plan import schema as S
from millstream.plan.logical.base import Node, SameColumns, Unary, agg_text, spec_refs

if TYPE_CHECKING:  # keyed state is imported by the jobs that use it
    from millstream.ops.state.process import KeyedProcessFunction


# ---------------------------------------------------------------------- event time
@dataclass(frozen=True, eq=False)
class WithWatermark(SameColumns, Unary):
    """Event time is ``column``; watermark = max event time - ``delay`` µs (streaming)."""

    accepts_updates: ClassVar[bool] = True  # (each row keeps its change kind)

    column: str
    delay: int
    idle_timeout: int | None = None

    def label(self) -> str:
        idle = f", idle_timeout={self.idle_timeout}us" if self.idle_timeout else ""
        return f"WithWatermark {self.column!r} delay={self.delay}us{idle}"

    def references(self) -> frozenset[str] | None:
        return frozenset([self.column])


@dataclass(frozen=True, eq=False)
class WindowAggregate(Unary):
    """Keyed event-time window aggregation: per key and window, ``window_start``,
    ``window_end``, keys, aggregates (global windows: keys and aggregates), plus
    ``is_update``/``is_retraction`` where updates are emitted."""

    window: WindowAssigner
    keys: tuple[str, ...]
    specs: tuple[AggSpec, ...]
    time_column: str | None
    allowed_lateness: int = 0

    def label(self) -> str:
        on = f" on {self.time_column!r}" if self.time_column is not None else ""
        return (f"Window {self.window.describe()}{on} keys={list(self.keys)} "
                f"[{agg_text(self.specs, with_args=False)}]"
                + (f" allowed_lateness={self.allowed_lateness}us" if self.allowed_lateness
                   else ""))

    def references(self) -> frozenset[str] | None:
        refs = spec_refs(self.keys, self.specs)
        return refs | {self.time_column} if self.time_column is not None else refs

    def compute_schema(self) -> pa.Schema | None:
        schema = self.input_schema()
        if schema is None:
            return None
        if self.time_column is not None:
            S.require(schema, [self.time_column], self.label())
        result = S.aggregate_schema(schema, self.keys, self.specs, self.label())
        if result is None:
            return None
        flag = pa.field("is_update", pa.bool_())
        if isinstance(self.window, GlobalWindow):
            return pa.schema([*result, flag]) if self.window.accumulate else result
        fields = [*S.window_bounds(S.event_time_zone(schema, self.time_column)), *result]
        if self.allowed_lateness > 0:
            fields.append(flag)
            if self.window.merging:
                fields.append(pa.field("is_retraction", pa.bool_()))
        return pa.schema(fields)


@dataclass(frozen=True, eq=False)
class KeyedProcess(Unary):
    """A keyed process function with state and timers; its rows have ``output_schema``
    when given (unknown otherwise)."""

    fn: KeyedProcessFunction | type[KeyedProcessFunction] | Callable[..., Any]
    keys: tuple[str, ...]
    time_column: str | None = None
    output_schema: pa.Schema | None = None
    on_timer: Callable[..., Any] | None = None

    def label(self) -> str:
        name = getattr(self.fn, "__name__", type(self.fn).__name__)
        return f"KeyedProcess {name} keys={list(self.keys)}"

    def compute_schema(self) -> pa.Schema | None:
        schema = self.input_schema()
        if schema is not None:
            S.require(schema, [*self.keys, *([self.time_column] if self.time_column else [])],
                      self.label())
        return self.output_schema if isinstance(self.output_schema, pa.Schema) else None


# ---------------------------------------------------------------------- stream joins
@dataclass(frozen=True, eq=False)
class _TwoInputs(Node):
    """Keyed stream joins: inputs ``left`` and ``right``, keys, join type and suffix."""

    left: Node
    right: Node
    left_on: tuple[str, ...]
    right_on: tuple[str, ...]

    @property
    def children(self) -> tuple[Node, ...]:
        return (self.left, self.right)

    def with_children(self, children: tuple[Node, ...]) -> Node:
        return replace(self, left=children[0], right=children[1])

    def _prefix(self, left: pa.Schema, right: pa.Schema) -> list[pa.Field]:
        return []

    def compute_schema(self) -> pa.Schema | None:
        left, right = self.left.checked_schema(), self.right.checked_schema()
        if left is None or right is None:
            return None
        return S.stream_join_schema(left, right, self.left_on, self.right_on,
                                    self.how, self.suffix,  # type: ignore[attr-defined]
                                    self.label(), self._prefix(left, right))


@dataclass(frozen=True, eq=False)
class IntervalJoin(_TwoInputs):
    """Stream-stream join on keys where ``left.t + lower <= right.t <= left.t + upper``."""

    lower: int
    upper: int
    left_time: str
    right_time: str
    how: str = "inner"
    suffix: str = "_right"

    def label(self) -> str:
        return (f"IntervalJoin {self.how} left_on={list(self.left_on)} "
                f"right_on={list(self.right_on)} between=({self.lower}us, {self.upper}us) "
                f"time=({self.left_time!r}, {self.right_time!r})")


@dataclass(frozen=True, eq=False)
class WindowJoin(_TwoInputs):
    """Stream-stream join of rows sharing a key and an event-time window; the output
    starts with ``window_start`` and ``window_end``."""

    window: WindowAssigner
    left_time: str
    right_time: str
    how: str = "inner"
    suffix: str = "_right"

    def label(self) -> str:
        return (f"WindowJoin {self.how} {self.window.describe()} left_on={list(self.left_on)} "
                f"right_on={list(self.right_on)} time=({self.left_time!r}, "
                f"{self.right_time!r})")

    def _prefix(self, left: pa.Schema, right: pa.Schema) -> list[pa.Field]:
        tz = S.event_time_zone(left, self.left_time) or S.event_time_zone(right,
                                                                          self.right_time)
        return S.window_bounds(tz)


@dataclass(frozen=True, eq=False)
class LatestJoin(_TwoInputs):
    """Each left row joins the latest right row of its key so far (a changelog)."""

    how: str = "inner"
    suffix: str = "_right"
    version: str | None = None
    deleted: str | None = None

    def label(self) -> str:
        extra = (f" version={self.version!r}" if self.version else "") + \
            (f" deleted={self.deleted!r}" if self.deleted else "")
        return (f"LatestJoin {self.how} left_on={list(self.left_on)} "
                f"right_on={list(self.right_on)}{extra}")
