"""PostgreSQL sinks: :class:`PostgresSink` for streaming jobs (append or upsert, exactly
once with the checkpoints) and :class:`PostgresBatchSink` for ``Dataset.write_postgres``.

Exactly once (streaming). Each parallel instance copies an epoch's rows into the staging
table (:mod:`~millstream.io.postgres.staging`) inside one transaction, committed at the
pre-commit; the handle (``run``, ``part``, ``epoch``, the columns) goes into the
checkpoint. Once the checkpoint is complete the coordinator commits the handle: one
transaction moves that epoch's staged rows into the target (appended, or ``INSERT ... ON
CONFLICT (key) DO UPDATE`` / ``DELETE`` by key). A crash before the checkpoint leaves
staged rows no checkpoint names: they are never moved, and are deleted when the epoch is
written again or a later one commits. A crash after it is repaired by the restore, which
commits the checkpoint's handles again; a handle already moved finds no rows, so nothing
is applied twice. This needs no server setting (PostgreSQL's prepared transactions would
need ``max_prepared_transactions > 0``, which managed servers often refuse, and leave
locks behind when a job is abandoned), and a staged epoch survives a restart of the
database as well as of the job.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa

from millstream.core.changelog import APPEND, UPSERT
from millstream.errors import PlanError
from millstream.io.base import Sink
from millstream.io.postgres import staging as st
from millstream.io.postgres.client import CONNECT_TIMEOUT_S, PostgresError, connect, psycopg

STREAM_MODES = ("append", "upsert")
BATCH_MODES = ("append", "overwrite", "upsert")


class _Writer:
    """What both sinks share: the DSN, the target, a connection, staged copies."""

    def __init__(self, dsn: str, table: str, key: tuple[str, ...], mode: str,
                 create_table: bool, connect_timeout: float) -> None:
        if not isinstance(dsn, str) or not isinstance(table, str) or not table.strip():
            raise PlanError(f"postgres sink: dsn and table must be strings, got {dsn!r}, "
                            f"{table!r}")
        self.dsn = dsn
        self.table = table
        self.key = key
        self.mode = mode
        self.create_table = bool(create_table)
        self.connect_timeout = connect_timeout
        self._conn: Any = None
        self._target: st.Target | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_conn"] = None
        return state

    @property
    def _name(self) -> str:
        return f"postgres sink {self.table}"

    def _connection(self) -> Any:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = connect(self.dsn, connect_timeout=self.connect_timeout)
        return self._conn

    def _resolve(self, schema: pa.Schema | None = None) -> st.Target | None:
        """Find the target (creating it from ``schema`` when allowed) and its staging table;
        commits. None when the table is missing and cannot be created yet."""
        if self._target is not None:
            return self._target
        conn = self._connection()
        pg = psycopg()
        try:
            with conn.cursor() as cur:
                target = st.resolve(cur, self.table)
                if target is None and self.create_table and schema is not None:
                    st.create(cur, self.table, schema, self.key if self.mode == "upsert"
                              else ())
                    target = st.resolve(cur, self.table)
            conn.commit()
        except pg.Error as exc:
            conn.rollback()
            raise st.wrap(exc, f"{self._name}: preparing the table") from exc
        if target is None:
            if not self.create_table:
                raise PlanError(f"{self._name}: the table does not exist; create it, or pass "
                                f"create_table=True")
            return None
        if self.mode == "upsert":
            st.check_keys(target, self.key)
        self._target = target
        return target

    def _move(self, cur: Any, run: str, part: str, epoch: int, columns: Sequence[str]) -> int:
        target = self._target
        assert target is not None
        cur.execute(st.move_sql(target, columns, self.mode, self.key),
                    {"run": run, "part": part, "epoch": epoch})
        return cur.rowcount

    def close(self) -> None:
        """Roll back what is open and close the connection."""
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None


class PostgresSink(_Writer):
    """A streaming sink into the PostgreSQL table ``table``, exactly once per epoch.

    ``mode="append"`` inserts every row (a result with updates is refused);
    ``mode="upsert"`` keeps one row per ``key``: inserts and updates are ``INSERT ... ON
    CONFLICT (key) DO UPDATE``, deletes delete the key's row (the table needs a primary
    key or unique index on exactly ``key``). ``create_table=True`` creates a missing table
    from the result's columns (primary key ``key`` in upsert mode). See the module doc for
    how commits stay exactly once.
    """

    #: the coordinator commits each instance's handle (any connection can move the rows)
    commits_in_subtask = False

    def __init__(self, dsn: str, table: str, key: Sequence[str] | str | None = None,
                 mode: str | None = None, create_table: bool = False,
                 connect_timeout: float = CONNECT_TIMEOUT_S) -> None:
        mode = mode or ("upsert" if key else "append")
        keys = st.check_mode(mode, key, STREAM_MODES, "postgres_sink")
        super().__init__(dsn, table, keys, mode, create_table, connect_timeout)
        #: this sink object's staging rows (a job started anew gets new ones)
        self.run = uuid.uuid4().hex[:16]
        self.part = "driver"
        self._epoch: int | None = None
        self._seq = 0
        self._rows = 0
        self._cleaned = False
        self._columns: list[str] | None = None

    @property
    def changelog_mode(self) -> str:
        """Upsert mode takes updating results keyed by ``key``; append mode, inserts only."""
        return UPSERT if self.mode == "upsert" else APPEND

    @property
    def upsert_keys(self) -> tuple[str, ...]:
        """The key columns of upsert mode."""
        return self.key

    def for_subtask(self, index: int) -> PostgresSink:
        """A copy for parallel instance ``index`` (its own staging rows). Runs in the
        driver before the tasks start: checks the table (it fails fast when the server is
        unreachable or an upsert key has no unique index) and prepares staging."""
        self._resolve()
        sub = PostgresSink.__new__(PostgresSink)
        sub.__dict__.update(self.__getstate__())
        sub.part = str(int(index))
        return sub

    def begin(self, epoch: int) -> None:
        """Start ``epoch``; the first write drops what an unfinished attempt staged."""
        self._epoch, self._seq, self._rows, self._cleaned = int(epoch), 0, 0, False

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        """Stage the rows (visible at the commit)."""
        if self._epoch is None:
            raise PostgresError(f"{self._name}: write() before begin()")
        if not batch.num_rows:
            return
        table, kinds = st.rows_to_stage(batch, self.mode, self.key, self.table)
        target = self._resolve(batch.schema)
        assert target is not None
        columns = st.data_columns(table, target)
        if self._columns is None:
            self._columns = columns
        elif columns != self._columns:
            raise PlanError(f"{self._name}: the result's columns changed from "
                            f"{self._columns} to {columns}")
        conn = self._connection()
        try:
            with conn.cursor() as cur:
                if not self._cleaned:  # an earlier attempt of this epoch or later ones
                    cur.execute(f"DELETE FROM {target.staging} WHERE _ms_run = %s AND "
                                f"_ms_part = %s AND _ms_epoch >= %s",
                                (self.run, self.part, self._epoch))
                    self._cleaned = True
                self._rows += st.copy_into_staging(cur, target, table, kinds, self.run,
                                                   self.part, self._epoch, self._seq)
                self._seq += table.num_rows
        except psycopg().Error as exc:
            self._abandon()
            raise st.wrap(exc, f"{self._name}: staging rows of epoch {self._epoch}") from exc

    def pre_commit(self, epoch: int) -> dict[str, Any]:
        """Commit the staging transaction: the epoch is durable and not yet visible."""
        if self._rows:
            try:
                self._conn.commit()
            except psycopg().Error as exc:
                self._abandon()
                raise st.wrap(exc, f"{self._name}: pre-commit of epoch {epoch}") from exc
        handle = {"run": self.run, "part": self.part, "epoch": int(epoch),
                  "rows": self._rows, "columns": list(self._columns or ())}
        self._epoch, self._rows = None, 0
        return handle

    def commit(self, handle: dict[str, Any]) -> None:
        """Move the epoch's staged rows into the table, in one transaction (idempotent)."""
        if not handle.get("rows"):
            return
        self._resolve()
        conn = self._connection()
        pg = psycopg()
        try:
            with conn.cursor() as cur:
                self._move(cur, handle["run"], handle["part"], handle["epoch"],
                           handle["columns"])
                # leftovers of this instance: unfinished attempts of this epoch and older
                # ones, and, for a run that ended (a restore), everything it staged
                newer = "" if handle["run"] != self.run else " AND _ms_epoch <= %(epoch)s"
                cur.execute(f"DELETE FROM {self._target.staging} WHERE _ms_run = %(run)s "
                            f"AND _ms_part = %(part)s{newer}", handle)
            conn.commit()
        except pg.Error as exc:
            self._abandon()
            raise st.wrap(exc, f"{self._name}: commit of epoch {handle['epoch']} "
                               f"(instance {handle['part']})") from exc

    def abort(self, handle: dict[str, Any] | None = None) -> None:
        """Roll back the rows staged in the open epoch."""
        self._abandon()
        self._epoch, self._rows = None, 0

    def _abandon(self) -> None:
        if self._conn is not None and not self._conn.closed:
            try:
                self._conn.rollback()
            except psycopg().Error:
                self.close()

    def describe(self) -> str:
        return f"postgres {self.table} mode={self.mode} key={list(self.key)}"


class PostgresBatchSink(_Writer, Sink):
    """``Dataset.write_postgres``: every task stages its rows; the driver's commit moves
    all of them into the table in one transaction (``overwrite`` first deletes the table's
    rows in that transaction), so the table changes all at once or not at all. A missing
    table is created from the result's columns unless ``create_table=False``."""

    name = "postgres"

    def __init__(self, dsn: str, table: str, mode: str = "append",
                 key: Sequence[str] | str | None = None, create_table: bool = True,
                 connect_timeout: float = CONNECT_TIMEOUT_S) -> None:
        keys = st.check_mode(mode, key, BATCH_MODES, "write_postgres")
        super().__init__(dsn, table, keys, mode, create_table, connect_timeout)
        self.run = ""

    def prepare(self, job_id: str) -> None:
        """Check the target (fails fast when the server cannot be reached)."""
        self.run = f"batch-{job_id}-{uuid.uuid4().hex[:6]}"
        self._resolve()
        self.close()

    def write_partition(self, batches: Iterator[pa.RecordBatch], ctx: Any) -> Any:
        """Stage this attempt's rows; the message names them."""
        part = f"p{ctx.partition}-a{ctx.attempt}-{uuid.uuid4().hex[:6]}"
        rows, columns = 0, None
        try:
            for b in batches:
                if not b.num_rows:
                    continue
                table, kinds = st.rows_to_stage(b, self.mode if self.mode == "upsert"
                                                else "append", self.key, self.table)
                target = self._resolve(b.schema)
                assert target is not None
                columns = columns or st.data_columns(table, target)
                with self._connection().cursor() as cur:
                    rows += st.copy_into_staging(cur, target, table, kinds, self.run, part,
                                                 0, rows)
            if rows:
                self._conn.commit()
        except psycopg().Error as exc:
            raise st.wrap(exc, f"{self._name}: staging rows") from exc
        finally:
            self.close()
        return {"part": part, "rows": rows, "columns": columns}

    def commit(self, messages: list[Any]) -> None:
        """Move every task's staged rows into the table, in one transaction."""
        pg = psycopg()
        target = self._resolve()
        if target is None:  # a missing table and no rows to create it from
            return
        conn = self._connection()
        try:
            with conn.cursor() as cur:
                if self.mode == "overwrite":
                    cur.execute(f"DELETE FROM {target.relation}")
                for m in messages:
                    if m and m["rows"]:
                        self._move(cur, self.run, m["part"], 0, m["columns"])
                cur.execute(f"DELETE FROM {target.staging} WHERE _ms_run = %s", (self.run,))
            conn.commit()
        except pg.Error as exc:
            conn.rollback()
            raise st.wrap(exc, f"{self._name}: commit") from exc
        finally:
            self.close()

    def abort(self) -> None:
        """Delete what the tasks staged."""
        try:
            target = self._resolve()
            if target is not None:
                with self._connection().cursor() as cur:
                    cur.execute(f"DELETE FROM {target.staging} WHERE _ms_run = %s",
                                (self.run,))
                self._conn.commit()
        except (PostgresError, PlanError):
            pass
        except psycopg().Error:
            pass
        finally:
            self.close()

    def describe(self) -> str:
        return f"postgres {self.table} mode={self.mode}"
