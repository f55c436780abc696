"""How a streaming message crosses a process boundary: its record batches as Arrow IPC.

Tasks put ``pyarrow.RecordBatch`` objects in their messages. Hosts in the same process
pass them by reference; hosts in other processes (worker processes, Ray actors) send
:func:`to_wire` of a message and read :func:`from_wire` of it. IPC carries only a batch's
own rows: a pickled slice would carry its parent's whole buffers.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa


def encode_batch(batch: pa.RecordBatch) -> pa.Buffer:
    """A batch as an Arrow IPC stream."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as w:
        w.write_batch(batch)
    return sink.getvalue()


def decode_batch(data: Any) -> pa.RecordBatch:
    """The batch of :func:`encode_batch` (zero-copy over ``data``)."""
    return pa.ipc.open_stream(data).read_next_batch()


def _enc(x: Any) -> Any:
    if isinstance(x, pa.RecordBatch):
        return encode_batch(x)
    if isinstance(x, list) and x and isinstance(x[0], pa.RecordBatch):
        return [encode_batch(b) for b in x]
    return x


def _dec(x: Any) -> Any:
    if isinstance(x, pa.Buffer):
        return decode_batch(x)
    if isinstance(x, list) and x and isinstance(x[0], pa.Buffer):
        return [decode_batch(b) for b in x]
    return x


def to_wire(msg: tuple) -> tuple:
    """``msg`` with its record batches (and lists of them) as IPC buffers."""
    return tuple(_enc(x) for x in msg)


def from_wire(msg: tuple) -> tuple:
    """The message :func:`to_wire` encoded, with its batches back."""
    return tuple(_dec(x) for x in msg)


def wire_bytes(msg: tuple) -> int:
    """Bytes of batch data in an encoded message (for transports that batch messages)."""
    total = 0
    for x in msg:
        if isinstance(x, pa.Buffer):
            total += x.size
        elif isinstance(x, list):
            total += sum(b.size for b in x if isinstance(b, pa.Buffer))
    return total
