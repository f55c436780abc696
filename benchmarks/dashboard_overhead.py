"""Does watching jobs slow them down? The same jobs with nobody listening, and with the
dashboard on (event log written, a client polling the job's page data and /metrics twice
a second, as an open browser tab does), in the same process, interleaved, best of N.

    python benchmarks/dashboard_overhead.py                 # 3 rounds
    python benchmarks/dashboard_overhead.py --rounds 5 --rows 10000000
    python benchmarks/dashboard_overhead.py --modes off --src ../other/src   # another tree

Wall time on a shared machine is noisy, so the driver process's CPU time is reported too
(the scheduler, the streaming coordinator, the event subscribers and the server all run
there; workers are untouched but for progress reports every 0.25 s of a running task).

Workloads: a batch group-by on the workers (few large tasks), a stage of many small tasks
(where per-task events cost most), and a streaming window job on the parallel executor
(metrics snapshots every second). Prints seconds per mode and the ratio dashboard/off.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ms = None  # millstream, imported from --src in main()


def batch_groupby(rows: int) -> None:
    out = (ms.range(rows, num_partitions=8)
           .with_columns((ms.col("id") % 1000).alias("k"), (ms.col("id") * 3).alias("v"))
           .group_by("k").agg(ms.sum("v").alias("s"), ms.count().alias("n"))
           .collect(driver_input_limit=0))
    assert len(out) == 1000


def many_tasks(rows: int) -> None:
    n = ms.range(rows // 10, num_partitions=200).filter(ms.col("id") % 2 == 0) \
        .count(driver_input_limit=0)
    assert n == rows // 20


def streaming(rows: int, tmp: str) -> None:
    count = rows // 25
    ds = (ms.from_generator(lambda i: {"k": i % 50, "ts": i * 10, "v": 1}, count=count,
                            partitions=2)
          .with_watermark("ts", "1s").group_by("k").window(ms.tumbling("10s"))
          .agg(ms.sum("v").alias("s")))
    job = ds.start(checkpoint=tempfile.mkdtemp(dir=tmp), checkpoint_interval="200ms",
                   max_batch_records=5000)
    assert job.await_termination(600)
    assert job.metrics()["records_in"] == count


class Poller:
    """Reads what an open dashboard tab reads, twice a second, until stopped."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stop = threading.Event()
        self.requests = 0
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.wait(0.5):
            try:
                jobs = json.load(urllib.request.urlopen(self.url + "api/jobs", timeout=10))
                if jobs["jobs"]:
                    urllib.request.urlopen(self.url + "api/jobs/" + jobs["jobs"][0]["id"],
                                           timeout=10).read()
                urllib.request.urlopen(self.url + "metrics", timeout=10).read()
                self.requests += 3
            except Exception as exc:  # noqa: BLE001 - a benchmark keeps going
                print(f"poller: {exc}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rows", type=int, default=5_000_000)
    ap.add_argument("--parallelism", type=int, default=2)
    ap.add_argument("--modes", default="off,dashboard",
                    help="off (nobody listens), dashboard (with a polling client), "
                         "dashboard-idle (no client)")
    ap.add_argument("--src", default=str(Path(__file__).resolve().parent.parent / "src"),
                    help="the source tree to import millstream from (compare two trees)")
    args = ap.parse_args()
    global ms
    sys.path.insert(0, args.src)
    # worker processes import the same tree
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [args.src, *filter(None, [os.environ.get("PYTHONPATH")])])
    import millstream

    ms = millstream
    modes = tuple(m for m in args.modes.split(",") if m)
    tmp = tempfile.mkdtemp(prefix="millstream-bench-ui-")
    workloads = {"batch group-by": lambda: batch_groupby(args.rows),
                 "200 small tasks": lambda: many_tasks(args.rows),
                 "streaming window": lambda: streaming(args.rows, tmp)}
    times: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}  # the driver process's CPU time (all threads)
    requests = 0
    for r in range(args.rounds):
        for mode in (modes if r % 2 == 0 else modes[::-1]):
            ui = mode.startswith("dashboard")
            extra = {"ui": True, "event_log_dir": f"{tmp}/events"} if ui else {}
            ms.init(parallelism=args.parallelism, progress=False, **extra)
            poller = Poller(ms.ui_url()) if mode == "dashboard" else None
            ms.range(1000, num_partitions=args.parallelism).count(driver_input_limit=0)  # warm
            for name, fn in workloads.items():
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                times.setdefault((name, mode), []).append(time.perf_counter() - t0)
                cpu.setdefault((name, mode), []).append(time.process_time() - c0)
            if poller is not None:
                poller.stop.set()
                poller.thread.join()
                requests += poller.requests
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    ms.init(parallelism=args.parallelism, progress=False)
    print(f"\nmillstream from {args.src}")
    print(f"{'workload':<18}" + "".join(f" {m + ' best':>15} {m + ' median':>17}" for m in modes)
          + (f"   best / {modes[0]} best" if len(modes) >= 2 else ""))
    for name in workloads:
        line = f"{name:<18}"
        for m in modes:
            t = times[(name, m)]
            line += f" {min(t):14.2f}s {statistics.median(t):16.2f}s"
        if len(modes) >= 2:
            line += "   " + " ".join(f"{min(times[(name, m)]) / min(times[(name, modes[0])]):.3f}"
                                     for m in modes[1:])
        print(line)
    print("\ndriver CPU seconds (all its threads: scheduler, event subscribers, server), median")
    print(f"{'workload':<18}" + "".join(f" {m:>15}" for m in modes))
    for name in workloads:
        print(f"{name:<18}" + "".join(f" {statistics.median(cpu[(name, m)]):14.3f}s"
                                      for m in modes))
    print(f"\n{args.rounds} rounds, {args.rows:,} rows, parallelism {args.parallelism}; "
          f"the dashboard answered {requests} requests meanwhile")


if __name__ == "__main__":
    main()
