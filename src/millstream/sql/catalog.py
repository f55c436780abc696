"""The names SQL queries see: tables registered with ``ms.register``, temporary views
(``CREATE TEMP VIEW``), Python functions (``ms.register_function``), the tables a call
passes by keyword, and files named by a quoted path or URI in FROM.

A table is held as a logical plan node: a Dataset's own node (so a query over it extends
its plan), or a scan of an in-memory table (pyarrow, pandas, Polars) or of files.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from millstream.api.dataset import Dataset
from millstream.errors import PlanError
from millstream.io.memory import TableSource
from millstream.plan import logical as L

#: File formats by extension, for a path in FROM or ``ms.register(name, path)``.
FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "csv",
           ".json": "json", ".jsonl": "json", ".ndjson": "json", ".txt": "text",
           ".log": "text"}
_COMPRESSION = (".gz", ".bz2", ".zst", ".lz4", ".snappy")


@dataclass
class FileTable:
    """A table registered by path or URI: read as ``format``, and where ``INSERT INTO``
    writes (appending files)."""

    uri: str
    format: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Function:
    """A Python function registered for SQL: scalar (``vectorized``: over Arrow arrays,
    else row by row) or aggregate (over the list of a group's values)."""

    name: str
    fn: Callable[..., Any]
    return_type: pa.DataType | None
    kind: str = "scalar"
    vectorized: bool = False


class Catalog:
    """Registered tables, views and functions (names are case-insensitive)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.tables: dict[str, tuple[str, Any]] = {}
        self.functions: dict[str, Function] = {}
        #: what SQL's SET statements set (``state_ttl``: µs), for the process
        self.settings: dict[str, Any] = {}

    def register(self, name: str, data: Any) -> None:
        if not isinstance(name, str) or not name:
            raise PlanError(f"register() needs a table name, got {name!r}")
        value: Any = data if isinstance(data, (FileTable, str, os.PathLike)) else as_node(data,
                                                                                          name)
        if isinstance(value, (str, os.PathLike)):
            value = file_table(os.fspath(value))
        with self._lock:
            self.tables[name.lower()] = (name, value)

    def register_view(self, name: str, node: L.Node, columns: list[str]) -> None:
        with self._lock:
            self.tables[name.lower()] = (name, ("view", node, columns))

    def unregister(self, name: str) -> bool:
        with self._lock:
            return self.tables.pop(name.lower(), None) is not None

    def lookup(self, name: str) -> Any | None:
        entry = self.tables.get(name.lower())
        return None if entry is None else entry[1]

    def names(self) -> list[str]:
        return sorted(n for n, _ in self.tables.values())

    def register_function(self, fn: Function) -> None:
        with self._lock:
            self.functions[fn.name.lower()] = fn

    def unregister_function(self, name: str) -> bool:
        with self._lock:
            return self.functions.pop(name.lower(), None) is not None


#: The process's catalog (``ms.register`` and friends).
CATALOG = Catalog()


def format_of(uri: str) -> str | None:
    """The file format a path's extension names (compression suffixes skipped)."""
    path = uri.rstrip("/").lower()
    for suffix in _COMPRESSION:
        if path.endswith(suffix):
            path = path[: -len(suffix)]
            break
    _, ext = os.path.splitext(path)
    return FORMATS.get(ext)


def file_table(uri: str, format: str | None = None, **options: Any) -> FileTable:
    """A FileTable for ``uri`` (format from the extension; a directory is Parquet)."""
    fmt = format or format_of(uri)
    if fmt is None:
        _, ext = os.path.splitext(uri.rstrip("/"))
        if ext and "*" not in ext:
            raise PlanError(f"cannot tell the file format of {uri!r} from its extension "
                            f"{ext!r}; known: {', '.join(sorted(FORMATS))}")
        fmt = "parquet"
    return FileTable(uri, fmt, dict(options))


def read_file_table(ft: FileTable) -> L.Node:
    """A scan of a FileTable's files."""
    from millstream.api import readers

    reader = {"parquet": readers.read_parquet, "csv": readers.read_csv,
              "json": readers.read_json, "text": readers.read_text}[ft.format]
    options = dict(ft.options)
    if ft.format == "csv" and ft.uri.lower().rstrip("/").endswith(".tsv") \
            and "delimiter" not in options:
        options["delimiter"] = "\t"
    return reader(ft.uri, **options)._node


def as_node(data: Any, name: str = "table") -> L.Node:
    """The plan node of a table given to SQL: a Dataset, a pyarrow Table or RecordBatch, a
    pandas or Polars DataFrame, or a plan node."""
    if isinstance(data, Dataset):
        return data._node
    if isinstance(data, L.Node):
        return data
    if isinstance(data, pa.RecordBatch):
        data = pa.Table.from_batches([data])
    if isinstance(data, pa.Table):
        return L.Scan(TableSource(data, None, name))
    module = type(data).__module__.split(".")[0]
    if module == "pandas":
        return L.Scan(TableSource(pa.Table.from_pandas(data, preserve_index=False), None, name))
    if module == "polars":
        if hasattr(data, "collect") and not hasattr(data, "to_arrow"):
            data = data.collect()  # a LazyFrame
        return L.Scan(TableSource(data.to_arrow(), None, name))
    if isinstance(data, FileTable):
        return read_file_table(data)
    raise PlanError(f"table {name!r}: expected a Dataset, a pyarrow Table, a pandas or Polars "
                    f"DataFrame or a path, got {type(data).__name__}")
