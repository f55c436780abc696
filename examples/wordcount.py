"""Word count with Millstream: the vectorized Dataset API over text files.

    python examples/wordcount.py                 # writes a sample corpus to data/books/ first
    python examples/wordcount.py 'logs/*.txt' -o counts/ --parallelism 4 --memory-limit 1GB
"""

from __future__ import annotations

import argparse
import itertools
import os
import random

import millstream as ms

#: where the sample corpus goes when no input is given (relative to the working directory)
SAMPLE_DIR = os.path.join("data", "books")


def word_counts(path: str) -> ms.Dataset:
    """Lower-cased words and how often each occurs, most frequent first."""
    return (ms.read_text(path)
            .select(ms.col("text").str.lower().str.split().alias("word"))
            .explode("word")
            .group_by("word")
            .agg(ms.count().alias("count"))
            .sort(["count", "word"], descending=[True, False]))


def make_sample(directory: str, lines: int = 200_000, seed: int = 7) -> str:
    """Write a reproducible sample corpus and return its path."""
    rng = random.Random(seed)
    vocab = [f"word{i}" for i in range(5000)] + ["the", "of", "and", "a", "to", "in", "Millstream"]
    # Zipf-like word frequencies; cumulative once (``weights=`` would re-add them per line)
    cum_weights = list(itertools.accumulate(1.0 / (i + 1) for i in range(len(vocab))))
    path = os.path.join(directory, "sample.txt")
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(lines):
            words = rng.choices(vocab, cum_weights=cum_weights, k=rng.randint(3, 15))
            f.write(" ".join(words) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", nargs="?",
                    help="file, directory, glob or s3:// URI (default: a sample corpus written "
                         "to data/books/)")
    ap.add_argument("-o", "--output", help="write the counts as Parquet here")
    ap.add_argument("--parallelism", type=int, default=None)
    ap.add_argument("--memory-limit", default=None)
    args = ap.parse_args()
    ms.init(parallelism=args.parallelism, memory_limit=args.memory_limit)
    path = args.input
    if path is None:
        os.makedirs(SAMPLE_DIR, exist_ok=True)
        path = make_sample(SAMPLE_DIR)
        print(f"sample corpus: {path} (the README's other examples read data/books/*.txt)")
    counts = word_counts(path)
    if args.output:
        counts.write_parquet(args.output, mode="overwrite")
        print(f"wrote {args.output}")
    counts.show(10)
    stats = ms.last_job_stats()
    print(f"{sum(s['rows_in'] for s in stats.stages[:1]):,} lines read in {stats.seconds:.2f} s")
    ms.shutdown()


if __name__ == "__main__":
    main()
