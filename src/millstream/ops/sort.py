"""Sorting: an external merge sort operator, range partitioning and key sampling.

A global sort is a sampling pass (``SampleKeys``) that picks range boundaries, a range
shuffle (``range_partition_ids``), and a ``Sort`` per reducer; partition i holds keys
before partition i+1, so reading partitions in order gives globally ordered output.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from millstream.core.arrow import batch_nbytes, concat_batches, empty_batch, table_to_batches
from millstream.core.sorting import check_sort_columns, order_indices
from millstream.core.spill import SpillFile
from millstream.ops.base import Batches, Operator

_EMPTY: tuple[pa.RecordBatch, ...] = ()
_MARK = "__millstream_mark"


class SampleKeys(Operator):
    """Reservoir sample of the sort-key columns of a partition (for range boundaries)."""

    def __init__(self, by: list[str], size: int = 2000, seed: int = 17) -> None:
        super().__init__(f"SampleKeys({', '.join(by)})")
        self.by, self.size, self.seed = by, size, seed
        self.kept: list[pa.Table] = []
        self.seen = 0

    def open(self, ctx) -> None:
        super().open(ctx)
        self.rng = np.random.default_rng(self.seed + ctx.partition)

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        if batch.num_rows == 0:
            return _EMPTY
        check_sort_columns(batch, self.by)
        keys = pa.Table.from_batches([batch]).select(self.by)
        self.seen += batch.num_rows
        # keep each row with probability size/seen (approximate reservoir, vectorized)
        p = min(1.0, self.size * 2 / max(1, self.seen))
        mask = self.rng.random(batch.num_rows) < p
        if mask.any():
            self.kept.append(keys.filter(pa.array(mask)))
        total = sum(t.num_rows for t in self.kept)
        if total > self.size * 4:
            t = pa.concat_tables(self.kept, promote_options="permissive")
            pick = np.sort(self.rng.choice(t.num_rows, self.size * 2, replace=False))
            self.kept = [t.take(pa.array(pick))]
        return _EMPTY

    def finish(self) -> Batches:
        if not self.kept:
            return _EMPTY
        t = pa.concat_tables(self.kept, promote_options="permissive")
        return t.to_batches()


class Sort(Operator):
    """Sort a partition within the memory budget: sorted runs spill, then a k-way merge."""

    def __init__(self, by: list[str], descending: list[bool], nulls_last: bool | None = None) -> None:
        super().__init__(f"Sort({', '.join(c + (' desc' if d else '') for c, d in zip(by, descending))})")
        self.by, self.descending, self.nulls_last = by, descending, nulls_last
        self.buf: list[pa.RecordBatch] = []
        self.buf_bytes = 0
        self.runs: list[SpillFile] = []

    def _limit(self) -> int:
        return max(4 << 20, (self.ctx.memory_budget if self.ctx else 64 << 20) // 2)

    def _sorted(self, table: pa.Table) -> pa.Table:
        check_sort_columns(table, self.by)
        return table.take(order_indices(table, self.by, self.descending, self.nulls_last)) \
            if table.num_rows else table

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        if batch.num_rows == 0:
            if not self.buf:
                self.buf.append(batch)  # keep the schema
            return _EMPTY
        self.buf.append(batch)
        self.buf_bytes += batch_nbytes(batch)
        if self.buf_bytes >= self._limit():
            self._spill_run()
        return _EMPTY

    def _spill_run(self) -> None:
        t = self._sorted(concat_batches(self.buf))
        self.buf, self.buf_bytes = [], 0
        run = SpillFile(self.ctx, "sortrun")
        for b in t.to_batches(max_chunksize=8192):
            run.write(b)
        run.close()
        self.runs.append(run)
        if self.ctx:
            self.ctx.increment_counter("millstream", "spills")

    def finish(self) -> Batches:
        bs = self.ctx.batch_size if self.ctx else 65536
        if not self.runs:
            t = concat_batches(self.buf)
            self.buf = []
            if t.num_rows == 0:
                # no rows: still pass the schema on (a join or aggregate downstream needs it)
                return [empty_batch(t.schema)] if t.num_columns else _EMPTY
            return table_to_batches(self._sorted(t), bs)
        if self.buf and any(b.num_rows for b in self.buf):
            self._spill_run()
        return self._merge(bs)

    def _merge(self, bs: int) -> Iterator[pa.RecordBatch]:
        readers = [r.read() for r in self.runs]
        heads: list[pa.Table | None] = [None] * len(readers)

        def refill(i: int) -> None:
            try:
                heads[i] = pa.Table.from_batches([next(readers[i])])
            except StopIteration:
                heads[i] = None

        for i in range(len(readers)):
            refill(i)
        try:
            while any(h is not None for h in heads):
                live = [i for i, h in enumerate(heads) if h is not None]
                if len(live) == 1:
                    i = live[0]
                    yield from heads[i].to_batches()
                    yield from readers[i]
                    heads[i] = None
                    break
                # the smallest "last key" among the heads bounds what can be emitted safely
                lasts = pa.concat_tables([heads[i].select(self.by).slice(heads[i].num_rows - 1)
                                          for i in live], promote_options="permissive")
                order = order_indices(lasts, self.by, self.descending, self.nulls_last)
                bound_run = live[int(order[0].as_py())]
                bound = heads[bound_run].select(self.by).slice(heads[bound_run].num_rows - 1)
                prefixes = []
                for i in live:
                    h = heads[i]
                    if i == bound_run:
                        cut = h.num_rows
                    else:
                        cand = pa.concat_tables([h.select(self.by), bound], promote_options="permissive")
                        o = np.asarray(order_indices(cand, self.by, self.descending, self.nulls_last))
                        cut = int(np.nonzero(o == cand.num_rows - 1)[0][0])
                    if cut:
                        prefixes.append(h.slice(0, cut))
                    if cut == h.num_rows:
                        refill(i)
                    else:
                        heads[i] = h.slice(cut)
                if prefixes:
                    merged = pa.concat_tables(prefixes, promote_options="permissive")
                    yield from table_to_batches(self._sorted(merged), bs)
        finally:
            for r in self.runs:
                r.delete()
            self.runs = []

    def close(self) -> None:
        for r in self.runs:
            r.delete()
        self.runs = []
