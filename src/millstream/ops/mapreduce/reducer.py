"""The MapReduce reduce side: sort a partition by key, run the reducer group by group.

``ReducerOp`` sorts its shuffle input by the encoded key (``ops.mapreduce.keys``) with the
external-merge :class:`~millstream.ops.sort.Sort`, then walks the sorted stream with a
``_GroupCursor``, handing the reducer an iterator that streams a key's values across
batches and spilled runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from millstream.core.context import TaskContext
from millstream.ops.base import Batches
from millstream.ops.mapreduce.keys import decode_key
from millstream.ops.mapreduce.step import KEY_COLUMN, PART_COLUMN, StepOperator
from millstream.ops.mapreduce.values import decode_values, tag_column
from millstream.ops.sort import Sort


class _GroupCursor:
    """Walks a key-sorted batch stream one group at a time; values stream across batches."""

    def __init__(self, batches: Iterable[pa.RecordBatch]) -> None:
        self._it = iter(batches)
        self.rows = 0
        self._keys: list[bytes] = []
        self._starts: list[int] = []
        self._vals: list[Any] = []
        self._g = 0
        self.advanced = False
        self._load()

    def _load(self) -> bool:
        for b in self._it:
            n = b.num_rows
            if n == 0:
                continue
            names = b.schema.names
            keys = b.column(names.index(KEY_COLUMN))
            if n > 1:
                neq = pc.not_equal(keys.slice(1), keys.slice(0, n - 1))
                cut = (np.flatnonzero(neq.to_numpy(zero_copy_only=False)) + 1).tolist()
            else:
                cut = []
            starts = [0, *cut]
            self._keys = keys.take(pa.array(starts, pa.int64())).to_pylist()
            self._starts = [*starts, n]
            self._vals = decode_values(b.column(names.index(tag_column("value"))),
                                       b.column(names.index("value")))
            self._g = 0
            self.rows += n
            return True
        self._keys, self._starts, self._vals, self._g = [], [], [], 0
        return False

    def key(self) -> bytes | None:
        """The encoded key of the current group, or None at the end."""
        return self._keys[self._g] if self._g < len(self._keys) else None

    def _next(self, key: bytes) -> bool:
        """Advance past the current piece of group ``key``; True if the group goes on."""
        g = self._g
        if g + 1 < len(self._keys):
            self._g = g + 1
            return False
        if not self._load():
            return False
        return self._keys[0] == key

    def values(self, key: bytes) -> Iterator[Any]:
        """The values of group ``key``, read lazily (pulls further batches as needed)."""
        while True:
            g = self._g
            yield from self._vals[self._starts[g]:self._starts[g + 1]]
            more = self._next(key)
            if not more:
                self.advanced = True
                return

    def skip(self, key: bytes) -> None:
        """Move past the rest of group ``key`` without reading its values."""
        while self._next(key):
            pass
        self.advanced = True


class ReducerOp(StepOperator):
    """Sorts a reduce partition by key (external merge) and runs the reducer group by group."""

    role = "reduce"

    def open(self, ctx: TaskContext) -> None:
        super().open(ctx)
        self.sort = Sort([KEY_COLUMN], [False])
        self.sort.open(ctx)

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        if PART_COLUMN in batch.schema.names:
            batch = batch.drop_columns([PART_COLUMN])
        return self.sort.process(batch)

    def finish(self) -> Batches:
        return self._reduce()

    def _reduce(self) -> Iterator[pa.RecordBatch]:
        spec = self.spec
        reducer = spec.reducer
        if spec.reducer_init is not None:
            self._call("reducer_init", spec.reducer_init)
        ok: list[Any] = []
        ov: list[Any] = []
        ak, av = ok.append, ov.append
        limit = self.batch_rows
        cursor = _GroupCursor(self.sort.finish())
        groups = 0
        while True:
            kb = cursor.key()
            if kb is None:
                break
            groups += 1
            key = decode_key(kb)
            cursor.advanced = False
            values = cursor.values(kb)
            try:
                res = self._call_group(reducer, key, values)
                self._collect("reducer", reducer, res, ak, av, None, key)
            finally:
                values.close()
            if not cursor.advanced:
                cursor.skip(kb)
            if len(ok) >= limit:
                self._count("reduce output records", len(ok))
                yield from self._batches(ok, ov)
                ok, ov = [], []
                ak, av = ok.append, ov.append
        if spec.reducer_final is not None:
            self._collect("reducer_final", spec.reducer_final,
                          self._call("reducer_final", spec.reducer_final), ak, av,
                          "<reducer_final>")
        self._count("reduce input groups", groups)
        self._count("reduce input records", cursor.rows)
        self._count("reduce output records", len(ok))
        yield from self._batches(ok, ov)
        self._flush_counts()

    def close(self) -> None:
        self.sort.close()

    def describe(self) -> str:
        return f"MapReduce {self.label} step {self.step + 1} reduce (external sort by key)"
