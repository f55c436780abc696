"""A streaming job's metrics, summed over the reports of its tasks."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def sum_task_metrics(reports: Iterable[dict[str, Any]]
                     ) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """Per operator name: records in and out and state bytes; per counter name: its total,
    over the tasks' latest reports."""
    ops: dict[str, dict[str, int]] = {}
    counters: dict[str, int] = {}
    for tm in reports:
        for name, (i, o) in tm.get("operators", {}).items():
            agg = ops.setdefault(name, {"records_in": 0, "records_out": 0, "state_bytes": 0})
            agg["records_in"] += i
            agg["records_out"] += o
        for name, size in tm.get("state_bytes", {}).items():
            if name in ops:
                ops[name]["state_bytes"] += size
        for name, value in tm.get("counters", {}).items():
            counters[name] = counters.get(name, 0) + value
    return ops, counters
