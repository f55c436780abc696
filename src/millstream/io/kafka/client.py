"""The Kafka client library (``confluent_kafka``), imported only when a client is first
made, and the errors of Kafka requests."""

from __future__ import annotations

import logging
import socket
from types import ModuleType
from typing import Any

from millstream.errors import MillstreamError

_log = logging.getLogger(__name__)

#: where librdkafka's own log lines go (connection attempts, retries): to Python logging,
#: silent unless the application configures logging, never straight to stderr
LIBRDKAFKA_LOG = logging.getLogger("millstream.kafka.librdkafka")
LIBRDKAFKA_LOG.addHandler(logging.NullHandler())


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


def client_logging() -> dict[str, Any]:
    """librdkafka settings that send its log lines to :data:`LIBRDKAFKA_LOG`."""
    return {"logger": LIBRDKAFKA_LOG}


def _addresses(bootstrap_servers: str) -> list[tuple[str, int]]:
    """(host, port) of each bootstrap server (``host:port``, ``[v6]:port``, with or without
    a ``PLAINTEXT://``-style prefix); those that do not parse are left out."""
    out = []
    for item in bootstrap_servers.split(","):
        item = item.strip().rsplit("://", 1)[-1]
        host, sep, port = item.rpartition(":")
        if not sep or not port.isdigit():
            continue
        out.append((host.strip("[]") or "localhost", int(port)))
    return out


def check_reachable(bootstrap_servers: str, timeout_s: float = 3.0) -> None:
    """Raise a KafkaClientError at once when no bootstrap server accepts a TCP connection
    (nothing listens there), instead of waiting for librdkafka's request timeout."""
    addresses = _addresses(bootstrap_servers)
    if not addresses:
        return
    causes = []
    for host, port in addresses:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            return
        except OSError as exc:
            causes.append(f"{host}:{port}: {exc.strerror or exc}")
    raise KafkaClientError(
        f"no Kafka broker reachable at {bootstrap_servers} ({'; '.join(causes)}): start "
        f"one there or pass the right bootstrap_servers")



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

