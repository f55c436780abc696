"""db-benchmark join q1-q5: Millstream against DuckDB and Polars on the same Parquet files.

Usage (from the repository root):

    python benchmarks/join.py                       # 1e7 rows, every engine, q1-q5
    python benchmarks/join.py --rows 1e6 --queries 1,5 --engines duckdb,millstream

The data has the shapes of the db-benchmark join generator (``join-datagen.R``), made here
with numpy: a table ``x`` of N rows and three right-hand tables, ``small`` (N/1e6 rows),
``medium`` (N/1e3) and ``big`` (N) (small and medium no smaller than at 1e7), each with a unique key per row; 90% of the keys of
``x`` find a match. Every query keeps all columns of ``x`` and the right table's others,
and its answer is materialized as a pyarrow Table in the engine's Python process; the
check (row count, sums of v1 and v2, nulls of v2) is against the exact answer that the
generator recorded. Every (query, engine) runs in its own subprocess (``querybench.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    DATA_DIR,
    INSTALL_HINT,
    RESULTS_DIR,
    environment_info,
    module_available,
    parse_size,
    warm_page_cache,
    write_results,
)
from querybench import (  # noqa: E402
    add_common_args,
    add_query_worker_args,
    cells_json,
    parse_list,
    print_report,
    query_worker_main,
    report_saved,
    values_equal,
)
from querybench import run_matrix as _run_matrix  # noqa: E402

ALL_ENGINES = ("duckdb", "polars", "millstream")
REFERENCE = "duckdb"
GENERATOR_VERSION = 1
DEFAULT_SEED = 108
TABLES = ("x", "small", "medium", "big")
ROW_GROUP_ROWS = 1 << 20

#: query -> (right table, key, how), as db-benchmark's join questions.
QUERIES: dict[str, tuple[str, str, str]] = {
    "q1": ("small", "id1", "inner"),    # small inner on int
    "q2": ("medium", "id2", "inner"),   # medium inner on int
    "q3": ("medium", "id2", "left"),    # medium outer on int
    "q4": ("medium", "id5", "inner"),   # medium inner on factor (a string key)
    "q5": ("big", "id3", "inner"),      # big inner on int
}
QUESTION = {"q1": "small inner on int", "q2": "medium inner on int",
            "q3": "medium outer on int", "q4": "medium inner on factor",
            "q5": "big inner on int"}


# =========================================================================== data


def data_dir_for(rows: int, seed: int) -> Path:
    """Where the tables for a size and seed are cached."""
    return DATA_DIR / f"join-{rows:.0e}-seed{seed}-v{GENERATOR_VERSION}".replace("+", "")


def _split_keys(rng: Any, n: int) -> tuple[Any, Any, Any]:
    """Keys 1..1.1n in random order, split into those only the left side has (0.9n: the
    ones both sides share), the left's extra (0.1n) and the right's extra (0.1n), as the
    db-benchmark generator does: 90% of the left's keys match."""
    keys = rng.permutation(int(n * 1.1)) + 1
    a, b = int(n * 0.9), n
    return keys[:a], keys[a:b], keys[b:]


def _id_strings(values: Any) -> Any:
    """``id<value>`` strings, as the generator's ``sprintf("id%.0f", v)``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.binary_join_element_wise("id", pc.cast(pa.array(values), pa.string()), "")


def _write(table: Any, path: Path) -> None:
    import pyarrow.parquet as pq

    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS, compression="snappy")
    tmp.rename(path)


def generate(rows: int, seed: int, out: Path) -> dict[str, Any]:
    """Write x, small, medium and big as Parquet and return the exact answers."""
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    # Below 1e7 rows small keeps 10 rows and medium 10,000 (their sizes at 1e7) at least.
    n1, n2, n3 = max(rows // 10**6, 10), max(rows // 10**3, 10**4), rows
    k1, k2, k3 = _split_keys(rng, n1), _split_keys(rng, n2), _split_keys(rng, n3)

    def left(k: tuple[Any, Any, Any], size: int) -> Any:
        return rng.choice(np.concatenate([k[0], k[1]]), size=size, replace=True)

    def right(k: tuple[Any, Any, Any], size: int, unique: bool) -> Any:
        pool = np.concatenate([k[0], k[2]])
        return rng.permutation(pool)[:size] if unique else rng.choice(pool, size, replace=True)

    def v(size: int) -> Any:
        return np.round(rng.uniform(0, 100, size), 6)

    out.mkdir(parents=True, exist_ok=True)
    x_id1, x_id2, x_id3 = left(k1, rows), left(k2, rows), left(k3, rows)
    x = pa.table({"id1": x_id1, "id2": x_id2, "id3": x_id3, "id4": _id_strings(x_id1),
                  "id5": _id_strings(x_id2), "id6": _id_strings(x_id3), "v1": v(rows)})
    _write(x, out / "x.parquet")
    s_id1 = right(k1, n1, True)
    small = pa.table({"id1": s_id1, "id4": _id_strings(s_id1), "v2": v(n1)})
    _write(small, out / "small.parquet")
    m_id1, m_id2 = right(k1, n2, False), right(k2, n2, True)
    medium = pa.table({"id1": m_id1, "id2": m_id2, "id4": _id_strings(m_id1),
                       "id5": _id_strings(m_id2), "v2": v(n2)})
    _write(medium, out / "medium.parquet")
    b_id1, b_id2, b_id3 = right(k1, n3, False), right(k2, n3, False), right(k3, n3, True)
    big = pa.table({"id1": b_id1, "id2": b_id2, "id3": b_id3, "id4": _id_strings(b_id1),
                    "id5": _id_strings(b_id2), "id6": _id_strings(b_id3), "v2": v(n3)})
    _write(big, out / "big.parquet")

    # The right keys are unique, so every query is a lookup: its exact answer from arrays.
    v1 = x.column("v1").to_numpy()
    rights = {"small": (s_id1, small), "medium": (m_id2, medium), "big": (b_id3, big)}
    x_keys = {"id1": x_id1, "id2": x_id2, "id5": x_id2, "id3": x_id3}
    answers = {}
    for q, (table, key, how) in QUERIES.items():
        r_keys, r = rights[table]
        lookup = np.full(int(max(r_keys.max(), x_keys[key].max())) + 1, np.nan)
        lookup[r_keys] = r.column("v2").to_numpy()
        v2 = lookup[x_keys[key]]
        hit = ~np.isnan(v2)
        answers[q] = {
            "rows": int(hit.sum()) if how == "inner" else rows,
            "sum_v1": float(v1[hit].sum()) if how == "inner" else float(v1.sum()),
            "sum_v2": float(v2[hit].sum()),
            "null_v2": 0 if how == "inner" else int((~hit).sum()),
        }
    return {"rows": rows, "seed": seed, "generator_version": GENERATOR_VERSION,
            "small_rows": n1, "medium_rows": n2, "big_rows": n3, "answers": answers}


def ensure_data(rows: int, seed: int) -> tuple[Path, dict[str, Any]]:
    """The cached tables and their answers, generated first if needed."""
    out = data_dir_for(rows, seed)
    meta_path = out / "meta.json"
    if meta_path.exists() and all((out / f"{t}.parquet").exists() for t in TABLES):
        return out, json.loads(meta_path.read_text())
    print(f"generating join data ({rows:,} rows, seed {seed}) into {out} ...", flush=True)
    t0 = time.perf_counter()
    meta = generate(rows, seed, out)
    meta["generate_s"] = round(time.perf_counter() - t0, 1)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"  done in {meta['generate_s']} s", flush=True)
    return out, meta


# =========================================================================== engines


def summarize(table: Any) -> Any:
    """The check of an answer as a one-row table: rows, sums of v1 and v2, nulls of v2."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return pa.table({"rows": [table.num_rows],
                     "sum_v1": [pc.sum(table.column("v1")).as_py()],
                     "sum_v2": [pc.sum(table.column("v2")).as_py()],
                     "null_v2": [table.column("v2").null_count],
                     "columns": [",".join(table.column_names)]})


def duckdb_sql(query: str) -> str:
    """The query as db-benchmark's DuckDB solution writes it: x's columns and the right
    table's other columns (renamed after the table where they clash)."""
    table, key, how = QUERIES[query]
    others = {"small": ["id1", "id4"], "medium": ["id1", "id2", "id4", "id5"],
              "big": ["id1", "id2", "id3", "id4", "id5", "id6"]}[table]
    extra = ", ".join(f"{table}.{c} AS {table}_{c}" for c in others if c != key)
    join = "LEFT JOIN" if how == "left" else "JOIN"
    return f"SELECT x.*, {extra}, {table}.v2 FROM x {join} {table} USING ({key})"


class DuckDBEngine:
    """DuckDB on views over the Parquet files; the answer fetched as an Arrow table."""

    def __init__(self, data: Path, parallelism: int, memory_limit: int | None) -> None:
        import duckdb

        self.con = duckdb.connect(":memory:")
        self.con.execute(f"SET threads = {int(parallelism)}")
        if memory_limit:
            self.con.execute(f"SET memory_limit = '{memory_limit // 2**20}MB'")
        for t in TABLES:
            self.con.execute(f"CREATE VIEW {t} AS SELECT * FROM read_parquet('{data / t}.parquet')")
        self.details = {"threads": parallelism, "duckdb": duckdb.__version__}

    def run(self, query: str) -> Any:
        return summarize(self.con.sql(duckdb_sql(query)).to_arrow_table())

    def close(self) -> None:
        self.con.close()


class PolarsEngine:
    """Polars lazy ``join`` of two ``scan_parquet`` frames; ``collect().to_arrow()``
    (newest compat level: string views stay views, no copy)."""

    def __init__(self, data: Path, parallelism: int, memory_limit: int | None) -> None:
        import polars as pl

        self.pl = pl
        self.frames = {t: pl.scan_parquet(str(data / f"{t}.parquet")) for t in TABLES}
        self.details = {"threads": pl.thread_pool_size(), "polars": pl.__version__}

    def run(self, query: str) -> Any:
        table, key, how = QUERIES[query]
        lf = self.frames["x"].join(self.frames[table], on=key, how=how)
        df = lf.collect()
        return summarize(df.to_arrow(compat_level=self.pl.CompatLevel.newest()))

    def close(self) -> None:
        pass


class MillstreamEngine:
    """Millstream's local runner: ``read_parquet(x).join(read_parquet(t), on=key)``,
    ``to_arrow()``."""

    def __init__(self, data: Path, parallelism: int, memory_limit: int | None) -> None:
        import millstream as ms

        self.ms = ms
        self.data = data
        ms.init(parallelism=parallelism, memory_limit=memory_limit)
        self.details = {"parallelism": parallelism, "memory_limit": memory_limit}

    def run(self, query: str) -> Any:
        table, key, how = QUERIES[query]
        ms = self.ms
        x = ms.read_parquet(str(self.data / "x.parquet"))
        right = ms.read_parquet(str(self.data / f"{table}.parquet"))
        return summarize(x.join(right, on=key, how=how).to_arrow())

    def close(self) -> None:
        self.ms.shutdown()


ENGINES: dict[str, Callable[[Path, int, int | None], Any]] = {
    "duckdb": DuckDBEngine, "polars": PolarsEngine, "millstream": MillstreamEngine,
}


def make_engine(args: argparse.Namespace) -> Any:
    """Start the engine a worker was asked for."""
    mem = parse_size(args.memory_limit) if args.memory_limit else None
    return ENGINES[args.worker](Path(args.data_dir), args.parallelism, mem)


def availability(engine: str) -> str | None:
    """Why an engine cannot run here, or None."""
    if engine == "millstream":
        src = Path(__file__).resolve().parent.parent / "src" / "millstream"
        return None if src.exists() or module_available("millstream") else "millstream is not importable"
    return None if module_available(engine) else f"{engine} is not installed: {INSTALL_HINT}"


def make_check(meta: dict[str, Any]) -> Callable[[str, Any], list[str]]:
    """The check of a summarized answer against the generator's exact one."""
    def check(query: str, table: Any) -> list[str]:
        got = table.to_pylist()[0]
        want = meta["answers"][query]
        problems = []
        for k in ("rows", "null_v2"):
            if got[k] != want[k]:
                problems.append(f"{k}: {got[k]}, expected {want[k]}")
        for k in ("sum_v1", "sum_v2"):
            if got[k] is None or not values_equal(float(got[k]), float(want[k])):
                problems.append(f"{k}: {got[k]}, expected {want[k]}")
        return problems

    return check


# =========================================================================== harness


def harness_main(args: argparse.Namespace) -> int:
    """Generate the data, run the matrix, report."""
    data, meta = ensure_data(args.rows, args.seed)
    if args.generate_only:
        return 0
    for t in TABLES:
        warm_page_cache(data / f"{t}.parquet")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_dir = RESULTS_DIR / "logs" / f"join-{stamp}"
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"join: x {args.rows:,} rows, small {meta['small_rows']:,}, medium "
          f"{meta['medium_rows']:,}, big {meta['big_rows']:,}; engines "
          f"{', '.join(args.engines)}; parallelism {args.parallelism}; {args.runs} runs per "
          f"process", flush=True)
    cells = _run_matrix(Path(__file__).resolve(), args.queries, args.engines, args, log_dir,
                        make_check(meta), availability,
                        extra=["--data-dir", str(data), "--rows", str(args.rows)])
    reference = REFERENCE if REFERENCE in args.engines else args.engines[0]
    labels = [q.upper() for q in args.queries]
    for c in cells:
        c.query = c.query.upper()
    print("\n" + "\n".join(f"{q.upper()}: {QUESTION[q]} ({duckdb_sql(q)})" for q in args.queries))
    summary = print_report(cells, labels, args.engines, reference, f"join {args.rows:.0e} rows")
    payload = {
        "benchmark": "join",
        "timestamp": stamp,
        "data": {k: v for k, v in meta.items()} | {"path": str(data)},
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "result_file", "query")},
        "reference": reference,
        "environment": environment_info(["millstream", "pyarrow", "polars", "duckdb", "psutil"]),
        "summary": summary,
        "cells": cells_json(cells, reference),
    }
    out = write_results("join", payload)
    print(f"\nresults: {out}\nlogs:    {log_dir}")
    return 2 if any(c.status == "WRONG" for c in cells) else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(
        description="db-benchmark join q1-q5: Millstream vs DuckDB and Polars.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rows", type=float, default=1e7, help="rows of x (and of big)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="generator seed")
    p.add_argument("--queries", default="all", help="e.g. 1,3 (default: q1-q5)")
    p.add_argument("--engines", default=",".join(ALL_ENGINES),
                   help=f"comma-separated, from: {', '.join(ALL_ENGINES)} (or 'all')")
    p.add_argument("--data-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--generate-only", action="store_true", help="only make the data")
    add_common_args(p, default_timeout=600.0)
    add_query_worker_args(p, ALL_ENGINES)
    args = p.parse_args(argv)
    args.rows = int(args.rows)
    if not args.worker:
        qs = list(QUERIES) if args.queries.strip() == "all" else [
            f"q{x.strip().lower().lstrip('q')}" for x in args.queries.split(",") if x.strip()]
        args.queries = parse_list(",".join(qs), list(QUERIES), "queries", p)
        args.engines = parse_list(args.engines, ALL_ENGINES, "engine(s)", p)
        if args.rows < 10**6:
            p.error("--rows must be at least 1e6 (small has rows/1e6 rows)")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point: the harness, or one (query, engine) with --worker."""
    args = parse_args(argv)
    if args.worker:
        return query_worker_main(make_engine, args)
    if args.report:
        return report_saved([Path(f) for f in args.report], ALL_ENGINES, REFERENCE,
                            f"join (saved: {len(args.report)} file(s))")
    return harness_main(args)


if __name__ == "__main__":
    sys.exit(main())
