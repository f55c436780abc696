"""The runner interface: schedule tasks, move their results, recover failures. Nothing else."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from millstream.runtime.progress import StageProgress
from millstream.runtime.task import Task, TaskResult


class Runner(ABC):
    """Runs a stage's tasks to completion, retrying failed attempts."""

    name: str = "runner"
    parallelism: int = 1

    @abstractmethod
    def run_tasks(self, tasks: list[Task], progress: StageProgress) -> list[TaskResult]:
        """Run all tasks; return their results in task order or raise TaskError."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop workers and release resources."""

    # Where task outputs live is the runner's business: local files by default; a cluster
    # runner returns outputs that keep data in its object store. Handles returned by these
    # outputs must offer what readers use (``read_slice(p)`` or a local ``path``).
    def shuffle_output(self, partitioner: Any, directory: str) -> Any:
        """The output spec of a shuffle map task."""
        from millstream.runtime.task import ShuffleOutput

        return ShuffleOutput(partitioner, directory)

    def block_output(self, directory: str, cached: bool = False) -> Any:
        """The output spec of a task whose result is materialized (collect, cache, broadcast)."""
        from millstream.runtime.task import BlockOutput

        return BlockOutput(directory)

    def release(self, handles: list[Any]) -> None:
        """Free the data behind output handles that are no longer needed (no-op for files)."""
        return None
