"""SQL statements: queries (a lazy Dataset), EXPLAIN, CREATE [TEMP] VIEW, DROP VIEW,
``COPY (query) TO 'uri' (FORMAT parquet)``, ``INSERT INTO`` a table registered by path,
``SET name = value`` and ``RESET [name]`` (:data:`SETTINGS`); and the public functions ``ms.sql``, ``ms.register``, ``ms.unregister``,
``ms.register_function``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import re
from collections.abc import Callable
from typing import Any

import pyarrow as pa
from sqlglot import exp

from millstream.api.dataset import Dataset
from millstream.api.readers import from_arrow
from millstream.api.stream_join import join_state_ttl
from millstream.core.units import format_duration, parse_duration
from millstream.errors import PlanError, SchemaError, SQLError
from millstream.expr.nodes import Column
from millstream.expr.types import parse_type
from millstream.plan import logical as L
from millstream.sql import catalog as C
from millstream.sql.exprs import Env
from millstream.sql.parse import DEFAULT_DIALECT, Text, parse
from millstream.sql.planner import Planner
from millstream.sql.scope import Relation

_EXPLAIN = re.compile(r"^(\s*(?:--[^\n]*\n\s*)*)explain\b", re.IGNORECASE)


def sql(query: str, dialect: str | None = None, **tables: Any) -> Dataset | None:
    """Run SQL: a query gives a lazy Dataset (``.show()``, ``.collect()``, ``.explain()``,
    ``.write_parquet(...)``, ``.start(...)`` on streams); EXPLAIN gives the plans as a
    one-row Dataset; CREATE VIEW, DROP VIEW, COPY and INSERT act at once and give None.

    Tables are found by name: those passed here by keyword (Datasets, pyarrow Tables,
    pandas or Polars DataFrames), then those registered with :func:`register`, then a
    quoted path or URI in FROM (``FROM 'logs/*.json'``: the format from the extension).
    ``dialect`` names the SQL dialect (sqlglot's names: "duckdb", the default, "spark",
    "postgres", ...). Several statements separated by ``;`` run in order; the last one's
    result is returned.
    """
    if not isinstance(query, str):
        raise SQLError(f"ms.sql() takes the query text, got {type(query).__name__}")
    explain = False
    m = _EXPLAIN.match(query)
    if m:
        explain = True
        query = m.group(1) + " " * (len(m.group(0)) - len(m.group(1))) + query[m.end():]
    statements = parse(query, dialect)
    if not statements:
        raise SQLError("no SQL statement given")
    env = Env(Text(query), dialect or DEFAULT_DIALECT, C.CATALOG, _dt.datetime.now())
    result: Dataset | None = None
    for i, stmt in enumerate(statements):
        result = _statement(env, stmt, tables, explain and i == 0)
    return result


#: What ``SET name = value`` sets (Flink's configuration names too), for the process:
#: ``state_ttl``, Flink's ``table.exec.state.ttl``: the state time-to-live of the regular
#: joins of two streams in later queries ('1h', '30 min', INTERVAL '1' HOUR, a number of
#: milliseconds as in Flink; 0 or NULL: rows kept for ever).
SETTINGS = {"state_ttl": "state_ttl", "table.exec.state.ttl": "state_ttl"}


def _setting(env: Env, node: exp.Expr) -> str:
    if isinstance(node, exp.Column):
        name = ".".join(p.name for p in node.parts)
    elif isinstance(node, (exp.Literal, exp.Identifier, exp.Var)):
        name = node.name
    else:
        raise env.error("SET takes a setting's name", node)
    key = SETTINGS.get(name.lower())
    if key is None:
        raise env.error(f"unknown setting {name!r}; settings are {sorted(SETTINGS)}", node)
    return key


def _set(env: Env, stmt: exp.Set) -> None:
    """``SET state_ttl = '1h'``: the value checked now, used by later queries."""
    for item in stmt.expressions:
        eq = item.this
        if not isinstance(eq, exp.EQ):
            raise env.error("SET takes name = value", item)
        key, value = _setting(env, eq.this), eq.expression
        if isinstance(value, exp.Null):
            env.catalog.settings.pop(key, None)
            continue
        if isinstance(value, exp.Neg):
            raise env.error(f"{key} must not be negative", value)
        if isinstance(value, exp.Interval):
            text = f"{value.this.name} {value.unit.name if value.unit else ''}".strip()
        elif isinstance(value, exp.Literal):
            text = value.name if value.is_string else f"{value.name}ms"  # Flink: ms
        else:
            raise env.error(f"{key} takes a duration such as '1h' or INTERVAL '1' HOUR",
                            value)
        try:
            micros = parse_duration(text, key)
        except PlanError as exc:
            raise env.error(str(exc), value) from None
        if micros:
            env.catalog.settings[key] = micros
        else:
            env.catalog.settings.pop(key, None)


def _reset(env: Env, stmt: exp.Command) -> None:
    """``RESET name`` (or ``RESET``: every setting) back to its default."""
    arg = stmt.expression
    name = (arg.name if isinstance(arg, exp.Expr) else str(arg or "")).strip().strip("'\"")
    if not name:
        env.catalog.settings.clear()
        return
    key = SETTINGS.get(name.lower())
    if key is None:
        raise env.error(f"unknown setting {name!r}; settings are {sorted(SETTINGS)}", stmt)
    env.catalog.settings.pop(key, None)


def _with_settings(env: Env, node: L.Node) -> L.Node:
    """``node`` with the SET values applied: the state TTL on regular stream joins that
    have none."""
    ttl = env.catalog.settings.get("state_ttl")
    if not ttl:
        return node

    def apply(n: L.Node) -> L.Node:
        if isinstance(n, L.Join) and n.state_ttl is None and n.joins_streams():
            micros, times = join_state_ttl(n.left, n.right, format_duration(ttl))
            return dataclasses.replace(n, state_ttl=micros, time_columns=times)
        return n

    return node.transform_up(apply)


def _statement(env: Env, stmt: exp.Expr, tables: dict[str, Any], explain: bool
               ) -> Dataset | None:
    if isinstance(stmt, exp.Command) and stmt.name.upper() == "RESET" and not explain:
        return _reset(env, stmt)
    if isinstance(stmt, exp.Command):
        raise env.error(f"unsupported statement {stmt.name.upper()}", stmt)
    if isinstance(stmt, exp.Set) and not explain:
        return _set(env, stmt)
    if explain:
        if not isinstance(stmt, exp.Query):
            raise env.error("EXPLAIN takes a query", stmt)
        text = query_dataset(env, stmt, tables).explain(print_plan=False)
        return from_arrow(pa.table({"plan": [text]}))
    if isinstance(stmt, exp.Query):
        return query_dataset(env, stmt, tables)
    if isinstance(stmt, exp.Create):
        return _create(env, stmt, tables)
    if isinstance(stmt, exp.Drop):
        return _drop(env, stmt)
    if isinstance(stmt, exp.Copy):
        return _copy(env, stmt, tables)
    if isinstance(stmt, exp.Insert):
        return _insert(env, stmt, tables)
    raise env.error(f"unsupported statement {stmt.key.upper()}", stmt)


def relation_node(rel: Relation) -> L.Node:
    """The relation's node with exactly its visible columns, under their SQL names."""
    visible = rel.visible()
    schema = rel.node.schema
    if schema is not None and schema.names == [f.name for f in visible] and all(
            f.internal == f.name for f in visible):
        return rel.node
    return L.Project(rel.node, tuple(Column(f.internal).alias(f.name)
                                     if f.internal != f.name else Column(f.internal)
                                     for f in visible))


def query_dataset(env: Env, q: exp.Expr, tables: dict[str, Any]) -> Dataset:
    """A query's lazy Dataset."""
    rel = Planner(env, tables).query(q)
    node = _with_settings(env, relation_node(rel))
    try:
        return Dataset(node)
    except SchemaError as exc:
        raise SQLError(str(exc)) from None


def _create(env: Env, stmt: exp.Create, tables: dict[str, Any]) -> None:
    kind = (stmt.args.get("kind") or "").upper()
    if kind != "VIEW":
        raise env.error(f"CREATE {kind} is not supported (CREATE [TEMP] VIEW is; register "
                        f"tables with ms.register)", stmt)
    target = stmt.this
    name = target.name if isinstance(target, exp.Table) else target.this.name
    columns = [c.name for c in target.expressions] if isinstance(target, exp.Schema) else None
    if C.CATALOG.lookup(name) is not None and not stmt.args.get("replace"):
        if stmt.args.get("exists"):
            return None
        raise env.error(f"a table or view named {name!r} exists; use CREATE OR REPLACE VIEW",
                        target)
    rel = Planner(env, tables).query(stmt.expression)
    if columns is not None:
        rel = Planner(env, tables).rename_columns(rel, columns, target)
    node = relation_node(rel)
    C.CATALOG.register_view(name, node, [f.name for f in rel.visible()])
    return None


def _drop(env: Env, stmt: exp.Drop) -> None:
    kind = (stmt.args.get("kind") or "").upper()
    if kind not in ("VIEW", "TABLE"):
        raise env.error(f"DROP {kind} is not supported", stmt)
    for t in stmt.args.get("tables") or [stmt.this]:
        if not C.CATALOG.unregister(t.name) and not stmt.args.get("exists"):
            raise env.error(f"no {kind.lower()} named {t.name!r}", t)
    return None


def _copy_options(env: Env, stmt: exp.Expr) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in stmt.args.get("params") or []:
        key = p.this.name.lower()
        value = p.args.get("expression")
        if value is None:
            out[key] = True
        elif isinstance(value, exp.Tuple) or isinstance(value, exp.Paren):
            items = value.expressions if isinstance(value, exp.Tuple) else [value.this]
            out[key] = [i.name for i in items]
        else:
            out[key] = value.name if not isinstance(value, exp.Literal) else value.this
    return out


def _copy(env: Env, stmt: exp.Copy, tables: dict[str, Any]) -> None:
    if stmt.args.get("kind") is not False:
        raise env.error("COPY ... FROM is not supported; read files with FROM 'path'", stmt)
    source = stmt.this
    files = stmt.args.get("files") or []
    if len(files) != 1 or not isinstance(files[0], exp.Literal):
        raise env.error("COPY ... TO takes one target path or URI", stmt)
    uri = files[0].this
    options = _copy_options(env, stmt)
    fmt = str(options.pop("format", None) or C.format_of(uri) or "parquet").lower()
    partition_by = options.pop("partition_by", None)
    mode = "overwrite"
    if options.pop("overwrite_or_ignore", None) or options.pop("append", None):
        mode = "append"
    options.pop("overwrite", None)
    if options:
        raise env.error(f"COPY option(s) {sorted(options)} are not supported (FORMAT, "
                        f"PARTITION_BY, OVERWRITE, APPEND are)", stmt)
    if isinstance(source, exp.Table):
        q: exp.Expr = exp.select("*").from_(source.copy())
    else:
        q = source.this if isinstance(source, exp.Subquery) else source
    ds = query_dataset(env, q, tables)
    _write(env, ds, uri, fmt, mode, partition_by, stmt)
    return None


def _write(env: Env, ds: Dataset, uri: str, fmt: str, mode: str, partition_by: Any,
           stmt: exp.Expr) -> None:
    writers = {"parquet": ds.write_parquet, "csv": ds.write_csv, "json": ds.write_json}
    if fmt not in writers:
        raise env.error(f"unknown output format {fmt!r}; one of parquet, csv, json", stmt)
    kwargs: dict[str, Any] = {"mode": mode}
    if partition_by:
        kwargs["partition_by"] = partition_by
    writers[fmt](uri, **kwargs)


def _insert(env: Env, stmt: exp.Insert, tables: dict[str, Any]) -> None:
    target = stmt.this
    columns = None
    if isinstance(target, exp.Schema):
        columns = [c.name for c in target.expressions]
        target = target.this
    name = target.name
    entry = C.CATALOG.lookup(name)
    if not isinstance(entry, C.FileTable):
        raise env.error(f"INSERT INTO {name}: the target must be a table registered by path "
                        f"(ms.register({name!r}, 'path/or/uri'), written to as files); "
                        f"{'it is not registered' if entry is None else 'it is not'}", target)
    if stmt.args.get("overwrite"):
        mode = "overwrite"
    else:
        mode = "append"
    ds = query_dataset(env, stmt.expression, tables)
    if columns is not None:
        if len(columns) != len(ds.columns):
            raise env.error(f"INSERT INTO {name} ({', '.join(columns)}): the query has "
                            f"{len(ds.columns)} columns", stmt)
        ds = ds.select(*[Column(c).alias(n) for c, n in zip(ds.columns, columns)])
    if entry.format == "text":
        raise env.error("INSERT INTO a text table is not supported", target)
    _write(env, ds, entry.uri, entry.format, mode, None, stmt)
    return None


# ---------------------------------------------------------------------- registration
def register(name: str, data: Any, format: str | None = None, **options: Any) -> None:
    """Make ``data`` a table SQL queries see as ``name``: a Dataset, a pyarrow Table, a
    pandas or Polars DataFrame, or a path or URI (files read by format, from the extension
    or ``format=``; ``INSERT INTO name`` appends files there). Replaces a table of that
    name."""
    if isinstance(data, str):
        data = C.file_table(data, format, **options)
    elif format is not None or options:
        raise PlanError("register(format=..., options) applies to a path or URI")
    C.CATALOG.register(name, data)


def unregister(name: str) -> None:
    """Forget the table or view ``name`` (an error when there is none)."""
    if not C.CATALOG.unregister(name):
        raise PlanError(f"no table named {name!r}; tables: {', '.join(C.CATALOG.names()) or 'none'}")


def register_function(name: str, fn: Callable[..., Any], return_type: Any = None, *,
                      kind: str = "scalar", vectorized: bool = False) -> None:
    """Make the Python function ``fn`` callable from SQL as ``name(...)``.

    ``kind="scalar"``: called row by row with Python values (None for null), or, with
    ``vectorized=True``, once per batch with pyarrow arrays, returning an array (or a list,
    numpy array, pandas Series) of the same length. ``kind="aggregate"``: called once per
    group with the list of the group's non-null values. ``return_type``: the result's
    type (a pyarrow DataType or a name such as "int64", "string", "double"); without it
    the type is found when the function runs.
    """
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise PlanError(f"register_function: {name!r} is not a function name")
    if not callable(fn):
        raise PlanError(f"register_function({name!r}, ...) needs a callable")
    if kind not in ("scalar", "aggregate"):
        raise PlanError(f"register_function(kind=...) is 'scalar' or 'aggregate', got {kind!r}")
    if kind == "aggregate" and vectorized:
        raise PlanError("an aggregate function is called with a group's values as a list; "
                        "vectorized= applies to scalar functions")
    dtype = None if return_type is None else parse_type(return_type)
    C.CATALOG.register_function(C.Function(name, fn, dtype, kind, vectorized))


def unregister_function(name: str) -> None:
    """Forget a function registered with :func:`register_function`."""
    if not C.CATALOG.unregister_function(name):
        raise PlanError(f"no function named {name!r}")
