"""Checkpoint storage for streaming jobs: one directory per epoch under a URI, complete or not.

Layout under the checkpoint location (local path or any ``millstream.io.fs`` URI)::

    chk-0000000007/state-<nonce>.pkl    source positions, operator snapshots, sink handles
    chk-0000000007/_COMPLETE            JSON manifest: epoch, state file name, size, sha256,
                                        shared blobs it references
    shared/<sha256>                     large state values, shared between checkpoints

The state file is written first; ``_COMPLETE`` (written to a temporary name and renamed
where the store can rename) makes the checkpoint count. Only a checkpoint whose
manifest exists and whose state file matches the manifest's checksum is restored.

**Incremental checkpoints.** A snapshot may hold :class:`SharedBlob` values (tasks of the
parallel executor turn large Arrow tables and byte strings of keyed state into blobs,
per key group). A blob is stored once under ``shared/`` by its SHA-256, and a blob whose
content did not change since the task's previous checkpoint travels as a reference only
(no data): a large state of which little changes costs little per checkpoint. Reading
resolves references (checking each blob's hash); pruning deletes blobs no retained
checkpoint references.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import cloudpickle
import pyarrow as pa
import pyarrow.fs as pafs

from millstream.errors import MillstreamError
from millstream.io import fs as msfs

_log = logging.getLogger(__name__)

COMPLETE = "_COMPLETE"
COMMITTED = "_COMMITTED"
_PREFIX = "chk-"


class CheckpointError(MillstreamError):
    """A checkpoint cannot be written or read."""


SHARED = "shared"
JOB_META = "_job.json"  # facts about the job across runs (e.g. the most sink instances)
#: State values at least this large become shared blobs (incremental checkpoints).
BLOB_MIN_BYTES = 64 << 10


class SharedBlob:
    """A large state value by content hash; ``data`` is None when the store has it already."""

    __slots__ = ("sha", "kind", "data")

    def __init__(self, sha: str, kind: str, data: bytes | None) -> None:
        self.sha = sha
        self.kind = kind  # "arrow" (an IPC stream of a table) | "bytes"
        self.data = data

    def __reduce__(self) -> tuple:
        return (SharedBlob, (self.sha, self.kind, self.data))


def externalize(value: Any, previous: set[str], used: set[str]) -> Any:
    """``value`` with large Arrow tables/batches and byte strings replaced by blobs.

    Blobs whose hash is in ``previous`` (sent with this task's last checkpoint, so stored)
    carry no data; every hash used is added to ``used``.
    """
    if isinstance(value, dict):
        return {k: externalize(v, previous, used) for k, v in value.items()}
    if isinstance(value, list):
        return [externalize(v, previous, used) for v in value]
    if isinstance(value, tuple) and type(value) is tuple:
        return tuple(externalize(v, previous, used) for v in value)
    kind = None
    if isinstance(value, (pa.Table, pa.RecordBatch)) and value.nbytes >= BLOB_MIN_BYTES:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, value.schema) as w:
            w.write(value)
        data, kind = sink.getvalue().to_pybytes(), "arrow"
        if isinstance(value, pa.RecordBatch):
            kind = "arrow-batch"
    elif isinstance(value, bytes) and len(value) >= BLOB_MIN_BYTES:
        data, kind = value, "bytes"
    if kind is None:
        return value
    sha = hashlib.sha256(data).hexdigest()
    used.add(sha)
    return SharedBlob(sha, kind, None if sha in previous else data)


def write_blobs(fs: pafs.FileSystem, root: str, blobs: list[SharedBlob]) -> int:
    """Store the blobs that carry data under ``<root>/shared/`` (unless there already) and
    drop their data; return the bytes written."""
    written = 0
    shared = msfs.join(root, SHARED)
    if any(b.data is not None for b in blobs):
        msfs.mkdirs(fs, shared)
    for b in blobs:
        if b.data is None:
            continue
        path = msfs.join(shared, b.sha)
        if not msfs.exists(fs, path):
            msfs.write_bytes(fs, path, b.data)
            written += len(b.data)
        b.data = None
    return written


class BlobStore:
    """A task's side of a checkpoint location: it writes its own large state values, so
    they never pass through the driver."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None) -> None:
        self.fs, self.path = msfs.resolve(uri, **(storage_options or {}))

    def put(self, value: Any) -> int:
        """Write every blob with data inside ``value``; return the bytes written."""
        blobs: list[SharedBlob] = []
        _blobs(value, blobs)
        return write_blobs(self.fs, self.path, blobs)

    def load(self, blob: SharedBlob) -> Any:
        """A blob's value, read from the store (its hash checked)."""
        return load_blob(self.fs, self.path, blob)

    def resolve(self, value: Any) -> Any:
        """``value`` with every blob reference replaced by its value."""
        return _resolve(value, self.load)


def load_blob(fs: pafs.FileSystem, root: str, blob: SharedBlob) -> Any:
    """Read a blob stored under ``<root>/shared/`` back into its value."""
    path = msfs.join(root, SHARED, blob.sha)
    data = msfs.read_bytes(fs, path)
    if hashlib.sha256(data).hexdigest() != blob.sha:
        raise CheckpointError(f"checkpoint blob {path} does not match its hash")
    if blob.kind == "bytes":
        return data
    table = pa.ipc.open_stream(pa.py_buffer(data)).read_all()
    if blob.kind == "arrow-batch":
        return table.combine_chunks().to_batches()[0] if table.num_rows else \
            pa.RecordBatch.from_pylist([], schema=table.schema)
    return table


def _blobs(value: Any, out: list[SharedBlob]) -> None:
    if isinstance(value, SharedBlob):
        out.append(value)
    elif isinstance(value, dict):
        for v in value.values():
            _blobs(v, out)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _blobs(v, out)


def _strip(value: Any) -> Any:
    """``value`` with every blob's data dropped (the state file keeps references only)."""
    if isinstance(value, SharedBlob):
        return SharedBlob(value.sha, value.kind, None)
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    if isinstance(value, tuple) and type(value) is tuple:
        return tuple(_strip(v) for v in value)
    return value


def _resolve(value: Any, load: Any) -> Any:
    if isinstance(value, SharedBlob):
        return load(value)
    if isinstance(value, dict):
        return {k: _resolve(v, load) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, load) for v in value]
    if isinstance(value, tuple) and type(value) is tuple:
        return tuple(_resolve(v, load) for v in value)
    return value


@dataclass
class RestoreTarget:
    """One stage partition to restore: its chain key, operators and how its input arrives."""

    key: tuple[int, int, int]  # (stage position, pipeline, partition)
    ops: list[Any]  # operator instances (for names and flags)
    key_grouped: bool  # fed by a keyed exchange: owns key groups
    is_source: bool  # reads a source partition (its state is restored per partition)
    n: int  # partitions of its pipeline


def plan_restore(uri: str, epoch: int, state: dict[str, Any], targets: list[RestoreTarget], *,
                 signature: list[Any], parallelism: int, key_groups_option: int | None
                 ) -> tuple[int, dict[tuple[int, int, int], dict[int, tuple[str, Any]]]]:
    """Check that a (version 2) checkpoint fits the job and say what each operator restores.

    Returns the job's key groups (fixed by the checkpoint) and, per target and operator,
    ``("keyed", [states of the key groups it owns])`` (a broadcast join's also the
    ``BROADCAST_GROUP`` state: its broadcast input, whole) or ``("plain", snapshot)``.
    Raises :class:`CheckpointError` for another pipeline, another number of key groups,
    moved source partitions, or a rescaled restore of state not split by key group (in a
    pipeline of more than one task).
    """
    from millstream.core.keygroups import owned_key_groups
    from millstream.ops.base import is_keyed_op
    from millstream.ops.stream_join import BROADCAST_GROUP
    from millstream.ops.window import WindowAggregate

    if state["signature"] != signature:
        raise CheckpointError(
            f"checkpoint {uri} epoch {epoch} was taken by a different pipeline; restore needs "
            f"the same plan (the parallelism may differ)")
    kg = int(state["key_groups"])
    if key_groups_option is not None and key_groups_option != kg:
        raise CheckpointError(
            f"checkpoint {uri} epoch {epoch} has {kg} key groups; the number of key groups "
            f"(max_parallelism) of a job cannot change (asked for {key_groups_option})")
    old_p = state["parallelism"]
    rescaled = old_p != parallelism or state["layout"] != [t.key for t in targets]
    now_sources = {t.key for t in targets if t.is_source}
    if set(state["positions"]) != now_sources:
        raise CheckpointError(
            f"checkpoint {uri} epoch {epoch} was taken at parallelism {old_p} with source "
            f"partitions {sorted(state['positions'])}; the job now has {sorted(now_sources)} at "
            f"parallelism {parallelism}: source positions cannot move between partitions, so "
            f"restore with the same parallelism ({old_p}) or a source with fixed partitions")
    where = (f"checkpoint {uri} epoch {epoch} was taken at parallelism {old_p}, the job now "
             f"runs at {parallelism}")
    out: dict[tuple[int, int, int], dict[int, tuple[str, Any]]] = {}
    for t in targets:
        data: dict[int, tuple[str, Any]] = {}
        for k, op in enumerate(t.ops):
            if t.key_grouped and is_keyed_op(op):
                groups = state["keyed"].get((*t.key[:2], k), {})
                owned = list(owned_key_groups(t.key[2], t.n, kg))
                if getattr(op, "broadcast_input", None) is not None:
                    owned.append(BROADCAST_GROUP)  # a broadcast join's input: to every task
                data[k] = ("keyed", [st for g in owned for st in groups.get(g, ())])
                continue
            # a pipeline of one task then and now (a window without keys) restores that
            # task's state whatever the parallelism
            single = t.n == 1 and [tuple(c) for c in state["layout"]
                                   if tuple(c[:2]) == t.key[:2]] == [(*t.key[:2], 0)]
            if rescaled and not single:
                if isinstance(op, WindowAggregate) and not op.keys:
                    raise CheckpointError(
                        f"{where}: {op.name} is a window without keys; its state is not split "
                        f"by key group, so the job can only be restored with the same "
                        f"parallelism ({old_p})")
                if not t.is_source and any(
                        v is not None for (si, pi, _ci, kk), v in state["ops"].items()
                        if (si, pi, kk) == (*t.key[:2], k)):
                    raise CheckpointError(
                        f"{where}: {op.name} keeps state that is not split by key group; the "
                        f"job can only be restored with the same parallelism ({old_p})")
            snap = state["ops"].get((*t.key, k))
            if snap is not None:
                data[k] = ("plain", snap)
        out[t.key] = data
    return kg, out


class CheckpointStore:
    """Writes and finds complete checkpoints under ``uri``; keeps the newest ``keep``."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None,
                 keep: int = 3) -> None:
        self.uri = uri
        self.fs, self.path = msfs.resolve(uri, **(storage_options or {}))
        self.keep = max(1, int(keep))
        self.last_size = 0
        msfs.mkdirs(self.fs, self.path)

    def _dir(self, epoch: int) -> str:
        return msfs.join(self.path, f"{_PREFIX}{epoch:010d}")

    def write(self, epoch: int, state: dict[str, Any]) -> str:
        """Write the state of ``epoch`` (new shared blobs first) and then its manifest;
        return the checkpoint directory. ``last_size``: the bytes this checkpoint wrote."""
        blobs: list[SharedBlob] = []
        _blobs(state, blobs)
        written = write_blobs(self.fs, self.path, blobs)
        data = cloudpickle.dumps(_strip(state) if blobs else state)
        self.last_size = len(data) + written
        d = self._dir(epoch)
        msfs.mkdirs(self.fs, d)
        name = f"state-{uuid.uuid4().hex[:12]}.pkl"
        msfs.write_bytes(self.fs, msfs.join(d, name), data)
        manifest = {"epoch": int(epoch), "state_file": name, "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(), "created": time.time(),
                    "shared": sorted({b.sha for b in blobs})}
        body = json.dumps(manifest, sort_keys=True).encode()
        final = msfs.join(d, COMPLETE)
        if msfs.has_atomic_rename(self.fs):
            tmp = msfs.join(d, f".{COMPLETE}.tmp-{uuid.uuid4().hex[:8]}")
            msfs.write_bytes(self.fs, tmp, body)
            msfs.move(self.fs, tmp, final)
        else:  # object stores: a single PUT is atomic
            msfs.write_bytes(self.fs, final, body)
        self._prune(epoch)
        return d

    def _load_blob(self, blob: SharedBlob) -> Any:
        return load_blob(self.fs, self.path, blob)

    def epochs(self) -> list[int]:
        """Epochs that have a checkpoint directory (complete or not), ascending."""
        out = []
        for info in msfs.list_dir(self.fs, self.path) if msfs.exists(self.fs, self.path) else []:
            if info.type == pafs.FileType.Directory and info.base_name.startswith(_PREFIX):
                try:
                    out.append(int(info.base_name[len(_PREFIX):]))
                except ValueError:
                    continue
        return sorted(out)

    def read(self, epoch: int, keyed_as_blobs: bool = False) -> dict[str, Any] | None:
        """The state of ``epoch`` if its checkpoint is complete and intact, else None.

        ``keyed_as_blobs``: keyed state (``state["keyed"]``) keeps its blob references (the
        blobs are only checked to exist): the tasks that restore it read their own key
        groups, one at a time, so a large state never has to fit in the driver."""
        d = self._dir(epoch)
        try:
            manifest = json.loads(msfs.read_bytes(self.fs, msfs.join(d, COMPLETE)))
            data = msfs.read_bytes(self.fs, msfs.join(d, manifest["state_file"]))
        except (OSError, MillstreamError, ValueError, KeyError):
            return None
        if len(data) != manifest["size"] or hashlib.sha256(data).hexdigest() != manifest["sha256"]:
            _log.warning("checkpoint %s: state file does not match its manifest; ignored", d)
            return None
        state = cloudpickle.loads(data)
        if manifest.get("shared"):
            try:
                if keyed_as_blobs and "keyed" in state:
                    kept: list[SharedBlob] = []
                    _blobs(state["keyed"], kept)
                    for blob in kept:
                        path = msfs.join(self.path, SHARED, blob.sha)
                        if not msfs.exists(self.fs, path):
                            raise CheckpointError(f"checkpoint blob {path} is missing")
                    state = {k: v if k == "keyed" else _resolve(v, self._load_blob)
                             for k, v in state.items()}
                else:
                    state = _resolve(state, self._load_blob)
            except (OSError, MillstreamError) as exc:
                _log.warning("checkpoint %s: a shared blob is missing or damaged (%s); ignored",
                             d, exc)
                return None
        return state

    def job_meta(self) -> dict[str, Any]:
        """Facts the job keeps across runs (``{}`` before the first write)."""
        try:
            return json.loads(msfs.read_bytes(self.fs, msfs.join(self.path, JOB_META)))
        except (OSError, MillstreamError, ValueError):
            return {}

    def update_job_meta(self, **facts: Any) -> None:
        """Set some job facts (one small JSON file, rewritten whole)."""
        meta = {**self.job_meta(), **facts}
        msfs.write_bytes(self.fs, msfs.join(self.path, JOB_META),
                         json.dumps(meta, sort_keys=True).encode())

    def mark_committed(self, epoch: int) -> None:
        """Record that the sinks committed ``epoch`` (written after the commit succeeded)."""
        msfs.write_bytes(self.fs, msfs.join(self._dir(epoch), COMMITTED), b"")

    def is_committed(self, epoch: int) -> bool:
        return msfs.exists(self.fs, msfs.join(self._dir(epoch), COMMITTED))

    def latest(self, committed_only: bool = False, keyed_as_blobs: bool = False
               ) -> tuple[int, dict[str, Any]] | None:
        """The newest complete checkpoint as (epoch, state), or None; with
        ``committed_only``, the newest whose sink commit is known to have happened
        (``keyed_as_blobs``: see :meth:`read`)."""
        for epoch in reversed(self.epochs()):
            if committed_only and not self.is_committed(epoch):
                continue
            state = self.read(epoch, keyed_as_blobs)
            if state is not None:
                return epoch, state
        return None

    def discard_after(self, epoch: int) -> list[int]:
        """Remove the checkpoints newer than ``epoch`` (a restart from ``epoch`` replays the
        epochs after it, so their old checkpoints are superseded); returns their epochs."""
        gone = [e for e in self.epochs() if e > epoch]
        for e in gone:
            msfs.delete_dir(self.fs, self._dir(e))
        if gone:
            self._prune_shared()
        return gone

    def _prune(self, newest: int) -> None:
        """Drop all but the newest ``keep`` complete checkpoints, and incomplete older ones."""
        complete = 0
        for epoch in reversed(self.epochs()):
            if epoch > newest:
                continue
            if complete < self.keep and msfs.exists(self.fs, msfs.join(self._dir(epoch), COMPLETE)):
                complete += 1
                continue
            if epoch < newest:
                msfs.delete_dir(self.fs, self._dir(epoch))
        self._prune_shared()

    def _prune_shared(self) -> None:
        """Delete shared blobs that no remaining complete checkpoint references."""
        shared = msfs.join(self.path, SHARED)
        if not msfs.exists(self.fs, shared):
            return
        keep: set[str] = set()
        for epoch in self.epochs():
            try:
                manifest = json.loads(msfs.read_bytes(self.fs, msfs.join(self._dir(epoch),
                                                                          COMPLETE)))
            except (OSError, MillstreamError, ValueError):
                continue
            keep.update(manifest.get("shared", ()))
        for info in msfs.list_dir(self.fs, shared):
            if info.type == pafs.FileType.File and info.base_name not in keep:
                msfs.delete_file(self.fs, info.path)
