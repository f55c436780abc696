"""Connections and types for the PostgreSQL connector: the lazy psycopg import, connecting
with a timeout and a clear error (the DSN's password never shown), names of relations,
and the mapping between PostgreSQL and Arrow types in both directions.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pyarrow as pa

from millstream.errors import MillstreamError, PlanError

#: Seconds a connection attempt may take before the server counts as unreachable.
CONNECT_TIMEOUT_S = 5


class PostgresError(MillstreamError):
    """A PostgreSQL request failed (server unreachable, refused login, bad SQL, ...)."""


class PostgresNotInstalledError(PostgresError, ImportError):
    """psycopg (v3) is not installed."""


def psycopg() -> ModuleType:
    """The psycopg module, or a clear install hint."""
    try:
        import psycopg as pg
    except ImportError as exc:
        raise PostgresNotInstalledError(
            "PostgreSQL support needs psycopg 3: pip install 'millstream[postgres]'") from exc
    return pg


def where(dsn: str) -> str:
    """The server and database a DSN names, for messages (never its password)."""
    try:
        info = psycopg().conninfo.conninfo_to_dict(dsn)
    except Exception:  # noqa: BLE001 - a DSN we cannot parse is shown by its shape only
        return "the server of the given DSN"
    host = info.get("host") or "localhost"
    port = info.get("port") or 5432
    db = info.get("dbname") or info.get("user") or ""
    return f"{host}:{port}/{db}" if not str(host).startswith("/") else f"{host} port {port}/{db}"


def connect(dsn: str, *, autocommit: bool = False,
            connect_timeout: float = CONNECT_TIMEOUT_S) -> Any:
    """A connection to ``dsn`` (session time zone UTC), or a :class:`PostgresError` naming
    the server within ``connect_timeout`` seconds when it cannot be reached."""
    pg = psycopg()
    try:
        return pg.connect(dsn, autocommit=autocommit,
                          connect_timeout=max(1, int(round(connect_timeout))),
                          options="-c TimeZone=UTC")
    except pg.Error as exc:
        raise PostgresError(f"cannot connect to PostgreSQL at {where(dsn)}: "
                            f"{str(exc).strip()}") from exc


def is_query(text: str) -> bool:
    """Whether ``text`` is a query (SELECT/WITH/VALUES/TABLE or parenthesized) rather than
    the name of a table or view."""
    head = text.lstrip().lower()
    return head.startswith(("select", "with", "values", "table ", "(")) or "\n" in head


# ----------------------------------------------------------------------------- types

#: PostgreSQL type OID -> the Arrow type its values read as.
_OID_TYPES: dict[int, pa.DataType] = {
    16: pa.bool_(), 17: pa.binary(), 18: pa.string(), 19: pa.string(), 20: pa.int64(),
    21: pa.int16(), 23: pa.int32(), 25: pa.string(), 26: pa.int64(), 114: pa.string(),
    700: pa.float32(), 701: pa.float64(), 1042: pa.string(), 1043: pa.string(),
    1082: pa.date32(), 1083: pa.time64("us"), 1114: pa.timestamp("us"),
    1184: pa.timestamp("us", tz="UTC"), 2950: pa.string(), 3802: pa.string(),
    # arrays of the common element types
    1000: pa.list_(pa.bool_()), 1005: pa.list_(pa.int16()), 1007: pa.list_(pa.int32()),
    1016: pa.list_(pa.int64()), 1009: pa.list_(pa.string()), 1015: pa.list_(pa.string()),
    1021: pa.list_(pa.float32()), 1022: pa.list_(pa.float64()),
}
#: Types whose values are read as their text (the query casts them): json, jsonb, uuid.
TEXT_OIDS = frozenset({114, 2950, 3802})
NUMERIC_OID = 1700
#: Precision and scale of a numeric column without them (Spark's choice for JDBC).
UNCONSTRAINED_NUMERIC = pa.decimal128(38, 18)


def arrow_type(oid: int, precision: int | None, scale: int | None) -> pa.DataType | None:
    """The Arrow type of a result column of type ``oid`` (None: read it as text)."""
    if oid == NUMERIC_OID:
        if precision and 0 < precision <= 38:
            return pa.decimal128(precision, scale or 0)
        return UNCONSTRAINED_NUMERIC
    return _OID_TYPES.get(oid)


def pg_type(t: pa.DataType, column: str) -> str:
    """The PostgreSQL type a ``create_table`` gives an Arrow column."""
    if pa.types.is_dictionary(t):
        return pg_type(t.value_type, column)
    if pa.types.is_boolean(t):
        return "boolean"
    if pa.types.is_int8(t) or pa.types.is_int16(t) or pa.types.is_uint8(t):
        return "smallint"
    if pa.types.is_int32(t) or pa.types.is_uint16(t):
        return "integer"
    if pa.types.is_int64(t) or pa.types.is_uint32(t):
        return "bigint"
    if pa.types.is_uint64(t):
        return "numeric(20, 0)"
    if pa.types.is_float16(t) or pa.types.is_float32(t):
        return "real"
    if pa.types.is_float64(t):
        return "double precision"
    if pa.types.is_decimal(t):
        return f"numeric({t.precision}, {t.scale})"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "text"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or \
            pa.types.is_fixed_size_binary(t) or pa.types.is_binary_view(t):
        return "bytea"
    if pa.types.is_date(t):
        return "date"
    if pa.types.is_timestamp(t):
        return "timestamptz" if t.tz else "timestamp"
    if pa.types.is_time(t):
        return "time"
    if pa.types.is_duration(t):
        return "interval"
    if pa.types.is_nested(t):
        return "jsonb"  # written as JSON text
    raise PlanError(f"postgres: no PostgreSQL type for column {column!r} of Arrow type {t}; "
                    f"cast it, or create the table yourself")
