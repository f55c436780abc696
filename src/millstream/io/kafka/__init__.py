"""Kafka topics as a source (bounded batch reads and partition readers for streaming) and a sink.

Needs ``confluent-kafka`` (``pip install 'millstream[kafka]'``), imported only when a
client is first made.

Modules: :mod:`~millstream.io.kafka.source` (:class:`KafkaSource`: partitions, offsets,
schema, bounded batch splits), :mod:`~millstream.io.kafka.reader`
(:class:`KafkaPartitionReader`: one partition from an offset as Arrow batches),
:mod:`~millstream.io.kafka.json_values` (JSON values to Arrow, schema inference, bad
records found apart), :mod:`~millstream.io.kafka.stream` (:class:`KafkaStreamSource`:
the topic in a streaming job), :mod:`~millstream.io.kafka.sink` (:class:`KafkaSink`:
transactional or idempotent, two-phase per epoch; appends, upserts with tombstones, or
every change with its kind), :mod:`~millstream.io.kafka.options`
(Millstream's options and the librdkafka defaults) and :mod:`~millstream.io.kafka.client`
(the lazy client import and the errors).

What the streaming scheduler calls. Source, on the driver: ``partitions()``,
``start_offsets()`` (concrete offsets: the initial positions) and, for JSON,
``data_schema(start_offsets)`` so that every reader parses with one schema (a reader
whose source has no schema yet infers one from its first batch). On a worker, per
partition: ``open_reader(p, offset, ctx)``, then ``poll_batch`` in a loop; checkpoint
``next_offset`` per partition at each barrier; ``reader.caught_up`` marks an idle
partition; ``close()``. After a checkpoint completes, optionally
``commit_offsets(positions)``. Sink, per parallel instance ``sink.for_subtask(i)``
(distinct transactional ids): ``begin(e)``, ``write``..., ``pre_commit(e)`` at the
barrier, ``commit(handle)`` when the checkpoint completes; in transactional mode epoch
``e`` must be committed or aborted before ``begin(e + 1)`` (one librdkafka producer has
one open transaction). The sink's recovery limit is described in
:mod:`~millstream.io.kafka.sink`.
"""

from millstream.io.kafka.client import (
    KafkaClientError,
    KafkaEndNotReachedError,
    KafkaNotInstalledError,
    KafkaStateError,
)
from millstream.io.kafka.options import FORMATS, SINK_OPTIONS, SOURCE_OPTIONS, STARTS
from millstream.io.kafka.reader import KafkaPartitionReader
from millstream.io.kafka.sink import KafkaCommitHandle, KafkaSink
from millstream.io.kafka.source import (
    KEY_FIELD,
    METADATA_FIELDS,
    RAW_FIELDS,
    KafkaSource,
    KafkaSplitInfo,
)
from millstream.io.kafka.stream import KafkaStreamSource

__all__ = [
    "FORMATS",
    "KEY_FIELD",
    "METADATA_FIELDS",
    "RAW_FIELDS",
    "SINK_OPTIONS",
    "SOURCE_OPTIONS",
    "STARTS",
    "KafkaClientError",
    "KafkaCommitHandle",
    "KafkaEndNotReachedError",
    "KafkaNotInstalledError",
    "KafkaPartitionReader",
    "KafkaSink",
    "KafkaSource",
    "KafkaSplitInfo",
    "KafkaStateError",
    "KafkaStreamSource",
]
