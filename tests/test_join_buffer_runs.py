"""The stream joins' sorted buffer: sealing batches that came in order from several
senders, interleaved (ops/stream_join/chunks.py)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from millstream.ops.stream_join import chunks


def _batch(times: list[int], tag: str) -> tuple[pa.Table, np.ndarray]:
    t = np.asarray(times, np.int64)
    return pa.table({"t": t, "tag": [f"{tag}{i}" for i in range(len(t))]}), t


def _sealed(parts: list[tuple[pa.Table, np.ndarray]]) -> chunks._SortedBuffer:
    buf = chunks._SortedBuffer(("t",), "t", "t")
    for table, t in parts:
        buf.open.append(chunks._Chunk(table, {"t": t.copy()}, False, "t"))
        buf.open_rows += table.num_rows
    buf.seal()
    return buf


def _stable(parts: list[tuple[pa.Table, np.ndarray]]) -> list[tuple[int, str]]:
    rows = [r for table, _ in parts for r in zip(table["t"].to_pylist(),
                                                   table["tag"].to_pylist())]
    return sorted(rows, key=lambda r: r[0])  # Python's sort is stable


def _rows(buf: chunks._SortedBuffer) -> list[tuple[int, str]]:
    (c,) = buf.sealed
    assert c.sorted and list(c.cols["t"]) == c.data["t"].to_pylist()
    return list(zip(c.data["t"].to_pylist(), c.data["tag"].to_pylist()))


def test_runs_in_order_from_two_senders_are_sealed_without_sorting_rows(monkeypatch):
    """Two senders' batches, each in time order, interleaved: the sealed chunk is their
    rows in time order, put together run by run (no argsort, no gather of every column)."""
    parts = [_batch([20, 21, 22], "b"), _batch([10, 11, 12], "a"), _batch([30, 31], "c"),
             _batch([], "e"), _batch([22, 25], "d")]  # 22: a tie across runs, in order

    def no_sort(*args, **kwargs):
        raise AssertionError("sealed by sorting rows")

    monkeypatch.setattr(chunks.np, "argsort", no_sort)
    buf = _sealed(parts)
    monkeypatch.undo()
    assert _rows(buf) == _stable(parts)


@pytest.mark.parametrize("times", [
    [[5, 9], [7, 8]],  # overlapping runs
    [[5, 3], [1, 2]],  # a run out of order
    [[4, 5], [1, 4]],  # a tie the runs' order would break: the stable sort decides
])
def test_runs_that_overlap_are_sorted_as_before(times):
    parts = [_batch(t, f"r{i}-") for i, t in enumerate(times)]
    assert _rows(_sealed(parts)) == _stable(parts)


def test_runs_order():
    k = [np.array(v, np.int64) for v in ([3, 4], [1, 2], [], [4, 6])]
    assert chunks._runs_order(k) == [2, 1, 0, 3]
    assert chunks._runs_order([k[3], k[0]]) is None  # the tie 4 would come out of order
    assert chunks._runs_order([np.array([2, 1])]) is None
