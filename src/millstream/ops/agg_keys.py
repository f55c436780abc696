"""Grouping on dictionary codes: a group-by whose key columns arrive as Arrow dictionaries
(a Parquet scan reads a small-dictionary string key that way for a group-by, see
``ParquetSource.for_aggregation``) groups the int32 codes and maps the groups' codes back to
the values, instead of decoding every row's string and hashing it.

Batches carry dictionaries of their own (one per Parquet page set), so the codes are made
comparable first (Arrow's dictionary unification: the small dictionaries are merged, the
codes remapped). The states this gives are the decoded path's: the same key types, one row
per key (a dictionary that holds a value twice only gives a key twice, which the final step
merges like the states of two batches).
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa

from millstream.core.arrow import normalize_key
from millstream.expr.aggregates import AggSpec


def dictionary_keys(table: pa.Table, keys: list[str], specs: list[AggSpec]) -> list[str]:
    """The key columns of ``table`` to group by their codes: dictionary-typed keys that no
    aggregate reads (an aggregate of a key needs its values), for a table with rows."""
    if table.num_rows == 0:
        return []
    found = [k for k in keys if pa.types.is_dictionary(table.schema.field(k).type)]
    if not found:
        return []
    used: set[str] = set()
    for spec in specs:
        if spec.arg is None:
            continue
        cols = getattr(spec.arg, "columns", None)
        if not callable(cols):
            return []  # an argument whose columns are not known: decode
        used |= cols()
    return [k for k in found if k not in used]


def group_by_codes(table: pa.Table, keys: list[str],
                   group: Callable[[pa.Table], pa.Table]) -> pa.Table:
    """``group(table)`` run with the dictionary columns ``keys`` replaced by their codes
    (one dictionary for all chunks), then those key columns of the result mapped back to
    their (normalized) values."""
    table = table.unify_dictionaries()
    values: dict[str, pa.Array] = {}
    for k in keys:
        i = table.schema.get_field_index(k)
        col = table.column(i)
        values[k] = col.chunk(0).dictionary
        codes = pa.chunked_array([c.indices for c in col.chunks], col.type.index_type)
        table = table.set_column(i, k, codes)
    out = group(table)
    for k in keys:
        i = out.schema.get_field_index(k)
        decoded = normalize_key(values[k].take(out.column(i)))
        out = out.set_column(i, k, decoded)
    return out
