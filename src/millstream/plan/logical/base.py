"""The base of logical nodes: ``Node``, one-input nodes, and the scan of a source."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from functools import cached_property
from typing import ClassVar

import pyarrow as pa

from millstream.core.lazy_pandas import blocking
from millstream.errors import SchemaError
from millstream.expr.aggregates import AggSpec
from millstream.io.base import Source
from millstream.plan import schema as S


@dataclass(frozen=True, eq=False)
class Node:
    """Base of logical plan nodes; ``children`` are the inputs.

    Updates (a streaming job's changelog rows, see ``core.changelog``): a node says
    whether it takes them (``accepts_updates``) and whether its output carries them
    (``emits_updates``); ``plan/updates.py`` checks a streaming plan and its sink with
    these. In batch mode no node emits updates (results are final).
    """

    #: Whether the node takes input rows that are changes (-U/+U/-D), in a streaming job.
    accepts_updates: ClassVar[bool] = False
    #: Whether the node's output carries updates whatever its input (aggregates, ...).
    produces_updates: ClassVar[bool] = False

    @property
    def emits_updates(self) -> bool:
        """Whether, in a streaming job, the output may hold updates: the node produces
        them, or takes them and passes its inputs' on."""
        return self.produces_updates or (self.accepts_updates and
                                         any(c.emits_updates for c in self.children))

    @property
    def children(self) -> tuple[Node, ...]:
        return ()

    def with_children(self, children: tuple[Node, ...]) -> Node:
        """The same node over other inputs (as many as ``children``)."""
        return self

    def runs_user_code(self) -> bool:
        """Whether this node itself (not its children) may call the user's code: functions,
        UDFs in expressions, generators (``plan.user_code``)."""
        from millstream.plan.user_code import fields_have_user_code

        return fields_have_user_code(self, Node)

    def label(self) -> str:
        """One line for explain()."""
        return type(self).__name__

    def transform_up(self, rule: Callable[[Node], Node]) -> Node:
        """``rule`` applied to every node of the tree, inputs first (a rule returns the node
        it was given when it does not apply; unchanged subtrees stay the same objects)."""
        children = self.children
        node = self
        if children:
            new = tuple(c.transform_up(rule) for c in children)
            if any(a is not b for a, b in zip(new, children)):
                node = self.with_children(new)
        return rule(node)

    def tree(self, indent: int = 0) -> str:
        """The plan as an indented tree, for explain()."""
        lines = ["  " * indent + self.label()]
        for c in self.children:
            lines.append(c.tree(indent + 1))
        return "\n".join(lines)

    def references(self) -> frozenset[str] | None:
        """The input columns this node reads by name; None when it may read any (a Python
        function, a whole-row operation)."""
        return None

    # ------------------------------------------------------------------ schema
    def compute_schema(self) -> pa.Schema | None:
        """The output schema from the inputs' (``checked_schema()`` of the children);
        None when it cannot be known without running. Raises SchemaError for a column
        that is not there."""
        return None

    @cached_property
    def _schema_or_error(self) -> tuple[pa.Schema | None, SchemaError | None]:
        try:
            # the engine's own typing needs no pandas (see core.lazy_pandas); user code may
            with blocking(not self.runs_user_code()):
                return self.compute_schema(), None
        except SchemaError as exc:
            return None, exc
        except Exception:  # noqa: BLE001 - e.g. a kernel that cannot type an empty input:
            return None, None  # unknown here; the job reports its own error when it runs

    @property
    def schema(self) -> pa.Schema | None:
        """The output schema, or None when unknown (also when a column is missing: see
        :meth:`checked_schema`). Computed once, never runs a job."""
        return self._schema_or_error[0]

    def checked_schema(self) -> pa.Schema | None:
        """As :attr:`schema`, but raises the SchemaError of a missing column or wrong type."""
        schema, error = self._schema_or_error
        if error is not None:
            raise SchemaError(*error.args)
        return schema


@dataclass(frozen=True, eq=False)
class Scan(Node):
    """Rows of a source."""

    source: Source

    def label(self) -> str:
        return f"Scan {self.source.describe()}"

    def runs_user_code(self) -> bool:
        return getattr(self.source, "runs_user_code", True)

    def compute_schema(self) -> pa.Schema | None:
        schema = self.source.schema()  # a source that fails here fails again when it runs
        # no column at all (``from_items([])``) says nothing about the columns rows will have
        return schema if schema is None or len(schema) else None


@dataclass(frozen=True, eq=False)
class Unary(Node):
    """A node with exactly one input, ``child``."""

    child: Node

    @property
    def children(self) -> tuple[Node, ...]:
        return (self.child,)

    def with_children(self, children: tuple[Node, ...]) -> Node:
        return replace(self, child=children[0])

    def input_schema(self) -> pa.Schema | None:
        """The child's schema (raising its SchemaError)."""
        return self.child.checked_schema()


class SameColumns:
    """Rows pass with their columns unchanged (mixin for filters, sorts, exchanges)."""

    def compute_schema(self) -> pa.Schema | None:
        schema = self.input_schema()  # type: ignore[attr-defined]
        if schema is not None:
            self.check(schema)
        return schema

    def check(self, schema: pa.Schema) -> None:
        """Raise SchemaError when a column the node reads is not in ``schema``."""
        S.require(schema, sorted(self.references() or ()), self.label())  # type: ignore[attr-defined]


def agg_text(specs: Iterable[AggSpec], with_args: bool = True) -> str:
    """Aggregates for explain(): ``func(arg) as name`` (``func as name`` without args)."""
    if not with_args:
        return ", ".join(f"{s.func} as {s.name}" for s in specs)
    return ", ".join(f"{s.text()} as {s.name}" for s in specs)


def spec_refs(keys: Iterable[str], specs: Iterable[AggSpec]) -> frozenset[str]:
    """The columns keys and aggregates read."""
    out = set(keys)
    for s in specs:
        if s.arg is not None:
            out |= s.arg.columns()
    return frozenset(out)
