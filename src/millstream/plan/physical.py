"""Physical planning: cut the optimized logical plan into stages at shuffles.

Narrow operators are fused into the pipeline of the stage they run in; a shuffle
(group-by, join, sort, distinct, repartition, limit) closes the stages that feed it
and starts a new pipeline that reads the shuffled partitions. Aggregations get a
map-side partial step before their shuffle.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from millstream.core.shuffle import (
    HashPartitioner,
    Partitioner,
    RangePartitioner,
    RoundRobinPartitioner,
)
from millstream.io.base import Source
from millstream.ops.aggregate import FinalAggregate, PartialAggregate
from millstream.ops.base import OperatorFactory
from millstream.ops.join import BroadcastHashJoin, BroadcastLeftHashJoin, HashJoin
from millstream.ops.narrow import LocalLimit
from millstream.ops.sort import SampleKeys, Sort
from millstream.plan import logical as L


# ----------------------------------------------------------------- ports
@dataclass
class SourcePort:
    """Tasks = the source's splits."""

    source: Source

    def describe(self) -> str:
        return f"scan {self.source.describe()}"


@dataclass
class ShufflePort:
    """Task i reads reduce partition i of the stage's map outputs."""

    stage: Stage

    def describe(self) -> str:
        return f"shuffle read from stage {self.stage.id}"


@dataclass
class BlocksPort:
    """Task i reads block i of a materialized stage or cached dataset."""

    stage: Stage | None = None
    blocks: list[Any] | None = None
    label: str = ""

    def describe(self) -> str:
        if self.blocks is not None:
            return self.label or f"{len(self.blocks)} cached block(s)"
        return f"blocks of stage {self.stage.id}"


@dataclass
class Pipeline:
    """Tasks sharing a fused operator chain; ``ports`` feed the first operator."""

    ports: list[Any]
    ops: list[OperatorFactory] = field(default_factory=list)
    descriptions: list[str] = field(default_factory=list)

    def copy(self) -> Pipeline:
        return Pipeline(list(self.ports), list(self.ops), list(self.descriptions))

    def add(self, factory: OperatorFactory, text: str) -> None:
        self.ops.append(factory)
        self.descriptions.append(text)


_stage_ids = itertools.count(1)


@dataclass(eq=False)
class Stage:
    """A set of pipelines whose tasks run in parallel, ending in one kind of output."""

    pipelines: list[Pipeline]
    output_kind: str  # "shuffle" | "blocks" | "sink"
    partitioner: Partitioner | None = None
    sink: Any = None
    cache_id: int | None = None
    purpose: str = ""
    id: int = field(default_factory=lambda: next(_stage_ids))
    # filled in by the scheduler
    results: list[Any] | None = None

    @property
    def deps(self) -> list[Stage]:
        out: list[Stage] = []
        for p in self.pipelines:
            for port in p.ports:
                st = getattr(port, "stage", None)
                if st is not None and st not in out:
                    out.append(st)
            for f in p.ops:
                st = f.kwargs.get("broadcast_stage") if isinstance(f.kwargs, dict) else None
                if st is not None and st not in out:
                    out.append(st)
        if isinstance(self.partitioner, RangePartitioner) and self.sample_stage is not None:
            out.append(self.sample_stage)
        return out

    sample_stage: Stage | None = None

    def describe(self) -> str:
        lines = [f"Stage {self.id}" + (f" ({self.purpose})" if self.purpose else "") + ":"]
        for i, p in enumerate(self.pipelines):
            prefix = f"  pipeline {i}: " if len(self.pipelines) > 1 else "  "
            lines.append(prefix + " + ".join(port.describe() for port in p.ports))
            for d in p.descriptions:
                lines.append("    -> " + d)
        if self.output_kind == "shuffle":
            lines.append(f"  => shuffle write, {self.partitioner.describe()}")
        elif self.output_kind == "sink":
            lines.append(f"  => write {self.sink.describe()}")
        else:
            lines.append("  => materialize" + (f" (cache #{self.cache_id})" if self.cache_id else ""))
        return "\n".join(lines)


@dataclass
class PlannerSettings:
    shuffle_partitions: int
    broadcast_threshold: int
    cache_lookup: Any  # callable(cache_id) -> list[BlockRef] | None
    #: planning a streaming job: a Join is a stream-table join whose bounded right side is
    #: computed once and broadcast (``BroadcastTableJoin`` with ``table_node``; the streaming
    #: scheduler resolves it with ``runtime.streaming.resolve_broadcast_tables``)
    streaming: bool = False
    #: combine tumbling/sliding window rows into partial states before the key exchange
    #: (``ops.window.WindowCombiner``); ``MILLSTREAM_WINDOW_COMBINER=0`` turns it off
    window_combiner: bool = True


class PhysicalPlanner:
    """Turns an optimized logical plan into stages."""

    def __init__(self, settings: PlannerSettings) -> None:
        self.s = settings
        self.cache_stages: dict[int, Stage] = {}

    def plan(self, root: L.Node, output_kind: str = "blocks", sink: Any = None) -> Stage:
        pipes = self.build(root)
        final = Stage(pipes, output_kind, sink=sink,
                      purpose="result" if output_kind == "blocks" else "write")
        for i, st in enumerate(all_stages(final), start=1):  # stage 1 runs first
            st.id = i
        return final

    # -------------------------------------------------------------- helpers
    def _close(self, pipes: list[Pipeline], partitioner: Partitioner, purpose: str) -> Stage:
        return Stage(pipes, "shuffle", partitioner=partitioner, purpose=purpose)

    def _n(self, pipes: list[Pipeline]) -> int:
        return self.s.shuffle_partitions

    def build(self, node: L.Node) -> list[Pipeline]:
        m = getattr(self, "_build_" + type(node).__name__)
        return m(node)

    def _build_Scan(self, node: L.Scan) -> list[Pipeline]:
        return [Pipeline([SourcePort(node.source)])]

    def _build_Narrow(self, node: L.Narrow) -> list[Pipeline]:
        pipes = self.build(node.child)
        for p in pipes:
            p.add(node.factory, node.label())
        return pipes

    def _build_Union(self, node: L.Union) -> list[Pipeline]:
        out: list[Pipeline] = []
        for c in node.inputs:
            out.extend(self.build(c))
        return out

    def _build_Aggregate(self, node: L.Aggregate) -> list[Pipeline]:
        pipes = self.build(node.child)
        for p in pipes:
            p.add(OperatorFactory(PartialAggregate, node.keys, node.specs), "partial aggregate (combiner)")
        n = self._n(pipes) if node.keys else 1
        stage = self._close(pipes, HashPartitioner(list(node.keys), n), "group-by map side")
        new = Pipeline([ShufflePort(stage)])
        new.add(OperatorFactory(FinalAggregate, node.keys, node.specs, not node.keys), node.label())
        return [new]

    def _build_WithWatermark(self, node: L.WithWatermark) -> list[Pipeline]:
        from millstream.ops.watermark import EventTimeWatermark

        pipes = self.build(node.child)
        for p in pipes:
            p.add(OperatorFactory(EventTimeWatermark, node.column, node.delay, node.idle_timeout),
                  node.label())
        return pipes

    def _build_WindowAggregate(self, node: L.WindowAggregate) -> list[Pipeline]:
        from millstream.expr.windows import GlobalWindow
        from millstream.ops.window import GlobalWindowAggregate, WindowAggregate

        pipes = self.build(node.child)
        if self._combines(node, pipes):
            from millstream.core.time import MIN_WATERMARK
            from millstream.ops.window import WindowCombiner

            for p in pipes:
                p.add(OperatorFactory(WindowCombiner, node.window, list(node.keys),
                                      list(node.specs), node.time_column,
                                      node.allowed_lateness,
                                      None if self.s.streaming else MIN_WATERMARK),
                      "window combiner (partial window states)")
        n = self._n(pipes) if node.keys else 1
        stage = self._close(pipes, HashPartitioner(list(node.keys), n), "window key exchange")
        new = Pipeline([ShufflePort(stage)])
        op = GlobalWindowAggregate if isinstance(node.window, GlobalWindow) else WindowAggregate
        new.add(OperatorFactory(op, node.window, list(node.keys), list(node.specs),
                                node.time_column, node.allowed_lateness), node.label())
        return [new]

    def _combines(self, node: L.WindowAggregate, pipes: list[Pipeline]) -> bool:
        """Whether to combine window rows before the exchange: tumbling or sliding
        windows only, and not where a source of the same task can be declared idle (the
        window operator may then take a watermark ahead of that source's, and a combined
        state could arrive late, where only raw rows can go to the late side output)."""
        import os

        from millstream.expr.windows import GlobalWindow
        from millstream.ops.watermark import EventTimeWatermark

        if not self.s.window_combiner or os.environ.get("MILLSTREAM_WINDOW_COMBINER") == "0":
            return False
        if node.window.merging or isinstance(node.window, GlobalWindow):
            return False
        return not any(f.cls is EventTimeWatermark and f.create().idle_timeout is not None
                       for p in pipes for f in p.ops if isinstance(f, OperatorFactory))

    def _build_KeyedProcess(self, node: L.KeyedProcess) -> list[Pipeline]:
        from millstream.ops.state.process import KeyedProcess

        pipes = self.build(node.child)
        stage = self._close(pipes, HashPartitioner(list(node.keys), self._n(pipes)),
                            "process key exchange")
        new = Pipeline([ShufflePort(stage)])
        new.add(OperatorFactory(KeyedProcess, node.fn, list(node.keys), node.time_column,
                                output_schema=node.output_schema, on_timer=node.on_timer),
                node.label())
        return [new]

    def _build_Distinct(self, node: L.Distinct) -> list[Pipeline]:
        from millstream.ops.aggregate import DistinctFinal, DistinctPartial

        pipes = self.build(node.child)
        for p in pipes:
            p.add(OperatorFactory(DistinctPartial), "partial distinct")
        stage = self._close(pipes, HashPartitioner([], self._n(pipes)), "distinct map side")
        new = Pipeline([ShufflePort(stage)])
        new.add(OperatorFactory(DistinctFinal), "Distinct")
        return [new]

    def _build_Repartition(self, node: L.Repartition) -> list[Pipeline]:
        pipes = self.build(node.child)
        part = HashPartitioner(list(node.by), node.n) if node.by else RoundRobinPartitioner(node.n)
        stage = self._close(pipes, part, "repartition")
        return [Pipeline([ShufflePort(stage)])]

    def _build_Limit(self, node: L.Limit) -> list[Pipeline]:
        pipes = self.build(node.child)
        for p in pipes:
            p.add(OperatorFactory(LocalLimit, node.n), f"local limit {node.n}")
        stage = self._close(pipes, RoundRobinPartitioner(1), "limit")
        new = Pipeline([ShufflePort(stage)])
        new.add(OperatorFactory(LocalLimit, node.n), f"Limit {node.n}")
        return [new]

    def _build_Sort(self, node: L.Sort) -> list[Pipeline]:
        pipes = self.build(node.child)
        sample_pipes = [p.copy() for p in pipes]
        for p in sample_pipes:
            p.add(OperatorFactory(SampleKeys, list(node.by)), "sample sort keys")
        sample_stage = Stage(sample_pipes, "blocks", purpose="sort sample")
        part = RangePartitioner(list(node.by), list(node.descending), node.nulls_last,
                                self._n(pipes))
        stage = self._close(pipes, part, "sort range partition")
        stage.sample_stage = sample_stage
        new = Pipeline([ShufflePort(stage)])
        new.add(OperatorFactory(Sort, list(node.by), list(node.descending), node.nulls_last), node.label())
        return [new]

    def _build_Cache(self, node: L.Cache) -> list[Pipeline]:
        blocks = self.s.cache_lookup(node.cache_id)
        if blocks is not None:
            return [Pipeline([BlocksPort(blocks=blocks, label=f"cached dataset #{node.cache_id} "
                                                               f"({len(blocks)} partitions)")])]
        if node.cache_id not in self.cache_stages:
            pipes = self.build(node.child)
            self.cache_stages[node.cache_id] = Stage(pipes, "blocks", cache_id=node.cache_id,
                                                     purpose=f"materialize cache #{node.cache_id}")
        return [Pipeline([BlocksPort(stage=self.cache_stages[node.cache_id])])]

    def _build_Join(self, node: L.Join) -> list[Pipeline]:
        if self.s.streaming:
            from millstream.ops.stream_join import BroadcastTableJoin

            left = self.build(node.left)
            for p in left:
                p.add(OperatorFactory(BroadcastTableJoin, list(node.left_on), list(node.right_on),
                                      node.how, node.suffix, table_node=node.right),
                      node.label() + " (stream-table: bounded right side broadcast)")
            return left
        thr = self.s.broadcast_threshold
        if node.broadcast is None:
            est_r = estimate_size(node.right, self.s.cache_lookup)
            est_l = estimate_size(node.left, self.s.cache_lookup)
            small_right = est_r is not None and est_r <= thr
            small_left = est_l is not None and est_l <= thr and not small_right
        else:
            small_right, small_left = node.broadcast, False
        if small_right and node.how in ("inner", "left", "semi", "anti"):
            left = self.build(node.left)
            small = Stage(self.build(node.right), "blocks", purpose="broadcast side of join")
            for p in left:
                p.add(OperatorFactory(BroadcastHashJoin, list(node.left_on), list(node.right_on),
                                      node.how, node.suffix, broadcast_stage=small), node.label() + " (broadcast)")
            return left
        if small_left and node.how in ("inner", "right"):
            # the small LEFT side goes to every task of the right side; each right chunk is
            # joined against it (only inner and right joins can be decided chunk by chunk)
            small = Stage(self.build(node.left), "blocks", purpose="broadcast left side of join")
            right = self.build(node.right)
            for p in right:
                p.add(OperatorFactory(BroadcastLeftHashJoin, list(node.left_on), list(node.right_on),
                                      node.how, node.suffix, broadcast_stage=small),
                      node.label() + " (broadcast left)")
            return right
        left = self.build(node.left)
        right = self.build(node.right)
        n = self.s.shuffle_partitions
        ls = self._close(left, HashPartitioner(list(node.left_on), n), "join left side")
        rs = self._close(right, HashPartitioner(list(node.right_on), n), "join right side")
        new = Pipeline([ShufflePort(ls), ShufflePort(rs)])
        new.add(OperatorFactory(HashJoin, list(node.left_on), list(node.right_on), node.how, node.suffix),
                node.label() + " (shuffle hash)")
        return [new]

    def _keyed_two_inputs(self, node: Any, factory: OperatorFactory, what: str) -> list[Pipeline]:
        """Both inputs get the hidden join keys, are exchanged by them, and feed ``factory``."""
        from millstream.ops.stream_join import JoinKeys, join_key_names

        hidden = join_key_names(len(node.left_on))
        n = self.s.shuffle_partitions
        stages = []
        for side, child, keys in (("left", node.left, node.left_on),
                                  ("right", node.right, node.right_on)):
            pipes = self.build(child)
            for p in pipes:
                p.add(OperatorFactory(JoinKeys, list(keys), side), f"{what} {side} keys {keys}")
            stages.append(self._close(pipes, HashPartitioner(hidden, n), f"{what} {side} side"))
        new = Pipeline([ShufflePort(stages[0]), ShufflePort(stages[1])])
        new.add(factory, node.label())
        return [new]

    def _build_IntervalJoin(self, node: L.IntervalJoin) -> list[Pipeline]:
        from millstream.ops.stream_join import IntervalJoin

        return self._keyed_two_inputs(node, OperatorFactory(
            IntervalJoin, list(node.left_on), list(node.right_on), node.lower, node.upper,
            node.left_time, node.right_time, node.how, node.suffix), "interval join")

    def _build_WindowJoin(self, node: L.WindowJoin) -> list[Pipeline]:
        from millstream.ops.stream_join import WindowJoin

        return self._keyed_two_inputs(node, OperatorFactory(
            WindowJoin, list(node.left_on), list(node.right_on), node.window, node.left_time,
            node.right_time, node.how, node.suffix), "window join")

    def _build_LatestJoin(self, node: L.LatestJoin) -> list[Pipeline]:
        from millstream.ops.stream_join import LatestJoin

        return self._keyed_two_inputs(node, OperatorFactory(
            LatestJoin, list(node.left_on), list(node.right_on), node.how, node.suffix,
            version=node.version, deleted=node.deleted), "latest join")


def estimate_size(node: L.Node, cache_lookup: Any) -> int | None:
    """Bytes a node is expected to produce, when cheaply known (scans, caches, narrow ops)."""
    if isinstance(node, L.Scan):
        return node.source.estimated_size_bytes()
    if isinstance(node, L.Cache):
        blocks = cache_lookup(node.cache_id)
        if blocks is not None:
            return sum(b.nbytes for b in blocks)
        return estimate_size(node.child, cache_lookup)
    if isinstance(node, L.Narrow) and node.kind in ("filter", "project", "filter_fn", "drop", "rename"):
        return estimate_size(node.child, cache_lookup)
    if isinstance(node, L.Limit):
        return estimate_size(node.child, cache_lookup)
    return None


def all_stages(final: Stage) -> list[Stage]:
    """Stages in an order where every stage comes after the stages it depends on."""
    order: list[Stage] = []
    seen: set[int] = set()

    def visit(s: Stage) -> None:
        if s.id in seen:
            return
        seen.add(s.id)
        for d in s.deps:
            visit(d)
        order.append(s)

    visit(final)
    return order
