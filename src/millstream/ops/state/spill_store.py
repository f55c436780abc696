"""The local on-disk store behind keyed state and timers that outgrow the memory budget.

Keyed state (``ops.state.store.KeyedStateStore``) keeps the state of recently used keys in
Python dicts; when its estimated size passes the operator's memory limit, the least
recently used keys move here, one row per key, and come back (row deleted) the next time
their key is processed. Timer queues keep their earliest timers in a heap and move the
latest ones here (``ops.state.timers``), reading them back in timestamp order as time
advances.

Why sqlite3 (stdlib) rather than our own segment files:

* lookups are per key, and a stream touches keys at random: a B-tree indexed by the
  key's bytes answers a point lookup in a few microseconds without any in-memory index
  (an index of our own would itself grow with the number of keys, which is what we must
  not hold in memory); spilling whole key groups instead would reload hundreds of keys
  to touch one, and thrash as soon as the working set spans more groups than fit;
* timers need an ordered queue on disk (take the earliest N, delete one timer by key
  and time), which is a primary key and one secondary index here;
* deletes, overwrites and reuse of free space come for free, with no compaction to
  write; and the store is one file we delete on close.

The database is private scratch space, so it runs without a journal, without fsync and
with an exclusive lock; a crash loses nothing that matters (the checkpoint holds the
state; the file is recreated). Its page cache is capped (``cache_bytes``), outside the
state's own accounting.

Keys are stored under a canonical byte encoding (``encode_key``): pickles of scalars,
concatenated with lengths for tuple keys, so equal keys of the same types always give
the same bytes (a pickle of a whole tuple can differ with object identity). Keys that
compare equal across types (``1`` and ``1.0``) are one key in memory but two on disk;
key columns have one type, so this does not arise from Arrow input.
"""

from __future__ import annotations

import os
import pickle
import sqlite3
import sys
import weakref
from collections.abc import Iterator
from typing import Any

import cloudpickle

from millstream.core.context import TaskContext
from millstream.errors import PlanError, StorageError

_U64 = 1 << 64
_I63 = 1 << 63

#: One spilled key: (encoded key, key-group hash or None, number of states, pickled states).
StateRow = tuple[bytes, "int | None", int, bytes]
#: One spilled timer: (timestamp, sequence number, encoded key, key-group hash or None).
TimerRow = tuple[int, int, bytes, "int | None"]


# --------------------------------------------------------------------------- encodings


def encode_key(key: Any) -> bytes:
    """Canonical bytes of a state key (equal keys of equal types give equal bytes)."""
    if type(key) is tuple:
        parts = [encode_key(k) for k in key]
        return b"(" + b"".join(len(p).to_bytes(4, "little") + p for p in parts)
    if type(key) is float and key == 0.0:
        key = 0.0  # -0.0 == 0.0 as a dict key
    try:
        return pickle.dumps(key, protocol=5)
    except Exception as exc:
        raise PlanError(f"the state key {key!r} ({type(key).__name__}) cannot be pickled, so "
                        f"its state cannot be spilled to disk: {exc}") from exc


def decode_key(blob: bytes) -> Any:
    """The key ``encode_key`` encoded."""
    if blob[:1] != b"(":
        return pickle.loads(blob)
    out = []
    i, n = 1, len(blob)
    while i < n:
        size = int.from_bytes(blob[i:i + 4], "little")
        out.append(decode_key(blob[i + 4:i + 4 + size]))
        i += 4 + size
    return tuple(out)


def dump_value(value: Any, what: str = "keyed state") -> bytes:
    """Pickle ``value`` (plain pickle, cloudpickle for what it cannot handle)."""
    try:
        return pickle.dumps(value, protocol=5)
    except Exception:
        pass
    try:
        return cloudpickle.dumps(value)
    except Exception as exc:
        raise PlanError(f"{what} holds a value that cannot be pickled, so it cannot be "
                        f"spilled to disk: {exc}") from exc


def _to_db_hash(h: int | None) -> int | None:
    """A uint64 hash as sqlite's signed 64-bit integer."""
    if h is None:
        return None
    h = int(h)
    return h - _U64 if h >= _I63 else h


def _from_db_hash(h: int | None) -> int | None:
    return None if h is None else h % _U64


# --------------------------------------------------------------------------- sizes


def deep_size(obj: Any, _depth: int = 0) -> int:
    """Rough in-memory bytes of ``obj`` and what it holds (long containers are sampled)."""
    size = sys.getsizeof(obj)
    if _depth >= 4:
        return size
    t = type(obj)
    if t is dict:
        n = len(obj)
        if n:
            sample = 0
            for i, (k, v) in enumerate(obj.items()):
                if i == 16:
                    break
                sample += deep_size(k, _depth + 1) + deep_size(v, _depth + 1)
            size += sample * n // min(n, 16)
    elif t in (list, tuple, set, frozenset):
        n = len(obj)
        if n:
            sample = 0
            for i, v in enumerate(obj):
                if i == 16:
                    break
                sample += deep_size(v, _depth + 1)
            size += sample * n // min(n, 16)
    elif t not in (str, bytes, int, float, bool) and hasattr(obj, "__dict__"):
        size += deep_size(vars(obj), _depth + 1)
    return size


# --------------------------------------------------------------------------- sqlite store


def _close_and_remove(conn: sqlite3.Connection, path: str) -> None:
    try:
        conn.close()
    finally:
        for p in (path, path + "-journal", path + "-wal", path + "-shm"):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


class StateSpillStore:
    """One sqlite database file holding spilled keyed state and timers of one operator."""

    def __init__(self, path: str, cache_bytes: int = 1 << 20) -> None:
        self.path = path
        if os.path.exists(path):
            raise StorageError(f"state spill file {path} already exists")
        try:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot create the state spill file {path}: {exc}") from exc
        self._conn = conn
        self._finalizer = weakref.finalize(self, _close_and_remove, conn, path)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "locking_mode=EXCLUSIVE",
                       "temp_store=MEMORY", f"cache_size=-{max(64, cache_bytes // 1024)}"):
            conn.execute(f"PRAGMA {pragma}")
        conn.execute("CREATE TABLE state (k BLOB PRIMARY KEY, h INTEGER, n INTEGER NOT NULL, "
                     "v BLOB NOT NULL) WITHOUT ROWID")
        conn.execute("CREATE TABLE timers (kind INTEGER NOT NULL, ts INTEGER NOT NULL, "
                     "seq INTEGER NOT NULL, k BLOB NOT NULL, h INTEGER, "
                     "PRIMARY KEY (kind, ts, seq)) WITHOUT ROWID")
        conn.execute("CREATE UNIQUE INDEX timers_by_key ON timers (kind, k, ts)")

    @property
    def closed(self) -> bool:
        """True once ``close()`` ran."""
        return not self._finalizer.alive

    def close(self) -> None:
        """Close the database and delete its file."""
        self._finalizer()

    def disk_bytes(self) -> int:
        """Size of the database file."""
        try:
            return os.path.getsize(self.path)
        except OSError:
            return 0

    def _many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        conn = self._conn
        conn.execute("BEGIN")
        try:
            conn.executemany(sql, rows)
        except sqlite3.OperationalError as exc:  # e.g. the disk is full
            raise StorageError(f"writing {len(rows)} rows of spilled keyed state to {self.path} "
                               f"failed: {exc}") from exc
        finally:
            conn.execute("COMMIT")

    # ----------------------------------------------------------------- state rows

    def put_states(self, rows: list[StateRow]) -> None:
        """Write (replace) the rows of several keys."""
        if rows:
            # in key order: the B-tree pages are visited once each, not at random
            self._many("INSERT OR REPLACE INTO state VALUES (?, ?, ?, ?)",
                       sorted((k, _to_db_hash(h), n, v) for k, h, n, v in rows))

    def take_state(self, k: bytes) -> tuple[int | None, bytes] | None:
        """Remove the row of encoded key ``k`` and return its (hash, pickled states)."""
        rows = self._conn.execute("DELETE FROM state WHERE k = ? RETURNING h, v", (k,)).fetchall()
        if not rows:
            return None
        return _from_db_hash(rows[0][0]), rows[0][1]

    def delete_state(self, k: bytes) -> bool:
        """Drop the row of encoded key ``k``; True when there was one."""
        return self._conn.execute("DELETE FROM state WHERE k = ?", (k,)).rowcount > 0

    def state_rows(self) -> Iterator[StateRow]:
        """Every spilled key's row."""
        for k, h, n, v in self._conn.execute("SELECT k, h, n, v FROM state"):
            yield k, _from_db_hash(h), n, v

    def num_state_keys(self) -> int:
        """Keys with spilled state."""
        return self._conn.execute("SELECT count(*) FROM state").fetchone()[0]

    def num_state_entries(self) -> int:
        """(state name, key) entries spilled."""
        return int(self._conn.execute("SELECT total(n) FROM state").fetchone()[0])

    def clear_states(self) -> None:
        """Drop every spilled key."""
        self._conn.execute("DELETE FROM state")

    # ----------------------------------------------------------------- timers

    def add_timers(self, kind: int, rows: list[TimerRow]) -> int:
        """Queue timers, except where the key has one of this kind at that time; how many."""
        if not rows:
            return 0
        before = self._conn.total_changes
        self._many("INSERT OR IGNORE INTO timers VALUES (?, ?, ?, ?, ?)",
                   sorted((kind, ts, seq, k, _to_db_hash(h)) for ts, seq, k, h in rows))
        return self._conn.total_changes - before

    def remove_timer(self, kind: int, k: bytes, ts: int) -> int:
        """Drop the key's timer of this kind at ``ts``; the number removed (0 or 1)."""
        return self._conn.execute("DELETE FROM timers WHERE kind = ? AND k = ? AND ts = ?",
                                  (kind, k, ts)).rowcount

    def take_first_timers(self, kind: int, n: int) -> list[TimerRow]:
        """Remove and return the ``n`` earliest timers of this kind, in (ts, seq) order."""
        rows = self._conn.execute("SELECT ts, seq, k, h FROM timers WHERE kind = ? "
                                  "ORDER BY ts, seq LIMIT ?", (kind, n)).fetchall()
        if rows:
            last = rows[-1]
            self._conn.execute("DELETE FROM timers WHERE kind = ? AND (ts, seq) <= (?, ?)",
                               (kind, last[0], last[1]))
        return [(ts, seq, k, _from_db_hash(h)) for ts, seq, k, h in rows]

    def first_timer(self, kind: int) -> tuple[int, int] | None:
        """(ts, seq) of the earliest timer of this kind on disk."""
        row = self._conn.execute("SELECT ts, seq FROM timers WHERE kind = ? ORDER BY ts, seq "
                                 "LIMIT 1", (kind,)).fetchone()
        return None if row is None else (row[0], row[1])

    def timer_rows(self, kind: int) -> Iterator[TimerRow]:
        """Every timer of this kind on disk, in (ts, seq) order."""
        for ts, seq, k, h in self._conn.execute("SELECT ts, seq, k, h FROM timers WHERE "
                                                "kind = ? ORDER BY ts, seq", (kind,)):
            yield ts, seq, k, _from_db_hash(h)

    def clear_timers(self, kind: int) -> None:
        """Drop every timer of this kind."""
        self._conn.execute("DELETE FROM timers WHERE kind = ?", (kind,))


class SpillArea:
    """Where one operator's keyed state and timers spill: a ``StateSpillStore`` opened on
    first use in the task's spill directory, deleted by ``close()``."""

    def __init__(self, ctx: TaskContext | None = None) -> None:
        self.ctx = ctx
        self._store: StateSpillStore | None = None
        #: number of times state or timers were moved to disk
        self.spills = 0

    def configure(self, ctx: TaskContext | None) -> None:
        """Use ``ctx``'s spill directory (and counters) from now on."""
        if ctx is not None:
            self.ctx = ctx

    @property
    def is_open(self) -> bool:
        """True when a database file exists."""
        return self._store is not None

    def store(self) -> StateSpillStore:
        """The database, created on first call."""
        if self._store is None:
            ctx = self.ctx if self.ctx is not None else TaskContext()
            self._store = StateSpillStore(ctx.scratch_path("keyed-state", ".sqlite"))
        return self._store

    def count_spill(self) -> None:
        """Record one move to disk (in the task counter ``("millstream", "state_spills")``)."""
        self.spills += 1
        if self.ctx is not None:
            self.ctx.increment_counter("millstream", "state_spills")

    def disk_bytes(self) -> int:
        """Bytes of the database file (0 when none)."""
        return self._store.disk_bytes() if self._store is not None else 0

    def close(self) -> None:
        """Delete the database file (state on disk is gone)."""
        if self._store is not None:
            self._store.close()
            self._store = None

    def __getstate__(self) -> dict[str, Any]:
        if self._store is not None:
            raise PlanError("an operator whose keyed state spilled to disk cannot be pickled; "
                            "snapshot() it instead")
        return dict(self.__dict__)
