"""More date and time operations, with SQL's meaning, registered as ``dt_*`` operations
beside those of ``expr.datetime``: EXTRACT's fields, interval arithmetic (months with
the day clamped to the month's end, days, microseconds), differences of dates, and the
window bounds of Flink's windowing table-valued functions (the start of a row's
tumbling window; the starts or ends of its hopping or cumulating windows).

Build them with :func:`temporal` (``temporal("add_interval", col("d"), months=1)``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from millstream.expr.registry import _OPS, _register
from millstream.expr.types import Datum, _broadcast

_US = pa.timestamp("us")


def _extract(v: list[Datum], p: dict[str, Any], n: int) -> Datum:
    x, field = v[0], p["field"]
    if pa.types.is_null(x.type):
        return pa.nulls(n, pa.int64()) if isinstance(x, pa.Array) else pa.scalar(None, pa.int64())
    simple = {"year": pc.year, "month": pc.month, "day": pc.day, "hour": pc.hour,
              "minute": pc.minute, "second": pc.second, "quarter": pc.quarter,
              "week": pc.iso_week, "doy": pc.day_of_year, "isoyear": pc.iso_year}
    if field in simple:
        return simple[field](x).cast(pa.int64())
    if field == "dow":  # Sunday 0 ... Saturday 6
        return pc.day_of_week(x, count_from_zero=True, week_start=7).cast(pa.int64())
    if field == "isodow":  # Monday 1 ... Sunday 7
        return pc.day_of_week(x, count_from_zero=False, week_start=1).cast(pa.int64())
    if field in ("millisecond", "microsecond"):
        sub = pc.add(pc.multiply(pc.millisecond(x), 1000), pc.microsecond(x)) \
            if field == "microsecond" else pc.millisecond(x)
        scale = 1_000_000 if field == "microsecond" else 1000
        return pc.add(pc.multiply(pc.second(x).cast(pa.int64()), scale), sub.cast(pa.int64()))
    if field == "epoch":
        us = (x.cast(_US) if pa.types.is_date(x.type) else x.cast(
            pa.timestamp("us", x.type.tz))).cast(pa.int64())
        return pc.divide(us.cast(pa.float64()), 1e6)
    raise pa.ArrowNotImplementedError(f"EXTRACT({field}) is not supported")


_register("dt_extract", "method", "dt.extract", _extract, pos=("field",))


def _add_months_days(days: np.ndarray, months: int) -> np.ndarray:
    """Dates (days since the epoch) plus ``months``, the day clamped to the month's end."""
    d = days.astype("datetime64[D]")
    ym = d.astype("datetime64[M]")
    dom = (d - ym.astype("datetime64[D]")).astype(np.int64)
    new = ym + np.timedelta64(months, "M")
    length = ((new + np.timedelta64(1, "M")).astype("datetime64[D]")
              - new.astype("datetime64[D]")).astype(np.int64)
    return (new.astype("datetime64[D]") + np.minimum(dom, length - 1)).astype(np.int64)


def _add_interval(v: list[Datum], p: dict[str, Any], n: int) -> Datum:
    """``x`` plus ``months`` months, ``days`` days and ``micros`` microseconds: a date stays
    a date when the interval has whole days only, else it becomes a timestamp."""
    x = v[0]
    months, days, micros = p["months"], p["days"], p["micros"]
    scalar = isinstance(x, pa.Scalar)
    arr = _broadcast(x, 1 if scalar else n)
    t = arr.type
    if pa.types.is_null(t):
        return x
    valid = pc.is_valid(arr)
    mask = pc.invert(valid).to_numpy(zero_copy_only=False)
    if pa.types.is_date(t) and micros == 0:
        d = arr.cast(pa.date32()).cast(pa.int32()).fill_null(0).to_numpy(
            zero_copy_only=False).astype(np.int64)
        if months:
            d = _add_months_days(d, months)
        out = pa.array((d + days).astype(np.int32), pa.int32(),
                       mask=mask if mask.any() else None).cast(pa.date32())
    else:
        unit_t = pa.timestamp("us", t.tz if pa.types.is_timestamp(t) else None)
        us = arr.cast(unit_t).cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)
        if months:
            day, rest = np.divmod(us, 86_400_000_000)
            us = _add_months_days(day, months) * 86_400_000_000 + rest
        us = us + days * 86_400_000_000 + micros
        out = pa.array(us, pa.int64(), mask=mask if mask.any() else None).cast(unit_t)
    return out[0] if scalar else out


_register("dt_add_interval", "method", "dt.add_interval", _add_interval,
          default={"months": 0, "days": 0, "micros": 0})


_BETWEEN = {"year": pc.years_between, "quarter": pc.quarters_between,
            "week": pc.weeks_between, "day": pc.days_between, "hour": pc.hours_between,
            "minute": pc.minutes_between, "second": pc.seconds_between,
            "millisecond": pc.milliseconds_between, "microsecond": pc.microseconds_between}


def _diff(v: list[Datum], p: dict[str, Any], n: int) -> Datum:
    """How many ``unit`` boundaries lie between ``v[0]`` and ``v[1]`` (DuckDB's date_diff;
    ``a - b`` of two dates is ``diff('day', b, a)``)."""
    a, b = v
    unit = p["unit"]
    if unit == "month":
        months = pc.add(pc.multiply(pc.subtract(pc.year(b), pc.year(a)), 12),
                        pc.subtract(pc.month(b), pc.month(a)))
        return months.cast(pa.int64())
    return _BETWEEN[unit](a, b).cast(pa.int64())


_register("dt_diff", "method", "dt.diff", _diff, pos=("unit",))


def _as_micros(x: Datum, n: int) -> tuple[np.ndarray, np.ndarray | None, pa.DataType]:
    arr = _broadcast(x, n)
    tz = arr.type.tz if pa.types.is_timestamp(arr.type) else None
    t = pa.timestamp("us", tz)
    us = arr.cast(t).cast(pa.int64())
    mask = pc.is_null(us).to_numpy(zero_copy_only=False) if us.null_count else None
    return us.fill_null(0).to_numpy(zero_copy_only=False), mask, t


def _window_start(v: list[Datum], p: dict[str, Any], n: int) -> Datum:
    """The start of the tumbling window of ``size`` µs (shifted by ``offset``) holding
    each time."""
    us, mask, t = _as_micros(v[0], n)
    size, offset = p["size"], p["offset"]
    start = (us - offset) // size * size + offset
    return pa.array(start, pa.int64(), mask=mask).cast(t)


_register("dt_window_start", "method", "dt.window_start", _window_start,
          pos=("size",), default={"offset": 0})


def _window_bounds(v: list[Datum], p: dict[str, Any], n: int) -> Datum:
    """Per time, the list of the windows holding it: their starts for hopping windows
    (``size`` every ``step``), their ends for cumulating windows (``step`` growing to
    ``size``)."""
    us, mask, t = _as_micros(v[0], n)
    size, step, offset = p["size"], p["step"], p["offset"]
    if p["kind"] == "hop":
        last = (us - offset) // step * step + offset
        count = -(-size // step)
        cand = last[:, None] - np.arange(count)[None, :] * step
        keep = cand > (us - size)[:, None]
    else:
        start = (us - offset) // size * size + offset
        count = size // step
        cand = start[:, None] + np.arange(1, count + 1)[None, :] * step
        keep = cand > us[:, None]
    lengths = keep.sum(axis=1)
    offsets = np.zeros(len(us) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = pa.array(cand[keep], pa.int64()).cast(t)
    out = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values,
                                   mask=None if mask is None else pa.array(mask))
    return out


_register("dt_window_bounds", "method", "dt.window_bounds", _window_bounds,
          pos=("kind", "size", "step"), default={"offset": 0})


def temporal(name: str, *args: Any, **params: Any) -> Any:
    """The date/time operation ``dt_<name>`` on ``args`` (expressions or values)."""
    from millstream.expr.nodes import _Func, _lit_or_expr

    op = f"dt_{name}"
    return _Func(op, tuple(_lit_or_expr(a) for a in args), {**_OPS[op].default, **params})
