"""Continuous queries with updates in the Dataset API: deduplication, top-N per group, the
conversions between updates and rows with a ``change`` column, and the sinks that take
changes (files with a change column, PostgreSQL upserts).

On a stream, ``group_by(...).agg(...)`` (without a window), ``drop_duplicates(keep=
"last")`` and ``top_n`` emit updates: each result row carries a change kind, shown to
sinks as the column ``change`` (+I insert, -U the row before an update, +U the row after
it, -D delete). A streaming job checks that every step and the sink can take them (a
sink that takes appends only, a Python ``map`` or a window refuse them with a PlanError
saying what to do). In batch mode the same plans give the final result.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from typing import Any

from millstream.core.changelog import VISIBLE
from millstream.core.units import parse_duration
from millstream.errors import PlanError
from millstream.plan import logical as L

Duration = str | int | _dt.timedelta


def _columns(value: str | Sequence[str] | None, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    cols = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(c, str) for c in cols):
        raise PlanError(f"{what} takes column names, got {value!r}")
    return cols


def drop_duplicates(node: L.Node, subset: str | Sequence[str] | None = None,
                    keep: str = "first", within: Duration | None = None) -> L.Deduplicate:
    """One row per distinct ``subset`` (all columns when None): see
    :meth:`millstream.api.dataset.Dataset.drop_duplicates`."""
    from millstream.api.stream import watermark_column

    if keep not in ("first", "last"):
        raise PlanError(f"drop_duplicates: keep must be 'first' or 'last', got {keep!r}")
    cols = _columns(subset, "drop_duplicates(subset=...)")
    if not cols:
        schema = node.schema
        if schema is None:
            raise PlanError("drop_duplicates(): the columns are not known before the job "
                            "runs; give the key columns with subset=[...]")
        cols = tuple(schema.names)
    ttl = None if within is None else parse_duration(within, "within")
    if ttl is not None and ttl <= 0:
        raise PlanError(f"drop_duplicates: within must be a positive duration, got {within!r}")
    return L.Deduplicate(node, cols, keep, ttl, watermark_column(node) if ttl else None)


def top_n(node: L.Node, n: int, by: str | Sequence[str],
          per: str | Sequence[str] | None = None, descending: bool | Sequence[bool] = False,
          rank: str | None = None, nulls_last: bool | None = None) -> L.TopN:
    """The first ``n`` rows of each group: see :meth:`millstream.api.dataset.Dataset.top_n`."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise PlanError(f"top_n: n must be a positive int, got {n!r}")
    order = _columns(by, "top_n(by=...)")
    if not order:
        raise PlanError("top_n needs the order columns: by=...")
    desc = ((bool(descending),) * len(order) if isinstance(descending, bool)
            else tuple(bool(d) for d in descending))
    if len(desc) != len(order):
        raise PlanError(f"top_n: {len(order)} order column(s) but {len(desc)} descending "
                        f"flag(s)")
    if rank is not None and not isinstance(rank, str):
        raise PlanError(f"top_n: rank= is the name of the rank column, got {rank!r}")
    return L.TopN(node, int(n), order, desc, _columns(per, "top_n(per=...)"), rank,
                  nulls_last)


def to_changelog(node: L.Node, column: str = VISIBLE) -> L.ToChangelog:
    """The changes as plain rows with their kind in ``column``."""
    return L.ToChangelog(node, column)


def from_changelog(node: L.Node, column: str = VISIBLE) -> L.FromChangelog:
    """Rows whose ``column`` (+I, -U, +U, -D) says what change they are."""
    return L.FromChangelog(node, column)


def file_sink(uri: str, format: str = "parquet", changelog: bool = False,
              storage_options: dict[str, Any] | None = None) -> Any:
    """A streaming sink of Parquet (or JSON-lines, ``format="json"``) files under ``uri``,
    exactly once per epoch. ``changelog=True`` takes updating results and writes each
    row's change kind in a ``change`` column; without it the sink takes appends only."""
    from millstream.io.files.stream_sink import FileStreamSink

    return FileStreamSink(uri, format, storage_options, changelog=changelog)


def kafka_sink(topic: str, bootstrap_servers: str | Sequence[str], *,
               key: str | Sequence[str] | None = None, changelog: str | None = None,
               format: str = "json", transactional_id: str | None = None,
               options: dict[str, Any] | None = None) -> Any:
    """A streaming sink into the Kafka topic ``topic``, one transaction per epoch (exactly
    once with the checkpoints). ``key``: the column(s) of the record key. Updating results
    need ``changelog="upsert"`` (the key columns as the record key, a tombstone for a
    delete, as Flink's upsert-kafka) or ``changelog="retract"`` (every change, its kind in
    the value's ``change`` field); without it the sink takes appends only."""
    from millstream.io.kafka import KafkaSink

    return KafkaSink(topic, bootstrap_servers, format=format, key=key,
                     transactional_id=transactional_id, options=options, changelog=changelog)


def postgres_sink(dsn: str, table: str, key: str | Sequence[str] | None = None,
                  mode: str | None = None, create_table: bool = False,
                  connect_timeout: float = 5) -> Any:
    """A streaming sink into the PostgreSQL table ``table`` (``dsn``: a libpq connection
    string or URI), exactly once with the checkpoints (rows staged per epoch, moved into
    the table in one transaction when the checkpoint completes).

    ``mode="upsert"`` (the default when ``key`` is given; Flink's JDBC sink with a primary
    key): one row per ``key``, ``INSERT ... ON CONFLICT (key) DO UPDATE`` for inserts and
    updates, ``DELETE`` for deletes; the table needs a primary key or unique index on
    exactly ``key``. ``mode="append"``: every row inserted; updating results are refused.
    ``create_table=True`` creates a missing table from the result's columns."""
    from millstream.io.postgres import PostgresSink

    return PostgresSink(dsn, table, key=key, mode=mode, create_table=create_table,
                        connect_timeout=connect_timeout)
