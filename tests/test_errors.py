"""Errors that show the cause at once: the user's own frames with their file and line, no
pages of internal frames, a closure that cannot be shipped named with what it captures."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import millstream as ms

SRC = str(Path(__file__).resolve().parent.parent / "src")


def _parse(row):
    return {"v": int(row["text"])}  # the failing line


@pytest.mark.parametrize("where", ["workers", "driver"])
def test_a_user_functions_frame_names_its_file_and_line(where):
    limit = 0 if where == "workers" else 1 << 30
    ds = ms.from_items([{"text": "1"}, {"text": "x"}] * 500, num_partitions=2)
    with pytest.raises(ms.UserFunctionError) as info:
        ds.map(_parse).collect(driver_input_limit=limit, max_task_attempts=2)
    tb = info.value.user_traceback
    assert f'File "{__file__}"' in tb and "<dynamic-code>" not in tb
    assert 'return {"v": int(row["text"])}  # the failing line' in tb
    # the attempts, once each way they failed
    assert "attempts 0-1: ValueError" in str(info.value)


def test_a_closure_that_cannot_be_shipped_names_what_it_captures():
    lock = threading.Lock()

    def locked(row):
        with lock:
            return row

    with pytest.raises(ms.PlanError) as info:
        ms.range(100).map(locked).collect(driver_input_limit=0)
    msg = str(info.value)
    assert "'test_a_closure_that_cannot_be_shipped_names_what_it_captures.<locals>.locked'" in msg
    assert "captures 'lock' (a _thread.lock)" in msg and "Map(" in msg


def test_the_printed_error_starts_with_the_users_call_and_skips_internal_frames(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""
        import millstream as ms

        def parse(row):
            return {"v": int(row["text"])}

        ms.from_items([{"text": "x"}] * 10).map(parse).collect(max_task_attempts=1)
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"}, timeout=120)
    err = out.stderr
    frames = [ln for ln in err.splitlines() if ln.startswith('  File "')]
    assert frames[0].startswith(f'  File "{script}"')  # the user's call first
    internal = [f for f in frames if "/millstream/" in f]
    assert len(internal) <= 4, err  # (was about 25)
    assert err.count("Traceback (most recent call last)") == 1  # no chained internal trace
    assert 'return {"v": int(row["text"])}' in err  # the user's failing line
    debug = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                           env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin",
                                "MILLSTREAM_DEBUG": "1"}, timeout=120)
    assert len([ln for ln in debug.stderr.splitlines() if "/millstream/" in ln]) > len(internal)


def test_drop_and_rename_of_missing_columns_fail_at_once_as_in_polars():
    ds = ms.from_items([{"a": 1, "b": 2}])
    with pytest.raises(ms.SchemaError, match=r"drop\(\).*no column\(s\) \['nope'\]"):
        ds.drop("nope")
    with pytest.raises(ms.SchemaError, match=r"rename\(\).*\['bb'\].*did you mean 'b'"):
        ds.rename({"bb": "c"})
    assert ds.drop("nope", "b", strict=False).collect() == [{"a": 1}]  # Spark's way, if asked
    assert ds.rename({"bb": "c", "b": "c"}, strict=False).collect() == [{"a": 1, "c": 2}]
    # after a Python function the columns are known only when the job runs
    mapped = ds.map(lambda r: {"x": r["a"]})
    with pytest.raises(ms.SchemaError, match="no column"):
        mapped.drop("a").collect(max_task_attempts=1)


def test_map_returning_a_generator_points_to_flat_map():
    def split(row):
        yield from ({"w": w} for w in row["text"].split())

    with pytest.raises(ms.UserFunctionError, match="use flat_map") as info:
        ms.from_items([{"text": "a b"}]).map(split).collect()
    assert len(info.value.attempts) <= 1  # not retried: it would fail again
    assert ms.from_items([{"text": "a b"}]).flat_map(split).collect() == [{"w": "a"}, {"w": "b"}]
