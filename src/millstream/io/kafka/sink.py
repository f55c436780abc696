"""The Kafka sink: one Kafka transaction per epoch when the broker allows it, else an
idempotent producer.

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

Recovery limit: librdkafka cannot resume another producer's transaction, so a restarted
sink (``open`` runs ``init_transactions``, which aborts whatever its transactional id
left open) cannot finish a transaction that was pre-committed into a completed
checkpoint but not yet committed when the process died; that epoch's records are lost
unless the scheduler replays it. A job restarted at a lower parallelism has its
coordinator call ``retire_instances`` for the instances no task owns any more: their
ids' open transactions are aborted and leftover producers fenced.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from millstream.core.changelog import (
    APPEND,
    CHANGE,
    DELETE,
    RETRACT,
    UPSERT,
    VISIBLE,
    kinds,
    to_visible,
    upserts,
    without_kinds,
)
from millstream.errors import PlanError, SchemaError
from millstream.io.kafka.client import (
    KafkaClientError,
    KafkaStateError,
    _ck,
    _client_error,
    client_logging,
)
from millstream.io.kafka.options import _PRODUCER_DEFAULTS, FORMATS, SINK_OPTIONS, _split_options

_log = logging.getLogger(__name__)


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

    Updating results (``changelog``): ``"upsert"`` (Flink's upsert-kafka) takes results
    keyed by ``key`` (one column or several): each key's last change per write is one
    record whose key is the key (several columns: a JSON object of them) and whose value
    is the row, or a tombstone (null value) when the key's row was deleted; compacted
    topics keep the latest row per key. ``"retract"`` takes every change and writes each
    as a record with its kind in the value's ``"change"`` field ("+I", "-U", "+U", "-D").
    Without ``changelog`` the sink takes appends only.
    """

    def __init__(self, topic: str, bootstrap_servers: str | Sequence[str],
                 format: str = "json", key: str | Sequence[str] | None = None,
                 transactional_id: str | None = None,
                 options: Mapping[str, Any] | None = None,
                 changelog: str | None = None):
        if not isinstance(topic, str) or not topic:
            raise PlanError(f"KafkaSink: topic must be a non-empty string, got {topic!r}")
        if format not in FORMATS:
            raise PlanError(f"KafkaSink: format must be one of {FORMATS}, got {format!r}")
        self.topic = topic
        self.bootstrap_servers = (bootstrap_servers if isinstance(bootstrap_servers, str)
                                  else ",".join(bootstrap_servers))
        self.format = format
        if changelog not in (None, UPSERT, RETRACT):
            raise PlanError(f"KafkaSink: changelog must be None, 'upsert' or 'retract', got "
                            f"{changelog!r}")
        keys = (key,) if isinstance(key, str) else tuple(key or ())
        if changelog == UPSERT and not keys:
            raise PlanError("KafkaSink: changelog='upsert' needs the key column(s): key=...")
        if changelog == RETRACT and format != "json":
            raise PlanError("KafkaSink: changelog='retract' writes the change kind into JSON "
                            "values: format='json'")
        self.key = key
        self.keys = keys
        self.changelog = changelog
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
                         options, changelog=self.changelog)

    @property
    def changelog_mode(self) -> str:
        """What it takes: upserts by ``key``, every change, or appends only."""
        return self.changelog or APPEND

    @property
    def upsert_keys(self) -> tuple[str, ...]:
        """The key columns of upsert mode."""
        return self.keys

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
        config.update(client_logging())
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
        if batch.num_rows == 0:
            return 0
        batch, deleted = self._changes(batch)
        n = batch.num_rows
        values = self._values(batch)
        for i in deleted:
            values[i] = None  # a tombstone
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

    def _changes(self, batch: pa.RecordBatch | pa.Table
                 ) -> tuple[pa.RecordBatch | pa.Table, list[int]]:
        """The rows to send and which of them are tombstones, by ``changelog``."""
        if self.changelog == UPSERT:
            missing = [k for k in self.keys if k not in batch.schema.names]
            if missing:
                raise SchemaError(f"KafkaSink {self.topic!r}: key column(s) {missing} not in "
                                  f"{batch.schema.names}")
            view = upserts(batch, list(self.keys))
            gone = [i for i, k in enumerate(kinds(view)) if k == DELETE]
            return without_kinds(view), gone
        if self.changelog == RETRACT:
            if CHANGE in batch.schema.names:
                return to_visible(batch), []
            return batch.append_column(VISIBLE, pa.array(["+I"] * batch.num_rows,
                                                         pa.string())), []
        if CHANGE in batch.schema.names:
            if (kinds(batch) != 0).any():
                raise PlanError(f"KafkaSink {self.topic!r} takes appends only, but got updates "
                                f"(-U/+U/-D rows); write with changelog='upsert' and key=..., "
                                f"or changelog='retract'")
            batch = without_kinds(batch)
        return batch, []

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
        if not self.keys:
            return None
        missing = [k for k in self.keys if k not in batch.schema.names]
        if missing:
            raise SchemaError(f"KafkaSink {self.topic!r}: key column(s) {missing} not in "
                              f"{batch.schema.names}")
        if len(self.keys) > 1:  # a JSON object of the key columns
            from millstream.io.files.json_encoding import encode_json_lines

            table = batch.select(list(self.keys))
            return encode_json_lines(table).to_pybytes().split(b"\n")[:-1]
        column = batch.column(self.keys[0])
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
                f"key={self.key} changelog={self.changelog} "
                f"mode={self._mode or 'not opened'}")

