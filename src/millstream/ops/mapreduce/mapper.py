"""The MapReduce map side: a step's mapper (with its init/final hooks) and combiner.

``MapperOp`` turns a map task's input records into (key, value) pairs with the user's
mapper, and, with a combiner, groups them by key in a bounded buffer (Hadoop's sort
buffer) and runs the combiner over each group before they reach the shuffle.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa

from millstream.core.context import TaskContext
from millstream.errors import UserCodeFailure
from millstream.ops.base import Batches
from millstream.ops.mapreduce.columns import input_pairs
from millstream.ops.mapreduce.keys import encode_key
from millstream.ops.mapreduce.step import StepOperator, pair_error
from millstream.ops.narrow import _short, function_name

_EMPTY: tuple[pa.RecordBatch, ...] = ()


class MapperOp(StepOperator):
    """Runs one step's mapper (with its init/final hooks) and combiner over a map task."""

    role = "map"

    def open(self, ctx: TaskContext) -> None:
        super().open(ctx)
        spec = self.spec
        self.mapper = spec.mapper or _identity_mapper
        self.combiner = spec.combiner if self.output == "shuffle" else None
        self.started = False
        self.keys: list[Any] = []
        self.values: list[Any] = []
        self.groups: dict[Any, list[Any]] = {}
        self.buffered = 0
        # values held for the combiner before it runs (Hadoop's sort buffer)
        self.combine_limit = max(10_000, min(1_000_000, ctx.memory_budget // 256))

    def _start(self) -> None:
        self.started = True
        if self.spec.mapper_init is not None:
            self._call("mapper_init", self.spec.mapper_init)
        if self.combiner is not None and self.spec.combiner_init is not None:
            self._call("combiner_init", self.spec.combiner_init)

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        if batch.num_rows == 0:
            return _EMPTY
        return self._map(batch)

    def _map(self, batch: pa.RecordBatch) -> Iterator[pa.RecordBatch]:
        if not self.started:
            self._start()
        keys, values = input_pairs(batch)
        self._count("map input records", len(keys))
        if self.combiner is not None:
            yield from self._map_combining(keys, values)
        else:
            yield from self._map_plain(keys, values)

    def _map_plain(self, keys: list[Any], values: list[Any]) -> Iterator[pa.RecordBatch]:
        """Run the mapper; emit a batch whenever ``batch_rows`` pairs are buffered."""
        mapper = self.mapper
        out_k, out_v = self.keys, self.values
        ak, av = out_k.append, out_v.append
        limit = self.batch_rows
        records = zip(keys, values)
        k = v = None
        while True:
            done = True
            try:
                for k, v in records:
                    res = mapper(k, v)
                    if res is not None:
                        for item in res:
                            try:
                                k2, v2 = item
                            except (TypeError, ValueError):
                                raise pair_error("mapper", item) from None
                            ak(k2)
                            av(v2)
                    if len(out_k) >= limit:
                        done = False
                        break
            except Exception as exc:
                raise UserCodeFailure(self.name, function_name(mapper), exc,
                                      _short((k, v))) from exc
            if len(out_k) >= limit:
                yield from self._emit_plain()
                out_k, out_v = self.keys, self.values
                ak, av = out_k.append, out_v.append
            if done:
                return

    def _emit_plain(self) -> Iterator[pa.RecordBatch]:
        keys, values = self.keys, self.values
        self.keys, self.values = [], []
        self._count("map output records", len(keys))
        yield from self._batches(keys, values)

    def _map_combining(self, keys: list[Any], values: list[Any]) -> Iterator[pa.RecordBatch]:
        """Run the mapper, grouping its pairs by key; run the combiner when the buffer fills."""
        mapper = self.mapper
        groups = self.groups
        get = groups.get
        limit = self.combine_limit
        n = self.buffered
        records = zip(keys, values)
        k = v = None
        while True:
            done = True
            try:
                for k, v in records:
                    res = mapper(k, v)
                    if res is not None:
                        for item in res:
                            try:
                                k2, v2 = item
                            except (TypeError, ValueError):
                                raise pair_error("mapper", item) from None
                            t = type(k2)
                            # str and int keys group as themselves; others by their encoding
                            # (so that 1, 1.0 and True stay three keys, as in the shuffle)
                            gk = k2 if t is str or t is int else encode_key(k2)
                            lst = get(gk)
                            if lst is None:
                                groups[gk] = [k2, v2]
                            else:
                                lst.append(v2)
                            n += 1
                    if n >= limit:
                        done = False
                        break
            except Exception as exc:
                self.buffered = n
                raise UserCodeFailure(self.name, function_name(mapper), exc,
                                      _short((k, v))) from exc
            self.buffered = n
            if n >= limit:
                yield from self._combine()
                groups = self.groups
                get = groups.get
                n = 0
            if done:
                return

    def _group(self, keys: list[Any], values: list[Any]) -> None:
        groups = self.groups
        for k, v in zip(keys, values):
            t = type(k)
            gk = k if t is str or t is int else encode_key(k)
            lst = groups.get(gk)
            if lst is None:
                groups[gk] = [k, v]
            else:
                lst.append(v)
        self.buffered += len(keys)

    def _combine(self) -> Iterator[pa.RecordBatch]:
        groups, self.groups = self.groups, {}
        self._count("map output records", self.buffered)
        self._count("combine input records", self.buffered)
        self.buffered = 0
        combiner = self.combiner
        ok: list[Any] = []
        ov: list[Any] = []
        ak, av = ok.append, ov.append
        for lst in groups.values():
            key = lst[0]
            values = itertools.islice(lst, 1, None)
            self._collect("combiner", combiner, self._call_group(combiner, key, values), ak, av,
                          None, key)
        del groups
        self._count("combine output records", len(ok))
        yield from self._batches(ok, ov)

    def finish(self) -> Batches:
        return self._finish()

    def _finish(self) -> Iterator[pa.RecordBatch]:
        if not self.started:
            self._start()
        spec = self.spec
        if spec.mapper_final is not None:
            self._collect("mapper_final", spec.mapper_final,
                          self._call("mapper_final", spec.mapper_final),
                          self.keys.append, self.values.append, "<mapper_final>")
        if self.combiner is None:
            yield from self._emit_plain()
        else:
            keys, values = self.keys, self.values
            self.keys, self.values = [], []
            self._group(keys, values)
            yield from self._combine()
        if self.combiner is not None and spec.combiner_final is not None:
            ok: list[Any] = []
            ov: list[Any] = []
            self._collect("combiner_final", spec.combiner_final,
                          self._call("combiner_final", spec.combiner_final),
                          ok.append, ov.append, "<combiner_final>")
            self._count("combine output records", len(ok))
            yield from self._batches(ok, ov)
        self._flush_counts()

    def describe(self) -> str:
        spec = getattr(self, "spec", None) or self._load_spec()
        names = [f"mapper={function_name(spec.mapper)}" if spec and spec.mapper else "identity mapper"]
        if spec is not None and spec.combiner is not None and self.output == "shuffle":
            names.append(f"combiner={function_name(spec.combiner)}")
        return f"MapReduce {self.label} step {self.step + 1} map ({', '.join(names)})"

    def _load_spec(self) -> Any:
        import cloudpickle

        try:
            return cloudpickle.loads(self.payload)[1][self.step]
        except Exception:  # noqa: BLE001 - describe() must not fail
            return None


def _identity_mapper(key: Any, value: Any) -> Iterable[tuple[Any, Any]]:
    return ((key, value),)
