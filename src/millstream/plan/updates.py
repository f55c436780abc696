"""Updates in a streaming plan: which nodes emit them, which take them, and whether the
sink can take what reaches it.

Nodes declare ``accepts_updates`` and ``emits_updates`` (``plan/logical/base.py``);
:func:`check_updates` walks a streaming plan and raises a :class:`PlanError` naming the
first node that would get updates it cannot take, and the node they come from; and an
aggregate the streaming aggregate cannot compute on what it gets (a sketch such as
``approx_count_distinct`` over a changelog, :func:`check_aggregate`).
:func:`check_sink` compares the result with what the sink declares (its
``changelog_mode``, see ``core.changelog``): an append-only sink refuses an updating
result; an upsert sink needs a result key its ``upsert_keys`` cover (:func:`upsert_key`).
"""

from __future__ import annotations

from typing import Any

from millstream.core.changelog import APPEND, UPSERT, sink_mode
from millstream.errors import PlanError
from millstream.expr.nodes import Alias, Column
from millstream.ops.changelog.aggregate import refusal
from millstream.ops.join import JoinLayout
from millstream.plan import logical as L

#: What to do instead, by the kind of node that refuses updates.
_TO_ROWS = ("to_changelog() turns the updates into plain rows with a 'change' column "
            "(+I, -U, +U, -D) that it can take")


def origin(node: L.Node) -> L.Node | None:
    """The node that makes the updates in ``node``'s output (None: it has none)."""
    if not node.emits_updates:
        return None
    if node.produces_updates or not node.children:
        return node
    for c in node.children:
        found = origin(c)
        if found is not None:
            return found
    return node


def _hint(node: L.Node) -> str:
    if isinstance(node, L.WindowAggregate):
        return ("a window aggregate needs append-only input; aggregate without a window "
                "(group_by(...).agg(...) takes updates), or " + _TO_ROWS)
    if isinstance(node, L.Deduplicate):
        return ("deduplicate before the updating step, or distinct() (of whole rows, it "
                "takes updates), or " + _TO_ROWS)
    if isinstance(node, L.Repartition):
        return ("an exchange by other columns could reorder the changes of one result row "
                "(its -U and +U taking different paths); repartition before the updating "
                "step, or " + _TO_ROWS)
    return _TO_ROWS


def _streamed(node: L.Node) -> tuple[L.Node, ...]:
    """The inputs of ``node`` that run as streams (a stream-table join's bounded right
    side runs as a batch job, whose results are final; a regular join's both do)."""
    if isinstance(node, L.Join) and not node.joins_streams():
        return (node.left,)
    return node.children


def check_aggregate(node: L.Aggregate) -> None:
    """Raise a PlanError when an aggregate of ``node`` cannot run in a streaming job: one
    the streaming aggregate does not compute, or a sketch over a changelog (a sketch cannot
    take a value back)."""
    src = origin(node.child)
    for spec in node.specs:
        why = refusal(spec, src is not None)
        if why is not None:
            came = f" ({src.label()} emits -U/+U/-D rows)" if src is not None else ""
            raise PlanError(f"{node.label()}: {why}{came}")


def check_updates(node: L.Node) -> None:
    """Raise a PlanError where a node of a streaming plan gets updates it cannot take, or
    aggregates what it cannot (:func:`check_aggregate`)."""
    for c in _streamed(node):
        check_updates(c)
    if isinstance(node, L.Aggregate):
        check_aggregate(node)
    if node.accepts_updates:
        return
    for c in _streamed(node):
        src = origin(c)
        if src is not None:
            raise PlanError(f"{node.label()} cannot take the updates (-U/+U/-D rows) that "
                            f"{src.label()} emits in a streaming job; {_hint(node)}")


def upsert_key(node: L.Node) -> tuple[str, ...] | None:
    """Columns that identify a row of ``node``'s updating result (each key has at most one
    row at a time), as far as the plan shows; None when unknown."""
    if isinstance(node, L.Aggregate):
        return tuple(node.keys)
    if isinstance(node, L.Deduplicate):
        return tuple(node.subset)
    if isinstance(node, L.Distinct):
        schema = node.schema
        return None if schema is None else tuple(schema.names)
    if isinstance(node, L.TopN):
        return (*node.per, node.rank_column) if node.rank_column else None
    if isinstance(node, L.Join):
        return _join_key(node)
    if isinstance(node, (L.Filter, L.FilterRows, L.WithWatermark)):
        return upsert_key(node.child)
    if isinstance(node, (L.WithColumns, L.Drop)):
        key = upsert_key(node.child)
        gone = node.produced() if isinstance(node, L.WithColumns) else set(node.columns)
        return key if key is not None and not set(key) & gone else None
    if isinstance(node, L.Rename):
        key = upsert_key(node.child)
        names = dict(node.mapping)
        return None if key is None else tuple(names.get(k, k) for k in key)
    if isinstance(node, L.Project):
        key = upsert_key(node.child)
        if key is None:
            return None
        kept: dict[str, str] = {}  # input column -> its name in the output
        for e in node.exprs:
            inner = e.child if isinstance(e, Alias) else e
            if isinstance(inner, Column):
                kept.setdefault(inner.name, e.output_name)
        return tuple(kept[k] for k in key) if all(k in kept for k in key) else None
    return None


def _join_key(node: L.Join) -> tuple[str, ...] | None:
    """A regular stream join's result key, from its inputs' keys (as Flink derives unique
    keys): a side's key stays a key when each of its rows meets at most one row of the
    other side (the other's key lies within its join keys), or the two keys together.

    Only keys that hold the side's join keys count: the changes of one result row then
    all come from one join task (a row whose join key changed would otherwise have its
    -U and +U on two tasks, applied by the sink in either order). Outer sides' keys count
    only where they cannot be null: the left's in a left join, the right's in a right
    join, the same-named (coalesced) join keys of a full join of two sides unique on them
    when one side's keys cannot be null (a null key on both sides makes two padded rows).
    """
    lschema, rschema = node.left.schema, node.right.schema
    if not node.joins_streams() or lschema is None or rschema is None:
        return None
    lkey, rkey = upsert_key(node.left), upsert_key(node.right)
    layout = JoinLayout(lschema, rschema, list(node.left_on), list(node.right_on), node.how,
                        node.suffix)
    names: dict[tuple[str, str], str] = {}  # (side, input column) -> its output column
    for f, side, src in layout.columns:
        if side == "k":  # a coalesced same-named key
            names["l", node.left_on[src]] = names["r", node.right_on[src]] = f.name
        else:
            names[side, src] = f.name
    for lk, rk in zip(node.left_on, node.right_on):  # a same-named key kept once (inner)
        if ("l", lk) in names:
            names.setdefault(("r", rk), names["l", lk])

    def out(*keys: tuple[str, tuple[str, ...] | None]) -> tuple[str, ...] | None:
        cols = [names.get((side, c)) for side, key in keys for c in key or ()]
        return None if None in cols else tuple(dict.fromkeys(cols))  # type: ignore[arg-type]

    lheld = lkey is not None and set(node.left_on) <= set(lkey)
    rheld = rkey is not None and set(node.right_on) <= set(rkey)
    lone = rkey is not None and set(rkey) <= set(node.right_on)  # a left row meets <= 1 row
    rone = lkey is not None and set(lkey) <= set(node.left_on)
    how = node.how
    if how in ("semi", "anti"):
        return out(("l", lkey)) if lheld else None
    if how in ("inner", "left") and lheld and lone:
        return out(("l", lkey))
    if how in ("inner", "right") and rheld and rone:
        return out(("r", rkey))
    if how == "inner" and (lheld or rheld) and lkey is not None and rkey is not None:
        return out(("l", lkey), ("r", rkey))
    if how == "outer" and lheld and rheld and lone and rone and node.left_on == node.right_on \
            and (not any(lschema.field(k).nullable for k in node.left_on)
                 or not any(rschema.field(k).nullable for k in node.right_on)):
        return out(("l", lkey))  # (null keys never match: two padded rows of a null key)
    return None


def check_sink(node: L.Node, sink: Any) -> None:
    """Raise a PlanError when ``sink`` cannot take what the streaming plan ``node`` gives."""
    if not node.emits_updates:
        return
    mode = sink_mode(sink)
    src = origin(node)
    what = f"the result is updating ({src.label()} emits -U/+U/-D rows)"
    name = type(sink).__name__
    if mode == APPEND:
        raise PlanError(
            f"the sink {name} takes appends only, but {what}; write the changes with a sink "
            f"that takes them: ms.file_sink(path, changelog=True) (a 'change' column), "
            f"ms.sink(fn) or the collecting sink (the change kind in column 'change'), or an "
            f"upsert sink keyed by the result's key; or make them plain rows with "
            f"to_changelog()")
    if mode == UPSERT:
        keys = tuple(getattr(sink, "upsert_keys", None) or ())
        key = upsert_key(node)
        if not keys:
            raise PlanError(f"the upsert sink {name} declares no upsert_keys")
        schema = node.schema
        if schema is not None:
            missing = [k for k in keys if k not in schema.names]
            if missing:
                raise PlanError(f"the upsert sink {name} is keyed by {list(keys)}, but the "
                                f"result has no column(s) {missing}; columns are "
                                f"{schema.names}")
        if key is None:
            raise PlanError(f"the upsert sink {name} is keyed by {list(keys)}, but {what} "
                            f"and its rows have no key the plan can tell (an aggregate's group "
                            f"keys, drop_duplicates' subset, top_n's groups and rank, a join's "
                            f"sides' keys when they hold the join keys): write it to a sink "
                            f"that takes retractions instead")
        if not set(key) <= set(keys):
            raise PlanError(f"the upsert sink {name} is keyed by {list(keys)}, but the "
                            f"result's rows are keyed by {list(key)} ({src.label()}): two "
                            f"rows of one sink key would overwrite each other; key the sink "
                            f"by {list(key)}")
