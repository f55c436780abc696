"""The event stream, live progress, the event log and history, /metrics and the dashboard
server's security (the pages themselves are driven in a browser in
``test_dashboard_browser.py``)."""

from __future__ import annotations

import json
import os
import sys
import time
import types
import urllib.error
import urllib.request

import pytest

import millstream as ms
from millstream.runtime.events import BUS

pytest.importorskip("aiohttp", reason="the dashboard's server library (millstream[ui])")


def wait_until(condition, timeout: float = 60.0, what: str = "a state"):
    """Poll ``condition`` until it holds (tests wait for states, not for times)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def get(url: str, headers: dict | None = None) -> tuple[int, bytes, dict]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


class Collect:
    """A bus subscriber that keeps every event."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def __call__(self, ev: dict) -> None:
        self.events.append(dict(ev))

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["type"] == kind]


@pytest.fixture
def collect():
    c = Collect()
    BUS.subscribe(c)
    yield c
    BUS.unsubscribe(c)


@pytest.fixture
def session_restore():
    yield
    ms.init(parallelism=2, progress=False)


def _slow_batches(batch):
    time.sleep(0.08)
    return batch


def _slow_job(rows: int = 24_000, parts: int = 2):
    return (ms.range(rows, num_partitions=parts).map_batches(_slow_batches)
            .with_columns((ms.col("id") % 5).alias("k")))


# ----------------------------------------------------------------------------- the bus


def test_nobody_listening_publishes_nothing_and_workers_report_nothing(monkeypatch):
    assert not BUS.active
    published = []
    monkeypatch.setattr(BUS, "publish", lambda ev: published.append(ev))
    from millstream.runtime import scheduler

    made = []
    real = scheduler.Job._pipeline_tasks

    def spy(self, *args, **kwargs):
        tasks = real(self, *args, **kwargs)
        made.extend(tasks)
        return tasks

    monkeypatch.setattr(scheduler.Job, "_pipeline_tasks", spy)
    assert ms.range(1000, num_partitions=2).count(driver_input_limit=0) == 1000
    assert published == [] and made and all(t.progress_every_s == 0 for t in made)


def test_a_failing_subscriber_never_fails_the_job(collect):
    def broken(ev):
        raise RuntimeError("observer bug")

    BUS.subscribe(broken)
    try:
        assert ms.range(100).count() == 100
    finally:
        BUS.unsubscribe(broken)
    assert collect.of("job_end")[-1]["status"] == "succeeded"


def test_workers_report_rows_read_while_their_tasks_run(collect):
    rows = _slow_job().collect(driver_input_limit=0, batch_size=1000)
    assert len(rows) == 24_000
    start = collect.of("job_start")[-1]
    job = start["job"]
    assert start["name"].startswith("collect at test_dashboard.py:")
    ends = {(e["stage"], e["task"]): e for e in collect.of("task_end") if e["job"] == job}
    early = [e for e in collect.of("task_progress") if e["job"] == job
             and 0 < e["rows_read"] < 12_000 and e["ts"] < ends[(e["stage"], e["task"])]["ts"]]
    assert early, "no progress report arrived while a task was running"
    # the stage's counts move before its first task finishes (rows read, not output)
    assert any(e["done"] == 0 and e["rows_read"] > 0 for e in collect.of("stage_progress")
               if e["job"] == job)
    for e in ends.values():
        assert e["status"] == "succeeded" and e["worker"].startswith("pid ")
        assert e["rows_in"] == 12_000 and e["bytes_in"] > 0 and e["seconds"] > 0
    end = collect.of("job_end")[-1]
    assert end["job"] == job and end["status"] == "succeeded" and end["rows_in"] == 24_000


def test_a_failed_job_reports_the_users_error(collect):
    def bad(row):
        raise ValueError("no good row")

    with pytest.raises(ms.UserFunctionError):
        ms.range(10).map(bad).collect()
    end = collect.of("job_end")[-1]
    assert end["status"] == "failed" and "no good row" in end["error"]
    assert "bad" in end.get("user_traceback", "")
    failed = [e for e in collect.of("task_end") if e["status"] == "failed"]
    assert failed and all("no good row" in e["error"] for e in failed)


# ----------------------------------------------------------------------------- progress


def test_terminal_progress_shows_rows_read_rate_and_eta(capsys):
    _slow_job().collect(driver_input_limit=0, batch_size=1000, progress=True)
    err = capsys.readouterr().err
    assert "rows/s" in err and "ETA" in err and " read " in err
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if "0/2 tasks" in ln]
    assert any(" 0 rows" not in ln for ln in lines), "rows read never moved before a task ended"
    assert not BUS.active  # the display unsubscribed when the job ended


def test_no_progress_when_not_interactive(capsys):
    ms.range(100, num_partitions=2).count(progress=None)
    assert "tasks" not in capsys.readouterr().err


class _FakeHandle:
    def __init__(self, shown):
        self.shown = shown

    def update(self, obj):
        self.shown.append(("update", obj.data))


def test_progress_in_jupyter_is_an_updating_html_display(monkeypatch, capsys):
    shown: list = []

    class HTML:
        def __init__(self, data):
            self.data = data

    def display(obj, display_id=False):
        shown.append(("display", obj.data))
        return _FakeHandle(shown)

    ipython = types.ModuleType("IPython")
    ipython.get_ipython = lambda: types.SimpleNamespace(kernel=object())
    ipython_display = types.ModuleType("IPython.display")
    ipython_display.HTML, ipython_display.display = HTML, display
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "IPython.display", ipython_display)
    _slow_job(8_000).collect(driver_input_limit=0, batch_size=1000, progress=None)
    assert [k for k, _ in shown].count("display") == 1  # one block per stage, updated
    assert any(k == "update" and "<progress" in html and "rows/s" in html for k, html in shown)
    assert "tasks" not in capsys.readouterr().err  # not on stderr as well


def test_streaming_jobs_get_a_status_line(capsys):
    ds = (ms.from_generator(lambda i: {"k": i % 3, "ts": i * 1000}, count=3000, partitions=1)
          .with_watermark("ts", "1s").group_by("k").window(ms.tumbling("1m"))
          .agg(ms.count().alias("n")))
    ms.init(parallelism=2, progress=True)
    try:
        job = ds.start(checkpoint_interval="50ms", executor="inline", max_batch_records=100)
        assert job.await_termination(60)
    finally:
        ms.init(parallelism=2, progress=False)
    err = capsys.readouterr().err
    assert f"stream {job.job_id}" in err
    assert "watermark" in err and "/s" in err and "checkpoint" in err and "restarts 0" in err


# ----------------------------------------------------------------------------- the log


def test_every_job_writes_an_event_log_that_replays(tmp_path, session_restore):
    from millstream.ui.history import HistoryLoader

    logs = tmp_path / "events"
    ms.init(parallelism=2, progress=False, event_log_dir=str(logs))
    n = ms.range(5000, num_partitions=3).group_by((ms.col("id") % 4).alias("k")) \
        .agg(ms.count().alias("n")).collect(driver_input_limit=0, shuffle_partitions=2)
    assert len(n) == 4
    batch = ms.last_job_stats().job_id
    ds = (ms.from_generator(lambda i: {"k": i % 3, "ts": i * 1000}, count=500, partitions=1)
          .with_watermark("ts", "1s").group_by("k").window(ms.tumbling("1m"))
          .agg(ms.count().alias("n")))
    stream = ds.start(checkpoint=str(tmp_path / "chk"), checkpoint_interval=0)
    assert stream.await_termination(60)
    for job, last in ((batch, "job_end"), (stream.job_id, "stream_end")):
        path = logs / f"{job}.jsonl"
        wait_until(lambda p=path, e=last: p.exists() and f'"type":"{e}"' in p.read_text(),
                   what=f"{last} in {path}")
    lines = [json.loads(x) for x in (logs / f"{batch}.jsonl").read_text().splitlines()]
    assert lines[0]["type"] == "job_start" and not any(e["type"] == "task_progress" for e in lines)
    state = HistoryLoader(str(logs)).state
    HistoryLoader(str(logs), state).refresh()
    detail = state.detail(batch)
    assert detail["status"] == "succeeded"
    assert [(s["total"], s["done"], len(s["attempts"])) for s in detail["stages"]] == \
        [(3, 3, 3), (2, 2, 2)]
    sd = state.detail(stream.job_id)
    assert sd["status"] == "finished" and sd["completed_checkpoints"] >= 1
    assert sd["metrics"]["records_in"] == 500 and sd["watermark"] is None  # ended: +inf


# ----------------------------------------------------------------------------- the server


@pytest.fixture
def dashboard(tmp_path, session_restore):
    ms.init(parallelism=2, progress=False, ui=True)
    yield ms.ui_url()


def test_metrics_parse_and_match_job_metrics(dashboard, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    rows = [{"k": f"k{i % 3}", "ts": 1_000 * i} for i in range(300)]
    ds = (ms.from_items(rows, num_partitions=2).with_watermark("ts", "0s")
          .group_by("k").window(ms.tumbling("10s"), on="ts").agg(ms.count().alias("n")))
    job = ds.start(checkpoint=str(tmp_path / "chk"), checkpoint_interval=0, executor="inline")
    assert job.await_termination(60)
    total = ms.range(1000, num_partitions=2).count()
    stats = ms.last_job_stats()
    status, body, headers = get(dashboard + "metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    jid = (("job", job.job_id),)
    m = job.metrics()
    for name in ("records_in", "records_out", "checkpoints", "restarts", "late_records"):
        assert samples[(f"millstream_stream_{name}_total", jid)] == m[name], name
    assert samples[("millstream_stream_epoch", jid)] == m["epoch"]
    assert samples[("millstream_stream_last_checkpoint_bytes", jid)] == m["last_checkpoint_bytes"]
    for op, v in m["operators"].items():
        key = tuple(sorted({"job": job.job_id, "operator": op}.items()))
        assert samples[("millstream_stream_operator_records_in_total", key)] == v["records_in"]
        assert samples[("millstream_stream_operator_records_out_total", key)] == v["records_out"]
        assert samples[("millstream_stream_operator_state_bytes", key)] == v["state_bytes"]
    bid = (("job", stats.job_id),)
    assert samples[("millstream_batch_job_rows_out_total", bid)] == 1  # the count's one row
    assert samples[("millstream_batch_job_rows_in_total", bid)] == total
    assert samples[("millstream_batch_job_tasks_total", bid)] == \
        sum(s["tasks"] for s in stats.stages)
    assert samples[("millstream_batch_jobs_total", (("status", "succeeded"),))] >= 1


def test_the_dashboard_listens_on_loopback_only_by_default(dashboard):
    import psutil

    port = int(dashboard.rsplit(":", 1)[1].strip("/"))
    listening = [c for c in psutil.Process().net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert [c.laddr.ip for c in listening] == ["127.0.0.1"]
    assert "token" not in dashboard
    assert get(dashboard + "api/jobs")[0] == 200


def test_bound_elsewhere_every_page_needs_the_token(session_restore):
    ms.init(parallelism=2, progress=False, ui=True, ui_host="127.0.0.2")
    url = ms.ui_url()
    assert url.startswith("http://127.0.0.2:") and "?token=" in url
    base, token = url.split("?token=")
    assert ms.range(10).count() == 10
    job = ms.last_job_stats().job_id
    paths = ["", f"jobs/{job}", "api/jobs", f"api/jobs/{job}", "api/info", "api/events",
             "metrics", "assets/app.js", "assets/index.html", "nope"]
    for path in paths:
        assert get(base + path)[0] == 401, path
        assert get(base + path + "?token=wrong")[0] == 401, path
        assert get(base + path, {"Authorization": "Bearer wrong"})[0] == 401, path
    for path in ["", f"jobs/{job}", "api/jobs", "metrics", "assets/app.js"]:
        status, _, headers = get(f"{base}{path}?token={token}")
        assert status == 200, path
    status, _, headers = get(f"{base}?token={token}")
    cookie = headers["Set-Cookie"].split(";")[0]
    assert "HttpOnly" in headers["Set-Cookie"] and "SameSite=Strict" in headers["Set-Cookie"]
    assert get(base + "api/jobs", {"Cookie": cookie})[0] == 200
    assert get(base + "metrics", {"Authorization": f"Bearer {token}"})[0] == 200
    req = urllib.request.Request(f"{base}api/jobs?token={token}", method="POST", data=b"")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code in (401, 403, 405)


def test_only_files_of_the_assets_directory_are_served(dashboard):
    assert get(dashboard + "assets/app.js")[0] == 200
    for path in ["assets/..%2F__init__.py", "assets/..%2Fserver.py", "assets/%2Fetc%2Fpasswd",
                 "assets/../__init__.py", "assets/.%2E/state.py", "assets/nope.js"]:
        status, body, _ = get(dashboard + path)
        assert status == 404 and b"import" not in body, path


def test_ui_without_the_server_library_is_a_clear_error(monkeypatch, session_restore):
    monkeypatch.setitem(sys.modules, "aiohttp", None)
    with pytest.raises(ImportError, match=r"millstream\[ui\]"):
        ms.init(parallelism=2, progress=False, ui=True)


def test_millstream_ui_env_starts_the_dashboard(monkeypatch, session_restore):
    monkeypatch.setenv("MILLSTREAM_UI", "1")
    ms.init(parallelism=2, progress=False)
    assert ms.ui_url() is not None and get(ms.ui_url() + "api/info")[0] == 200
    monkeypatch.delenv("MILLSTREAM_UI")
    ms.init(parallelism=2, progress=False)
    assert ms.ui_url() is None and not BUS.active


def test_the_core_imports_without_the_ui_extras():
    code = ("import sys; sys.modules['aiohttp'] = None; sys.modules['prometheus_client'] = None\n"
            "import millstream as ms\nassert ms.range(10).count() == 10\n"
            "assert 'aiohttp' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
            "print('ok')")
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
