"""The non-windowed streaming aggregate: ``group_by(...).agg(...)`` on an unbounded stream,
a result per key that is updated as rows come (Flink's group aggregate).

Per input batch (mini-batch, as Flink's): the rows of every key in the batch are taken in
at once, so several changes of one key within a batch give one change of its result: a
new key's first result is an insert (+I); a changed result is a pair, the previous row
as an update-before (-U) and the new one as an update-after (+U); a key whose rows were
all taken back is deleted (-D, its last result); an unchanged result emits nothing. The
input may itself be a changelog (a retraction takes its row back out of the aggregates;
see :mod:`~millstream.ops.changelog.accumulators` for what each aggregate keeps per key).
A retraction for a key with no state is ignored (nothing was counted).

State: one entry per key (its row count, the accumulators and its last result) in a
:class:`~millstream.ops.state.store.KeyedStateStore`, spilling to local disk beyond the
memory limit and checkpointed by key group (restore at another parallelism).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from millstream.core.changelog import (
    CHANGE,
    DELETE,
    INSERT,
    UPDATE_AFTER,
    UPDATE_BEFORE,
    is_retraction,
    kinds,
    signs,
)
from millstream.errors import MillstreamError, PlanError
from millstream.expr.aggregates import AggSpec
from millstream.ops.aggregate import aggregate_result_schema
from millstream.ops.base import Batches
from millstream.ops.changelog.accumulators import make_accumulator
from millstream.ops.changelog.keyed import (
    KeyedChangeOperator,
    build_batch,
    group_rows,
    merge_schema,
)
from millstream.ops.state.store import CHECK_EVERY

_EMPTY: tuple[pa.RecordBatch, ...] = ()


class ChangelogAggregate(KeyedChangeOperator):
    """A continuously updated aggregate per key of ``keys`` (see the module docstring).

    ``retracting``: the input may take rows back (it is a changelog); on an append-only
    input min/max and first/last keep one value per key instead of their value lists.
    """

    kind = "ChangelogAggregate"
    accepts_updates = True
    emits_updates = True

    def __init__(self, keys: list[str], specs: list[AggSpec], retracting: bool = True,
                 name: str | None = None, state_memory_limit: int | None = None) -> None:
        text = ", ".join(f"{s.func}:{s.name}" for s in specs)
        super().__init__(keys, name or f"ChangelogAggregate(keys={list(keys)}, aggs=[{text}]"
                         + (", retracting" if retracting else "") + ")", state_memory_limit)
        self.specs = list(specs)
        self.retracting = retracting
        self._accs = [make_accumulator(s, retracting) for s in self.specs]
        self._state = self.store.value_state("acc")
        self._schema: pa.Schema | None = None
        self._out: pa.Schema | None = None

    def _extra_state(self) -> dict[str, Any]:
        return {"schema": self._schema}

    def _restore_extra(self, states: list[dict[str, Any]]) -> None:
        schemas = [st.get("schema") for st in states if st.get("schema") is not None]
        self._schema = schemas[0] if schemas else self._schema
        self._out = None

    def _output_schema(self) -> pa.Schema:
        """The result's columns, typed as the batch aggregate types them."""
        if self._out is None:
            try:
                self._out = aggregate_result_schema(self._schema, self.keys, self.specs)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
                raise PlanError(f"{self.name}: cannot type the result of input columns "
                                f"{self._schema}: {exc}") from exc
        return self._out

    def process(self, batch: pa.RecordBatch, port: int = 0) -> Batches:
        if batch.num_rows == 0:
            return _EMPTY
        schema = merge_schema(self._schema, batch)
        if self._schema is None or not schema.equals(self._schema):
            self._schema, self._out = schema, None
        k = kinds(batch)
        if not self.retracting and CHANGE in batch.schema.names and is_retraction(k).any():
            raise MillstreamError(f"{self.name}: planned for an append-only input, but "
                                  f"retractions arrived (please report this)")
        sg = signs(k)
        groups = group_rows(batch, self.keys)
        n = len(groups)
        row_delta = np.bincount(groups.gids, weights=sg, minlength=n).astype(np.int64).tolist()
        accs = self._accs
        active = [(j + 1, accs[j].apply, c) for j, c in
                  enumerate(a.prepare(batch, sg, groups) for a in accs)
                  if any(x is not None for x in c)]
        results = [(j + 1, a.result) for j, a in enumerate(accs)]
        last = len(accs) + 1  # the state's slot of the last emitted result
        out: list[tuple] = []
        out_kinds: list[int] = []
        store, state_handle = self.store, self._state
        set_key, hashes = store.set_current_key, groups.hashes
        single = len(self.keys) == 1
        check = CHECK_EVERY
        for i, key in enumerate(groups.keys):
            set_key(key, hashes[i])
            state = state_handle.value()
            delta = row_delta[i]
            if state is None:
                if delta <= 0:  # nothing held for the key: a retraction of it is moot
                    continue
                old = None
                state = [0, *(a.initial() for a in accs), None]
                state_handle.update(state)
            else:
                old = state[last]
            rows = state[0] = state[0] + delta
            for j, apply, contribution in active:
                c = contribution[i]
                if c is not None:
                    state[j] = apply(state[j], c)
            kv = (key,) if single else key
            if rows <= 0:
                state_handle.clear()
                if old is not None:
                    out.append(kv + old)
                    out_kinds.append(DELETE)
            else:
                new = tuple([result(state[j], rows) for j, result in results])
                if old is None:
                    out.append(kv + new)
                    out_kinds.append(INSERT)
                elif new != old:
                    out += (kv + old, kv + new)
                    out_kinds += (UPDATE_BEFORE, UPDATE_AFTER)
                state[last] = new
            check -= 1
            if not check:
                check = CHECK_EVERY
                store.maintain()
        store.maintain()
        if not out:
            return _EMPTY
        return (build_batch(self._output_schema(), out, out_kinds),)

