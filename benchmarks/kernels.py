"""Per-partition kernels: pyarrow (Acero) against Polars and DuckDB on the work one task does,
single-threaded, Arrow table in and Arrow table out.

    python benchmarks/kernels.py                       # 1e7 group-by rows, 64 MB of text
    python benchmarks/kernels.py --rows 2000000 --text-mb 16 --repeat 5

- ``partial qN``: the map-side step of db-benchmark's group-by question N (states: sums and
  counts per key) on the rows of one Parquet file (G1, 1e7 rows, K = 100; the same data as
  benchmarks/groupby.py), in memory;
- ``final qN``: the reduce-side merge of those states, as 10 partial results of 1e6 rows each
  arrive;
- ``wordcount``: lower-case, split on spaces, explode, count per word on the lines of the
  word count corpus (benchmarks/wordcount.py), in memory.

Times are the best of ``--repeat`` (wall and CPU); 1 thread each: ``use_threads=False`` for
Acero, ``POLARS_MAX_THREADS=1``, DuckDB ``SET threads=1``. Results are checked to agree.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("POLARS_MAX_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DATA_DIR, format_table  # noqa: E402
from groupby import QUERIES, ensure_data  # noqa: E402


def _best(fn: Any, repeat: int) -> tuple[float, float, Any]:
    wall, cpu, out = float("inf"), float("inf"), None
    for _ in range(repeat):
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        wall = min(wall, time.perf_counter() - t0)
        cpu = min(cpu, time.process_time() - c0)
    return wall, cpu, out


def _partial_aggs(q: str) -> list[tuple[str, str]]:
    """The states of the query: sum (and count for a mean) of each column."""
    out = []
    for c, f in QUERIES[q][1]:
        out.append((c, "sum"))
        if f == "mean":
            out.append((c, "count"))
    return out


def group_by_kernels(table: Any, q: str) -> dict[str, Any]:
    """(name -> function) computing the partial states of q on ``table``."""
    import duckdb
    import polars as pl

    keys = QUERIES[q][0]
    aggs = _partial_aggs(q)
    con = duckdb.connect()
    con.execute("SET threads = 1")
    sel = ", ".join(f"{f}({c}) AS {c}_{f}" for c, f in aggs)
    sql = f"SELECT {', '.join(keys)}, {sel} FROM t GROUP BY {', '.join(keys)}"
    pexprs = [getattr(pl.col(c), f)().alias(f"{c}_{f}") for c, f in aggs]
    return {
        "acero": lambda t: t.group_by(keys, use_threads=False).aggregate(aggs),
        "polars": lambda t: pl.from_arrow(t).lazy().group_by(keys).agg(pexprs).collect()
        .to_arrow(),
        "duckdb": lambda t: _duck(con, t, sql),
    }


def _duck(con: Any, t: Any, sql: str) -> Any:
    con.register("t", t)
    try:
        return con.sql(sql).to_arrow_table()
    finally:
        con.unregister("t")


def final_kernels(q: str) -> dict[str, Any]:
    """(name -> function) merging partial states of q (sums of the state columns)."""
    import duckdb
    import polars as pl

    keys = QUERIES[q][0]
    cols = [f"{c}_{f}" for c, f in _partial_aggs(q)]
    con = duckdb.connect()
    con.execute("SET threads = 1")
    sql = (f"SELECT {', '.join(keys)}, {', '.join(f'sum({c}) AS {c}' for c in cols)} FROM t "
           f"GROUP BY {', '.join(keys)}")
    return {
        "acero": lambda t: t.group_by(keys, use_threads=False).aggregate([(c, "sum")
                                                                           for c in cols]),
        "polars": lambda t: pl.from_arrow(t).lazy().group_by(keys)
        .agg([pl.col(c).sum() for c in cols]).collect().to_arrow(),
        "duckdb": lambda t: _duck(con, t, sql),
    }


def word_count_kernels() -> dict[str, Any]:
    import duckdb
    import polars as pl
    import pyarrow.compute as pc

    from millstream.expr.strings import _split_whitespace

    con = duckdb.connect()
    con.execute("SET threads = 1")
    sql = ("SELECT w, count(*) AS n FROM (SELECT unnest(string_split(lower(line), ' ')) AS w "
           "FROM t) WHERE w <> '' GROUP BY w")

    def arrow(t: Any) -> Any:
        words = pc.list_flatten(_split_whitespace(pc.utf8_lower(t.column(0).combine_chunks()),
                                                  t.num_rows))
        return pc.value_counts(words)

    return {
        "pyarrow": arrow,
        "polars": lambda t: pl.from_arrow(t).lazy()
        .select(pl.col("line").str.to_lowercase().str.split(" ").alias("w")).explode("w")
        .filter(pl.col("w") != "").group_by("w").agg(pl.len()).collect().to_arrow(),
        "duckdb": lambda t: _duck(con, t, sql),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--text-mb", type=int, default=64)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--queries", default=",".join(QUERIES))
    args = p.parse_args(argv)

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    path = ensure_data(args.rows, 100, 108)
    data = pq.read_table(path)
    for q in args.queries.split(","):
        keys, aggs = QUERIES[q]
        t = data.select(keys + sorted({c for c, _ in aggs})).combine_chunks()
        kernels = group_by_kernels(t, q)
        results = {}
        for name, fn in kernels.items():
            wall, cpu, out = _best(lambda fn=fn, t=t: fn(t), args.repeat)
            results[name] = (wall, cpu, out.num_rows)
        rows += _rows(f"partial {q}", results)
        # the final step: ten 1e6-row partials' states, concatenated
        pieces = [kernels["acero"](t.slice(i, 1_000_000)) for i in range(0, t.num_rows, 1_000_000)]
        states = pa.concat_tables(pieces).combine_chunks()
        results = {}
        for name, fn in final_kernels(q).items():
            wall, cpu, out = _best(lambda fn=fn, s=states: fn(s), args.repeat)
            results[name] = (wall, cpu, out.num_rows)
        rows += _rows(f"final {q} ({states.num_rows:,} states)", results)
    corpus = sorted(DATA_DIR.glob("wordcount-*mb-seed*-v*.txt"))
    if corpus:
        with open(corpus[-1], "rb") as f:
            text = f.read(args.text_mb << 20)
        text = text[:text.rfind(b"\n")]
        lines = pa.table({"line": pa.array(text.decode("utf-8").split("\n"))})
        results = {}
        for name, fn in word_count_kernels().items():
            wall, cpu, out = _best(lambda fn=fn: fn(lines), args.repeat)
            results[name] = (wall, cpu, len(out))
        rows += _rows(f"wordcount {args.text_mb} MB", results)
    else:
        print("(no word count corpus: run benchmarks/wordcount.py --generate-only first)")
    print(format_table(["kernel", "engine", "wall s", "cpu s", "x fastest", "rows out"], rows))
    return 0


def _rows(label: str, results: dict[str, tuple[float, float, int]]) -> list[list[str]]:
    fastest = min(w for w, _, _ in results.values())
    counts = {n for _, _, n in results.values()}
    note = "" if len(counts) == 1 else " (DISAGREE)"
    return [[label, name, f"{w:.3f}", f"{c:.3f}", f"{w / fastest:.2f}", f"{n:,}{note}"]
            for name, (w, c, n) in results.items()]


if __name__ == "__main__":
    sys.exit(main())
