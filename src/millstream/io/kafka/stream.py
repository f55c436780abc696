"""The streaming view of a Kafka topic: one reader per partition, positions are next
offsets."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from millstream.core.context import TaskContext
from millstream.io.base import StreamReader, StreamSource
from millstream.io.files.dead_letters import DeadLetter, StagedDeadLetters


class _KafkaReader(StreamReader):
    """One partition; bad records go to ``dead_letters`` (staged per epoch) when given.
    A bad record's offset is below the position once it is reported, so replaying from
    a checkpointed position never reports a committed one again."""

    def __init__(self, reader: Any, stop_at_end: bool, dead_letters: Any = None) -> None:
        self._reader = reader
        self._stop_at_end = stop_at_end
        self._dead = dead_letters
        self.position = reader.next_offset

    def poll(self, max_records: int, timeout_s: float) -> pa.RecordBatch | None:
        batch, self.position = self._reader.poll_batch(max_records, timeout_s)
        self.finished = self._stop_at_end and self._reader.caught_up and batch is None
        return batch

    def begin(self, epoch: int) -> None:
        if self._dead is not None:
            self._dead.begin(epoch)

    def pre_commit(self, epoch: int) -> Any:
        return self._dead.pre_commit(epoch) if self._dead is not None else None

    def close(self) -> None:
        try:
            self._reader.close()
        finally:
            if self._dead is not None:
                self._dead.close()


class KafkaStreamSource(StreamSource):
    """A Kafka topic: one reader per partition, positions are next offsets."""

    def __init__(self, source: Any, stop_at_end: bool = False) -> None:
        self.source = source
        self.stop_at_end = stop_at_end
        self._parts: list[int] | None = None

    def partitions(self) -> list[Any]:
        if self._parts is None:
            self._parts = self.source.partitions()
        return list(self._parts)

    def start_positions(self) -> dict[Any, Any]:
        return dict(self.source.start_offsets(self.partitions()))

    def prepare(self, positions: dict[Any, Any]) -> None:
        """A JSON topic's schema, inferred once from every partition's records, so each
        reader needs no records of its own partition to know it."""
        self.source.data_schema(positions)

    def open(self, partition: Any, position: Any, ctx: TaskContext) -> StreamReader:
        if self.source.format == "json" and self.source._schema is None:
            self.source.data_schema({partition: int(position)})
        dead = None
        if isinstance(self.source.on_bad_records, DeadLetter):
            dead = StagedDeadLetters(self.source.on_bad_records, ctx)
        return _KafkaReader(self.source.open_reader(int(partition), int(position), ctx,
                                                    dead_letters=dead),
                            self.stop_at_end, dead)
