"""Streaming messages as frames over a pipe (runtime/streaming/wire.py): batches come back
equal and carry only their own rows, control messages come back as they were, a closed
pipe ends the reader."""

from __future__ import annotations

import os
import threading

import pyarrow as pa
import pytest

from millstream.runtime.streaming.wire import read_frame, write_frame


def _batch(n: int) -> pa.RecordBatch:
    return pa.record_batch({"x": pa.array(range(n), pa.int64()),
                            "s": pa.array([f"row {i}" for i in range(n)], pa.string())})


def test_frames_round_trip_batches_and_control_messages():
    big = _batch(200_000)  # several MB: more than a pipe holds, so the writer blocks
    msgs = [(3, "data", 1, 0, big.slice(10, 150_000)), (3, "wm", 1, 12345, False),
            (0, "data", 2, 1, _batch(0)), (1, "barrier", 2, 7, True),
            (2, "side", 1, [big.slice(0, 3), _batch(2)])]
    r, w = os.pipe()
    writer = threading.Thread(target=lambda: [write_frame(w, m) for m in msgs])
    writer.start()
    try:
        for sent in msgs:
            got = read_frame(r)
            assert len(got) == len(sent)
            for a, b in zip(got, sent):
                if isinstance(b, pa.RecordBatch):
                    assert a.equals(b)
                elif isinstance(b, list):
                    assert all(x.equals(y) for x, y in zip(a, b))
                else:
                    assert a == b
        writer.join()
    finally:
        os.close(w)
    with pytest.raises(EOFError):
        read_frame(r)
    os.close(r)


def test_a_slice_travels_without_its_parent():
    parent = _batch(100_000)
    r, w = os.pipe()
    try:
        write_frame(w, ("data", 0, 0, parent.slice(5, 10)))
        os.close(w)
        w = None
        got = read_frame(r)[3]
        assert got.num_rows == 10 and got.equals(parent.slice(5, 10))
        assert got.nbytes < parent.nbytes // 100
    finally:
        if w is not None:
            os.close(w)
        os.close(r)
