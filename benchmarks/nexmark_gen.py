"""Nexmark events as Arrow record batches, with the Beam/Flink generator's semantics.

The Nexmark benchmark models an online auction: people register (``person``), open
auctions (``auction``) and bid on them (``bid``). This module makes those events the way
Beam's and Flink's ``NexmarkGenerator`` do, vectorized with numpy:

* event numbers 0, 1, 2, ... are split 1:3:46 (person, auction, bid) by ``n % 50``;
* ids follow the generator's formulas: person ids from 1000 (``n // 50``), auction ids
  from 1000; auctions' sellers and bids' bidders are "hot" (a few ids, 3 times in 4) or
  one of the last 1000 active people (up to 10 ids ahead), bids' auctions are hot (one
  time in 2) or one of the last 100 auctions in flight (up to 10 ids ahead);
* prices are ``round(10 ** (6 u) * 100)`` cents, categories 10..14, an auction stays open
  for up to twice the time 100 auctions take to be made, ``extra`` pads an event to the
  average size of its kind (person 200, auction 500, bid 100 bytes);
* event time: event ``n`` happens at ``base + n / event_rate`` (ms); with
  ``out_of_order = G > 1`` the event numbers inside each group of ``G`` are permuted
  (``n * 953 mod G``, Beam's ``outOfOrderGroupSize``), so event time goes back by up to
  ``(G - 1) / event_rate``.

Unlike Beam (``java.util.Random`` seeded by the event id) every random draw is a
counter-based hash of (seed, event number, draw), so any batch can be made on its own,
in any process, and the whole stream is deterministic from ``seed``. Batch ``i`` holds
the events numbered ``[i * batch_size, (i + 1) * batch_size)``; ``batch(kind, i)`` makes
the events of one kind among them. Only numpy and pyarrow are needed.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PERSON, AUCTION, BID = "person", "auction", "bid"
KINDS = (PERSON, AUCTION, BID)
PERSON_PROPORTION, AUCTION_PROPORTION, BID_PROPORTION = 1, 3, 46
TOTAL_PROPORTION = PERSON_PROPORTION + AUCTION_PROPORTION + BID_PROPORTION
FIRST_PERSON_ID = 1000
FIRST_AUCTION_ID = 1000
FIRST_CATEGORY_ID = 10
NUM_CATEGORIES = 5
NUM_ACTIVE_PEOPLE = 1000
NUM_IN_FLIGHT_AUCTIONS = 100
PERSON_ID_LEAD = 10
AUCTION_ID_LEAD = 10
HOT_AUCTION_RATIO = HOT_SELLER_RATIO = HOT_BIDDER_RATIO = 100
HOT_AUCTIONS_ONE_IN, HOT_SELLERS_ONE_IN, HOT_BIDDERS_ONE_IN = 2, 4, 4
AVG_SIZE = {PERSON: 200, AUCTION: 500, BID: 100}
#: bytes of an event's fields other than ``extra`` (Beam's sizeInBytes, typical lengths)
BASE_SIZE = {PERSON: 80, AUCTION: 175, BID: 33}
OUT_OF_ORDER_PRIME = 953
US_STATES = ["AZ", "CA", "ID", "OR", "WA", "WY"]
US_CITIES = ["Phoenix", "Los Angeles", "San Francisco", "Boise", "Portland", "Bend",
             "Redmond", "Seattle", "Kent", "Cheyenne"]
FIRST_NAMES = ["Peter", "Paul", "Luke", "John", "Saul", "Vicky", "Kate", "Julie", "Sarah",
               "Deiter", "Walter"]
LAST_NAMES = ["Shultz", "Abrams", "Spencer", "White", "Bartels", "Walton", "Smith", "Jones",
              "Noris"]
HOT_CHANNELS = ["Google", "Facebook", "Baidu", "Apple"]
CHANNELS_NUMBER = 10_000
#: 2026-01-01T00:00:00Z in epoch ms: event times start here
DEFAULT_BASE_TIME_MS = 1_767_225_600_000

PERSON_SCHEMA = pa.schema([
    ("id", pa.int64()), ("name", pa.string()), ("email_address", pa.string()),
    ("credit_card", pa.string()), ("city", pa.string()), ("state", pa.string()),
    ("date_time", pa.int64()), ("extra", pa.string())])
AUCTION_SCHEMA = pa.schema([
    ("id", pa.int64()), ("item_name", pa.string()), ("description", pa.string()),
    ("initial_bid", pa.int64()), ("reserve", pa.int64()), ("date_time", pa.int64()),
    ("expires", pa.int64()), ("seller", pa.int64()), ("category", pa.int64()),
    ("extra", pa.string())])
BID_SCHEMA = pa.schema([
    ("auction", pa.int64()), ("bidder", pa.int64()), ("price", pa.int64()),
    ("channel", pa.string()), ("url", pa.string()), ("date_time", pa.int64()),
    ("extra", pa.string())])
SCHEMAS = {PERSON: PERSON_SCHEMA, AUCTION: AUCTION_SCHEMA, BID: BID_SCHEMA}
#: the column of a batch's creation time (wall clock, ns), when ``stamp=True``
INGEST = "ingest_ns"

_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_DRAW = _U64(0xD1B54A32D192ED03)
_POOL_SIZE = 1 << 23


@dataclass(frozen=True)
class NexmarkConfig:
    """What the generator makes: how many events, how fast in event time, how disordered."""

    events: int | None = 1_000_000  #: total events of all kinds (None: endless)
    event_rate: float = 10_000.0  #: events per second of event time
    out_of_order: int = 1  #: group size within which event numbers are permuted
    seed: int = 0
    batch_size: int = 10_000  #: events (of all kinds) per batch index
    base_time_ms: int = DEFAULT_BASE_TIME_MS
    stamp: bool = False  #: add column ``ingest_ns``: when the batch was made (wall clock)

    def __post_init__(self) -> None:
        if self.event_rate <= 0 or self.batch_size < 1 or self.out_of_order < 1:
            raise ValueError("event_rate, batch_size and out_of_order must be positive")
        if self.out_of_order % OUT_OF_ORDER_PRIME == 0:
            raise ValueError(f"out_of_order must not be a multiple of {OUT_OF_ORDER_PRIME}")

    @property
    def delay_ns(self) -> int:
        """Event time between two consecutive events, in ns."""
        return max(1, round(1e9 / self.event_rate))

    @property
    def num_batches(self) -> int | None:
        """How many batch indices the events take (None: endless)."""
        return None if self.events is None else math.ceil(self.events / self.batch_size)

    @property
    def disorder_ms(self) -> int:
        """How far back in event time an event can be behind one made before it."""
        return math.ceil((self.out_of_order - 1) * self.delay_ns / 1e6)

    @property
    def max_auction_ms(self) -> int:
        """The longest an auction can stay open (ms): ``expires - date_time`` at most."""
        ahead = NUM_IN_FLIGHT_AUCTIONS * TOTAL_PROPORTION // AUCTION_PROPORTION
        return 2 * (math.ceil(ahead * self.delay_ns / 1e6) + 1) + 1

    def time_ms(self, e: np.ndarray) -> np.ndarray:
        """Event time (epoch ms) of event numbers ``e``."""
        return self.base_time_ms + (e.astype(np.int64) * self.delay_ns) // 1_000_000

    def kind_counts(self) -> dict[str, int]:
        """How many events of each kind the whole (bounded) stream has."""
        n = self.events or 0
        full, rest = divmod(n, TOTAL_PROPORTION)
        return {PERSON: full + min(rest, 1), AUCTION: 3 * full + min(max(rest - 1, 0), 3),
                BID: 46 * full + max(rest - 4, 0)}


# ------------------------------------------------------------------------ randomness


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer (uint64 arrays wrap around)."""
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


class _Draws:
    """Independent random draws per event: ``draw(k)`` is the k-th uint64 of each event."""

    def __init__(self, seed: int, e: np.ndarray) -> None:
        self._base = _mix(e.astype(_U64) * _GOLDEN + _mix(np.array([seed], dtype=_U64)))

    def draw(self, k: int) -> np.ndarray:
        return _mix(self._base + _U64(((k + 1) * int(_DRAW)) % (1 << 64)))

    def below(self, k: int, n: Any) -> np.ndarray:
        """Integers in ``[0, n)`` (``n`` a positive int or an array of them)."""
        return (self.draw(k) % np.asarray(n).astype(_U64)).astype(np.int64)

    def uniform(self, k: int) -> np.ndarray:
        """Doubles in [0, 1)."""
        return (self.draw(k) >> _U64(11)).astype(np.float64) * (1.0 / (1 << 53))


# ------------------------------------------------------------------------ id formulas


def last_base0_person_id(e: np.ndarray) -> np.ndarray:
    """The newest person id (from 0) made at or before event ``e``."""
    return e // TOTAL_PROPORTION


def last_base0_auction_id(e: np.ndarray) -> np.ndarray:
    """The newest auction id (from 0) made at or before event ``e`` (-1: none yet)."""
    epoch = e // TOTAL_PROPORTION
    off = e % TOTAL_PROPORTION
    before = off < PERSON_PROPORTION
    epoch = np.where(before, epoch - 1, epoch)
    off = np.where(before | (off >= PERSON_PROPORTION + AUCTION_PROPORTION),
                   AUCTION_PROPORTION - 1, off - PERSON_PROPORTION)
    return epoch * AUCTION_PROPORTION + off


def next_base0_person_id(e: np.ndarray, r: _Draws, k: int) -> np.ndarray:
    """One of the active people (the last 1000), or one up to 10 ids ahead."""
    num = last_base0_person_id(e) + 1
    active = np.minimum(num, NUM_ACTIVE_PEOPLE)
    return num - active + r.below(k, active + PERSON_ID_LEAD)


def next_base0_auction_id(e: np.ndarray, r: _Draws, k: int) -> np.ndarray:
    """One of the last 100 auctions in flight, or one up to 10 ids ahead."""
    hi = last_base0_auction_id(e)
    lo = np.maximum(hi - NUM_IN_FLIGHT_AUCTIONS, 0)
    return lo + r.below(k, np.maximum(hi - lo + 1 + AUCTION_ID_LEAD, 1))


def next_price(r: _Draws, k: int) -> np.ndarray:
    """A price in cents, log-uniform from 1.00 to 1,000,000.00."""
    return np.round(np.power(10.0, r.uniform(k) * 6.0) * 100.0).astype(np.int64)


# ------------------------------------------------------------------------ strings


#: where the string pool of a seed is kept once made: making it costs about 0.1 s of CPU
#: in every process that makes events (each task slot of a parallel run), mapping the
#: file back almost nothing
_POOL_DIR = Path(__file__).resolve().parent / "data"


def _pool(seed: int) -> pa.Buffer:
    """The letters of seed ``seed``'s string pool (from its file when there is one)."""
    path = _POOL_DIR / f"strings-s{seed}-n{_POOL_SIZE}.u8"
    try:
        buf = pa.memory_map(str(path)).read_buffer()
        if buf.size == _POOL_SIZE:
            return buf
    except OSError:
        pass
    rng = np.random.default_rng(seed)
    letters = rng.integers(ord("a"), ord("z") + 1, _POOL_SIZE, dtype=np.uint8)
    letters[rng.random(_POOL_SIZE) < 0.08] = ord(" ")
    try:  # (written whole under another name first: readers never see part of it)
        _POOL_DIR.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        letters.tofile(tmp)
        os.replace(tmp, path)
    except OSError:
        pass
    return pa.py_buffer(letters)


class _Strings:
    """Random lower-case strings: consecutive pieces of one pool of letters (made once
    per seed) from a random place, so a column of them is a slice of the pool (no copy)."""

    def __init__(self, seed: int) -> None:
        self.pool = _pool(seed)

    def make(self, lengths: np.ndarray, r: _Draws, k: int) -> pa.Array:
        """Strings of ``lengths``, cut one after the other from a random place of the pool."""
        offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        total = int(offsets[-1])
        if total > _POOL_SIZE // 2:
            raise ValueError("batch too large for the string pool: lower batch_size")
        start = int(r.draw(k)[0] % _U64(_POOL_SIZE - total)) if len(lengths) else 0
        return pa.StringArray.from_buffers(len(lengths), pa.py_buffer(offsets),
                                           self.pool.slice(start, max(total, 1)))

    def random(self, r: _Draws, k: int, max_len: int, min_len: int = 3) -> pa.Array:
        """Beam's nextString: ``min_len`` to ``max_len - 1`` characters."""
        lengths = min_len + r.below(k, max(max_len - min_len, 1))
        return self.make(lengths, r, k + 1)

    def extra(self, r: _Draws, k: int, kind: str) -> pa.Array:
        """Beam's nextExtra: pads an event to its kind's average size, give or take 20%."""
        want = AVG_SIZE[kind] - BASE_SIZE[kind]
        delta = round(want * 0.2)
        lengths = want - delta + r.below(k, max(2 * delta, 1))
        return self.make(lengths, r, k + 1)


_STRINGS: dict[int, _Strings] = {}


def _strings(seed: int) -> _Strings:
    if seed not in _STRINGS:
        _STRINGS[seed] = _Strings(seed)
    return _STRINGS[seed]


def _take(values: list[str], idx: np.ndarray) -> pa.Array:
    return pa.array(values, pa.string()).take(pa.array(idx))


# ------------------------------------------------------------------------ events


def event_numbers(cfg: NexmarkConfig, lo: int, hi: int) -> np.ndarray:
    """The (adjusted) event numbers made at positions ``[lo, hi)``: positions permuted
    inside each out-of-order group (the last, partial group of a bounded stream too)."""
    n = np.arange(lo, hi, dtype=np.int64)
    g = cfg.out_of_order
    if g == 1:
        return n
    base = (n // g) * g
    size = np.full(len(n), g, dtype=np.int64)
    if cfg.events is not None:
        size = np.minimum(size, cfg.events - base)
        if np.any((size % OUT_OF_ORDER_PRIME == 0) & (size > 1)):
            size = np.where(size % OUT_OF_ORDER_PRIME == 0, 1, size)
    return base + (n * OUT_OF_ORDER_PRIME) % size


def batch_range(cfg: NexmarkConfig, i: int) -> tuple[int, int]:
    """Positions of batch index ``i``."""
    lo = i * cfg.batch_size
    hi = lo + cfg.batch_size
    if cfg.events is not None:
        hi = min(hi, cfg.events)
    return lo, max(lo, hi)


def kind_of(e: np.ndarray) -> np.ndarray:
    """0 person, 1 auction, 2 bid."""
    off = e % TOTAL_PROPORTION
    return np.where(off < PERSON_PROPORTION, 0,
                    np.where(off < PERSON_PROPORTION + AUCTION_PROPORTION, 1, 2))


_NAMES = [f"{f} {la}" for f in FIRST_NAMES for la in LAST_NAMES]


def make_persons(cfg: NexmarkConfig, e: np.ndarray) -> pa.RecordBatch:
    """Person events of numbers ``e``."""
    r = _Draws(cfg.seed, e)
    s = _strings(cfg.seed)
    name_idx = r.below(1, len(FIRST_NAMES)) * len(LAST_NAMES) + r.below(2, len(LAST_NAMES))
    email = pc.binary_join_element_wise(s.random(r, 3, 8), s.random(r, 5, 6), ".com", "@")
    email = pc.replace_substring(email, "@.com", ".com")  # the last "@" was the separator
    groups = [pc.utf8_lpad(pc.cast(pa.array(r.below(7 + j, 10_000)), pa.string()), 4, "0")
              for j in range(4)]
    cards = pc.binary_join_element_wise(*groups, " ")
    cols = [pa.array(last_base0_person_id(e) + FIRST_PERSON_ID), _take(_NAMES, name_idx),
            email, cards,
            _take(US_CITIES, r.below(11, len(US_CITIES))),
            _take(US_STATES, r.below(12, len(US_STATES))), pa.array(cfg.time_ms(e)),
            s.extra(r, 13, PERSON)]
    return pa.RecordBatch.from_arrays(cols, schema=PERSON_SCHEMA)


def make_auctions(cfg: NexmarkConfig, e: np.ndarray) -> pa.RecordBatch:
    """Auction events of numbers ``e``."""
    r = _Draws(cfg.seed, e)
    s = _strings(cfg.seed)
    t = cfg.time_ms(e)
    hot = r.below(1, HOT_SELLERS_ONE_IN) > 0
    seller = np.where(hot, (last_base0_person_id(e) // HOT_SELLER_RATIO) * HOT_SELLER_RATIO,
                      next_base0_person_id(e, r, 2)) + FIRST_PERSON_ID
    initial = next_price(r, 3)
    ahead = NUM_IN_FLIGHT_AUCTIONS * TOTAL_PROPORTION // AUCTION_PROPORTION
    horizon = cfg.time_ms(e + ahead) - t
    length = 1 + r.below(4, np.maximum(horizon * 2, 1))
    cols = [pa.array(last_base0_auction_id(e) + FIRST_AUCTION_ID), s.random(r, 5, 20),
            s.random(r, 7, 100), pa.array(initial), pa.array(initial + next_price(r, 9)),
            pa.array(t), pa.array(t + length), pa.array(seller),
            pa.array(FIRST_CATEGORY_ID + r.below(10, NUM_CATEGORIES)), s.extra(r, 11, AUCTION)]
    return pa.RecordBatch.from_arrays(cols, schema=AUCTION_SCHEMA)


_CHANNELS: list[pa.Array] = []


def _channels() -> list[pa.Array]:
    """Channel names and URLs: the 4 hot ones, then the 10,000 others."""
    if not _CHANNELS:
        rng = np.random.default_rng(953)
        hot = []
        for _ in HOT_CHANNELS:
            parts = ["".join(chr(c) for c in rng.integers(97, 123, 5)) for _ in range(3)]
            hot.append(f"https://www.nexmark.com/{'/'.join(parts)}/item.htm?query=1")
        names = HOT_CHANNELS + [f"channel-{n}" for n in range(CHANNELS_NUMBER)]
        urls = hot + [f"{hot[0]}&channel_id={n}" for n in range(CHANNELS_NUMBER)]
        _CHANNELS.extend([pa.array(names, pa.string()), pa.array(urls, pa.string())])
    return _CHANNELS


def make_bids(cfg: NexmarkConfig, e: np.ndarray) -> pa.RecordBatch:
    """Bid events of numbers ``e``."""
    r = _Draws(cfg.seed, e)
    s = _strings(cfg.seed)
    hot_a = r.below(1, HOT_AUCTIONS_ONE_IN) > 0
    auction = np.where(hot_a, (last_base0_auction_id(e) // HOT_AUCTION_RATIO) * HOT_AUCTION_RATIO,
                       next_base0_auction_id(e, r, 2)) + FIRST_AUCTION_ID
    hot_b = r.below(3, HOT_BIDDERS_ONE_IN) > 0
    bidder = np.where(hot_b, (last_base0_person_id(e) // HOT_BIDDER_RATIO) * HOT_BIDDER_RATIO
                      + 1, next_base0_person_id(e, r, 4)) + FIRST_PERSON_ID
    # Flink's channels: one of 4 hot ones, or (1 in 100) one of 10,000 others
    hot_c = r.below(5, 100) > 0
    idx = np.where(hot_c, r.below(6, len(HOT_CHANNELS)),
                   len(HOT_CHANNELS) + r.below(7, CHANNELS_NUMBER))
    names, urls = _channels()
    channel, url = names.take(pa.array(idx)), urls.take(pa.array(idx))
    cols = [pa.array(auction), pa.array(bidder), pa.array(next_price(r, 8)), channel, url,
            pa.array(cfg.time_ms(e)), s.extra(r, 9, BID)]
    return pa.RecordBatch.from_arrays(cols, schema=BID_SCHEMA)


_MAKERS = {PERSON: make_persons, AUCTION: make_auctions, BID: make_bids}
_KIND_CODE = {PERSON: 0, AUCTION: 1, BID: 2}


def batch(cfg: NexmarkConfig, kind: str, i: int) -> pa.RecordBatch:
    """The events of ``kind`` among those of batch index ``i`` (in generation order)."""
    lo, hi = batch_range(cfg, i)
    e = event_numbers(cfg, lo, hi)
    e = e[kind_of(e) == _KIND_CODE[kind]]
    out = _MAKERS[kind](cfg, e)
    if cfg.stamp:
        out = out.append_column(INGEST, pa.array(np.full(out.num_rows, time.time_ns(),
                                                         dtype=np.int64)))
    return out


def schema(kind: str, stamp: bool = False) -> pa.Schema:
    """The schema of ``kind``'s batches."""
    s = SCHEMAS[kind]
    return s.append(pa.field(INGEST, pa.int64())) if stamp else s


class Generator:
    """``Generator(cfg, kind)(i)``: batch ``i`` of one kind; picklable, for ``from_generator``."""

    def __init__(self, cfg: NexmarkConfig, kind: str) -> None:
        self.cfg = cfg
        self.kind = kind
        self.__name__ = f"nexmark_{kind}"

    def __call__(self, i: int) -> pa.RecordBatch:
        return batch(self.cfg, self.kind, i)


def write_parquet(cfg: NexmarkConfig, directory: Any, kinds: tuple[str, ...] = KINDS,
                  row_group: int = 100_000) -> dict[str, str]:
    """Write the (bounded) stream into ``<directory>/<kind>.parquet``; return the paths."""
    import os

    import pyarrow.parquet as pq

    if cfg.num_batches is None:
        raise ValueError("an endless stream cannot be written to files")
    os.makedirs(directory, exist_ok=True)
    paths = {}
    for kind in kinds:
        path = os.path.join(str(directory), f"{kind}.parquet")
        tmp = path + ".tmp"
        with pq.ParquetWriter(tmp, SCHEMAS[kind]) as w:
            pending: list[pa.RecordBatch] = []
            rows = 0
            for i in range(cfg.num_batches):
                b = batch(NexmarkConfig(**{**cfg.__dict__, "stamp": False}), kind, i)
                pending.append(b)
                rows += b.num_rows
                if rows >= row_group:
                    w.write_table(pa.Table.from_batches(pending))
                    pending, rows = [], 0
            if pending:
                w.write_table(pa.Table.from_batches(pending))
        os.replace(tmp, path)
        paths[kind] = path
    return paths
