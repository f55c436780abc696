"""What a streaming job's physical plan becomes: checks, options, and the task layout.

Every stage partition of the plan is one long-lived task (a *chain* of operators); this
module checks that a logical plan can run as a stream, resolves the bounded sides of
stream-table joins, and lays out the chains: their sources, senders, input ports,
outputs (exchange by key group, by a partitioner, to a sink or to the driver), and the
signature checkpoints are matched against. Where the tasks run is the hosts' business.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import pyarrow as pa

from millstream.core.keygroups import key_group_owners
from millstream.core.shuffle import HashPartitioner
from millstream.core.time import WallClock
from millstream.core.units import parse_size
from millstream.errors import PlanError
from millstream.ops.base import OperatorFactory
from millstream.plan import logical as L
from millstream.plan.stages import ShufflePort, SourcePort, Stage
from millstream.runtime.streaming.spec import Output

_log = logging.getLogger(__name__)

#: Logical nodes a streaming job can run (the others need all their input first). A
#: ``Join`` is a stream-table join (its bounded right side broadcast) or a regular join of
#: two streams (``Join.joins_streams``).
_STREAMABLE = (L.Scan, *L.NARROW_NODES, L.WithWatermark, L.WindowAggregate, L.KeyedProcess,
               L.Union, L.Repartition, L.IntervalJoin, L.WindowJoin, L.LatestJoin,
               L.MapReduceStep, L.Shared, L.Aggregate, L.Distinct, L.Deduplicate,
               L.TopN, L.ToChangelog, L.FromChangelog)
#: Join types a stream-table join can decide batch by batch.
_STREAM_TABLE_HOW = ("inner", "left", "semi", "anti")

EXECUTORS = ("parallel", "inline")
#: Overrides the default executor (e.g. to run a test suite on the other one).
EXECUTOR_ENV = "MILLSTREAM_STREAMING_EXECUTOR"


# ----------------------------------------------------------------------------- checks


def scans(node: L.Node) -> list[L.Scan]:
    """The scans below ``node``."""
    out = [node] if isinstance(node, L.Scan) else []
    for c in node.children:
        out.extend(scans(c))
    return out


def _check_stream_table_join(node: L.Join) -> None:
    """A stream-table join (the bounded right side is broadcast)."""
    if node.state_ttl is not None:
        raise PlanError(
            f"{node.label()}: state_ttl applies to a join of two streams, but the right side "
            f"is bounded and broadcast (it keeps no state); pass broadcast=False to join it "
            f"as a stream, with keyed state on both sides")
    if node.how not in _STREAM_TABLE_HOW:
        raise PlanError(
            f"{node.label()}: a {node.how} join of a stream with a bounded table needs the "
            f"end of the stream; a streaming job supports how={', '.join(_STREAM_TABLE_HOW)} "
            f"for it, or join the table as a stream with broadcast=False (a regular join: "
            f"its outer rows are updated as the stream comes)")


#: Join types a regular join of two streams supports.
_STREAM_STREAM_HOW = ("inner", "left", "right", "outer")


def _check_regular_join(node: L.Join) -> None:
    """A join of two streams (a regular join with keyed state on both sides)."""
    if node.broadcast:
        raise PlanError(f"{node.label()}: broadcast=True, but the right side reads a stream; "
                        f"a streaming job broadcasts bounded datasets only")
    if node.how not in _STREAM_STREAM_HOW:
        raise PlanError(f"{node.label()}: a {node.how} join of two streams is not supported "
                        f"in this version; how={', '.join(_STREAM_STREAM_HOW)} are")
    if not node.left_on:
        raise PlanError(f"{node.label()}: a join of two streams needs equal keys (on=, or "
                        f"left_on=/right_on=): its state is kept per key; a condition alone "
                        f"or a cross join of two streams is not supported")


def check_streamable(node: L.Node) -> None:
    """Raise a PlanError when ``node`` cannot run as a stream."""
    if isinstance(node, L.Join) and node.joins_streams():
        _check_regular_join(node)
        check_streamable(node.left)
        check_streamable(node.right)
        return
    if isinstance(node, L.Join):
        _check_stream_table_join(node)
        check_streamable(node.left)  # the bounded right side runs as a batch job
        return
    if not isinstance(node, _STREAMABLE):
        hint = ""
        if isinstance(node, (L.Sort, L.TopK, L.Limit)):
            hint = " (top_n(n, by=..., per=[...]) keeps the first rows of each group up to date)"
        raise PlanError(f"{node.label()} cannot run on an unbounded stream in this version"
                        f"{hint}; streamable: map/filter/select-style operations, "
                        f"with_watermark, window(...).agg(...), group_by(...).agg(...) "
                        f"(updated per key), drop_duplicates, distinct, top_n, "
                        f"group_by(...).process(...), union, interval_join, window_join, "
                        f"join_latest, and join (of two streams, or with a bounded dataset)")
    for c in node.children:
        check_streamable(c)


def choose_executor(node: L.Node, executor: str | None, options: dict[str, Any]) -> str:
    """``executor`` if given; else "inline" when the job needs this process (a source fed by
    the test, a virtual clock, fault points), else "parallel" (or
    ``$MILLSTREAM_STREAMING_EXECUTOR``)."""
    if executor is not None:
        if executor not in EXECUTORS:
            raise PlanError(f"executor must be one of {EXECUTORS}, got {executor!r}")
        return executor
    clock = options.get("clock")
    if options.get("_fault") is not None or (clock is not None
                                             and not isinstance(clock, WallClock)):
        return "inline"
    if any(s.source.in_process_only or s.source.prefers_inline for s in scans(node)):
        return "inline"
    env = os.environ.get(EXECUTOR_ENV)
    if env:
        if env not in EXECUTORS:
            raise PlanError(f"${EXECUTOR_ENV} must be one of {EXECUTORS}, got {env!r}")
        return env
    return "parallel"


def key_groups_option(key_groups: int | None, max_parallelism: int | None) -> int | None:
    """The number of key groups a job asks for (the two names are one setting), or None."""
    if key_groups is not None and max_parallelism is not None and key_groups != max_parallelism:
        raise PlanError(f"key_groups ({key_groups}) and max_parallelism ({max_parallelism}) "
                        f"are the same setting; give one")
    wanted = key_groups if key_groups is not None else max_parallelism
    if wanted is not None and int(wanted) < 1:
        raise PlanError(f"key_groups must be a positive number, got {wanted!r}")
    return int(wanted) if wanted is not None else None


def task_budget(memory_limit: int | str | None, tasks: int = 1) -> dict[str, int]:
    """TaskContext settings for a per-task ``memory_limit`` (bytes or "64MB"); None: the
    session's memory limit (a quarter of the machine's memory unless set) shared by the
    job's ``tasks``. Stateful operators keep half of it in memory and spill the rest."""
    size = parse_size(memory_limit)
    if size is not None and size < 0:
        raise PlanError(f"memory_limit must be a positive size, got {memory_limit!r}")
    if size is None:
        from millstream.runtime.session import get_session

        size = max(64 << 20, get_session().settings.resolved_memory_limit() // max(1, tasks))
    return {"memory_budget": int(size)}


# ----------------------------------------------------------------------------- bounded sides


def compute_bounded(node: L.Node) -> pa.Table:
    """Run the bounded plan ``node`` as a batch job on the session's runner; its rows."""
    from millstream.runtime.actions import to_table
    from millstream.runtime.session import effective_settings

    return to_table(node, effective_settings({}))


def resolve_broadcast_tables(stages: list[Stage]) -> None:
    """Compute the bounded side of every stream-table join once and give it to its operators.

    Operator factories with a ``table_node`` (planned with ``PlannerSettings(streaming=
    True)``) are replaced, in place, by factories holding the computed ``table``.
    """
    tables: dict[int, pa.Table] = {}
    for stage in stages:
        for pipe in stage.pipelines:
            for i, f in enumerate(pipe.ops):
                node = f.kwargs.get("table_node") if isinstance(f.kwargs, dict) else None
                if node is None:
                    continue
                if id(node) not in tables:
                    started = time.perf_counter()
                    tables[id(node)] = compute_bounded(node)
                    _log.info("stream-table join: computed the bounded side (%d rows) in %.3fs",
                              tables[id(node)].num_rows, time.perf_counter() - started)
                kwargs = dict(f.kwargs)
                kwargs.pop("table_node")
                kwargs["table"] = tables[id(node)]
                pipe.ops[i] = OperatorFactory(f.cls, *f.args, **kwargs)


# ----------------------------------------------------------------------------- layout


def keyed_exchange(stage: Stage) -> bool:
    """True when ``stage`` feeds its consumers by a hash of key columns (key groups)."""
    part = stage.partitioner
    return isinstance(part, HashPartitioner) and bool(part.keys)


class Chain:
    """One stage partition: the facts its task's spec is built from."""

    def __init__(self, index: int, key: tuple[int, int, int], stage: Stage, pipe: Any,
                 ops: list[Any], n: int) -> None:
        self.index = index
        self.key = key
        self.stage = stage
        self.pipe = pipe
        self.ops = ops  # instances for names and flags only (never opened)
        self.n = n  # chains of this pipeline
        self.source: tuple[Any, Any] | None = None  # (StreamSource, partition id)
        self.key_grouped = False
        self.senders: list[int] = []
        self.sender_ports: dict[int, int] = {}

    @property
    def is_sink(self) -> bool:
        """Whether the chain's output leaves the job (a sink or the driver)."""
        return self.stage.output_kind != "shuffle"


class Layout:
    """The chains of a streaming job's stages, with who feeds whom."""

    def __init__(self, stages: list[Stage], parallelism: int, stop_at_end: bool) -> None:
        self.stages = stages
        chains: list[Chain] = []
        by_stage: dict[int, list[Chain]] = {}
        #: exchange stage id -> [(consumer chains, their input port)] (several: a shared
        #: sub-plan's forward stage)
        self.consumers: dict[int, list[tuple[list[Chain], int]]] = {}
        sources: dict[int, Any] = {}
        for si, stage in enumerate(stages):
            if stage.output_kind == "shuffle" and stage.partitioner is None:
                raise PlanError(f"stage {stage.id}: a shuffle without a partitioner")
            for pi, pipe in enumerate(stage.pipelines):
                for port in pipe.ports:
                    if not isinstance(port, (SourcePort, ShufflePort)):
                        raise PlanError(f"{port.describe()} cannot run in a streaming job")
                src = None
                if isinstance(pipe.ports[0], SourcePort):
                    if len(pipe.ports) != 1:
                        raise PlanError("a pipeline reads one source")
                    port = pipe.ports[0]
                    src = sources.get(id(port.source))
                    if src is None:
                        src = sources[id(port.source)] = port.source.as_stream(parallelism,
                                                                                stop_at_end)
                    parts = src.partitions()
                else:
                    # (a broadcast input reaches every task, however many there are)
                    sized = [p for p in pipe.ports if not p.stage.broadcast] or pipe.ports
                    counts = {len(by_stage[p.stage.id]) if p.stage.forward
                              else p.stage.partitioner.num_partitions for p in sized}
                    if len(counts) != 1:
                        raise PlanError(f"stage {stage.id}: its input exchanges disagree on the "
                                        f"number of partitions {sorted(counts)}")
                    parts = list(range(counts.pop()))
                mine: list[Chain] = []
                for ci, part in enumerate(parts):
                    c = Chain(len(chains), (si, pi, ci), stage, pipe,
                              [f.create() for f in pipe.ops] if ci == 0 else mine[0].ops,
                              len(parts))
                    if src is not None:
                        c.source = (src, part)
                    chains.append(c)
                    mine.append(c)
                by_stage.setdefault(stage.id, []).extend(mine)
                for j, port in enumerate(pipe.ports):
                    if isinstance(port, ShufflePort):
                        self.consumers.setdefault(port.stage.id, []).append((mine, j))
        for c in chains:
            for j, port in enumerate(c.pipe.ports):
                if isinstance(port, ShufflePort):
                    senders = by_stage[port.stage.id]
                    if port.stage.forward:  # one sender: the same-numbered upstream chain
                        senders = [senders[c.key[2]]]
                    c.senders.extend(p.index for p in senders)
                    c.sender_ports.update({p.index: j for p in senders})
                    if keyed_exchange(port.stage) or port.stage.broadcast:
                        # (a broadcast join checkpoints its state per key group too)
                        c.key_grouped = True
        self.by_stage = by_stage
        self.chains = chains

    @property
    def sources(self) -> list[Chain]:
        return [c for c in self.chains if c.source is not None]

    @property
    def sinks(self) -> list[Chain]:
        return [c for c in self.chains if c.is_sink]

    def signature(self) -> list[Any]:
        """The pipeline: operator names per (stage, pipeline), independent of parallelism."""
        seen: dict[tuple[int, int], list[str]] = {}
        for c in self.chains:
            seen.setdefault(c.key[:2], [op.name for op in c.ops])
        return sorted(seen.items())

    def keys(self) -> list[tuple[int, int, int]]:
        return [c.key for c in self.chains]

    def output(self, chain: Chain, key_groups: int, sink: Any = None) -> Output:
        """Where ``chain``'s rows go; ``sink``: its parallel sink instance, if any."""
        stage = chain.stage
        if chain.is_sink:
            return Output("sink", sink=sink) if sink is not None else Output("driver")
        routes = []
        for consumers, port in self.consumers[stage.id]:
            if stage.forward:  # the same-numbered chain of each consumer pipeline
                k = self.by_stage[stage.id].index(chain)
                routes.append(Output("exchange", [consumers[k].index], port))
                continue
            if stage.broadcast:  # every row to every consumer task
                routes.append(Output("exchange", [c.index for c in consumers], port,
                                     broadcast=True))
                continue
            out = Output("exchange", [c.index for c in consumers], port, stage.partitioner)
            if keyed_exchange(stage) and len(consumers) > 1:
                if len(consumers) > key_groups:
                    raise PlanError(f"parallelism {len(consumers)} of stage {stage.id} exceeds "
                                    f"the job's {key_groups} key groups (its maximum "
                                    f"parallelism); start it with key_groups >= "
                                    f"{len(consumers)}")
                out.keys = list(stage.partitioner.keys)
                out.owners = key_group_owners(key_groups, len(consumers))
                out.key_groups = key_groups
            routes.append(out)
        first = routes[0]
        first.more = routes[1:]
        return first
