"""Window Top-N on streams: ``ROW_NUMBER() / RANK() / DENSE_RANK() OVER (PARTITION BY
window_start, window_end, ... ORDER BY ...)`` over a windowed stream (a windowing
function's rows or a window aggregate's), usually filtered by ``rownum <= N``.

The engine's analytic Window node runs in batch only; on a stream each window's rows are
kept in keyed state (a keyed process function per partition) until the watermark passes
the window's end, then numbered in order and emitted. The same query in batch mode uses
the Window node and gives the same rows.
"""

from __future__ import annotations

import datetime as _dt
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from millstream.api.analytic import _substitute, window_exprs
from millstream.expr.analytic import WindowExpr
from millstream.expr.nodes import Column, Expr
from millstream.ops.state.process import KeyedProcessFunction
from millstream.plan import logical as L
from millstream.sql.scope import Relation

if TYPE_CHECKING:
    from millstream.sql.select import SelectBuilder

RANKINGS = ("row_number", "rank", "dense_rank")
_EPOCH = _dt.datetime(1970, 1, 1)


def _micros(value: Any) -> int:
    if isinstance(value, _dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(_dt.timezone.utc).replace(tzinfo=None)
        return (value - _EPOCH) // _dt.timedelta(microseconds=1)
    return int(value)


class WindowRanking(KeyedProcessFunction):
    """Keeps a window partition's rows until the watermark passes the window's end, then
    emits them with their row numbers / ranks (``outputs``: (column, function))."""

    def __init__(self, end_column: str, order: list[tuple[str, bool, bool]],
                 outputs: list[tuple[str, str]]) -> None:
        self.end_column = end_column
        self.order = order  # (column, descending, nulls first)
        self.outputs = outputs

    def process_element(self, row: dict[str, Any], ctx: Any) -> None:
        ctx.get_list_state("rows").add(row)
        ctx.timer_service().register_event_time_timer(_micros(row[self.end_column]) - 1)
        return None

    def _sort_key(self, row: dict[str, Any]) -> tuple:
        key = []
        for name, desc, nulls_first in self.order:
            v = row.get(name)
            null_rank = 0 if (v is None) == nulls_first else 1
            key.append((null_rank, _Ordered(v, desc)))
        return tuple(key)

    def on_timer(self, timestamp: int, ctx: Any) -> list[dict[str, Any]]:
        state = ctx.get_list_state("rows")
        rows = state.get()
        state.clear()
        rows.sort(key=self._sort_key)
        out = []
        prev = None
        rank = dense = 0
        for i, row in enumerate(rows, start=1):
            peers = tuple(row.get(n) for n, _, _ in self.order)
            if peers != prev:
                rank, dense, prev = i, dense + 1, peers
            values = {"row_number": i, "rank": rank, "dense_rank": dense}
            for name, func in self.outputs:
                row[name] = values[func]
            out.append(row)
        return out


class _Ordered:
    """A value that sorts ascending or descending (None compares equal to None)."""

    __slots__ = ("desc", "v")

    def __init__(self, v: Any, desc: bool):
        self.v, self.desc = v, desc

    def __lt__(self, other: _Ordered) -> bool:
        if self.v is None or other.v is None:
            return False
        return self.v > other.v if self.desc else self.v < other.v

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Ordered) and self.v == other.v


def lower_stream_windows(b: SelectBuilder, rel: Relation, exprs: list[Expr]
                         ) -> tuple[L.Node, list[Expr], list[str]]:
    """The window functions of ``exprs`` over a windowed stream as keyed process nodes:
    the node, the expressions reading their columns instead, the private names."""
    found = [w for e in exprs for w in window_exprs(e)]
    if not found:
        return rel.node, exprs, []
    info = rel.window
    if info is None or not info.materialized:
        raise b.p.error("window functions on a stream need PARTITION BY window_start, "
                        "window_end of a windowing function or window aggregate (window "
                        "Top-N); others need the whole stream", b.sel)
    start, end = info.columns["window_start"], info.columns["window_end"]
    schema = rel.node.schema
    if schema is None:
        raise b.p.error("the columns of the stream are not known before it runs", b.sel)
    groups: dict[tuple, list[tuple[WindowExpr, str]]] = {}
    names: dict[int, str] = {}
    for w in found:
        if id(w) in names:
            continue
        parts = [e.name for e in w.spec.partition_by if isinstance(e, Column)]
        order = [e.name for e in w.spec.order_by if isinstance(e, Column)]
        if w.func not in RANKINGS or len(parts) != len(w.spec.partition_by) \
                or len(order) != len(w.spec.order_by) or start not in parts or end not in parts:
            raise b.p.error(f"on a stream, {w.func}() OVER (...) is supported as window Top-N: "
                            f"ROW_NUMBER/RANK/DENSE_RANK over PARTITION BY window_start, "
                            f"window_end (and columns) ORDER BY columns", b.sel)
        nulls_last = w.spec.nulls_last
        spec = tuple((o, d, (not d) if nulls_last is None else (not nulls_last))
                     for o, d in zip(order, w.spec.descending))
        names[id(w)] = b.p.fresh("rank")
        groups.setdefault((tuple(parts), spec), []).append((w, names[id(w)]))
    node = rel.node
    for (parts, spec), items in groups.items():
        outputs = [(name, w.func) for w, name in items]
        fields = list(node.schema) + [pa.field(n, pa.int64()) for n, _ in outputs]
        fn = WindowRanking(end, list(spec), outputs)
        node = L.KeyedProcess(node, fn, tuple(parts), None, pa.schema(fields))
    out = []
    for e in exprs:
        new = _substitute(e, names)
        out.append(new if new.output_name == e.output_name else new.alias(e.output_name))
    return node, out, list(names.values())
