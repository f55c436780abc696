"""``/metrics``: the dashboard's jobs in the Prometheus text format (``prometheus-client``).

The same numbers as ``job.metrics()`` of a streaming job (records in and out, per operator
records and state size, checkpoints, restarts, late records, watermark and lag, task
counters, time blocked on full inboxes) and as ``ms.last_job_stats()`` of a batch job
(rows and bytes in and out, tasks, failed attempts, counters), labelled by job id. An
OpenTelemetry collector can scrape this endpoint with its Prometheus receiver.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from millstream.ui.state import DashboardState, _wm

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def render(state: DashboardState) -> bytes:
    """The metrics page (needs ``prometheus-client``: ``pip install 'millstream[ui]'``)."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(state))
    return generate_latest(registry)


class _Collector:
    """Builds the metric families from the state on every scrape."""

    def __init__(self, state: DashboardState) -> None:
        self.state = state

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        with self.state.lock:
            jobs = [dict(j) for j in self.state.jobs.values()]
            batch = [j for j in jobs if j["kind"] == "batch"]
            streams = [j for j in jobs if j["kind"] == "stream"]

            def counter(name: str, doc: str, labels: tuple[str, ...] = ("job",)) -> Any:
                return CounterMetricFamily(f"millstream_{name}", doc, labels=list(labels))

            def gauge(name: str, doc: str, labels: tuple[str, ...] = ("job",)) -> Any:
                return GaugeMetricFamily(f"millstream_{name}", doc, labels=list(labels))

            # ---- batch jobs
            by_status = counter("batch_jobs", "Batch jobs by outcome", ("status",))
            counts: dict[str, int] = {}
            for j in batch:
                counts[j["status"]] = counts.get(j["status"], 0) + 1
            for status in ("running", "succeeded", "failed"):
                by_status.add_metric([status], counts.get(status, 0))
            yield by_status
            fams = {k: counter(f"batch_job_{k}", doc) for k, doc in (
                ("rows_in", "Rows the job read from its sources"),
                ("bytes_in", "Bytes the job read from its sources"),
                ("rows_out", "Rows of the job's result"),
                ("bytes_out", "Bytes of the job's result"),
                ("tasks", "Tasks of the job's stages (run or running)"),
                ("failed_attempts", "Task attempts that failed"))}
            seconds = gauge("batch_job_seconds", "Duration of the job (so far)")
            job_counters = counter("batch_job_counter", "Task counters of the job",
                                   ("job", "counter"))
            for j in batch:
                stages = j["stages"].values()
                values = {
                    "rows_in": j.get("rows_in") or 0, "bytes_in": j.get("bytes_in") or 0,
                    "rows_out": j.get("rows_out") or 0, "bytes_out": j.get("bytes_out") or 0,
                    "tasks": sum(st["total"] for st in stages),
                    "failed_attempts": sum(a["status"] == "failed" for st in stages
                                           for a in st["attempts"].values())}
                for k, fam in fams.items():
                    fam.add_metric([j["id"]], values[k])
                seconds.add_metric([j["id"]], (j["end"] or time.time()) - j["start"])
                for name, v in (j.get("counters") or {}).items():
                    job_counters.add_metric([j["id"], name], v)
            yield from fams.values()
            yield seconds
            yield job_counters

            # ---- streaming jobs
            sc = {k: counter(f"stream_{k}", doc) for k, doc in (
                ("records_in", "Records the sources read"),
                ("records_out", "Records written to the sink"),
                ("checkpoints", "Completed checkpoints"),
                ("restarts", "Restarts from a checkpoint"),
                ("late_records", "Records that arrived after their window closed"))}
            sg = {k: gauge(f"stream_{k}", doc) for k, doc in (
                ("epoch", "Current epoch"),
                ("watermark_seconds", "Job watermark (event time, seconds since the epoch)"),
                ("watermark_lag_seconds", "Wall clock minus the watermark"),
                ("last_checkpoint_seconds", "Duration of the last checkpoint"),
                ("last_checkpoint_bytes", "Size of the last checkpoint"),
                ("running", "1 while the job runs"))}
            op_in = counter("stream_operator_records_in", "Records into an operator",
                            ("job", "operator"))
            op_out = counter("stream_operator_records_out", "Records out of an operator",
                             ("job", "operator"))
            op_state = gauge("stream_operator_state_bytes",
                             "State size of an operator at the last checkpoint",
                             ("job", "operator"))
            blocked = counter("stream_task_backpressure_seconds",
                              "Time a task spent blocked on full inboxes", ("job", "task"))
            task_counters = counter("stream_counter", "Task counters of the job",
                                    ("job", "counter"))
            for j in streams:
                m = j["metrics"]
                jid = [j["id"]]
                for k, fam in sc.items():
                    fam.add_metric(jid, m.get(k) or 0)
                wm = _wm(m.get("watermark"))
                gauges = {"epoch": m.get("epoch"),
                          "watermark_seconds": wm / 1e6 if wm is not None else None,
                          "watermark_lag_seconds": m.get("watermark_lag_s"),
                          "last_checkpoint_seconds": m.get("last_checkpoint_seconds"),
                          "last_checkpoint_bytes": m.get("last_checkpoint_bytes"),
                          "running": 1 if j["status"] == "running" else 0}
                for k, fam in sg.items():
                    if gauges[k] is not None:
                        fam.add_metric(jid, gauges[k])
                for name, v in (m.get("operators") or {}).items():
                    op_in.add_metric([j["id"], name], v.get("records_in", 0))
                    op_out.add_metric([j["id"], name], v.get("records_out", 0))
                    op_state.add_metric([j["id"], name], v.get("state_bytes", 0))
                for i, t in sorted(j["task_metrics"].items()):
                    blocked.add_metric([j["id"], str(i)], t.get("blocked_s") or 0.0)
                for name, v in (m.get("counters") or {}).items():
                    task_counters.add_metric([j["id"], name], v)
            yield from sc.values()
            yield from sg.values()
            yield op_in
            yield op_out
            yield op_state
            yield blocked
            yield task_counters
