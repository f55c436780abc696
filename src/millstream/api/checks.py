"""Checks made when a transformation is built (``Dataset`` calls them): a column that is
not there, a type an expression or aggregate cannot take, a non-boolean filter are a
SchemaError at the user's call, naming the call, the missing columns (with the closest
existing names) and where it was made. Where a Python function hides the columns the
checks wait for the job (nothing is guessed)."""

from __future__ import annotations

import difflib
import os
import sys
from typing import Any

import pyarrow as pa

from millstream.core.lazy_pandas import blocking
from millstream.errors import SchemaError
from millstream.expr.aggregates import AggSpec
from millstream.expr.nodes import Expr
from millstream.plan import logical as L

#: What the user called to make each kind of node (error messages name it).
_CALLS = {
    "Project": "select", "WithColumns": "with_columns", "Filter": "filter", "Drop": "drop",
    "Rename": "rename", "Explode": "explode", "Aggregate": "group_by(...).agg",
    "Distinct": "distinct", "Join": "join", "Sort": "sort", "Union": "union",
    "Limit": "limit", "Repartition": "repartition", "WithWatermark": "with_watermark",
    "WindowAggregate": "window(...).agg", "KeyedProcess": "group_by(...).process",
    "IntervalJoin": "interval_join", "WindowJoin": "window_join", "LatestJoin": "join_latest",
    "Deduplicate": "drop_duplicates", "TopN": "top_n", "ToChangelog": "to_changelog",
    "FromChangelog": "from_changelog",
}
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check_node(node: L.Node, call: str | None = None) -> None:
    """Raise the SchemaError of a transformation that cannot work on its input's columns
    (see :class:`~millstream.api.dataset.Dataset`), naming the call, the columns it lacks
    (with the closest names) and where the user made it."""
    try:
        node.checked_schema()
    except SchemaError as exc:
        raise schema_error(str(exc), node, call) from None


def schema_error(message: str, node: L.Node, call: str | None = None) -> SchemaError:
    """A SchemaError for the user's ``call`` that built ``node``: ``message``, what the
    missing columns may have meant, and the file and line of the call."""
    call = call or _CALLS.get(type(node).__name__, type(node).__name__)
    hint = _suggestions(node)
    where = _user_frame()
    text = f"{call}(): {message}{hint}" + (f" [at {where}]" if where else "")
    return SchemaError(text)


def _suggestions(node: L.Node) -> str:
    """``; did you mean 'x'?`` for each column ``node`` reads that its input lacks."""
    wanted: list[tuple[set[str], pa.Schema | None]] = []
    if isinstance(node, L.Join):
        wanted = [(set(node.left_on), node.left.schema), (set(node.right_on), node.right.schema)]
    elif len(node.children) == 1:
        refs = node.references()
        wanted = [(set(refs or ()), node.children[0].schema)]
    hints = []
    for names, schema in wanted:
        if schema is None:
            continue
        for name in sorted(n for n in names if schema.get_field_index(n) < 0):
            close = difflib.get_close_matches(name, schema.names, n=1)
            if close:
                hints.append(f"did you mean {close[0]!r} for {name!r}?")
    return ("; " + " ".join(hints)) if hints else ""


def _user_frame() -> str | None:
    """``file:line`` of the innermost caller outside Millstream (the user's call)."""
    frame = sys._getframe(1)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if not path.startswith(_PACKAGE_DIR + os.sep):
            return f"{frame.f_code.co_filename}:{frame.f_lineno}"
        frame = frame.f_back  # type: ignore[assignment]
    return None


def check_keys(node: L.Node, keys: list[Any]) -> None:
    """group_by keys: named columns must exist, expressions must compute."""
    schema = node.schema
    if schema is None:
        return
    names = [k for k in keys if isinstance(k, str)]
    exprs = [k for k in keys if isinstance(k, Expr)]
    missing = [k for k in names if schema.get_field_index(k) < 0]
    probe: L.Node = L.Aggregate(node, tuple(names), ())
    if missing:
        raise schema_error(f"no key column(s) {missing}; columns are {schema.names}", probe,
                           "group_by")
    if exprs:
        check_node(L.WithColumns(node, tuple(e.alias(f"__key{i}") for i, e in enumerate(exprs))),
                   "group_by")


def check_aggregates(node: L.Node, keys: list[str], specs: tuple[AggSpec, ...]) -> None:
    """Each aggregate must accept its argument's type (``sum`` of strings does not)."""
    from millstream.ops.aggregate import aggregate_result_schema

    schema = node.schema
    if schema is None:
        return
    agg = L.Aggregate(node, tuple(keys), specs)
    check_node(agg, "agg")
    try:
        with blocking():  # the engine's own typing (core.lazy_pandas)
            aggregate_result_schema(schema, list(keys), [])
    except Exception:  # noqa: BLE001 - the keys themselves: left to the job to report
        return
    for spec in specs:
        try:
            aggregate_result_schema(schema, list(keys), [spec])
        except (pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            arg = spec.arg
            t = arg.output_type(schema) if arg is not None else None
            raise schema_error(f"{spec.func}({arg!r}) cannot take a column of type {t} "
                               f"(output {spec.name!r}): {str(exc).splitlines()[0]}",
                               agg, "agg") from None
        except Exception:  # noqa: BLE001 - not a type error: the job reports it if real
            continue
