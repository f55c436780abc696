"""Plain-Python oracles the tests check the engine against, and a DuckDB comparison.

One module for every test file (no copies, no test module importing another):

* rows: a comparable form of results (floats rounded, times as µs) and order-insensitive
  comparison, nulls included;
* DuckDB: the same query on DuckDB over the same Arrow data, compared with a result;
* aggregates: the window aggregates of a list of values with SQL's null rules, group-by;
* batch joins and sorts: equi-joins of every kind, stable multi-key sorts;
* windows: window assignment, tumbling/sliding and session windows fed step by step
  (rows and watermarks) with allowed lateness and late rows;
* streaming schedules: which watermark a streaming job holds when it reads each row, for
  the inline executor's rounds and for a paced feed on the parallel executor
  (``tests/streams.py``);
* stream joins: interval, window and latest-value joins over such arrivals.

Times: event times in rows are epoch milliseconds (ints); watermarks and window bounds are
microseconds, as in the engine.
"""

from __future__ import annotations

import datetime as dt
import decimal
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import pyarrow as pa

import millstream as ms
from millstream.core.time import MAX_WATERMARK, MIN_WATERMARK

_EPOCH = dt.datetime(1970, 1, 1)
_EPOCH_UTC = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)

# ============================================================================ rows


def micros(value: Any) -> Any:
    """A datetime as int µs since the epoch (naive ones are UTC); anything else as it is."""
    if isinstance(value, dt.datetime):
        epoch = _EPOCH if value.tzinfo is None else _EPOCH_UTC
        return (value - epoch) // dt.timedelta(microseconds=1)
    return value


def norm(v: Any) -> Any:
    """A comparable, hashable form of a value (floats and decimals rounded to 9 digits;
    lists and dicts recursed)."""
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, decimal.Decimal):
        v = float(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        return float(f"{v:.9g}")
    if isinstance(v, (list, tuple)):
        return tuple(norm(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, norm(x)) for k, x in v.items()))
    return v


def bag(rows: Iterable[dict]) -> list:
    """Rows as a sorted list of normalized tuples (an order-insensitive form)."""
    return sorted((norm(r) for r in rows), key=repr)


def same_rows(got: list[dict], want: list[dict]) -> None:
    """``got`` and ``want`` hold the same rows (column names, values, multiplicity), in any order."""
    assert len(got) == len(want), f"{len(got)} rows, expected {len(want)}"
    g, w = bag(got), bag(want)
    if g != w:
        diff = [(a, b) for a, b in zip(g, w) if a != b][:3]
        raise AssertionError(f"rows differ, first differences (got, want): {diff}")


def ordered(got: list[dict], want: list[dict], cols: list[str]) -> None:
    """``got`` and ``want`` have the same ``cols`` values in the same row order."""
    g = [tuple(norm(r[c]) for c in cols) for r in got]
    w = [tuple(norm(r[c]) for c in cols) for r in want]
    assert len(g) == len(w), f"{len(g)} rows, expected {len(w)}"
    if g != w:
        i = next(i for i, (a, b) in enumerate(zip(g, w)) if a != b)
        raise AssertionError(f"order differs at row {i}: got {g[max(0, i - 2):i + 3]}, "
                             f"want {w[max(0, i - 2):i + 3]}")


def row_key(row: dict) -> tuple:
    """A total-order key for a row of any types (values compared as strings)."""
    return tuple(sorted((k, str(v)) for k, v in row.items()))


def sorted_rows(rows: Iterable[dict]) -> list[dict]:
    """Rows with datetimes as µs, in a canonical order (compare two results with ==)."""
    return sorted(({k: micros(v) for k, v in r.items()} for r in rows), key=row_key)


# ============================================================================ DuckDB


_duckdb: Any = None


def duckdb_connect() -> Any:
    """A fresh connection to this test process's one in-memory DuckDB database (a cursor:
    its own registered tables and temporary views). Opening a database costs 40-140 ms,
    a cursor next to nothing: the oracle's cost, not the engine's, in a test of many
    small queries."""
    global _duckdb
    if _duckdb is None:
        import duckdb

        _duckdb = duckdb.connect()
    return _duckdb.cursor()


def duckdb_rows(query: str, **tables: pa.Table) -> list[dict]:
    """Run ``query`` on DuckDB over the Arrow ``tables`` (by name); the rows as dicts."""
    con = duckdb_connect()
    try:
        for name, t in tables.items():
            con.register(name, t)
        cur = con.execute(query)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]
    finally:
        con.close()


def assert_same_as_duckdb(got: pa.Table | list[dict], query: str, *, ordered_by_query: bool = False,
                          exact: bool = False, **tables: pa.Table) -> int:
    """``got`` (rows or a table) equals ``query`` run on DuckDB over the same ``tables``:
    the same columns and rows, nulls included, in any order unless ``ordered_by_query``
    (then in the query's ORDER BY order). Floats are compared to 9 digits; with ``exact``
    the comparison runs inside DuckDB (``EXCEPT ALL`` both ways: exact values, fast for
    large results; ``got`` must then be a table). Returns the number of rows."""
    if exact:
        assert isinstance(got, pa.Table) and not ordered_by_query
        con = duckdb_connect()
        try:
            for name, t in tables.items():
                con.register(name, t)
            con.register("__got", got)
            for a, b in ((query, "SELECT * FROM __got"), ("SELECT * FROM __got", query)):
                extra = con.sql(f"SELECT count(*) FROM (({a}) EXCEPT ALL ({b}))").fetchall()
                assert extra == [(0,)], f"{extra[0][0]} row(s) of ({a}) are not in ({b})"
            want = con.sql(f"SELECT count(*) FROM ({query})").fetchall()[0][0]
            assert want == got.num_rows, (got.num_rows, want)
            return want
        finally:
            con.close()
    rows = got.to_pylist() if isinstance(got, pa.Table) else list(got)
    want = duckdb_rows(query, **tables)
    if ordered_by_query:
        cols = list(want[0]) if want else []
        if rows:
            assert sorted(rows[0]) == sorted(cols), (list(rows[0]), cols)
        ordered(rows, want, cols)
    else:
        same_rows(rows, want)
    return len(want)


# ============================================================================ aggregates


#: The names :func:`all_aggs` gives its aggregates (and :func:`agg_oracle` computes).
AGG_NAMES = ["s", "c", "n", "m", "lo", "hi", "d", "f", "l"]


def all_aggs(column: str = "v") -> list:
    """One of every kind of aggregate over ``column``, named as :data:`AGG_NAMES`."""
    return [ms.sum(column).alias("s"), ms.count(column).alias("c"), ms.count().alias("n"),
            ms.mean(column).alias("m"), ms.min(column).alias("lo"), ms.max(column).alias("hi"),
            ms.count_distinct(column).alias("d"), ms.first(column).alias("f"),
            ms.collect_list(column).alias("l")]


def agg_oracle(vals: list, sort_list: bool = True) -> dict:
    """The aggregates of :func:`all_aggs` over ``vals`` in arrival order (nulls skipped
    except by ``n``; ``f`` is the first non-null); ``l`` sorted unless ``sort_list``
    is False (arrival order)."""
    nn = [v for v in vals if v is not None]
    return {"s": sum(nn) if nn else None, "c": len(nn), "n": len(vals),
            "m": sum(nn) / len(nn) if nn else None, "lo": min(nn) if nn else None,
            "hi": max(nn) if nn else None, "d": len(set(nn)), "f": nn[0] if nn else None,
            "l": sorted(nn) if sort_list else nn}


def group_rows(rows: Iterable[dict], *keys: str) -> dict[tuple, list[dict]]:
    """Rows by the tuple of their ``keys`` values (None is a key like any other)."""
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


# ============================================================================ batch joins, sorts


def equi_join(left: list[dict], right: list[dict], left_cols: list[str], right_cols: list[str],
              how: str, on: str = "k", suffix: str = "_right") -> tuple[list[dict], list[str]]:
    """``left`` joined with ``right`` on equal, non-null ``on``: inner, left, right, outer,
    semi, anti; right columns named as left ones get ``suffix``. Returns the rows and the
    output column order."""
    matches = {i: [j for j, r in enumerate(right) if lr[on] is not None and r[on] == lr[on]]
               for i, lr in enumerate(left)}
    if how == "semi":
        return [dict(lr) for i, lr in enumerate(left) if matches[i]], list(left_cols)
    if how == "anti":
        return [dict(lr) for i, lr in enumerate(left) if not matches[i]], list(left_cols)
    rnames = [(c, c + suffix if c in left_cols else c) for c in right_cols if c != on]
    out_cols = list(left_cols) + [n for _, n in rnames]
    out = []
    used = set()
    for i, lr in enumerate(left):
        if matches[i]:
            for j in matches[i]:
                used.add(j)
                out.append({**lr, **{n: right[j][c] for c, n in rnames}})
        elif how in ("left", "outer"):
            out.append({**lr, **{n: None for _, n in rnames}})
    if how in ("right", "outer"):
        for j, r in enumerate(right):
            if j not in used:
                row = {c: None for c in left_cols}
                row[on] = r[on]
                row.update({n: r[c] for c, n in rnames})
                out.append(row)
    return out, out_cols


def sort_rows(rows: list[dict], by: list[str], desc: list[bool],
              nulls_last: bool | None = None) -> list[dict]:
    """A stable sort by several keys; nulls last when descending unless ``nulls_last`` says."""
    out = list(rows)
    for c, d in reversed(list(zip(by, desc))):  # stable sorts, least significant key first
        last = d if nulls_last is None else nulls_last
        nulls = [r for r in out if r[c] is None]
        # (reverse=True keeps equal elements in order: the sort stays stable)
        vals = sorted((r for r in out if r[c] is not None), key=lambda r: r[c], reverse=d)
        out = vals + nulls if last else nulls + vals
    return out


# ============================================================================ windows


def tumbling_windows(size_us: int, offset_us: int = 0) -> Callable[[int], list[tuple[int, int]]]:
    """The tumbling window (start, end) of a time, all in µs."""
    def f(t_us: int) -> list[tuple[int, int]]:
        s = (t_us - offset_us) // size_us * size_us + offset_us
        return [(s, s + size_us)]
    return f


def sliding_windows(size_us: int, every_us: int) -> Callable[[int], list[tuple[int, int]]]:
    """The sliding windows (start, end) holding a time, newest first, all in µs."""
    def f(t_us: int) -> list[tuple[int, int]]:
        s = t_us // every_us * every_us
        out = []
        while s + size_us > t_us:
            out.append((s, s + size_us))
            s -= every_us
        return out
    return f


def oracle_fixed(script, windows_of, lateness_us: int, sort_list: bool = True):
    """Fixed windows (tumbling, sliding) fed one event at a time: ``script`` of
    ("b", [(key, t_ms, value)]) and ("w", watermark_us) steps. An event counts in its
    windows whose end + lateness is after the watermark; with none, it is late. Returns
    ({(key, start_us, end_us): aggregates}, [late events])."""
    wm = MIN_WATERMARK
    contents: dict[tuple, list] = {}
    late = []
    for kind, arg in script:
        if kind == "w":
            wm = max(wm, arg)
            continue
        for k, t, v in arg:
            alive = [w for w in windows_of(t * 1000) if w[1] + lateness_us > wm]
            if not alive:
                late.append((k, t, v))
            for ws, we in alive:
                contents.setdefault((k, ws, we), []).append(v)
    return {key: agg_oracle(vals, sort_list) for key, vals in contents.items()}, late


def oracle_sessions(script, gap_us: int, lateness_us: int):
    """Session windows fed one event at a time (``script`` as :func:`oracle_fixed`):
    sessions that strictly overlap merge; a session closes once the watermark passes its
    end + lateness; an event overlapping no live session whose own session would already
    be closed is late. Returns ({(key, start_us, end_us): aggregates}, [late events])."""
    wm = MIN_WATERMARK
    live: dict = {}  # key -> list of [start, end, values]
    closed = []
    late = []
    for kind, arg in script:
        if kind == "w":
            wm = max(wm, arg)
            for k, sessions in live.items():
                for s in [s for s in sessions if s[1] + lateness_us <= wm]:
                    sessions.remove(s)
                    closed.append((k, s))
            continue
        for k, t, v in arg:
            lo, hi = t * 1000, t * 1000 + gap_us
            sessions = live.setdefault(k, [])
            hit = [s for s in sessions if s[0] < hi and lo < s[1]]
            if not hit and hi + lateness_us <= wm:
                late.append((k, t, v))
                continue
            merged = [min([lo] + [s[0] for s in hit]), max([hi] + [s[1] for s in hit]),
                      [x for s in hit for x in s[2]] + [v]]
            for s in hit:
                sessions.remove(s)
            sessions.append(merged)
    for k, sessions in live.items():
        closed += [(k, s) for s in sessions]
    return {(k, s[0], s[1]): agg_oracle(s[2]) for k, s in closed}, late


def arrivals_script(arrivals: Iterable[tuple[Any, dict, int]], key: str, time: str,
                    value: str) -> list[tuple[str, Any]]:
    """Arrivals (see :func:`arrivals`) as an :func:`oracle_fixed` script: before each row,
    the watermark it met."""
    script: list[tuple[str, Any]] = []
    for _source, row, w in arrivals:
        script.append(("w", w))
        script.append(("b", [(row[key], row[time], row[value])]))
    return script


# ============================================================================ streaming schedules

#: A source partition's items for :func:`arrivals`: (source name, time column or None,
#: watermark delay in ms or None, [items]); an item is (rows, explicit watermark µs or None).
Part = tuple[Any, Any, Any, Sequence[tuple[list[dict], Any]]]


def schedule_steps(parts: Sequence[Part], schedule: str = "rounds") -> Iterator[tuple]:
    """The order in which a streaming job reads the items of ``parts`` and its watermark
    (the minimum over partitions, never going back) moves: ("item", part index, rows,
    round) and ("wm", watermark µs, round) steps.

    A partition's watermark is the largest explicit watermark it read, or its largest event
    time minus the delay, whichever is larger.

    * ``"rounds"`` (the inline executor, sources filled and closed before the start): round
      r reads item r of every partition of every source, then the watermark moves; a
      partition with no item left has ended (+infinity) from the round after its last.
    * ``"sequential"`` (a paced feed on the parallel executor, ``tests/streams.py``): the
      items one at a time, in the same round-robin order, the watermark moving after each;
      no partition ends before the feed closes the sources (after the last item).
    """
    if schedule not in ("rounds", "sequential"):
        raise ValueError(f"schedule must be 'rounds' or 'sequential', not {schedule!r}")
    marks = [MIN_WATERMARK] * len(parts)
    w = MIN_WATERMARK
    rounds = max((len(p[3]) for p in parts), default=0)
    for r in range(rounds):
        for i, (_name, time_col, delay_ms, items) in enumerate(parts):
            if r >= len(items):
                continue
            rows, explicit = items[r]
            yield ("item", i, rows, r)
            if explicit is not None:
                marks[i] = max(marks[i], explicit)
            if time_col is not None and delay_ms is not None:
                for row in rows:
                    if row[time_col] is not None:
                        marks[i] = max(marks[i], (row[time_col] - delay_ms) * 1000)
            if schedule == "sequential" and min(marks) > w:
                w = min(marks)
                yield ("wm", w, r)
        if schedule == "rounds":
            ended = [MAX_WATERMARK if r >= len(p[3]) else m for p, m in zip(parts, marks)]
            if min(ended) > w:
                w = min(ended)
                yield ("wm", w, r)


def arrivals(parts: Sequence[Part], schedule: str = "rounds") -> list[tuple[Any, dict, int]]:
    """Every row a streaming job reads, with the watermark (µs) in effect downstream when it
    is processed: [(source name, row, watermark)]; see :func:`schedule_steps`."""
    w, out = MIN_WATERMARK, []
    for step in schedule_steps(parts, schedule):
        if step[0] == "wm":
            w = step[1]
        else:
            out += [(parts[step[1]][0], row, w) for row in step[2]]
    return out


# ============================================================================ stream joins


def _pair(left: dict | None, right: dict | None, key: str, left_cols: Sequence[str],
          right_cols: Sequence[str]) -> dict:
    """An output row of on=key: the key once (coalesced), the other left and right columns."""
    left = left or dict.fromkeys(left_cols)
    right = right or dict.fromkeys(right_cols)
    out = {key: left[key] if left[key] is not None else right[key]}
    out.update({c: left[c] for c in left_cols if c != key})
    out.update({c: right[c] for c in right_cols if c != key})
    return out


def interval_join_oracle(arrivals_: Iterable[tuple[str, dict, int]], lower_ms: int, upper_ms: int,
                         how: str, *, key: str, left_time: str, right_time: str,
                         left_cols: Sequence[str], right_cols: Sequence[str]):
    """An interval join over arrivals of sides "L" and "R" (:func:`arrivals`): rows whose
    time is before the watermark they met are late (the side output); the others join when
    keys are equal (not null) and l.t + lower <= r.t <= l.t + upper; outer joins add the
    unmatched rows. Returns (rows, late rows)."""
    arr = list(arrivals_)
    left = [r for s, r, w in arr if s == "L" and r[left_time] * 1000 >= w]
    right = [r for s, r, w in arr if s == "R" and r[right_time] * 1000 >= w]
    late = [r for s, r, w in arr if r[left_time if s == "L" else right_time] * 1000 < w]
    out, lm, rm = [], set(), set()
    for i, a in enumerate(left):
        for j, b in enumerate(right):
            if a[key] is not None and a[key] == b[key] and \
                    a[left_time] + lower_ms <= b[right_time] <= a[left_time] + upper_ms:
                out.append(_pair(a, b, key, left_cols, right_cols))
                lm.add(i)
                rm.add(j)
    if how in ("left", "outer"):
        out += [_pair(a, None, key, left_cols, right_cols)
                for i, a in enumerate(left) if i not in lm]
    if how in ("right", "outer"):
        out += [_pair(None, b, key, left_cols, right_cols)
                for j, b in enumerate(right) if j not in rm]
    return out, late


def window_join_oracle(arrivals_: Iterable[tuple[str, dict, int]], size_ms: int,
                       every_ms: int | None, how: str, *, key: str, left_time: str,
                       right_time: str, left_cols: Sequence[str], right_cols: Sequence[str]):
    """A tumbling (``every_ms`` None) or sliding window join over arrivals of sides "L" and
    "R": each row lands in its windows whose end is after the watermark it met (a row with
    none is late); rows of one key and window join when the window closes; outer joins add
    the unmatched ones. Returns (rows with window_start/window_end in µs, late rows)."""
    windows_of = tumbling_windows(size_ms * 1000) if every_ms is None else \
        sliding_windows(size_ms * 1000, every_ms * 1000)
    entries: dict[str, list] = {"L": [], "R": []}  # (window, arrival number, row)
    late = []
    for i, (side, row, w) in enumerate(arrivals_):
        t = row[left_time if side == "L" else right_time]
        alive = [win for win in windows_of(t * 1000) if win[1] > w]
        if not alive:
            late.append(row)
        entries[side] += [(win, i, row) for win in alive]
    out, lm, rm = [], set(), set()

    def with_window(win, row):
        return {"window_start": win[0], "window_end": win[1], **row}

    for wl, i, a in entries["L"]:
        for wr, j, b in entries["R"]:
            if wl == wr and a[key] is not None and a[key] == b[key]:
                out.append(with_window(wl, _pair(a, b, key, left_cols, right_cols)))
                lm.add((wl, i))
                rm.add((wr, j))
    if how in ("left", "outer"):
        out += [with_window(w, _pair(a, None, key, left_cols, right_cols))
                for w, i, a in entries["L"] if (w, i) not in lm]
    if how in ("right", "outer"):
        out += [with_window(w, _pair(None, b, key, left_cols, right_cols))
                for w, j, b in entries["R"] if (w, j) not in rm]
    return out, late


def latest_join_oracle(events: Iterable[tuple[str, dict]], how: str, *, key: str,
                       table_cols: Sequence[str], version: str | None = None,
                       deleted: str | None = None) -> list[dict]:
    """``join_latest`` over events in arrival order: ("T", row) updates the table (the
    newest row per non-null key; with ``version``, not by an older version), ("S", row) is
    a stream row that meets the table as it is then (a row flagged ``deleted`` counts as
    absent; ``how="left"`` keeps unmatched rows with nulls)."""
    table: dict = {}
    out = []
    for kind, r in events:
        if kind == "T":
            if r[key] is None:
                continue
            held = table.get(r[key])
            if version is not None and held is not None and r[version] < held[version]:
                continue
            table[r[key]] = r
            continue
        hit = table.get(r[key]) if r[key] is not None else None
        if hit is not None and deleted is not None and hit[deleted]:
            hit = None
        if hit is not None:
            out.append({**r, **{c: hit[c] for c in table_cols if c != key}})
        elif how == "left":
            out.append({**r, **{c: None for c in table_cols if c != key}})
    return out
