"""The Kafka source: a topic's partitions, offsets and JSON schema, and bounded batch reads.

**Source.** :class:`KafkaSource` discovers the topic's partitions from metadata and
reads each one with its own consumer, *assigned* to the partition at an explicit offset
(never ``subscribe``: no consumer-group rebalance can hand a partition to two readers or
move a position behind Millstream's back). A position is a partition's next offset to
read; it is what a streaming checkpoint stores. Two ways to read:

* streaming: ``source.start_offsets()`` once, then per partition
  ``reader = source.open_reader(partition, offset)`` and repeatedly
  ``batch, next_offset = reader.poll_batch(max_records, timeout_s)``; after a restore,
  reopen the readers at the checkpointed ``next_offset`` values;
* batch (the :class:`~millstream.io.base.Source` interface): ``plan_splits`` fixes
  ``[start, end)`` per partition on the driver, one split per partition, and
  ``read_split`` reads exactly that range.

Columns: for ``format="json"`` the fields of each value's JSON object (schema given, or
inferred on the driver from up to ``infer_records`` records at the start offsets; a
field null in the whole sample is read as text) and for ``format="raw"`` ``key`` and
``value`` (binary); then the metadata ``_topic`` (string), ``_partition`` (int32),
``_offset`` (int64), ``_timestamp`` (timestamp[ms], the record's timestamp as epoch
milliseconds, UTC, null when the record has none) and, for JSON, ``_key`` (binary).
A JSON record with a null value (a tombstone) gives a row whose data fields are null.

Bad JSON follows ``on_bad_records`` as for files
(:mod:`millstream.io.files.badrecords`): ``"error"`` raises
:class:`~millstream.errors.BadRecordError` naming the topic, partition and offset;
``"skip"`` drops and counts it; a directory URI dead-letters it as ``{"path":
"kafka://<topic>/<partition>", "line": null, "offset": <kafka offset>, "reason",
"record"}``. A bad record still advances the position (it is never re-read).

**End of a bounded read.** A batch read stops at end offsets captured at planning.
``options={"end_offsets": {partition: offset, ...}}`` gives them explicitly (exclusive).
Otherwise (``"end_offsets": "latest"``, the default) they are measured: the broker's
ListOffsets answer (``get_watermark_offsets``) is taken as a first guess, then a
consumer fetches from there until the broker reports the end of the partition, and
the fetched end is used. On a correct broker both agree (``source.watermarks_trusted``
is True after planning); some brokers (Tansu) answer ListOffsets wrongly, and then the
measured end is used and a warning is logged. ``start="latest"`` is measured the same
way. A read that stops short of its end for ``end_timeout_s`` raises
:class:`KafkaEndNotReachedError`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from millstream.core.context import TaskContext
from millstream.errors import PlanError, SchemaError
from millstream.io.base import Source, Split
from millstream.io.files.dead_letters import check_policy
from millstream.io.kafka.client import (
    KafkaClientError,
    KafkaEndNotReachedError,
    _ck,
    _client_error,
    _raise_consumer_error,
    check_reachable,
    client_logging,
)
from millstream.io.kafka.json_values import _infer_data_schema
from millstream.io.kafka.options import (
    _CONSUMER_DEFAULTS,
    _CONSUMER_FIXED,
    FORMATS,
    SOURCE_OPTIONS,
    STARTS,
    _split_options,
    unknown_setting_hint,
)
from millstream.io.kafka.reader import KafkaPartitionReader
from millstream.io.kafka.stream import KafkaStreamSource

if TYPE_CHECKING:
    from millstream.expr.nodes import Expr

_log = logging.getLogger(__name__)

#: Metadata columns appended to every batch (``_key`` only for format="json").
METADATA_FIELDS = (
    pa.field("_topic", pa.string()),
    pa.field("_partition", pa.int32()),
    pa.field("_offset", pa.int64()),
    pa.field("_timestamp", pa.timestamp("ms")),
)
KEY_FIELD = pa.field("_key", pa.binary())
RAW_FIELDS = (pa.field("key", pa.binary()), pa.field("value", pa.binary()))


@dataclass(frozen=True)
class KafkaSplitInfo:
    """The offset range ``[start, end)`` of one partition, fixed at planning."""

    topic: str
    partition: int
    start: int
    end: int


class KafkaSource(Source):
    """A Kafka topic: readers per partition for streaming, bounded splits for batch."""

    name = "kafka"
    bounded = False

    def as_stream(self, target_splits: int, stop_at_end: bool = False) -> KafkaStreamSource:
        """The topic in a streaming job: a reader per partition, positions are next offsets."""
        return KafkaStreamSource(self, stop_at_end)

    def __init__(self, topic: str, bootstrap_servers: str | Sequence[str],
                 format: str = "json", start: str = "earliest", group_id: str | None = None,
                 schema: pa.Schema | None = None, options: Mapping[str, Any] | None = None):
        if not isinstance(topic, str) or not topic:
            raise PlanError(f"KafkaSource: topic must be a non-empty string, got {topic!r}")
        if format not in FORMATS:
            raise PlanError(f"KafkaSource: format must be one of {FORMATS}, got {format!r}")
        if start not in STARTS:
            raise PlanError(f"KafkaSource: start must be one of {STARTS}, got {start!r}")
        if start == "committed" and not group_id:
            raise PlanError("KafkaSource: start='committed' reads the committed offsets of a "
                            "consumer group; pass group_id=...")
        if schema is not None and format != "json":
            raise PlanError("KafkaSource: schema= applies to format='json' only")
        self.topic = topic
        self.bootstrap_servers = (bootstrap_servers if isinstance(bootstrap_servers, str)
                                  else ",".join(bootstrap_servers))
        self.format = format
        self.start = start
        self.group_id = group_id
        self.settings, self.client_options = _split_options(options, SOURCE_OPTIONS)
        self.on_bad_records = check_policy(self.settings["on_bad_records"])
        self._explicit_ends = self._check_end_offsets(self.settings["end_offsets"])
        self._schema: pa.Schema | None = schema
        self._late: tuple[str, ...] = ()
        if schema is not None:
            self._check_names(schema)
        self.columns: list[str] | None = None
        self.predicate: Expr | None = None
        #: After planning/measuring ends: did the broker's ListOffsets agree with the
        #: fetched ends (None: not measured)?
        self.watermarks_trusted: bool | None = None

    # -- configuration -------------------------------------------------------------------

    @staticmethod
    def _check_end_offsets(value: Any) -> dict[int, int] | None:
        if value == "latest":
            return None
        if isinstance(value, Mapping):
            out = {}
            for p, off in value.items():
                if not isinstance(p, int) or not isinstance(off, int) or off < 0:
                    raise PlanError(f"end_offsets must map partition (int) -> offset "
                                    f"(int >= 0), got {p!r}: {off!r}")
                out[p] = off
            return out
        raise PlanError(f"end_offsets must be 'latest' or a dict partition -> offset, "
                        f"got {value!r}")

    def _check_names(self, schema: pa.Schema) -> None:
        taken = {f.name for f in self._meta_fields()}
        clash = [n for n in schema.names if n in taken]
        if clash:
            raise SchemaError(f"kafka topic {self.topic!r}: JSON fields {clash} clash with "
                              f"the metadata columns; pass schema= without them or rename "
                              f"them in the producer")

    def _meta_fields(self) -> list[pa.Field]:
        return list(METADATA_FIELDS) + ([KEY_FIELD] if self.format == "json" else [])

    def consumer_config(self, **overrides: Any) -> dict[str, Any]:
        """The librdkafka settings of this source's consumers."""
        config: dict[str, Any] = {"bootstrap.servers": self.bootstrap_servers,
                                  "group.id": self.group_id or f"millstream-{uuid.uuid4().hex}"}
        config.update(_CONSUMER_DEFAULTS)
        config.update(self.client_options)
        config.update(_CONSUMER_FIXED)
        config.update(overrides)
        config.update(client_logging())
        return config

    def _consumer(self, **overrides: Any) -> Any:
        ck = _ck()
        try:
            return ck.Consumer(self.consumer_config(**overrides))
        except (ck.KafkaException, ValueError, TypeError) as exc:
            raise PlanError(f"kafka topic {self.topic!r}: bad consumer settings: {exc}"
                            f"{unknown_setting_hint(exc, self.client_options, SOURCE_OPTIONS)}"
                            ) from exc

    @property
    def _timeout(self) -> float:
        return float(self.settings["metadata_timeout_s"])

    # -- discovery -----------------------------------------------------------------------

    def partitions(self) -> list[int]:
        """The topic's partition ids, from broker metadata."""
        check_reachable(self.bootstrap_servers)
        consumer = self._consumer()
        try:
            md = consumer.list_topics(self.topic, timeout=self._timeout)
        except _ck().KafkaException as exc:
            raise _client_error(f"metadata of kafka topic {self.topic!r} from "
                                f"{self.bootstrap_servers}", exc) from None
        finally:
            consumer.close()
        topic = md.topics.get(self.topic)
        if topic is None or topic.error is not None or not topic.partitions:
            why = topic.error if topic is not None else "not in metadata"
            raise KafkaClientError(f"kafka topic {self.topic!r} not found at "
                                   f"{self.bootstrap_servers}: {why}")
        return sorted(topic.partitions)

    def _partitions_or(self, partitions: Sequence[int] | None) -> list[int]:
        return list(partitions) if partitions is not None else self.partitions()

    def _tps(self, partitions: Sequence[int], offset: int | None = None) -> list[Any]:
        ck = _ck()
        if offset is None:
            return [ck.TopicPartition(self.topic, p) for p in partitions]
        return [ck.TopicPartition(self.topic, p, offset) for p in partitions]

    def _listed_watermarks(self, consumer: Any, partitions: Sequence[int]
                           ) -> dict[int, tuple[int, int]]:
        out = {}
        for tp in self._tps(partitions):
            try:
                got = consumer.get_watermark_offsets(tp, timeout=self._timeout, cached=False)
            except _ck().KafkaException as exc:
                raise _client_error(f"offsets of kafka {self.topic}[{tp.partition}]",
                                    exc) from exc
            if got is None:
                raise KafkaClientError(f"offsets of kafka {self.topic}[{tp.partition}]: no "
                                       f"answer from {self.bootstrap_servers} within "
                                       f"{self._timeout:.0f} s")
            out[tp.partition] = (int(got[0]), int(got[1]))
        return out

    def earliest_offsets(self, partitions: Sequence[int] | None = None) -> dict[int, int]:
        """The first offset still stored in each partition."""
        parts = self._partitions_or(partitions)
        consumer = self._consumer()
        try:
            return {p: lo for p, (lo, _) in self._listed_watermarks(consumer, parts).items()}
        finally:
            consumer.close()

    def latest_offsets(self, partitions: Sequence[int] | None = None) -> dict[int, int]:
        """Each partition's end (the next offset to be written), measured by fetching.

        ListOffsets gives a first guess; a consumer then fetches from there until the
        broker reports the end of the partition (or, when records keep arriving, takes the
        high watermark of that first fetch). Sets ``watermarks_trusted``.
        """
        parts = self._partitions_or(partitions)
        ck = _ck()
        consumer = self._consumer(**{"fetch.wait.max.ms": 10})
        try:
            listed = {p: hi for p, (_, hi) in self._listed_watermarks(consumer, parts).items()}
            consumer.assign([ck.TopicPartition(self.topic, p, max(0, listed[p]))
                             for p in parts])
            ends: dict[int, int] = {}
            deadline = time.monotonic() + float(self.settings["end_timeout_s"])
            while len(ends) < len(parts):
                if time.monotonic() > deadline:
                    missing = sorted(set(parts) - set(ends))
                    raise KafkaEndNotReachedError(
                        f"kafka topic {self.topic!r}: no end-of-partition report for "
                        f"partitions {missing} within {self.settings['end_timeout_s']} s; "
                        f"pass options={{'end_offsets': {{partition: offset}}}}")
                for msg in consumer.consume(1000, 0.2):
                    p = msg.partition()
                    if p in ends:
                        continue
                    err = msg.error()
                    if err is None:
                        # Records past the listed end: take the fetch's high watermark.
                        _, hi = consumer.get_watermark_offsets(
                            ck.TopicPartition(self.topic, p), cached=True)
                        ends[p] = max(int(hi), msg.offset() + 1)
                    elif err.code() == ck.KafkaError._PARTITION_EOF:
                        ends[p] = int(msg.offset())
                    else:
                        _raise_consumer_error(self.topic, p, msg.offset(), err)
        finally:
            consumer.close()
        self.watermarks_trusted = all(ends[p] == listed[p] for p in parts)
        if not self.watermarks_trusted:
            wrong = {p: (listed[p], ends[p]) for p in parts if ends[p] != listed[p]}
            _log.warning("kafka topic %r: the broker's listed end offsets differ from the "
                         "fetched ends (partition: (listed, fetched)) %s; using the "
                         "fetched ends", self.topic, wrong)
        return {p: ends[p] for p in parts}

    def committed_offsets(self, partitions: Sequence[int] | None = None
                          ) -> dict[int, int | None]:
        """The group's committed offset per partition (None where nothing is committed)."""
        if not self.group_id:
            raise PlanError("committed offsets need a group_id")
        parts = self._partitions_or(partitions)
        consumer = self._consumer()
        try:
            got = consumer.committed(self._tps(parts), timeout=self._timeout)
        except _ck().KafkaException as exc:
            raise _client_error(f"committed offsets of group {self.group_id!r} on "
                                f"{self.topic!r}", exc) from exc
        finally:
            consumer.close()
        out: dict[int, int | None] = {}
        for tp in got:
            if tp.error is not None:
                raise KafkaClientError(f"committed offset of group {self.group_id!r} on "
                                       f"{self.topic}[{tp.partition}]: {tp.error}")
            out[tp.partition] = tp.offset if tp.offset >= 0 else None
        return out

    def start_offsets(self, partitions: Sequence[int] | None = None) -> dict[int, int]:
        """Concrete first offsets per ``start``: earliest, latest (measured) or committed.

        ``start="committed"`` falls back to the earliest offset where the group has
        committed nothing (or its offset is no longer stored).
        """
        parts = self._partitions_or(partitions)
        if self.start == "latest":
            return self.latest_offsets(parts)
        earliest = self.earliest_offsets(parts)
        if self.start == "earliest":
            return earliest
        committed = self.committed_offsets(parts)
        return {p: c if c is not None and c >= earliest[p] else earliest[p]
                for p, c in committed.items()}

    def end_offsets(self, partitions: Sequence[int] | None = None) -> dict[int, int]:
        """Exclusive end offsets of a bounded read: the explicit option, else measured."""
        parts = self._partitions_or(partitions)
        if self._explicit_ends is not None:
            missing = [p for p in parts if p not in self._explicit_ends]
            if missing:
                raise PlanError(f"kafka topic {self.topic!r}: end_offsets has no entry for "
                                f"partitions {missing} (it has {sorted(self._explicit_ends)})")
            return {p: self._explicit_ends[p] for p in parts}
        return self.latest_offsets(parts)

    # -- schema --------------------------------------------------------------------------

    def data_schema(self, start_offsets: Mapping[int, int] | None = None) -> pa.Schema | None:
        """JSON: the given schema, or one inferred from records at the start offsets
        (None when there are none yet). Raw: None."""
        if self.format != "json" or self._schema is not None:
            return self._schema
        starts = dict(start_offsets) if start_offsets is not None else self.start_offsets()
        values = self._sample(starts)
        schema, late = _infer_data_schema(values)
        if schema is not None:
            self._check_names(schema)
            self._schema, self._late = schema, late
        return self._schema

    def _sample(self, starts: Mapping[int, int]) -> list[bytes]:
        """Up to ``infer_records`` values read from ``starts`` (stops at partition ends)."""
        want = int(self.settings["infer_records"])
        if not starts or want <= 0:
            return []
        ck = _ck()
        consumer = self._consumer()
        values: list[bytes] = []
        try:
            consumer.assign([ck.TopicPartition(self.topic, p, o) for p, o in starts.items()])
            done: set[int] = set()
            deadline = time.monotonic() + float(self.settings["infer_timeout_s"])
            while len(values) < want and len(done) < len(starts) \
                    and time.monotonic() < deadline:
                for msg in consumer.consume(min(1000, want - len(values)), 0.2):
                    err = msg.error()
                    if err is None:
                        if msg.value() is not None:
                            values.append(msg.value())
                    elif err.code() == ck.KafkaError._PARTITION_EOF:
                        done.add(msg.partition())
                    else:
                        _raise_consumer_error(self.topic, msg.partition(), msg.offset(), err)
        finally:
            consumer.close()
        return values

    def full_schema(self) -> pa.Schema:
        """All columns of the batches (data or key/value, then metadata)."""
        if self.format == "json":
            data = self._schema
            if data is None:
                raise PlanError(f"kafka topic {self.topic!r}: the JSON schema is not known "
                                f"yet (no records to infer it from); pass schema=...")
            return pa.schema(list(data) + self._meta_fields())
        return pa.schema(list(RAW_FIELDS) + self._meta_fields())

    def output_schema(self) -> pa.Schema:
        """The columns of the batches after a pushed-down projection."""
        schema = self.full_schema()
        if self.columns is not None:
            schema = pa.schema([schema.field(c) for c in self.columns])
        return schema

    # -- streaming -----------------------------------------------------------------------

    def schema(self) -> pa.Schema | None:
        """The output schema when known without reading the topic (raw format, or JSON with
        a given or already inferred schema), else None."""
        if self.format == "json" and self._schema is None:
            return None
        return self.output_schema()

    def open_reader(self, partition: int, start_offset: int,
                    ctx: TaskContext | None = None,
                    dead_letters: Any = None) -> KafkaPartitionReader:
        """A reader of one partition from ``start_offset`` (a concrete offset, >= 0);
        ``dead_letters``: where its dead letters go (a streaming reader's staged output)."""
        return KafkaPartitionReader(self, partition, start_offset, ctx=ctx,
                                    dead_letters=dead_letters)

    def commit_offsets(self, offsets: Mapping[int, int]) -> None:
        """Commit next-offsets per partition for ``group_id`` (e.g. after a checkpoint).

        Only informs the group (monitoring, ``start="committed"``); Millstream's own
        positions live in its checkpoints.
        """
        if not self.group_id:
            raise PlanError("commit_offsets needs a KafkaSource started with group_id=...")
        if not offsets:
            return
        ck = _ck()
        consumer = self._consumer(**{"group.id": self.group_id})
        try:
            result = consumer.commit(
                offsets=[ck.TopicPartition(self.topic, int(p), int(o))
                         for p, o in offsets.items()], asynchronous=False)
        except ck.KafkaException as exc:
            raise _client_error(f"committing offsets of group {self.group_id!r} on "
                                f"{self.topic!r}", exc) from exc
        finally:
            consumer.close()
        failed = [f"{tp.partition}: {tp.error}" for tp in result or [] if tp.error]
        if failed:
            raise KafkaClientError(f"committing offsets of group {self.group_id!r} on "
                                   f"{self.topic!r} failed for {failed}")

    # -- batch (bounded) -----------------------------------------------------------------

    def plan_splits(self, target_splits: int) -> list[Split]:
        """One split per partition: ``[start, end)`` fixed now (see the module doc)."""
        parts = self.partitions()
        starts = self.start_offsets(parts)
        ends = self.end_offsets(parts)
        if self.format == "json" and self._schema is None:
            self.data_schema({p: starts[p] for p in parts if starts[p] < ends[p]})
            if self._schema is None:
                raise PlanError(f"kafka topic {self.topic!r}: no JSON records between the "
                                f"start and end offsets to infer a schema from; pass "
                                f"schema=...")
        splits = []
        for i, p in enumerate(parts):
            lo, hi = starts[p], max(starts[p], ends[p])
            splits.append(Split(i, KafkaSplitInfo(self.topic, p, lo, hi),
                                description=f"{self.topic}[{p}] offsets {lo}..{hi}"))
        return splits

    def read_split(self, split: Split, ctx: TaskContext) -> Iterator[pa.RecordBatch]:
        """Read exactly the offsets ``[start, end)`` of the split's partition."""
        info: KafkaSplitInfo = split.info
        produced = False
        if info.start < info.end:
            timeout = float(self.settings["end_timeout_s"])
            with KafkaPartitionReader(self, info.partition, info.start, end_offset=info.end,
                                      ctx=ctx) as reader:
                last_progress = time.monotonic()
                while not reader.finished:
                    before = reader.next_offset
                    batch, _ = reader.poll_batch(ctx.batch_size, timeout_s=0.5)
                    if batch is not None and batch.num_rows:
                        produced = True
                        yield batch
                    if reader.next_offset != before:
                        last_progress = time.monotonic()
                    elif time.monotonic() - last_progress > timeout:
                        raise KafkaEndNotReachedError(
                            f"kafka {self.topic}[{info.partition}]: read stopped at offset "
                            f"{reader.next_offset}, before the planned end {info.end}, for "
                            f"{timeout:.0f} s (end_offsets beyond the partition's end, or "
                            f"the records were deleted)")
        if not produced:
            schema = self.output_schema()
            yield pa.RecordBatch.from_pylist([], schema=schema)

    def with_pushdown(self, columns: list[str] | None, predicate: Expr | None
                      ) -> tuple[Source, bool, bool]:
        """Accept a projection (applied to each batch); predicates stay in the plan."""
        if columns is None:
            return self, False, False
        if self.format == "json" and self._schema is None:
            return self, False, False
        available = set(self.output_schema().names)
        if not all(c in available for c in columns):
            return self, False, False
        new = self._copy()
        new.columns = list(columns)
        return new, True, False

    def _copy(self) -> KafkaSource:
        new = object.__new__(KafkaSource)
        new.__dict__.update(self.__dict__)
        return new

    def describe(self) -> str:
        cols = f" columns={self.columns}" if self.columns is not None else ""
        return (f"kafka {self.topic} @ {self.bootstrap_servers} format={self.format} "
                f"start={self.start}{cols}")
