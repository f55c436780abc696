"""The Kafka client library (``confluent_kafka``), imported only when a client is first
made, and the errors of Kafka requests."""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

from millstream.errors import MillstreamError

_log = logging.getLogger(__name__)


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



def _client_error(what: str, exc: BaseException) -> KafkaClientError:
    return KafkaClientError(f"{what}: {exc}")



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

