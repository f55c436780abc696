"""Kafka topics as a source (bounded batch reads and partition readers for streaming) and a sink.

Needs ``confluent-kafka`` (``pip install 'millstream[kafka]'``), imported only when a
client is first made.

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

Bad JSON follows ``on_bad_records`` as for files (:mod:`millstream.io.files.badrecords`):
``"error"`` raises :class:`~millstream.errors.BadRecordError` naming the topic, partition
and offset; ``"skip"`` drops and counts it; a directory URI dead-letters it as
``{"path": "kafka://<topic>/<partition>", "line": null, "offset": <kafka offset>,
"reason", "record"}``. A bad record still advances the position (it is never re-read).

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

**Sink.** :class:`KafkaSink` follows the scheduler's two-phase protocol per epoch:
``begin(epoch)``, ``write(batch)``..., ``handle = pre_commit(epoch)`` (everything
flushed to the broker; the handle goes into the checkpoint), then ``commit(handle)``
once the checkpoint is complete, or ``abort(handle)``. ``sink.mode`` says which delivery
guarantee is active: ``"transactional"`` (a ``transactional_id`` was given and the
broker accepted ``init_transactions``: each epoch is one Kafka transaction, visible to
``read_committed`` consumers at ``commit``; exactly-once) or ``"idempotent"``
(``enable.idempotence=true``: no duplicates from producer retries, but records are
visible as soon as written and an aborted or replayed epoch is written again, so
at-least-once).

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
one open transaction). Recovery limit: librdkafka cannot resume another producer's
transaction, so a restarted sink (``open`` runs ``init_transactions``, which aborts
whatever its transactional id left open) cannot finish a transaction that was
pre-committed into a completed checkpoint but not yet committed when the process died;
that epoch's records are lost unless the scheduler replays it. A job restarted at a lower
parallelism has its coordinator call ``retire_instances`` for the instances no task owns
any more: their ids' open transactions are aborted and leftover producers fenced.

Options: keys Millstream knows (listed in ``SOURCE_OPTIONS`` and ``SINK_OPTIONS``) are
taken out of ``options``; every other key is a librdkafka setting passed to the client
(``"security.protocol"``, ``"sasl.mechanism"``, ``"isolation.level"``, ...).
"""

from __future__ import annotations

import bisect
import json
import logging
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.json as pajson

from millstream.core.context import TaskContext, current_context, default_context
from millstream.errors import BadRecordError, MillstreamError, PlanError, SchemaError
from millstream.io.base import Source, Split, StreamReader, StreamSource
from millstream.io.files.badrecords import (
    BadRecordHandler,
    check_policy,
    parse_with_recovery,
    snippet,
)

if TYPE_CHECKING:
    from millstream.expr.expressions import Expr

_log = logging.getLogger(__name__)

FORMATS = ("json", "raw")
STARTS = ("earliest", "latest", "committed")

#: Metadata columns appended to every batch (``_key`` only for format="json").
METADATA_FIELDS = (
    pa.field("_topic", pa.string()),
    pa.field("_partition", pa.int32()),
    pa.field("_offset", pa.int64()),
    pa.field("_timestamp", pa.timestamp("ms")),
)
KEY_FIELD = pa.field("_key", pa.binary())
RAW_FIELDS = (pa.field("key", pa.binary()), pa.field("value", pa.binary()))

#: Millstream's own source options (everything else in ``options`` goes to librdkafka).
SOURCE_OPTIONS = {
    "on_bad_records": "error",    # "error" | "skip" | dead-letter directory URI
    "end_offsets": "latest",      # "latest" (measured) | {partition: exclusive end offset}
    "end_timeout_s": 30.0,        # a bounded read or end probe stuck this long fails
    "infer_records": 1000,        # records sampled to infer a JSON schema
    "infer_timeout_s": 10.0,      # how long the sampling may wait for records
    "metadata_timeout_s": 10.0,   # metadata, offsets and commit requests
}
#: Millstream's own sink options.
SINK_OPTIONS = {
    "flush_timeout_s": 60.0,      # pre_commit waits this long for every delivery
    "init_timeout_s": 10.0,       # init_transactions (transaction support detection)
    "commit_timeout_s": 60.0,     # commit_transaction / abort_transaction
    "require_transactions": False,  # True: fail instead of falling back to idempotent
}

#: librdkafka settings every reader uses (options may override the tunable ones).
_CONSUMER_DEFAULTS: dict[str, Any] = {
    "enable.auto.offset.store": False,
    # Fail loudly when an assigned offset no longer exists (retention), never skip.
    "auto.offset.reset": "error",
    "isolation.level": "read_committed",
    "fetch.wait.max.ms": 100,
}
_CONSUMER_FIXED: dict[str, Any] = {
    # End-of-partition events advance positions past control records and end bounded reads.
    "enable.partition.eof": True,
    "enable.auto.commit": False,
}
_PRODUCER_DEFAULTS: dict[str, Any] = {
    "acks": "all",
    "linger.ms": 5,
    # Same key -> partition mapping as the Java client's default partitioner.
    "partitioner": "murmur2_random",
}


# ----------------------------------------------------------------------------------------
# Errors and the lazy client import
# ----------------------------------------------------------------------------------------

class KafkaNotInstalledError(MillstreamError, ImportError):
    """confluent-kafka is not installed."""


class KafkaClientError(MillstreamError):
    """A Kafka request failed (broker unreachable, unknown topic, rejected write, ...)."""


class KafkaEndNotReachedError(KafkaClientError):
    """A bounded read could not reach its planned end offset."""


class KafkaStateError(MillstreamError):
    """A call out of protocol order (write before begin, commit of a foreign handle, ...)."""


def _ck() -> ModuleType:
    """The confluent_kafka module, or a clear install hint."""
    try:
        import confluent_kafka
    except ImportError as exc:
        raise KafkaNotInstalledError(
            "Kafka support needs confluent-kafka: pip install 'millstream[kafka]'") from exc
    return confluent_kafka


def _split_options(options: Mapping[str, Any] | None, known: Mapping[str, Any]
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(Millstream options with defaults, librdkafka settings)."""
    ours = dict(known)
    client: dict[str, Any] = {}
    for k, v in (options or {}).items():
        if not isinstance(k, str):
            raise PlanError(f"option names must be strings, got {k!r}")
        if k in known:
            ours[k] = v
        else:
            client[k] = v
    return ours, client


def _client_error(what: str, exc: BaseException) -> KafkaClientError:
    return KafkaClientError(f"{what}: {exc}")


# ----------------------------------------------------------------------------------------
# JSON values -> Arrow
# ----------------------------------------------------------------------------------------

def _looks_bad(line: bytes) -> bool:
    """Cheap suspect test for the bad-record search: not one JSON object on the line."""
    text = line.strip()
    return not text.startswith(b"{") or not text.endswith(b"}")


def _read_json(buf: pa.Buffer, schema: pa.Schema | None, infer_others: bool = False
               ) -> pa.Table:
    if schema is None:
        options = pajson.ParseOptions(unexpected_field_behavior="infer")
    else:
        options = pajson.ParseOptions(explicit_schema=schema,
                                      unexpected_field_behavior="infer" if infer_others
                                      else "ignore")
    read = pajson.ReadOptions(use_threads=False, block_size=max(1 << 16, buf.size + 1))
    return pajson.read_json(pa.BufferReader(buf), read_options=read, parse_options=options)


def _as_text(array: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Values of any type as text: strings unchanged, others as their JSON text."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        return array.cast(pa.string())
    if pa.types.is_null(array.type):
        return pa.nulls(len(array), pa.string())
    from millstream.io.files.json_encoding import json_fragments

    text = json_fragments(array)
    return pa.array([None if v is None else t for v, t in
                     zip(array.to_pylist(), text.to_pylist())], pa.string())


def _normalize_value(value: bytes) -> tuple[bytes | None, str | None]:
    """One JSON value as a single line, or (None, reason) when it cannot be one."""
    if not value.strip():
        return None, "empty value (not a JSON object)"
    if b"\n" in value or b"\r" in value:
        # Pretty-printed JSON: re-serialize on one line (raw newlines inside strings are
        # invalid JSON and stay errors).
        try:
            obj = json.loads(value)
        except (ValueError, UnicodeDecodeError) as exc:
            return None, f"invalid JSON: {exc}"
        if not isinstance(obj, dict):
            return None, f"a JSON {type(obj).__name__}, not an object"
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode(), None
    return value, None


@dataclass
class _Parsed:
    table: pa.Table | None          # data rows of the kept JSON values, in order
    kept: list[int]                 # message index of each kept JSON row
    bad: list[tuple[int, str]]      # (message index, reason)


def _parse_json_values(values: Sequence[bytes], schema: pa.Schema | None,
                       late: Sequence[str] = ()) -> _Parsed:
    """Parse JSON object values (none None) with ``schema`` (inferred when None).

    ``late`` fields are read as text, whatever JSON type their values have.
    """
    bad: list[tuple[int, str]] = []
    lines: list[bytes] = []
    index: list[int] = []
    for i, raw in enumerate(values):
        line, reason = _normalize_value(raw)
        if line is None:
            bad.append((i, reason or "malformed record"))
        else:
            lines.append(line)
            index.append(i)
    if not lines:
        return _Parsed(None, [], sorted(bad))
    data = b"\n".join(lines) + b"\n"
    starts = [0]
    for line in lines[:-1]:
        starts.append(starts[-1] + len(line) + 1)
    late_set = [name for name in late if schema is not None and name in schema.names]
    fixed = (pa.schema([f for f in schema if f.name not in late_set])
             if schema is not None else None)

    def parse(buf: pa.Buffer) -> pa.Table | None:
        if schema is None or not late_set:
            return _read_json(buf, schema)
        table = _read_json(buf, fixed, infer_others=True)
        columns = []
        for field in schema:
            i = table.schema.get_field_index(field.name)
            if field.name in late_set:
                columns.append(_as_text(table.column(i)) if i != -1
                               else pa.nulls(table.num_rows, pa.string()))
            else:
                columns.append(table.column(i))
        return pa.Table.from_arrays(columns, schema=schema)

    bad_lines: set[int] = set()

    def on_bad(lo: int, hi: int, reason: str) -> None:
        line_no = bisect.bisect_right(starts, lo) - 1
        text = lines[line_no].decode("utf-8", errors="replace")
        if reason.endswith(": " + text):  # pyarrow appends the row; it is reported apart
            reason = reason[:-len(text) - 2]
        bad_lines.add(line_no)
        bad.append((index[line_no], reason))

    tables = parse_with_recovery(data, parse, on_bad,
                                 expected_rows=lambda d, lo, hi: d.count(b"\n", lo, hi),
                                 prescreen=_looks_bad)
    kept = [index[j] for j in range(len(lines)) if j not in bad_lines]
    table = None
    if tables:
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
        if schema is not None and table.schema != schema:
            table = table.select(schema.names).cast(schema)
    return _Parsed(table, kept, sorted(bad))


def _infer_data_schema(values: Sequence[bytes]) -> tuple[pa.Schema | None, tuple[str, ...]]:
    """(schema, late fields) inferred from sample values; (None, ()) without a valid object.

    Parts of the sample parsed apart are unified (int + float -> float; an
    irreconcilable clash keeps the first type seen). A field null in the whole sample is
    typed string and read as text ("late").
    """
    from millstream.io.files.csv import merge_inferred

    lines = [line for line in (_normalize_value(v)[0] for v in values if v is not None)
             if line is not None]
    if not lines:
        return None, ()
    data = b"\n".join(lines) + b"\n"
    tables = parse_with_recovery(data, lambda buf: _read_json(buf, None),
                                 lambda lo, hi, why: None,
                                 expected_rows=lambda d, lo, hi: d.count(b"\n", lo, hi),
                                 prescreen=_looks_bad)
    schemas = [t.schema for t in tables if t.num_rows]
    if not schemas:
        return None, ()
    schema = schemas[0] if len(schemas) == 1 else merge_inferred(schemas, conflict="first")
    late = tuple(f.name for f in schema if pa.types.is_null(f.type))
    schema = pa.schema([pa.field(f.name, pa.string()) if f.name in late else f
                        for f in schema])
    return schema, late


# ----------------------------------------------------------------------------------------
# Source
# ----------------------------------------------------------------------------------------

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
        return config

    def _consumer(self, **overrides: Any) -> Any:
        ck = _ck()
        try:
            return ck.Consumer(self.consumer_config(**overrides))
        except (ck.KafkaException, ValueError, TypeError) as exc:
            raise PlanError(f"kafka topic {self.topic!r}: bad consumer settings: {exc}") from exc

    @property
    def _timeout(self) -> float:
        return float(self.settings["metadata_timeout_s"])

    # -- discovery -----------------------------------------------------------------------

    def partitions(self) -> list[int]:
        """The topic's partition ids, from broker metadata."""
        consumer = self._consumer()
        try:
            md = consumer.list_topics(self.topic, timeout=self._timeout)
        except _ck().KafkaException as exc:
            raise _client_error(f"metadata of kafka topic {self.topic!r} from "
                                f"{self.bootstrap_servers}", exc) from exc
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

    def open_reader(self, partition: int, start_offset: int,
                    ctx: TaskContext | None = None) -> KafkaPartitionReader:
        """A reader of one partition from ``start_offset`` (a concrete offset, >= 0)."""
        return KafkaPartitionReader(self, partition, start_offset, ctx=ctx)

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


def _raise_consumer_error(topic: str, partition: int, offset: int, err: Any) -> None:
    """Turn a consumer error event into a KafkaClientError (informational ones are logged)."""
    ck = _ck()
    code = err.code()
    if code in (ck.KafkaError._AUTO_OFFSET_RESET, ck.KafkaError.OFFSET_OUT_OF_RANGE):
        raise KafkaClientError(
            f"kafka {topic}[{partition}]: offset {offset} is not stored any more (deleted "
            f"by retention?) or beyond the end: {err}")
    if code in (ck.KafkaError.UNKNOWN_TOPIC_OR_PART, ck.KafkaError._UNKNOWN_PARTITION,
                ck.KafkaError._UNKNOWN_TOPIC) or err.fatal():
        raise KafkaClientError(f"kafka {topic}[{partition}]: {err}")
    _log.warning("kafka %s[%s]: consumer reported %s (retrying)", topic, partition, err)


# ----------------------------------------------------------------------------------------
# Partition reader
# ----------------------------------------------------------------------------------------

class KafkaPartitionReader:
    """Reads one partition from an offset as Arrow batches; tracks the next offset.

    ``next_offset`` is the position to checkpoint: every record below it has been
    returned (or routed as a bad record); control records and compacted gaps are
    skipped. ``caught_up`` is True when the last poll reached the end of the partition
    (useful for idle-partition detection). With ``end_offset``, records at or beyond it
    are never returned and ``finished`` turns True once the position reaches it.
    """

    def __init__(self, source: KafkaSource, partition: int, start_offset: int, *,
                 end_offset: int | None = None, ctx: TaskContext | None = None):
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
                    f"  To skip malformed records pass options={{'on_bad_records': 'skip'}} "
                    f"(they are counted), or a directory URI to dead-letter each one.",
                    path=f"kafka://{self.topic}/{self.partition}", offset=msg.offset(),
                    record=text)
                exc.topic = self.topic  # type: ignore[attr-defined]
                exc.partition = self.partition  # type: ignore[attr-defined]
                raise exc
            if self._handler is None:
                self._handler = BadRecordHandler(policy, self.ctx, "JSON")
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


# ----------------------------------------------------------------------------------------
# Sink
# ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KafkaCommitHandle:
    """What ``pre_commit`` hands to the checkpoint: the epoch and how it was written."""

    epoch: int
    mode: str
    transactional_id: str | None
    records: int


def _key_bytes(array: pa.Array) -> list[bytes | None]:
    """Keys as bytes: binary as is, strings as UTF-8, other values as their text."""
    t = array.type
    if pa.types.is_dictionary(t):
        array = array.dictionary_decode()
        t = array.type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return array.to_pylist()
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return [None if v is None else v.encode() for v in array.to_pylist()]
    from millstream.io.files.json_encoding import json_fragments

    text = json_fragments(array).to_pylist()
    valid = array.is_valid().to_pylist()
    return [s.encode() if ok else None for ok, s in zip(valid, text)]


class KafkaSink:
    """Writes record batches to a topic, one Kafka transaction per epoch when possible.

    Values: ``format="json"``: each row as one JSON object (all columns, the key column
    included), encoded as ``write_json`` does: timestamps and dates as ISO-8601 text
    (``"2024-01-02 03:04:05.123"``, zoned ones with ``Z``), binary as base64, nested
    values as JSON. ``format="raw"``: the ``value`` column (binary or string; null gives a
    tombstone). Keys: the ``key`` column (binary as is, strings UTF-8, other types as
    their JSON text); records with a key go to the partition the Java client would choose
    (murmur2). Delivery (``sink.mode``): ``"transactional"`` = exactly-once with
    ``read_committed`` consumers; ``"idempotent"`` = at-least-once; see the module doc.
    """

    def __init__(self, topic: str, bootstrap_servers: str | Sequence[str],
                 format: str = "json", key: str | None = None,
                 transactional_id: str | None = None,
                 options: Mapping[str, Any] | None = None):
        if not isinstance(topic, str) or not topic:
            raise PlanError(f"KafkaSink: topic must be a non-empty string, got {topic!r}")
        if format not in FORMATS:
            raise PlanError(f"KafkaSink: format must be one of {FORMATS}, got {format!r}")
        self.topic = topic
        self.bootstrap_servers = (bootstrap_servers if isinstance(bootstrap_servers, str)
                                  else ",".join(bootstrap_servers))
        self.format = format
        self.key = key
        self.transactional_id = transactional_id
        self.settings, self.client_options = _split_options(options, SINK_OPTIONS)
        #: Why transactions are not used although a transactional_id was given.
        self.fallback_reason: str | None = None
        self._mode: str | None = None
        self._producer: Any = None
        self._epoch: int | None = None          # epoch being written (begin..pre_commit)
        self._pending: KafkaCommitHandle | None = None  # pre-committed, not yet committed
        self._records = 0
        self._errors: list[str] = []

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_producer=None, _mode=None, _epoch=None, _pending=None, _errors=[])
        return state

    #: A transaction belongs to its producer: a parallel streaming job commits each epoch
    #: in the sink's own task (not in the coordinator).
    commits_in_subtask = True

    def for_subtask(self, index: int) -> KafkaSink:
        """A copy for parallel sink instance ``index`` (its own transactional id)."""
        tid = None if self.transactional_id is None else f"{self.transactional_id}-{index}"
        options = {**self.settings, **self.client_options}
        return KafkaSink(self.topic, self.bootstrap_servers, self.format, self.key, tid,
                         options)

    def retire_instances(self, indices: Iterable[int]) -> None:
        """Close out parallel instances no task will own again (after a job restarts at a
        lower parallelism): ``init_transactions`` under each one's transactional id aborts
        its open transaction and fences any producer still using it. Nothing to do
        without a transactional id; a broker without transactions is only logged."""
        if not self.transactional_id:
            return
        ck = _ck()
        for i in indices:
            tid = f"{self.transactional_id}-{i}"
            config = {**self._config(True), "transactional.id": tid}
            try:
                producer = ck.Producer(config)
                producer.init_transactions(float(self.settings["init_timeout_s"]))
                producer.flush(0)
            except ck.KafkaException as exc:
                _log.warning("KafkaSink %r: could not fence transactional id %r of an "
                             "earlier run (%s)", self.topic, tid, exc)
                return

    # -- producer ------------------------------------------------------------------------

    def _config(self, transactional: bool) -> dict[str, Any]:
        config: dict[str, Any] = {"bootstrap.servers": self.bootstrap_servers}
        config.update(_PRODUCER_DEFAULTS)
        config.update(self.client_options)
        config["enable.idempotence"] = True
        if transactional:
            config["transactional.id"] = self.transactional_id
        return config

    def open(self) -> str:
        """Create the producer and detect the delivery mode; returns ``self.mode``."""
        if self._producer is not None:
            return self._mode  # type: ignore[return-value]
        ck = _ck()
        if self.transactional_id:
            try:
                producer = ck.Producer(self._config(True))
            except (ck.KafkaException, ValueError, TypeError) as exc:
                raise PlanError(f"KafkaSink {self.topic!r}: bad producer settings: "
                                f"{exc}") from exc
            try:
                producer.init_transactions(float(self.settings["init_timeout_s"]))
                self._producer, self._mode = producer, "transactional"
                return self._mode
            except ck.KafkaException as exc:
                reason = str(exc.args[0] if exc.args else exc)
                if self.settings["require_transactions"]:
                    raise KafkaClientError(
                        f"KafkaSink {self.topic!r}: the broker at {self.bootstrap_servers} "
                        f"refused transactions ({reason})") from exc
                self.fallback_reason = reason
                _log.warning("KafkaSink %r: transactions unavailable (%s); writing with an "
                             "idempotent producer, at-least-once", self.topic, reason)
                producer.flush(0)
        try:
            self._producer = ck.Producer(self._config(False))
        except (ck.KafkaException, ValueError, TypeError) as exc:
            raise PlanError(f"KafkaSink {self.topic!r}: bad producer settings: {exc}") from exc
        self._mode = "idempotent"
        return self._mode

    @property
    def mode(self) -> str:
        """``"transactional"`` (exactly-once) or ``"idempotent"`` (at-least-once)."""
        return self._mode or self.open()

    # -- the two-phase protocol ----------------------------------------------------------

    def begin(self, epoch: int) -> None:
        """Start writing ``epoch`` (a Kafka transaction in transactional mode)."""
        self.open()
        if self._epoch is not None:
            raise KafkaStateError(f"KafkaSink {self.topic!r}: begin({epoch}) while epoch "
                                      f"{self._epoch} is still being written")
        if self._pending is not None and self._mode == "transactional":
            raise KafkaStateError(
                f"KafkaSink {self.topic!r}: begin({epoch}) before epoch "
                f"{self._pending.epoch} was committed or aborted")
        if self._mode == "transactional":
            try:
                self._producer.begin_transaction()
            except _ck().KafkaException as exc:
                raise _client_error(f"KafkaSink {self.topic!r}: begin_transaction", exc) \
                    from exc
        self._epoch = int(epoch)
        self._records = 0
        self._errors = []

    def write(self, batch: pa.RecordBatch | pa.Table) -> int:
        """Send the rows of ``batch`` (asynchronously); returns the number of rows."""
        if self._epoch is None:
            raise KafkaStateError(f"KafkaSink {self.topic!r}: write() before begin()")
        n = batch.num_rows
        if n == 0:
            return 0
        values = self._values(batch)
        keys = self._keys(batch)
        producer = self._producer
        for i in range(n):
            kwargs: dict[str, Any] = {"value": values[i], "on_delivery": self._delivered}
            if keys is not None and keys[i] is not None:
                kwargs["key"] = keys[i]
            while True:
                try:
                    producer.produce(self.topic, **kwargs)
                    break
                except BufferError:  # local queue full: serve deliveries, then retry
                    producer.poll(0.05)
            if i % 1000 == 999:
                producer.poll(0)
        producer.poll(0)
        self._records += n
        return n

    def _delivered(self, err: Any, msg: Any) -> None:
        if err is not None and len(self._errors) < 20:
            self._errors.append(str(err))

    def _values(self, batch: pa.RecordBatch | pa.Table) -> list[bytes | None]:
        if self.format == "json":
            from millstream.io.files.json_encoding import encode_json_lines

            lines = encode_json_lines(batch).to_pybytes().split(b"\n")
            return lines[:-1]
        if "value" not in batch.schema.names:
            raise SchemaError(f"KafkaSink {self.topic!r} format='raw' needs a 'value' column "
                              f"(binary or string); columns: {batch.schema.names}")
        column = batch.column("value")
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        t = column.type
        if not (pa.types.is_binary(t) or pa.types.is_large_binary(t)
                or pa.types.is_string(t) or pa.types.is_large_string(t)):
            raise SchemaError(f"KafkaSink {self.topic!r} format='raw': column 'value' must be "
                              f"binary or string, not {t}")
        return _key_bytes(column)

    def _keys(self, batch: pa.RecordBatch | pa.Table) -> list[bytes | None] | None:
        if self.key is None:
            return None
        if self.key not in batch.schema.names:
            raise SchemaError(f"KafkaSink {self.topic!r}: key column {self.key!r} not in "
                              f"{batch.schema.names}")
        column = batch.column(self.key)
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        return _key_bytes(column)

    def pre_commit(self, epoch: int) -> KafkaCommitHandle:
        """Flush every record of ``epoch`` to the broker; the handle goes into the checkpoint."""
        if self._epoch is None or int(epoch) != self._epoch:
            raise KafkaStateError(f"KafkaSink {self.topic!r}: pre_commit({epoch}) but the "
                                      f"epoch being written is {self._epoch}")
        timeout = float(self.settings["flush_timeout_s"])
        left = self._producer.flush(timeout)
        if left:
            raise KafkaClientError(f"KafkaSink {self.topic!r}: {left} records of epoch "
                                   f"{epoch} not delivered after {timeout:.0f} s")
        if self._errors:
            raise KafkaClientError(f"KafkaSink {self.topic!r}: delivery of epoch {epoch} "
                                   f"failed: {self._errors[:5]}")
        handle = KafkaCommitHandle(self._epoch, self._mode or "idempotent",
                                   self.transactional_id if self._mode == "transactional"
                                   else None, self._records)
        self._pending = handle
        self._epoch = None
        return handle

    @property
    def recommit_on_restore(self) -> bool:
        """False in transactional mode: a restarted job cannot commit a dead producer's
        transaction (librdkafka), so it restores the last checkpoint whose commit is known
        and replays from there. The one gap: a crash after the broker committed but before
        the checkpoint recorded it replays that epoch (duplicates)."""
        return self._mode != "transactional" if self._mode is not None else \
            self.transactional_id is None

    def commit(self, handle: KafkaCommitHandle) -> None:
        """Make the epoch visible (commit_transaction); a no-op in idempotent mode."""
        if handle.mode != "transactional":
            if self._pending is not None and self._pending.epoch == handle.epoch:
                self._pending = None
            return
        if self._pending is None or self._pending.epoch != handle.epoch:
            raise KafkaStateError(
                f"KafkaSink {self.topic!r}: commit of epoch {handle.epoch}, but this sink's "
                f"open transaction is {self._pending.epoch if self._pending else None}. A "
                f"transaction of another producer cannot be resumed (librdkafka); see the "
                f"module doc on recovery")
        ck = _ck()
        timeout = float(self.settings["commit_timeout_s"])
        for _ in range(5):
            try:
                self._producer.commit_transaction(timeout)
                self._pending = None
                return
            except ck.KafkaException as exc:
                err = exc.args[0]
                if err.retriable():
                    continue
                if err.txn_requires_abort():
                    self._abort_transaction()
                raise _client_error(f"KafkaSink {self.topic!r}: commit of epoch "
                                    f"{handle.epoch}", exc) from exc
        raise KafkaClientError(f"KafkaSink {self.topic!r}: commit of epoch {handle.epoch} "
                               f"kept failing with retriable errors")

    def abort(self, handle: KafkaCommitHandle | None = None) -> None:
        """Drop the open epoch: abort_transaction, or (idempotent) nothing can be undone."""
        epoch = handle.epoch if handle is not None else self._epoch
        if self._mode == "transactional" and (self._epoch is not None
                                              or self._pending is not None):
            self._abort_transaction()
        elif self._mode == "idempotent" and (self._epoch is not None or handle is not None):
            if self._producer is not None:
                self._producer.flush(float(self.settings["flush_timeout_s"]))
            _log.info("KafkaSink %r: abort of epoch %s in idempotent mode: its records stay "
                      "(at-least-once)", self.topic, epoch)
        self._epoch = None
        self._pending = None

    def _abort_transaction(self) -> None:
        try:
            self._producer.abort_transaction(float(self.settings["commit_timeout_s"]))
        except _ck().KafkaException as exc:
            raise _client_error(f"KafkaSink {self.topic!r}: abort_transaction", exc) from exc

    def close(self) -> None:
        """Abort an unfinished transaction, flush and drop the producer."""
        if self._producer is None:
            return
        try:
            if self._epoch is not None or (self._pending is not None
                                           and self._mode == "transactional"):
                self.abort()
            self._producer.flush(float(self.settings["flush_timeout_s"]))
        finally:
            self._producer = None
            self._mode = None

    def __enter__(self) -> KafkaSink:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> str:
        return (f"kafka {self.topic} @ {self.bootstrap_servers} format={self.format} "
                f"key={self.key} mode={self._mode or 'not opened'}")


# ----------------------------------------------------------------------- streaming view


class _KafkaReader(StreamReader):
    def __init__(self, reader: Any, stop_at_end: bool) -> None:
        self._reader = reader
        self._stop_at_end = stop_at_end
        self.position = reader.next_offset

    def poll(self, max_records: int, timeout_s: float) -> pa.RecordBatch | None:
        batch, self.position = self._reader.poll_batch(max_records, timeout_s)
        self.finished = self._stop_at_end and self._reader.caught_up and batch is None
        return batch

    def close(self) -> None:
        self._reader.close()


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
        return _KafkaReader(self.source.open_reader(int(partition), int(position), ctx),
                            self.stop_at_end)
