"""Physical planning of joins: batch joins (broadcast either side, shuffle hash, nested
loop on one partition, adaptive broadcast) and streaming joins (stream-table, regular,
interval, window and latest-value joins, both inputs exchanged by key).

:class:`JoinPlanning` is a part of :class:`~millstream.plan.physical.PhysicalPlanner`
(mixed into it): it uses the planner's ``build``, ``_close``, ``_keyed``, settings ``s``
and ``estimator``."""

from __future__ import annotations

from typing import Any

from millstream.core.shuffle import HashPartitioner, RoundRobinPartitioner
from millstream.ops.base import OperatorFactory
from millstream.ops.join import BroadcastHashJoin, BroadcastLeftHashJoin, HashJoin
from millstream.ops.join.runtime_filter import KeyFilter
from millstream.plan import logical as L
from millstream.plan.estimates import describe
from millstream.plan.stages import AdaptiveJoin, Pipeline, ShufflePort, Stage


class JoinPlanning:
    """The join part of the physical planner."""

    s: Any
    estimator: Any

    def build(self, node: L.Node) -> list[Pipeline]:  # (the planner's)
        raise NotImplementedError

    def _close(self, pipes: list[Pipeline], partitioner: Any, purpose: str) -> Stage:
        raise NotImplementedError

    def _keyed(self, pipes: list[Pipeline], keys: list[str], purpose: str) -> Pipeline:
        raise NotImplementedError

    def _build_Join(self, node: L.Join) -> list[Pipeline]:
        if self.s.streaming and node.joins_streams():
            return self._build_regular_join(node)
        lk, rk, cond = list(node.left_on), list(node.right_on), node.condition
        if self.s.streaming:
            from millstream.ops.stream_join import BroadcastTableJoin

            left = self.build(node.left)
            for p in left:
                p.add(OperatorFactory(BroadcastTableJoin, list(lk), list(rk), node.how,
                                      node.suffix, table_node=node.right, condition=cond),
                      node.label() + " (stream-table: bounded right side broadcast)")
            return left
        strategy, est_l, est_r = self._join_strategy(node)
        loop = "" if lk else " nested loop"
        sizes = f"estimated left {describe(est_l)}, right {describe(est_r)}"
        if strategy == "right":
            left = self.build(node.left)
            small = Stage(self.build(node.right), "blocks", purpose="broadcast side of join")
            for p in left:
                p.add(self._join_factory(node, BroadcastHashJoin, small),
                      node.label() + f" (broadcast{loop}; {sizes})")
            return left
        if strategy == "left":
            # the small LEFT side goes to every task of the right side; each right chunk is
            # joined against it (only inner and right joins can be decided chunk by chunk)
            small = Stage(self.build(node.left), "blocks", purpose="broadcast left side of join")
            right = self.build(node.right)
            for p in right:
                p.add(self._join_factory(node, BroadcastLeftHashJoin, small),
                      node.label() + f" (broadcast left{loop}; {sizes})")
            return right
        left = self.build(node.left)
        right = self.build(node.right)
        if strategy == "single":
            # no keys to partition by, and a join type that needs all of both sides in one
            # task (outer, or a side that must not be broadcast)
            ls = self._close(left, RoundRobinPartitioner(1), "join left side (one partition)")
            rs = self._close(right, RoundRobinPartitioner(1), "join right side (one partition)")
            new = Pipeline([ShufflePort(ls), ShufflePort(rs)])
            new.add(self._join_factory(node, HashJoin),
                    node.label() + f" (nested loop, one partition; {sizes})")
            return [new]
        n = self.s.shuffle_partitions
        ls = self._close(left, HashPartitioner(list(lk), n), "join left side")
        rs = self._close(right, HashPartitioner(list(rk), n), "join right side")
        new = Pipeline([ShufflePort(ls), ShufflePort(rs)])
        text = node.label() + f" (shuffle hash; {sizes}"
        can_right = node.how in ("inner", "left", "semi", "anti")
        can_left = node.how in ("inner", "right")
        if node.broadcast is None and (can_left or can_right):
            bytes_l = None if est_l is None else est_l.bytes
            bytes_r = None if est_r is None else est_r.bytes
            new.adaptive = AdaptiveJoin(
                ls, rs, self.s.broadcast_threshold,
                self._join_factory(node, BroadcastHashJoin, rs) if can_right else None,
                self._join_factory(node, BroadcastLeftHashJoin, ls) if can_left else None,
                bytes_l, bytes_r, node.label(),
                filter_left=(OperatorFactory(KeyFilter, list(lk), list(rk), broadcast_stage=rs)
                             if node.how in ("inner", "right", "semi")
                             and _filter_pays(est_r, rk, est_l, lk) else None),
                filter_right=(OperatorFactory(KeyFilter, list(rk), list(lk), broadcast_stage=ls)
                              if node.how in ("inner", "left", "semi", "anti")
                              and _filter_pays(est_l, lk, est_r, rk) else None))
            text += "; adaptive: may switch to broadcast"
            if new.adaptive.filter_left or new.adaptive.filter_right:
                text += " or filter a side by the other's keys"
        # a semi or anti join indexes its left side when that is the smaller: the big right
        # side only streams through it (DuckDB's and Velox's "right semi join")
        build_left = node.how in ("semi", "anti") and _smaller(est_l, est_r)
        if build_left:
            text += "; builds the left side"
        new.add(self._join_factory(node, HashJoin, build_left=build_left), text + ")")
        return [new]

    def _join_factory(self, node: L.Join, cls: type, broadcast: Stage | None = None,
                      build_left: bool = False) -> OperatorFactory:
        """The operator of ``node``: a shuffle hash join (indexing its left side when
        ``build_left``), or a broadcast join whose small side is the output of
        ``broadcast``."""
        args = (list(node.left_on), list(node.right_on), node.how, node.suffix)
        if broadcast is None:
            if build_left:
                return OperatorFactory(cls, *args, condition=node.condition, build_left=True)
            return OperatorFactory(cls, *args, condition=node.condition)
        return OperatorFactory(cls, *args, broadcast_stage=broadcast, condition=node.condition)

    def _join_strategy(self, node: L.Join) -> tuple[str, Any, Any]:
        """How a batch join runs, with the sides' estimates: "right" (broadcast the right
        side), "left" (broadcast the left side), "shuffle" (hash-partition both by key) or
        "single" (both sides in one task: a join without keys that no broadcast can serve).

        A side is broadcast when its estimated size is within ``broadcast_threshold``
        (``node.broadcast`` forces or forbids the right side) and the join type lets each
        task decide alone: a broadcast right side serves inner, left, semi and anti joins,
        a broadcast left side inner and right joins. Without keys there is no shuffle:
        the smaller side the join type allows is broadcast.
        """
        right_ok = node.how in ("inner", "left", "semi", "anti")
        left_ok = node.how in ("inner", "right")
        est_l = self.estimator.estimate(node.left)
        est_r = self.estimator.estimate(node.right)
        bytes_l = None if est_l is None else est_l.bytes
        bytes_r = None if est_r is None else est_r.bytes
        if node.left_on:
            thr = self.s.broadcast_threshold
            if node.broadcast is None:
                small_right = right_ok and bytes_r is not None and bytes_r <= thr
                small_left = left_ok and bytes_l is not None and bytes_l <= thr
                if small_right and small_left and bytes_l < bytes_r:  # type: ignore[operator]
                    small_right = False
            else:
                small_right, small_left = node.broadcast and right_ok, False
            if small_right:
                return "right", est_l, est_r
            if small_left:
                return "left", est_l, est_r
            return "shuffle", est_l, est_r
        if node.broadcast is True and right_ok:
            return "right", est_l, est_r
        if node.broadcast is False:
            return ("left" if left_ok else "single"), est_l, est_r
        if right_ok and left_ok:
            left_smaller = bytes_l is not None and (bytes_r is None or bytes_l < bytes_r)
            return ("left" if left_smaller else "right"), est_l, est_r
        if right_ok:
            return "right", est_l, est_r
        return ("left" if left_ok else "single"), est_l, est_r

    def _keyed_two_inputs(self, node: L.IntervalJoin | L.WindowJoin | L.LatestJoin | L.Join,
                          factory: OperatorFactory, what: str,
                          broadcast: int | None = None) -> list[Pipeline]:
        """Both inputs get the hidden join keys, are exchanged by them, and feed ``factory``.

        ``broadcast`` (streaming: the port of a small input, see :func:`broadcast_input`):
        that input goes whole to every task of the join, the other one is forwarded to
        the join task in its own slot (its rows never cross processes)."""
        from millstream.ops.stream_join import JoinKeys, join_key_names

        hidden = join_key_names(len(node.left_on))
        n = self.s.shuffle_partitions
        stages = []
        for port, (side, child, keys) in enumerate((("left", node.left, node.left_on),
                                                    ("right", node.right, node.right_on))):
            pipes = self.build(child)
            for p in pipes:
                p.add(OperatorFactory(JoinKeys, list(keys), side),
                      f"{what} {side} keys {list(keys)}")
            if broadcast is None:
                stages.append(self._close(pipes, HashPartitioner(hidden, n),
                                          f"{what} {side} side"))
            else:
                mine = port == broadcast
                stages.append(Stage(pipes, "shuffle", partitioner=RoundRobinPartitioner(n),
                                    purpose=f"{what} {side} side"
                                            + (" (small: broadcast)" if mine else ""),
                                    forward=not mine, broadcast=mine))
        new = Pipeline([ShufflePort(stages[0]), ShufflePort(stages[1])])
        new.add(factory, node.label() + ("" if broadcast is None else
                                         f" ({('left', 'right')[broadcast]} input broadcast)"))
        return [new]

    def _build_regular_join(self, node: L.Join) -> list[Pipeline]:
        """A join of two streams in a streaming job: both sides exchanged by key into a
        ``RegularJoin`` (keyed state, updates for outer joins)."""
        from millstream.ops.stream_join import RegularJoin

        lt, rt = node.time_columns
        return self._keyed_two_inputs(node, OperatorFactory(
            RegularJoin, list(node.left_on), list(node.right_on), node.how, node.suffix,
            state_ttl=node.state_ttl, left_time=lt, right_time=rt,
            emit_kinds=node.emits_updates, condition=node.condition,
            input_schemas=(node.left.schema, node.right.schema)), "regular join")

    def _build_IntervalJoin(self, node: L.IntervalJoin) -> list[Pipeline]:
        from millstream.ops.stream_join import IntervalJoin

        b = broadcast_input(node) if self.s.streaming else None
        return self._keyed_two_inputs(node, OperatorFactory(
            IntervalJoin, list(node.left_on), list(node.right_on), node.lower, node.upper,
            node.left_time, node.right_time, node.how, node.suffix, broadcast=b,
            input_schemas=(node.left.schema, node.right.schema)),
            "interval join", b)

    def _build_WindowJoin(self, node: L.WindowJoin) -> list[Pipeline]:
        from millstream.ops.stream_join import WindowJoin

        b = broadcast_input(node) if self.s.streaming else None
        return self._keyed_two_inputs(node, OperatorFactory(
            WindowJoin, list(node.left_on), list(node.right_on), node.window, node.left_time,
            node.right_time, node.how, node.suffix, broadcast=b,
            input_schemas=(node.left.schema, node.right.schema)), "window join", b)

    def _build_LatestJoin(self, node: L.LatestJoin) -> list[Pipeline]:
        from millstream.ops.stream_join import LatestJoin

        return self._keyed_two_inputs(node, OperatorFactory(
            LatestJoin, list(node.left_on), list(node.right_on), node.how, node.suffix,
            version=node.version, deleted=node.deleted), "latest join")


#: nodes that emit at most as many rows as they read, one row per input row or fewer
_ROW_PRESERVING = (L.Project, L.Filter, L.FilterRows, L.WithColumns, L.Drop, L.Rename, L.Map,
                   L.Shared)


def small_stream(node: L.Node) -> bool:
    """Whether a stream is known to be small: a window aggregate without group keys (one
    row per window) under operators that keep or drop rows."""
    from millstream.expr.windows import GlobalWindow

    while isinstance(node, _ROW_PRESERVING):
        node = node.children[0]
    return (isinstance(node, L.WindowAggregate) and not node.keys
            and not isinstance(node.window, GlobalWindow))


def broadcast_input(node: L.IntervalJoin | L.WindowJoin) -> int | None:
    """The input (port) of a streaming interval or window join to broadcast to every join
    task instead of exchanging both by key: a small one (:func:`small_stream`) whose rows
    need no answer from every task (not an outer side), when the other is not small too.
    Then the other input's rows stay in the tasks that made them."""
    small = [small_stream(node.left), small_stream(node.right)]
    if small[0] == small[1]:
        return None
    port = 0 if small[0] else 1
    if node.how == "outer" or node.how == ("left", "right")[port]:
        return None
    return port


def _smaller(a: Any, b: Any) -> bool:
    """Whether estimate ``a`` is known to have well fewer rows than ``b`` (indexing
    costs by the row)."""
    if a is None or b is None:
        return False
    return a.rows * 2 < b.rows


#: a runtime filter is planned when it is expected to keep at most this share of rows
_FILTER_KEEPS_AT_MOST = 0.5


def _filter_pays(small: Any, small_keys: list[str], big: Any, big_keys: list[str]) -> bool:
    """Whether filtering the ``big`` side by the ``small`` side's keys is expected to drop
    rows: the small side's distinct keys are well fewer than the big side's (a foreign-key
    join against a whole table drops none). Unknown distinct counts: tried (a task stops
    testing when its first rows all pass)."""
    known = False
    for ks, kb in zip(small_keys, big_keys):
        ns = small.ndv(ks) if small is not None else None
        nb = big.ndv(kb) if big is not None else None
        if ns is None or nb is None:
            continue
        known = True
        if ns <= _FILTER_KEEPS_AT_MOST * nb:
            return True
    return not known

