"""Checkpoint storage for streaming jobs: one directory per epoch under a URI, complete or not.

Layout under the checkpoint location (local path or any ``millstream.io.fs`` URI)::

    chk-0000000007/state-<nonce>.pkl    source positions, operator snapshots, sink handles
    chk-0000000007/_COMPLETE            JSON manifest: epoch, state file name, size, sha256

The state file is written first; ``_COMPLETE`` (written to a temporary name and renamed
where the store can rename) makes the checkpoint count. Only a checkpoint whose
manifest exists and whose state file matches the manifest's checksum is restored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from typing import Any

import cloudpickle
import pyarrow.fs as pafs

from millstream.errors import MillstreamError
from millstream.io import fs as msfs

_log = logging.getLogger(__name__)

COMPLETE = "_COMPLETE"
COMMITTED = "_COMMITTED"
_PREFIX = "chk-"


class CheckpointError(MillstreamError):
    """A checkpoint cannot be written or read."""


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
        """Write the state of ``epoch`` and then its manifest; return the checkpoint directory."""
        data = cloudpickle.dumps(state)
        self.last_size = len(data)
        d = self._dir(epoch)
        msfs.mkdirs(self.fs, d)
        name = f"state-{uuid.uuid4().hex[:12]}.pkl"
        msfs.write_bytes(self.fs, msfs.join(d, name), data)
        manifest = {"epoch": int(epoch), "state_file": name, "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(), "created": time.time()}
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

    def read(self, epoch: int) -> dict[str, Any] | None:
        """The state of ``epoch`` if its checkpoint is complete and intact, else None."""
        d = self._dir(epoch)
        try:
            manifest = json.loads(msfs.read_bytes(self.fs, msfs.join(d, COMPLETE)))
            data = msfs.read_bytes(self.fs, msfs.join(d, manifest["state_file"]))
        except (OSError, MillstreamError, ValueError, KeyError):
            return None
        if len(data) != manifest["size"] or hashlib.sha256(data).hexdigest() != manifest["sha256"]:
            _log.warning("checkpoint %s: state file does not match its manifest; ignored", d)
            return None
        return cloudpickle.loads(data)

    def mark_committed(self, epoch: int) -> None:
        """Record that the sinks committed ``epoch`` (written after the commit succeeded)."""
        msfs.write_bytes(self.fs, msfs.join(self._dir(epoch), COMMITTED), b"")

    def is_committed(self, epoch: int) -> bool:
        return msfs.exists(self.fs, msfs.join(self._dir(epoch), COMMITTED))

    def latest(self, committed_only: bool = False) -> tuple[int, dict[str, Any]] | None:
        """The newest complete checkpoint as (epoch, state), or None; with
        ``committed_only``, the newest whose sink commit is known to have happened."""
        for epoch in reversed(self.epochs()):
            if committed_only and not self.is_committed(epoch):
                continue
            state = self.read(epoch)
            if state is not None:
                return epoch, state
        return None

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
