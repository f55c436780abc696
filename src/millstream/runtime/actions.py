"""Batch actions: run a logical plan as a job and hand back its output.

The Dataset API and MapReduce call these instead of driving the scheduler themselves:
each compiles the plan with the session's settings (``plan/compile.py``), runs the job on
the batch scheduler and removes its files afterwards. A job that finds cached partitions
lost (with a node or a disk) forgets them and runs again, recomputing them from their
lineage; result blocks lost before they were read make the job run again. A sink is
prepared, written by the tasks and committed all at once, or aborted.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pyarrow as pa

from millstream.core import lazy_pandas
from millstream.core.arrow import concat_batches
from millstream.core.shuffle import read_block
from millstream.errors import FetchFailedError, MillstreamError
from millstream.io.base import Sink
from millstream.plan import logical as L
from millstream.plan.compile import compile_plan, explain_plan
from millstream.plan.logical import Node
from millstream.plan.physical import PlannerSettings
from millstream.plan.stages import Stage
from millstream.runtime.events import BUS
from millstream.runtime.job_events import plan_info
from millstream.runtime.runner import debugging
from millstream.runtime.scheduler import Job, JobStats, is_lost_output
from millstream.runtime.session import Session, Settings, get_session

T = TypeVar("T")
#: Called with the statistics of every job an action ran (also a failed one).
StatsCallback = Callable[[JobStats], None]


def planner_settings(settings: Settings) -> PlannerSettings:
    """What the physical planner needs of the session: partition counts (they follow the
    runner, e.g. a Ray cluster's CPUs), the broadcast and small-sort thresholds and the
    cache."""
    session = get_session()
    session.get_runner(settings)
    runner = settings.runner
    return PlannerSettings(settings.resolved_shuffle_partitions(), settings.broadcast_threshold,
                           lambda cache_id: session.cache.get(cache_id, runner),
                           small_sort_rows=settings.small_sort_rows,
                           small_sort_bytes=min(settings.small_sort_bytes,
                                                settings.task_budget() // 4))


def compile_job(node: Node, settings: Settings, output_kind: str = "blocks",
                sink: Sink | None = None) -> Stage:
    """The final stage of ``node``'s physical plan for this session."""
    return compile_plan(node, planner_settings(settings), output_kind, sink,
                        settings.rules_off())


def explain(node: Node, settings: Settings) -> str:
    """The logical, optimized and physical plans of ``node`` as text."""
    return explain_plan(node, planner_settings(settings), settings.rules_off())


def described_plan(node: Node, settings: Settings) -> dict[str, Any] | None:
    """The plans and fired rules of a job, for the dashboard (None when nobody listens)."""
    if not BUS.active:
        return None
    return plan_info(node, planner_settings(settings))


def drop_lost_cache_entries(session: Session) -> bool:
    """Forget cached datasets any of whose partitions are gone; True when one was dropped."""
    cache = session.cache
    lost = [cid for cid, blocks in list(cache.entries.items())
            if any(is_lost_output(b) for b in blocks)]
    for cid in lost:
        cache.drop(cid)
    return bool(lost)


def input_bytes(node: Node, cache_lookup: Callable[[int], list[Any] | None]) -> int | None:
    """The estimated bytes a plan reads (its sources and cached datasets), None if unknown."""
    if isinstance(node, L.Scan):
        return node.source.estimated_size_bytes()
    if isinstance(node, L.Cache):
        blocks = cache_lookup(node.cache_id)
        if blocks is not None:
            return sum(getattr(b, "nbytes", 0) for b in blocks)
    total = 0
    for child in node.children:
        size = input_bytes(child, cache_lookup)
        if size is None:
            return None
        total += size
    return total


def runs_in_driver(node: Node, settings: Settings) -> bool:
    """Whether a job is small enough to run in this process (see
    ``Settings.driver_input_limit``); never while tests inject faults into workers. Unless
    the job runs no user code and yields columns that need no pandas, pyarrow gets its
    pandas support now (``core.lazy_pandas``). Where the tasks run does not matter: the
    workers have pandas (``ensure_for_task``), and in this process a job run on workers
    does less than one run here (importing pandas took 0.3-0.5 s of a word count's
    2-3 s)."""
    here = _small_job(node, settings)
    if needs_pandas(node):
        lazy_pandas.ensure()
    return here


def needs_pandas(node: Node) -> bool:
    """Whether running ``node`` may need pyarrow's pandas support: user code anywhere, a
    column of a type pyarrow converts through pandas, or columns not known beforehand."""
    if node.runs_user_code():
        return True
    schema = node.schema
    if schema is None or any(lazy_pandas.type_needs_pandas(f.type) for f in schema):
        return True
    return any(needs_pandas(c) for c in node.children)


def _small_job(node: Node, settings: Settings) -> bool:
    if settings.driver_input_limit <= 0 or os.environ.get("MILLSTREAM_FAULT_INJECT"):
        return False
    runner = get_session().get_runner(settings)
    if not getattr(runner, "runs_small_jobs_here", False):
        return False
    cache = get_session().cache
    size = input_bytes(node, lambda cid: cache.get(cid, settings.runner))
    return size is not None and size <= settings.driver_input_limit


def _run(node: Node, settings: Settings, on_stats: StatsCallback | None
         ) -> tuple[Job, list[Any]]:
    """A finished job of ``node`` and its result blocks (the caller cleans the job up)."""
    session = get_session()
    here = runs_in_driver(node, settings)
    for attempt in range(settings.max_task_attempts):
        job = Job(session, settings, compile_job(node, settings), in_driver=here,
                  plan=described_plan(node, settings))
        try:
            return job, job.run()
        except FetchFailedError:
            job.cleanup()
            # cached partitions lost with a node or disk: forget them and re-plan, so
            # they are recomputed from their lineage
            if not drop_lost_cache_entries(session) or attempt + 1 >= settings.max_task_attempts:
                raise
        except BaseException:
            job.cleanup()
            raise
        finally:
            if on_stats is not None:
                on_stats(job.stats)
    raise AssertionError("unreachable")


def user_facing(fn: Callable[..., T]) -> Callable[..., T]:
    """An action's errors reach the user with the user's own frames and the action's only:
    Millstream's internal frames between them are left out (``MILLSTREAM_DEBUG=1`` keeps
    them); the error's message already says where and what failed."""

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(*args: Any, **kwargs: Any) -> Any:
            try:
                yield from fn(*args, **kwargs)
            except MillstreamError as exc:
                if debugging():
                    raise
                raise exc.with_traceback(None) from None

        return stream  # type: ignore[return-value]

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> T:
        try:
            # a small job of the engine's own operators needs no pandas (core.lazy_pandas)
            with lazy_pandas.blocking():
                return fn(*args, **kwargs)
        except MillstreamError as exc:
            if debugging():
                raise
            raise exc.with_traceback(None) from None

    return call


@user_facing
def run_blocks(node: Node, settings: Settings, consume: Callable[[list[Any]], T],
               on_stats: StatsCallback | None = None) -> T:
    """Run ``node`` and return ``consume(result blocks)``, called before the job's files
    are removed; when blocks were lost before ``consume`` read them, the job runs again."""
    attempts = settings.max_task_attempts
    for attempt in range(attempts):
        job, blocks = _run(node, settings, on_stats)
        try:
            return consume(blocks)
        except FetchFailedError:
            # results lost between the last stage and reading them: run the job again
            if attempt + 1 >= attempts:
                raise
        finally:
            job.cleanup()
    raise AssertionError("unreachable")


def read_table(blocks: list[Any]) -> pa.Table:
    """The rows of result blocks as one table, detached from the blocks' files."""
    table = concat_batches([b for ref in blocks for b in read_block(ref)])
    # detach from the memory-mapped files before they are deleted
    return table.combine_chunks() if table.num_rows else table


def to_table(node: Node, settings: Settings, on_stats: StatsCallback | None = None
             ) -> pa.Table:
    """Run ``node``; all its rows as one Arrow table."""
    return run_blocks(node, settings, read_table, on_stats)


@user_facing
def iter_batches(node: Node, settings: Settings) -> Iterator[pa.RecordBatch]:
    """Run ``node``; stream its non-empty batches, partition by partition."""
    job, blocks = _run(node, settings, None)
    try:
        for ref in blocks:
            for b in read_block(ref):
                if b.num_rows:
                    yield b
    finally:
        job.cleanup()


@user_facing
def write(node: Node, sink: Sink, settings: Settings,
          on_stats: StatsCallback | None = None) -> None:
    """Run ``node`` into ``sink``: prepared, written by the tasks, committed all at once
    (aborted on failure, so nothing is left behind)."""
    job = Job(get_session(), settings, compile_job(node, settings, "sink", sink),
              in_driver=runs_in_driver(node, settings), plan=described_plan(node, settings))
    sink.prepare(job.job_id)
    try:
        messages = job.run()
        sink.commit(list(messages))
    except BaseException:
        sink.abort()
        raise
    finally:
        if on_stats is not None:
            on_stats(job.stats)
        job.cleanup()
