"""Output rows of the stream joins: the join types they accept, and how a pair of input
rows (or a row without a partner) becomes one output row."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from millstream.errors import PlanError
from millstream.ops.stream_join.keys import _common_types, _strip

_EMPTY: tuple[pa.RecordBatch, ...] = ()


def _check_how(how: str, allowed: tuple[str, ...], what: str) -> str:
    how = "outer" if how == "full" else how
    if how not in allowed:
        raise PlanError(f"{what}: how={how!r} is not one of {', '.join(allowed)}")
    return how


def _take(table: pa.Table, idx: np.ndarray) -> pa.Table:
    """Rows ``idx`` of ``table``; -1 gives a row of nulls."""
    missing = idx < 0
    if not missing.any():
        return table.take(pa.array(idx, pa.int64()))
    return table.take(pa.array(np.where(missing, 0, idx), pa.int64(), mask=missing))


def assemble_rows(left: pa.Table, li: np.ndarray, right: pa.Table, ri: np.ndarray,
                  left_on: list[str], right_on: list[str], how: str, suffix: str,
                  prefix: list[tuple[str, pa.Array]] | None = None) -> pa.Table:
    """Output rows: ``prefix`` columns, left columns, right columns (-1: nulls).

    Same-named keys appear once (coalesced for right and outer joins); other right
    columns named like a left column get ``suffix``.
    """
    left, right = _strip(left), _strip(right)
    shared = {a for a, b in zip(left_on, right_on) if a == b}
    lt, rt = _take(left, li), _take(right, ri)
    arrays: list[Any] = []
    names: list[str] = []
    for name, arr in prefix or []:
        arrays.append(arr)
        names.append(name)
    coalesce = how in ("right", "outer")
    for name in left.column_names:
        col = lt.column(name)
        if name in shared and coalesce and name in right.column_names:
            other = rt.column(name)
            if not col.type.equals(other.type):
                common = _common_types([col.type], [other.type], [name], [name])[0]
                col, other = col.cast(common), other.cast(common)
            col = pc.coalesce(col, other)
        arrays.append(col)
        names.append(name)
    if coalesce:  # a shared key the left side never showed: the right's values
        for name in left_on:
            if name in shared and name not in left.column_names and name in right.column_names:
                arrays.append(rt.column(name))
                names.append(name)
    left_names = set(names)
    for name in right.column_names:
        if name in shared:
            continue
        arrays.append(rt.column(name))
        names.append(name if name not in left_names else name + suffix)
    return pa.table(arrays, names=names)
