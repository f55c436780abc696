"""The MapReduce job model: Hadoop Streaming / mrjob-style jobs on the batch engine.

    class WordCount(ms.MapReduceJob):
        def mapper(self, key, line):              # key: (path, byte offset) for text input
            for word in line.split():
                yield word.lower(), 1
        def combiner(self, word, counts):         # optional, runs map-side
            yield word, sum(counts)
        def reducer(self, word, counts):          # counts: an iterator, streamed from disk
            yield word, sum(counts)

    pairs = WordCount().run("books/*.txt")        # [(word, count), ...]
    WordCount().run("books/*.txt", "out/", format="parquet")

A job is a chain of steps (``steps()`` returning :class:`MRStep` objects). Each step is
planned onto the engine: the mapper (and combiner) fused into the map tasks, a hash
shuffle by key, and a reducer over an external sort of each partition, so keys arrive
in order and a key's values may exceed memory. ``ms.mapreduce(...)`` is the functional
form; it returns a Dataset of ``key``/``value`` rows. Key order is described in
:mod:`millstream.ops.mapreduce`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from millstream.api.dataset import Dataset
from millstream.core.arrow import PICKLED_KEY
from millstream.core.context import TaskContext, current_context
from millstream.core.shuffle import read_block
from millstream.errors import PlanError, SchemaError, TaskError
from millstream.io.files.json_encoding import json_fragments
from millstream.io.files.sinks import FileSink, ParquetSink
from millstream.ops.mapreduce.values import column_values
from millstream.ops.narrow import function_name
from millstream.plan import logical as L
from millstream.runtime import actions
from millstream.runtime.scheduler import JobStats
from millstream.runtime.session import Settings, effective_settings

Pair = tuple[Any, Any]
_HOOKS = ("mapper_init", "mapper_final", "combiner_init", "combiner_final", "reducer_init",
          "reducer_final")
_FUNCS = ("mapper", "combiner", "reducer", "partitioner", *_HOOKS)
FORMATS = ("text", "parquet")


class MRStep:
    """One map/reduce step: mapper, optional combiner, optional reducer, per-task hooks.

    A step without a reducer is map-only (no shuffle); one without a mapper passes its
    input pairs to the shuffle unchanged. ``partitioner(key, num_reducers) -> int`` picks
    a key's reducer (hash of the key by default); ``num_reducers`` overrides the job's.
    """

    def __init__(self, *, mapper: Callable[[Any, Any], Iterable[Pair]] | None = None,
                 combiner: Callable[[Any, Iterator[Any]], Iterable[Pair]] | None = None,
                 reducer: Callable[[Any, Iterator[Any]], Iterable[Pair]] | None = None,
                 mapper_init: Callable[[], None] | None = None,
                 mapper_final: Callable[[], Iterable[Pair] | None] | None = None,
                 combiner_init: Callable[[], None] | None = None,
                 combiner_final: Callable[[], Iterable[Pair] | None] | None = None,
                 reducer_init: Callable[[], None] | None = None,
                 reducer_final: Callable[[], Iterable[Pair] | None] | None = None,
                 partitioner: Callable[[Any, int], int] | None = None,
                 num_reducers: int | None = None) -> None:
        self.mapper = mapper
        self.combiner = combiner
        self.reducer = reducer
        self.mapper_init = mapper_init
        self.mapper_final = mapper_final
        self.combiner_init = combiner_init
        self.combiner_final = combiner_final
        self.reducer_init = reducer_init
        self.reducer_final = reducer_final
        self.partitioner = partitioner
        self.num_reducers = num_reducers
        for name in _FUNCS:
            fn = getattr(self, name)
            if fn is not None and not callable(fn):
                raise PlanError(f"MRStep({name}=...) must be a function, got {type(fn).__name__}")
        if mapper is None and reducer is None and mapper_init is None and mapper_final is None:
            raise PlanError("MRStep needs a mapper or a reducer (or mapper_init/mapper_final)")
        if reducer is None:
            extra = [n for n in ("combiner", "combiner_init", "combiner_final", "reducer_init",
                                 "reducer_final", "partitioner") if getattr(self, n) is not None]
            if extra:
                raise PlanError(f"MRStep has {', '.join(extra)} but no reducer; a map-only step "
                                f"has no shuffle, so these would never run")
        if combiner is None and (combiner_init is not None or combiner_final is not None):
            raise PlanError("MRStep has combiner_init/combiner_final but no combiner")
        if num_reducers is not None and (not isinstance(num_reducers, int) or num_reducers < 1):
            raise PlanError(f"MRStep num_reducers must be an int >= 1, got {num_reducers!r}")

    def __repr__(self) -> str:
        parts = [f"{n}={function_name(getattr(self, n))}" for n in _FUNCS
                 if getattr(self, n) is not None]
        if self.num_reducers is not None:
            parts.append(f"num_reducers={self.num_reducers}")
        return f"MRStep({', '.join(parts)})"


class MapReduceJob:
    """Base class of MapReduce jobs (as Hadoop Streaming's and mrjob's ``MRJob``).

    Override ``mapper(key, value)``, ``reducer(key, values)`` and optionally
    ``combiner(key, values)``, ``partitioner(key, num_reducers)`` and the per-task hooks
    ``mapper_init``/``mapper_final``, ``combiner_init``/``combiner_final``,
    ``reducer_init``/``reducer_final`` (``*_final`` may yield pairs); or override
    ``steps()`` for a multi-step job. Each task works on its own copy of the job object.
    Counters (``increment_counter``) are summed over the successful task attempts and are
    in ``job.counters`` after ``run``.
    """

    #: Reduce tasks per step (default: the session's shuffle_partitions).
    num_reducers: int | None = None

    def __init__(self) -> None:
        self.counters: dict[tuple[str, str], int] = {}
        self.stats: JobStats | None = None

    def mapper(self, key: Any, value: Any) -> Iterable[Pair]:
        """Turn one input record into zero or more (key, value) pairs (identity by default)."""
        yield key, value

    def reducer(self, key: Any, values: Iterator[Any]) -> Iterable[Pair]:
        """Turn a key and an iterator over all its values into (key, value) pairs."""
        for v in values:
            yield key, v

    def combiner(self, key: Any, values: Iterator[Any]) -> Iterable[Pair]:
        """Optional map-side pre-reduction of one task's values of a key."""
        raise NotImplementedError  # pragma: no cover - only used when overridden

    def partitioner(self, key: Any, num_reducers: int) -> int:
        """Optional: the reduce partition (0 <= p < num_reducers) of a key."""
        raise NotImplementedError  # pragma: no cover - only used when overridden

    def mapper_init(self) -> None:
        """Optional: called once per map task before its first record."""

    def mapper_final(self) -> Iterable[Pair] | None:
        """Optional: called once per map task after its last record; may yield pairs."""

    def combiner_init(self) -> None:
        """Optional: called once per map task before the combiner first runs."""

    def combiner_final(self) -> Iterable[Pair] | None:
        """Optional: called once per map task after the combiner last ran; may yield pairs."""

    def reducer_init(self) -> None:
        """Optional: called once per reduce task before its first key."""

    def reducer_final(self) -> Iterable[Pair] | None:
        """Optional: called once per reduce task after its last key; may yield pairs."""

    # ----------------------------------------------------------------- structure
    def _overrides(self, name: str) -> bool:
        return getattr(type(self), name, None) is not getattr(MapReduceJob, name, None)

    def steps(self) -> list[MRStep]:
        """The job's steps; by default one step of the overridden methods."""
        kw = {name: getattr(self, name) for name in _FUNCS if self._overrides(name)}
        if "mapper" not in kw and "reducer" not in kw:
            raise PlanError(f"{type(self).__name__} overrides neither mapper() nor reducer(); "
                            f"define them, or steps() returning MRStep objects")
        return [MRStep(**kw)]

    def _checked_steps(self) -> list[MRStep]:
        steps = list(self.steps())
        if not steps:
            raise PlanError(f"{type(self).__name__}.steps() returned no steps")
        for i, st in enumerate(steps):
            if not isinstance(st, MRStep):
                raise PlanError(f"{type(self).__name__}.steps()[{i}] is {type(st).__name__}, "
                                f"not an MRStep")
        return steps

    # ----------------------------------------------------------------- counters
    def increment_counter(self, group: str, name: str, amount: int = 1) -> None:
        """Add ``amount`` to counter (group, name); only successful task attempts count."""
        if type(group) is not str or type(name) is not str or type(amount) is not int:
            group, name, amount = str(group), str(name), int(amount)
        ctx: TaskContext | None = current_context() or self.__dict__.get("_mr_task_context")
        if ctx is not None:
            ctx.increment_counter(group, name, amount)
            return
        local = self.__dict__.setdefault("counters", {})  # called outside a task
        local[(group, name)] = local.get((group, name), 0) + amount

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_mr_task_context", None)
        state.pop("stats", None)
        return state

    # ----------------------------------------------------------------- running
    def dataset(self, input: Any, *, num_reducers: int | None = None,
                split_size: int | None = None) -> Dataset:
        """The job's output as a lazy Dataset of ``key``/``value`` rows (nothing runs yet)."""
        settings = effective_settings({})
        return build_job_dataset(input_dataset(input, split_size), self, self._checked_steps(),
                                 type(self).__name__, num_reducers, settings)

    def run(self, input: Any, output: str | None = None, *, format: str = "text",
            mode: str = "error", num_reducers: int | None = None, split_size: int | None = None,
            **options: Any) -> list[Pair] | None:
        """Run the job on ``input`` (paths of text files, or a Dataset).

        Without ``output`` the (key, value) pairs are returned (reducer partitions in
        order, keys sorted within each). With ``output`` they are written there
        atomically as ``format`` "text" (``json(key)<TAB>json(value)`` lines) or
        "parquet", and None is returned. ``options`` are execution settings
        (``parallelism``, ``memory_limit``, ``max_task_attempts``, ``progress``, ...).
        Counters end up in ``self.counters``, job statistics in ``self.stats``.
        """
        if format not in FORMATS:
            raise PlanError(f"format must be one of {FORMATS}, got {format!r}")
        settings = effective_settings(options)
        steps = self._checked_steps()
        label = type(self).__name__
        ds = build_job_dataset(input_dataset(input, split_size), self, steps, label, num_reducers,
                               settings, strict_types=output is not None and format == "parquet")
        self.counters = {}
        if output is None:
            return collect_pairs(ds, settings, label, self)
        sink = (ParquetSink(output, mode=mode) if format == "parquet"
                else TextOutputSink(output, mode=mode))
        write_output(ds, sink, settings, label, self)
        return None


def mapreduce(input: Any, mapper: Callable[[Any, Any], Iterable[Pair]] | None,
              reducer: Callable[[Any, Iterator[Any]], Iterable[Pair]] | None = None,
              combiner: Callable[[Any, Iterator[Any]], Iterable[Pair]] | None = None,
              num_reducers: int | None = None, *,
              partitioner: Callable[[Any, int], int] | None = None,
              split_size: int | None = None) -> Dataset:
    """A one-step MapReduce over ``input`` (a Dataset, or text file paths) as a Dataset.

    ``mapper(key, value)`` yields (key, value) pairs; ``reducer(key, values)`` gets an
    iterator over all values of a key (keys sorted within a reducer partition); without a
    reducer the step is map-only. The result has columns ``key`` and ``value``.
    """
    if mapper is None and reducer is None:
        raise PlanError("mapreduce() needs a mapper or a reducer")
    step = MRStep(mapper=mapper, combiner=combiner, reducer=reducer, partitioner=partitioner)
    return build_job_dataset(input_dataset(input, split_size), None, [step], "mapreduce",
                             num_reducers, effective_settings({}))


# ----------------------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------------------

def input_dataset(input: Any, split_size: int | None = None) -> Dataset:
    """A Dataset for a job input: a Dataset as is, paths as text with (path, offset) keys."""
    if isinstance(input, Dataset):
        if split_size is not None:
            raise PlanError("split_size applies to text file input, not to a Dataset")
        return input
    if isinstance(input, (str, os.PathLike)):
        paths: list[str] = [os.fspath(input)]
    elif isinstance(input, (list, tuple)) and input and all(isinstance(p, (str, os.PathLike))
                                                            for p in input):
        paths = [os.fspath(p) for p in input]
    else:
        raise PlanError(f"MapReduce input must be a Dataset or text file path(s), got "
                        f"{type(input).__name__}")
    from millstream.api.readers import read_text

    return read_text(paths if len(paths) > 1 else paths[0], with_offsets=True,
                     split_size=split_size)


def build_job_dataset(source: Dataset, job: MapReduceJob | None, steps: Sequence[MRStep],
                      label: str, num_reducers: int | None, settings: Settings,
                      strict_types: bool = False) -> Dataset:
    """The steps as logical MapReduce steps over ``source`` (the planner makes each one
    mapper (+combiner) operators, a hash shuffle by key and reducer operators)."""
    import cloudpickle

    if num_reducers is not None and (not isinstance(num_reducers, int) or num_reducers < 1):
        raise PlanError(f"num_reducers must be an int >= 1, got {num_reducers!r}")
    try:
        payload = cloudpickle.dumps((job, list(steps)))
    except Exception as exc:
        raise PlanError(f"MapReduce job {label} cannot be shipped to the workers (pickling "
                        f"failed): {type(exc).__name__}: {exc}") from exc
    node = source._node
    for i, st in enumerate(steps):
        last = i == len(steps) - 1
        n = None
        if st.reducer is not None:
            n = (num_reducers or st.num_reducers or (job.num_reducers if job is not None else None)
                 or settings.resolved_shuffle_partitions())
            if not isinstance(n, int) or n < 1:
                raise PlanError(f"{label}: num_reducers must be an int >= 1, got {n!r}")
        node = L.MapReduceStep(node, payload, i, label, n, st.partitioner is not None, last,
                               strict_types and last, _functions(st))
    return Dataset(node)


def _functions(step: MRStep) -> str:
    """The step's functions for explain(): ``mapper=..., combiner=..., reducer=...``."""
    names = [f"{n}={function_name(getattr(step, n))}" for n in ("mapper", "combiner", "reducer")
             if getattr(step, n) is not None]
    return ", ".join(names) or "identity mapper"


def _explain_failure(err: TaskError, label: str) -> TaskError:
    """The failure of a job's task, saying which step, task and input split failed."""
    what, ntasks = err.task_input or "", err.stage_tasks or 0
    where = err.operator if err.operator and label in err.operator else err.stage
    head = (f"MapReduce job {label} failed: {where}, task {err.partition}"
            + (f" of {ntasks}" if ntasks else "") + (f", {what}" if what else "")
            + f", after {len(err.attempts)} attempt(s)")
    new = type(err)(f"{head}\n{err}", stage=err.stage, partition=err.partition,
                    operator=err.operator, attempts=list(err.attempts),
                    user_traceback=err.user_traceback, cause_type=err.cause_type,
                    original=err.original)
    new.job = label  # type: ignore[attr-defined]
    new.task_input = what
    new.stage_tasks = err.stage_tasks
    return new


def _recorder(job: MapReduceJob | None) -> actions.StatsCallback | None:
    """Hands a run's statistics and counters to ``job`` (also when the run failed)."""
    if job is None:
        return None

    def record(stats: JobStats) -> None:
        job.stats = stats
        job.counters = dict(stats.counters)

    return record


def _pairs(blocks: list[Any]) -> list[Pair]:
    out: list[Pair] = []
    for ref in blocks:
        for b in read_block(ref):
            if b.num_rows == 0:
                continue
            names = b.schema.names
            ki, vi = names.index("key"), names.index("value")
            keys = column_values(b.column(ki), b.schema.field(ki))
            values = column_values(b.column(vi), b.schema.field(vi))
            out.extend(zip(keys, values))
    return out


def collect_pairs(ds: Dataset, settings: Settings, label: str,
                  job: MapReduceJob | None = None) -> list[Pair]:
    """Run a job Dataset and return its (key, value) pairs (counters go to ``job``)."""
    try:
        return actions.run_blocks(ds._node, settings, _pairs, _recorder(job))
    except TaskError as err:
        raise _explain_failure(err, label) from err.__cause__


def write_output(ds: Dataset, sink: FileSink, settings: Settings, label: str,
                 job: MapReduceJob | None = None) -> None:
    """Run a job Dataset into a sink, committed all at once (nothing is left on failure)."""
    try:
        actions.write(ds._node, sink, settings, _recorder(job))
    except TaskError as err:
        raise _explain_failure(err, label) from err.__cause__


# ----------------------------------------------------------------------------------------
# Text output: json(key) TAB json(value), one pair per line
# ----------------------------------------------------------------------------------------

def _json_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return list(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "backslashreplace")
    if hasattr(value, "isoformat"):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _python_json(values: list[Any], column: str) -> pa.Array:
    out = []
    for v in values:
        try:
            out.append(json.dumps(v, ensure_ascii=False, default=_json_default))
        except (TypeError, ValueError) as exc:
            raise SchemaError(f"text output: the {column} {v!r} cannot be written as JSON "
                              f"({exc}); yield JSON-compatible keys and values or write "
                              f"Parquet (format='parquet')") from None
    return pa.array(out, pa.string())


def _json_column(arr: pa.Array, field: pa.Field) -> pa.Array:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    pickled = bool(field.metadata and field.metadata.get(PICKLED_KEY))
    t = arr.type
    if pickled or pa.types.is_union(t) or pa.types.is_nested(t) or pa.types.is_binary(t):
        return _python_json(column_values(arr, field), field.name)
    return json_fragments(arr)


def encode_text_lines(batch: pa.RecordBatch) -> pa.RecordBatch:
    """A batch of ``key``/``value`` rows as one ``line`` column: json(key) TAB json(value)."""
    names = batch.schema.names
    if "key" not in names or "value" not in names:
        raise SchemaError(f"text output needs columns 'key' and 'value'; got {names}")
    ki, vi = names.index("key"), names.index("value")
    k = _json_column(batch.column(ki), batch.schema.field(ki))
    v = _json_column(batch.column(vi), batch.schema.field(vi))
    lines = pc.binary_join_element_wise(k, v, pa.scalar("\t"))
    return pa.RecordBatch.from_arrays([lines], names=["line"])


class TextOutputSink(FileSink):
    """Writes ``json(key)<TAB>json(value)`` lines (Hadoop Streaming / mrjob's JSON protocol)."""

    name = "text"
    extension = "txt"

    def write_partition(self, batches: Iterator[pa.RecordBatch], ctx: TaskContext) -> list[str]:
        """Encode each batch as lines, then write them like any file sink."""
        return super().write_partition((encode_text_lines(b) for b in batches if b.num_rows),
                                       ctx)

    def _open_writer(self, stream: Any, schema: pa.Schema) -> Any:
        return None

    def _write(self, writer: Any, stream: Any, data: pa.RecordBatch | pa.Table) -> None:
        lines = data.column(0)
        if isinstance(lines, pa.ChunkedArray):
            lines = lines.combine_chunks()
        n = len(lines)
        if n == 0:
            return
        joined = pc.binary_join_element_wise(lines, pa.scalar("\n"), pa.scalar(""))
        offsets = np.frombuffer(joined.buffers()[1], dtype=np.int32)[joined.offset:
                                                                     joined.offset + n + 1]
        stream.write(joined.buffers()[2].slice(int(offsets[0]), int(offsets[-1] - offsets[0])))


def read_text_output(uri: str) -> list[Pair]:
    """The (key, value) pairs of a job's text output directory (part files in order)."""
    from millstream.io import fs as msfs

    fs, path = msfs.resolve(uri)
    files = sorted(e.path for e in msfs.list_dir(fs, path, True)
                   if e.path.rsplit("/", 1)[-1].startswith("part-"))
    out: list[Pair] = []
    for f in files:
        with fs.open_input_stream(f) as stream:
            for line in stream.read().decode("utf-8").splitlines():
                k, _, v = line.partition("\t")
                out.append((json.loads(k), json.loads(v)))
    return out
