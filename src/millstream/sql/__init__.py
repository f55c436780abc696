"""SQL for batch and streaming: ``ms.sql(query, dialect=None, **tables)`` translates a query
into Millstream's logical plan, so it runs on the same optimizer, operators, runners,
checkpoints and sinks as the Dataset API.

Modules: ``parse`` (sqlglot, dialects, errors with a caret under the token), ``catalog``
(registered tables, views, Python functions), ``scope`` (columns and name resolution),
``exprs``, ``functions``, ``types`` and ``aggregates`` (expressions, functions, casts,
intervals, aggregate and window calls), ``planner`` (queries, WITH, set operations,
VALUES), ``select`` (SELECT clause by clause), ``joins``, ``grouping`` (GROUP BY,
GROUPING SETS), ``subqueries`` (IN / EXISTS / scalar subqueries as joins,
decorrelation), ``streaming`` (windowing table-valued functions, window and interval
joins) and ``statements`` (EXPLAIN, views, COPY, INSERT, and the public functions).
"""

from millstream.sql.statements import (
    register,
    register_function,
    sql,
    unregister,
    unregister_function,
)

__all__ = ["register", "register_function", "sql", "unregister", "unregister_function"]
