"""Inline hosts: every task of a streaming job in the calling process, as one task slot.

The coordinator drives the slot (:mod:`~millstream.runtime.streaming.slot`) round by
round with :meth:`InlineHosts.poll`: messages move through in-process queues, batches
pass by reference, and the schedule is deterministic (each source partition reads once a
round, the rows go all the way through, then the watermarks move; barriers and commits
are handled in a round of their own). Test sources, virtual clocks and fault points need
this executor (``executor="inline"``); it is also the cheapest for small jobs (no
processes, no serialization).
"""

from __future__ import annotations

import time

from millstream.core.time import Clock
from millstream.runtime.streaming.slot import Slot, SlotSpec
from millstream.runtime.streaming.spec import TaskSpec


class InlineHosts:
    """Runs the tasks of ``specs`` in this thread, as one slot; the coordinator drives it
    with ``poll``."""

    def __init__(self, specs: list[TaskSpec], clock: Clock | None = None,
                 idle_sleep_s: float = 0.01) -> None:
        self.slot = Slot(SlotSpec(0, specs, {s.index: 0 for s in specs}, deterministic=True),
                         None, clock)
        self.idle_sleep_s = idle_sleep_s
        self.slot.open()

    @property
    def rounds(self) -> int:
        return self.slot.rounds

    def send_control(self, index: int, msg: tuple) -> None:
        """Queue a coordinator message for task ``index``."""
        self.slot.controls[index].append(msg)

    def poll(self, timeout: float) -> list[tuple]:
        """One round; the messages the tasks sent the coordinator meanwhile."""
        did = self.slot.round()
        if not did and not self.slot.outgoing:
            time.sleep(min(timeout, self.idle_sleep_s))
        out, self.slot.outgoing = self.slot.outgoing, []
        return out

    def dead(self) -> list[tuple[int, str]]:
        """Nothing dies here without the coordinator seeing its error."""
        return []

    def pids(self) -> list[int]:
        return []

    def shutdown(self, crashed: bool = False) -> None:
        """Close every task still open (not after a simulated crash: a killed process
        cleans nothing up)."""
        self.slot.close(crashed)
