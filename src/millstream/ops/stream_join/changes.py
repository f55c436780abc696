"""Helpers of the regular join for inputs that carry changes (``core.changelog``).

* :func:`phases`: a batch's rows in steps that keep each key's order where it switches
  between adding rows (+I, +U) and taking them back (-U, -D): rows of different keys do
  not interact, so the rows of one step are handled together, the steps one after the
  other.
* :func:`equal_rows` and :func:`claim`: a retraction takes back one stored copy of an
  equal row (all columns equal, nulls equal to nulls and NaN to NaN); several equal
  retractions take distinct copies.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from millstream.core.changelog import is_retraction


def phases(h: np.ndarray, kinds: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The rows (positions, ascending) of each step, as (rows that add, rows that take
    back); ``h`` are the rows' key hashes (equal keys have equal hashes), ``kinds`` their
    change kinds. Step ``i`` of a key holds its rows between its ``i``-th and ``i+1``-th
    switch between adding and taking back."""
    n = len(h)
    back = is_retraction(kinds)
    if not back.any():
        return [(np.arange(n, dtype=np.int64), np.zeros(0, np.int64))]
    if back.all():
        return [(np.zeros(0, np.int64), np.arange(n, dtype=np.int64))]
    order = np.argsort(h, kind="stable")  # by key, in arrival order within a key
    hs, bs = h[order], back[order]
    new_key = np.empty(n, bool)
    new_key[0] = True
    new_key[1:] = hs[1:] != hs[:-1]
    switch = np.zeros(n, bool)
    switch[1:] = bs[1:] != bs[:-1]
    switch &= ~new_key
    c = np.cumsum(switch)
    group = np.cumsum(new_key) - 1
    step = c - c[new_key][group]
    out = []
    for s in range(int(step.max()) + 1):
        rows = order[step == s]
        rows.sort()
        b = back[rows]
        out.append((rows[~b], rows[b]))
    return out


def _column_equal(x: pa.Array, y: pa.Array) -> np.ndarray:
    """Element-wise equality, nulls equal to nulls and NaN to NaN."""
    if not x.type.equals(y.type):
        try:
            common = pa.unify_schemas([pa.schema([("c", x.type)]), pa.schema([("c", y.type)])],
                                      promote_options="permissive").field("c").type
            x, y = x.cast(common), y.cast(common)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            return _python_equal(x, y)
    try:
        eq = pc.fill_null(pc.equal(x, y), False)
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError):
        return _python_equal(x, y)
    out = np.asarray(eq, dtype=bool)
    if x.null_count or y.null_count:
        out |= np.asarray(pc.is_null(x), bool) & np.asarray(pc.is_null(y), bool)
    if pa.types.is_floating(x.type):
        out |= np.asarray(pc.fill_null(pc.is_nan(x), False), bool) & \
            np.asarray(pc.fill_null(pc.is_nan(y), False), bool)
    return out


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    return a == b


def _python_equal(x: pa.Array, y: pa.Array) -> np.ndarray:
    return np.array([_same(a, b) for a, b in zip(x.to_pylist(), y.to_pylist())], bool)


def equal_rows(a: pa.Table, b: pa.Table, columns: list[str]) -> np.ndarray:
    """Whether row ``i`` of ``a`` equals row ``i`` of ``b`` in every column of
    ``columns`` (a column only one of them has makes the rows differ)."""
    n = a.num_rows
    out = np.ones(n, bool)
    for name in columns:
        if name not in a.column_names or name not in b.column_names:
            return np.zeros(n, bool)
        x, y = a.column(name).combine_chunks(), b.column(name).combine_chunks()
        out &= _column_equal(x, y)
        if not out.any():
            break
    return out


def claim(rows: np.ndarray, cands: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Match retractions to distinct stored copies: ``(rows[i], cands[i])`` are the pairs
    of a retraction and a stored row equal to it. Equal retractions have the same
    candidates; the ``k``-th of them (in row order) takes the ``k``-th candidate. Returns
    (retractions that found a copy, the copy each takes)."""
    if not len(rows):
        return rows, cands
    order = np.lexsort((cands, rows))
    rows, cands = rows[order], cands[order]
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    lens = np.diff(np.r_[starts, len(rows)])
    uniq, first = rows[starts], cands[starts]
    # a class of equal retractions shares its candidates, so its first candidate names it
    by_class = np.lexsort((uniq, first))
    cls = first[by_class]
    new = np.r_[True, cls[1:] != cls[:-1]]
    begin = np.flatnonzero(new)
    rank_sorted = np.arange(len(cls)) - begin[np.cumsum(new) - 1]
    rank = np.empty(len(cls), np.int64)
    rank[by_class] = rank_sorted
    ok = rank < lens
    return uniq[ok], cands[starts[ok] + rank[ok]]
