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
def test_pageviews_per_minute_match_oracle_and_batch(tmp_path, partitions: int, batch: int,
                                                     executor: str) -> None:
    """Every click is counted in its window or reported late, never both, never lost; the
    late ones are among the very late. Inline, partitions are read round by round, so which
    clicks are late is fixed: exactly the very late ones, and the windows are the oracle's.
    On the parallel executor each partition's watermark reaches the windows at its own pace,
    so a very late click may still be on time (Flink behaves alike)."""
    n = 30_000
    job = pageviews.run(n, str(tmp_path / "views"), str(tmp_path / "chk"),
                        partitions=partitions, max_batch_records=batch, timeout=60,
                        executor=executor)
    got = pageviews.as_counts(ms.read_parquet(str(tmp_path / "views")).collect())
    late = job.late_records()
    very_late = [i for i in range(n) if pageviews.is_very_late(i)]
    assert very_late and sum(got.values()) + len(late) == n
    assert len(late) <= len(very_late)
    low, high = pageviews.oracle(n), pageviews.oracle(n, drop_late=False)
    assert set(got) == set(high)
    assert all(low.get(k, 0) <= v <= high[k] for k, v in got.items())
    if executor == "inline":
        assert got == low and len(late) == len(very_late)
    # batch mode has no watermark, so nothing is late there: the oracle with every click
    batch_counts = pageviews.as_counts(
        pageviews.views_per_minute(pageviews.clicks(n, partitions)).collect())
    assert batch_counts == high and sum(batch_counts.values()) == n
    top = pageviews.top_pages(got, 2)
    assert all(len(pages) == 2 and pages[0][1] >= pages[1][1] for pages in top.values())


def test_pageviews_without_late_clicks_same_in_batch_and_streaming(tmp_path, executor) -> None:
    """With a delay beyond every lateness, streaming and batch give the same windows."""
    n = 25_000
    ds = pageviews.views_per_minute(pageviews.clicks(n, 2), delay="15m")
    job = ds.start(checkpoint=str(tmp_path / "chk"), checkpoint_interval=0,
                   max_batch_records=2_000, executor=executor)
    assert job.await_termination(30)
    assert job.late_records() == []
    assert pageviews.as_counts(job.sink.rows()) == pageviews.as_counts(ds.collect()) \
        == pageviews.oracle(n, drop_late=False)


def test_fraud_sliding_window_alerts_match_oracle_and_batch(tmp_path, executor) -> None:
    """Per-card 10-minute totals over the threshold: streaming = batch = oracle."""
    n = 12_000
    fraud.run_windows(n, str(tmp_path / "alerts"), str(tmp_path / "chk"),
                      max_batch_records=800, timeout=30, executor=executor)
    got = fraud.as_alerts(ms.read_parquet(str(tmp_path / "alerts")).collect())
    expected = fraud.spending_oracle(n)
    assert expected and got == expected
    assert fraud.as_alerts(fraud.spending_alerts(fraud.transactions(n, 2)).collect()) == expected


def test_fraud_process_function_alerts_match_oracle_and_batch(tmp_path, executor) -> None:
    """Burst and small-then-large alerts of the keyed process function: all modes agree."""
    n = 12_000
    job = fraud.run_patterns(n, str(tmp_path / "chk"), max_batch_records=600, timeout=30,
                             executor=executor)
    got = fraud.as_tuples(job.sink.rows())
    expected = fraud.pattern_oracle(n)
    assert {a[2] for a in expected} == {"burst", "small_then_large"}
    assert got == expected
    assert fraud.as_tuples(fraud.pattern_alerts(fraud.transactions(n)).collect()) == expected
    # a lower burst limit gives more alerts, the same way in every mode
    job3 = fraud.run_patterns(n, str(tmp_path / "chk3"), burst_n=3, timeout=30,
                              executor=executor)
    assert fraud.as_tuples(job3.sink.rows()) == fraud.pattern_oracle(n, 3)
    assert len(fraud.pattern_oracle(n, 3)) > len(expected)


def test_fraud_process_function_survives_a_crash(tmp_path, feed) -> None:
    """State and timers of the detector are checkpointed: a crash changes no alert. The
    transactions come from a test source, 500 an item (paced by checkpoints on the parallel
    executor, so that the fault at epoch 4 comes while they are being read)."""
    from millstream.testing import CollectingSink

    n = 6_000
    rows = [fraud.transaction(i) for i in range(n)]
    f, sink = feed(), CollectingSink()
    stream = f.source([rows[i:i + 500] for i in range(0, n, 500)]).dataset()
    job = f.crash_and_restore(fraud.pattern_alerts(stream), checkpoint=str(tmp_path),
                              sink=sink, crash_epoch=4, point="after_checkpoint",
                              checkpoint_interval=0, timeout=30)
    assert job.metrics()["restored_from_epoch"] is not None
    assert fraud.as_tuples(sink.rows()) == fraud.pattern_oracle(n)
