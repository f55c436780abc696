"""The runner interface: schedule tasks, move their results, recover failures. Nothing else."""

from __future__ import annotations

from abc import ABC, abstractmethod

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
