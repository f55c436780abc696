"""The context a task runs in: where it is in the job, its memory budget, its scratch space."""

from __future__ import annotations

import os
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TaskContext:
    """Facts about the running task, handed to sources, operators and sinks.

    ``memory_budget`` is the number of bytes this task's buffering operators may hold
    before they spill to ``spill_dir``.
    """

    job_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    stage_id: int = 0
    partition: int = 0
    attempt: int = 0
    memory_budget: int = 256 << 20
    spill_dir: str = field(default_factory=tempfile.gettempdir)
    batch_size: int = 65536
    shuffle_compression: str | None = "lz4"
    counters: dict[tuple[str, str], int] = field(default_factory=dict)
    # Where the task is, for error messages ("stage 2, partition 5").
    stage_name: str = ""

    def increment_counter(self, group: str, name: str, amount: int = 1) -> None:
        """Add to a named counter; counters of successful attempts are summed by the driver."""
        key = (group, name)
        self.counters[key] = self.counters.get(key, 0) + amount

    def scratch_path(self, prefix: str, suffix: str = "") -> str:
        """A fresh file path in the spill directory, unique to this task attempt."""
        os.makedirs(self.spill_dir, exist_ok=True)
        name = (f"{prefix}-{self.job_id}-s{self.stage_id}-p{self.partition}-a{self.attempt}-"
                f"{uuid.uuid4().hex[:8]}{suffix}")
        return os.path.join(self.spill_dir, name)

    def where(self) -> str:
        """Human-readable location of this task."""
        return f"stage {self.stage_name or self.stage_id}, partition {self.partition}, attempt {self.attempt}"


def default_context(**kwargs: Any) -> TaskContext:
    """A context for running operators outside a job (tests, driver-side work)."""
    return TaskContext(**kwargs)


_current: TaskContext | None = None


def current_context() -> TaskContext | None:
    """The context of the task running in this process, or None outside a task."""
    return _current


def set_current_context(ctx: TaskContext | None) -> None:
    """Set by the task runner around a task's execution."""
    global _current
    _current = ctx
