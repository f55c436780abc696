"""Operators of continuous queries with updates: their output is a changelog (rows with a
change kind, see :mod:`millstream.core.changelog`), and those that take updates read one.

- ``aggregate``: :class:`ChangelogAggregate`, ``group_by(...).agg(...)`` on a stream
  without a window (a result per key, updated per input batch);
- ``accumulators``: what it keeps per key and aggregate, retractions included;
- ``dedup``: :class:`Deduplicate` (``drop_duplicates``), keep first or last, with a TTL;
- ``topn``: :class:`TopN` (``top_n``), the first n rows per group;
- ``convert``: between hidden change kinds and a visible column, and the batch reading
  of a changelog;
- ``keyed``: their common base (keyed state that spills, timers, snapshots by key group)
  and the batch helpers.

Operators say what they take and give with the class attributes ``accepts_updates`` and
``emits_updates`` (see :class:`millstream.ops.base.Operator`).
"""

from millstream.ops.changelog.aggregate import ChangelogAggregate
from millstream.ops.changelog.convert import ChangeSigns, ExpandNet, FromChangelog, ToChangelog
from millstream.ops.changelog.dedup import Deduplicate
from millstream.ops.changelog.topn import TopN

__all__ = ["ChangeSigns", "ChangelogAggregate", "Deduplicate", "ExpandNet", "FromChangelog",
           "ToChangelog", "TopN"]
