"""Which format a file name says it holds, and listing the files of one format.

A reader reads one format. When it lists a directory or a glob, a file whose extension
says it holds a format the reader cannot read (``b.parquet`` under ``read_csv(dir)``,
``a.csv`` under ``read_parquet(dir)``) is an error naming it, never silently skipped nor
parsed as garbage: select the files with a glob (``dir/*.csv``) or name them. A file
named explicitly is read whatever its extension, and so is one whose extension says
nothing (``part-00000``). Compression suffixes (``.gz``, ...) are looked through.

What each reader accepts besides names without a known extension: ``read_csv``: CSV
(``.csv``, ``.tsv``) and plain text (``.txt``, ``.log``, ``.dat``); ``read_json``: JSON
(``.json``, ``.jsonl``, ``.ndjson``) and plain text; ``read_text``: any text, CSV and
JSON; ``read_parquet``: Parquet (``.parquet``, ``.pq``, ``.parq``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from millstream.errors import PlanError
from millstream.io import fs as msfs
from millstream.io.files.ranges import COMPRESSION_BY_EXTENSION

#: Known extensions of data formats.
EXTENSIONS = {
    ".parquet": "parquet", ".pq": "parquet", ".parq": "parquet",
    ".csv": "csv", ".tsv": "csv",
    ".json": "json", ".jsonl": "json", ".ndjson": "json",
    ".txt": "text", ".text": "text", ".log": "text", ".dat": "text",
    ".orc": "orc", ".avro": "avro", ".arrow": "arrow", ".arrows": "arrow",
    ".feather": "arrow", ".ipc": "arrow", ".xlsx": "excel", ".xls": "excel",
}
#: The formats a reader reads (names with no known extension are read by every reader).
READS = {
    "csv": frozenset({"csv", "text"}),
    "json": frozenset({"json", "text"}),
    "text": frozenset({"csv", "json", "text"}),
    "parquet": frozenset({"parquet"}),
}
_NAMES = {"parquet": "Parquet", "csv": "CSV", "json": "JSON", "text": "text", "orc": "ORC",
          "avro": "Avro", "arrow": "Arrow IPC", "excel": "Excel"}
_GLOBS = {"parquet": "*.parquet", "csv": "*.csv", "json": "*.json*", "text": "*.txt"}


def format_of(path: str) -> str | None:
    """The format a file name's extension names (compression suffixes looked through)."""
    name = path.rsplit("/", 1)[-1].lower()
    for ext in COMPRESSION_BY_EXTENSION:
        if name.endswith(ext):
            name = name[:-len(ext)]
            break
    dot = name.rfind(".")
    return EXTENSIONS.get(name[dot:]) if dot > 0 else None


def list_files(uri: str | Iterable[str], fmt: str,
               storage_options: dict[str, Any] | None = None) -> list[msfs.FileEntry]:
    """The files ``uri`` names (as :func:`millstream.io.fs.expand_all`), refusing those a
    directory or glob holds in a format reader ``fmt`` cannot read (see module doc)."""
    options = storage_options or {}
    uris = [uri] if isinstance(uri, str) else list(uri)
    seen: set[str] = set()
    out: list[msfs.FileEntry] = []
    foreign: list[tuple[str, str]] = []
    listed_uri = None
    for u in uris:
        entries = msfs.expand(u, **options)
        _, path = msfs.resolve(u, **options)
        listed = msfs.has_glob(path) or not (len(entries) == 1 and
                                              entries[0].path.rstrip("/") == path.rstrip("/"))
        for entry in entries:
            if entry.uri in seen:
                continue
            seen.add(entry.uri)
            other = format_of(entry.path) if listed and fmt in READS else None
            if other is not None and other not in READS[fmt]:
                foreign.append((entry.uri, other))
                listed_uri = listed_uri or u
                continue
            out.append(entry)
    if foreign:
        shown = ", ".join(f"{u} ({_NAMES.get(f, f)})" for u, f in foreign[:5])
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        base = str(listed_uri).rstrip("/")
        if msfs.has_glob(base):
            base = base.rsplit("/", 1)[0]
        raise PlanError(
            f"read_{fmt}({listed_uri!r}) found files of another format: {shown}{more}. A "
            f"reader reads one format: select the {_NAMES[fmt]} files with a glob (e.g. "
            f"'{base}/{_GLOBS[fmt]}'), name the files, or move the others out")
    return out
