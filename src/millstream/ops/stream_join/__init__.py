"""Stream joins: interval join, window join, latest-value (temporal) join, stream-table
join, regular join of two streams.

Key exchange
------------
Both inputs of a keyed stream join pass :class:`JoinKeys` first: it appends normalized
copies of the join keys as hidden columns ``__ms_jk0, __ms_jk1, ...`` (integers as int64,
timestamps and dates as int64 microseconds, floats as float64 with -0.0 = 0.0,
dictionaries decoded, decimals as canonical strings). The key exchange of both sides
hashes these hidden columns, so equal key values reach the same key group and the same
task even when the two sides type them differently (int32 vs int64, timestamp[ms] vs
timestamp[us]); the operators match rows on them too (after unifying the two sides'
types) and drop them from their output. Keys that cannot be compared (a string against
an integer) raise a :class:`~millstream.errors.SchemaError`. A null key never matches.

Broadcast input (interval and window joins in a streaming job)
--------------------------------------------------------------
When one input is known to be small (a window aggregate without keys, one row per window,
under selects and filters) and is not an outer side, the planner broadcasts it: every
join task receives all its rows, and the other input is forwarded to the join task in its
own slot instead of being exchanged by key (Nexmark q7: the bids never cross processes).
Each pair still meets in exactly one task, the one holding its large-side row. The
operator (``broadcast=`` the small input's port) checkpoints its large-side rows per key
group as usual and the broadcast rows whole, once (from partition 0's task), under
``BROADCAST_GROUP``; every task restores them, so a job restores at another parallelism.
Partition 0's task alone sends broadcast rows to the side outputs.

Event time and lateness (interval and window joins)
---------------------------------------------------
Event times are int64 microseconds (:func:`~millstream.core.arrow.event_time_micros`).
The operator's watermark ``W`` is the job's (the minimum over every source partition of
both inputs). A row whose event time is null goes to the side output ``"invalid"``.

* **Interval join** (Flink's ``intervalJoin().between(lower, upper)``): a left row ``l``
  and a right row ``r`` with equal keys join when
  ``l.time + lower <= r.time <= l.time + upper`` (both bounds inclusive). A pair is
  emitted as soon as its second row arrives. A row with ``time < W`` is *late* (side
  output ``"late"``, with a column ``join_side`` = "left"/"right"). A buffered left row
  is dropped once ``l.time + upper < W`` and a right row once ``r.time - lower < W``:
  from then on no row that is not late can match it, so every pair of rows that are
  not late is joined exactly once, whatever the arrival order and batch boundaries.
  Outer joins emit a row that found no partner (the other side's columns null) when it
  is dropped, or at once when its key is null.
* **Window join** (Flink's ``join().window(...)``): rows of both sides are assigned to
  tumbling or sliding windows of their event time; a left and a right row join when
  they share a key and a window; the window's pairs are emitted, with ``window_start``
  and ``window_end`` in front, when the watermark reaches the window's end
  (``end <= W``), as :class:`~millstream.ops.window.WindowAggregate` fires. A sliding
  pair appears once per window both rows share. A row all of whose windows have
  ``end <= W`` on arrival is late. Outer joins emit unmatched rows of a window when it
  fires.

Output rows carry their inputs' event times, which can be behind the watermark when they
are emitted (an interval pair when its second row arrives, an outer row when it is
dropped); an event-time window over a join's output should allow that much lateness.

In batch mode (bounded inputs, no watermarks) nothing is late: both inputs are read,
then ``finish()`` completes every interval and window, so a bounded pipeline gives the
streaming result whenever no row was late in the stream.

Latest-value join (:class:`LatestJoin`)
---------------------------------------
The right input is a changelog: each row upserts the row of its key. Each left row is
joined with the right row its key holds *when the left row is processed*, and emitted at
once (Flink's processing-time temporal join, ``FOR SYSTEM_TIME AS OF`` a processing-time
attribute). Results depend on how left and right rows interleave; in batch mode the
right input is read completely first, so every left row meets the last version of its
key. ``version`` (optional) names a right column: a row replaces the held one only if
its version is not smaller (out-of-order changelogs). ``deleted`` (optional) names a
boolean right column: a true value deletes the key. Left rows are not kept; the right
state holds one row per key (deleted keys are forgotten, or kept as tombstones when
``version`` is given, so that an older version arriving late cannot revive them).

Stream-table join (:class:`BroadcastTableJoin`)
-----------------------------------------------
``stream.join(bounded_dataset)`` in a streaming job: the bounded side is computed once
when the job starts (a batch job) and every task joins its batches against it (inner,
left, semi or anti). It is not checkpointed: a restarted job computes it again.

Regular join (:class:`RegularJoin`)
-----------------------------------
``stream.join(other_stream, on, how, state_ttl=...)``: Flink's unbounded join (inner,
left, right, outer; a residual ``condition`` on the pairs of equal keys). Every row is
kept and joined with the other side's rows of its key whenever it arrives. Outer joins
emit updates: a padded row at once, taken back (-D) when its first partner comes, and
emitted again when its last partner is taken back. Inputs may carry changes
(``core.changelog``); a retraction takes back one stored copy and the pairs it made.
``state_ttl`` drops rows once their event time (both inputs with a watermark) or arrival
(processing time) is more than the TTL behind; expiry emits nothing. Details in
:mod:`millstream.ops.stream_join.regular`.

State and spilling
------------------
The buffered rows (both inputs of interval and window joins, the latest row per key of
``LatestJoin``) are an Arrow table per input plus aligned numpy columns (event time or
window bounds, matched flag, key hash, arrival number). They are bounded by
``state_memory_limit`` bytes (default: half the task's ``memory_budget``, as for windows
and keyed state). Over the limit, rows move to disk until half the limit is left (both
inputs in proportion to their bytes): the oldest rows of an interval join (they are
dropped first), the rows of the windows that end last (they fire last), the keys updated
longest ago. Each move writes a *run*: an uncompressed Arrow IPC file of record batches
sorted by key hash, memory-mapped for reading, so that reading a column or binary-searching
hashes touches only the pages it needs, in the kernel's page cache rather than the task's
heap. Memory keeps per run only a few numbers per batch and what changes after the move:
for the outer side of an interval join one bit per row (the matched flag), for an outer
side of a regular join its rows' partner counts, and a "dead" bit per row once one is
taken back (a retraction); this index counts against the limit.

In memory, the interval and regular joins keep each input as sorted chunks
(``chunks._SortedBuffer``) rather than one table in arrival order: sorted by event time
for the interval join (a watermark advance cuts a prefix of each chunk, a probe takes a
time range), by key hash for the regular join (a key's rows are a binary search away).

* Interval join: a batch probes every run whose time span can pair with it: the rows of
  its key hashes (binary search per batch of the run), then their times, then the exact
  keys. Clean-up moves the run's threshold (rows below it are gone; outer joins emit
  those not matched); a run whose newest row is gone is deleted.
* Window join: runs are read when their windows fire, one group of window ends at a time
  of at most the work budget (the limit, at least ``SPILL_WORK_MIN_BYTES``), and one hash
  range at a time within a window larger than that; output stays ordered by window.
* Latest join: a left batch reads the rows of its key hashes from every run and from
  memory, and keeps the last per key (by version, then arrival); without ``version`` a
  deleted key stays as a tombstone while older rows of it may be on disk.

The newest runs of an input are merged (hash range by hash range, within the work
budget) while the older is at most twice the newer, so there are few runs, dropped and
superseded rows leave the disk, and each row is rewritten a few times (window joins merge
only beyond 8 runs: they never probe them). Results do not depend on what was on disk.
Snapshots read the runs (their files stay), ``restore`` spills again when over the limit,
and ``close()`` (or ``finish()``) deletes the files. State is checkpointed per key group
(``snapshot_by_key_group``), so a job restores at another parallelism.

Modules
-------
``keys`` the hidden normalized join keys (:class:`JoinKeys`); ``output`` join types and
output rows; ``runs`` spill runs on disk; ``buffer`` the buffered rows of one input
(``chunks`` as sorted chunks); ``changes`` the regular join's helpers for changelog inputs;
``state`` both inputs' buffered state, its spilling and its key-group snapshots;
``keyed`` what the keyed joins share (side outputs, checkpoints); ``interval``,
``windowed``, ``latest``, ``broadcast`` and ``regular`` the five joins.
"""

from millstream.ops.stream_join.broadcast import BroadcastTableJoin
from millstream.ops.stream_join.interval import IntervalJoin
from millstream.ops.stream_join.keyed import BROADCAST_GROUP, SIDE_COLUMN
from millstream.ops.stream_join.keys import (
    JOIN_KEY_PREFIX,
    JoinKeys,
    join_key_names,
    match_keys,
    normalize_join_key,
)
from millstream.ops.stream_join.latest import LatestJoin
from millstream.ops.stream_join.regular import RegularJoin
from millstream.ops.stream_join.state import SPILL_WORK_MIN_BYTES
from millstream.ops.stream_join.windowed import WindowJoin

__all__ = [
    "BROADCAST_GROUP",
    "JOIN_KEY_PREFIX",
    "SIDE_COLUMN",
    "SPILL_WORK_MIN_BYTES",
    "BroadcastTableJoin",
    "IntervalJoin",
    "JoinKeys",
    "LatestJoin",
    "RegularJoin",
    "WindowJoin",
    "join_key_names",
    "match_keys",
    "normalize_join_key",
]
