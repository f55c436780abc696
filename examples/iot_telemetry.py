"""IoT telemetry: per-device one-minute averages and anomaly alerts from sensor readings.

    python examples/iot_telemetry.py            # a synthetic sensor stream, 20 s of event time

The stream is generated (``ms.from_generator``); point ``read_kafka`` at a topic for real
devices. Results go to Parquet files committed exactly once per checkpoint.
"""

from __future__ import annotations

import argparse
import math
import tempfile

import millstream as ms

DEVICES = 20
START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def reading(i: int) -> dict:
    """The i-th reading: devices report every 50 ms of event time; device 7 overheats."""
    device = i % DEVICES
    ts = START_MS + (i // DEVICES) * 50
    temp = 20.0 + 5.0 * math.sin(i / 500.0) + (device % 5)
    if device == 7 and (i // DEVICES) % 400 > 300:
        temp += 30.0
    return {"device": f"dev-{device:02d}", "ts": ts, "temp": temp}


def averages(stream: ms.Dataset) -> ms.Dataset:
    """Per device and minute: mean, max and number of readings."""
    return (stream.with_watermark("ts", delay="2s")
            .group_by("device").window(ms.tumbling("1m"), on="ts")
            .agg(ms.mean("temp").alias("avg_temp"), ms.max("temp").alias("max_temp"),
                 ms.count().alias("readings")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--readings", type=int, default=DEVICES * 20 * 60 * 3, help="total readings")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        stream = ms.from_generator(reading, count=args.readings, partitions=2)
        job = averages(stream).start(checkpoint=f"{tmp}/checkpoints", checkpoint_interval="1s",
                                     sink=f"{tmp}/averages")
        job.await_termination(120)
        result = ms.read_parquet(f"{tmp}/averages").sort(["window_start", "device"])
        alerts = result.filter(ms.col("max_temp") > 45.0)
        print("per-device averages (first rows):")
        result.show(5)
        print("anomalies (max temperature over 45):")
        alerts.select("device", "window_start", "max_temp").show(10)
        print(job.summary())


if __name__ == "__main__":
    main()
