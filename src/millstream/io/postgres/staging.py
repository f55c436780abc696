"""Staged writes into a PostgreSQL table, shared by the streaming and the batch sink.

Rows are first copied (``COPY ... FROM STDIN``, CSV) into a staging table beside the
target, ``<table>__ms_staging``: the target's columns, all nullable, plus
``_ms_run`` (the writing sink object), ``_ms_part`` (its parallel instance or task
attempt), ``_ms_epoch``, ``_ms_seq`` (order within the epoch) and ``_ms_kind`` (0 write
the row, 3 delete its key). That transaction commits at the pre-commit: the rows are
durable and invisible. Making them visible is one statement, in one transaction, that
deletes one ``(run, part, epoch)``'s rows from staging and applies them to the target
(:func:`move_sql`): appended, or upserted by key (``INSERT ... ON CONFLICT (key) DO
UPDATE``, the last change of each key winning, a delete removing the key). The staged
rows are their own commit marker: once moved they are gone, so committing the same
handle again changes nothing (idempotent), and a concurrent second commit waits on the
row locks and then finds nothing to move.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from millstream.core.changelog import CHANGE, DELETE, kinds, upserts, without_kinds
from millstream.errors import PlanError, SchemaError
from millstream.io.postgres.client import PostgresError, pg_type

#: The staging table's own columns.
META = ("_ms_run", "_ms_part", "_ms_epoch", "_ms_seq", "_ms_kind")
_META_TYPES = ("text", "text", "bigint", "bigint", "smallint")
#: Kinds in the staging table.
WRITE, REMOVE = 0, DELETE


def ident(name: str) -> str:
    """``name`` as a quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class Target:
    """A resolved target table: its quoted name, its staging table's, its columns."""

    name: str                 # the table as the user named it (for messages)
    relation: str             # "schema"."table"
    staging: str              # "schema"."table__ms_staging"
    columns: tuple[str, ...]
    unique_keys: tuple[frozenset[str], ...]


def _staging_name(relname: str) -> str:
    name = f"{relname}__ms_staging"
    if len(name.encode()) <= 63:
        return name
    digest = hashlib.sha1(relname.encode()).hexdigest()[:10]
    return f"{relname.encode()[:40].decode(errors='ignore')}_{digest}__ms_staging"


def resolve(cur: Any, table: str) -> Target | None:
    """The target ``table`` (SQL name rules: ``public.orders``, ``"Mixed"``), its columns
    and unique keys, with its staging table created or updated; None when it does not
    exist."""
    cur.execute("SELECT c.oid, n.nspname, c.relname FROM pg_class c JOIN pg_namespace n "
                "ON n.oid = c.relnamespace WHERE c.oid = to_regclass(%s)", (table,))
    row = cur.fetchone()
    if row is None:
        return None
    oid, nsp, rel = row
    cur.execute("SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
                "WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                (oid,))
    cols = cur.fetchall()
    cur.execute("SELECT array_agg(a.attname::text) FROM pg_index i JOIN pg_attribute a ON "
                "a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) WHERE i.indrelid = %s "
                "AND i.indisunique AND i.indpred IS NULL GROUP BY i.indexrelid", (oid,))
    uniques = tuple(frozenset(r[0]) for r in cur.fetchall())
    staging = f"{ident(nsp)}.{ident(_staging_name(rel))}"
    target = Target(table, f"{ident(nsp)}.{ident(rel)}", staging,
                    tuple(c for c, _ in cols), uniques)
    # the staging table follows the target's columns (all nullable, no defaults); only
    # when it lacks some (ALTER TABLE would wait for every open staging transaction)
    spec = {c: t for c, t in cols}
    spec.update(zip(META, _META_TYPES))
    cur.execute("SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) AND "
                "attnum > 0 AND NOT attisdropped", (staging,))
    have = {r[0] for r in cur.fetchall()}
    if not have:
        cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (staging,))
        columns = ", ".join(f"{ident(c)} {t}" for c, t in spec.items())
        cur.execute(f"CREATE TABLE IF NOT EXISTS {staging} ({columns})")
        cur.execute(f"CREATE INDEX IF NOT EXISTS {ident(_staging_name(rel)[:50] + '_run')} "
                    f"ON {staging} (_ms_run, _ms_part, _ms_epoch)")
    for c, t in spec.items():
        if have and c not in have:
            cur.execute(f"ALTER TABLE {staging} ADD COLUMN IF NOT EXISTS {ident(c)} {t}")
    return target


def create(cur: Any, table: str, schema: pa.Schema, key: Sequence[str]) -> None:
    """``CREATE TABLE IF NOT EXISTS table`` with ``schema``'s columns (primary key ``key``)."""
    names = [n for n in schema.names if n != CHANGE]
    missing = [k for k in key if k not in names]
    if missing:
        raise SchemaError(f"postgres sink {table}: key column(s) {missing} not in the "
                          f"result's columns {names}")
    cols = [f"{ident(f.name)} {pg_type(f.type, f.name)}" for f in schema if f.name != CHANGE]
    if key:
        cols.append(f"PRIMARY KEY ({', '.join(ident(k) for k in key)})")
    cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (table,))
    cur.execute(f"CREATE TABLE IF NOT EXISTS {table} ({', '.join(cols)})")


def check_keys(target: Target, key: Sequence[str]) -> None:
    """An upsert needs a unique index or primary key on exactly ``key``."""
    missing = [k for k in key if k not in target.columns]
    if missing:
        raise PlanError(f"postgres sink {target.name}: key column(s) {missing} are not "
                        f"columns of the table ({list(target.columns)})")
    if frozenset(key) not in target.unique_keys:
        raise PlanError(f"postgres sink {target.name}: an upsert by {list(key)} needs a "
                        f"primary key or unique index on exactly those columns (INSERT ... "
                        f"ON CONFLICT); the table's unique keys are "
                        f"{[sorted(u) for u in target.unique_keys] or 'none'}")


# ----------------------------------------------------------------------------- rows


def _as_text(col: pa.Array) -> pa.Array:
    """A column in a form the CSV writer writes as PostgreSQL reads it."""
    t = col.type
    if pa.types.is_dictionary(t):
        return _as_text(col.dictionary_decode())
    if pa.types.is_string_view(t):
        return col.cast(pa.string())
    if pa.types.is_binary_view(t):
        col = col.cast(pa.binary())
        t = col.type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or \
            pa.types.is_fixed_size_binary(t):
        return pa.array([None if v is None else "\\x" + v.hex() for v in col.to_pylist()],
                        pa.string())
    if pa.types.is_duration(t):
        micros = col.cast(pa.duration("us")).cast(pa.int64())
        return pc.binary_join_element_wise(micros.cast(pa.string()), " microseconds", "")
    if pa.types.is_nested(t):
        from millstream.io.files.json_encoding import json_fragments

        return pc.if_else(col.is_valid(), json_fragments(col), pa.scalar(None, pa.string()))
    if pa.types.is_float16(t):
        return col.cast(pa.float32())
    return col


def data_columns(batch: pa.RecordBatch | pa.Table, target: Target) -> list[str]:
    """The result's columns, checked against the target's."""
    names = [n for n in batch.schema.names if n != CHANGE]
    unknown = [n for n in names if n not in target.columns]
    if unknown:
        raise SchemaError(f"postgres sink {target.name}: the table has no column(s) "
                          f"{unknown}; its columns are {list(target.columns)}")
    return names


def rows_to_stage(batch: pa.RecordBatch | pa.Table, mode: str, key: Sequence[str],
                  name: str) -> tuple[pa.Table, np.ndarray]:
    """The rows to stage of ``batch`` and their staging kinds: every row (append; a
    result with updates is refused), or the last change of each key (upsert)."""
    table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
    if mode == "upsert":
        view = upserts(table, list(key))
        k = kinds(view)
        return without_kinds(view), np.where(k == DELETE, REMOVE, WRITE).astype(np.int16)
    if CHANGE in table.schema.names:
        k = kinds(table)
        if (k != 0).any():
            raise PlanError(f"postgres sink {name} appends rows, but got updates (-U/+U/-D "
                            f"rows); write with mode='upsert' and key=[...]")
        table = without_kinds(table)
    return table, np.zeros(table.num_rows, dtype=np.int16)


def copy_into_staging(cur: Any, target: Target, table: pa.Table, kinds_: np.ndarray,
                      run: str, part: str, epoch: int, seq0: int) -> int:
    """``COPY`` the rows into staging under ``(run, part, epoch)``, numbered from
    ``seq0``; returns the number of rows."""
    n = table.num_rows
    if not n:
        return 0
    cols = {c: _as_text(table.column(c).combine_chunks()) for c in table.schema.names}
    cols.update({
        "_ms_run": pa.array(np.full(n, run, dtype=object), pa.string()),
        "_ms_part": pa.array(np.full(n, part, dtype=object), pa.string()),
        "_ms_epoch": pa.array(np.full(n, epoch, dtype=np.int64)),
        "_ms_seq": pa.array(np.arange(seq0, seq0 + n, dtype=np.int64)),
        "_ms_kind": pa.array(kinds_.astype(np.int16)),
    })
    out = io.BytesIO()
    try:
        pacsv.write_csv(pa.table(cols), out, pacsv.WriteOptions(include_header=False))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise SchemaError(f"postgres sink {target.name}: cannot write columns of types "
                          f"{[str(f.type) for f in table.schema]}: {exc}") from exc
    names = ", ".join(ident(c) for c in cols)
    with cur.copy(f"COPY {target.staging} ({names}) FROM STDIN (FORMAT csv)") as cp:
        cp.write(out.getbuffer())
    return n


def move_sql(target: Target, columns: Sequence[str], mode: str, key: Sequence[str]) -> str:
    """One statement moving the staged rows of ``(run, part, epoch)`` (parameters
    ``%(run)s``, ``%(part)s``, ``%(epoch)s``) into the target."""
    cols = ", ".join(ident(c) for c in columns)
    moved = (f"moved AS (DELETE FROM {target.staging} WHERE _ms_run = %(run)s AND "
             f"_ms_part = %(part)s AND _ms_epoch = %(epoch)s RETURNING *)")
    if mode != "upsert":
        return (f"WITH {moved} INSERT INTO {target.relation} ({cols}) "
                f"SELECT {cols} FROM moved ORDER BY _ms_seq")
    keys = ", ".join(ident(k) for k in key)
    match = " AND ".join(f"t.{ident(k)} = last.{ident(k)}" for k in key)
    rest = [c for c in columns if c not in key]
    action = ("DO UPDATE SET " + ", ".join(f"{ident(c)} = EXCLUDED.{ident(c)}" for c in rest)
              if rest else "DO NOTHING")
    return (f"WITH {moved}, "
            f"last AS (SELECT DISTINCT ON ({keys}) * FROM moved ORDER BY {keys}, _ms_seq DESC), "
            f"gone AS (DELETE FROM {target.relation} t USING last WHERE last._ms_kind = "
            f"{REMOVE} AND {match}) "
            f"INSERT INTO {target.relation} ({cols}) SELECT {cols} FROM last "
            f"WHERE _ms_kind <> {REMOVE} ON CONFLICT ({keys}) {action}")


def check_mode(mode: str, key: Sequence[str] | str | None, modes: Sequence[str],
               what: str) -> tuple[str, ...]:
    """Validate ``mode`` and ``key``; returns the key columns."""
    if mode not in modes:
        raise PlanError(f"{what}: mode must be one of {list(modes)}, got {mode!r}")
    keys = (key,) if isinstance(key, str) else tuple(key or ())
    if not all(isinstance(k, str) and k for k in keys):
        raise PlanError(f"{what}: key takes column names, got {key!r}")
    if mode == "upsert" and not keys:
        raise PlanError(f"{what}: mode='upsert' needs the key columns: key=[...]")
    return keys


def wrap(exc: BaseException, what: str) -> PostgresError:
    """A psycopg error as a :class:`PostgresError` saying what was being done."""
    return PostgresError(f"{what}: {type(exc).__name__}: {str(exc).strip()}")
