"""Kafka options: formats, start positions, Millstream's own source and sink options with
their defaults, and the librdkafka settings every client starts from.

Options: keys Millstream knows (listed in ``SOURCE_OPTIONS`` and ``SINK_OPTIONS``) are
taken out of ``options``; every other key is a librdkafka setting passed to the client
(``"security.protocol"``, ``"sasl.mechanism"``, ``"isolation.level"``, ...).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from millstream.errors import PlanError

FORMATS = ("json", "raw")
STARTS = ("earliest", "latest", "committed")

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


def unknown_setting_hint(exc: BaseException, client_options: Mapping[str, Any],
                         known: Mapping[str, Any]) -> str:
    """For librdkafka's "No such configuration property": which key it was, and how
    Millstream's own options are passed (keywords of ``read_kafka``, as ``options``)."""
    if "No such configuration property" not in str(exc):
        return ""
    names = [k for k in client_options if k in str(exc)] or list(client_options)
    close = [m for k in names for m in difflib.get_close_matches(k, list(known), n=1)]
    hint = ("; every option that is not one of Millstream's own "
            f"({', '.join(sorted(known))}) goes to librdkafka, whose settings are names "
            "like 'security.protocol'")
    if close:
        hint += (f". Did you mean Millstream's {close[0]!r}? Pass it as a keyword: "
                 f"read_kafka(..., {close[0]}=...)")
    return hint
