"""The Dataset API: lazy, immutable, partitioned data with Spark/Polars-style operations.

Transformations build a typed logical plan (``plan/logical``), whose ``schema`` a Dataset
knows without running it; actions (collect, count, write_*, ...) hand the plan to the
runtime (``runtime/actions.py``), which compiles it into stages and runs them on the
session's runner.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import pyarrow as pa

from millstream.api import analytic, changelog, stream, stream_join
from millstream.api.checks import check_aggregates, check_keys, check_node
from millstream.core.arrow import batch_to_rows, format_table
from millstream.errors import PlanError, SchemaError
from millstream.expr.agg_functions import plan_aggregates
from millstream.expr.analytic import AnalyticFunction
from millstream.expr.nodes import Expr, col, contains_aggregate, to_expr
from millstream.plan import logical as L
from millstream.runtime import actions
from millstream.runtime.session import effective_settings, get_session

#: Rows a plan whose schema a Python function hides runs on to learn its columns.
SCHEMA_SAMPLE_ROWS = 1000
_HOW = ("inner", "left", "right", "outer", "full", "semi", "anti", "cross")


def _names(cols: Iterable[Any]) -> list[str]:
    out = []
    for c in cols:
        if isinstance(c, (list, tuple)):
            out.extend(_names(c))
        elif isinstance(c, str):
            out.append(c)
        else:
            raise PlanError(f"expected a column name, got {c!r}")
    return out


def _exprs(items: Sequence[Any], named: dict[str, Any]) -> list[Expr]:
    exprs: list[Expr] = []
    for it in items:
        if isinstance(it, (list, tuple)):
            exprs.extend(_exprs(it, {}))
        elif isinstance(it, AnalyticFunction):
            raise PlanError(f"{it!r} is a window function: give it a window with "
                            f".over(partition_by=..., order_by=...)")
        else:
            exprs.append(col(it) if isinstance(it, str) else to_expr(it))
    for name, e in named.items():
        exprs.append(to_expr(e).alias(name) if not isinstance(e, str) else col(e).alias(name))
    for e in exprs:
        if contains_aggregate(e):
            raise PlanError(f"{e!r} is or holds an aggregate; use it inside "
                            f"group_by(...).agg(...), or over a window with .over(...)")
    return exprs


class Dataset:
    """A lazy, partitioned collection of rows; see the module docstring.

    Every transformation is checked when it is built: a column that is not there, a type
    an expression or aggregate cannot take, a non-boolean filter raise a SchemaError at
    the user's call (not when a job runs). Where a Python function hides the columns
    (``map``, ``map_batches``, ...) the checks after it wait for the job.
    """

    def __init__(self, node: L.Node) -> None:
        check_node(node)
        self._node = node
        self._sampled_schema: pa.Schema | None = None

    def __repr__(self) -> str:
        return f"Dataset({self._node.label()})"

    # --------------------------------------------------------- schema
    @property
    def schema(self) -> pa.Schema:
        """The columns and types of the rows, known from the plan without running it;
        where a Python function hides them (``map``, ``map_batches``, ...), from running
        the plan on its first rows once. A column the plan reads but does not find raises
        a SchemaError naming it."""
        known = self._node.checked_schema()
        if known is not None:
            return known
        if self._sampled_schema is None:
            streams = _unbounded_scans(self._node)
            if streams:
                raise SchemaError(f"{self._node.label()}: the columns of the stream(s) "
                                  f"{streams} are only known once it runs; give the source a "
                                  f"schema (schema=...) or the process function an "
                                  f"output_schema")
            sample = L.Limit(self._node, SCHEMA_SAMPLE_ROWS)
            self._sampled_schema = actions.to_table(sample, effective_settings({})).schema
        return self._sampled_schema

    @property
    def columns(self) -> list[str]:
        """The column names (see :attr:`schema`)."""
        return list(self.schema.names)

    # --------------------------------------------------------- narrow
    def map(self, fn: Callable[[dict], Any]) -> Dataset:
        """Apply ``fn`` to every row (a dict); it returns a dict (or a value, kept in column ``value``)."""
        return Dataset(L.Map(self._node, fn))

    def flat_map(self, fn: Callable[[dict], Iterable[Any]]) -> Dataset:
        """Apply ``fn`` to every row; it returns an iterable of zero or more output rows."""
        return Dataset(L.FlatMap(self._node, fn))

    def filter(self, predicate: Expr | Callable[[dict], bool]) -> Dataset:
        """Keep rows where a boolean expression is true (fast) or a Python predicate returns true."""
        if isinstance(predicate, Expr):
            return Dataset(analytic.filter_rows(self._node, predicate))
        if isinstance(predicate, str):
            raise PlanError("filter() takes an expression such as ms.col('x') > 0 or a function of a row, "
                            f"not the string {predicate!r}")
        if not callable(predicate):
            raise PlanError(f"filter() needs an expression or a callable, got {type(predicate).__name__}")
        return Dataset(L.FilterRows(self._node, predicate))

    where = filter

    def map_batches(self, fn: Callable[..., Any], batch_format: str = "pyarrow",
                    **fn_kwargs: Any) -> Dataset:
        """Apply a vectorized function to whole batches (pyarrow Table, pandas or polars DataFrame)."""
        if batch_format not in ("pyarrow", "pandas", "polars", "numpy"):
            raise ValueError(f"batch_format must be 'pyarrow', 'pandas', 'polars' or 'numpy', "
                             f"got {batch_format!r}")
        return Dataset(L.MapBatches(self._node, fn, batch_format, tuple(fn_kwargs.items())))

    def select(self, *exprs: Any, **named: Any) -> Dataset:
        """Keep only these columns or expressions (names, ``ms.col(...)``, computed with ``.alias``)."""
        es = _exprs(exprs, named)
        if not es:
            raise PlanError("select() needs at least one column or expression")
        return Dataset(analytic.select(self._node, es))

    def with_columns(self, *exprs: Any, **named: Any) -> Dataset:
        """Add or replace columns computed from expressions; other columns are kept.
        Window functions (``ms.row_number().over(...)``, ``ms.sum("v").over(...)``) are
        computed by a shuffle by their partition keys and a sort (see ``expr.analytic``)."""
        return Dataset(analytic.with_columns(self._node, _exprs(exprs, named)))

    def with_column(self, name: str, expr: Any) -> Dataset:
        """Add or replace one column (Spark's ``withColumn``)."""
        return self.with_columns(**{name: expr})

    def drop(self, *columns: str, strict: bool = True) -> Dataset:
        """Remove columns; a name that is not a column is a SchemaError (as in Polars)
        unless ``strict=False`` (Spark's ``drop`` ignores it)."""
        return Dataset(L.Drop(self._node, tuple(_names(columns)), strict))

    def rename(self, mapping: dict[str, str], strict: bool = True) -> Dataset:
        """Rename columns ``{old: new}``; an old name that is not a column is a SchemaError
        unless ``strict=False``."""
        return Dataset(L.Rename(self._node, tuple(dict(mapping).items()), strict))

    def explode(self, column: str) -> Dataset:
        """One row per element of a list column; rows with empty or null lists disappear."""
        return Dataset(L.Explode(self._node, column))

    # --------------------------------------------------------- wide
    def group_by(self, *keys: Any) -> GroupedDataset:
        """Group rows by key columns or expressions; follow with ``.agg(...)``."""
        flat: list[Any] = []
        for k in keys:
            flat.extend(k if isinstance(k, (list, tuple)) else [k])
        check_keys(self._node, flat)
        return GroupedDataset(self, flat)

    groupby = group_by

    def agg(self, *aggs: Expr, **named: Expr) -> Dataset:
        """Aggregate the whole dataset into one row (aggregates, or expressions over them)."""
        return GroupedDataset(self, []).agg(*aggs, **named)

    def join(self, other: Dataset, on: str | Sequence[str] | None = None, how: str = "inner", *,
             left_on: str | Sequence[str] | None = None, right_on: str | Sequence[str] | None = None,
             suffix: str = "_right", broadcast: bool | None = None,
             condition: Expr | None = None, state_ttl: Any = None) -> Dataset:
        """Join with ``other`` (inner, left, right, outer/full, semi, anti, cross).

        Rows match on equal keys (``on=`` names on both sides, or ``left_on=``/``right_on=``;
        null keys never match) and, with ``condition=``, where that boolean expression is
        true for the pair: SQL's ``ON l.k = r.k AND <condition>``. An outer join emits a row
        no pair satisfies null-extended; semi and anti joins keep the left rows that have
        (or have no) such pair, as ``EXISTS``/``NOT EXISTS``. A join with a condition and no
        keys (ranges, ``!=``) compares every pair (a nested loop over the broadcast side);
        ``how="cross"`` (or :meth:`cross_join`) gives every pair.

        The condition names columns as the inner join outputs them: the left side's names,
        the right side's names, a right column whose name the left side has too with
        ``suffix`` (``ms.col("x") != ms.col("x_right")``), a same-named key once.

        A side small enough (``broadcast_threshold``) is broadcast; otherwise both sides are
        shuffled by key. ``broadcast=True/False`` forces the choice for the right side.

        In a streaming job (``start``): when ``other`` is bounded, it is computed once when
        the job starts and broadcast (a stream-table join: inner, left, semi, anti). When
        ``other`` is a stream (or ``broadcast=False``), it is a regular join of two streams
        (inner, left, right, outer; Flink's semantics): every row is kept and joined with
        the other side's rows of its key as they come; outer joins emit updates (a row
        without a partner, taken back when its first partner comes); inputs may carry
        updates. ``state_ttl`` ("1h", timedelta, µs) bounds the state: a row is dropped
        once it is that far behind, by event time when both inputs have a watermark
        (``with_watermark``), else by processing time; rows arriving later for its key do
        not meet it (see :mod:`millstream.ops.stream_join.regular`).
        """
        if not isinstance(other, Dataset):
            raise PlanError(f"join() needs a Dataset, got {type(other).__name__}")
        if how not in _HOW:
            raise PlanError(f"join how={how!r} is not one of {', '.join(_HOW)}")
        if condition is not None and not isinstance(condition, Expr):
            raise PlanError(f"join condition must be an expression such as "
                            f"ms.col('a') < ms.col('b'), got {condition!r}")
        if how == "cross":
            if on is not None or left_on is not None or right_on is not None \
                    or condition is not None:
                raise PlanError("a cross join pairs every row with every row: give no on=, "
                                "left_on=, right_on= or condition= (use how='inner' with a "
                                "condition to keep only some pairs)")
            return Dataset(L.Join(self._node, other._node, (), (), "inner", suffix, broadcast))
        if on is not None:
            if left_on is not None or right_on is not None:
                raise PlanError("join: give either on= or left_on=/right_on=, not both")
            lk = rk = [on] if isinstance(on, str) else list(on)
        elif left_on is None and right_on is None and condition is not None:
            lk = rk = []  # a join on the condition alone
        else:
            if left_on is None or right_on is None:
                raise PlanError("join needs on= (same key names), both left_on= and "
                                "right_on=, or a condition= (how='cross' for every pair)")
            lk = [left_on] if isinstance(left_on, str) else list(left_on)
            rk = [right_on] if isinstance(right_on, str) else list(right_on)
        if len(lk) != len(rk) or (not lk and condition is None):
            raise PlanError(f"join: left keys {lk} and right keys {rk} must be non-empty and as many")
        how = "outer" if how == "full" else how
        ttl, times = stream_join.join_state_ttl(self._node, other._node, state_ttl)
        return Dataset(L.Join(self._node, other._node, tuple(lk), tuple(rk), how, suffix,
                              broadcast, condition, ttl, times))

    def cross_join(self, other: Dataset, *, suffix: str = "_right",
                   broadcast: bool | None = None) -> Dataset:
        """Every row of this dataset paired with every row of ``other`` (the cartesian
        product; Spark's ``crossJoin``, Polars' ``how="cross"``). The smaller side is
        broadcast to every partition of the other; right columns whose names the left side
        has get ``suffix``."""
        return self.join(other, how="cross", suffix=suffix, broadcast=broadcast)

    def sort(self, by: str | Sequence[str], descending: bool | Sequence[bool] = False,
             nulls_last: bool | None = None) -> Dataset:
        """Globally sort (sampled range partitioning; a small input, see the settings
        ``small_sort_rows``/``small_sort_bytes``, in one task). Nulls come first ascending,
        last descending."""
        cols = [by] if isinstance(by, str) else _names(by)
        if not cols:
            raise PlanError("sort() needs at least one column")
        desc = [bool(descending)] * len(cols) if isinstance(descending, bool) else [bool(d) for d in descending]
        if len(desc) != len(cols):
            raise PlanError(f"sort: {len(cols)} column(s) but {len(desc)} descending flag(s)")
        return Dataset(L.Sort(self._node, tuple(cols), tuple(desc), nulls_last))

    order_by = sort

    def distinct(self) -> Dataset:
        """Remove duplicate rows."""
        return Dataset(L.Distinct(self._node))

    def union(self, *others: Dataset) -> Dataset:
        """Concatenate datasets (UNION ALL); columns are matched by name."""
        return Dataset(L.Union((self._node, *(o._node for o in others))))

    def limit(self, n: int) -> Dataset:
        """The first ``n`` rows (in partition order; after a sort, the top ``n``)."""
        if n < 0:
            raise PlanError(f"limit must be >= 0, got {n}")
        return Dataset(L.Limit(self._node, int(n)))

    def repartition(self, n: int, by: str | Sequence[str] | None = None) -> Dataset:
        """Redistribute into ``n`` partitions, by hash of ``by`` columns or round-robin."""
        if n < 1:
            raise PlanError(f"repartition needs n >= 1, got {n}")
        keys = None if by is None else ((by,) if isinstance(by, str) else tuple(by))
        return Dataset(L.Repartition(self._node, int(n), keys))

    def cache(self) -> Dataset:
        """Materialize on first use and reuse the partitions in later actions (iterative jobs)."""
        if isinstance(self._node, L.Cache):
            return self
        return Dataset(L.Cache(self._node))

    persist = cache

    def unpersist(self) -> Dataset:
        """Drop the cached partitions of this dataset (if cached)."""
        if isinstance(self._node, L.Cache):
            get_session().cache.drop(self._node.cache_id)
        return self

    # --------------------------------------------------------- event time / streaming
    def with_watermark(self, column: str, delay: Any = "5s", idle_timeout: Any = None) -> Dataset:
        """Declare ``column`` the event time; watermark = max event time - ``delay``."""
        return Dataset(stream.with_watermark(self._node, column, delay, idle_timeout))

    def window(self, window: Any, on: str | None = None,
               allowed_lateness: Any = None) -> stream.WindowedDataset:
        """Event-time windows over all rows; follow with ``.agg(...)``."""
        return stream.window(self, window, on, allowed_lateness)

    def interval_join(self, other: Dataset, on: str | Sequence[str] | None = None,
                      between: tuple[Any, Any] | None = None, *,
                      left_on: str | Sequence[str] | None = None,
                      right_on: str | Sequence[str] | None = None, left_time: str | None = None,
                      right_time: str | None = None, how: str = "inner",
                      suffix: str = "_right") -> Dataset:
        """Stream-stream join: equal keys and ``left.t + lower <= right.t <= left.t + upper``."""
        _check_dataset(other, "interval_join")
        return Dataset(stream_join.interval_join(
            self._node, other._node, on, between, left_on=left_on, right_on=right_on,
            left_time=left_time, right_time=right_time, how=how, suffix=suffix))

    def window_join(self, other: Dataset, on: str | Sequence[str] | None = None,
                    window: Any = None, *, left_on: str | Sequence[str] | None = None,
                    right_on: str | Sequence[str] | None = None, left_time: str | None = None,
                    right_time: str | None = None, how: str = "inner",
                    suffix: str = "_right") -> Dataset:
        """Stream-stream join of rows with equal keys in the same event-time window."""
        _check_dataset(other, "window_join")
        return Dataset(stream_join.window_join(
            self._node, other._node, on, window, left_on=left_on, right_on=right_on,
            left_time=left_time, right_time=right_time, how=how, suffix=suffix))

    def join_latest(self, changelog: Dataset, on: str | Sequence[str] | None = None, *,
                    left_on: str | Sequence[str] | None = None,
                    right_on: str | Sequence[str] | None = None, how: str = "inner",
                    version: str | None = None, deleted: str | None = None,
                    suffix: str = "_right") -> Dataset:
        """Join each row with the latest row of its key in a changelog stream seen so far."""
        _check_dataset(changelog, "join_latest")
        return Dataset(stream_join.join_latest(
            self._node, changelog._node, on, left_on=left_on, right_on=right_on, how=how,
            version=version, deleted=deleted, suffix=suffix))

    # --------------------------------------------------------- updates (changelog)
    def drop_duplicates(self, subset: str | Sequence[str] | None = None, keep: str = "first",
                        within: Any = None) -> Dataset:
        """One row per distinct ``subset`` columns (all columns by default), as pandas'
        ``drop_duplicates`` and Spark's ``dropDuplicates``.

        ``keep="first"`` keeps each key's first row (in arrival order); on a stream it
        passes first rows on as they come (append-only). ``keep="last"`` keeps the latest:
        on a stream a key's new row updates its result (-U/+U). ``within`` ("1h", µs or a
        timedelta) bounds a stream's state: a key is forgotten ``within`` after its kept
        row, by event time if the stream has a watermark (``with_watermark``), else by
        processing time; a later row of it then counts as new (a bounded input in batch
        mode keeps every key).
        """
        return Dataset(changelog.drop_duplicates(self._node, subset, keep, within))

    def top_n(self, n: int, by: str | Sequence[str], per: str | Sequence[str] | None = None,
              descending: bool | Sequence[bool] = False, rank: str | None = None,
              nulls_last: bool | None = None) -> Dataset:
        """The first ``n`` rows of each group of ``per`` (of all rows without) in the order
        of ``by`` (SQL's ``ROW_NUMBER() OVER (PARTITION BY per ORDER BY by) <= n``), with
        their rank (1..n) in column ``rank`` if named. On a stream the result is updated
        as rows come: -U/+U per rank that changes hands (or -D/+I without a rank column).
        Ties keep arrival order."""
        return Dataset(changelog.top_n(self._node, n, by, per, descending, rank, nulls_last))

    def to_changelog(self, column: str = "change") -> Dataset:
        """The changes of an updating stream as plain rows: each row's kind ("+I", "-U",
        "+U", "-D") in ``column``; any step (a Python ``map``, a window, any sink) takes
        them. Rows of an append-only input are "+I"."""
        return Dataset(changelog.to_changelog(self._node, column))

    def from_changelog(self, column: str = "change") -> Dataset:
        """Rows that are changes: ``column`` ("+I", "-U", "+U", "-D") says what each is. An
        aggregate over them takes retractions back; in batch mode the dataset is the rows
        the changes leave."""
        return Dataset(changelog.from_changelog(self._node, column))

    def start(self, checkpoint: str | None = None, checkpoint_interval: Any = "10s",
              sink: Any = None, **options: Any) -> Any:
        """Run as a streaming job; returns a StreamingJob (await_termination, stop, metrics)."""
        return stream.start(self._node, checkpoint, checkpoint_interval, sink, **options)

    # --------------------------------------------------------- execution
    def iter_batches(self, **options: Any) -> Iterator[pa.RecordBatch]:
        """Run the pipeline and stream the result as record batches, partition by partition."""
        yield from actions.iter_batches(self._node, effective_settings(options))

    def to_arrow(self, **options: Any) -> pa.Table:
        """Run the pipeline and return the result as one Arrow table."""
        return actions.to_table(self._node, effective_settings(options))

    def collect(self, **options: Any) -> list[dict[str, Any]]:
        """Run the pipeline and return all rows as Python dicts."""
        return batch_to_rows(self.to_arrow(**options))

    to_pylist = collect

    def to_pandas(self, **options: Any) -> Any:
        """Run the pipeline and return a pandas DataFrame."""
        return self.to_arrow(**options).to_pandas()

    def to_polars(self, **options: Any) -> Any:
        """Run the pipeline and return a polars DataFrame."""
        import polars as pl

        return pl.from_arrow(self.to_arrow(**options))

    def count(self, **options: Any) -> int:
        """Number of rows."""
        from millstream.expr.agg_functions import count as count_all

        rows = self.agg(count_all().alias("count")).collect(**options)
        return int(rows[0]["count"]) if rows else 0

    def take(self, n: int, **options: Any) -> list[dict[str, Any]]:
        """The first ``n`` rows as dicts."""
        return self.limit(n).collect(**options)

    def first(self, **options: Any) -> dict[str, Any] | None:
        """The first row, or None when empty."""
        rows = self.take(1, **options)
        return rows[0] if rows else None

    def show(self, n: int = 20, **options: Any) -> None:
        """Print the first ``n`` rows as a table."""
        table = self.limit(n).to_arrow(**options)
        print(format_table(table, n))

    def explain(self, print_plan: bool = True, **options: Any) -> str:
        """The logical, optimized and physical plans (stages, shuffles, pushdowns) and the
        optimizer rules that fired; ``optimizer=False`` or ``disabled_rules=[...]`` show
        the plan without (some of) them."""
        text = actions.explain(self._node, effective_settings(options))
        if print_plan:
            print(text)
        return text

    # --------------------------------------------------------- sinks
    def _write(self, sink: Any, options: dict[str, Any]) -> None:
        actions.write(self._node, sink, effective_settings(options))

    def write_parquet(self, uri: str, partition_by: str | Sequence[str] | None = None,
                      mode: str = "error", compression: str = "zstd",
                      storage_options: dict[str, Any] | None = None, **options: Any) -> None:
        """Write Parquet files under ``uri``, committed atomically with a ``_SUCCESS`` marker.

        ``mode``: "error" (the target must not hold data), "overwrite" or "append".
        """
        from millstream.io.files.sinks import ParquetSink

        self._write(ParquetSink(uri, partition_by=_partition_cols(partition_by), mode=mode,
                                compression=compression, storage_options=storage_options), options)

    def write_csv(self, uri: str, mode: str = "error", partition_by: str | Sequence[str] | None = None,
                  storage_options: dict[str, Any] | None = None, **options: Any) -> None:
        """Write CSV files (with header) under ``uri``, committed atomically."""
        from millstream.io.files.sinks import CsvSink

        self._write(CsvSink(uri, partition_by=_partition_cols(partition_by), mode=mode,
                            storage_options=storage_options), options)

    def write_json(self, uri: str, mode: str = "error", partition_by: str | Sequence[str] | None = None,
                   storage_options: dict[str, Any] | None = None, **options: Any) -> None:
        """Write JSON-lines files under ``uri``, committed atomically."""
        from millstream.io.files.sinks import JsonSink

        self._write(JsonSink(uri, partition_by=_partition_cols(partition_by), mode=mode,
                             storage_options=storage_options), options)

    def write_postgres(self, dsn: str, table: str, mode: str = "append",
                       key: str | Sequence[str] | None = None, create_table: bool = True,
                       **options: Any) -> None:
        """Write the rows into the PostgreSQL table ``table`` all at once: the tasks stage
        their rows, one transaction moves them in. ``mode``: "append", "overwrite"
        (the table's rows replaced, in the same transaction) or "upsert" (``INSERT ... ON
        CONFLICT (key) DO UPDATE``; the table needs a unique key on ``key``). A missing
        table is created from the rows' columns (primary key ``key`` when upserting)
        unless ``create_table=False``."""
        from millstream.io.postgres import PostgresBatchSink

        self._write(PostgresBatchSink(dsn, table, mode=mode, key=key,
                                      create_table=create_table), options)


class GroupedDataset:
    """The result of ``group_by``; ``agg`` turns it back into a Dataset."""

    def __init__(self, ds: Dataset, keys: list[Any]) -> None:
        self._ds = ds
        self._keys = keys

    def agg(self, *aggs: Expr, **named: Expr) -> Dataset:
        """Aggregate each group: ``agg(ms.sum("x"), ms.count().alias("n"), avg=ms.mean("y"))``.

        An item may also be an expression over aggregates, literals and the group keys,
        ``(ms.sum("a") / ms.sum("b")).alias("ratio")``: the aggregates are computed (each
        distinct one once), then the expressions from their results.
        """
        items: list[Any] = []
        for a in aggs:
            if isinstance(a, (list, tuple)):
                items.extend(a)
            else:
                items.append(a)
        for name, a in named.items():
            if not isinstance(a, Expr) or not contains_aggregate(a):
                raise PlanError(f"agg({name}=...) needs an aggregate such as ms.sum('x'), got {a!r}")
            items.append(a.alias(name))
        for a in items:
            if not isinstance(a, Expr) or not contains_aggregate(a):
                raise PlanError(f"agg() takes aggregates such as ms.sum('x') or ms.count(), or "
                                f"expressions over them, got {a!r}")
        ds = self._ds
        key_names: list[str] = []   # names the aggregation groups by
        out_names: list[str] = []   # names the keys have in the result
        computed: list[Expr] = []
        for i, k in enumerate(self._keys):
            if isinstance(k, str):
                key_names.append(k)
                out_names.append(k)
            elif isinstance(k, Expr):
                # computed under a private name, so the aggregates still read the source column
                tmp = f"__millstream_key{i}"
                computed.append(k.alias(tmp))
                key_names.append(tmp)
                out_names.append(k.output_name)
            else:
                raise PlanError(f"group_by keys must be column names or expressions, got {k!r}")
        if computed:
            ds = ds.with_columns(*computed)
        renames = {t: o for t, o in zip(key_names, out_names) if t != o}
        names = out_names + [it.output_name for it in items]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise PlanError(f"group_by/agg output has duplicate column name(s) {sorted(dupes)}; "
                            "use .alias(...) to name the aggregates")
        plan = plan_aggregates(items, key_names, "group_by(...).agg()",
                               {o: t for t, o in renames.items()})
        if not plan.specs and not key_names:
            raise PlanError("agg() needs at least one aggregate")
        check_aggregates(ds._node, key_names, plan.specs)
        out = Dataset(L.Aggregate(ds._node, tuple(key_names), plan.specs))
        if plan.projection is not None:
            out = Dataset(L.Project(out._node, plan.projection))
        return out.rename(renames) if renames else out

    def window(self, window: Any, on: str | None = None,
               allowed_lateness: Any = None) -> stream.WindowedDataset:
        """Event-time windows per key; follow with ``.agg(...)``."""
        return stream.window(self._ds, window, on, allowed_lateness, keys=self._keys)

    def process(self, fn: Any, time_column: str | None = None,
                output_schema: pa.Schema | None = None, on_timer: Any = None) -> Dataset:
        """Run a keyed process function (state, timers, side outputs) for each key."""
        return Dataset(stream.process(self._ds._node, self._keys, fn, time_column,
                                      output_schema, on_timer))

    def count(self) -> Dataset:
        """Rows per group, in column ``count``."""
        from millstream.expr.agg_functions import count as count_all

        return self.agg(count_all().alias("count"))


def _check_dataset(other: Any, what: str) -> None:
    if not isinstance(other, Dataset):
        raise PlanError(f"{what} needs a Dataset to join with, got {type(other).__name__}")


def _unbounded_scans(node: L.Node) -> list[str]:
    """Descriptions of the stream sources below ``node``."""
    if isinstance(node, L.Scan):
        return [] if node.source.bounded else [node.source.describe()]
    return [d for c in node.children for d in _unbounded_scans(c)]


def _partition_cols(partition_by: str | Sequence[str] | None) -> list[str] | None:
    if partition_by is None:
        return None
    return [partition_by] if isinstance(partition_by, str) else list(partition_by)

