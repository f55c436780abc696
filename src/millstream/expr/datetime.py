"""Date and time operations: the fields and truncation registered as ``dt_*`` operations and
the ``.dt`` namespace of an expression (``col("t").dt.year()``)."""

from __future__ import annotations

import builtins
import re
from typing import TYPE_CHECKING, Any

import pyarrow.compute as pc

from millstream.errors import PlanError
from millstream.expr.registry import _register

if TYPE_CHECKING:
    from millstream.expr.nodes import Expr

_DT_FIELDS = {
    "year": pc.year, "month": pc.month, "day": pc.day, "hour": pc.hour, "minute": pc.minute,
    "second": pc.second, "millisecond": pc.millisecond, "day_of_week": pc.day_of_week,
    "day_of_year": pc.day_of_year,
}
for _name, _fn in _DT_FIELDS.items():
    _register(f"dt_{_name}", "method", f"dt.{_name}",
              (lambda f: lambda v, p, n: f(v[0]))(_fn),
              (lambda f: lambda e, p: f(e[0]))(_fn))

_UNITS = {
    "ns": "nanosecond", "us": "microsecond", "µs": "microsecond", "ms": "millisecond",
    "s": "second", "m": "minute", "min": "minute", "h": "hour", "d": "day", "w": "week",
    "mo": "month", "q": "quarter", "y": "year",
}
_EVERY_RE = re.compile(r"^\s*(\d*)\s*([a-zµ]+)\s*$")


def _parse_every(every: str) -> tuple[int, str]:
    """Parse "15m", "1h", "1d", "1mo", "hour" ... into (multiple, Arrow temporal unit)."""
    m = _EVERY_RE.match(every) if isinstance(every, builtins.str) else None
    if m:
        unit = m.group(2)
        if unit in _UNITS:
            unit = _UNITS[unit]
        elif unit.endswith("s") and unit[:-1] in _UNITS.values():
            unit = unit[:-1]  # "hours" -> "hour"
        if unit in _UNITS.values():
            k = int(m.group(1) or 1)
            if k > 0:
                return k, unit
    raise PlanError(
        f"cannot read the interval {every!r}; use e.g. '1ns', '1us', '1ms', '1s', '15m', '1h', "
        f"'1d', '1w', '1mo', '1q', '1y'"
    )


_register("dt_truncate", "method", "dt.truncate",
          lambda v, p, n: pc.floor_temporal(v[0], multiple=p["multiple"], unit=p["unit"]),
          lambda e, p: pc.floor_temporal(e[0], multiple=p["multiple"], unit=p["unit"]),
          pos=("every",))


class _DtNamespace:
    """Date and time functions of an expression: ``col("t").dt.year()``."""

    def __init__(self, expr: Expr):
        self._expr = expr

    def _f(self, op: str, **params: Any) -> Expr:
        return self._expr._apply(op, **params)

    def year(self) -> Expr:
        """Year."""
        return self._f("dt_year")

    def month(self) -> Expr:
        """Month, 1-12."""
        return self._f("dt_month")

    def day(self) -> Expr:
        """Day of the month, 1-31."""
        return self._f("dt_day")

    def hour(self) -> Expr:
        """Hour, 0-23."""
        return self._f("dt_hour")

    def minute(self) -> Expr:
        """Minute, 0-59."""
        return self._f("dt_minute")

    def second(self) -> Expr:
        """Whole seconds, 0-59."""
        return self._f("dt_second")

    def millisecond(self) -> Expr:
        """Milliseconds within the second, 0-999."""
        return self._f("dt_millisecond")

    def day_of_week(self) -> Expr:
        """Day of the week, Monday=0 ... Sunday=6 (like datetime.weekday())."""
        return self._f("dt_day_of_week")

    def day_of_year(self) -> Expr:
        """Day of the year, 1-366."""
        return self._f("dt_day_of_year")

    def truncate(self, every: str) -> Expr:
        """Round down to a multiple of an interval such as "15m", "1h", "1d", "1w", "1mo", "1y"."""
        k, unit = _parse_every(every)
        return self._f("dt_truncate", every=every, multiple=k, unit=unit)
