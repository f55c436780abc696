"""Analytic window functions over partitions (``row_number``, ``rank``, ``lag``, framed
aggregates, ...): ``kernels`` (vectorized functions over sorted chunks), ``frames``
(frame bounds, RANGE searches) and ``operator`` (the sorting, chunking, spilling operator
and the result types)."""

from millstream.ops.analytic.operator import (
    AnalyticWindow,
    attach,
    compute_columns,
    result_type,
    window_field,
)

__all__ = ["AnalyticWindow", "attach", "compute_columns", "result_type", "window_field"]
