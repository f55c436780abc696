"""The dashboard in a real headless browser: Chromium from the system packages, driven by
Playwright (pointed at /usr/bin/chromium, no browser download). A batch job's page shows
its stages and tasks with the right counts, a streaming job's page a watermark and a
completed checkpoint, and the history server (``millstream ui --history``) a finished
job from its event log.

Set ``MILLSTREAM_SCREENSHOTS=DIR`` to keep screenshots of the pages (PNG) in DIR.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

import millstream as ms

pytest.importorskip("aiohttp", reason="the dashboard's server library (millstream[ui])")

CHROMIUM = os.environ.get("MILLSTREAM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SHOTS = os.environ.get("MILLSTREAM_SCREENSHOTS")
#: how long a page may take to reach a state (the machine may be busy)
WAIT_MS = 90_000

pytestmark = pytest.mark.browser
expect = None  # playwright's expect, set by the browser fixture


@pytest.fixture(scope="module")
def browser():
    """A fresh headless Chromium (its own user-data directory) for the module."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium; .ci/run does)")
    playwright_api = pytest.importorskip("playwright.sync_api",
                                         reason="playwright (the test extra) is not installed")
    global expect
    expect = playwright_api.expect
    profile = tempfile.mkdtemp(prefix="millstream-chromium-")
    with playwright_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000})
        try:
            yield context
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    return tmp_path_factory.mktemp("event-logs")


@pytest.fixture(scope="module")
def dashboard(logs):
    ms.init(parallelism=2, progress=False, ui=True, event_log_dir=str(logs))
    yield ms.ui_url()
    ms.init(parallelism=2, progress=False)


@pytest.fixture
def page(browser):
    page = browser.new_page()
    page.set_default_timeout(WAIT_MS)
    yield page
    page.close()


def shot(page, name: str) -> None:
    if SHOTS:
        os.makedirs(SHOTS, exist_ok=True)
        page.screenshot(path=os.path.join(SHOTS, name), full_page=True)


def test_a_batch_job_page_shows_its_stages_and_tasks(dashboard, page, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for i in range(4):
        pq.write_table(pa.table({"id": list(range(i * 5000, (i + 1) * 5000)),
                                 "x": [j % 100 for j in range(5000)]}),
                       tmp_path / f"part-{i}.parquet")
    rows = (ms.read_parquet(str(tmp_path)).filter(ms.col("x") >= 10)
            .group_by((ms.col("id") % 10).alias("k")).agg(ms.count().alias("n"))
            .collect(driver_input_limit=0, shuffle_partitions=3))
    assert len(rows) == 10 and sum(r["n"] for r in rows) == 18_000
    stats = ms.last_job_stats()
    job = stats.job_id
    counts = [s["tasks"] for s in stats.stages]
    assert len(counts) == 2 and counts[1] == 3

    page.goto(dashboard)
    page.wait_for_selector(f"tr.job-row[data-job='{job}'][data-status='succeeded']")
    assert "collect at test_dashboard_browser.py" in page.inner_text(f"tr[data-job='{job}']")
    shot(page, "jobs.png")

    # follow the row's link by its address, not by a click: a job event from elsewhere in
    # this process (a streaming job another test left running) redraws the list newest
    # first, and a click aimed before the redraw lands on whatever row moved under it
    href = page.get_attribute(f"tr[data-job='{job}'] a", "href")
    assert href == f"/jobs/{job}"
    page.goto(dashboard.rstrip("/") + href)
    page.wait_for_selector("#stage-graph g.node")
    assert page.inner_text("#job-status") == "succeeded"
    total = sum(counts)
    assert page.inner_text("#stage-count") == "2"
    assert page.inner_text("#task-count") == f"{total}/{total}"
    stage_ids = [s["stage"] for s in stats.stages]
    for sid, n in zip(stage_ids, counts):
        section = page.locator(f".stage[data-stage='{sid}']")
        assert section.get_attribute("data-total") == str(n)
        assert section.get_attribute("data-done") == str(n)
        assert f"{n}/{n} tasks done" in section.inner_text()
        assert section.locator("tr.attempt[data-status='succeeded']").count() == n
        assert section.locator("svg.timeline-svg rect.task-bar").count() == n
        workers = section.locator("tr.attempt td:nth-child(3)").all_inner_texts()
        assert all(w.startswith("pid ") for w in workers)
    graph = page.text_content("#stage-graph")
    assert f"Stage {stage_ids[0]}" in graph and f"Stage {stage_ids[1]}" in graph
    assert page.locator("#stage-graph path[marker-end]").count() == 1  # stage 1 -> stage 2
    plan = page.inner_text("#plan")
    assert "filter=(x >= 10)" in page.inner_text("#plan li.scan")  # pushed into the scan
    rules = page.locator("#plan .chip.rule").all_inner_texts()
    assert "filter_into_scan" in rules and "projection_into_scan" in rules, plan
    shot(page, "batch-job.png")


def test_a_streaming_job_page_shows_watermark_and_checkpoints(dashboard, page, tmp_path):
    ds = (ms.from_generator(lambda i: {"k": i % 4, "ts": i * 50, "v": 1}, rate=400,
                            partitions=1)
          .with_watermark("ts", "1s").group_by("k").window(ms.tumbling("5s"))
          .agg(ms.sum("v").alias("s")))
    job = ds.start(checkpoint=str(tmp_path / "chk"), checkpoint_interval="200ms",
                   parallelism=1)
    try:
        page.goto(dashboard + f"jobs/{job.job_id}")
        page.wait_for_selector("#job-page[data-kind='stream']")
        # live updates: the page fills in as the job runs, without reloading
        page.wait_for_selector("tr.checkpoint[data-status='completed']")
        # (the page's content security policy forbids eval: wait with locators)
        expect(page.locator("#stream-watermark")).to_have_text(
            re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"), timeout=WAIT_MS)
        expect(page.locator("#chart-throughput path")).to_have_count(2, timeout=WAIT_MS)
        assert page.inner_text("#job-status") == "running"
        assert page.locator("#operator-graph g.node").count() == 2  # source stage, window stage
        text = page.text_content("#operator-graph")
        assert "source: " in text and "WindowAggregate" in text and "watermark" in text
        assert page.locator("tr.operator").count() >= 2
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", page.inner_text("#stream-watermark"))
        assert int(page.inner_text("#checkpoint-count")) >= 1
        assert page.locator("#offsets tbody tr").count() == 1
        shot(page, "streaming-job.png")
    finally:
        job.stop()
    page.wait_for_selector("#job-page[data-status='finished']")
    assert job.metrics()["checkpoints"] >= 1


def test_the_history_server_shows_a_finished_job(dashboard, logs, page):
    assert ms.range(3000, num_partitions=3).map(lambda r: {"x": r["id"] * 2}) \
        .count(driver_input_limit=0) == 3000
    job = ms.last_job_stats().job_id
    log = logs / f"{job}.jsonl"
    deadline = time.monotonic() + 60
    while not (log.exists() and '"type":"job_end"' in log.read_text()):
        assert time.monotonic() < deadline, "the event log was not written"
        time.sleep(0.05)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "millstream", "ui", "--history", str(logs),
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        line = proc.stdout.readline()
        match = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
        assert match, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = match.group(1)
        page.goto(url)
        page.wait_for_selector(f"tr.job-row[data-job='{job}'][data-status='succeeded']")
        assert page.inner_text("#mode").startswith("history")
        page.goto(url + f"jobs/{job}")
        page.wait_for_selector("#stage-graph g.node")
        assert page.inner_text("#job-status") == "succeeded"
        stats_tasks = [s["tasks"] for s in ms.last_job_stats().stages]
        assert page.inner_text("#task-count") == f"{sum(stats_tasks)}/{sum(stats_tasks)}"
        shot(page, "history-job.png")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0
