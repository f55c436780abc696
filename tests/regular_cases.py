"""Regular joins of two streams, for ``test_regular_joins``: a plain-Python reference of
Flink's semantics (one row at a time), folding a changelog, the data, and a driver that
feeds a :class:`~millstream.ops.stream_join.RegularJoin` operator directly."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
from oracles import MIN_WATERMARK, _pair, norm

from millstream.core.changelog import CHANGE, NAMES, VISIBLE
from millstream.ops.stream_join import JoinKeys, RegularJoin

INSERT, UPDATE_BEFORE, UPDATE_AFTER, DELETE = 0, 1, 2, 3
LCOLS = ["k", "x", "lt"]
RCOLS = ["k", "y", "rt"]
LSCHEMA = pa.schema([("k", pa.string()), ("x", pa.int64()), ("lt", pa.int64())])
RSCHEMA = pa.schema([("k", pa.string()), ("y", pa.int64()), ("rt", pa.int64())])


def outer(how: str, side: int) -> bool:
    return how == "outer" or how == ("left", "right")[side]


class Reference:
    """Flink's regular join (``StreamingJoinOperator``), one row at a time, over rows of
    LCOLS (side 0) and RCOLS (side 1) joined on ``k``: each side's state holds, per key,
    [row, time µs, partners] entries; with ``ttl`` (µs) an entry whose time is below
    ``now - ttl`` is gone. A retraction takes back the oldest equal copy."""

    def __init__(self, how: str, ttl: int | None = None) -> None:
        self.how = how
        self.ttl = ttl
        self.state: list[dict[Any, list[list]]] = [{}, {}]

    def _alive(self, e: list, now: int) -> bool:
        return self.ttl is None or now <= MIN_WATERMARK or e[1] >= now - self.ttl

    def _pair(self, side: int, row: dict | None, other: dict | None) -> dict:
        left, right = (row, other) if side == 0 else (other, row)
        return _pair(left, right, "k", LCOLS, RCOLS)

    def _entries(self, side: int, key: Any, now: int) -> list[list]:
        """The live entries of ``key`` (dropping the expired ones)."""
        held = self.state[side].setdefault(key, [])
        alive = [e for e in held if self._alive(e, now)]
        if len(alive) != len(held):
            held[:] = alive
        return held

    def feed(self, side: int, kind: int, row: dict, t: int, now: int) -> list[tuple[int, dict]]:
        """The changes one input row makes (``t``: its time, ``now``: the watermark or
        processing time it meets)."""
        other = 1 - side
        out: list[tuple[int, dict]] = []
        back = kind in (UPDATE_BEFORE, DELETE)
        inner = self.how == "inner"
        key = row["k"]
        if key is None:
            if outer(self.how, side):
                out.append((DELETE if back else INSERT, self._pair(side, row, None)))
            return out
        matches = self._entries(other, key, now)
        mine = self._entries(side, key, now)
        if not back:
            for e in matches:
                if outer(self.how, other) and e[2] == 0:
                    out.append((DELETE, self._pair(other, e[0], None)))
                e[2] += 1
                out.append((kind if inner else INSERT, self._pair(side, row, e[0])))
            if outer(self.how, side) and not matches:
                out.append((INSERT, self._pair(side, row, None)))
            if self._alive([row, t, 0], now):
                mine.append([row, t, len(matches)])
            return out
        held = next((e for e in mine if e[0] == row), None)
        if held is not None:
            mine.remove(held)
        for e in matches:
            out.append((kind if inner else DELETE, self._pair(side, row, e[0])))
        if outer(self.how, side):
            lonely = held[2] == 0 if held is not None else not matches
            if lonely:
                out.append((DELETE, self._pair(side, row, None)))
        for e in matches:
            if outer(self.how, other):
                before = e[2]
                e[2] = max(0, e[2] - 1)
                if before > 0 and e[2] == 0:
                    out.append((INSERT, self._pair(other, e[0], None)))
        return out


def join_oracle(left: list[dict], right: list[dict], how: str) -> list[dict]:
    """The batch join of the rows on ``k`` (null keys never match)."""
    out, lm, rm = [], set(), set()
    for i, a in enumerate(left):
        for j, b in enumerate(right):
            if a["k"] is not None and a["k"] == b["k"]:
                out.append(_pair(a, b, "k", LCOLS, RCOLS))
                lm.add(i)
                rm.add(j)
    if outer(how, 0):
        out += [_pair(a, None, "k", LCOLS, RCOLS) for i, a in enumerate(left) if i not in lm]
    if outer(how, 1):
        out += [_pair(None, b, "k", LCOLS, RCOLS) for j, b in enumerate(right) if j not in rm]
    return out


# ----------------------------------------------------------------------------- changelogs


def _key(row: dict) -> tuple:
    return tuple(sorted((k, norm(v)) for k, v in row.items()))


def changes(rows: list[dict]) -> list[tuple[int, dict]]:
    """(kind, data row) of output rows whose kind is in the hidden column (an int) or
    the visible one (+I/-U/+U/-D); rows without either are inserts."""
    out = []
    for r in rows:
        r = dict(r)
        kind = r.pop(CHANGE, None)
        if kind is None and VISIBLE in r and r[VISIBLE] in NAMES:
            kind = NAMES.index(r.pop(VISIBLE))
        out.append((INSERT if kind is None else int(kind), r))
    return out


def fold(changed: list[tuple[int, dict]]) -> Counter:
    """The rows a changelog leaves (a multiset); fails when a change takes back a row that
    is not there."""
    held: Counter = Counter()
    for kind, row in changed:
        key = _key(row)
        if kind in (UPDATE_BEFORE, DELETE):
            assert held[key] > 0, f"a retraction of a row that is not there: {row}"
            held[key] -= 1
            if not held[key]:
                del held[key]
        else:
            held[key] += 1
    return held


def bag(rows: list[dict]) -> Counter:
    return Counter(_key(r) for r in rows)


def change_bag(changed: list[tuple[int, dict]]) -> Counter:
    return Counter((k, _key(r)) for k, r in changed)


# ----------------------------------------------------------------------------- data


def changelog_side(seed: int, side: int, n: int, keys: str = "abcd", start: int = 0
                   ) -> list[tuple[int, dict]]:
    """``n`` changes of one side: inserts of new rows (ids from ``start``), updates
    (-U old, +U new: another key or value) and deletes of rows still there."""
    rng = random.Random(seed)
    col, tcol = ("x", "lt") if side == 0 else ("y", "rt")
    live: list[dict] = []
    out: list[tuple[int, dict]] = []
    ident = start
    t = 0
    while len(out) < n:
        t += rng.randint(0, 2) * 1000
        r = rng.random()
        if live and r < 0.25:
            old = live.pop(rng.randrange(len(live)))
            new = {"k": rng.choice(keys + "-"), col: old[col], tcol: t}
            new["k"] = None if new["k"] == "-" else new["k"]
            out += [(UPDATE_BEFORE, old), (UPDATE_AFTER, new)]
            live.append(new)
        elif live and r < 0.4:
            out.append((DELETE, live.pop(rng.randrange(len(live)))))
        else:
            k = rng.choice(keys + "-")
            row = {"k": None if k == "-" else k, col: ident, tcol: t}
            ident += 1
            out.append((INSERT, row))
            live.append(row)
    return out


def visible_items(changed: list[tuple[int, dict]], per_item: int) -> list[list[dict]]:
    """Changes as test-source items of rows with a visible ``change`` column."""
    rows = [{**r, VISIBLE: NAMES[k]} for k, r in changed]
    return [rows[i:i + per_item] for i in range(0, len(rows), per_item)]


def live_rows(changed: list[tuple[int, dict]]) -> list[dict]:
    """The rows a changelog leaves, in order."""
    held: list[dict] = []
    for kind, row in changed:
        if kind in (UPDATE_BEFORE, DELETE):
            held.remove(row)
        else:
            held.append(row)
    return held


# ----------------------------------------------------------------------------- operator driver


def make_op(how: str, **kw: Any) -> RegularJoin:
    from millstream.core.context import default_context

    ctx = kw.pop("ctx", None) or default_context()
    kw.setdefault("input_schemas", (LSCHEMA, RSCHEMA))
    op = RegularJoin(["k"], ["k"], how, **kw)
    op.open(ctx)
    return op


_KEYS = (JoinKeys(["k"], "left"), JoinKeys(["k"], "right"))


def to_batch(side: int, changed: list[tuple[int, dict]]) -> pa.RecordBatch:
    """A batch of one side's changes (kinds in the hidden column), with its join keys."""
    schema = LSCHEMA if side == 0 else RSCHEMA
    rows = [r for _k, r in changed]
    b = pa.RecordBatch.from_pylist(rows, schema=schema)
    b = b.append_column(CHANGE, pa.array(np.array([k for k, _r in changed], np.int8)))
    return next(iter(_KEYS[side].process(b)))


def out_changes(batches: Any) -> list[tuple[int, dict]]:
    return changes([r for b in batches for r in b.to_pylist()])
