"""Reading one Kafka partition from an offset as Arrow batches (for streaming readers and
bounded batch splits alike)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from millstream.core.context import TaskContext, current_context, default_context
from millstream.errors import BadRecordError, PlanError
from millstream.io.files.badrecords import BadRecordHandler, snippet
from millstream.io.kafka.client import (
    KafkaStateError,
    _ck,
    _client_error,
    _raise_consumer_error,
)
from millstream.io.kafka.json_values import _infer_data_schema, _parse_json_values

if TYPE_CHECKING:
    from millstream.io.kafka.source import KafkaSource


class KafkaPartitionReader:
    """Reads one partition from an offset as Arrow batches; tracks the next offset.

    ``next_offset`` is the position to checkpoint: every record below it has been
    returned (or routed as a bad record); control records and compacted gaps are
    skipped. ``caught_up`` is True when the last poll reached the end of the partition
    (useful for idle-partition detection). With ``end_offset``, records at or beyond it
    are never returned and ``finished`` turns True once the position reaches it.
    """

    def __init__(self, source: KafkaSource, partition: int, start_offset: int, *,
                 end_offset: int | None = None, ctx: TaskContext | None = None,
                 dead_letters: Any = None):
        if not isinstance(start_offset, int) or start_offset < 0:
            raise PlanError(f"kafka {source.topic}[{partition}]: start_offset must be a "
                            f"concrete offset >= 0 (see KafkaSource.start_offsets()), got "
                            f"{start_offset!r}")
        self.source = source
        self.topic = source.topic
        self.partition = int(partition)
        self.next_offset = start_offset
        self.end_offset = end_offset
        self.caught_up = False
        self.ctx = ctx or current_context() or default_context(partition=self.partition,
                                                                stage_name="kafka-reader")
        self._handler: BadRecordHandler | None = None
        #: a streaming reader's staged dead-letter output (else a file per task attempt)
        self._dead_letters = dead_letters
        ck = _ck()
        self._eof_code = ck.KafkaError._PARTITION_EOF
        self._consumer = source._consumer()
        try:
            self._consumer.assign([ck.TopicPartition(self.topic, self.partition,
                                                     start_offset)])
        except ck.KafkaException as exc:
            self._consumer.close()
            raise _client_error(f"assigning kafka {self.topic}[{partition}]", exc) from exc
        self._closed = False

    @property
    def finished(self) -> bool:
        """True when a bounded reader has reached its end offset."""
        return self.end_offset is not None and self.next_offset >= self.end_offset

    def poll_batch(self, max_records: int = 10_000, timeout_s: float = 1.0
                   ) -> tuple[pa.RecordBatch | None, int]:
        """Up to ``max_records`` records as one batch (None if none) and the next offset.

        Waits up to ``timeout_s`` for the first record, then returns what is already
        fetched; returns early when the end of the partition is reached.
        """
        if self._closed:
            raise KafkaStateError("poll_batch on a closed KafkaPartitionReader")
        if self.finished:
            return None, self.next_offset
        msgs = self._fetch(max(1, int(max_records)), float(timeout_s))
        batch = self._to_batch(msgs) if msgs else None
        if batch is not None and self.source.columns is not None:
            batch = batch.select(self.source.columns)
        return batch, self.next_offset

    def _fetch(self, max_records: int, timeout_s: float) -> list[Any]:
        consumer = self._consumer
        out: list[Any] = []
        deadline = time.monotonic() + timeout_s
        at_end = False  # the end of the partition was reported during this call
        while len(out) < max_records and not self.finished:
            msgs = consumer.consume(max_records - len(out), 0)
            if not msgs:
                if out or at_end:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                msg = consumer.poll(left)
                if msg is None:
                    break
                msgs = [msg]
            for msg in msgs:
                err = msg.error()
                if err is not None:
                    if err.code() == self._eof_code:
                        # The fetch position after everything below it (incl. control records).
                        self.caught_up = at_end = True
                        self._advance(int(msg.offset()))
                    else:
                        _raise_consumer_error(self.topic, self.partition, msg.offset(), err)
                    continue
                offset = msg.offset()
                if offset < self.next_offset:
                    continue  # already returned (never expected with assign at a position)
                if self.end_offset is not None and offset >= self.end_offset:
                    self.next_offset = max(self.next_offset, self.end_offset)
                    break
                self.caught_up = False
                out.append(msg)
                self.next_offset = offset + 1
        return out

    def _advance(self, position: int) -> None:
        if self.end_offset is not None:
            position = min(position, self.end_offset)
        self.next_offset = max(self.next_offset, position)

    # -- conversion ----------------------------------------------------------------------

    def _metadata(self, msgs: Sequence[Any]) -> list[pa.Array]:
        n = len(msgs)
        stamps = []
        for m in msgs:
            kind, ts = m.timestamp()
            stamps.append(ts if kind != 0 and ts is not None and ts >= 0 else None)
        arrays = [
            pa.array([self.topic] * n, pa.string()),
            pa.array([self.partition] * n, pa.int32()),
            pa.array([m.offset() for m in msgs], pa.int64()),
            pa.array(stamps, pa.int64()).cast(pa.timestamp("ms")),
        ]
        if self.source.format == "json":
            arrays.append(pa.array([m.key() for m in msgs], pa.binary()))
        return arrays

    def _to_batch(self, msgs: list[Any]) -> pa.RecordBatch | None:
        source = self.source
        if source.format == "raw":
            arrays = [pa.array([m.key() for m in msgs], pa.binary()),
                      pa.array([m.value() for m in msgs], pa.binary()),
                      *self._metadata(msgs)]
            return pa.RecordBatch.from_arrays(arrays, schema=source.full_schema())
        json_idx = [i for i, m in enumerate(msgs) if m.value() is not None]
        schema = source._schema
        if schema is None:
            inferred, late = _infer_data_schema([msgs[i].value() for i in json_idx])
            if inferred is None:
                # Nothing parseable yet: route the bad ones, keep the schema open.
                parsed = _parse_json_values([msgs[i].value() for i in json_idx], None)
                self._report([(json_idx[i], r) for i, r in parsed.bad], msgs)
                rows = [i for i, m in enumerate(msgs) if m.value() is None]
                if not rows:
                    return None
                raise PlanError(f"kafka topic {self.topic!r}: only tombstones (null values) "
                                f"so far, no JSON schema to give them; pass schema=...")
            source._check_names(inferred)
            source._schema, source._late = inferred, late
            schema = inferred
        parsed = _parse_json_values([msgs[i].value() for i in json_idx], schema, source._late)
        self._report([(json_idx[i], r) for i, r in parsed.bad], msgs)
        # Row order: messages by offset; tombstones are rows of nulls.
        position_of = {json_idx[j]: k for k, j in enumerate(parsed.kept)}
        bad = {json_idx[i] for i, _ in parsed.bad}
        take: list[int | None] = []
        rows: list[int] = []
        for i, m in enumerate(msgs):
            if i in bad:
                continue
            rows.append(i)
            take.append(None if m.value() is None else position_of[i])
        if not rows:
            return None
        data = parsed.table if parsed.table is not None else schema.empty_table()
        data = data.take(pa.array(take, pa.int64()))
        meta = self._metadata([msgs[i] for i in rows])
        table = pa.Table.from_arrays([*data.columns, *meta], schema=source.full_schema())
        return table.combine_chunks().to_batches()[0]

    def _report(self, bad: list[tuple[int, str]], msgs: Sequence[Any]) -> None:
        for i, reason in bad:
            msg = msgs[i]
            value = msg.value() or b""
            text = value.decode("utf-8", errors="replace")
            where = f"kafka topic {self.topic!r} partition {self.partition} offset {msg.offset()}"
            policy = self.source.on_bad_records
            if policy == "error":
                exc = BadRecordError(
                    f"malformed JSON record in {where}: {reason}\n"
                    f"  record: {snippet(text)!r}\n"
                    f"  To skip malformed records pass read_kafka(..., on_bad_records=\"skip\") "
                    f"(they are counted), or on_bad_records=\"./<directory>\" (a path or URI) "
                    f"to write each one to a dead-letter file.",
                    path=f"kafka://{self.topic}/{self.partition}", offset=msg.offset(),
                    record=text)
                exc.topic = self.topic  # type: ignore[attr-defined]
                exc.partition = self.partition  # type: ignore[attr-defined]
                raise exc
            if self._handler is None:
                self._handler = BadRecordHandler(policy, self.ctx, "JSON",
                                                 output=self._dead_letters)
            self._handler.report(path=f"kafka://{self.topic}/{self.partition}", line=None,
                                 offset=msg.offset(), reason=reason, record=text)

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Close the consumer and flush the dead-letter file; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._consumer.close()
        finally:
            if self._handler is not None:
                self._handler.close()

    def __enter__(self) -> KafkaPartitionReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
