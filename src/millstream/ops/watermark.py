"""The event-time watermark assigner: a pass-through operator that tracks the maximum event time.

In batch mode it only forwards batches. The streaming scheduler reads ``max_event_time``
of the instance that runs for each source partition and derives that partition's
watermark as ``max_event_time - delay`` (bounded out-of-orderness); a partition that
delivered nothing for ``idle_timeout`` is left out of the minimum over partitions.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from millstream.core.arrow import event_time_micros
from millstream.errors import SchemaError
from millstream.ops.base import Batches, Operator

#: Maximum event time before any event was seen (int64 µs).
NO_EVENT_TIME = -(2**63)


class EventTimeWatermark(Operator):
    """Forward batches; remember the largest event time of ``column`` (µs)."""

    accepts_updates = True

    def __init__(self, column: str, delay: int, idle_timeout: int | None = None) -> None:
        super().__init__(f"WithWatermark({column!r}, delay={delay}us"
                         + (f", idle_timeout={idle_timeout}us" if idle_timeout else "") + ")")
        self.column = column
        self.delay = int(delay)
        self.idle_timeout = None if idle_timeout is None else int(idle_timeout)
        self.max_event_time = NO_EVENT_TIME

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        """Update the maximum event time and forward the batch unchanged."""
        if batch.num_rows:
            i = batch.schema.get_field_index(self.column)
            if i < 0:
                raise SchemaError(f"{self.name}: no event-time column {self.column!r}; columns "
                                  f"are {batch.schema.names}")
            t, valid = event_time_micros(batch.column(i), self.column)
            if valid is not None:
                t = t[valid]
            if len(t):
                self.max_event_time = max(self.max_event_time, int(np.max(t)))
        return (batch,)

    def watermark(self) -> int:
        """``max event time - delay`` (very negative before the first event)."""
        if self.max_event_time == NO_EVENT_TIME:
            return NO_EVENT_TIME
        return self.max_event_time - self.delay

    def snapshot(self) -> dict[str, Any]:
        return {"operator": "EventTimeWatermark", "max_event_time": self.max_event_time}

    def restore(self, state: dict[str, Any]) -> None:
        self.max_event_time = int(state["max_event_time"])
