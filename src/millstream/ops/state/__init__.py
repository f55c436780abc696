"""Keyed state, timers and the operator that runs keyed process functions.

- ``descriptors``: ``ValueStateDescriptor``, ``ListStateDescriptor``, ``MapStateDescriptor``.
- ``handles``: ``ValueState``, ``ListState``, ``MapState`` on the current key's state.
- ``store``: ``KeyedStateStore``, one operator's keyed state, spilling least recently
  used keys to disk beyond its memory limit.
- ``timers``: ``TimerService``, event-time and processing-time timers (spilling too).
- ``spill_store``: the sqlite file spilled state and timers go to.
- ``process``: ``KeyedProcess``, running a ``KeyedProcessFunction`` with a ``ProcessContext``.

The names users write process functions with are exported here.
"""

from millstream.ops.state.descriptors import (
    ListStateDescriptor,
    MapStateDescriptor,
    StateDescriptor,
    ValueStateDescriptor,
)
from millstream.ops.state.handles import ListState, MapState, ValueState
from millstream.ops.state.process import KeyedProcess, KeyedProcessFunction, ProcessContext
from millstream.ops.state.store import KeyedStateStore
from millstream.ops.state.timers import TimerService

__all__ = [
    "KeyedProcess",
    "KeyedProcessFunction",
    "KeyedStateStore",
    "ListState",
    "ListStateDescriptor",
    "MapState",
    "MapStateDescriptor",
    "ProcessContext",
    "StateDescriptor",
    "TimerService",
    "ValueState",
    "ValueStateDescriptor",
]
