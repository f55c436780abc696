"""Join operators: the build side is collected and indexed once per task, the probe side
streams through it (:class:`~millstream.ops.join.probe.JoinProbe`).

:class:`HashJoin` reads both sides (port 1, the right side, is the build side); when the
build side outgrows the task's memory budget, both sides are hash-partitioned into buckets
on disk and joined bucket by bucket (grace hash join). :class:`BroadcastHashJoin` loads the
whole (small) right side when it opens; :class:`BroadcastLeftHashJoin` the whole left
side, joined with every chunk of the right side (inner and right joins). Without keys the
same operators are nested loops (cross joins, joins on a condition only): every build row
is a candidate for every probe row, in chunks of bounded size; such a build side is held
in memory.

A shuffle join task indexes whichever of its sides is the smaller where the join type
allows (a left build side serves inner, right, semi and anti joins), and a worker process
indexes a broadcast side once for all its tasks of the stage.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from millstream.core.arrow import batch_nbytes, concat_batches, table_to_batches
from millstream.core.hashing import partition_ids
from millstream.core.shuffle import read_block
from millstream.core.spill import BucketSpiller
from millstream.errors import PlanError
from millstream.ops.base import Batches, Operator
from millstream.ops.join.keys import canonical_type
from millstream.ops.join.probe import JoinProbe, check_how

_EMPTY: tuple[pa.RecordBatch, ...] = ()
#: Join types whose build side may be the left input (the right rows then stream).
_LEFT_BUILDABLE = ("inner", "right", "semi", "anti")
#: Counter of build-side indexes built (one per task and type of probe keys; per bucket
#: when spilling).
BUILDS_COUNTER = ("millstream", "join_index_builds")


def join_tables(left: pa.Table, right: pa.Table, left_on: list[str], right_on: list[str],
                how: str, suffix: str = "_right", condition: Any = None) -> pa.Table:
    """Join two in-memory tables (the right one is the build side); null keys never match.

    Columns of any type (lists, pickled objects) are carried; same-named keys (``on=``)
    appear once, coalesced for right and outer joins. Without keys, every pair of rows is
    a candidate; ``condition`` (an expression over the inner join's columns, see
    :mod:`millstream.ops.join.probe`) keeps the pairs where it is true.
    """
    core = JoinProbe(left_on, right_on, how, suffix, condition)
    core.build(right)
    parts: list[pa.Table] = []
    batches = left.to_batches() if left.num_rows else []
    for b in batches:
        parts.extend(core.probe(b))
    parts.extend(core.finish(left.schema))
    empty = pa.Table.from_batches([core.empty(left.schema)])
    return pa.concat_tables([empty, *parts]) if parts else empty


def _bucket_key(arr: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """A key column as spill buckets hash it: equal keys of any two types that join hash
    alike (strings of every layout as large binaries, decimals as floats, times in one
    unit; integers and integral floats already hash alike)."""
    t = canonical_type(arr.type)
    if not t.equals(arr.type):
        arr = arr.cast(t)
    if pa.types.is_large_string(t):
        return arr.cast(pa.large_binary())
    if pa.types.is_decimal(t):
        return arr.cast(pa.float64())
    if pa.types.is_timestamp(t):
        return arr.cast(pa.timestamp("us", tz=t.tz), safe=False)
    if pa.types.is_duration(t):
        return arr.cast(pa.duration("us"), safe=False)
    return arr


def _concat(batches: list[pa.RecordBatch], schema: pa.Schema | None) -> pa.Table:
    """The batches of one side as a table (their schemas unified); without batches, an
    empty table of ``schema`` (no columns when None)."""
    if batches:
        return concat_batches(batches)
    return schema.empty_table() if schema is not None else pa.table({})


class _JoinSpiller(BucketSpiller):
    """Buckets of one side of a grace hash join, assigned alike for both sides."""

    def bucket_ids(self, batch: pa.RecordBatch) -> np.ndarray:
        cols = [_bucket_key(batch.column(k)) for k in self.keys]
        cols.append(pa.array(np.full(batch.num_rows, self.salt, dtype=np.int64)))
        return partition_ids(cols, batch.num_rows, self.num_buckets)


class HashJoin(Operator):
    """Join of port 0 (left, probe) with port 1 (right, build), indexed once per task.

    ``build_left`` (semi and anti joins whose left side is the smaller): port 0 is the
    build side, read first; the right rows stream through it marking the left rows they
    match, and the left rows are emitted at the end (the big side is never indexed).

    Otherwise the right side is read first, and for the join types a left build side
    serves (inner, right, semi, anti) the left rows are held until they outnumber half the
    right rows: when the whole left side stays below that, it is indexed instead and the
    right rows stream through it (the smaller side of this task is indexed, whatever the
    plan's estimates said)."""

    num_inputs = 2
    input_order = (1, 0)

    def __init__(self, left_on: list[str], right_on: list[str], how: str = "inner",
                 suffix: str = "_right", broadcast: bool = False, condition: Any = None,
                 build_left: bool = False) -> None:
        how = check_how(how)
        if len(left_on) != len(right_on):
            raise PlanError("join needs as many left keys as right keys")
        if build_left and (how not in ("semi", "anti") or broadcast):
            raise PlanError("a shuffle hash join builds its left side for semi and anti "
                            f"joins only, not {how}")
        kind = "BroadcastHashJoin" if broadcast else "ShuffleHashJoin"
        if not left_on:
            kind = "BroadcastNestedLoopJoin" if broadcast else "NestedLoopJoin"
        text = f"{kind}({how}, left_on={left_on}, right_on={right_on}"
        text += f", condition={condition!r}" if condition is not None else ""
        super().__init__(text + (", build=left)" if build_left else ")"))
        self.left_on, self.right_on, self.how, self.suffix = left_on, right_on, how, suffix
        self.condition = condition
        self.build_left = build_left
        self.build_port = 0 if build_left else 1
        self.input_order = (0, 1) if build_left else (1, 0)
        self.build_keys, self.probe_keys = ((left_on, right_on) if build_left
                                            else (right_on, left_on))
        self.build: list[pa.RecordBatch] = []
        self.build_bytes = 0
        # schemas seen on each side (also from empty batches): an empty side still needs its
        # columns, or the output of this task would name and order columns differently
        self.probe_schema: pa.Schema | None = None
        self.build_schema: pa.Schema | None = None
        self.emitted = False  # any output batch yet (else finish sends a typed empty one)
        self.build_spill: BucketSpiller | None = None
        self.probe_spill: BucketSpiller | None = None
        self.core: JoinProbe | None = None
        self.build_rows = 0
        #: left rows held while the left side may still be the smaller (None: not trying)
        self.pending: list[pa.RecordBatch] | None = (
            [] if not build_left and not broadcast and left_on and how in _LEFT_BUILDABLE
            else None)
        self.pending_rows = 0
        self.probe_held: list[pa.RecordBatch] = []
        self.probe_held_rows = 0

    def _new_core(self) -> JoinProbe:
        return JoinProbe(self.left_on, self.right_on, self.how, self.suffix, self.condition,
                         build_left=self.build_left, on_build=self._count_build)

    def _count_build(self) -> None:
        if self.ctx is not None:
            self.ctx.increment_counter(*BUILDS_COUNTER)

    def _limit(self) -> int:
        return max(4 << 20, (self.ctx.memory_budget if self.ctx else 64 << 20) // 2)

    def _bs(self) -> int:
        return self.ctx.batch_size if self.ctx else 65536

    def _out(self, tables: Iterator[pa.Table]) -> Iterator[pa.RecordBatch]:
        for t in tables:
            if t.num_rows:
                self.emitted = True
                yield from table_to_batches(t, self._bs())

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        if port == self.build_port:
            if self.build_schema is None and batch.num_columns:
                self.build_schema = batch.schema
            if self.build_spill is not None:
                self.build_spill.write(batch)
                return _EMPTY
            self.build.append(batch)
            self.build_bytes += batch_nbytes(batch)
            self.build_rows += batch.num_rows
            if self.build_bytes > self._limit() and self.build_keys:
                self._start_spilling()
            return _EMPTY
        if self.probe_schema is None and batch.num_columns:
            self.probe_schema = batch.schema
        if batch.num_rows == 0:
            return _EMPTY
        if self.probe_spill is not None:
            self.probe_spill.write(batch)
            return _EMPTY
        if self.pending is not None and self.core is None:
            self.pending.append(batch)
            self.pending_rows += batch.num_rows
            if self.pending_rows * 2 < self.build_rows:
                return _EMPTY
            return self._build_right()
        if self.core is None:
            self._end_build()
        # small probe batches (a filtered side's shuffle reads) are joined together: each
        # probe step has a cost per output column
        self.probe_held.append(batch)
        self.probe_held_rows += batch.num_rows
        if self.probe_held_rows * 2 < self._bs():
            return _EMPTY
        return self._probe_held()

    def _probe_held(self) -> list[pa.RecordBatch]:
        """Joins the probe batches held so far (as one when there are several)."""
        held, self.probe_held, self.probe_held_rows = self.probe_held, [], 0
        if not held:
            return []
        assert self.core is not None
        batches = held
        if len(held) > 1:
            table = concat_batches(held)
            try:
                table = table.combine_chunks()
            except (pa.ArrowInvalid, pa.ArrowCapacityError):  # pragma: no cover - > 2 GB
                pass
            batches = table.to_batches()
        return [b for batch in batches for b in self._out(self.core.probe(batch))]

    def _build_right(self) -> list[pa.RecordBatch]:
        """The left side is not the smaller: index the right side as planned and probe it
        with the left rows held so far."""
        held, self.pending = self.pending or [], None
        self._end_build()
        assert self.core is not None
        return [b for batch in held for b in self._out(self.core.probe(batch))]

    def _build_left(self) -> list[pa.RecordBatch]:
        """The whole left side is the smaller: index it, stream the right rows through."""
        held, self.pending = self.pending or [], None
        self.build_left, self.build_port = True, 0
        self.build_keys, self.probe_keys = self.left_on, self.right_on
        self.build_schema, self.probe_schema = self.probe_schema, self.build_schema
        right, self.build = self.build, []
        self.core = self._new_core()
        self.core.build(_concat(held, self.build_schema))
        # the right rows in batches of the task's batch size (shuffle reads may come in
        # many small ones; each probe step has a cost per output column)
        rows = _concat(right, self.probe_schema)
        try:
            rows = rows.combine_chunks()
        except (pa.ArrowInvalid, pa.ArrowCapacityError):  # pragma: no cover - > 2 GB strings
            pass
        return [b for batch in rows.to_batches(max_chunksize=self._bs()) if batch.num_rows
                for b in self._out(self.core.probe(batch))]

    def _start_spilling(self) -> None:
        n = 16
        if self.ctx:
            self.ctx.increment_counter("millstream", "spills")
        self.build_spill = _JoinSpiller(self.ctx, self.build_keys, n, salt=0x10A7, prefix="joinr")
        self.probe_spill = _JoinSpiller(self.ctx, self.probe_keys, n, salt=0x10A7, prefix="joinl")
        for b in self.build:
            self.build_spill.write(b)
        self.build = []
        self.build_bytes = 0

    def _end_build(self) -> None:
        self.core = self._new_core()
        self.core.build(_concat(self.build, self.build_schema))
        self.build = []

    def end_input(self, port: int) -> Batches:
        if self.build_spill is not None or self.core is not None:
            return _EMPTY
        if self.pending is not None:
            if port == 1:
                return _EMPTY  # the left side decides
            if self.pending_rows and self.probe_schema is not None:
                return self._build_left()
            return self._build_right()
        if port == self.build_port:
            self._end_build()
        return _EMPTY

    def finish(self) -> Iterator[pa.RecordBatch]:
        if self.build_spill is not None:
            yield from self._finish_buckets()
        else:
            if self.core is None:
                yield from self._build_right()
            yield from self._probe_held()
            if self.probe_schema is not None or self.build_schema is not None:
                yield from self._out(self.core.finish(self.probe_schema, self._bs()))
        if not self.emitted and self.probe_schema is not None and self.build_schema is not None:
            # no rows at all: an empty batch with the output schema, so that what follows
            # (another join, an aggregate, a sort) still knows the columns
            yield (self.core or self._new_core_with(self.build_schema)).empty(self.probe_schema)

    def _new_core_with(self, schema: pa.Schema) -> JoinProbe:
        core = self._new_core()
        core.build(schema.empty_table())
        return core

    def _finish_buckets(self) -> Iterator[pa.RecordBatch]:
        assert self.build_spill is not None and self.probe_spill is not None
        try:
            for i in range(self.build_spill.num_buckets):
                core = self._new_core()
                core.build(_concat(list(self.build_spill.read_bucket(i)), self.build_schema))
                for b in self.probe_spill.read_bucket(i):
                    yield from self._out(core.probe(b))
                yield from self._out(core.finish(self.probe_schema, self._bs()))
                self.core = core
        finally:
            self.close()

    def close(self) -> None:
        for s in (self.build_spill, self.probe_spill):
            if s is not None:
                s.delete()
        self.build_spill = self.probe_spill = None


class _BuiltSides:
    """The indexed broadcast sides of the latest joins in this worker process: every task
    of a stage joins against the same blocks, so a worker indexes them once, not once per
    task (an LRU bounded in entries and bytes; keyed by the blocks' files, so a block
    written again is indexed again)."""

    MAX_ENTRIES = 4
    MAX_BYTES = 256 << 20

    def __init__(self) -> None:
        self.entries: OrderedDict[tuple, tuple[JoinProbe, pa.Schema | None, int]] = \
            OrderedDict()

    @staticmethod
    def key(blocks: list[Any] | None, *params: Any) -> tuple | None:
        """The cache key of a join's broadcast ``blocks`` (None: not cacheable, e.g. a
        runner's own handles)."""
        files = []
        for ref in blocks or []:
            path = getattr(ref, "path", None)
            if getattr(ref, "read", None) is not None or not isinstance(path, str):
                return None
            try:
                st = os.stat(path)
            except OSError:
                return None
            files.append((path, st.st_ino, st.st_size, st.st_mtime_ns))
        return (tuple(files), *params)

    def get(self, key: tuple | None) -> tuple[JoinProbe, pa.Schema | None] | None:
        hit = self.entries.get(key) if key is not None else None
        if hit is None:
            return None
        self.entries.move_to_end(key)
        return hit[0], hit[1]

    def put(self, key: tuple | None, core: JoinProbe, schema: pa.Schema | None) -> None:
        size = core.table.nbytes if core.table is not None else 0
        if key is None or size > self.MAX_BYTES // 2:
            return
        self.entries[key] = (core, schema, size)
        while len(self.entries) > self.MAX_ENTRIES or \
                sum(e[2] for e in self.entries.values()) > self.MAX_BYTES:
            self.entries.popitem(last=False)


_BUILT = _BuiltSides()


class BroadcastHashJoin(HashJoin):
    """A join whose build side (the whole small right side) is loaded at open(); a worker
    indexes it once for all the tasks it runs of the stage (see :class:`_BuiltSides`)."""

    num_inputs = 1
    input_order = (0,)

    def __init__(self, left_on: list[str], right_on: list[str], how: str, suffix: str,
                 broadcast_stage: Any = None, blocks: list[Any] | None = None,
                 condition: Any = None) -> None:
        super().__init__(left_on, right_on, how, suffix, broadcast=True, condition=condition)
        self.blocks = blocks

    def open(self, ctx) -> None:
        super().open(ctx)
        key = _BUILT.key(self.blocks, "right", tuple(self.left_on), tuple(self.right_on),
                         self.how, self.suffix, repr(self.condition))
        hit = _BUILT.get(key)
        if hit is not None:
            self.core, self.build_schema = hit
            self.core.on_build = self._count_build
            return
        for ref in self.blocks or []:
            for b in read_block(ref):
                HashJoin.process(self, b, 1)
        HashJoin.end_input(self, 1)
        if self.core is not None and self.core.matched is None:
            _BUILT.put(key, self.core, self.build_schema)


class BroadcastLeftHashJoin(Operator):
    """Joins each chunk of the (large) right side against the whole small left side,
    indexed once per task (inner and right joins)."""

    def __init__(self, left_on: list[str], right_on: list[str], how: str, suffix: str,
                 broadcast_stage: Any = None, blocks: list[Any] | None = None,
                 condition: Any = None) -> None:
        kind = "BroadcastLeftHashJoin" if left_on else "BroadcastLeftNestedLoopJoin"
        text = f"{kind}({how}, left_on={left_on}, right_on={right_on}"
        super().__init__(text + (f", condition={condition!r})" if condition is not None else ")"))
        self.core = JoinProbe(left_on, right_on, how, suffix, condition, build_left=True,
                              on_build=self._count_build)
        self.blocks = blocks
        self.probe_schema: pa.Schema | None = None
        self.emitted = False

    def _count_build(self) -> None:
        if self.ctx is not None:
            self.ctx.increment_counter(*BUILDS_COUNTER)

    def open(self, ctx) -> None:
        super().open(ctx)
        key = _BUILT.key(self.blocks, "left", tuple(self.core.left_on),
                         tuple(self.core.right_on), self.core.how, self.core.suffix,
                         repr(self.core.condition))
        hit = _BUILT.get(key)
        if hit is not None:
            self.core = hit[0]
            self.core.on_build = self._count_build
            return
        batches = [b for ref in self.blocks or [] for b in read_block(ref)]
        schema = next((b.schema for b in batches if b.num_columns), None)
        self.core.build(_concat(batches, schema))
        if self.core.matched is None:
            _BUILT.put(key, self.core, schema)

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        if self.probe_schema is None and batch.num_columns:
            self.probe_schema = batch.schema
        out = []
        for t in self.core.probe(batch):
            if t.num_rows:
                out.extend(table_to_batches(t, self.ctx.batch_size if self.ctx else 65536))
        self.emitted = self.emitted or bool(out)
        return out

    def finish(self) -> Batches:
        table = self.core.table
        if not self.emitted and self.probe_schema is not None and table is not None \
                and table.num_columns:
            return (self.core.empty(self.probe_schema),)
        return _EMPTY
