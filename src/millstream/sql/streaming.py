"""Streaming SQL (placeholder until the windowing functions are written): table functions
in FROM and the errors for what streams cannot do yet."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlglot import exp

from millstream.errors import SQLError
from millstream.sql.scope import Relation

if TYPE_CHECKING:
    from millstream.sql.select import SelectBuilder

_CHANGELOG = ("changelog streams (updates and retractions, the streaming-v2 work) are not "
              "in this version")


def window_grouping(b: SelectBuilder, group: exp.Group) -> tuple[Relation, Any] | None:
    return None


def unwindowed_aggregate_error(b: SelectBuilder, node: exp.Expr) -> SQLError:
    return b.p.error("a GROUP BY over a stream without a window emits updates as rows "
                     "arrive, which needs " + _CHANGELOG + "; group by window_start, "
                     "window_end of TUMBLE/HOP/CUMULATE/SESSION", node)


def stream_join_error(b: SelectBuilder, node: exp.Expr) -> SQLError:
    return b.p.error("a regular join of two streams keeps both sides forever and emits "
                     "updates, which needs " + _CHANGELOG + "; join within a time bound "
                     "(a.ts BETWEEN b.ts - INTERVAL ... AND b.ts + INTERVAL ...) or within "
                     "the same window (window_start and window_end equal)", node)


def stream_join(b: SelectBuilder, left: Relation, right: Relation, on: list[exp.Expr],
                how: str, node: exp.Expr) -> Relation:
    raise stream_join_error(b, node)


def where_stream_join(b: SelectBuilder, left: Relation, right: Relation,
                      where: list[exp.Expr]) -> Relation:
    raise stream_join_error(b, b.sel)


def unsupported_on_stream(p: Any, what: str, node: exp.Expr) -> SQLError:
    planner = getattr(p, "p", p)
    return planner.error(f"{what} on a stream is not supported (a stream has no end)", node)


def table_function(b: SelectBuilder, func: exp.Func) -> Relation:
    from millstream.sql import catalog as C

    name = func.sql_name().lower() if not isinstance(func, exp.Anonymous) else func.name.lower()
    readers = {"readparquet": "parquet", "read_parquet": "parquet", "readcsv": "csv",
               "read_csv": "csv", "read_csv_auto": "csv", "readjson": "json",
               "read_json": "json", "read_json_auto": "json", "read_ndjson": "json"}
    if name in readers:
        args = func.expressions or ([func.this] if func.this is not None else [])
        if not args or not isinstance(args[0], exp.Literal):
            raise b.p.error(f"{name}() takes a path or URI string", func)
        uri = args[0].this
        return b.p._table_relation(C.file_table(uri, readers[name]), uri, func)
    raise b.p.error(f"unknown table function {name}()", func)
