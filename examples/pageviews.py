"""Real-time page analytics: page views per minute per page from a click stream.

    python examples/pageviews.py                 # 120,000 clicks, about 20 minutes of event time
    python examples/pageviews.py --clicks 30000 --top 5

The click stream is generated (``ms.from_generator``) with out-of-order events (up to
20 s behind) and a few very late ones (10 minutes behind); the watermark waits 30 s, so
only the very late clicks miss their window (they end up in ``job.late_records()``).
Counts go to Parquet files committed exactly once per checkpoint; the example then prints
the most viewed pages of every minute.
"""

from __future__ import annotations

import argparse
import datetime as dt
import tempfile
from collections import defaultdict
from typing import Any

import millstream as ms

START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
STEP_MS = 10  # one click per 10 ms of event time
MAX_DISORDER_MS = 20_000  # ordinary clicks arrive up to 20 s late
VERY_LATE_MS = 10 * 60_000  # every 997th click (after a start-up) is 10 minutes behind
WATERMARK_DELAY = "30s"
PAGES = ["/", "/pricing", "/docs", "/blog", "/signup", "/login", "/about", "/careers",
         "/docs/streaming", "/docs/batch", "/blog/launch", "/contact"]
USERS = 5_000


def _mix(i: int, salt: int) -> int:
    """A cheap deterministic hash of (i, salt) in [0, 2**32)."""
    x = (i * 2_654_435_761 + salt * 40_503 + 12_345) & 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x45D9F3B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def is_very_late(i: int) -> bool:
    """Whether click ``i`` is one of the very late ones (10 minutes behind)."""
    return i >= 20_000 and i % 997 == 500


def click(i: int) -> dict[str, Any]:
    """The i-th click: skewed page popularity, event time with bounded disorder."""
    r = _mix(i, 1)
    page = PAGES[min(len(PAGES) - 1, int((r % 10_000) ** 2 / 10_000 ** 2 * len(PAGES)))]
    ts = START_MS + i * STEP_MS - _mix(i, 2) % MAX_DISORDER_MS
    if is_very_late(i):
        ts -= VERY_LATE_MS
    return {"page": page, "user": f"u{_mix(i, 3) % USERS}", "ts": max(START_MS, ts)}


def clicks(n: int, partitions: int = 1) -> ms.Dataset:
    """``n`` generated clicks as a (bounded) stream."""
    return ms.from_generator(click, count=n, partitions=partitions)


def views_per_minute(stream: ms.Dataset, delay: str = WATERMARK_DELAY) -> ms.Dataset:
    """Views per page and one-minute tumbling window (event time ``ts``)."""
    return (stream.with_watermark("ts", delay=delay)
            .group_by("page").window(ms.tumbling("1m"), on="ts")
            .agg(ms.count().alias("views")))


def oracle(n: int, drop_late: bool = True) -> dict[tuple[str, int], int]:
    """Plain Python: views per (page, window start in epoch ms), without the very late clicks."""
    out: dict[tuple[str, int], int] = defaultdict(int)
    for i in range(n):
        if drop_late and is_very_late(i):
            continue
        c = click(i)
        out[(c["page"], c["ts"] // 60_000 * 60_000)] += 1
    return dict(out)


def as_counts(rows: list[dict[str, Any]]) -> dict[tuple[str, int], int]:
    """Result rows as {(page, window start in epoch ms): views}."""
    epoch = dt.datetime(1970, 1, 1)
    return {(r["page"], (r["window_start"] - epoch) // dt.timedelta(milliseconds=1)): r["views"]
            for r in rows}


def top_pages(counts: dict[tuple[str, int], int], k: int = 3) -> dict[int, list[tuple[str, int]]]:
    """The ``k`` most viewed pages of every minute (ties by page name)."""
    per_minute: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for (page, start), views in counts.items():
        per_minute[start].append((page, views))
    return {start: sorted(pages, key=lambda pv: (-pv[1], pv[0]))[:k]
            for start, pages in sorted(per_minute.items())}


def run(n: int, out_dir: str, checkpoint: str, partitions: int = 2,
        max_batch_records: int = 10_000, timeout: float = 120.0,
        executor: str | None = None) -> Any:
    """Run the streaming job to Parquet files in ``out_dir``; return the finished job."""
    job = views_per_minute(clicks(n, partitions)).start(
        checkpoint=checkpoint, checkpoint_interval="1s", sink=out_dir,
        max_batch_records=max_batch_records, executor=executor)
    if not job.await_termination(timeout):
        job.stop()
        raise TimeoutError(f"the page view job did not end within {timeout}s")
    return job


def main() -> None:
    """Run the job on a generated stream and print the top pages per minute."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clicks", type=int, default=120_000, help="total clicks")
    ap.add_argument("--top", type=int, default=3, help="pages to show per minute")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        job = run(args.clicks, f"{tmp}/views", f"{tmp}/checkpoints")
        counts = as_counts(ms.read_parquet(f"{tmp}/views").collect())
        for start, pages in top_pages(counts, args.top).items():
            minute = dt.datetime.fromtimestamp(start / 1000, dt.timezone.utc).strftime("%H:%M")
            print(minute, "  ".join(f"{p} {v}" for p, v in pages))
        print(f"late clicks (dropped from their windows): {len(job.late_records())}")
        print(job.summary())


if __name__ == "__main__":
    main()
