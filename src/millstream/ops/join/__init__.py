"""Equi-joins, joins with a residual condition, cross joins and nested loops over Arrow
batches: the build side is indexed once per task (``index``, ``keys``), probe batches
stream through it (``probe``), and the operators (``hash_join``) spill when the build side
outgrows the task's memory budget."""

from millstream.ops.join.hash_join import (
    BUILDS_COUNTER,
    BroadcastHashJoin,
    BroadcastLeftHashJoin,
    HashJoin,
    join_tables,
)
from millstream.ops.join.index import JoinIndex
from millstream.ops.join.probe import JOIN_TYPES, JoinLayout, JoinProbe

__all__ = ["BUILDS_COUNTER", "JOIN_TYPES", "BroadcastHashJoin", "BroadcastLeftHashJoin",
           "HashJoin", "JoinIndex", "JoinLayout", "JoinProbe", "join_tables"]
