"""The one operator interface both schedulers drive.

An operator is opened once per task, receives record batches on one or more input
ports, may react to watermarks (streaming), emits record batches, and can snapshot and
restore its state. Batch execution calls ``process`` for every input batch, then
``end_input`` per port and ``finish`` once; streaming execution interleaves
``on_watermark`` and takes ``snapshot`` at checkpoint barriers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pyarrow as pa

from millstream.core.context import TaskContext

Batches = Iterable[pa.RecordBatch]
_EMPTY: tuple[pa.RecordBatch, ...] = ()


class Operator:
    """Base physical operator; subclasses override what they need."""

    #: Number of input ports (2 for joins).
    num_inputs: int = 1
    #: Order in which a batch task drains its input ports (build side first for joins).
    input_order: tuple[int, ...] = (0,)
    #: Whether it takes rows that carry changes (a hidden change kind per row, see
    #: ``core.changelog``): per-row operators that keep the kind, and those that consume
    #: retractions (the changelog aggregate, top-N).
    accepts_updates: bool = False
    #: Whether its output carries updates (-U/+U/-D rows) whatever its input (the
    #: changelog aggregate, keep-last deduplication, top-N); per-row operators that accept
    #: updates pass on what they get.
    emits_updates: bool = False

    def __init__(self, name: str | None = None) -> None:
        self.name = name or type(self).__name__
        self.ctx: TaskContext | None = None

    def open(self, ctx: TaskContext) -> None:
        """Prepare for a task (allocate state, load broadcast data)."""
        self.ctx = ctx

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        """Consume one input batch; return output batches (possibly none)."""
        return (batch,)

    def end_input(self, port: int) -> Batches:
        """Input ``port`` has no more data (the build side of a join is complete)."""
        return _EMPTY

    def on_watermark(self, watermark: int) -> Batches:
        """Event time has advanced to ``watermark``; emit what is now complete."""
        return _EMPTY

    def finish(self) -> Batches:
        """All inputs ended: emit remaining results."""
        return _EMPTY

    def snapshot(self) -> Any:
        """Picklable state for a checkpoint (None for stateless operators)."""
        return None

    def restore(self, state: Any) -> None:
        """Restore from ``snapshot()`` output."""

    def close(self) -> None:
        """Release resources (spill files); called after finish or on failure."""

    def describe(self) -> str:
        """One line for explain()."""
        return self.name


def is_keyed_op(op: Operator) -> bool:
    """True for operators whose state is split by key group (keyed windows, process functions,
    joins), so it can be restored at another parallelism."""
    return bool(getattr(op, "is_keyed", False)) and hasattr(op, "snapshot_by_key_group")


class OperatorFactory:
    """A picklable recipe that builds a fresh operator instance per task."""

    def __init__(self, cls: type[Operator], *args: Any, **kwargs: Any) -> None:
        self.cls = cls
        self.args = args
        self.kwargs = kwargs

    def create(self) -> Operator:
        return self.cls(*self.args, **self.kwargs)

    def describe(self) -> str:
        return self.create().describe()

    def __repr__(self) -> str:
        return f"OperatorFactory({self.cls.__name__})"
