"""MapReduce jobs: results against plain Python, hooks, counters, ordering, faults, memory."""

from __future__ import annotations

import collections
import heapq
import json
import math
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import millstream as ms
from millstream.api.mapreduce import read_text_output
from millstream.core.context import current_context
from millstream.ops.mapreduce.keys import decode_key, encode_key, encode_keys
from millstream.ops.mapreduce.values import decode_values, encode_values
from millstream.runners.local import FAULT_ENV

ROOT = os.path.join(os.path.dirname(__file__), "..")
EXAMPLE = os.path.join(ROOT, "examples", "mapreduce_wordcount.py")
VOCAB = ["the", "of", "and", "a", "to", "in", "is", "it", "MapReduce", "Hadoop", "stream",
         "Millstream", "arrow", "batch", "key", "value", "shuffle", "reduce", "map", "sort"]


def _write_corpus(path: Any, lines: int, seed: int = 3) -> str:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(lines):
            words = rng.choices(VOCAB + [f"w{rng.randint(0, 400)}"], k=rng.randint(0, 12))
            f.write(" ".join(words) + ("\n" if i % 97 else "  \n"))
    return str(path)


def _py_wordcount(*paths: str) -> collections.Counter:
    c: collections.Counter = collections.Counter()
    for p in paths:
        with open(p, encoding="utf-8") as f:
            for line in f:
                c.update(w.lower() for w in line.split())
    return c


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """About 150 KB of text: several map tasks with split_size=40_000."""
    return _write_corpus(tmp_path_factory.mktemp("mr") / "corpus.txt", 6000)


# ----------------------------------------------------------------------------------- jobs

class WordCount(ms.MapReduceJob):
    """Word count with a combiner and counters."""

    def mapper(self, key: Any, line: str) -> Iterable[tuple[str, int]]:
        self.increment_counter("wc", "lines")
        for word in line.split():
            self.increment_counter("wc", "words")
            yield word.lower(), 1

    def combiner(self, word: str, counts: Iterator[int]) -> Iterable[tuple[str, int]]:
        yield word, sum(counts)

    def reducer(self, word: str, counts: Iterator[int]) -> Iterable[tuple[str, int]]:
        yield word, sum(counts)


class InvertedIndex(ms.MapReduceJob):
    """word -> sorted list of the files it occurs in."""

    def mapper(self, key: tuple[str, int], line: str) -> Iterable[tuple[str, str]]:
        path, _offset = key
        for word in set(line.lower().split()):
            yield word, os.path.basename(path)

    def combiner(self, word: str, files: Iterator[str]) -> Iterable[tuple[str, str]]:
        for f in set(files):
            yield word, f

    def reducer(self, word: str, files: Iterator[str]) -> Iterable[tuple[str, list[str]]]:
        yield word, sorted(set(files))


class TopWords(ms.MapReduceJob):
    """Two steps: count words, then the N most frequent (ties: later word first)."""

    n = 7

    def count_words(self, _: Any, line: str) -> Iterable[tuple[str, int]]:
        for word in line.split():
            yield word.lower(), 1

    def sum_counts(self, word: str, counts: Iterator[int]) -> Iterable[tuple[str, int]]:
        yield word, sum(counts)

    def to_single_key(self, word: str, count: int) -> Iterable[tuple[None, tuple[int, str]]]:
        yield None, (count, word)

    def top_n(self, _: None, pairs: Iterator[tuple[int, str]]) -> Iterable[tuple[str, int]]:
        for count, word in heapq.nlargest(self.n, pairs):
            yield word, count

    def steps(self) -> list[ms.MRStep]:
        return [ms.MRStep(mapper=self.count_words, combiner=self.sum_counts,
                          reducer=self.sum_counts),
                ms.MRStep(mapper=self.to_single_key, reducer=self.top_n, num_reducers=1)]


class Hooks(ms.MapReduceJob):
    """Counts hook calls; mapper_final/combiner_final/reducer_final emit pairs."""

    def mapper_init(self) -> None:
        self.increment_counter("hooks", "mapper_init")
        self.lines = 0

    def mapper(self, key: Any, line: str) -> Iterable[tuple[str, int]]:
        self.lines += 1
        yield "line", 1

    def mapper_final(self) -> Iterable[tuple[str, int]]:
        self.increment_counter("hooks", "mapper_final")
        yield "lines seen by map tasks", self.lines

    def combiner_init(self) -> None:
        self.increment_counter("hooks", "combiner_init")

    def combiner(self, key: str, values: Iterator[int]) -> Iterable[tuple[str, int]]:
        yield key, sum(values)

    def combiner_final(self) -> Iterable[tuple[str, int]]:
        self.increment_counter("hooks", "combiner_final")
        yield "combiner_final", 1

    def reducer_init(self) -> None:
        self.increment_counter("hooks", "reducer_init")

    def reducer(self, key: str, values: Iterator[int]) -> Iterable[tuple[str, int]]:
        yield key, sum(values)

    def reducer_final(self) -> Iterable[tuple[str, int]]:
        self.increment_counter("hooks", "reducer_final")
        return None


MIXED_KEYS = [None, False, True, -3, 0, 1, 1.0, 2.5, -7.25, 2**70, -(2**70), "", "a", "a b",
              "é", "zz", b"raw", ("a",), ("a", 1), (1, "a"), ["x", 1], {"b": 2, "a": 1},
              frozenset({3, 4})]


class OrderRecorder(ms.MapReduceJob):
    """Records, per reduce task, the keys in the order the reducer saw them."""

    def mapper(self, _: Any, i: int) -> Iterable[tuple[Any, int]]:
        yield MIXED_KEYS[i % len(MIXED_KEYS)], i

    def reducer_init(self) -> None:
        self.seen: list[Any] = []

    def reducer(self, key: Any, values: Iterator[int]) -> Iterable[tuple[Any, list[int]]]:
        self.seen.append(key)
        yield key, sorted(values)

    def reducer_final(self) -> Iterable[tuple[Any, Any]]:
        yield ("__order__", current_context().partition), self.seen


class FirstLetter(WordCount):
    """Word count whose reducer partition is chosen by the word's first letter."""

    num_reducers = 3

    def partitioner(self, word: str, num_reducers: int) -> int:
        return ord(word[0]) % num_reducers

    def reducer_init(self) -> None:
        self.words: list[str] = []

    def reducer(self, word: str, counts: Iterator[int]) -> Iterable[tuple[str, int]]:
        self.words.append(word)
        yield word, sum(counts)

    def reducer_final(self) -> Iterable[tuple[Any, Any]]:
        yield ("__partition__", current_context().partition), self.words


class RecordAttempts(WordCount):
    """Word count that records which attempt of each task succeeded (counters of failed
    attempts are dropped, so only the winning attempt's note remains)."""

    def mapper_init(self) -> None:
        ctx = current_context()
        self.increment_counter("attempts", f"map {ctx.partition} won on attempt {ctx.attempt}")
        self.seen = 0

    def reducer_init(self) -> None:
        ctx = current_context()
        self.increment_counter("attempts", f"reduce {ctx.partition} won on attempt {ctx.attempt}")


class KillMidTask(RecordAttempts):
    """Word count whose map task 1 SIGKILLs its own worker half way, on the first attempt."""

    def mapper(self, key: Any, line: str) -> Iterable[tuple[str, int]]:
        ctx = current_context()
        self.seen += 1
        if ctx.partition == 1 and ctx.attempt == 0 and self.seen == 300:
            os.kill(os.getpid(), signal.SIGKILL)
        yield from super().mapper(key, line)


class FailTwice(RecordAttempts):
    """Word count whose map task 0 raises half way on its first two attempts."""

    def mapper(self, key: Any, line: str) -> Iterable[tuple[str, int]]:
        ctx = current_context()
        self.seen += 1
        if ctx.partition == 0 and ctx.attempt < 2 and self.seen == 200:
            raise ConnectionError(f"flaky service (attempt {ctx.attempt})")
        yield from super().mapper(key, line)


class BadReducer(WordCount):
    """Raises for one key."""

    def reducer(self, word: str, counts: Iterator[int]) -> Iterable[tuple[str, int]]:
        if word == "hadoop":
            raise ValueError("no elephants here")
        yield word, sum(counts)


class HotKey(ms.MapReduceJob):
    """Almost every value under one key; the reducer counts what it sees."""

    def mapper(self, _: Any, i: int) -> Iterable[tuple[str, int]]:
        yield "hot", i
        if i % 100_000 == 0:
            yield "cold", i

    def reducer(self, key: str, values: Iterator[int]) -> Iterable[tuple[str, int]]:
        if isinstance(values, (list, tuple)) or iter(values) is not values:
            self.increment_counter("check", "materialized")
        n = total = 0
        for v in values:
            n += 1
            total += v
        self.increment_counter("check", f"{key} values", n)
        yield key, total


def _user_counters(counters: dict) -> dict:
    return {k: v for k, v in counters.items() if k[0] not in ("millstream", "attempts")}


# ----------------------------------------------------------------------------------- encoding

_scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
            | st.text(max_size=6) | st.binary(max_size=4))
_keys = st.recursive(_scalars, lambda inner: st.tuples(inner, inner) | st.lists(inner, max_size=3),
                     max_leaves=6)


@settings(max_examples=300, deadline=None)
@given(st.lists(_keys, max_size=8))
def test_key_encoding_round_trips(keys):
    for k in keys:
        back = decode_key(encode_key(k))
        assert back == k and type(back) is type(k)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(), max_size=30) | st.lists(st.text(max_size=5), max_size=30)
       | st.lists(st.floats(allow_nan=False), max_size=30)
       | st.lists(st.tuples(st.integers(-3, 3), st.text(max_size=3)), max_size=30))
def test_key_encoding_preserves_order_within_a_type(keys):
    assert sorted(keys, key=encode_key) == sorted(keys) or (
        # equal floats 0.0/-0.0 are one key
        [encode_key(k) for k in sorted(keys, key=encode_key)] ==
        [encode_key(k) for k in sorted(keys)])
    assert encode_keys(keys).to_pylist() == [encode_key(k) for k in keys]


def test_key_encoding_orders_types_and_special_values():
    order = [None, False, True, -(2**70), -1, 0, 2**70, -math.inf, -1.5, 0.0, math.inf,
             math.nan, "", "a", "a\x00", "ab", b"", ("a",), ("a", 1), ["a"], {"k": 1},
             {1}, frozenset({1}), complex(1, 2)]
    encoded = [encode_key(k) for k in order]
    assert encoded == sorted(encoded)
    assert encode_key(-0.0) == encode_key(0.0)
    assert encode_key(1) != encode_key(1.0) != encode_key(True)
    assert encode_key({"a": 1, "b": 2}) == encode_key({"b": 2, "a": 1})


def test_exact_values_come_back_as_they_went_in():
    values = [1, 2.0, "x", None, True, b"b", (1, 2), 2**70, [1], {"a": {1}}, "\ud800"]
    for vals in (values, [1, 2, 3], [-0.0, math.nan, 1e300], [None], ["a", "b"], [2**70, 1],
                 [b"x", b""], [True, False], [(1,), [2]]):
        tags, payload = encode_values(vals)
        got = decode_values(tags, payload)
        assert repr(decode_values(tags.slice(1), payload.slice(1))) == repr(vals[1:])
        assert [type(v) for v in got] == [type(v) for v in vals]
        assert repr(got) == repr(vals)  # -0.0 and nan too


# ----------------------------------------------------------------------------------- jobs vs Python

def test_wordcount_matches_python_with_counters(runner, corpus):
    job = WordCount()
    got = dict(job.run(corpus, split_size=40_000, num_reducers=3))
    want = _py_wordcount(corpus)
    assert got == dict(want)
    with open(corpus, encoding="utf-8") as f:
        lines = sum(1 for _ in f)
    c = job.counters
    assert c[("wc", "lines")] == lines and c[("wc", "words")] == sum(want.values())
    assert c[("mapreduce", "step 1 map input records")] == lines
    assert c[("mapreduce", "step 1 map output records")] == sum(want.values())
    assert c[("mapreduce", "step 1 reduce input groups")] == len(want)
    assert c[("mapreduce", "step 1 reduce output records")] == len(want)
    # the combiner ran map-side: far fewer records crossed the shuffle
    assert c[("mapreduce", "step 1 combine output records")] < sum(want.values()) // 10
    map_stage = job.stats.stages[0]
    assert map_stage["purpose"] == "step 1 map" and map_stage["tasks"] >= 3
    assert job.stats.stages[-1]["tasks"] == 3
    assert ms.last_job_stats().counters == job.counters


def test_text_input_keys_are_path_and_byte_offset(corpus):
    pairs = ms.mapreduce(corpus, lambda key, line: [(key, line)], split_size=40_000).collect()
    with open(corpus, "rb") as f:
        data = f.read()
    assert len(pairs) == data.count(b"\n")
    for row in pairs:
        path, offset = row["key"]
        assert path.endswith("corpus.txt")
        end = data.index(b"\n", offset)
        assert data[offset:end].decode("utf-8") == row["value"]
        assert offset == 0 or data[offset - 1:offset] == b"\n"


def test_inverted_index_matches_python(runner, tmp_path):
    paths = [_write_corpus(tmp_path / f"doc{i}.txt", 300 + 100 * i, seed=i) for i in range(4)]
    got = dict(InvertedIndex().run(paths, num_reducers=2))
    want: dict[str, set[str]] = collections.defaultdict(set)
    for p in paths:
        with open(p, encoding="utf-8") as f:
            for line in f:
                for w in line.lower().split():
                    want[w].add(os.path.basename(p))
    assert got == {w: sorted(files) for w, files in want.items()}


def test_two_step_top_words_matches_python(runner, corpus):
    job = TopWords()
    got = job.run(corpus, split_size=40_000)
    counts = _py_wordcount(corpus)
    want = sorted(((c, w) for w, c in counts.items()), reverse=True)[:TopWords.n]
    assert got == [(w, c) for c, w in want]
    stages = [s["purpose"] for s in job.stats.stages]
    assert stages == ["step 1 map", "step 1 reduce + step 2 map", "step 2 reduce"]
    assert job.counters[("mapreduce", "step 2 map input records")] == len(counts)


def test_example_top_words_matches_python(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("mapreduce_wordcount", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    path = mod.make_sample(str(tmp_path), lines=3000)
    got = mod.TopWords().run(path)
    with open(path, encoding="utf-8") as f:
        counts = collections.Counter(w for line in f for w in mod.WORD.findall(line.lower()))
    assert got == [(w, c) for c, w in heapq.nlargest(10, ((c, w) for w, c in counts.items()))]


def test_functional_form_feeds_the_dataset_api_and_back(runner):
    docs = ms.from_items([{"doc": i, "text": " ".join(VOCAB[j] for j in range(i % 7 + 1))}
                          for i in range(200)], num_partitions=3)
    counts = ms.mapreduce(docs, lambda _k, row: ((w, 1) for w in row["text"].split()),
                          lambda w, ones: [(w, sum(ones))], combiner=lambda w, ones: [(w, sum(ones))],
                          num_reducers=2)
    frequent = counts.filter(ms.col("value") > 100).sort("key")
    rows = frequent.collect()
    want = collections.Counter(w for i in range(200) for w in VOCAB[:i % 7 + 1])
    assert rows == [{"key": w, "value": n} for w, n in sorted(want.items()) if n > 100]
    # a MapReduce over a MapReduce's output: (key, value) rows feed the mapper as pairs
    by_len = ms.mapreduce(counts, lambda w, n: [(len(w), n)], lambda k, ns: [(k, sum(ns))])
    got = {r["key"]: r["value"] for r in by_len.collect()}
    lens: collections.Counter = collections.Counter()
    for w, n in want.items():
        lens[len(w)] += n
    assert got == dict(lens)


def test_map_only_step_and_identity_mapper(runner):
    ds = ms.range(1000, num_partitions=4)
    evens = ms.mapreduce(ds, lambda _k, i: [(i, i * i)] if i % 2 == 0 else [], None)
    assert sorted((r["key"], r["value"]) for r in evens.collect()) == \
        [(i, i * i) for i in range(0, 1000, 2)]
    pairs = ms.from_items([{"key": i % 5, "value": i} for i in range(100)])
    summed = ms.mapreduce(pairs, None, lambda k, vs: [(k, sum(vs))], num_reducers=2)
    assert sorted((r["key"], r["value"]) for r in summed.collect()) == \
        [(k, sum(range(k, 100, 5))) for k in range(5)]


def test_keys_arrive_sorted_and_grouped_in_every_reducer_partition(runner):
    job = OrderRecorder()
    n = 23 * 40
    out = job.run(ms.range(n, num_partitions=4), num_reducers=3)
    orders = {k[1]: v for k, v in out if isinstance(k, tuple) and k[:1] == ("__order__",)}
    assert sorted(orders) == [0, 1, 2]
    seen = [k for keys in orders.values() for k in keys]
    assert len(seen) == len(MIXED_KEYS)  # each key once: all its values arrived together
    for keys in orders.values():
        enc = [encode_key(k) for k in keys]
        assert enc == sorted(enc)
    groups = {encode_key(k): v for k, v in out if not (isinstance(k, tuple) and
                                                       k[:1] == ("__order__",))}
    for i, k in enumerate(MIXED_KEYS):
        assert groups[encode_key(k)] == list(range(i, n, len(MIXED_KEYS)))


def test_hooks_run_once_per_task(runner):
    job = Hooks()
    out = dict(job.run(ms.from_items([{"t": str(i)} for i in range(500)], num_partitions=4),
                       num_reducers=3))
    c = job.counters
    assert c[("hooks", "mapper_init")] == c[("hooks", "mapper_final")] == 4
    assert c[("hooks", "combiner_init")] == c[("hooks", "combiner_final")] == 4
    assert c[("hooks", "reducer_init")] == c[("hooks", "reducer_final")] == 3
    assert out == {"line": 500, "lines seen by map tasks": 500, "combiner_final": 4}


def test_partitioner_decides_the_reducer(runner):
    job = FirstLetter()
    words = ["apple", "banana", "cherry", "avocado", "blueberry", "date", "elder", "fig"]
    out = job.run(ms.from_items([{"t": " ".join(words[i % 8:]) } for i in range(64)],
                                num_partitions=2))
    parts = {k[1]: v for k, v in out if isinstance(k, tuple)}
    assert sorted(parts) == [0, 1, 2]
    for p, ws in parts.items():
        assert all(ord(w[0]) % 3 == p for w in ws) and ws == sorted(ws)
    assert {k: v for k, v in out if isinstance(k, str)} == dict(
        collections.Counter(w for i in range(64) for w in words[i % 8:]))


def test_bad_pairs_and_partitions_get_precise_errors():
    with pytest.raises(ms.UserFunctionError, match=r"must yield \(key, value\) pairs.*'oops'"):
        ms.mapreduce(ms.range(10), lambda k, v: ["oops"], lambda k, vs: vs).collect(
            max_task_attempts=1)
    with pytest.raises(ms.UserFunctionError, match=r"partitioner must return an int in \[0, 2\)"):
        ms.mapreduce(ms.range(10), lambda k, v: [(v, v)], lambda k, vs: [(k, 1)],
                     num_reducers=2, partitioner=lambda k, n: 5).collect(max_task_attempts=1)
    with pytest.raises(ms.PlanError, match="combiner but no reducer"):
        ms.MRStep(mapper=print, combiner=print)


# ----------------------------------------------------------------------------------- output

def test_text_and_parquet_output_committed_atomically(runner, corpus, tmp_path):
    want = dict(_py_wordcount(corpus))
    out = tmp_path / "text"
    WordCount().run(corpus, str(out), num_reducers=2)
    assert (out / "_SUCCESS").exists()
    parts = sorted(p for p in os.listdir(out) if p.startswith("part-"))
    assert len(parts) == 2
    first = (out / parts[0]).read_text(encoding="utf-8").splitlines()[0]
    key, value = first.split("\t")
    assert json.loads(key) in want and json.loads(value) == want[json.loads(key)]
    assert dict(read_text_output(str(out))) == want
    with pytest.raises(ms.OutputExistsError):
        WordCount().run(corpus, str(out))
    pq_out = tmp_path / "parquet"
    WordCount().run(corpus, str(pq_out), format="parquet")
    table = pq.read_table(str(pq_out))
    assert dict(zip(table.column("key").to_pylist(), table.column("value").to_pylist())) == want
    pairs = dict(InvertedIndex().run(corpus, str(tmp_path / "idx"), format="parquet") or {})
    assert pairs == {}
    idx = ms.read_parquet(str(tmp_path / "idx")).collect()
    assert all(r["value"] == ["corpus.txt"] for r in idx)


def _int_then_str(key: int, values: Iterator[int]) -> Iterable[tuple[int, Any]]:
    yield key, key if key < 1024 else str(key)


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # writer closed
def test_output_value_types_changing_between_batches(runner, tmp_path):
    pairs = ms.from_items([{"key": i, "value": i} for i in range(2048)])
    ds = ms.mapreduce(pairs, None, _int_then_str, num_reducers=1)
    want = [(i, i if i < 1024 else str(i)) for i in range(2048)]
    assert [(r["key"], r["value"]) for r in ds.collect(batch_size=1024)] == want

    class Job(ms.MapReduceJob):
        num_reducers = 1
        reducer = staticmethod(_int_then_str)

    Job().run(pairs, str(tmp_path / "t"), batch_size=1024)
    assert read_text_output(str(tmp_path / "t")) == want
    with pytest.raises(ms.SchemaError, match="Parquet needs one type per column"):
        Job().run(pairs, str(tmp_path / "p"), format="parquet", batch_size=1024)
    assert not (tmp_path / "p").exists()


# ----------------------------------------------------------------------------------- faults

@pytest.fixture
def fault(monkeypatch):
    """Set MILLSTREAM_FAULT_INJECT for fresh workers; restore clean workers afterwards."""
    def set_fault(spec: str) -> None:
        ms.shutdown()  # fresh workers see the variable
        monkeypatch.setenv(FAULT_ENV, spec)
    yield set_fault
    monkeypatch.delenv(FAULT_ENV, raising=False)
    ms.shutdown()


def _expected_counters(corpus: str) -> dict:
    with open(corpus, encoding="utf-8") as f:
        lines = f.read().splitlines()
    return {("wc", "lines"): len(lines), ("wc", "words"): sum(len(x.split()) for x in lines)}


def _clean_run(corpus: str) -> dict:
    job = WordCount()
    job.run(corpus, split_size=40_000, num_reducers=2)
    return _user_counters(job.counters)


def test_worker_sigkilled_mid_task_gives_exact_output_and_counters(corpus, fault):
    clean = _clean_run(corpus)
    # map task 1 kills its own worker half way through its split; reduce task 0's first
    # attempt dies before it starts (the runner's fault-injection hook)
    fault("kill:step 1 reduce:0:0")
    job = KillMidTask()
    got = dict(job.run(corpus, split_size=40_000, num_reducers=2))
    assert got == dict(_py_wordcount(corpus))
    assert _user_counters(job.counters) == clean
    assert {k: clean[k] for k in _expected_counters(corpus)} == _expected_counters(corpus)
    attempts = {name for (group, name) in job.counters if group == "attempts"}
    assert {"map 0 won on attempt 0", "map 1 won on attempt 1", "reduce 0 won on attempt 1",
            "reduce 1 won on attempt 0"} <= attempts


def test_task_failing_twice_then_succeeding_gives_exact_output_and_counters(corpus, fault):
    clean = _clean_run(corpus)
    # map task 0 raises half way on attempts 0 and 1; reduce task 1 fails before it starts
    # on attempts 0 and 1 (the runner's fault-injection hook)
    fault("raise:step 1 reduce:1:0,raise:step 1 reduce:1:1")
    job = FailTwice()
    got = dict(job.run(corpus, split_size=40_000, num_reducers=2))
    assert got == dict(_py_wordcount(corpus))
    assert _user_counters(job.counters) == clean
    attempts = {name for (group, name) in job.counters if group == "attempts"}
    assert {"map 0 won on attempt 2", "map 1 won on attempt 0", "reduce 0 won on attempt 0",
            "reduce 1 won on attempt 2"} <= attempts


def test_exhausted_attempts_fail_precisely_and_leave_no_output(corpus, tmp_path, fault):
    fault("kill:step 1 map:1:*")
    out = tmp_path / "out"
    with pytest.raises(ms.TaskError) as info:
        WordCount().run(corpus, str(out), split_size=40_000, max_task_attempts=3)
    text = str(info.value)
    assert "MapReduce job WordCount failed: step 1 map, task 1 of " in text
    assert "input split " in text and "corpus.txt[40000:80000]" in text
    assert "after 3 attempt(s)" in text
    for attempt in range(3):
        assert f"attempt {attempt}: worker process died from SIGKILL" in text
    assert len(info.value.attempts) == 3
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no staging left behind


def test_user_error_in_reducer_names_step_key_and_traceback(runner, corpus):
    with pytest.raises(ms.UserFunctionError) as info:
        BadReducer().run(corpus, num_reducers=2, max_task_attempts=2)
    err = info.value
    text = str(err)
    assert "no elephants here" in text and "key 'hadoop'" in text
    assert "BadReducer step 1 reduce" in text and "reduce partition" in text
    assert "failed on all 2 attempt(s)" in text
    assert "BadReducer.reducer" in err.user_traceback or "reducer" in err.user_traceback
    assert isinstance(err.original, ValueError)  # (chained as __cause__ with MILLSTREAM_DEBUG=1)


# ----------------------------------------------------------------------------------- memory

def _anon_rss(pid: int) -> int:
    """Anonymous resident memory of a process (memory-mapped file pages excluded)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no RssAnon for pid {pid}")


@pytest.mark.slow
def test_reducer_streams_a_key_with_more_values_than_memory():
    import threading
    import time

    from millstream.runtime.session import get_session

    n = 5_000_000
    # no speculative copies: a losing copy's worker is replaced by design, and the check
    # below that no worker was replaced is about memory (a killed worker is replaced too)
    ms.init(parallelism=2, memory_limit="16MB", progress=False, speculation=False)
    try:
        ms.range(4, num_partitions=2).collect(driver_input_limit=0)  # start the workers
        pids = get_session().runner_obj.worker_pids()
        idle = {p: _anon_rss(p) for p in pids}
        peak = dict(idle)
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                for p in pids:
                    try:
                        peak[p] = max(peak[p], _anon_rss(p))
                    except (OSError, RuntimeError):
                        pass
                time.sleep(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        job = HotKey()
        try:
            got = dict(job.run(ms.range(n, num_partitions=4), num_reducers=2))
        finally:
            stop.set()
            sampler.join()
        c = job.counters
        cold = list(range(0, n, 100_000))
        assert got == {"hot": n * (n - 1) // 2, "cold": sum(cold)}
        assert c[("check", "hot values")] == n  # the reducer saw every value ...
        assert c[("check", "cold values")] == len(cold)
        assert ("check", "materialized") not in c  # ... through an iterator, not a list
        assert c[("millstream", "spills")] > 0  # the sort spilled runs and merged them
        assert sorted(get_session().runner_obj.worker_pids()) == sorted(pids)
        growth = max(peak[p] - idle[p] for p in pids)
        # a list of the hot key's 5M ints alone would take ~180 MiB
        assert growth < 160 << 20, f"a worker grew by {growth / 2**20:.0f} MiB"
    finally:
        ms.init(parallelism=2, progress=False)


# ----------------------------------------------------------------------------------- CLI

def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "millstream.cli.main", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_cli_runs_the_example_job(corpus, tmp_path):
    out = tmp_path / "counts"
    proc = _cli("mapreduce", f"{EXAMPLE}:WordCount", corpus, "-o", str(out), "--reducers", "3",
                "--parallelism", "2", "--split-size", "40000")
    assert proc.returncode == 0, proc.stderr
    assert (out / "_SUCCESS").exists()
    import re

    with open(corpus, encoding="utf-8") as f:
        want = collections.Counter(w for line in f for w in re.findall(r"[\w']+", line.lower()))
    assert dict(read_text_output(str(out))) == dict(want)
    assert "stage 1 (step 1 map)" in proc.stderr
    assert "Counters:" in proc.stderr and "\twordcount\n\t\tdistinct words=" in proc.stderr
    assert f"step 1 reduce output records={len(want)}" in proc.stderr
    again = _cli("mapreduce", f"{EXAMPLE}:TopWords", corpus, "-o", str(out), "--format",
                 "parquet", "--mode", "overwrite", "--parallelism", "2")
    assert again.returncode == 0, again.stderr
    top = pq.read_table(str(out)).to_pylist()
    assert [(r["key"], r["value"]) for r in top] == \
        [(w, c) for c, w in heapq.nlargest(10, ((c, w) for w, c in want.items()))]


def test_cli_errors(corpus, tmp_path):
    proc = _cli("mapreduce", f"{EXAMPLE}:NoSuchJob", corpus, "-o", str(tmp_path / "x"))
    assert proc.returncode == 2 and "has no class 'NoSuchJob'" in proc.stderr
    proc = _cli("mapreduce", f"{EXAMPLE}", corpus, "-o", str(tmp_path / "x"))
    assert proc.returncode == 2 and "defines 2 MapReduceJob classes" in proc.stderr
    proc = _cli("mapreduce", f"{EXAMPLE}:WordCount", str(tmp_path / "missing.txt"), "-o",
                str(tmp_path / "x"))
    assert proc.returncode == 1 and "Job failed" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_cli_version_module_entry_and_output_modes(corpus, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "millstream", "--version"], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.startswith("millstream ")
    out = tmp_path / "counts"
    first = _cli("mapreduce", f"{EXAMPLE}:WordCount", corpus, "-o", str(out), "--parallelism", "2")
    assert first.returncode == 0, first.stderr
    again = _cli("mapreduce", f"{EXAMPLE}:WordCount", corpus, "-o", str(out))
    assert again.returncode == 1
    assert "--mode overwrite" in again.stderr and 'mode="' not in again.stderr  # CLI spelling
    n = len(read_text_output(str(out)))
    more = _cli("mapreduce", f"{EXAMPLE}:WordCount", corpus, "-o", str(out), "--mode", "append")
    assert more.returncode == 0, more.stderr
    assert len(read_text_output(str(out))) == 2 * n
