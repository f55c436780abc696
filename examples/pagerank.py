"""PageRank, iterative, with the link table cached across iterations.

    python examples/pagerank.py                  # a generated random graph
    python examples/pagerank.py edges.csv --iterations 10   # CSV with columns src,dst
"""

from __future__ import annotations

import argparse
import random

import millstream as ms


def pagerank(edges: ms.Dataset, iterations: int = 10, damping: float = 0.85) -> ms.Dataset:
    """Ranks of pages with at least one in-link (the classic Spark example's formulation)."""
    degree = edges.group_by("src").agg(ms.count().alias("deg"))
    links = edges.join(degree, on="src").cache()        # reused by every iteration
    ranks = links.select("src").distinct().select(ms.col("src").alias("page"),
                                                  ms.lit(1.0).alias("rank")).cache()
    for _ in range(iterations):
        contribs = (links.join(ranks, left_on="src", right_on="page")
                    .select(ms.col("dst").alias("page"), (ms.col("rank") / ms.col("deg")).alias("c")))
        new_ranks = (contribs.group_by("page").agg(ms.sum("c").alias("s"))
                     .select("page", (ms.lit(1 - damping) + ms.lit(damping) * ms.col("s")).alias("rank"))
                     .cache())
        new_ranks.count()                               # materialize this iteration
        ranks.unpersist()
        ranks = new_ranks
    return ranks


def pagerank_python(edges: list[tuple[int, int]], iterations: int = 10, damping: float = 0.85) -> dict:
    """The same algorithm in plain Python (the oracle for tests)."""
    out: dict[int, list[int]] = {}
    for s, d in edges:
        out.setdefault(s, []).append(d)
    ranks = {s: 1.0 for s in out}
    for _ in range(iterations):
        contrib: dict[int, float] = {}
        for s, dsts in out.items():
            if s in ranks:
                for d in dsts:
                    contrib[d] = contrib.get(d, 0.0) + ranks[s] / len(dsts)
        ranks = {p: (1 - damping) + damping * c for p, c in contrib.items()}
    return ranks


def random_graph(pages: int = 2000, edges: int = 20000, seed: int = 3) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randrange(pages), int(rng.paretovariate(1.2)) % pages) for _ in range(edges)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("edges", nargs="?", help="CSV file with columns src,dst (default: a random graph)")
    ap.add_argument("--iterations", type=int, default=10)
    args = ap.parse_args()
    if args.edges:
        edges = ms.read_csv(args.edges)
    else:
        edges = ms.from_items([{"src": s, "dst": d} for s, d in random_graph()], num_partitions=4)
    ranks = pagerank(edges, args.iterations)
    ranks.sort("rank", descending=True).show(10)
    ms.shutdown()


if __name__ == "__main__":
    main()
