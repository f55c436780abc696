"""Parquet footers of local files, parsed once per process and reused while the file is
unchanged (a worker reads the same files for query after query).

A cached footer is used only while the file's inode, size, modification time and change
time are all as they were, and a footer is cached only when the file was last changed at
least :data:`SETTLED_SECONDS` before it was read: a file rewritten within the
filesystem's timestamp resolution of the read (same size, same second) then has no cached
footer to be mistaken for, and a later rewrite moves the change time (which, unlike the
modification time, no program can set back).
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

#: A file changed more recently than this (seconds) before its footer is read is not cached.
SETTLED_SECONDS = 2.0
#: Footers kept at most (least recently used dropped first).
MAX_FOOTERS = 256

_lock = threading.Lock()
_cache: OrderedDict[str, tuple[tuple[int, ...], Any, pa.Schema]] = OrderedDict()


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def settled_identity(path: str) -> tuple[int, ...] | None:
    """What identifies a local file's present content (device, inode, size, modification
    and change times), or None when it changed within :data:`SETTLED_SECONDS` (or is not
    there): what is derived from a file with an identity may be reused while it stays."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if _now() - max(st.st_mtime_ns, st.st_ctime_ns) <= SETTLED_SECONDS * 1e9:
        return None
    return _identity(st)


def local_footer(path: str) -> tuple[Any, pa.Schema]:
    """The ``FileMetaData`` of a local Parquet file and its Arrow schema (cached; see the
    module docstring). Raises what ``pyarrow.parquet`` raises for a file that is not
    Parquet."""
    st = os.stat(path)
    ident = _identity(st)
    with _lock:
        hit = _cache.get(path)
        if hit is not None and hit[0] == ident:
            _cache.move_to_end(path)
            return hit[1], hit[2]
    metadata = pq.read_metadata(path)
    schema = metadata.schema.to_arrow_schema()
    settled = _now() - max(st.st_mtime_ns, st.st_ctime_ns) > SETTLED_SECONDS * 1e9
    if settled and _identity(os.stat(path)) == ident:
        with _lock:
            _cache[path] = (ident, metadata, schema)
            _cache.move_to_end(path)
            while len(_cache) > MAX_FOOTERS:
                _cache.popitem(last=False)
    return metadata, schema


def _now() -> int:
    return time.time_ns()


def clear() -> None:
    """Forget every cached footer."""
    with _lock:
        _cache.clear()
