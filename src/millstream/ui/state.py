"""The dashboard's model of jobs, built from events (live from the bus, or replayed from
event logs by the history server), and the JSON views its pages read.

A batch job keeps its stage graph, each stage's counts and every task attempt (worker,
attempt, speculative copy, times, rows, bytes, spills, shuffle read/write); a streaming
job its operator graph, the latest metrics, per-operator and per-task rates and
backpressure derived from successive snapshots, a few minutes of throughput and lag
(the charts), checkpoint history and restarts.
"""

from __future__ import annotations

import datetime as dt
import statistics
import threading
import time
from collections import deque
from typing import Any

from millstream.core.time import MAX_WATERMARK, MIN_WATERMARK

#: jobs kept (the oldest finished ones go first)
MAX_JOBS = 500
#: checkpoints and restarts kept per streaming job
MAX_HISTORY = 200
#: seconds of throughput and lag kept for the charts
SERIES_SECONDS = 600


def _wm(value: Any) -> int | None:
    """A watermark in microseconds, None for "none yet" or "end of input"."""
    if value is None or not MIN_WATERMARK < int(value) < MAX_WATERMARK:
        return None
    return int(value)


def iso(micros: int | None) -> str | None:
    """An event time (µs since the epoch) as an ISO timestamp (UTC)."""
    if micros is None:
        return None
    return dt.datetime.fromtimestamp(micros / 1e6, dt.timezone.utc).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


class DashboardState:
    """Jobs by id, updated by events (a bus subscriber); thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.jobs: dict[str, dict[str, Any]] = {}
        #: bumped on every change (live pages poll it through server-sent events)
        self.version = 0

    # ------------------------------------------------------------------ events
    def __call__(self, ev: dict[str, Any]) -> None:
        handler = getattr(self, "_on_" + str(ev.get("type")), None)
        if handler is None:
            return
        with self.lock:
            handler(ev)
            self.version += 1

    def replay(self, events: list[dict[str, Any]]) -> None:
        """Apply events in order (the history server)."""
        for ev in events:
            self(ev)

    def _job(self, ev: dict[str, Any], kind: str) -> dict[str, Any]:
        job = self.jobs.get(ev["job"])
        if job is None:
            job = self.jobs[ev["job"]] = {
                "id": ev["job"], "kind": kind, "name": ev.get("name") or f"{kind} {ev['job']}",
                "status": "running", "start": ev["ts"], "end": None}
            if kind == "batch":
                job.update(stages={}, stage_order=[], plan={}, counters={})
            else:
                job.update(stages=[], tasks=[], metrics={}, task_metrics={}, series=deque(),
                           checkpoints=deque(maxlen=MAX_HISTORY),
                           restarts=deque(maxlen=MAX_HISTORY), prev=None, rates={})
            self._evict()
        return job

    def _evict(self) -> None:
        if len(self.jobs) <= MAX_JOBS:
            return
        for jid, job in list(self.jobs.items()):
            if job["status"] != "running":
                del self.jobs[jid]
                if len(self.jobs) <= MAX_JOBS:
                    return

    # batch
    def _on_job_start(self, ev: dict[str, Any]) -> None:
        job = self._job(ev, "batch")
        job.update(name=ev.get("name") or job["name"], start=ev["ts"], runner=ev.get("runner"),
                   parallelism=ev.get("parallelism"), in_driver=ev.get("in_driver"),
                   plan=ev.get("plan") or {})
        for info in ev.get("stages", []):
            stage = self._stage(job, info["id"])
            stage.update(info)
            stage.setdefault("status", "pending")

    def _stage(self, job: dict[str, Any], sid: int) -> dict[str, Any]:
        stage = job["stages"].get(sid)
        if stage is None:
            stage = job["stages"][sid] = {
                "id": sid, "purpose": "", "deps": [], "status": "pending", "total": 0,
                "done": 0, "running": 0, "rows_read": 0, "bytes_read": 0, "rows_out": 0,
                "bytes_out": 0, "retries": 0, "attempts": {}, "start": None, "end": None}
            job["stage_order"].append(sid)
        return stage

    def _on_stage_progress(self, ev: dict[str, Any]) -> None:
        stage = self._stage(self._job(ev, "batch"), ev["stage"])
        if stage["start"] is None:
            stage["start"] = ev["ts"]
        if stage["status"] == "pending":
            stage["status"] = "running"
        for k in ("total", "done", "running", "rows_read", "bytes_read", "rows_out",
                  "bytes_out", "retries"):
            stage[k] = ev.get(k, stage[k])

    def _on_stage_end(self, ev: dict[str, Any]) -> None:
        stage = self._stage(self._job(ev, "batch"), ev["stage"])
        stage["status"] = ev["status"]
        stage["end"] = ev["ts"]
        for k in ("rows_in", "rows_out", "bytes_in", "bytes_out", "seconds", "error", "why"):
            if k in ev:
                stage[k] = ev[k]

    def _attempt(self, ev: dict[str, Any]) -> dict[str, Any]:
        stage = self._stage(self._job(ev, "batch"), ev["stage"])
        key = f"{ev['task']}.{ev['attempt']}"
        att = stage["attempts"].get(key)
        if att is None:
            att = stage["attempts"][key] = {
                "task": ev["task"], "attempt": ev["attempt"], "status": "running",
                "worker": ev.get("worker", ""), "speculative": ev.get("speculative", False),
                "start": ev.get("start", ev["ts"]), "end": None, "rows_read": 0,
                "bytes_read": 0}
        return att

    def _on_task_start(self, ev: dict[str, Any]) -> None:
        self._attempt(ev)

    def _on_task_progress(self, ev: dict[str, Any]) -> None:
        att = self._attempt(ev)
        att["rows_read"], att["bytes_read"] = ev["rows_read"], ev["bytes_read"]

    def _on_task_end(self, ev: dict[str, Any]) -> None:
        att = self._attempt(ev)
        att.update({k: v for k, v in ev.items() if k not in ("type", "ts", "job", "stage")})
        if "rows_in" in ev:
            att["rows_read"], att["bytes_read"] = ev["rows_in"], ev.get("bytes_in", 0)

    def _on_job_end(self, ev: dict[str, Any]) -> None:
        job = self._job(ev, "batch")
        job.update({k: v for k, v in ev.items() if k not in ("type", "ts", "job")})
        job["end"] = ev["ts"]
        for stage in job["stages"].values():
            if stage["status"] == "running":
                stage["status"] = "failed" if ev["status"] == "failed" else "succeeded"
            for att in stage["attempts"].values():
                if att["status"] == "running":
                    att["status"] = "killed"
                    att["end"] = ev["ts"]

    # streaming
    def _on_stream_start(self, ev: dict[str, Any]) -> None:
        job = self._job(ev, "stream")
        job.update({k: ev[k] for k in ("name", "executor", "parallelism", "checkpoint",
                                       "interval_s", "stages", "tasks") if k in ev})
        job["start"] = ev["ts"]

    def _on_stream_metrics(self, ev: dict[str, Any]) -> None:
        job = self._job(ev, "stream")
        m = ev["metrics"]
        prev = job["prev"]
        tasks = {t["index"]: t for t in ev.get("tasks", [])}
        rates: dict[str, Any] = dict(job["rates"])
        if prev is not None and ev["ts"] > prev["ts"]:
            span = ev["ts"] - prev["ts"]
            pm = prev["metrics"]
            rates["in"] = max(0, m.get("records_in", 0) - pm.get("records_in", 0)) / span
            rates["out"] = max(0, m.get("records_out", 0) - pm.get("records_out", 0)) / span
            ops = {}
            for name, v in m.get("operators", {}).items():
                pv = pm.get("operators", {}).get(name, {})
                ops[name] = {
                    "in": max(0, v["records_in"] - pv.get("records_in", 0)) / span,
                    "out": max(0, v["records_out"] - pv.get("records_out", 0)) / span}
            rates["operators"] = ops
            blocked = {}
            for i, t in tasks.items():
                pt = prev["tasks"].get(i)
                if pt is not None:
                    blocked[i] = min(1.0, max(0.0, (t.get("blocked_s", 0.0)
                                                    - pt.get("blocked_s", 0.0)) / span))
            rates["blocked"] = blocked
            job["series"].append({"ts": ev["ts"], "in": rates["in"], "out": rates["out"],
                                  "lag": m.get("watermark_lag_s")})
            while job["series"] and job["series"][0]["ts"] < ev["ts"] - SERIES_SECONDS:
                job["series"].popleft()
        job["rates"] = rates
        job["prev"] = {"ts": ev["ts"], "metrics": m, "tasks": tasks}
        job["metrics"] = m
        job["task_metrics"] = tasks
        job["now"] = ev.get("now")
        job["updated"] = ev["ts"]

    def _on_checkpoint(self, ev: dict[str, Any]) -> None:
        job = self._job(ev, "stream")
        job["checkpoints"].append({k: v for k, v in ev.items() if k not in ("type", "job")})

    def _on_restart(self, ev: dict[str, Any]) -> None:
        job = self._job(ev, "stream")
        job["restarts"].append({"ts": ev["ts"], "restart": ev["restart"], "cause": ev["cause"]})

    def _on_stream_end(self, ev: dict[str, Any]) -> None:
        job = self._job(ev, "stream")
        job["status"] = ev["status"]
        job["end"] = ev["ts"]
        for k in ("error", "user_traceback"):
            if k in ev:
                job[k] = ev[k]

    # ------------------------------------------------------------------ views
    def summary(self) -> list[dict[str, Any]]:
        """Every job, newest first: what the jobs page lists."""
        with self.lock:
            out = [self._summary(j) for j in self.jobs.values()]
        return sorted(out, key=lambda j: j["start"] or 0, reverse=True)

    def _summary(self, job: dict[str, Any]) -> dict[str, Any]:
        end = job["end"] or time.time()
        s = {"id": job["id"], "kind": job["kind"], "name": job["name"],
             "status": job["status"], "start": job["start"], "end": job["end"],
             "seconds": end - job["start"], "error": job.get("error")}
        if job["kind"] == "batch":
            stages = job["stages"].values()
            s.update(rows_in=job.get("rows_in"), bytes_in=job.get("bytes_in"),
                     rows_out=job.get("rows_out"), bytes_out=job.get("bytes_out"),
                     stages=len(job["stages"]), tasks=sum(st["total"] for st in stages),
                     tasks_done=sum(st["done"] for st in stages))
            if job["status"] != "succeeded":  # what was read so far
                s["rows_in"] = sum(st["rows_read"] for st in stages
                                   if any(p["kind"] in ("source", "cache")
                                          for pipe in st.get("pipelines", [])
                                          for p in pipe["ports"]))
        else:
            m = job["metrics"]
            s.update(rows_in=m.get("records_in"), rows_out=m.get("records_out"),
                     bytes_in=None, bytes_out=None, stages=len(job["stages"]),
                     tasks=len(job["tasks"]), checkpoints=m.get("checkpoints"),
                     watermark=iso(_wm(m.get("watermark"))),
                     lag=m.get("watermark_lag_s"), in_rate=job["rates"].get("in"),
                     out_rate=job["rates"].get("out"))
        return s

    def detail(self, job_id: str) -> dict[str, Any] | None:
        """One job's page data, or None when unknown."""
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None:
                return None
            return self._batch(job) if job["kind"] == "batch" else self._stream(job)

    def _batch(self, job: dict[str, Any]) -> dict[str, Any]:
        out = self._summary(job)
        out.update({k: job.get(k) for k in ("runner", "parallelism", "in_driver", "plan",
                                            "counters", "user_traceback")})
        stages = []
        for sid in job["stage_order"]:
            st = job["stages"][sid]
            # copies: the JSON is written outside the lock while events keep coming
            attempts = sorted((dict(a) for a in st["attempts"].values()),
                              key=lambda a: (a["start"] or 0))
            view = {k: v for k, v in st.items() if k != "attempts"}
            view["attempts"] = attempts
            view["skew"] = skew(attempts)
            view["failed_attempts"] = sum(a["status"] == "failed" for a in attempts)
            view["speculative_attempts"] = sum(bool(a.get("speculative")) for a in attempts)
            stages.append(view)
        out["stages"] = stages
        return out

    def _stream(self, job: dict[str, Any]) -> dict[str, Any]:
        out = self._summary(job)
        m = job["metrics"]
        now = job.get("now")
        tasks = job["task_metrics"]
        rates = job["rates"]
        stage_views = []
        for st in job["stages"]:
            marks = [_wm(tasks[i].get("watermark")) for i in st["tasks"] if i in tasks]
            known = [w for w in marks if w is not None]
            wm = min(known) if known and len(known) == len(marks) else None
            ops = []
            for op in st["ops"]:
                total = m.get("operators", {}).get(op["name"], {})
                rate = rates.get("operators", {}).get(op["name"], {})
                ops.append({**op, "records_in": total.get("records_in", 0),
                            "records_out": total.get("records_out", 0),
                            "state_bytes": total.get("state_bytes", 0),
                            "in_rate": rate.get("in"), "out_rate": rate.get("out")})
            blocked = [rates.get("blocked", {}).get(i) for i in st["tasks"]]
            blocked = [b for b in blocked if b is not None]
            stage_views.append({
                **{k: v for k, v in st.items() if k != "ops"}, "ops": ops,
                "watermark": iso(wm), "watermark_us": wm,
                "lag_s": max(0.0, (now - wm) / 1e6) if wm is not None and now else None,
                "backpressure": max(blocked) if blocked else None})
        task_views = []
        for t in job["tasks"]:
            tm = tasks.get(t["index"], {})
            wm = _wm(tm.get("watermark"))
            task_views.append({**t, "watermark": iso(wm), "records_in": tm.get("records_in"),
                               "records_out": tm.get("records_out"), "idle": tm.get("idle"),
                               "blocked_s": tm.get("blocked_s"),
                               "backpressure": rates.get("blocked", {}).get(t["index"]),
                               "position": tm.get("position")})
        checkpoints = list(job["checkpoints"])
        out.update(
            executor=job.get("executor"), parallelism=job.get("parallelism"),
            checkpoint_location=job.get("checkpoint"), interval_s=job.get("interval_s"),
            metrics={k: v for k, v in m.items() if k != "operators"},
            watermark=iso(_wm(m.get("watermark"))), watermark_us=_wm(m.get("watermark")),
            stages=stage_views, task_list=task_views, checkpoints=checkpoints[::-1],
            completed_checkpoints=sum(c["status"] == "completed" for c in checkpoints),
            failed_checkpoints=sum(c["status"] == "failed" for c in checkpoints),
            restarts=list(job["restarts"])[::-1], series=list(job["series"]),
            positions=m.get("positions", []), late_records=m.get("late_records", 0),
            state_groups=checkpoints[-1].get("state_groups", {}) if checkpoints else {},
            user_traceback=job.get("user_traceback"))
        return out


def skew(attempts: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Slowest vs median task (and largest vs median input) of a stage's successful
    attempts, None with fewer than two."""
    ok = [a for a in attempts if a["status"] == "succeeded" and a.get("end")]
    if len(ok) < 2:
        return None
    secs = [a["end"] - a["start"] for a in ok]
    rows = [a.get("rows_in", 0) for a in ok]
    median_s = statistics.median(secs)
    median_rows = statistics.median(rows)
    return {"max_s": max(secs), "median_s": median_s,
            "ratio": max(secs) / median_s if median_s > 0 else None,
            "max_rows": max(rows), "median_rows": median_rows,
            "rows_ratio": max(rows) / median_rows if median_rows > 0 else None}
