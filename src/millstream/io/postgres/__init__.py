"""PostgreSQL as a bounded source and as a sink, batch and streaming.

Needs psycopg 3 (``pip install 'millstream[postgres]'``), imported only when a connection
is first made.

Modules: :mod:`~millstream.io.postgres.source` (:class:`PostgresSource`: a table or
query read in parallel ranges of a column, with pushdown), :mod:`~millstream.io.postgres.sink`
(:class:`PostgresSink`: streaming, append or upsert, exactly once with the checkpoints;
:class:`PostgresBatchSink`: ``Dataset.write_postgres``), :mod:`~millstream.io.postgres.staging`
(the staging table and the statement that moves an epoch into the target),
:mod:`~millstream.io.postgres.pushdown` (filters as SQL) and
:mod:`~millstream.io.postgres.client` (connections, errors, type mapping).
"""

from millstream.io.postgres.client import PostgresError, PostgresNotInstalledError
from millstream.io.postgres.sink import PostgresBatchSink, PostgresSink
from millstream.io.postgres.source import PostgresSource

__all__ = ["PostgresBatchSink", "PostgresError", "PostgresNotInstalledError", "PostgresSink",
           "PostgresSource"]
