"""The TPC-H benchmark's data and peers: the tables generated with tpchgen-cli, the
official query texts (``tpch_queries/``) and DuckDB's reference answers to them, and the
peer engines (DuckDB and PySpark on the official texts, Polars on ``tpch_polars.py``).
Used by ``tpch.py``, which holds the Millstream queries and the harness.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import DATA_DIR, INSTALL_HINT
from querybench import compare_answers

QUERY_DIR = Path(__file__).resolve().parent / "tpch_queries"
TABLES = ("region", "nation", "supplier", "customer", "part", "partsupp", "orders", "lineitem")
QUERY_NAMES = tuple(f"q{i}" for i in range(1, 23))

#: ORDER BY of each query's answer as (column index, descending); None: no ORDER BY.
ORDER_BY: dict[str, list[tuple[int, bool]] | None] = {
    "q1": [(0, False), (1, False)], "q2": [(0, True), (2, False), (1, False), (3, False)],
    "q3": [(1, True), (2, False)], "q4": [(0, False)], "q5": [(1, True)], "q6": None,
    "q7": [(0, False), (1, False), (2, False)], "q8": [(0, False)],
    "q9": [(0, False), (1, True)], "q10": [(2, True)], "q11": [(1, True)],
    "q12": [(0, False)], "q13": [(1, True), (0, True)], "q14": None, "q15": [(0, False)],
    "q16": [(3, True), (0, False), (1, False), (2, False)], "q17": None,
    "q18": [(4, True), (3, False)], "q19": None, "q20": [(0, False)],
    "q21": [(1, True), (0, False)], "q22": [(0, False)],
}


def sql_text(query: str) -> str:
    """The official text of a query (``tpch_queries/qNN.sql``), without a final ';'."""
    n = int(query.lstrip("q"))
    return (QUERY_DIR / f"q{n:02d}.sql").read_text().strip().rstrip(";")


# =========================================================================== engines


class DuckDBEngine:
    """DuckDB on views over the Parquet files, running the official query texts."""

    def __init__(self, data_dir: Path, parallelism: int, memory_limit: int | None) -> None:
        import duckdb

        self.con = duckdb.connect(":memory:")
        self.con.execute(f"SET threads = {int(parallelism)}")
        if memory_limit:
            self.con.execute(f"SET memory_limit = '{memory_limit // 2**20}MB'")
        for name in TABLES:
            path = str(data_dir / f"{name}.parquet").replace("'", "''")
            self.con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet('{path}')")
        self.details = {"threads": parallelism, "duckdb": duckdb.__version__}

    def run(self, query: str) -> Any:
        return self.con.sql(sql_text(query)).to_arrow_table()

    def close(self) -> None:
        self.con.close()


class PolarsEngine:
    """Polars lazy frames over ``scan_parquet``, the queries of ``tpch_polars.py``."""

    def __init__(self, data_dir: Path, parallelism: int, memory_limit: int | None) -> None:
        import polars as pl
        import tpch_polars

        self.queries = tpch_polars.QUERIES
        self.tables = {n: pl.scan_parquet(str(data_dir / f"{n}.parquet")) for n in TABLES}
        self.details = {"threads": pl.thread_pool_size(), "polars": pl.__version__}

    def run(self, query: str) -> Any:
        return self.queries[query](self.tables).collect().to_arrow()

    def close(self) -> None:
        pass


class SparkEngine:
    """PySpark local[N]: the Parquet files as temporary views, the official query texts
    through ``spark.sql``, the answer through ``toArrow()``."""

    def __init__(self, data_dir: Path, parallelism: int, memory_limit: int | None) -> None:
        if not shutil.which("java") and not os.environ.get("JAVA_HOME"):
            raise RuntimeError("PySpark needs Java 17+ (no java on PATH, no JAVA_HOME)")
        from pyspark.sql import SparkSession

        driver_mem = f"{memory_limit // 2**20}m" if memory_limit else "4g"
        self.spark = (SparkSession.builder.master(f"local[{parallelism}]")
                      .appName("millstream-tpch")
                      .config("spark.driver.memory", driver_mem)
                      .config("spark.ui.enabled", "false")
                      .config("spark.ui.showConsoleProgress", "false")
                      .getOrCreate())
        self.spark.sparkContext.setLogLevel("ERROR")
        for name in TABLES:
            self.spark.read.parquet(str(data_dir / f"{name}.parquet")).createOrReplaceTempView(name)
        self.details = {"master": f"local[{parallelism}]", "driver_memory": driver_mem,
                        "shuffle_partitions": self.spark.conf.get("spark.sql.shuffle.partitions"),
                        "adaptive": self.spark.conf.get("spark.sql.adaptive.enabled")}

    def run(self, query: str) -> Any:
        df = self.spark.sql(sql_text(query))
        if hasattr(df, "toArrow"):  # PySpark 4
            return df.toArrow()
        import pyarrow as pa

        return pa.Table.from_pandas(df.toPandas(), preserve_index=False)

    def close(self) -> None:
        self.spark.stop()



# =========================================================================== data


def tpchgen_binary() -> str | None:
    """The ``tpchgen-cli`` executable: next to this Python, or on PATH."""
    beside = Path(sys.executable).parent / "tpchgen-cli"
    return str(beside) if beside.exists() else shutil.which("tpchgen-cli")


def ensure_data(sf: int, data_dir: Path, threads: int) -> None:
    """Generate the eight tables as Parquet with tpchgen-cli unless they are there."""
    if all((data_dir / f"{t}.parquet").exists() for t in TABLES):
        return
    exe = tpchgen_binary()
    if exe is None:
        raise SystemExit(f"tpchgen-cli is not installed ({INSTALL_HINT}, or pip install "
                         "tpchgen-cli); or pass --data-dir with the Parquet files")
    data_dir.mkdir(parents=True, exist_ok=True)
    print(f"generating TPC-H SF {sf} into {data_dir} with tpchgen-cli ...", flush=True)
    t0 = time.perf_counter()
    subprocess.run([exe, "parquet", "-s", str(sf), "-o", str(data_dir), "-n", str(threads)],
                   check=True)
    print(f"  done in {time.perf_counter() - t0:.1f} s", flush=True)


def plain_strings_copy(data_dir: Path, out_dir: Path) -> None:
    """Copy the tables with their ``string_view`` columns as ``string`` (row group by row
    group, Snappy as tpchgen-cli writes): the same data for engines that cannot read
    string views yet. Only the Arrow types differ: Parquet stores both as UTF-8 byte
    arrays."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if all((out_dir / f"{t}.parquet").exists() for t in TABLES):
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"copying {data_dir} with plain strings into {out_dir} ...", flush=True)
    for name in TABLES:
        src = pq.ParquetFile(data_dir / f"{name}.parquet")
        schema = pa.schema([f.with_type(pa.string()) if pa.types.is_string_view(f.type) else f
                            for f in src.schema_arrow])
        tmp = out_dir / f"{name}.parquet.tmp"
        with pq.ParquetWriter(tmp, schema, compression="snappy") as writer:
            for i in range(src.num_row_groups):
                writer.write_table(src.read_row_group(i).cast(schema), row_group_size=1 << 30)
        tmp.rename(out_dir / f"{name}.parquet")


def answers_dir(sf: int) -> Path:
    """Where DuckDB's reference answers for a scale factor are cached."""
    return DATA_DIR / f"tpch-sf{sf}-answers"


def answer_path(sf: int, query: str, data_dir: Path) -> Path:
    """The cached reference answer of a query, named after a digest of its SQL text and of
    the tables' file sizes (so ``--data-dir`` with other data never meets these answers)."""
    sizes = sorted((t, (data_dir / f"{t}.parquet").stat().st_size) for t in TABLES
                   if (data_dir / f"{t}.parquet").exists())
    digest = hashlib.sha256((sql_text(query) + repr(sizes)).encode()).hexdigest()[:10]
    return answers_dir(sf) / f"{query}-{digest}.parquet"


def ensure_answers(sf: int, data_dir: Path, queries: list[str], threads: int) -> None:
    """Compute and cache DuckDB's answers to the official texts, for those not cached."""
    todo = [q for q in queries if not answer_path(sf, q, data_dir).exists()]
    if not todo:
        return
    import pyarrow.parquet as pq

    print(f"reference answers (DuckDB, official texts): {', '.join(todo)} ...", flush=True)
    answers_dir(sf).mkdir(parents=True, exist_ok=True)
    engine = DuckDBEngine(data_dir, threads, None)
    try:
        for q in todo:
            pq.write_table(engine.run(q), answer_path(sf, q, data_dir))
    finally:
        engine.close()


def make_check(sf: int, data_dir: Path) -> Callable[[str, Any], list[str]]:
    """The check of an answer against the cached reference."""
    import pyarrow.parquet as pq

    def check(query: str, table: Any) -> list[str]:
        return compare_answers(pq.read_table(answer_path(sf, query, data_dir)), table,
                               ORDER_BY[query])

    return check
