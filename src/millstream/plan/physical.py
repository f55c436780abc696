"""Physical planning: cut the optimized logical plan into stages at shuffles.

Each logical node becomes operators here: narrow nodes are fused into the pipeline of the
stage they run in; a shuffle (group-by, join, sort, distinct, repartition, limit, a
MapReduce step's reducers) closes the stages that feed it and starts a new pipeline that
reads the shuffled partitions. Aggregations get a map-side partial step before their
shuffle. The data structures are in ``plan/stages.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from millstream.core.shuffle import (
    HashPartitioner,
    Partitioner,
    RangePartitioner,
    RoundRobinPartitioner,
)
from millstream.core.time import MIN_WATERMARK
from millstream.core.units import format_size
from millstream.errors import PlanError
from millstream.expr.aggregates import AggSpec
from millstream.expr.windows import GlobalWindow
from millstream.ops import narrow
from millstream.ops.aggregate import (
    DistinctFinal,
    DistinctPartial,
    FinalAggregate,
    PartialAggregate,
)
from millstream.ops.base import OperatorFactory
from millstream.ops.sort import Sort
from millstream.ops.topk import TopK
from millstream.ops.watermark import EventTimeWatermark
from millstream.plan import logical as L
from millstream.plan.bounds import row_bound
from millstream.plan.fingerprint import Fingerprints
from millstream.plan.physical_joins import JoinPlanning
from millstream.plan.stages import (
    AdaptiveGather,
    BlocksPort,
    Pipeline,
    ShufflePort,
    SourcePort,
    Stage,
    all_stages,
)
from millstream.plan.stats import Estimator


@dataclass
class PlannerSettings:
    """What the planner needs to know of the session and the job."""

    shuffle_partitions: int
    broadcast_threshold: int
    #: cached blocks of a cache id, or None when not (or no longer) cached
    cache_lookup: Callable[[int], list[Any] | None]
    #: planning a streaming job: a Join is a stream-table join whose bounded right side is
    #: computed once and broadcast (``BroadcastTableJoin`` with ``table_node``; the streaming
    #: scheduler resolves it with ``runtime.streaming.resolve_broadcast_tables``)
    streaming: bool = False
    #: combine tumbling/sliding window rows into partial states before the key exchange
    #: (``ops.window.WindowCombiner``); ``MILLSTREAM_WINDOW_COMBINER=0`` turns it off
    window_combiner: bool = True
    #: a sort (or top-k) whose input is at most this many rows and bytes runs in one
    #: task: decided here when the plan bounds the rows for sure, else at run time from
    #: the measured input (``runtime/gather.py``); 0 rows: always range-partitioned
    small_sort_rows: int = 100_000
    small_sort_bytes: int = 4 << 20


def narrow_factory(node: L.Node) -> OperatorFactory:
    """The operator of a per-batch node (one of ``L.NARROW_NODES``)."""
    if isinstance(node, L.Map):
        return OperatorFactory(narrow.MapRows, node.fn)
    if isinstance(node, L.FlatMap):
        return OperatorFactory(narrow.FlatMapRows, node.fn)
    if isinstance(node, L.FilterRows):
        return OperatorFactory(narrow.FilterRows, node.fn)
    if isinstance(node, L.MapBatches):
        return OperatorFactory(narrow.MapBatches, node.fn, node.batch_format,
                               dict(node.fn_kwargs))
    if isinstance(node, L.Filter):
        return OperatorFactory(narrow.FilterExpr, node.predicate)
    if isinstance(node, L.Project):
        return OperatorFactory(narrow.Project, list(node.exprs))
    if isinstance(node, L.WithColumns):
        return OperatorFactory(narrow.WithColumns, list(node.exprs))
    if isinstance(node, L.Drop):
        return OperatorFactory(narrow.Drop, list(node.columns), node.strict)
    if isinstance(node, L.Rename):
        return OperatorFactory(narrow.Rename, dict(node.mapping), node.strict)
    if isinstance(node, L.Explode):
        return OperatorFactory(narrow.Explode, node.column)
    raise TypeError(f"{type(node).__name__} is not a per-batch node")


#: Per-batch operators cheap enough to run again rather than materialize their output.
_CHEAP_OPS = (narrow.FilterExpr, narrow.Project, narrow.WithColumns, narrow.Drop, narrow.Rename)


def cheap_to_rerun(pipes: list[Pipeline]) -> bool:
    """Whether running ``pipes`` again costs about what reading a materialized copy would:
    they read sources that re-read cheaply (or cached blocks) through expression
    operators only (no shuffle input, no Python function, no join)."""
    for p in pipes:
        for port in p.ports:
            if isinstance(port, SourcePort):
                if not port.source.rereads_cheaply:
                    return False
            elif not (isinstance(port, BlocksPort) and (port.blocks is not None or (
                    port.stage is not None and port.stage.cache_id is not None))):
                return False
        if any(not (isinstance(f, OperatorFactory) and f.cls in _CHEAP_OPS) for f in p.ops):
            return False
    return True


class PhysicalPlanner(JoinPlanning):
    """Turns an optimized logical plan into stages."""

    def __init__(self, settings: PlannerSettings) -> None:
        self.s = settings
        self.cache_stages: dict[int, Stage] = {}
        self.estimator = Estimator(settings.cache_lookup)
        self._fps = Fingerprints()
        #: shared sub-plans: consumers per fingerprint, and the stage each runs in (None:
        #: re-run by each consumer)
        self._shared_uses: dict[int, int] = {}
        self.shared_stages: dict[int, Stage | None] = {}

    def plan(self, root: L.Node, output_kind: str = "blocks", sink: Any = None) -> Stage:
        """The final stage of ``root`` (ending in ``output_kind``), its inputs below it."""
        self._shared_uses = self._count_shared(root)
        pipes = self.build(root)
        final = Stage(pipes, output_kind, sink=sink,
                      purpose="result" if output_kind == "blocks" else "write")
        for i, st in enumerate(all_stages(final), start=1):  # stage 1 runs first
            st.id = i
        label_mapreduce_stages(final)
        return final

    def _count_shared(self, root: L.Node) -> dict[int, int]:
        """How often the planner will reach each shared sub-plan (a streaming join's
        bounded right side runs as a job of its own and does not count)."""
        uses: dict[int, int] = {}

        def visit(n: L.Node) -> None:
            if isinstance(n, L.Shared):
                key = self._fps.of(n)
                uses[key] = uses.get(key, 0) + 1
                if uses[key] > 1:
                    return
            children = n.children
            if self.s.streaming and isinstance(n, L.Join) and not n.joins_streams():
                children = (n.left,)  # a stream-table join's right side is a batch job
            for c in children:
                visit(c)

        visit(root)
        return uses

    # -------------------------------------------------------------- helpers
    def _close(self, pipes: list[Pipeline], partitioner: Partitioner, purpose: str) -> Stage:
        return Stage(pipes, "shuffle", partitioner=partitioner, purpose=purpose)

    def _n(self, pipes: list[Pipeline]) -> int:
        return self.s.shuffle_partitions

    def build(self, node: L.Node) -> list[Pipeline]:
        """The pipelines producing ``node``'s rows (open: more operators may follow)."""
        if isinstance(node, L.NARROW_NODES):
            pipes = self.build(node.children[0])
            for p in pipes:
                p.add(narrow_factory(node), node.label())
            return pipes
        m = getattr(self, "_build_" + type(node).__name__)
        return m(node)

    def _build_Scan(self, node: L.Scan) -> list[Pipeline]:
        return [Pipeline([SourcePort(node.source)])]

    def _build_Union(self, node: L.Union) -> list[Pipeline]:
        out: list[Pipeline] = []
        for c in node.inputs:
            out.extend(self.build(c))
        return out

    def _build_Aggregate(self, node: L.Aggregate) -> list[Pipeline]:
        pipes = self.build(node.child)
        keys, specs = list(node.keys), list(node.specs)
        if self.s.streaming:  # a result per key, updated as rows come (a changelog)
            from millstream.ops.changelog import ChangelogAggregate

            new = self._keyed(pipes, keys, "group-by key exchange")
            new.add(OperatorFactory(ChangelogAggregate, keys, specs,
                                    node.child.emits_updates),
                    node.label() + " (continuous, emits updates)")
            return [new]
        for p in pipes:
            if not p.ops and keys:  # a scan read for a group-by (parquet: see for_aggregation)
                p.ports = [SourcePort(port.source.for_aggregation(keys))
                           if isinstance(port, SourcePort)
                           and hasattr(port.source, "for_aggregation") else port
                           for port in p.ports]
            p.add(OperatorFactory(PartialAggregate, keys, specs), "partial aggregate (combiner)")
        n = self._n(pipes) if keys else 1
        stage = self._close(pipes, HashPartitioner(list(keys), n), "group-by map side")
        new = Pipeline([ShufflePort(stage)])
        new.add(OperatorFactory(FinalAggregate, keys, specs, not keys), node.label())
        return [new]

    def _build_WithWatermark(self, node: L.WithWatermark) -> list[Pipeline]:
        pipes = self.build(node.child)
        for p in pipes:
            p.add(OperatorFactory(EventTimeWatermark, node.column, node.delay, node.idle_timeout),
                  node.label())
        return pipes

    def _build_WindowAggregate(self, node: L.WindowAggregate) -> list[Pipeline]:
        from millstream.ops.window import GlobalWindowAggregate, WindowAggregate, WindowCombiner

        pipes = self.build(node.child)
        keys, specs = list(node.keys), list(node.specs)
        if self._combines(node, pipes):
            for p in pipes:
                p.add(OperatorFactory(WindowCombiner, node.window, list(keys), list(specs),
                                      node.time_column, node.allowed_lateness,
                                      None if self.s.streaming else MIN_WATERMARK),
                      "window combiner (partial window states)")
        n = self._n(pipes) if keys else 1
        stage = self._close(pipes, HashPartitioner(list(keys), n), "window key exchange")
        new = Pipeline([ShufflePort(stage)])
        op = GlobalWindowAggregate if isinstance(node.window, GlobalWindow) else WindowAggregate
        new.add(OperatorFactory(op, node.window, keys, specs, node.time_column,
                                node.allowed_lateness), node.label())
        return [new]

    def _combines(self, node: L.WindowAggregate, pipes: list[Pipeline]) -> bool:
        """Whether to combine window rows before the exchange: tumbling or sliding
        windows only, and not where a source of the same task can be declared idle (the
        window operator may then take a watermark ahead of that source's, and a combined
        state could arrive late, where only raw rows can go to the late side output)."""
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

    def _keyed(self, pipes: list[Pipeline], keys: list[str], purpose: str) -> Pipeline:
        """A pipeline reading ``pipes``' rows exchanged by ``keys`` (all to one partition
        without keys)."""
        n = self._n(pipes) if keys else 1
        stage = self._close(pipes, HashPartitioner(list(keys), n), purpose)
        return Pipeline([ShufflePort(stage)])

    def _build_Deduplicate(self, node: L.Deduplicate) -> list[Pipeline]:
        from millstream.ops.changelog import Deduplicate

        new = self._keyed(self.build(node.child), list(node.subset), "deduplication exchange")
        new.add(OperatorFactory(Deduplicate, list(node.subset), node.keep, node.within,
                                node.time_column, not self.s.streaming), node.label())
        return [new]

    def _build_TopN(self, node: L.TopN) -> list[Pipeline]:
        from millstream.ops.changelog import TopN

        new = self._keyed(self.build(node.child), list(node.per), "top-n exchange")
        new.add(OperatorFactory(TopN, node.n, list(node.by), list(node.descending),
                                list(node.per), node.rank_column, node.nulls_last,
                                self.s.streaming and node.child.emits_updates,
                                not self.s.streaming), node.label())
        return [new]

    def _build_ToChangelog(self, node: L.ToChangelog) -> list[Pipeline]:
        from millstream.ops.changelog import ToChangelog

        pipes = self.build(node.child)
        for p in pipes:
            p.add(OperatorFactory(ToChangelog, node.column), node.label())
        return pipes

    def _build_FromChangelog(self, node: L.FromChangelog) -> list[Pipeline]:
        """Streaming: the change column becomes the rows' kinds. Batch: the rows the
        changelog leaves (net copies of each distinct row, by a grouping by all columns)."""
        from millstream.ops.changelog import ChangeSigns, ExpandNet, FromChangelog
        from millstream.ops.changelog.convert import NET

        pipes = self.build(node.child)
        if self.s.streaming:
            for p in pipes:
                p.add(OperatorFactory(FromChangelog, node.column), node.label())
            return pipes
        schema = node.schema
        if schema is None:
            raise PlanError(f"{node.label()}: reading a changelog in batch mode needs its "
                            f"columns known (give the source a schema)")
        keys, specs = list(schema.names), [AggSpec("sum", NET, NET)]
        for p in pipes:
            p.add(OperatorFactory(ChangeSigns, node.column), "change kinds as +1/-1 copies")
            p.add(OperatorFactory(PartialAggregate, keys, specs), "partial net copies")
        stage = self._close(pipes, HashPartitioner(keys, self._n(pipes)), "changelog rows")
        new = Pipeline([ShufflePort(stage)])
        new.add(OperatorFactory(FinalAggregate, keys, specs), "net copies per row")
        new.add(OperatorFactory(ExpandNet), node.label() + " (the rows it leaves)")
        return [new]

    def _build_Distinct(self, node: L.Distinct) -> list[Pipeline]:
        if self.s.streaming:
            schema = node.child.schema
            if schema is None:
                raise PlanError(f"{node.label()}: distinct() on a stream needs its columns "
                                f"known; use drop_duplicates(subset=[...])")
            if node.child.emits_updates:  # a row per distinct row held: counted per row
                from millstream.ops.changelog import ChangelogAggregate

                keys = list(schema.names)
                new = self._keyed(self.build(node.child), keys, "distinct exchange")
                new.add(OperatorFactory(ChangelogAggregate, keys, [], True),
                        node.label() + " (of a changelog, emits updates)")
                return [new]
            # the first of each row: deduplication by every column
            return self._build_Deduplicate(L.Deduplicate(node.child, tuple(schema.names)))
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
            p.add(OperatorFactory(narrow.LocalLimit, node.n), f"local limit {node.n}")
        stage = self._close(pipes, RoundRobinPartitioner(1), "limit")
        new = Pipeline([ShufflePort(stage)])
        new.add(OperatorFactory(narrow.LocalLimit, node.n), f"Limit {node.n}")
        return [new]

    def _build_Sort(self, node: L.Sort) -> list[Pipeline]:
        """A global sort reads its input once: the input is materialized while its sort
        keys are sampled, then range-partitioned by boundaries from the sample, and each
        partition sorted. A small input is sorted in one task instead: without sampling
        nor range shuffle when the plan bounds its rows for sure (a global aggregate, a
        limit, a group-by by keys of few values), else as the scheduler decides from the
        measured input (``AdaptiveGather``)."""
        pipes = self.build(node.child)
        sort = OperatorFactory(Sort, list(node.by), list(node.descending), node.nulls_last)
        source = Stage(pipes, "blocks", purpose="sort input")
        sure = self._surely_small(node.child)
        if sure is not None:
            new = Pipeline([BlocksPort(stage=source)], single_task=True)
            new.add(sort, f"{node.label()} (one task: {sure})")
            new.gather = AdaptiveGather(source, None, self.s.small_sort_rows,
                                        self.s.small_sort_bytes, "sort", planned=sure)
            return [new]
        source.sample_by = list(node.by)
        part = RangePartitioner(list(node.by), list(node.descending), node.nulls_last,
                                self._n(pipes))
        stage = self._close([Pipeline([BlocksPort(stage=source)])], part,
                            "sort range partition")
        stage.sample_stage = source
        new = Pipeline([ShufflePort(stage)])
        text = node.label()
        if self._gathers():
            new.gather = AdaptiveGather(source, stage, self.s.small_sort_rows,
                                        self.s.small_sort_bytes, "sort")
            text += f" (adaptive: {self._one_task_text()}, else range-partitioned)"
        new.add(sort, text)
        return [new]

    def _gathers(self) -> bool:
        """Whether a sort's or top-k's last step may run in one task when small."""
        return not self.s.streaming and self.s.small_sort_rows > 0 \
            and self.s.small_sort_bytes > 0

    def _one_task_text(self) -> str:
        return (f"one task when its input measures <= {self.s.small_sort_rows} rows and "
                f"{format_size(self.s.small_sort_bytes)}")

    def _surely_small(self, node: L.Node) -> str | None:
        """Why ``node``'s rows are surely few enough to sort in one task, or None."""
        if not self._gathers():
            return None
        bound = row_bound(node)
        if bound is None or bound > self.s.small_sort_rows:
            return None
        est = self.estimator.estimate(node)
        if est is not None and bound * est.width > self.s.small_sort_bytes:
            return None
        return f"at most {bound:.0f} rows by the plan's statistics"

    def _build_Window(self, node: L.Window) -> list[Pipeline]:
        """A hash shuffle by the partition keys (one partition without keys), then one
        sorting operator per order of the functions. A Window over one with the same
        partition keys (through per-batch nodes that keep them) reuses its shuffle."""
        if self.s.streaming:
            raise PlanError(f"{node.label()}: window functions over partitions cannot run in a "
                            f"streaming job in this version (they need the whole partition)")
        from millstream.ops.analytic import AnalyticWindow

        pipes = self.build(node.child)
        if window_partitioning(node.child) != node.partition_by:
            keys = list(node.partition_by)
            part = HashPartitioner(keys, self._n(pipes)) if keys else RoundRobinPartitioner(1)
            stage = self._close(pipes, part, "window partition exchange")
            pipes = [Pipeline([ShufflePort(stage)])]
        groups = node.sort_groups()
        # the operators append columns group by group; the last puts them in the node's order
        grouped = [f.name for g in groups for f in g] != [f.name for f in node.functions]
        schema = node.schema if grouped else None
        for i, group in enumerate(groups):
            order = schema.names if schema is not None and i == len(groups) - 1 else None
            text = ", ".join(f.describe() for f in group)
            for p in pipes:
                p.add(OperatorFactory(AnalyticWindow, list(node.partition_by), group, order),
                      f"Window partition_by={list(node.partition_by)} [{text}]")
        return pipes

    def _build_TopK(self, node: L.TopK) -> list[Pipeline]:
        """A top-k per task, then one task's top-k of those (no sort, no sample); when
        what the partial step reads measures small, it runs in that one task too."""
        pipes = self.build(node.child)
        args = (list(node.by), list(node.descending), node.n, node.nulls_last)
        for p in pipes:
            p.add(OperatorFactory(TopK, *args), f"partial top-{node.n}")
        stage = self._close(pipes, RoundRobinPartitioner(1), "top-k")
        new = Pipeline([ShufflePort(stage)])
        text = node.label()
        if self._gathers():
            new.gather = AdaptiveGather(stage, None, self.s.small_sort_rows,
                                        self.s.small_sort_bytes, "top-k")
            text += f" (adaptive: the partial step in this task when its input measures " \
                    f"<= {self.s.small_sort_rows} rows and " \
                    f"{format_size(self.s.small_sort_bytes)})"
        new.add(OperatorFactory(TopK, *args), text)
        return [new]

    def _build_Shared(self, node: L.Shared) -> list[Pipeline]:
        """A sub-plan several consumers read runs once: batch materializes it (unless
        re-running it is as cheap), streaming forwards its rows to every consumer."""
        key = self._fps.of(node)
        if self._shared_uses.get(key, 0) < 2:
            return self.build(node.child)
        if key not in self.shared_stages:
            pipes = self.build(node.child)
            uses = self._shared_uses[key]
            what = f"shared sub-plan #{node.shared_id}, {uses} consumers"
            if self.s.streaming:
                stage = Stage(pipes, "shuffle", partitioner=RoundRobinPartitioner(
                    self.s.shuffle_partitions), purpose=what, forward=True)
            elif cheap_to_rerun(pipes):
                self.shared_stages[key] = None
                return pipes
            else:
                stage = Stage(pipes, "blocks", purpose=what)
            self.shared_stages[key] = stage
        stage = self.shared_stages[key]
        if stage is None:
            return self.build(node.child)
        port = ShufflePort(stage) if self.s.streaming else BlocksPort(stage=stage)
        return [Pipeline([port])]

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

    def _build_MapReduceStep(self, node: L.MapReduceStep) -> list[Pipeline]:
        """The mapper (and combiner) fused into the input's tasks; unless map-only, a hash
        shuffle by key (or by the step's partitioner) and the reducer."""
        from millstream.ops.mapreduce.mapper import MapperOp
        from millstream.ops.mapreduce.reducer import ReducerOp
        from millstream.ops.mapreduce.step import KEY_COLUMN, PART_COLUMN

        pipes = self.build(node.child)
        out = "final" if node.last else "exact"
        args = (node.payload, node.step, node.job)
        if node.num_reducers is None:
            mapper = OperatorFactory(MapperOp, *args, out, 1, node.strict_types)
            for p in pipes:
                p.add(mapper, mapper.describe())
            return pipes
        n = node.num_reducers
        mapper = OperatorFactory(MapperOp, *args, "shuffle", n)
        for p in pipes:
            p.add(mapper, mapper.describe())
        by = PART_COLUMN if node.partitioned else KEY_COLUMN
        stage = self._close(pipes, HashPartitioner([by], n), "repartition")
        new = Pipeline([ShufflePort(stage)])
        reducer = OperatorFactory(ReducerOp, *args, out, n, node.strict_types)
        new.add(reducer, reducer.describe())
        return [new]


def label_mapreduce_stages(final: Stage) -> None:
    """Name the stages that run MapReduce steps after them ("step 1 map", "step 1 reduce +
    step 2 map", ...): progress, statistics and failure messages use these names."""
    roles = {"MapperOp": "map", "ReducerOp": "reduce"}
    for st in all_stages(final):
        parts: list[str] = []
        for pipe in st.pipelines:
            for f in pipe.ops:
                # by name: the MapReduce operators are imported only by jobs that use them
                role = roles.get(f.cls.__name__)
                if role is not None and f.cls.__module__.startswith("millstream.ops.mapreduce."):
                    text = f"step {f.args[1] + 1} {role}"
                    if text not in parts:
                        parts.append(text)
        if parts:
            st.purpose = " + ".join(parts)


def window_partitioning(node: L.Node) -> tuple[str, ...] | None:
    """The partition keys of a Window below ``node`` whose partitioning still holds (per-batch
    nodes that keep the key columns in between), else None."""
    if isinstance(node, L.Window):
        return node.partition_by
    if isinstance(node, (L.Filter, L.WithColumns, L.Drop)):
        keys = window_partitioning(node.child)
        touched = node.produced() if isinstance(node, L.WithColumns) else \
            set(node.columns) if isinstance(node, L.Drop) else set()
        return keys if keys is not None and not set(keys) & touched else None
    return None
