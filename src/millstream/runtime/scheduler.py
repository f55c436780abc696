"""The batch scheduler: runs a job's stages in dependency order on a runner.

Stages run one after another, each with all its tasks in parallel; shuffle outputs are
materialized, so a failed task is re-executed alone (MapReduce fault tolerance).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa

from millstream.core.shuffle import RangePartitioner, read_block
from millstream.core.units import format_size
from millstream.errors import FetchFailedError, TaskError
from millstream.ops.base import OperatorFactory
from millstream.plan.stages import (
    AdaptiveJoin,
    BlocksPort,
    Pipeline,
    ShufflePort,
    SourcePort,
    Stage,
    all_stages,
)
from millstream.runtime.display import watch
from millstream.runtime.events import BUS, error_text, publish
from millstream.runtime.gather import adapt_gather
from millstream.runtime.job_events import job_ended, job_started
from millstream.runtime.progress import TASK_PROGRESS_EVERY_S, StageProgress, progress_enabled
from millstream.runtime.session import Session, Settings
from millstream.runtime.task import (
    BlockInput,
    SampledOutput,
    ShuffleInput,
    ShuffleOutputBlock,
    SinkOutput,
    SourceInput,
    Task,
)

#: a shuffle join side whose output measured at most this (and half the other side's
#: estimate) filters the other side by its keys before that side is shuffled
RUNTIME_FILTER_MAX_BYTES = 64 << 20


@dataclass
class JobStats:
    """What a finished job did: per-stage tasks, rows, bytes, time; summed counters."""

    job_id: str
    stages: list[dict[str, Any]] = field(default_factory=list)
    counters: dict[tuple[str, str], int] = field(default_factory=dict)
    seconds: float = 0.0
    #: what adaptive execution decided ("adaptive: switched to broadcast: ...")
    notes: list[str] = field(default_factory=list)
    #: the physical plan as it ran (after adaptive changes)
    plan: str = ""

    def explain(self) -> str:
        """The executed plan, with what adaptive execution changed."""
        notes = "\n".join(self.notes) if self.notes else "(no adaptive changes)"
        return f"== Executed plan ==\n{self.plan}\n\n== Adaptive execution ==\n{notes}"


def is_lost_output(handle: Any) -> bool:
    """Whether an output handle's data is gone (its own check, or a missing local file)."""
    check = getattr(handle, "is_lost", None)
    if callable(check):
        return bool(check())
    path = getattr(handle, "path", None)
    return path is not None and not os.path.exists(path)


def _describe_failed_task(err: TaskError, tasks: list[Task]) -> None:
    """Tell a task failure what the failed task read and how many tasks its stage had."""
    for t in tasks:
        if t.stage_name == err.stage and t.partition == err.partition:
            err.task_input = t.input_description()
            err.stage_tasks = len(tasks)
            return


class Job:
    """One action's execution; ``cleanup()`` removes its shuffle files and temporary blocks."""

    def __init__(self, session: Session, settings: Settings, final: Stage,
                 in_driver: bool = False, plan: dict[str, Any] | None = None) -> None:
        self.session = session
        self.settings = settings
        self.final = final
        self.job_id = session.new_job_id()
        self.dir = session.job_dir(self.job_id)
        self.stats = JobStats(self.job_id)
        self.stage_tasks: dict[int, list[Task]] = {}
        #: run the tasks in this process (a small job) instead of on the runner's workers
        self.in_driver = in_driver
        #: bytes and rows each stage that ran produced (adaptive execution reads them)
        self.measured: dict[int, int] = {}
        self.measured_rows: dict[int, int] = {}
        #: the splits of each source port (id -> (port, splits)), planned once
        self._splits: dict[int, tuple[Any, list[Any]]] = {}
        #: the logical and optimized plans and the rules that fired (for the dashboard)
        self.plan = plan

    def run(self) -> list[Any]:
        start = time.perf_counter()
        unwatch = (watch(self.job_id) if progress_enabled(self.settings.progress)
                   else None)
        if BUS.active:
            job_started(self)
        error: BaseException | None = None
        try:
            runner = self.session.get_runner(self.settings)
            while True:
                st = self._next_stage()
                if st is None:
                    break
                if self._adapt(st):
                    continue  # the plan changed: ``st`` may no longer run
                self._run_or_reuse(st, runner)
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.stats.seconds = time.perf_counter() - start
            self.stats.plan = "\n".join(s.describe() for s in all_stages(self.final))
            if BUS.active:
                job_ended(self, error)
            if unwatch is not None:
                unwatch()
        self.session.last_job_stats = self.stats
        return self.final.results or []

    def _run_or_reuse(self, st: Stage, runner: Any) -> None:
        """Run a stage unless its results are known (computed, or a cached dataset)."""
        if st.results is not None:
            return
        cached = (self.session.cache.get(st.cache_id, self.settings.runner)
                  if st.cache_id is not None else None)
        if cached is not None:
            st.results = cached
            publish("stage_end", job=self.job_id, stage=st.id, status="skipped",
                    why="cached")
            return
        t0 = time.perf_counter()
        try:
            results, tasks = self._run_stage(st, runner)
        except BaseException as exc:
            publish("stage_end", job=self.job_id, stage=st.id, status="failed",
                    error=error_text(exc), seconds=time.perf_counter() - t0)
            raise
        self._store(st, [r.value for r in results])
        for r in results:
            for k, v in r.counters.items():
                self.stats.counters[k] = self.stats.counters.get(k, 0) + v
        self.stats.stages.append({
            "stage": st.id, "purpose": st.purpose, "tasks": len(tasks),
            "rows_in": sum(r.rows_in for r in results), "rows_out": sum(r.rows_out for r in results),
            "bytes_out": sum(r.bytes_out for r in results), "seconds": time.perf_counter() - t0,
            "bytes_in": sum(r.bytes_in for r in results),
        })
        self.measured[st.id] = sum(r.bytes_out for r in results)
        self.measured_rows[st.id] = sum(r.rows_out for r in results)
        if BUS.active:
            publish("stage_end", job=self.job_id, status="succeeded",
                    **self.stats.stages[-1])
        if st.cache_id is not None:
            self.session.cache.put(st.cache_id, st.results, self.settings.runner)

    def _store(self, st: Stage, values: list[Any]) -> None:
        """A stage's task results (and a sampled stage's key samples)."""
        if st.sample_by is not None:
            st.samples = [getattr(v, "key_sample", None) for v in values]
        st.results = values

    # -------------------------------------------------------------- order, adaptivity
    def _next_stage(self) -> Stage | None:
        """The next stage to run: the first whose inputs are all there, unless it is a
        side of a shuffle join whose other side is estimated smaller (that side runs
        first: if it turns out small, this one need not be shuffled)."""
        pending = [s for s in all_stages(self.final) if s.results is None]
        if not pending:
            return None
        ready = [s for s in pending if all(d.results is not None for d in s.deps)
                 or (s.cache_id is not None and s.cache_id in self.session.cache)]
        if not ready:
            raise RuntimeError(f"no stage can run; waiting: {[s.id for s in pending]}")
        for s in ready:
            if not self._other_side_first(s):
                return s
        return ready[0]

    def _adaptive_joins(self) -> list[tuple[Stage, int, Pipeline, AdaptiveJoin]]:
        """(stage, pipeline index, pipeline, its adaptive join) of undecided joins."""
        out = []
        for st in all_stages(self.final):
            for i, p in enumerate(st.pipelines):
                if p.adaptive is not None and p.adaptive.decision is None:
                    out.append((st, i, p, p.adaptive))
        return out

    def _other_side_first(self, st: Stage) -> bool:
        for _, _, _, aj in self._adaptive_joins():
            if st is aj.left:
                other, ok, mine, theirs = (aj.right, aj.broadcast_right or aj.filter_left,
                                           aj.left_bytes, aj.right_bytes)
            elif st is aj.right:
                other, ok, mine, theirs = (aj.left, aj.broadcast_left or aj.filter_right,
                                           aj.right_bytes, aj.left_bytes)
            else:
                continue
            if ok is None or other.results is not None or theirs is None:
                continue
            if mine is None or theirs < mine:
                return True
        return False

    def _consumers(self, st: Stage) -> int:
        n = 0
        for s in all_stages(self.final):
            n += sum(1 for d in s.deps if d is st)
        return n

    def _adapt(self, st: Stage) -> bool:
        """Before ``st`` runs: a join or a small sort or top-k may change the plan (True
        when it changed; ``st`` may then no longer run)."""
        return self._adapt_join(st) or adapt_gather(self, st)

    def _adapt_join(self, st: Stage) -> bool:
        """Before a join side's map stage runs: when the join's other side has run and its
        output is small, turn the join into a broadcast join fed by ``st``'s pipelines
        (``st`` itself then never runs). True when the plan changed."""
        for consumer, idx, pipe, aj in self._adaptive_joins():
            if st is aj.left:
                done, factory, side, keep = aj.right, aj.broadcast_right, "right", aj.filter_left
                mine = aj.left_bytes
            elif st is aj.right:
                done, factory, side, keep = aj.left, aj.broadcast_left, "left", aj.filter_right
                mine = aj.right_bytes
            else:
                continue
            if done.results is None:
                continue
            measured = self.measured.get(done.id)
            if factory is None or measured is None or measured > aj.threshold \
                    or self._consumers(st) != 1:
                aj.decision = "kept the shuffle join"
                if keep is not None and measured is not None and self._consumers(st) == 1 \
                        and measured <= RUNTIME_FILTER_MAX_BYTES \
                        and (mine is None or mine >= 2 * measured):
                    for q in st.pipelines:
                        q.add(keep, f"runtime filter: {', '.join(keep.args[0])} among the "
                                    f"keys of stage {done.id} ({aj.label})")
                    aj.decision = "kept the shuffle join, runtime filter"
                    self.stats.notes.append(
                        f"runtime filter: stage {st.id} ({st.purpose}) keeps the rows whose "
                        f"keys are among stage {done.id}'s ({side} side measured "
                        f"{format_size(measured)}): {aj.label}")
                continue
            what = (f"adaptive: switched to broadcast ({side} side measured "
                    f"{format_size(measured)} <= threshold {format_size(aj.threshold)})")
            new: list[Pipeline] = []
            for q in st.pipelines:
                q2 = q.copy()
                q2.add(factory, f"{aj.label} ({what})")
                q2.ops.extend(pipe.ops[1:])
                q2.descriptions.extend(pipe.descriptions[1:])
                new.append(q2)
            consumer.pipelines[idx:idx + 1] = new
            aj.decision = what
            self.stats.notes.append(f"{what}: {aj.label}; stage {st.id} ({st.purpose}) "
                                    f"not shuffled, stage {consumer.id} joins its input")
            return True
        return False

    def _run_stage(self, st: Stage, runner: Any) -> tuple[list[Any], list[Task]]:
        """Run a stage; when an input map output was lost, recompute it and run again."""
        for recovery in range(self.settings.max_task_attempts):
            progress = None
            try:
                tasks = self._tasks(st)  # may read inputs (sort samples) that can be lost too
                name = f"stage {st.id} {st.purpose}".strip()
                progress = StageProgress(name, len(tasks), self.job_id, st.id)
                try:
                    results = (runner.run_tasks_here(tasks, progress) if self.in_driver
                               else runner.run_tasks(tasks, progress))
                except TaskError as err:
                    _describe_failed_task(err, tasks)
                    raise
                self.stage_tasks[st.id] = tasks
                return results, tasks
            except FetchFailedError as exc:
                if recovery + 1 >= self.settings.max_task_attempts:
                    raise
                self._recompute_lost_outputs(st, runner, exc)
            finally:
                if progress is not None:
                    progress.close()
        raise AssertionError("unreachable")

    def _recompute_lost_outputs(self, st: Stage, runner: Any, exc: FetchFailedError) -> None:
        """Re-run the map tasks whose outputs are gone, first repairing their own inputs
        (a loss can reach several stages back). Counters of the first successful attempts
        stay; recomputations only add ``recomputed_map_tasks``."""
        for dep in st.deps:
            lost = [i for i, out in enumerate(dep.results or []) if is_lost_output(out)]
            if not lost:
                continue
            tasks = self.stage_tasks.get(dep.id)
            if tasks is None:
                raise exc
            self._recompute_lost_outputs(dep, runner, exc)
            redo = [tasks[i] for i in lost]
            progress = StageProgress(f"stage {dep.id} recompute", len(redo), self.job_id,
                                     dep.id)
            try:
                again = (runner.run_tasks_here(redo, progress) if self.in_driver
                         else runner.run_tasks(redo, progress))
            finally:
                progress.close()
            for i, r in zip(lost, again):
                dep.results[i] = r.value  # (a sort input's first sample stays)
            key = ("millstream", "recomputed_map_tasks")
            self.stats.counters[key] = self.stats.counters.get(key, 0) + len(lost)

    def cleanup(self) -> None:
        """Free this job's shuffle and temporary outputs (cached datasets stay)."""
        held = self.session.runners.get(self.settings.runner)
        runner = held[1] if held is not None else None
        if runner is not None:
            for st in all_stages(self.final):
                if st.cache_id is None and st.results and st.output_kind != "sink":
                    runner.release(list(st.results))
        shutil.rmtree(self.dir, ignore_errors=True)

    # -------------------------------------------------------------- tasks
    def _settings_dict(self) -> dict[str, Any]:
        st = self.settings
        return {"memory_budget": st.task_budget(), "spill_dir": os.path.join(self.dir, "spill"),
                "batch_size": st.batch_size, "shuffle_compression": st.shuffle_compression}

    def _resolve_factory(self, f: OperatorFactory) -> OperatorFactory:
        bst = f.kwargs.get("broadcast_stage")
        if bst is None:
            return f
        kwargs = dict(f.kwargs)
        kwargs.pop("broadcast_stage")
        blocks = list(bst.results or [])
        if bst.output_kind == "shuffle":  # a shuffle side turned broadcast at run time
            n = bst.partitioner.num_partitions
            blocks = [ShuffleOutputBlock(out, n) for out in blocks]
        kwargs["blocks"] = blocks
        return OperatorFactory(f.cls, *f.args, **kwargs)

    def _port_inputs(self, port: Any) -> list[list[Any]]:
        if isinstance(port, SourcePort):  # (planned once per job: adaptivity asks too)
            held = self._splits.get(id(port))
            if held is None or held[0] is not port:
                target = max(1, self.settings.resolved_parallelism() * 2)
                held = self._splits[id(port)] = (port, port.source.plan_splits(target))
            return [[SourceInput(port.source, s)] for s in held[1]]
        if isinstance(port, ShufflePort):
            n = port.stage.partitioner.num_partitions
            return [[ShuffleInput(list(port.stage.results), p)] for p in range(n)]
        if isinstance(port, BlocksPort):
            blocks = port.blocks if port.blocks is not None else port.stage.results
            return [[BlockInput([b])] for b in blocks]
        raise TypeError(f"unknown port {port!r}")

    def _output(self, st: Stage) -> Any:
        runner = self.session.get_runner(self.settings)
        if st.output_kind == "shuffle":
            part = st.partitioner
            if isinstance(part, RangePartitioner):
                part = replace(part, boundaries=self._boundaries(st, part))
            return runner.shuffle_output(part, os.path.join(self.dir, "shuffle"))
        if st.output_kind == "sink":
            return SinkOutput(st.sink)
        if st.cache_id is not None:
            out = runner.block_output(self.session.cache.directory_for(st.cache_id, self.job_id),
                                      cached=True)
        else:
            out = runner.block_output(os.path.join(self.dir, "blocks"))
        return SampledOutput(out, list(st.sample_by)) if st.sample_by is not None else out

    def _boundaries(self, st: Stage, part: RangePartitioner) -> pa.Table:
        from millstream.core.arrow import concat_batches
        from millstream.core.sorting import choose_boundaries

        source = st.sample_stage
        if source is not None and source.samples is not None:
            batches = [b for t in source.samples if t is not None for b in t.to_batches()
                       if b.num_rows]
        else:
            batches = [b for ref in (source.results if source is not None else None) or []
                       for b in read_block(ref) if b.num_rows]
        sample = concat_batches(batches) if batches else pa.table({c: pa.array([]) for c in part.by})
        return choose_boundaries(sample, part.by, part.descending, part.nulls_last, part.num_partitions)

    def _tasks(self, st: Stage) -> list[Task]:
        output = self._output(st)
        settings = self._settings_dict()
        tasks: list[Task] = []
        for pipe in st.pipelines:
            tasks.extend(self._pipeline_tasks(st, pipe, output, settings, len(tasks)))
        return tasks

    def _pipeline_tasks(self, st: Stage, pipe: Pipeline, output: Any, settings: dict[str, Any],
                        offset: int) -> list[Task]:
        per_port = [self._port_inputs(p) for p in pipe.ports]
        if pipe.single_task:  # every partition of every port in one task
            per_port = [[[spec for part in inputs for spec in part]] for inputs in per_port]
        counts = {len(x) for x in per_port}
        if len(counts) > 1:
            raise RuntimeError(f"stage {st.id}: input ports disagree on the number of partitions {counts}")
        ntasks = counts.pop() if counts else 0
        ops = [self._resolve_factory(f) for f in pipe.ops]
        # workers report what running tasks have read when anybody listens (progress, UI)
        every = TASK_PROGRESS_EVERY_S if BUS.active else 0.0
        return [Task(st.id, st.purpose or f"stage {st.id}", offset + i,
                     [port[i] for port in per_port], ops, output, self.job_id, 0, settings,
                     every)
                for i in range(ntasks)]

