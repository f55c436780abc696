"""Hash joins: the build side (port 1) is collected first, the probe side (port 0) streams.

When the build side outgrows the task's memory budget, both sides are hash-partitioned
into buckets on disk and joined bucket by bucket (grace hash join). The same operator
serves the shuffle hash join (both ports read shuffle slices) and the broadcast join
(port 1 reads the whole small side).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from millstream.core.arrow import batch_nbytes, concat_batches, normalize_key, table_to_batches
from millstream.core.shuffle import read_block
from millstream.core.spill import BucketSpiller
from millstream.errors import PlanError, SchemaError
from millstream.ops.base import Batches, Operator

_EMPTY: tuple[pa.RecordBatch, ...] = ()
JOIN_TYPES = {
    "inner": "inner",
    "left": "left outer",
    "right": "right outer",
    "outer": "full outer",
    "full": "full outer",
    "semi": "left semi",
    "anti": "left anti",
}
_LI, _RI = "__millstream_li", "__millstream_ri"


def join_tables(left: pa.Table, right: pa.Table, left_on: list[str], right_on: list[str],
                how: str, suffix: str = "_right") -> pa.Table:
    """Join two in-memory tables; null keys never match (SQL semantics).

    Only key columns and row indices go through the Arrow hash join; the other columns
    are gathered afterwards, so columns of any type (lists, pickled objects) are carried.
    Same-named keys (``on=``) appear once in the output, coalesced for outer joins.
    """
    for k in left_on:
        if k not in left.schema.names:
            raise SchemaError(f"join: left side has no key column {k!r}; columns are {left.schema.names}")
    for k in right_on:
        if k not in right.schema.names:
            raise SchemaError(f"join: right side has no key column {k!r}; columns are {right.schema.names}")
    jt = JOIN_TYPES[how]
    lk = pa.table([normalize_key(left.column(k)) for k in left_on]
                  + [pa.array(np.arange(left.num_rows, dtype=np.int64))],
                  names=[f"__k{i}" for i in range(len(left_on))] + [_LI])
    rk = pa.table([normalize_key(right.column(k)) for k in right_on]
                  + [pa.array(np.arange(right.num_rows, dtype=np.int64))],
                  names=[f"__k{i}" for i in range(len(right_on))] + [_RI])
    # unify key types (int32 vs int64, string vs large_string)
    for i in range(len(left_on)):
        lt, rt = lk.column(i).type, rk.column(i).type
        if not lt.equals(rt):
            try:
                common = pa.unify_schemas([pa.schema([("x", lt)]), pa.schema([("x", rt)])],
                                          promote_options="permissive").field("x").type
            except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                raise SchemaError(f"join: key {left_on[i]!r} is {lt} on the left and "
                                  f"{right_on[i]!r} is {rt} on the right; cast one side") from exc
            lk = lk.set_column(i, f"__k{i}", lk.column(i).cast(common))
            rk = rk.set_column(i, f"__k{i}", rk.column(i).cast(common))
    keys = [f"__k{i}" for i in range(len(left_on))]
    joined = lk.join(rk, keys, join_type=jt, use_threads=False, coalesce_keys=True)
    li = joined.column(_LI)
    if jt in ("left semi", "left anti"):
        return left.take(li)
    ri = joined.column(_RI)
    same = [a == b for a, b in zip(left_on, right_on)]
    shared_keys = {a for a, s in zip(left_on, same) if s}
    arrays, names = [], []
    for name in left.schema.names:
        if name in shared_keys and jt in ("right outer", "full outer"):
            # the coalesced key keeps the type both sides were unified to: casting it back to
            # the left type fails for a null-typed left key and can overflow (int32 vs int64)
            arrays.append(joined.column(f"__k{left_on.index(name)}"))
        else:
            arrays.append(left.column(name).take(li))
        names.append(name)
    left_names = set(left.schema.names)
    for name in right.schema.names:
        if name in shared_keys:
            continue
        out = name if name not in left_names else name + suffix
        arrays.append(right.column(name).take(ri))
        names.append(out)
    return pa.table(arrays, names=names)


class HashJoin(Operator):
    """Equi-join of port 0 (left, probe) with port 1 (right, build)."""

    num_inputs = 2
    input_order = (1, 0)

    def __init__(self, left_on: list[str], right_on: list[str], how: str = "inner",
                 suffix: str = "_right", broadcast: bool = False) -> None:
        if how not in JOIN_TYPES:
            raise PlanError(f"join how={how!r} is not one of {sorted(set(JOIN_TYPES))}")
        if len(left_on) != len(right_on) or not left_on:
            raise PlanError("join needs the same number (at least one) of left and right keys")
        kind = "BroadcastHashJoin" if broadcast else "ShuffleHashJoin"
        super().__init__(f"{kind}({how}, left_on={left_on}, right_on={right_on})")
        self.left_on, self.right_on, self.how, self.suffix = left_on, right_on, how, suffix
        self.build: list[pa.RecordBatch] = []
        self.build_bytes = 0
        self.build_table: pa.Table | None = None
        self.probe: list[pa.RecordBatch] = []
        self.probe_bytes = 0
        # schemas seen on each side (also from empty batches): an empty side still needs its
        # columns, or the output of this task would name and order columns differently
        self.probe_schema: pa.Schema | None = None
        self.build_schema: pa.Schema | None = None
        self.emitted = False  # any output batch yet (else finish sends a typed empty one)
        self.rspill: BucketSpiller | None = None
        self.lspill: BucketSpiller | None = None
        # right/outer joins must see all probe rows before emitting unmatched build rows
        self.streaming_probe = how in ("inner", "left", "semi", "anti")

    def _limit(self) -> int:
        return max(4 << 20, (self.ctx.memory_budget if self.ctx else 64 << 20) // 2)

    def _bs(self) -> int:
        return self.ctx.batch_size if self.ctx else 65536

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        if port == 1:
            if self.build_schema is None and batch.num_columns:
                self.build_schema = batch.schema
            if self.rspill is not None:
                self.rspill.write(batch)
                return _EMPTY
            self.build.append(batch)
            self.build_bytes += batch_nbytes(batch)
            if self.build_bytes > self._limit():
                self._start_spilling()
            return _EMPTY
        if self.probe_schema is None and batch.num_columns:
            self.probe_schema = batch.schema
        if batch.num_rows == 0:
            return _EMPTY
        if self.lspill is not None:
            self.lspill.write(batch)
            return _EMPTY
        if self.streaming_probe:
            return self._join(pa.Table.from_batches([batch]))
        self.probe.append(batch)
        self.probe_bytes += batch_nbytes(batch)
        if self.probe_bytes > self._limit():
            self._start_spilling()
        return _EMPTY

    def _start_spilling(self) -> None:
        n = 16
        if self.ctx:
            self.ctx.increment_counter("millstream", "spills")
        self.rspill = BucketSpiller(self.ctx, self.right_on, n, salt=0x10A7, prefix="joinr")
        self.lspill = BucketSpiller(self.ctx, self.left_on, n, salt=0x10A7, prefix="joinl")
        for b in self.build:
            self.rspill.write(b)
        if self.build_table is not None:
            for b in self.build_table.to_batches():
                self.rspill.write(b)
        for b in self.probe:
            self.lspill.write(b)
        self.build, self.build_table, self.probe = [], None, []
        self.build_bytes = self.probe_bytes = 0

    def _right_schema_table(self) -> pa.Table:
        if self.build_table is None:
            self.build_table = concat_batches(self.build)
            self.build = []
        return self.build_table

    def end_input(self, port: int) -> Batches:
        if port == 1 and self.rspill is None:
            self._right_schema_table()
        return _EMPTY

    def _empty_left(self, right: pa.Table) -> pa.Table:
        if self.probe_schema is not None:
            return self.probe_schema.empty_table()
        return pa.table({k: pa.array([], right.column(r).type) for k, r in zip(self.left_on, self.right_on)})

    def _empty_right(self, left: pa.Table) -> pa.Table:
        if self.build_schema is not None:
            return self.build_schema.empty_table()
        return pa.table({r: pa.array([], left.column(k).type if k in left.schema.names else pa.null())
                         for k, r in zip(self.left_on, self.right_on)})

    def _join(self, left: pa.Table) -> Batches:
        right = self._right_schema_table()
        if right.num_columns == 0:
            right = self._empty_right(left)
        out = join_tables(left, right, self.left_on, self.right_on, self.how, self.suffix)
        if not out.num_rows:
            return _EMPTY
        self.emitted = True
        return table_to_batches(out, self._bs())

    def finish(self) -> Iterator[pa.RecordBatch]:
        for b in self._finish():
            self.emitted = True
            yield b
        if not self.emitted and self.probe_schema is not None and self.build_schema is not None:
            # no rows at all: an empty batch with the output schema, so that what follows
            # (another join, an aggregate, a sort) still knows the columns
            out = join_tables(self.probe_schema.empty_table(), self.build_schema.empty_table(),
                              self.left_on, self.right_on, self.how, self.suffix)
            yield pa.RecordBatch.from_arrays([pa.array([], f.type) for f in out.schema], schema=out.schema)

    def _finish(self) -> Batches:
        if self.rspill is not None:
            return self._finish_buckets()
        if self.streaming_probe:
            return _EMPTY
        left = concat_batches(self.probe)
        self.probe = []
        if left.num_columns == 0:
            # no probe rows at all: still emit build rows for right/outer joins
            right = self._right_schema_table()
            if right.num_rows == 0:
                return _EMPTY
            left = self._empty_left(right)
        return self._join(left)

    def _finish_buckets(self) -> Iterator[pa.RecordBatch]:
        assert self.rspill is not None and self.lspill is not None
        try:
            for i in range(self.rspill.num_buckets):
                right = concat_batches(list(self.rspill.read_bucket(i)))
                left = concat_batches(list(self.lspill.read_bucket(i)))
                if left.num_rows == 0 and (right.num_rows == 0 or self.how in ("inner", "left", "semi", "anti")):
                    continue
                if right.num_columns == 0:
                    right = self._empty_right(left)
                if left.num_columns == 0:
                    left = self._empty_left(right)
                out = join_tables(left, right, self.left_on, self.right_on, self.how, self.suffix)
                if out.num_rows:
                    yield from table_to_batches(out, self._bs())
        finally:
            self.close()

    def close(self) -> None:
        for s in (self.rspill, self.lspill):
            if s is not None:
                s.delete()
        self.rspill = self.lspill = None


class BroadcastHashJoin(HashJoin):
    """A hash join whose build side (the whole small dataset) is loaded at open()."""

    num_inputs = 1
    input_order = (0,)

    def __init__(self, left_on: list[str], right_on: list[str], how: str, suffix: str,
                 broadcast_stage: Any = None, blocks: list[Any] | None = None) -> None:
        super().__init__(left_on, right_on, how, suffix, broadcast=True)
        self.blocks = blocks

    def open(self, ctx) -> None:
        super().open(ctx)
        for ref in self.blocks or []:
            for b in read_block(ref):
                HashJoin.process(self, b, 1)
        HashJoin.end_input(self, 1)

    def finish(self):
        return HashJoin.finish(self)


class BroadcastLeftHashJoin(Operator):
    """Joins each chunk of the (large) right side against the whole small left side."""

    def __init__(self, left_on: list[str], right_on: list[str], how: str, suffix: str,
                 broadcast_stage: Any = None, blocks: list[Any] | None = None) -> None:
        super().__init__(f"BroadcastLeftHashJoin({how}, left_on={left_on}, right_on={right_on})")
        if how not in ("inner", "right"):
            raise ValueError(f"a broadcast left side only serves inner and right joins, not {how}")
        self.left_on, self.right_on, self.how, self.suffix = left_on, right_on, how, suffix
        self.blocks = blocks
        self.left: pa.Table | None = None

    def open(self, ctx) -> None:
        super().open(ctx)
        self.left = concat_batches([b for ref in self.blocks or [] for b in read_block(ref)])

    def process(self, batch: pa.RecordBatch, port: int = 0):

        right = pa.Table.from_batches([batch])
        left = self.left
        if left is None or left.num_columns == 0:
            left = pa.table({k: pa.array([], right.column(r).type)
                             for k, r in zip(self.left_on, self.right_on)})
        if batch.num_rows == 0:
            return ()
        out = join_tables(left, right, self.left_on, self.right_on, self.how, self.suffix)
        return table_to_batches(out, self.ctx.batch_size if self.ctx else 65536) if out.num_rows else ()
