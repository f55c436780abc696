"""Start-up: what ``import millstream`` and a tiny job load, and that deferring them changes
nothing a user sees (each case in a fresh interpreter)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")


def run_python(code: str, **env: str) -> str:
    """Run ``code`` in a fresh interpreter with this checkout's package; its stdout."""
    full_env = {**os.environ, "PYTHONPATH": SRC, **env}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_import_loads_no_heavy_optional_modules():
    out = run_python("""
        import sys
        import millstream
        heavy = ["sqlglot", "pandas", "pyarrow.dataset", "pyarrow.acero", "aiohttp", "ray",
                 "confluent_kafka", "psycopg", "polars", "millstream.sql",
                 "millstream.api.mapreduce"]
        print([m for m in heavy if m in sys.modules])
    """)
    assert out.strip() == "[]"


def test_tiny_count_runs_in_the_driver_without_pandas_or_workers():
    out = run_python("""
        import sys
        import multiprocessing as mp
        import millstream as ms
        print(ms.range(10).count())
        from millstream.runtime.session import get_session
        workers = [len(getattr(r, "workers", [])) for _, r in get_session().runners.values()]
        print(sum(workers), len(mp.active_children()))
        print([m for m in ("pandas", "sqlglot", "pyarrow.acero") if m in sys.modules])
    """)
    assert out.split("\n")[:3] == ["10", "0 0", "[]"]


def test_pandas_support_returns_when_pandas_is_imported():
    out = run_python("""
        import millstream as ms
        assert ms.range(10).count() == 10
        import pandas as pd
        import pyarrow as pa
        print(pa.table(pd.DataFrame({"a": [1, 2]})).num_rows)
        print(type(pa.scalar(5, pa.timestamp("ns")).as_py()).__name__)
        print(ms.from_pandas(pd.DataFrame({"a": [1, 2, 3]})).count())
    """)
    assert out.split() == ["2", "Timestamp", "3"]


def test_nanosecond_timestamps_collect_as_with_pandas():
    # pyarrow gives pandas Timestamps for ns values when it has pandas: collect() must
    # too, even in a small job that never imported pandas
    out = run_python("""
        import pyarrow as pa
        import millstream as ms
        t = pa.table({"ts": pa.array([1_000_000_001], pa.timestamp("ns"))})
        print(type(ms.from_arrow(t).collect()[0]["ts"]).__name__)
    """)
    assert out.strip() == "Timestamp"


def test_user_functions_may_import_pandas_in_a_small_job():
    out = run_python("""
        import millstream as ms
        def f(batch):
            import pandas as pd
            return pd.DataFrame({"n": [len(batch)]})
        print(ms.range(5).map_batches(f).collect())
        print(ms.range(3).map_batches(lambda df: df, batch_format="pandas").count())
    """)
    assert out.split("\n")[:2] == ["[{'n': 5}]", "3"]


def test_lazy_names_stay_the_public_functions():
    out = run_python("""
        import millstream as ms
        import millstream.sql.catalog  # binds the subpackage on the parent module
        print(callable(ms.sql), ms.sql("SELECT 1 AS x").collect())
        from millstream import MapReduceJob, register
        print(MapReduceJob.__name__, register.__name__, "sql" in dir(ms))
    """)
    assert out.split("\n")[:2] == ["True [{'x': 1}]", "MapReduceJob register True"]


def test_job_on_workers_imports_no_pandas_in_the_driver(tmp_path):
    # the workers have pandas; the driver needs it only for what the job yields
    (tmp_path / "words.txt").write_text("a b\nb c c\n" * 500)
    out = run_python(f"""
        import sys
        import millstream as ms
        ms.init(parallelism=2, driver_input_limit=0)
        ds = ms.range(1000, num_partitions=4).with_columns((ms.col("id") % 7).alias("k"))
        print(sorted(ds.group_by("k").agg(ms.count().alias("n")).collect(),
                     key=lambda r: r["k"])[0])
        words = (ms.read_text({str(tmp_path / "words.txt")!r}, split_size=1000)
                 .select(ms.col("text").str.split().alias("w")).explode("w")
                 .group_by("w").agg(ms.count().alias("n")))
        print(sorted((r["w"], r["n"]) for r in words.collect()))
        print("pandas" in sys.modules)
        ms.shutdown()
    """)
    assert out.split("\n")[:3] == ["{'k': 0, 'n': 143}",
                                   "[('a', 500), ('b', 1000), ('c', 1000)]", "False"]


def test_nanosecond_timestamps_collect_as_with_pandas_from_workers():
    out = run_python("""
        import pyarrow as pa
        import millstream as ms
        ms.init(parallelism=2, driver_input_limit=0)
        t = pa.table({"ts": pa.array([1_000_000_001, 2], pa.timestamp("ns"))})
        print(type(ms.from_arrow(t).repartition(2).collect()[0]["ts"]).__name__)
        ms.shutdown()
    """)
    assert out.strip() == "Timestamp"
