"""How a streaming message crosses a process boundary: its record batches as Arrow IPC.

Tasks put ``pyarrow.RecordBatch`` objects in their messages. Hosts in the same process
pass them by reference; hosts in other processes (worker processes, Ray actors) send
:func:`to_wire` of a message and read :func:`from_wire` of it. IPC carries only a batch's
own rows: a pickled slice would carry its parent's whole buffers.

Over a byte stream (a pipe between worker processes), :func:`write_frame` sends a message
as one frame: a small pickle of it with its IPC buffers out of band (pickle protocol 5),
written as they are; :func:`read_frame` reads them into Arrow-allocated buffers that the
batches then use without a further copy (a batch's bytes are copied once into the pipe
and once out of it).
"""

from __future__ import annotations

import os
import pickle
import struct
from typing import Any

import pyarrow as pa

_HEAD = struct.Struct("<II")  # pickle length, out-of-band buffer count


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


def write_frame(fd: int, msg: tuple) -> None:
    """Write ``msg`` (its batches as IPC) to the file descriptor ``fd`` as one frame;
    blocks while the pipe is full (backpressure)."""
    buffers: list[pickle.PickleBuffer] = []
    head = pickle.dumps(to_wire(msg), protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    sizes = struct.pack(f"<{len(raws)}Q", *(r.nbytes for r in raws))
    parts: list[Any] = [_HEAD.pack(len(head), len(raws)) + sizes + head, *raws]
    total = sum(memoryview(p).nbytes for p in parts)
    while total:
        n = os.writev(fd, parts)
        total -= n
        while n and parts:  # a partial write: drop what went, go on with the rest
            first = memoryview(parts[0]).cast("B")
            if n >= first.nbytes:
                n -= first.nbytes
                parts.pop(0)
            else:
                parts[0] = first[n:]
                n = 0


def _read_into(fd: int, view: memoryview) -> None:
    while view.nbytes:
        n = os.readv(fd, [view])
        if n == 0:
            raise EOFError("the peer closed the pipe")
        view = view[n:]


def read_frame(fd: int) -> tuple:
    """The next message :func:`write_frame` wrote to ``fd`` (blocks until it is whole)."""
    fixed = bytearray(_HEAD.size)
    _read_into(fd, memoryview(fixed))
    head_len, nbuf = _HEAD.unpack(fixed)
    rest = bytearray(8 * nbuf + head_len)
    _read_into(fd, memoryview(rest))
    sizes = struct.unpack_from(f"<{nbuf}Q", rest)
    buffers = []
    for size in sizes:
        buf = pa.allocate_buffer(size)  # aligned, not zeroed
        if size:
            _read_into(fd, memoryview(buf))
        buffers.append(buf)
    return from_wire(pickle.loads(memoryview(rest)[8 * nbuf:], buffers=buffers))
