"""The logical plan: typed, immutable nodes built lazily by the Dataset API.

A node says *what* to compute, never how: no operator factories, no untyped payloads.
Every node has ``children`` and ``with_children`` (so rules rewrite a tree generically),
``references()`` (the input columns it reads by name, when known) and ``schema`` (its
output columns, derived from its inputs' without running anything; None where a Python
function hides it). The physical planner (``plan/physical.py``) picks the operators.

``base`` holds the node base classes and the scan, ``relational`` the row, expression and
relational nodes (and MapReduce steps), ``event_time`` watermarks, windows, process
functions and stream joins, ``analytic`` the window functions over partitions,
``changelog`` deduplication, top-N and the conversions of changelog streams.
"""

from millstream.plan.logical.analytic import Window
from millstream.plan.logical.base import Node, SameColumns, Scan, Unary
from millstream.plan.logical.changelog import Deduplicate, FromChangelog, ToChangelog, TopN
from millstream.plan.logical.event_time import (
    IntervalJoin,
    KeyedProcess,
    LatestJoin,
    WindowAggregate,
    WindowJoin,
    WithWatermark,
)
from millstream.plan.logical.relational import (
    NARROW_NODES,
    Aggregate,
    Cache,
    Distinct,
    Drop,
    Explode,
    Filter,
    FilterRows,
    FlatMap,
    Join,
    Limit,
    Map,
    MapBatches,
    MapReduceStep,
    Project,
    Rename,
    Repartition,
    Shared,
    Sort,
    TopK,
    Union,
    WithColumns,
)

__all__ = [
    "NARROW_NODES", "Aggregate", "Cache", "Deduplicate", "Distinct", "Drop", "Explode", "Filter",
    "FilterRows", "FlatMap", "FromChangelog", "IntervalJoin", "Join", "KeyedProcess",
    "LatestJoin", "Limit", "Map", "MapBatches", "MapReduceStep", "Node", "Project", "Rename",
    "Repartition", "SameColumns", "Scan", "Shared", "Sort", "ToChangelog", "TopK", "TopN",
    "Union", "Unary", "Window", "WindowAggregate", "WindowJoin", "WithColumns", "WithWatermark",
]
