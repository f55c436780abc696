"""The interfaces every source and sink implements.

A *source* is planned on the driver (``plan_splits`` lists files and cuts them into
splits) and read on the workers (``read_split`` streams record batches of one split).
A *sink* is prepared and committed on the driver and written by the workers; the
output becomes visible all at once in ``commit`` (staging, then commit), and
``abort`` removes every trace of a failed job.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

if TYPE_CHECKING:
    from millstream.api.expressions import Expr
    from millstream.runtime.context import TaskContext


@dataclass(frozen=True)
class Split:
    """One unit of input read by one task: a file, a byte range, a row group set, a slice.

    ``info`` is source specific and must be picklable. ``size_bytes`` guides scheduling.
    """

    index: int
    info: Any
    size_bytes: int = 0
    description: str = ""


class Source(ABC):
    """A bounded, partitioned input."""

    #: Short name for explain() and progress, e.g. "parquet", "text".
    name: str = "source"

    @abstractmethod
    def plan_splits(self, target_splits: int) -> list[Split]:
        """Cut the input into about ``target_splits`` splits (driver side; may list files)."""

    @abstractmethod
    def read_split(self, split: Split, ctx: TaskContext) -> Iterator[pa.RecordBatch]:
        """Stream the record batches of one split (worker side).

        Honors ``self.columns`` and ``self.predicate`` when the source accepted them
        through ``with_pushdown``.
        """

    def with_pushdown(self, columns: list[str] | None, predicate: Expr | None
                      ) -> tuple[Source, bool, bool]:
        """Return (source, columns_applied, predicate_fully_applied).

        The optimizer calls this to push a projection and a filter into the scan. A
        source that cannot use them returns ``(self, False, False)``; a source that uses
        the predicate only to skip data (row groups) but may return non-matching rows
        returns ``predicate_fully_applied=False`` so the filter stays in the plan.
        """
        return self, False, False

    def estimated_size_bytes(self) -> int | None:
        """A cheap estimate of the data size (file sizes, in-memory size), or None."""
        return None

    def describe(self) -> str:
        """One line for explain(): the source, its location and what was pushed into it."""
        return self.name


class Sink(ABC):
    """A bounded output committed atomically."""

    name: str = "sink"

    @abstractmethod
    def prepare(self, job_id: str) -> None:
        """Driver side, before any task runs: check the target (mode), create staging."""

    @abstractmethod
    def write_partition(self, batches: Iterator[pa.RecordBatch], ctx: TaskContext) -> Any:
        """Worker side: write one partition into staging; return a picklable commit message.

        Each attempt of a task writes to its own staging names, so a retried or
        speculative attempt never mixes with another; only the messages of the
        attempts that won reach ``commit``.
        """

    @abstractmethod
    def commit(self, messages: list[Any]) -> None:
        """Driver side, after all tasks succeeded: make the output visible, write _SUCCESS."""

    @abstractmethod
    def abort(self) -> None:
        """Driver side, after a failure: remove staging, leave the target as it was."""

    def describe(self) -> str:
        return self.name
