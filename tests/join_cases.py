"""Stream-join test data and pipelines shared by ``test_stream_joins`` and
``test_join_spill``: two inputs of out-of-order rows (some very late), the joins over them,
a changelog of orders and rates, and the ``oracles`` bound to their columns."""

from __future__ import annotations

import random
from typing import Any

import oracles
import pyarrow as pa
from streams import Feed, filled_source

import millstream as ms
from millstream.testing import TestSource

LSCHEMA = pa.schema([("k", pa.string()), ("lt", pa.int64()), ("x", pa.int64())])
RSCHEMA = pa.schema([("k", pa.string()), ("rt", pa.int64()), ("y", pa.int64())])
#: one stream of orders ("O") and rate updates ("R") for join_latest
CSCHEMA = pa.schema([("kind", pa.string()), ("cur", pa.string()), ("amount", pa.int64()),
                     ("rate", pa.int64()), ("ver", pa.int64()), ("gone", pa.bool_()),
                     ("ts", pa.int64())])
ORDER_COLS = ["cur", "amount", "ts"]
RATE_COLS = ["cur", "rate", "ver", "gone"]


def side(seed: int, col: str, ident: str, n_items: int, per_item: int, keys: str = "abcd"):
    """Items of rows with out-of-order and some very late event times (epoch ms; whole
    seconds, so that times often fall exactly on a watermark or an interval bound)."""
    rng = random.Random(seed)
    items, t, n = [], 0, 0
    for _ in range(n_items):
        rows = []
        for _ in range(per_item):
            t += rng.randint(0, 3) * 1000
            jitter = rng.choice([0, 0, 0, rng.randint(0, 8) * 1000, rng.randint(0, 60) * 1000])
            k = rng.choice(keys) if rng.random() > 0.05 else None
            rows.append({"k": k, col: max(0, t - jitter), ident: n})
            n += 1
        items.append(rows)
    return items


LEFT = side(1, "lt", "x", n_items=16, per_item=6)
RIGHT = side(2, "rt", "y", n_items=16, per_item=6)


def sources(f: Feed | None, left: list, right: list, delay_ms: int, lp: int, rp: int
            ) -> tuple[TestSource, TestSource]:
    """The two inputs as test sources: from the feed ``f``, or filled and closed (None)."""
    if f is None:
        return (filled_source(left, lp, LSCHEMA), filled_source(right, rp, RSCHEMA))
    return (f.source(left, LSCHEMA, lp, "L", "lt", delay_ms),
            f.source(right, RSCHEMA, rp, "R", "rt", delay_ms))


def interval(f: Feed | None, how: str, delay: str = "5s", lp: int = 2, rp: int = 3,
             left: list = LEFT, right: list = RIGHT) -> ms.Dataset:
    """LEFT interval-joined with RIGHT on k, r.rt - l.lt in [-4 s, 6 s]."""
    lsrc, rsrc = sources(f, left, right, ms_of(delay), lp, rp)
    return lsrc.dataset().with_watermark("lt", delay).interval_join(
        rsrc.dataset().with_watermark("rt", delay), on="k", between=("-4s", "6s"), how=how)


def window_join(f: Feed | None, window: Any, how: str, delay: str = "4s", lp: int = 2,
                rp: int = 2) -> ms.Dataset:
    """LEFT window-joined with RIGHT on k."""
    lsrc, rsrc = sources(f, LEFT, RIGHT, ms_of(delay), lp, rp)
    return lsrc.dataset().with_watermark("lt", delay).window_join(
        rsrc.dataset().with_watermark("rt", delay), on="k", window=window, how=how)


def ms_of(duration: str) -> int:
    """A duration like "5s" or "10m" in milliseconds."""
    from millstream.core.units import parse_duration

    return parse_duration(duration) // 1000


def interval_oracle(arrivals: list, lower_ms: int, upper_ms: int, how: str):
    """``oracles.interval_join_oracle`` over the LEFT/RIGHT columns."""
    return oracles.interval_join_oracle(arrivals, lower_ms, upper_ms, how, key="k",
                                        left_time="lt", right_time="rt",
                                        left_cols=LSCHEMA.names, right_cols=RSCHEMA.names)


def window_oracle(arrivals: list, size_ms: int, every_ms: int | None, how: str):
    """``oracles.window_join_oracle`` over the LEFT/RIGHT columns."""
    return oracles.window_join_oracle(arrivals, size_ms, every_ms, how, key="k",
                                      left_time="lt", right_time="rt",
                                      left_cols=LSCHEMA.names, right_cols=RSCHEMA.names)


def everything(left: list = LEFT, right: list = RIGHT) -> list:
    """Every row of both inputs with no watermark (batch mode: nothing is late)."""
    return [("L", r, oracles.MIN_WATERMARK) for it in left for r in it] + \
        [("R", r, oracles.MIN_WATERMARK) for it in right for r in it]


def late_rows(job: Any) -> list[dict]:
    """Late rows of both inputs (one side output: each row keeps its own input's columns)."""
    cols = {"left": LSCHEMA.names, "right": RSCHEMA.names}
    return oracles.sorted_rows({c: r[c] for c in cols[r["join_side"]]}
                               for r in job.late_records())


# ----------------------------------------------------------------------------- join_latest


def changelog_items(seed: int, n_items: int = 30, n_keys: int | None = None,
                    per_item: tuple[int, int] = (1, 4), rates: float = 0.4):
    """Items of all orders ("O") or all rate updates ("R"); currencies eur/usd/gbp/None,
    or ``n_keys`` of them (and None)."""
    rng = random.Random(seed)
    curs = ["eur", "usd", "gbp", None] if n_keys is None else \
        [f"c{i:03d}" for i in range(n_keys)] + [None]
    items, n = [], 0
    for i in range(n_items):
        kind = "R" if i < 2 or rng.random() < rates else "O"
        rows = []
        for _ in range(rng.randint(*per_item)):
            rows.append({"kind": kind, "cur": rng.choice(curs), "amount": n,
                         "rate": rng.randint(1, 99), "ver": rng.randint(0, 5),
                         "gone": rng.random() < 0.15, "ts": i * 1000})
            n += 1
        items.append(rows)
    return items


def latest_ds(src: TestSource, how: str, version: str | None = None,
              deleted: str | None = None) -> ms.Dataset:
    """Orders of the changelog joined with the latest rate of their currency."""
    base = src.dataset()
    orders = base.filter(ms.col("kind") == "O").select(*ORDER_COLS)
    rates = base.filter(ms.col("kind") == "R").select(*RATE_COLS)
    return orders.join_latest(rates, on="cur", how=how, version=version, deleted=deleted)


def latest_oracle(items: list, how: str, version: str | None, deleted: str | None,
                  batch: bool) -> list[dict]:
    """What ``latest_ds`` gives: in streaming, an order meets the updates read before it;
    in batch mode (``batch``) every update comes first."""
    events = [("T" if r["kind"] == "R" else "S",
               {c: r[c] for c in (RATE_COLS if r["kind"] == "R" else ORDER_COLS)})
              for rows in items for r in rows]
    if batch:
        events = [e for e in events if e[0] == "T"] + [e for e in events if e[0] == "S"]
    return oracles.latest_join_oracle(events, how, key="cur", table_cols=RATE_COLS,
                                      version=version, deleted=deleted)
