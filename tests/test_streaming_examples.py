"""The streaming examples: each streaming result equals a plain-Python oracle and the
batch-mode (``collect()``) result of the same pipeline, on small generated inputs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import millstream as ms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import fraud_detection as fraud  # noqa: E402
import pageviews  # noqa: E402


@pytest.mark.parametrize("partitions,batch", [(1, 700), (2, 1_000)])
def test_pageviews_per_minute_match_oracle_and_batch(tmp_path, partitions: int,
                                                     batch: int) -> None:
    """Windows per page equal the oracle; exactly the very late clicks are dropped (inline
    executor: partitions are read round by round, so which clicks are late is fixed)."""
    n = 30_000
    job = pageviews.run(n, str(tmp_path / "views"), str(tmp_path / "chk"),
                        partitions=partitions, max_batch_records=batch, timeout=30,
                        executor="inline")
    got = pageviews.as_counts(ms.read_parquet(str(tmp_path / "views")).collect())
    expected = pageviews.oracle(n)
    assert got == expected
    late = [i for i in range(n) if pageviews.is_very_late(i)]
    assert late and len(job.late_records()) == len(late)
    # batch mode has no watermark, so nothing is late there: the oracle with every click
    batch_counts = pageviews.as_counts(
        pageviews.views_per_minute(pageviews.clicks(n, partitions)).collect())
    assert batch_counts == pageviews.oracle(n, drop_late=False)
    assert sum(batch_counts.values()) == n == sum(got.values()) + len(late)
    top = pageviews.top_pages(got, 2)
    assert all(len(pages) == 2 and pages[0][1] >= pages[1][1] for pages in top.values())


def test_pageviews_on_the_parallel_executor_count_every_click_once(tmp_path) -> None:
    """Parallel tasks: each source partition's watermark reaches the windows at its own pace,
    so a very late click may still be on time (Flink behaves alike); every click is counted
    in its window or reported late, never both, never lost."""
    n = 30_000
    job = pageviews.run(n, str(tmp_path / "views"), str(tmp_path / "chk"), partitions=2,
                        max_batch_records=1_000, timeout=60, executor="parallel")
    got = pageviews.as_counts(ms.read_parquet(str(tmp_path / "views")).collect())
    late = job.late_records()
    very_late = sum(pageviews.is_very_late(i) for i in range(n))
    assert sum(got.values()) + len(late) == n
    assert len(late) <= very_late
    low, high = pageviews.oracle(n), pageviews.oracle(n, drop_late=False)
    assert set(got) == set(high)
    assert all(low.get(k, 0) <= v <= high[k] for k, v in got.items())


def test_pageviews_without_late_clicks_same_in_batch_and_streaming(tmp_path) -> None:
    """With a delay beyond every lateness, streaming and batch give the same windows."""
    n = 25_000
    ds = pageviews.views_per_minute(pageviews.clicks(n, 2), delay="15m")
    job = ds.start(checkpoint=str(tmp_path / "chk"), checkpoint_interval=0,
                   max_batch_records=2_000)
    assert job.await_termination(30)
    assert job.late_records() == []
    assert pageviews.as_counts(job.sink.rows()) == pageviews.as_counts(ds.collect()) \
        == pageviews.oracle(n, drop_late=False)


def test_fraud_sliding_window_alerts_match_oracle_and_batch(tmp_path) -> None:
    """Per-card 10-minute totals over the threshold: streaming = batch = oracle."""
    n = 12_000
    fraud.run_windows(n, str(tmp_path / "alerts"), str(tmp_path / "chk"),
                      max_batch_records=800, timeout=30)
    got = fraud.as_alerts(ms.read_parquet(str(tmp_path / "alerts")).collect())
    expected = fraud.spending_oracle(n)
    assert expected and got == expected
    assert fraud.as_alerts(fraud.spending_alerts(fraud.transactions(n, 2)).collect()) == expected


def test_fraud_process_function_alerts_match_oracle_and_batch(tmp_path) -> None:
    """Burst and small-then-large alerts of the keyed process function: all modes agree."""
    n = 12_000
    job = fraud.run_patterns(n, str(tmp_path / "chk"), max_batch_records=600, timeout=30)
    got = fraud.as_tuples(job.sink.rows())
    expected = fraud.pattern_oracle(n)
    assert {a[2] for a in expected} == {"burst", "small_then_large"}
    assert got == expected
    assert fraud.as_tuples(fraud.pattern_alerts(fraud.transactions(n)).collect()) == expected
    # a lower burst limit gives more alerts, the same way in every mode
    job3 = fraud.run_patterns(n, str(tmp_path / "chk3"), burst_n=3, timeout=30)
    assert fraud.as_tuples(job3.sink.rows()) == fraud.pattern_oracle(n, 3)
    assert len(fraud.pattern_oracle(n, 3)) > len(expected)


def test_fraud_process_function_survives_a_crash(tmp_path) -> None:
    """State and timers of the detector are checkpointed: a crash changes no alert."""
    from millstream.testing import CollectingSink, crash_and_restore

    n = 6_000
    sink = CollectingSink()
    crash_and_restore(fraud.pattern_alerts(fraud.transactions(n)), checkpoint=str(tmp_path),
                      sink=sink, crash_epoch=4, point="after_checkpoint",
                      checkpoint_interval=0, max_batch_records=500, timeout=30)
    assert fraud.as_tuples(sink.rows()) == fraud.pattern_oracle(n)
