"""How a Parquet scan that feeds a group-by reads: its string keys as Arrow dictionaries
where the row groups store small Parquet dictionaries (the group-by then groups the codes,
``ops/agg_keys``), and in larger batches (the combiner gathers about a million rows before it
groups them anyway; a string column decodes in a third less CPU in 1M-row batches than in
64k-row ones)."""

from __future__ import annotations

from typing import Any

#: Rows of a scan batch for a group-by at most, and the share of the task's memory budget
#: one such batch may take (its decoded size estimated from the file's bytes per row).
AGGREGATE_BATCH_ROWS = 1 << 20
AGGREGATE_BATCH_BUDGET_SHARE = 16
#: Decoded bytes per stored (compressed, encoded) byte, as an estimate.
DECODED_PER_STORED = 4


#: Largest dictionary page (bytes, compressed) of a column chunk read as a dictionary for a
#: grouping on it, absolutely and per row of its row group: every batch carries the chunk's
#: dictionary, so it must be small next to the batch (a few thousand short strings at most);
#: a larger one (or a writer's fallback to plain pages once its dictionary grew too big)
#: costs more than the strings it spares.
SMALL_DICTIONARY_BYTES = 64 << 10
SMALL_DICTIONARY_ROWS_PER_BYTE = 16


def small_dictionary_columns(metadata: Any, row_groups: Any, candidates: Any) -> frozenset[str]:
    """The ``candidates`` (top-level column names) that every given row group stores as a
    small dictionary (``SMALL_DICTIONARY_*``): worth reading as Arrow dictionaries."""
    if not candidates or metadata is None:
        return frozenset()
    names = [metadata.schema.column(j).path for j in range(metadata.num_columns)]
    index = {n: j for j, n in enumerate(names)}
    out = set()
    for name in candidates:
        j = index.get(name)
        if j is None:
            continue
        ok = True
        for g in row_groups:
            rg = metadata.row_group(g)
            c = rg.column(j)
            size = (c.data_page_offset - c.dictionary_page_offset
                    if c.has_dictionary_page and c.dictionary_page_offset is not None else None)
            if size is None or size > SMALL_DICTIONARY_BYTES \
                    or size * SMALL_DICTIONARY_ROWS_PER_BYTE > rg.num_rows:
                ok = False
                break
        if ok:
            out.add(name)
    return frozenset(out)


def dictionary_candidates(source: Any, columns: Any) -> tuple[str, ...]:
    """The ``columns`` a parquet source may read as dictionaries: plain string or binary
    columns it reads, and no filter (filters compare plain strings)."""
    import pyarrow as pa

    if source.predicate is not None or source._filter is not None or source._post_filters \
            or source._exact:
        return ()
    try:
        schema = source.dataset().schema
    except (OSError, ValueError, pa.ArrowException, RuntimeError):
        return ()
    plain = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary)
    return tuple(c for c in columns if schema.get_field_index(c) >= 0
                 and (source.columns is None or c in source.columns)
                 and any(f(schema.field(c).type) for f in plain))


def dictionary_format(schema: Any, columns: Any) -> tuple[Any, Any]:
    """The Parquet format and dataset schema that read ``columns`` as Arrow dictionaries
    (int32 codes) and the other columns as ``schema`` says."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    if not columns:
        return ds.ParquetFileFormat(), schema
    for c in columns:
        i = schema.get_field_index(c)
        schema = schema.set(i, schema.field(i).with_type(
            pa.dictionary(pa.int32(), schema.field(i).type)))
    return ds.ParquetFileFormat(read_options=ds.ParquetReadOptions(
        dictionary_columns=list(columns))), schema


def aggregate_batch_rows(pieces: Any, batch_size: int, memory_budget: int) -> int:
    """Rows per scan batch for a group-by's input: up to ``AGGREGATE_BATCH_ROWS`` while a
    batch's estimated decoded size stays within its share of the memory budget; never fewer
    than the session's ``batch_size``."""
    rows = sum(p.num_rows for p in pieces)
    stored = sum(p.size_bytes for p in pieces)
    per_row = max(1, DECODED_PER_STORED * stored // max(1, rows))
    fit = memory_budget // AGGREGATE_BATCH_BUDGET_SHARE // per_row
    return max(batch_size, min(AGGREGATE_BATCH_ROWS, fit))
