"""Word count as a MapReduce job (Hadoop Streaming / mrjob style).

Run it with the command line:

    millstream mapreduce examples/mapreduce_wordcount.py:WordCount 'books/*.txt' -o counts/
    millstream mapreduce examples/mapreduce_wordcount.py:TopWords books/ -o top/ --reducers 4

or as a script (generates a small sample corpus when no input is given):

    python examples/mapreduce_wordcount.py [INPUT...] [-o OUTPUT]
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import os
import random
import re
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any

import millstream as ms

WORD = re.compile(r"[\w']+")


class WordCount(ms.MapReduceJob):
    """Lower-cased words and how often each occurs."""

    def mapper(self, key: Any, line: str) -> Iterable[tuple[str, int]]:
        """One (word, 1) per word of the line."""
        self.increment_counter("wordcount", "lines")
        for word in WORD.findall(line.lower()):
            yield word, 1

    def combiner(self, word: str, counts: Iterator[int]) -> Iterable[tuple[str, int]]:
        """Partial sums in the map task."""
        yield word, sum(counts)

    def reducer(self, word: str, counts: Iterator[int]) -> Iterable[tuple[str, int]]:
        """The total of a word."""
        self.increment_counter("wordcount", "distinct words")
        yield word, sum(counts)


class TopWords(WordCount):
    """The ten most frequent words: word count, then a second step picking the top."""

    top = 10

    def reducer_top(self, _: None, counted: Iterator[tuple[int, str]]) -> Iterable[tuple[str, int]]:
        """All (count, word) pairs meet in one reducer; keep the largest."""
        for count, word in heapq.nlargest(self.top, counted):
            yield word, count

    def to_one_key(self, word: str, count: int) -> Iterable[tuple[None, tuple[int, str]]]:
        """Send every (count, word) to the same reducer."""
        yield None, (count, word)

    def steps(self) -> list[ms.MRStep]:
        """Count, then rank."""
        return [ms.MRStep(mapper=self.mapper, combiner=self.combiner, reducer=self.reducer),
                ms.MRStep(mapper=self.to_one_key, reducer=self.reducer_top, num_reducers=1)]


def make_sample(directory: str, lines: int = 50_000, seed: int = 7) -> str:
    """Write a reproducible sample corpus and return its path."""
    rng = random.Random(seed)
    vocab = [f"word{i}" for i in range(2000)] + ["the", "of", "and", "a", "to", "in", "Millstream"]
    cum_weights = list(itertools.accumulate(1.0 / (i + 1) for i in range(len(vocab))))
    path = os.path.join(directory, "sample.txt")
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(lines):
            f.write(" ".join(rng.choices(vocab, cum_weights=cum_weights, k=rng.randint(3, 15)))
                    + "\n")
    return path


def main() -> None:
    """Run TopWords over the input (or a generated sample) and print the result."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", nargs="*", help="text files (default: a generated sample)")
    ap.add_argument("-o", "--output", help="also write the full word count here (text)")
    ap.add_argument("--parallelism", type=int, default=None)
    args = ap.parse_args()
    ms.init(parallelism=args.parallelism)
    with tempfile.TemporaryDirectory() as tmp:
        inputs = args.input or [make_sample(tmp)]
        job = TopWords()
        for word, count in job.run(inputs):
            print(f"{count:>8}  {word}")
        print(f"{job.counters[('wordcount', 'lines')]} lines")
        if args.output:
            WordCount().run(inputs, args.output, mode="overwrite")
            print(f"wrote {args.output}")
    ms.shutdown()


if __name__ == "__main__":
    main()
