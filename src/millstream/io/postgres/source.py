"""The PostgreSQL source: a table, view or query read in parallel ranges (Spark's JDBC
options: ``partition_column``, ``num_partitions``, ``lower_bound``, ``upper_bound``).

Schema at plan time from a ``LIMIT 0`` query (json, uuid and types without an Arrow
counterpart read as text). Splits: without ``partition_column`` one split; with it,
``num_partitions`` ranges of the numeric, date or timestamp column between the bounds
(from ``min``/``max`` when not given): the first range also takes the rows below the
lower bound and the nulls, the last the rows above the upper bound, so every row is read
once whatever the bounds. Each split is read by a task with a server-side cursor, in
Arrow batches of ``fetch_size`` rows, inside a read-only transaction. Pushdown: the
columns read, and the filter conjuncts that translate to SQL
(:mod:`~millstream.io.postgres.pushdown`).
"""

from __future__ import annotations

import copy
import datetime as _dt
import decimal
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from millstream.errors import PlanError, SchemaError
from millstream.io.base import Source, Split
from millstream.io.postgres.client import (
    CONNECT_TIMEOUT_S,
    TEXT_OIDS,
    arrow_type,
    connect,
    is_query,
    psycopg,
    where,
)
from millstream.io.postgres.pushdown import to_sql
from millstream.io.postgres.staging import ident, wrap


class PostgresSource(Source):
    """Rows of a PostgreSQL table, view or query (see the module doc)."""

    name = "postgres"

    def __init__(self, dsn: str, query_or_table: str, partition_column: str | None = None,
                 num_partitions: int | None = None, lower_bound: Any = None,
                 upper_bound: Any = None, fetch_size: int = 10_000,
                 connect_timeout: float = CONNECT_TIMEOUT_S) -> None:
        if not isinstance(query_or_table, str) or not query_or_table.strip():
            raise PlanError(f"read_postgres: a table name or a query, got {query_or_table!r}")
        if num_partitions is not None and (isinstance(num_partitions, bool)
                                           or int(num_partitions) < 1):
            raise PlanError(f"read_postgres: num_partitions must be >= 1, got "
                            f"{num_partitions!r}")
        if partition_column is None and (num_partitions or lower_bound is not None
                                         or upper_bound is not None) and num_partitions != 1:
            raise PlanError("read_postgres: num_partitions and the bounds need a "
                            "partition_column")
        self.dsn = dsn
        self.query_or_table = query_or_table.strip().rstrip(";")
        self.partition_column = partition_column
        self.num_partitions = None if num_partitions is None else int(num_partitions)
        self.lower_bound = lower_bound
        self.upper_bound = upper_bound
        self.fetch_size = max(1, int(fetch_size))
        self.connect_timeout = connect_timeout
        self.columns: list[str] | None = None
        self.where: str | None = None       # pushed filter, SQL with %s marks
        self.params: list[Any] = []
        self.limit: int | None = None       # rows per split at most (a pushed limit)
        self._full: pa.Schema | None = None
        self._text: frozenset[str] = frozenset()

    @property
    def relation(self) -> str:
        """The FROM item: the table as named, or the query as a subquery."""
        if is_query(self.query_or_table):
            return f"({self.query_or_table}) AS q"
        return self.query_or_table

    # ------------------------------------------------------------------ schema

    def full_schema(self) -> pa.Schema:
        """Every column's name and type, from a ``LIMIT 0`` query (once)."""
        if self._full is None:
            pg = psycopg()
            with connect(self.dsn, connect_timeout=self.connect_timeout) as conn:
                try:
                    with conn.cursor() as cur:
                        cur.execute(f"SELECT * FROM {self.relation} LIMIT 0")
                        desc = cur.description or []
                except pg.Error as exc:
                    raise wrap(exc, f"read_postgres {self._short()} at "
                                    f"{where(self.dsn)}") from exc
            fields, text = [], set()
            for d in desc:
                t = None if d.type_code in TEXT_OIDS else \
                    arrow_type(d.type_code, d.precision, d.scale)
                if t is None:
                    t = pa.string()
                    text.add(d.name)
                fields.append(pa.field(d.name, t))
            names = [f.name for f in fields]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise SchemaError(f"read_postgres {self._short()}: duplicate column name(s) "
                                  f"{dupes}; alias them in the query")
            self._full, self._text = pa.schema(fields), frozenset(text)
        return self._full

    def schema(self) -> pa.Schema:
        full = self.full_schema()
        if self.columns is None:
            return full
        return pa.schema([full.field(c) for c in self.columns])

    def _select_list(self) -> str:
        schema = self.schema()
        if not schema.names:
            return "1 AS __ms_row"
        return ", ".join(f"{ident(c)}::text AS {ident(c)}" if c in self._text else ident(c)
                         for c in schema.names)

    # ------------------------------------------------------------------ pushdown

    def with_pushdown(self, columns: list[str] | None, predicate: Any
                      ) -> tuple[Source, bool, bool]:
        """Columns always; the filter's conjuncts that translate to SQL."""
        full = self.full_schema()
        new = copy.copy(self)
        applied_cols = False
        if columns is not None:
            missing = [c for c in columns if c not in full.names]
            if missing:
                raise SchemaError(f"read_postgres {self._short()}: unknown column(s) "
                                  f"{missing}; available: {full.names}")
            new.columns = list(columns)
            applied_cols = True
        exact = False
        if predicate is not None:
            sql = to_sql(predicate, full)
            if sql is not None:
                text, params, exact = sql
                new.where = text if self.where is None else f"{self.where} AND {text}"
                new.params = [*self.params, *params]
        if new.where == self.where and not applied_cols:
            return self, False, False
        return new, applied_cols, exact

    # ------------------------------------------------------------------ splits

    def _bounds(self, cur: Any) -> tuple[Any, Any]:
        lo, hi = self.lower_bound, self.upper_bound
        if lo is None or hi is None:
            col = ident(self.partition_column)
            filt = f" WHERE {self.where}" if self.where else ""
            cur.execute(f"SELECT min({col}), max({col}) FROM {self.relation}{filt}",
                        self.params)
            mn, mx = cur.fetchone()
            lo = mn if lo is None else lo
            hi = mx if hi is None else hi
        return lo, hi

    def plan_splits(self, target_splits: int) -> list[Split]:
        """One split, or ranges of ``partition_column`` (see the module doc)."""
        col = self.partition_column
        n = self.num_partitions or max(1, int(target_splits))
        if col is None or n == 1:
            return [Split(0, None, description=f"postgres {self._short()}")]
        full = self.full_schema()
        if col not in full.names:
            raise SchemaError(f"read_postgres: partition_column {col!r} is not a column of "
                              f"{self._short()}; columns: {full.names}")
        t = full.field(col).type
        if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
                or pa.types.is_date(t) or pa.types.is_timestamp(t)):
            raise SchemaError(f"read_postgres: partition_column {col!r} must be numeric, a "
                              f"date or a timestamp, not {t}")
        pg = psycopg()
        with connect(self.dsn, connect_timeout=self.connect_timeout) as conn:
            try:
                with conn.cursor() as cur:
                    lo, hi = self._bounds(cur)
            except pg.Error as exc:
                raise wrap(exc, f"read_postgres {self._short()}: bounds of {col!r}") from exc
        if lo is None or hi is None or not lo < hi:
            return [Split(0, None, description=f"postgres {self._short()}")]
        cuts = _cuts(lo, hi, n)
        if not cuts:
            return [Split(0, None, description=f"postgres {self._short()}")]
        c = ident(col)
        ranges: list[tuple[str, list[Any]]] = [(f"{c} < %s OR {c} IS NULL", [cuts[0]])]
        ranges += [(f"{c} >= %s AND {c} < %s", [a, b]) for a, b in zip(cuts, cuts[1:])]
        ranges.append((f"{c} >= %s", [cuts[-1]]))
        return [Split(i, r, description=f"postgres {self._short()} {r[0] % tuple(r[1])}")
                for i, r in enumerate(ranges)]

    def read_split(self, split: Split, ctx: Any) -> Iterator[pa.RecordBatch]:
        """The split's rows through a server-side cursor, ``fetch_size`` rows a batch."""
        schema = self.schema()
        conds, params = [], []
        if split.info is not None:
            conds.append(f"({split.info[0]})")
            params += list(split.info[1])
        if self.where:
            conds.append(f"({self.where})")
            params += self.params
        sql = f"SELECT {self._select_list()} FROM {self.relation}"
        if conds:
            sql += " WHERE " + " AND ".join(conds)
        if self.limit is not None:
            sql += f" LIMIT {int(self.limit)}"
        pg = psycopg()
        conn = connect(self.dsn, connect_timeout=self.connect_timeout)
        try:
            conn.read_only = True
            with conn.cursor(name=f"ms_split_{split.index}") as cur:
                cur.itersize = self.fetch_size
                cur.execute(sql, params)
                while True:
                    rows = cur.fetchmany(self.fetch_size)
                    if not rows:
                        break
                    yield _batch(rows, schema)
            conn.rollback()
        except pg.Error as exc:
            raise wrap(exc, f"read_postgres {self._short()} split {split.index}") from exc
        finally:
            conn.close()

    def with_limit(self, n: int) -> Source:
        """Each split reads at most ``n`` rows (``LIMIT n``)."""
        if self.limit is not None and self.limit <= n:
            return self
        new = copy.copy(self)
        new.limit = max(0, int(n))
        return new

    # ------------------------------------------------------------------ the rest

    def fingerprint(self) -> Any:
        return ("postgres", self.dsn, self.query_or_table, self.partition_column,
                self.num_partitions, repr(self.lower_bound), repr(self.upper_bound),
                tuple(self.columns) if self.columns is not None else None, self.where,
                repr(self.params), self.limit)

    def _short(self) -> str:
        text = " ".join(self.query_or_table.split())
        return text if len(text) <= 60 else text[:57] + "..."

    def describe(self) -> str:
        parts = [f"postgres {self._short()}"]
        if self.partition_column:
            parts.append(f"partition_column={self.partition_column}")
        if self.columns is not None:
            parts.append(f"columns={self.columns}")
        if self.where:
            parts.append(f"where={self.where}")
        if self.limit is not None:
            parts.append(f"limit={self.limit}")
        return " ".join(parts)


def _cuts(lo: Any, hi: Any, n: int) -> list[Any]:
    """The ``n - 1`` inner boundaries of ``n`` equal ranges between ``lo`` and ``hi``
    (fewer when the range holds fewer distinct integers or days)."""
    if isinstance(lo, bool) or isinstance(hi, bool):
        raise SchemaError("read_postgres: a boolean column cannot split the read")
    if isinstance(lo, _dt.datetime) or isinstance(hi, _dt.datetime):
        step = (hi - lo) / n
        return sorted({lo + step * i for i in range(1, n)} - {lo})
    if isinstance(lo, _dt.date):
        days = (hi - lo).days
        n = min(n, days)
        return [lo + _dt.timedelta(days=days * i // n) for i in range(1, n)]
    if isinstance(lo, int) and isinstance(hi, int):
        span = hi - lo
        n = min(n, span)
        return [lo + span * i // n for i in range(1, n)]
    lo_d, hi_d = decimal.Decimal(str(lo)), decimal.Decimal(str(hi))
    step = (hi_d - lo_d) / n
    cuts = [lo_d + step * i for i in range(1, n)]
    return [float(c) for c in cuts] if isinstance(lo, float) else cuts


def _batch(rows: list[tuple[Any, ...]], schema: pa.Schema) -> pa.RecordBatch:
    if not schema.names:  # (a count: rows without columns)
        return pa.record_batch([pa.nulls(len(rows))], names=["__ms_row"]).select([])
    columns = list(zip(*rows))
    arrays = []
    for f, values in zip(schema, columns):
        try:
            arrays.append(pa.array(values, f.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
            raise SchemaError(f"read_postgres: column {f.name!r} does not fit {f.type}: "
                              f"{exc}") from exc
    return pa.RecordBatch.from_arrays(arrays, schema=schema)
