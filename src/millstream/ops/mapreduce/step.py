"""What the MapReduce mapper and reducer operators share: the job's step, its output
modes, the user's partitioner, and the job's counters.

A step's operator writes pairs in one of three output modes: ``shuffle`` (the encoded key
in ``__mr_key`` for the engine to partition and sort on, the value exactly encoded, and,
with a user partitioner, ``__mr_part``), ``exact`` (key and value exactly encoded, for
the next step) or ``final`` (natural Arrow columns ``key`` and ``value``, the job's
result). Counters go to the task's counter group ``mapreduce``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from millstream.core.context import TaskContext
from millstream.errors import PlanError, UserCodeFailure
from millstream.ops.base import Operator
from millstream.ops.mapreduce.columns import ColumnTyper
from millstream.ops.mapreduce.keys import encode_keys
from millstream.ops.mapreduce.values import encoded_columns
from millstream.ops.narrow import _short, function_name

KEY_COLUMN = "__mr_key"
PART_COLUMN = "__mr_part"
COUNTER_GROUP = "mapreduce"


class PairError(TypeError):
    """A mapper, combiner or reducer yielded something that is not a (key, value) pair."""


def pair_error(role: str, item: Any) -> PairError:
    """The error for ``role`` (mapper, combiner, ...) having yielded ``item``."""
    return PairError(f"{role} must yield (key, value) pairs; it yielded {_short(item)} "
                     f"({type(item).__name__})")


def partition_representatives(n: int) -> np.ndarray:
    """For each partition p < n, an int64 value that hash partitioning sends to p."""
    from millstream.core.hashing import partition_ids

    reps = np.full(n, -1, dtype=np.int64)
    start, size = 0, max(64, 8 * n)
    while (reps < 0).any():
        cand = np.arange(start, start + size, dtype=np.int64)
        pids = partition_ids([pa.array(cand)], len(cand), n)
        missing = reps < 0
        for p in np.flatnonzero(missing):
            hit = np.flatnonzero(pids == p)
            if len(hit):
                reps[p] = cand[hit[0]]
        start += size
        if start > 1 << 40:  # pragma: no cover - would mean a broken hash
            raise RuntimeError(f"no value hashes to some of {n} partitions")
    return reps


_NO_KEY = object()


class StepOperator(Operator):
    """Shared by the mapper and reducer operators: the job's step and its counters."""

    role = "step"

    def __init__(self, payload: bytes, step: int, label: str, output: str,
                 num_reducers: int = 1, strict_types: bool = False) -> None:
        super().__init__(f"{label} step {step + 1} {self.role}")
        if output not in ("shuffle", "exact", "final"):
            raise PlanError(f"unknown MapReduce output mode {output!r}")
        self.payload = payload
        self.step = step
        self.label = label
        self.output = output
        self.num_reducers = num_reducers
        self.strict_types = strict_types
        self.counts: dict[str, int] = {}

    def open(self, ctx: TaskContext) -> None:
        import cloudpickle

        super().open(ctx)
        job, steps = cloudpickle.loads(self.payload)
        self.job = job
        self.spec = steps[self.step]
        if job is not None:
            job._mr_task_context = ctx
        self.batch_rows = max(1024, min(ctx.batch_size, 65536))
        self.key_typer = ColumnTyper("key", self.strict_types)
        self.value_typer = ColumnTyper("value", self.strict_types)
        self.partitioner: Callable[[Any, int], int] | None = None
        self.reps: np.ndarray | None = None
        if self.output == "shuffle" and getattr(self.spec, "partitioner", None) is not None:
            self.partitioner = self.spec.partitioner
            self.reps = partition_representatives(self.num_reducers)

    def _count(self, name: str, n: int) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def _flush_counts(self) -> None:
        if self.ctx is None:
            return
        for name, n in self.counts.items():
            if n:
                self.ctx.increment_counter(COUNTER_GROUP, f"step {self.step + 1} {name}", n)
        self.counts = {}

    def _call(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:
            raise UserCodeFailure(self.name, function_name(fn), exc, f"<{what}>") from exc

    def _call_group(self, fn: Callable[..., Any], key: Any, values: Any) -> Any:
        """``fn(key, values)`` (a reducer or combiner); its errors name the key."""
        try:
            return fn(key, values)
        except Exception as exc:
            raise UserCodeFailure(self.name, function_name(fn), exc, f"key {_short(key)}") from exc

    def _collect(self, role: str, fn: Callable[..., Any], res: Any, ak: Callable[[Any], None],
                 av: Callable[[Any], None], record: Any, key: Any = _NO_KEY) -> None:
        """Append the pairs a hook or reducer returned; wrap its errors."""
        try:
            if res is not None:
                for item in res:
                    try:
                        k, v = item
                    except (TypeError, ValueError):
                        raise pair_error(role, item) from None
                    ak(k)
                    av(v)
        except Exception as exc:
            if key is not _NO_KEY:
                record = f"key {_short(key)}"
            raise UserCodeFailure(self.name, function_name(fn), exc, record) from exc

    def _batches(self, keys: list[Any], values: list[Any]) -> Iterator[pa.RecordBatch]:
        """Output batches of pairs in this operator's output mode."""
        step = self.batch_rows
        for lo in range(0, len(keys), step):
            ks, vs = keys[lo:lo + step], values[lo:lo + step]
            if self.output == "shuffle":
                yield self._shuffle_batch(ks, vs)
            elif self.output == "exact":
                ka, kn = encoded_columns("key", ks)
                va, vn = encoded_columns("value", vs)
                yield pa.RecordBatch.from_arrays(ka + va, names=kn + vn)
            else:
                kf, ka = self.key_typer.field_and_array(ks)
                vf, va = self.value_typer.field_and_array(vs)
                yield pa.RecordBatch.from_arrays([ka, va], schema=pa.schema([kf, vf]))

    def _shuffle_batch(self, keys: list[Any], values: list[Any]) -> pa.RecordBatch:
        va, vn = encoded_columns("value", values)
        arrays = [encode_keys(keys), *va]
        names = [KEY_COLUMN, *vn]
        if self.partitioner is not None:
            arrays.append(pa.array(self.reps[self._partitions(keys)]))
            names.append(PART_COLUMN)
        return pa.RecordBatch.from_arrays(arrays, names=names)

    def _partitions(self, keys: list[Any]) -> np.ndarray:
        fn, n = self.partitioner, self.num_reducers
        try:
            parts = [fn(k, n) for k in keys]
        except Exception as exc:
            raise UserCodeFailure(self.name, function_name(fn), exc, "<partitioner>") from exc
        try:
            arr = np.asarray(parts, dtype=np.int64)
            bad = (arr < 0) | (arr >= n)
            ok = not bad.any() and all(type(p) is int or isinstance(p, np.integer) for p in parts)
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            i = next(i for i, p in enumerate(parts)
                     if not (isinstance(p, (int, np.integer)) and not isinstance(p, bool)
                             and 0 <= p < n))
            err = ValueError(f"partitioner must return an int in [0, {n}) for every key; it "
                             f"returned {parts[i]!r} for key {_short(keys[i])}")
            raise UserCodeFailure(self.name, function_name(fn), err, _short(keys[i]))
        return arr
