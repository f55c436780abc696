"""Statistics of Parquet files from their footers (no rows read): row counts, min/max, null
counts and distinct-count estimates per column, for the optimizer's estimates."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow.fs as pafs

from millstream.io import fs as msfs
from millstream.io.base import ColumnStatistics, SourceStatistics
from millstream.io.files.parquet_footer import settled_identity

#: Footers read for statistics at most (spread over the files; counts are scaled up).
STATISTICS_FILES = 64
#: Threads reading footers.
PLANNING_THREADS = 16


#: Statistics of local files already read, by the files' identities (``parquet_footer``:
#: path, inode, size, modification and change times) and the schema: every query builds
#: new scans of the same tables, and reading the footers again was a fifth of the
#: optimizer's time (lineitem's 53 row groups x 16 columns). Files changed within the
#: last seconds are read every time (``settled_identity``).
_CACHE: dict[Any, SourceStatistics] = {}
CACHE_SIZE = 256


def footer_statistics(source: Any) -> SourceStatistics:
    """Statistics of a parquet source's files from their footers (row groups' row counts,
    column min/max, null counts and uncompressed sizes); local files that did not change
    since they were read last are not read again."""
    key = _cache_key(source)
    hit = _CACHE.get(key) if key is not None else None
    if hit is not None:
        return hit
    out = _read_statistics(source)
    if key is not None:
        if len(_CACHE) >= CACHE_SIZE:
            _CACHE.clear()
        _CACHE[key] = out
    return out


def _cache_key(source: Any) -> Any:
    """What the statistics of ``source`` depend on, or None when they cannot be cached (a
    remote store, a file changed within the last seconds)."""
    if not isinstance(source._fs(), pafs.LocalFileSystem):
        return None
    dataset = source.dataset()
    paths = list(getattr(dataset, "files", None) or ())
    if not paths:
        return None
    files = []
    for path in paths:
        ident = settled_identity(path)
        if ident is None:
            return None
        files.append((path, ident))
    return tuple(files), dataset.schema


def _read_statistics(source: Any) -> SourceStatistics:
    fragments = list(source.dataset().get_fragments())
    if not fragments:
        return SourceStatistics(0, {})
    step = max(1, math.ceil(len(fragments) / STATISTICS_FILES))
    sample = fragments[::step]
    fs = source._fs()

    def footer(fragment: Any) -> Any:
        def load() -> Any:
            fragment.ensure_complete_metadata()
            return fragment.metadata
        return msfs.call(fs, load, f"reading the footer of {fragment.path}")

    with ThreadPoolExecutor(max_workers=min(PLANNING_THREADS, len(sample))) as ex:
        metas = list(ex.map(footer, sample))
    rows = 0
    acc: dict[str, dict[str, Any]] = {}
    for md in metas:
        rows += md.num_rows
        for i in range(md.num_row_groups):
            rg = md.row_group(i)
            for j in range(rg.num_columns):
                cc = rg.column(j)
                name = cc.path_in_schema
                if "." in name:
                    continue  # a nested field
                a = acc.setdefault(name, {"min": None, "max": None, "nulls": 0, "bytes": 0,
                                          "ok": True, "distinct": None, "groups": 0,
                                          "dict": 0})
                a["bytes"] += cc.total_uncompressed_size
                a["groups"] += 1
                st = cc.statistics
                if a["dict"] is not None:
                    d = _dictionary_values(cc, st)
                    a["dict"] = None if d is None else max(a["dict"], d)
                if st is None or not st.has_min_max:
                    a["ok"] = False
                    continue
                try:
                    a["min"] = st.min if a["min"] is None else min(a["min"], st.min)
                    a["max"] = st.max if a["max"] is None else max(a["max"], st.max)
                except TypeError:
                    a["ok"] = False
                a["nulls"] = None if a["nulls"] is None or st.null_count is None \
                    else a["nulls"] + st.null_count
                if st.has_distinct_count:
                    a["distinct"] = st.distinct_count
    scale = len(fragments) / len(sample)
    columns = {}
    for name, a in acc.items():
        distinct = a["distinct"] if a["groups"] == 1 and scale == 1 else a["dict"]
        columns[name] = ColumnStatistics(
            a["min"] if a["ok"] else None, a["max"] if a["ok"] else None,
            None if a["nulls"] is None else int(a["nulls"] * scale), distinct,
            int(a["bytes"] * scale))
    return SourceStatistics(int(rows * scale), columns)


#: Dictionary pages up to this size (bytes, as stored) tell a string column's distinct
#: count; larger ones may have overflowed into plain pages, or be compressed much.
SMALL_DICTIONARY = 32 << 10


def _dictionary_values(cc: Any, st: Any) -> int | None:
    """About how many values a string column chunk's small dictionary page holds (its
    size over the value size guessed from min/max), or None when that is not known."""
    if cc.physical_type != "BYTE_ARRAY" or not cc.has_dictionary_page:
        return None
    start, data = cc.dictionary_page_offset, cc.data_page_offset
    if start is None or data is None or not 0 < data - start <= SMALL_DICTIONARY:
        return None
    if st is None or not st.has_min_max:
        return None
    try:
        avg = (len(st.min) + len(st.max)) / 2
    except TypeError:
        return None
    return max(1, int((data - start - 16) / (avg + 4)))


