"""Small Nexmark queries that need continuous updates (q4, q6, and a q3 variant), on a tiny
deterministic generator of persons, auctions and bids, against plain-Python oracles.

* q4, the average winning price per category: bids join their auction while it is open
  (an interval join, then a filter on the auction's expiry), the winning price per
  auction (an aggregate whose result rises as bids come), then the average per category
  (an aggregate that takes the first one's retractions);
* q6, the average winning price of each seller's last 10 auctions: the winning price per
  auction, then the 10 latest auctions per seller (``top_n`` over an updating input),
  then the average per seller (taking the top-N's retractions);
* q3 variant, local item suggestions: auctions of category 10 joined with the latest
  profile of their seller (persons change their profile: ``drop_duplicates(keep="last")``
  on the bounded person table), for sellers in OR, ID or CA.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

import pyarrow as pa
import pytest

import millstream as ms
from millstream.testing import CollectingSink, TestSource, crash_and_restore

PERSON = pa.schema([("id", pa.int64()), ("name", pa.string()), ("city", pa.string()),
                    ("state", pa.string()), ("date_time", pa.int64())])
AUCTION = pa.schema([("id", pa.int64()), ("seller", pa.int64()), ("category", pa.int64()),
                     ("date_time", pa.int64()), ("expires", pa.int64())])
BID = pa.schema([("auction", pa.int64()), ("bidder", pa.int64()), ("price", pa.int64()),
                 ("date_time", pa.int64())])
STATES = ["OR", "ID", "CA", "WA", "NY", "AZ"]
#: longest auction (ms): the interval join's upper bound
MAX_OPEN_MS = 20_000


def generate(seed: int, n_events: int = 1500) -> dict[str, list[dict]]:
    """Persons (some update their profile later), auctions and bids in event-time order
    (ms), Nexmark's proportions roughly: 1 person, 3 auctions, 46 bids in 50 events."""
    rng = random.Random(seed)
    people: list[dict] = []
    auctions: list[dict] = []
    bids: list[dict] = []
    t = 1_000_000
    for i in range(n_events):
        t += rng.randint(1, 40)
        kind = i % 50
        if kind == 0 or not people:
            pid = 1000 + len(people)
            people.append({"id": pid, "name": f"p{pid}", "city": f"c{rng.randrange(9)}",
                           "state": rng.choice(STATES), "date_time": t})
            if rng.random() < 0.3:  # a profile update of an earlier person
                old = rng.choice(people)
                people.append({**old, "city": f"c{rng.randrange(9)}",
                               "state": rng.choice(STATES), "date_time": t})
        elif kind in (1, 2, 3) or not auctions:
            aid = len(auctions) + 1
            auctions.append({"id": aid, "seller": rng.choice(people)["id"],
                             "category": rng.choice([10, 10, 11, 12, 13]), "date_time": t,
                             "expires": t + rng.randint(1_000, MAX_OPEN_MS) * 10 + aid % 10})
        else:
            open_now = [a for a in auctions[-40:] if a["expires"] >= t] or auctions[-1:]
            a = rng.choice(open_now)
            if rng.random() < 0.05:  # a bid after the auction closed: it does not count
                a = rng.choice(auctions)
            bids.append({"auction": a["id"], "bidder": rng.choice(people)["id"],
                         "price": rng.randint(1, 10_000), "date_time": t})
    return {"person": people, "auction": auctions, "bid": bids}


def _stream(rows: list[dict], schema: pa.Schema, partitions: int = 2, chunk: int = 40,
            ) -> TestSource:
    """A stream of ``rows`` (in time order) in items of ``chunk`` rows, each partition
    in time order, with a watermark after each item."""
    src = TestSource(schema=schema, partitions=partitions)
    for n, i in enumerate(range(0, len(rows), chunk)):
        part = rows[i:i + chunk]
        src.add(part, partition=n % partitions)
    src.close()
    return src


def _canon(rows: Any) -> list[str]:
    return sorted(repr(sorted((k, round(v, 6) if isinstance(v, float) else v)
                              for k, v in r.items())) for r in rows)


# ----------------------------------------------------------------------------- oracles


def winning_prices(ev: dict[str, list[dict]]) -> dict[int, int]:
    """Auction id -> its highest bid placed while it was open."""
    auctions = {a["id"]: a for a in ev["auction"]}
    best: dict[int, int] = {}
    for b in ev["bid"]:
        a = auctions[b["auction"]]
        if a["date_time"] <= b["date_time"] <= a["expires"]:
            best[a["id"]] = max(best.get(a["id"], 0), b["price"])
    return best


def q4_oracle(ev: dict[str, list[dict]]) -> list[dict]:
    per: dict[int, list[int]] = defaultdict(list)
    auctions = {a["id"]: a for a in ev["auction"]}
    for aid, price in winning_prices(ev).items():
        per[auctions[aid]["category"]].append(price)
    return [{"category": c, "avg_price": sum(ps) / len(ps)} for c, ps in per.items()]


def q6_oracle(ev: dict[str, list[dict]]) -> list[dict]:
    auctions = {a["id"]: a for a in ev["auction"]}
    per: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for aid, price in winning_prices(ev).items():
        per[auctions[aid]["seller"]].append((auctions[aid]["expires"], price))
    out = []
    for seller, closed in per.items():
        last = sorted(closed, reverse=True)[:10]
        out.append({"seller": seller, "avg_price": sum(p for _e, p in last) / len(last)})
    return out


def q3_oracle(ev: dict[str, list[dict]]) -> list[dict]:
    latest = {}
    for p in ev["person"]:
        latest[p["id"]] = p
    out = []
    for a in ev["auction"]:
        p = latest[a["seller"]]
        if a["category"] == 10 and p["state"] in ("OR", "ID", "CA"):
            out.append({"id": a["id"], "name": p["name"], "city": p["city"],
                        "state": p["state"]})
    return out


# ----------------------------------------------------------------------------- queries


def _winning(ev: dict[str, list[dict]], partitions: int = 2) -> ms.Dataset:
    """Bids joined with their auction while it is open; the highest per auction."""
    auctions = _stream(ev["auction"], AUCTION, partitions, chunk=3).dataset() \
        .with_watermark("date_time", "0s")
    bids = _stream(ev["bid"], BID, partitions).dataset().with_watermark("date_time", "0s")
    joined = auctions.interval_join(bids, left_on="id", right_on="auction",
                                    between=(0, MAX_OPEN_MS * 1000 * 10 + 10_000))
    return (joined.filter(ms.col("date_time_right") <= ms.col("expires"))
            .group_by("id", "category", "seller", "expires")
            .agg(ms.max("price").alias("final")))


def q4(ev: dict[str, list[dict]]) -> ms.Dataset:
    return _winning(ev).group_by("category").agg(ms.mean("final").alias("avg_price"))


def q6(ev: dict[str, list[dict]]) -> ms.Dataset:
    return (_winning(ev).top_n(10, by="expires", per="seller", descending=True)
            .group_by("seller").agg(ms.mean("final").alias("avg_price")))


def q3(ev: dict[str, list[dict]]) -> ms.Dataset:
    people = ms.from_items(ev["person"]).drop_duplicates("id", keep="last") \
        .filter(ms.col("state").is_in(["OR", "ID", "CA"]))
    auctions = _stream(ev["auction"], AUCTION).dataset().filter(ms.col("category") == 10)
    return (auctions.join(people, left_on="seller", right_on="id", suffix="_p")
            .select("id", "name", "city", "state"))


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("executor", ["inline", "parallel"])
def test_q4_average_winning_price_per_category(executor):
    ev = generate(1)
    want = q4_oracle(ev)
    assert len(want) == 4
    job = q4(ev).start(checkpoint_interval=0 if executor == "inline" else "50ms",
                       executor=executor, parallelism=2)
    assert job.await_termination(120)
    assert not job.late_records()
    assert _canon(job.sink.final_rows(["category"])) == _canon(want)
    assert _canon(job.sink.final_rows()) == _canon(want)  # the retractions are consistent
    assert any(r["change"] == "-U" for r in job.sink.rows())
    assert _canon(q4(ev).collect()) == _canon(want)  # batch: the same plan


@pytest.mark.parametrize("executor", ["inline", "parallel"])
def test_q6_average_price_of_each_sellers_last_ten_auctions(executor):
    ev = generate(2, n_events=2500)
    want = q6_oracle(ev)
    assert any(len([a for a in ev["auction"] if a["seller"] == r["seller"]]) > 10
               for r in want), "some seller should have more than 10 auctions"
    job = q6(ev).start(checkpoint_interval=0 if executor == "inline" else "50ms",
                       executor=executor, parallelism=2)
    assert job.await_termination(120)
    assert _canon(job.sink.final_rows(["seller"])) == _canon(want)
    assert _canon(job.sink.final_rows()) == _canon(want)
    assert _canon(q6(ev).collect()) == _canon(want)


def test_q6_survives_a_crash_and_a_restore(tmp_path):
    ev = generate(3, n_events=2000)
    sink = CollectingSink()
    job = crash_and_restore(q6(ev), checkpoint=str(tmp_path / "chk"), sink=sink,
                            crash_epoch=12, point="after_checkpoint", checkpoint_interval=0,
                            parallelism=2)
    assert job.metrics()["restored_from_epoch"] is not None
    assert _canon(sink.final_rows(["seller"])) == _canon(q6_oracle(ev))


def test_q3_local_item_suggestions_with_the_latest_seller_profiles():
    ev = generate(4)
    want = q3_oracle(ev)
    assert want
    job = q3(ev).start(checkpoint_interval=0, executor="inline")
    assert job.await_termination(60)
    assert _canon(job.sink.rows()) == _canon(want)
    assert _canon(q3(ev).collect()) == _canon(want)
