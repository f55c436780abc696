"""MapReduce operators: a job's mapper (and combiner) per map task, its reducer per partition.

The map side emits batches with a canonical, order-preserving byte encoding of each key
(column ``__mr_key``) and the value in an exact encoding; the engine hash-partitions on
``__mr_key``; the reduce side sorts by it and runs the reducer group by group.

- ``keys``: the canonical key encoding (and the key order it gives).
- ``values``: the exact value encoding (a type tag and a binary payload per value).
- ``columns``: input records as (key, value) pairs; natural Arrow types of the output.
- ``step``: what both operators share: output modes, partitioner, counters.
- ``mapper``: ``MapperOp`` (mapper, hooks and combiner).
- ``reducer``: ``ReducerOp`` (external sort by key, reducer per group).
"""

from millstream.ops.mapreduce.keys import decode_key, encode_key, encode_keys
from millstream.ops.mapreduce.mapper import MapperOp
from millstream.ops.mapreduce.reducer import ReducerOp
from millstream.ops.mapreduce.step import KEY_COLUMN, PART_COLUMN
from millstream.ops.mapreduce.values import column_values, decode_values, encode_values

__all__ = [
    "KEY_COLUMN",
    "PART_COLUMN",
    "MapperOp",
    "ReducerOp",
    "column_values",
    "decode_key",
    "decode_values",
    "encode_key",
    "encode_keys",
    "encode_values",
]
