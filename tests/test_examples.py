"""The examples run and give the same answers as plain Python."""

from __future__ import annotations

import collections
import importlib.util
import os
import subprocess
import sys

import pytest

import millstream as ms

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
SRC = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "src"))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_wordcount_matches_python(tmp_path):
    wc = _load("wordcount")
    path = wc.make_sample(str(tmp_path), lines=20_000)
    got = {r["word"]: r["count"] for r in wc.word_counts(path).collect()}
    with open(path, encoding="utf-8") as f:
        want = collections.Counter(w for line in f for w in line.lower().split())
    assert got == dict(want)
    rows = wc.word_counts(path).take(3)
    assert [r["count"] for r in rows] == sorted(want.values(), reverse=True)[:3]


def test_wordcount_script_runs(tmp_path):
    out = tmp_path / "counts"
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, "wordcount.py"), "-o", str(out),
                           "--parallelism", "2"], capture_output=True, text=True, timeout=240,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": SRC})
    assert proc.returncode == 0, proc.stderr
    assert (out / "_SUCCESS").exists()
    assert "count" in proc.stdout
    # the sample corpus stays for the README's other examples
    assert (tmp_path / "data" / "books" / "sample.txt").exists()
    assert "lines read in" in proc.stdout


def test_pagerank_matches_python():
    pr = _load("pagerank")
    edges = pr.random_graph(pages=300, edges=3000)
    ds = ms.from_items([{"src": s, "dst": d} for s, d in edges], num_partitions=3)
    got = {r["page"]: r["rank"] for r in pr.pagerank(ds, iterations=5).collect()}
    want = pr.pagerank_python(edges, iterations=5)
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-9)


def test_iot_streaming_example_matches_batch(tmp_path):
    iot = _load("iot_telemetry")
    n = iot.DEVICES * 20 * 150  # 2.5 minutes of event time
    stream = ms.from_generator(iot.reading, count=n, partitions=2)
    job = iot.averages(stream).start(checkpoint=str(tmp_path / "chk"), checkpoint_interval="1s",
                                     sink=str(tmp_path / "out"))
    assert job.await_termination(120)
    streamed = ms.read_parquet(str(tmp_path / "out")).collect()
    batch = iot.averages(ms.from_items([iot.reading(i) for i in range(n)], num_partitions=3)).collect()

    def canon(rows):
        return sorted((r["device"], str(r["window_start"]), round(r["avg_temp"], 9), r["readings"])
                      for r in rows)

    assert canon(streamed) == canon(batch)
    assert sum(r["readings"] for r in streamed) == n
    assert any(r["max_temp"] > 45 for r in streamed if r["device"] == "dev-07")
    m = job.metrics()  # the job in a line, as the example prints it
    assert job.summary().startswith(f"{n:,} records in, {m['records_out']:,} rows out; "
                                    f"{m['checkpoints']} checkpoint")
    assert job.summary().endswith(f"; {m['late_records']:,} late records; "
                                  f"{m['restarts']} restarts")


@pytest.mark.parametrize("script, args, expect", [
    ("iot_telemetry.py", ["--readings", "24000"], "records in"),
    ("pageviews.py", ["--clicks", "10000"], "late clicks"),
    ("fraud_detection.py", ["--transactions", "5000"], "USD"),
    ("mapreduce_wordcount.py", [], "lines"),
])
def test_example_scripts_print_readable_output(tmp_path, script, args, expect):
    """Each example runs as a script and prints tables and sentences, not raw dicts."""
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, script), *args],
                          capture_output=True, text=True, timeout=240, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": SRC})
    assert proc.returncode == 0, proc.stderr
    assert expect in proc.stdout
    assert "{'" not in proc.stdout and '{"' not in proc.stdout, proc.stdout
