"""Tasks: what a runner ships to a worker, and how a worker runs one.

A task reads its input ports (source splits, shuffle slices or materialized blocks),
pushes the batches through a fused chain of operators, and hands the result to its
output (a shuffle writer, a block writer or a sink). Runners only move tasks and
results; they never look inside.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from millstream.core import lazy_pandas
from millstream.core.context import TaskContext, set_current_context
from millstream.core.shuffle import (
    BlockRef,
    BlockWriter,
    MapOutput,
    Partitioner,
    ShuffleWriter,
    read_block,
    read_shuffle_partition,
)
from millstream.io.base import Sink, Source, Split
from millstream.ops.base import OperatorFactory
from millstream.ops.narrow import LocalLimit
from millstream.ops.sort import SampleKeys


# ---------------------------------------------------------------- inputs
@dataclass
class SourceInput:
    """Read one split of a source."""

    source: Source
    split: Split

    def read(self, ctx: TaskContext) -> Iterator[pa.RecordBatch]:
        return self.source.read_split(self.split, ctx)

    def describe(self) -> str:
        return self.split.description or f"split {self.split.index}"


@dataclass
class ShuffleInput:
    """Read reduce partition ``partition`` of every map output of a stage."""

    map_outputs: list[MapOutput]
    partition: int

    def read(self, ctx: TaskContext) -> Iterator[pa.RecordBatch]:
        return read_shuffle_partition(self.map_outputs, self.partition)

    def describe(self) -> str:
        return f"shuffle partition {self.partition}"


@dataclass
class BlockInput:
    """Read materialized blocks (cached partitions, broadcast side, collected data)."""

    blocks: list[BlockRef]

    def read(self, ctx: TaskContext) -> Iterator[pa.RecordBatch]:
        for b in self.blocks:
            yield from read_block(b)

    def describe(self) -> str:
        return f"{len(self.blocks)} block(s)"


@dataclass
class ShuffleOutputBlock:
    """Every partition of one map task's shuffle output, read as one block: the side of a
    shuffle join that adaptive execution turned into the broadcast side."""

    output: Any
    num_partitions: int

    def read(self) -> Iterator[pa.RecordBatch]:
        for p in range(self.num_partitions):
            yield from read_shuffle_partition([self.output], p)


# ---------------------------------------------------------------- outputs
@dataclass
class ShuffleOutput:
    partitioner: Partitioner
    directory: str

    def write(self, batches: Iterator[pa.RecordBatch], ctx: TaskContext) -> MapOutput:
        path = os.path.join(self.directory, f"shuffle-s{ctx.stage_id}-m{ctx.partition}-a{ctx.attempt}.arrow")
        return ShuffleWriter(ctx, self.partitioner, path).write_all(batches)


@dataclass
class BlockOutput:
    directory: str
    compression: str | None = None

    def write(self, batches: Iterator[pa.RecordBatch], ctx: TaskContext) -> BlockRef:
        path = os.path.join(self.directory, f"block-s{ctx.stage_id}-p{ctx.partition}-a{ctx.attempt}.arrow")
        return BlockWriter(ctx, path, self.compression).write_all(batches)


@dataclass
class SampledOutput:
    """Another output whose rows' sort keys are sampled on their way to it: a global
    sort's input is written once, and its sample gives the range boundaries. The sample
    (a table, or None without rows) rides on the output's handle as ``key_sample``, so
    runners pass the handle on as they would the plain output's."""

    inner: Any
    by: list[str]

    def write(self, batches: Iterator[pa.RecordBatch], ctx: TaskContext) -> Any:
        sampler = SampleKeys(list(self.by))
        sampler.open(ctx)

        def tap() -> Iterator[pa.RecordBatch]:
            for b in batches:
                sampler.process(b)
                yield b

        value = self.inner.write(tap(), ctx)
        kept = [b for b in sampler.finish() if b.num_rows]
        sampler.close()
        value.key_sample = pa.Table.from_batches(kept) if kept else None
        return value


@dataclass
class SinkOutput:
    sink: Sink

    def write(self, batches: Iterator[pa.RecordBatch], ctx: TaskContext) -> Any:
        return self.sink.write_partition(batches, ctx)


# ---------------------------------------------------------------- task
@dataclass
class Task:
    """One unit of work: input ports, a fused operator chain, an output."""

    stage_id: int
    stage_name: str
    partition: int
    inputs: list[list[Any]]
    ops: list[OperatorFactory]
    output: Any
    job_id: str = ""
    attempt: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    #: report rows and bytes read so far this often while running (s; 0: never)
    progress_every_s: float = 0.0

    def describe(self) -> str:
        ins = "; ".join(", ".join(i.describe() for i in port) for port in self.inputs)
        return f"stage {self.stage_name} partition {self.partition} ({ins})"

    def input_description(self) -> str:
        """What the task reads, for failure messages: "reduce partition N" when it reads
        shuffle partitions only, else "input split " and its splits or blocks."""
        specs = [spec for port in self.inputs for spec in port]
        if specs and all(isinstance(s, ShuffleInput) for s in specs):
            return f"reduce partition {self.partition}"
        return "input split " + "; ".join(s.describe() for s in specs)


@dataclass
class TaskResult:
    """What a successful attempt reports back."""

    value: Any
    rows_in: int = 0
    rows_out: int = 0
    bytes_out: int = 0
    counters: dict[tuple[str, str], int] = field(default_factory=dict)
    seconds: float = 0.0
    bytes_in: int = 0  # in-memory bytes of the batches read
    shuffle_read: int = 0  # of which from shuffle partitions
    worker: str = ""  # where the attempt ran, when the runner knows better than the driver


@dataclass
class TaskFailure:
    """What a failed attempt reports back (picklable, no live exception objects)."""

    error_type: str
    message: str
    traceback: str
    user_traceback: str | None = None
    operator: str | None = None
    retryable: bool = True
    exception: Any = None  # the exception itself when it pickles


def make_context(task: Task) -> TaskContext:
    s = task.settings
    budget = s.get("memory_budget", 256 << 20)
    # under a small budget, smaller batches keep per-batch temporaries within it
    batch_size = max(1024, min(s.get("batch_size", 65536), budget // 1024))
    return TaskContext(job_id=task.job_id, stage_id=task.stage_id, partition=task.partition,
                       attempt=task.attempt, memory_budget=budget,
                       spill_dir=s.get("spill_dir") or "/tmp", batch_size=batch_size,
                       shuffle_compression=s.get("shuffle_compression", "lz4"),
                       stage_name=task.stage_name)


def run_task(task: Task, on_progress: Callable[[int, int], None] | None = None) -> TaskResult:
    """Execute a task in this process; raises on failure (the runner reports it).

    ``on_progress(rows, bytes)``, when given and the task asks for progress
    (``progress_every_s``), hears what the task has read so far, at most that often.
    """
    lazy_pandas.ensure_for_task()
    start = time.perf_counter()
    ctx = make_context(task)
    ops = [f.create() for f in task.ops]
    stats = {"in": 0, "out": 0, "bytes": 0, "bytes_in": 0, "shuffle": 0}
    every = task.progress_every_s if on_progress is not None else 0.0
    last_report = [time.monotonic()]
    limits = [op for op in ops if isinstance(op, LocalLimit)]
    set_current_context(ctx)  # user code in open() (init hooks) sees its task
    for op in ops:
        op.open(ctx)

    def through(i: int, batches: Any) -> Iterator[pa.RecordBatch]:
        if i == len(ops):
            for b in batches:
                stats["out"] += b.num_rows
                stats["bytes"] += b.nbytes
                yield b
            return
        op = ops[i]
        for b in batches:
            yield from through(i + 1, op.process(b))

    def pipeline() -> Iterator[pa.RecordBatch]:
        nports = len(task.inputs)
        first = ops[0] if ops else None
        order = first.input_order if (first is not None and first.num_inputs > 1) else tuple(range(nports))
        for port in order:
            stop = False
            for spec in task.inputs[port]:
                shuffle = isinstance(spec, ShuffleInput)
                for b in spec.read(ctx):
                    stats["in"] += b.num_rows
                    size = b.nbytes
                    stats["bytes_in"] += size
                    if shuffle:
                        stats["shuffle"] += size
                    if every:
                        now = time.monotonic()
                        if now - last_report[0] >= every:
                            last_report[0] = now
                            on_progress(stats["in"], stats["bytes_in"])
                    if first is None:
                        yield from through(0, (b,))
                    else:
                        yield from through(1, first.process(b, port))
                    if limits and all(lim.done for lim in limits):
                        stop = True
                        break
                if stop:
                    break
            if first is not None:
                yield from through(1, first.end_input(port))
        for i, op in enumerate(ops):
            yield from through(i + 1, op.finish())

    set_current_context(ctx)
    try:
        value = task.output.write(pipeline(), ctx)
    finally:
        set_current_context(None)
        for op in ops:
            try:
                op.close()
            except Exception:  # noqa: BLE001 - best effort cleanup
                pass
    return TaskResult(value, stats["in"], stats["out"], stats["bytes"], dict(ctx.counters),
                      time.perf_counter() - start, stats["bytes_in"], stats["shuffle"])


def _package_dir() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def describe_failure(exc: BaseException) -> TaskFailure:
    """Turn an exception into a picklable failure report with the user's traceback first."""
    import pickle

    from millstream.errors import NonRetryableError, PlanError, UserCodeFailure

    full = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    user_tb = None
    operator = None
    retryable = not isinstance(exc, (NonRetryableError, PlanError))
    root: BaseException = exc
    if isinstance(exc, UserCodeFailure):
        operator = exc.operator
        orig = exc.original
        root = orig
        frames = traceback.extract_tb(orig.__traceback__)
        pkg = _package_dir()
        user_frames = [f for f in frames if not os.path.abspath(f.filename).startswith(pkg)]
        lines = traceback.format_list(user_frames or frames)
        user_tb = ("Traceback of the user function (most recent call last):\n" + "".join(lines) +
                   "".join(traceback.format_exception_only(type(orig), orig)))
    try:
        pickle.dumps(root)
        exc_obj = root
    except Exception:  # noqa: BLE001
        exc_obj = None
    return TaskFailure(type(root).__name__, str(exc), full, user_tb, operator, retryable, exc_obj)
