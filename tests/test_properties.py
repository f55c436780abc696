"""Property tests: random data and random small pipelines against a plain-Python model.

Every pipeline runs on a random layout (source partitions 1..4, shuffle partitions 1..4)
and must give the same rows as the Python model, so results do not depend on how the
data is partitioned (the worker count itself is fixed by the session in conftest.py).
"""

from __future__ import annotations

import functools
import os

import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracles import equi_join, sort_rows

import millstream as ms
from millstream.expr.nodes import col

# MILLSTREAM_PROPERTY_EXAMPLES=500 for a longer bug hunt
EXAMPLES = int(os.environ.get("MILLSTREAM_PROPERTY_EXAMPLES", "25"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
#: for tests that take the ``runner`` fixture (it only picks the runner, the same for every
#: example, so a function-scoped fixture is fine here)
RUNNER_SETTINGS = settings(SETTINGS, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])

ints = st.one_of(st.none(), st.integers(-20, 20))
keys = st.one_of(st.none(), st.integers(0, 4))
strs = st.one_of(st.none(), st.sampled_from(["", "a", "b", "ab", "é", "Z", "b "]))
layout = st.tuples(st.integers(1, 4), st.integers(1, 4))

SCHEMA = pa.schema([("k", pa.int64()), ("v", pa.int64()), ("s", pa.string())])
RSCHEMA = pa.schema([("k", pa.int64()), ("r", pa.int64()), ("v", pa.int64())])

left_rows = st.lists(st.fixed_dictionaries({"k": keys, "v": ints, "s": strs}), max_size=40)
right_rows = st.lists(st.fixed_dictionaries({"k": keys, "r": ints, "v": ints}), max_size=15)


def dataset(rows: list[dict], schema: pa.Schema, parts: int) -> ms.Dataset:
    return ms.from_arrow(pa.Table.from_pylist(rows, schema=schema), num_partitions=parts)


def canon(rows: list[dict]) -> list:
    return sorted((tuple(sorted(r.items())) for r in rows), key=repr)


# ----------------------------------------------------------------------------- Python model

def gt(a, b):
    return None if a is None or b is None else a > b


def eq(a, b):
    return None if a is None or b is None else a == b


def or3(x, y):
    if x is True or y is True:
        return True
    return None if x is None or y is None else False


def and3(x, y):
    if x is False or y is False:
        return False
    return None if x is None or y is None else True


# ----------------------------------------------------------------------------- joins


@RUNNER_SETTINGS
@given(left=left_rows, right=right_rows, how=st.sampled_from(["inner", "left", "right", "outer", "semi", "anti"]),
       broadcast=st.sampled_from([True, False, None]), lay=layout)
def test_join_matches_python(runner, left, right, how, broadcast, lay):
    parts, shuffle = lay
    got = dataset(left, SCHEMA, parts).join(dataset(right, RSCHEMA, max(1, 5 - parts)), on="k", how=how,
                                            broadcast=broadcast).collect(shuffle_partitions=shuffle)
    want, cols = equi_join(left, right, ["k", "v", "s"], ["k", "r", "v"], how)
    assert canon(got) == canon(want)
    if got:
        assert list(got[0]) == cols


# ----------------------------------------------------------------------------- sort


@SETTINGS
@given(rows=left_rows, by=st.lists(st.sampled_from(["k", "v", "s"]), min_size=1, max_size=3, unique=True),
       data=st.data(), nulls_last=st.sampled_from([None, True, False]), lay=layout)
def test_sort_matches_python(rows, by, data, nulls_last, lay):
    parts, shuffle = lay
    desc = data.draw(st.lists(st.booleans(), min_size=len(by), max_size=len(by)))
    got = dataset(rows, SCHEMA, parts).sort(by, descending=desc, nulls_last=nulls_last).collect(
        shuffle_partitions=shuffle)
    want = sort_rows(rows, by, desc, nulls_last)
    assert [tuple(r[c] for c in by) for r in got] == [tuple(r[c] for c in by) for r in want]
    assert canon(got) == canon(rows)


# ----------------------------------------------------------------------------- random pipelines


class Pipeline:
    """Builds the same pipeline on a Dataset and on Python rows, step by step."""

    def __init__(self, rows: list[dict], right: list[dict]):
        self.rows = [dict(r) for r in rows]
        self.cols = {"k": "int", "v": "int", "s": "str"}
        self.right = right
        self.steps: list = []  # functions Dataset -> Dataset
        self.text: list[str] = []
        self.joined = False
        self.untyped = False  # a row function ran: column types are inferred from values
        self.sorted_by: tuple[list[str], list[bool]] | None = None
        self.n = 0

    def _name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def int_cols(self):
        return [c for c, t in self.cols.items() if t == "int"]

    def str_cols(self):
        return [c for c, t in self.cols.items() if t == "str"]

    def add(self, text, fn):
        self.text.append(text)
        self.steps.append(fn)
        self.sorted_by = None

    # --- steps
    def filter(self, draw):
        ic, sc = self.int_cols(), self.str_cols()
        kind = draw(st.sampled_from(["gt", "eq_or", "null", "and"] if ic else ["null"]))
        if kind == "null" and not sc and not ic:
            return
        if kind == "gt":
            c, x = draw(st.sampled_from(ic)), draw(st.integers(-10, 10))
            expr, pred = col(c) > x, (lambda r, c=c, x=x: gt(r[c], x))
        elif kind == "eq_or":
            a, b = draw(st.sampled_from(ic)), draw(st.sampled_from(ic))
            x, y = draw(st.integers(0, 4)), draw(st.integers(-10, 10))
            expr = (col(a) == x) | (col(b) < y)
            pred = lambda r, a=a, b=b, x=x, y=y: or3(eq(r[a], x), gt(y, r[b]))  # noqa: E731
        elif kind == "and":
            a, x = draw(st.sampled_from(ic)), draw(st.integers(-10, 10))
            c = draw(st.sampled_from(list(self.cols)))
            expr = (col(a) > x) & col(c).is_not_null()
            pred = lambda r, a=a, x=x, c=c: and3(gt(r[a], x), r[c] is not None)  # noqa: E731
        else:
            c = draw(st.sampled_from(list(self.cols)))
            neg = draw(st.booleans())
            expr = col(c).is_not_null() if neg else col(c).is_null()
            pred = lambda r, c=c, neg=neg: (r[c] is not None) == neg  # noqa: E731
        self.rows = [r for r in self.rows if pred(r) is True]
        self.add(f"filter({expr!r})", lambda ds, e=expr: ds.filter(e))

    def filter_fn(self, draw):
        c = draw(st.sampled_from(list(self.cols)))

        def pred(r, c=c):
            return r[c] is not None and len(str(r[c])) % 2 == 0

        self.rows = [r for r in self.rows if pred(r)]
        self.add(f"filter(fn on {c})", lambda ds, p=pred: ds.filter(p))

    def with_columns(self, draw):
        ic, sc = self.int_cols(), self.str_cols()
        options = (["arith", "fill"] if ic else []) + (["upper", "len"] if sc else [])
        if not options:
            return
        kind = draw(st.sampled_from(options))
        name = draw(st.sampled_from([self._name("w")] + list(self.cols)))  # new or replaced column
        if kind == "arith":
            a, b = draw(st.sampled_from(ic)), draw(st.sampled_from(ic))
            expr = col(a) + col(b) * 2
            f = lambda r, a=a, b=b: None if r[a] is None or r[b] is None else r[a] + r[b] * 2  # noqa: E731
            t = "int"
        elif kind == "fill":
            a, x = draw(st.sampled_from(ic)), draw(st.integers(-3, 3))
            expr = col(a).fill_null(x)
            f = lambda r, a=a, x=x: x if r[a] is None else r[a]  # noqa: E731
            t = "int"
        elif kind == "upper":
            a = draw(st.sampled_from(sc))
            expr = col(a).str.upper()
            f = lambda r, a=a: None if r[a] is None else r[a].upper()  # noqa: E731
            t = "str"
        else:
            a = draw(st.sampled_from(sc))
            expr = col(a).str.len()
            f = lambda r, a=a: None if r[a] is None else len(r[a])  # noqa: E731
            t = "int"
        for r in self.rows:
            r[name] = f(r)
        self.cols[name] = t
        self.add(f"with_columns({name}={expr!r})", lambda ds, e=expr, n=name: ds.with_columns(**{n: e}))

    def select(self, draw):
        keep = draw(st.lists(st.sampled_from(list(self.cols)), min_size=1, max_size=len(self.cols), unique=True))
        self.rows = [{c: r[c] for c in keep} for r in self.rows]
        self.cols = {c: self.cols[c] for c in keep}
        self.add(f"select({keep})", lambda ds, k=keep: ds.select(*k))

    def group_by(self, draw):
        names = list(self.cols)
        gkeys = draw(st.lists(st.sampled_from(names), min_size=0, max_size=2, unique=True))
        rest = [c for c in names if c not in gkeys]
        if not gkeys and not rest:
            return
        aggs, specs = [], []
        cnt = self._name("n")
        aggs.append(ms.count().alias(cnt))
        specs.append((cnt, "count_all", None))
        for c in rest[:3]:
            func = draw(st.sampled_from(["sum", "min", "max", "count", "count_distinct"]
                                        if self.cols[c] == "int" else ["min", "max", "count", "count_distinct"]))
            name = self._name(f"{func}_")
            aggs.append(getattr(ms, func)(c).alias(name))
            specs.append((name, func, c))
        groups: dict = {}
        for r in self.rows:
            groups.setdefault(tuple(r[k] for k in gkeys), []).append(r)
        if not gkeys and not groups:
            groups[()] = []  # a global aggregate over no rows is one row
        cols = {k: self.cols[k] for k in gkeys}
        for name, func, c in specs:
            cols[name] = "int" if func in ("count_all", "count", "count_distinct", "sum") else self.cols[c]
        out = []
        for key, members in groups.items():
            row = dict(zip(gkeys, key))
            for name, func, c in specs:
                vals = [m[c] for m in members if m[c] is not None] if c else None
                if func == "count_all":
                    row[name] = len(members)
                elif func == "count":
                    row[name] = len(vals)
                elif func == "count_distinct":
                    row[name] = len(set(vals))
                elif func == "sum":
                    row[name] = sum(vals) if vals else None
                else:
                    row[name] = (min if func == "min" else max)(vals) if vals else None
            out.append(row)
        self.rows, self.cols = out, cols
        self.add(f"group_by({gkeys}).agg({[s[:2] for s in specs]})",
                 lambda ds, g=gkeys, a=aggs: ds.group_by(*g).agg(*a))

    def join(self, draw):
        if self.joined or self.cols.get("k") != "int":
            return
        how = draw(st.sampled_from(["inner", "left", "semi", "anti", "outer"]))
        bc = draw(st.sampled_from([True, False]))
        rparts = draw(st.integers(1, 3))
        left_cols = list(self.cols)
        out, cols = equi_join(self.rows, self.right, left_cols, ["k", "r", "v"], how)
        if len(set(cols)) != len(cols):
            return
        self.rows = out
        new = {}
        for c in cols:
            if c in self.cols:
                new[c] = self.cols[c]
            else:
                new[c] = "int"
        self.cols = new
        self.joined = True
        right = self.right
        self.add(f"join({how}, broadcast={bc})",
                 lambda ds, h=how, b=bc, rp=rparts: ds.join(dataset(right, RSCHEMA, rp), on="k", how=h, broadcast=b))

    def distinct(self, draw):
        seen, out = set(), []
        for r in self.rows:
            key = tuple(sorted(r.items()))
            if key not in seen:
                seen.add(key)
                out.append(r)
        self.rows = out
        self.add("distinct()", lambda ds: ds.distinct())

    def sort(self, draw):
        by = draw(st.lists(st.sampled_from(list(self.cols)), min_size=1, max_size=2, unique=True))
        desc = draw(st.lists(st.booleans(), min_size=len(by), max_size=len(by)))
        self.rows = sort_rows(self.rows, by, desc)
        self.add(f"sort({by}, {desc})", lambda ds, b=by, d=desc: ds.sort(b, descending=d))
        self.sorted_by = (by, desc)


    def union(self, draw):
        self.rows = self.rows + [dict(r) for r in self.rows]
        self.add("union(self)", lambda ds: ds.union(ds))

    def top_n(self, draw):
        # sorted on every column, ties are equal rows: the top n is well defined
        by = list(self.cols)
        desc = draw(st.lists(st.booleans(), min_size=len(by), max_size=len(by)))
        n = draw(st.integers(0, 12))
        self.rows = sort_rows(self.rows, by, desc)[:n]
        self.add(f"sort({by}, {desc}).limit({n})", lambda ds, b=by, d=desc, n=n: ds.sort(b, descending=d).limit(n))
        self.sorted_by = (by, desc)

    def map_rows(self, draw):
        c = draw(st.sampled_from(list(self.cols)))
        name = self._name("m")

        def fn(r, c=c, name=name):
            return {**r, name: len(str(r[c]))}

        self.rows = [fn(r) for r in self.rows]
        self.cols[name] = "int"
        self.untyped = True
        self.add(f"map({name}=len(str({c})))", lambda ds, f=fn: ds.map(f))


STEPS = ["filter", "filter_fn", "with_columns", "select", "group_by", "join", "distinct", "sort", "union",
         "top_n", "map_rows"]


@RUNNER_SETTINGS
@given(rows=left_rows, right=right_rows, data=st.data(), lay=layout)
def test_random_pipeline_matches_python(runner, rows, right, data, lay):
    parts, shuffle = lay
    p = Pipeline(rows, right)
    for step in data.draw(st.lists(st.sampled_from(STEPS), min_size=1, max_size=5), label="steps"):
        getattr(p, step)(data.draw)
    ds = dataset(rows, SCHEMA, parts)
    for fn in p.steps:
        ds = fn(ds)
    note = " -> ".join(p.text)
    got = ds.collect(shuffle_partitions=shuffle)
    assert canon(got) == canon(p.rows), note
    if p.sorted_by is not None:
        by, _ = p.sorted_by
        assert [tuple(r[c] for c in by) for r in got] == [tuple(r[c] for c in by) for r in p.rows], note


@functools.lru_cache(maxsize=1)
def _layouts():
    return [(1, 1), (2, 2), (4, 4), (3, 1), (1, 4)]


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=left_rows, right=right_rows)
def test_same_result_at_every_layout(rows, right):
    """group_by + join + sort gives one answer whatever the partitioning."""
    results = []
    for parts, shuffle in _layouts():
        ds = (dataset(rows, SCHEMA, parts)
              .join(dataset(right, RSCHEMA, parts), on="k", how="left", broadcast=False)
              .group_by("k", "s").agg(ms.sum("r").alias("sr"), ms.count().alias("n"),
                                      ms.count_distinct("v").alias("dv"))
              .sort(["k", "s"], descending=[False, True]))
        results.append(ds.collect(shuffle_partitions=shuffle))
    assert all(r == results[0] for r in results[1:])
    want, _ = equi_join(rows, right, ["k", "v", "s"], ["k", "r", "v"], "left")
    groups: dict = {}
    for r in want:
        groups.setdefault((r["k"], r["s"]), []).append(r)
    assert len(results[0]) == len(groups)
