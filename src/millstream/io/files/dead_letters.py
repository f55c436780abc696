"""Where malformed records go: the ``on_bad_records`` policy and the dead-letter files.

``on_bad_records`` is one of

* ``"error"`` (the default): raise :class:`~millstream.errors.BadRecordError`;
* ``"skip"``: drop the record and count it;
* a dead-letter directory, written so that it cannot be mistaken for a word: a string
  containing ``/`` (``"./bad"``, ``"/data/bad"``, ``"s3://bucket/bad/"``), an
  ``os.PathLike``, or :func:`dead_letter` (``ms.dead_letter("bad")``) for any location.

Anything else (``"ignore"``, ``"drop"``, ``"bad"``) is a :class:`PlanError` that lists the
allowed forms. Each dead letter is one JSON line ``{"path", "line", "offset", "reason",
"record"}``.

* In a batch job each task attempt writes ``<dir>/bad-s{stage}-p{partition}-a{attempt}.jsonl``
  (:class:`DeadLetterFile`).
* In a streaming job a source reader stages the dead letters of each epoch under
  ``<dir>/_staging/`` (:class:`StagedDeadLetters`) and hands a :class:`DeadLetterCommit`
  to the checkpoint with its position; the coordinator commits it, moving the file to
  ``<dir>/bad-s{stage}-p{partition}-e{epoch}-{id}.jsonl``, once the checkpoint of that
  epoch is complete (again after a restore: the commit is idempotent). Dead letters of an
  epoch that never completed stay invisible and are written again by the run that
  replays it, so each bad record is committed exactly once. A dead-letter directory
  belongs to one streaming job at a time, as a file sink's directory does.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

from millstream.core.context import TaskContext
from millstream.errors import PlanError, StorageError
from millstream.io import fs as msfs

#: The words ``on_bad_records`` accepts (anything else must be a dead-letter location).
POLICY_WORDS = ("error", "skip")
_MEANS_SKIP = {"ignore", "drop", "discard", "dropmalformed", "drop_malformed", "skip_bad",
               "skipped", "skip_bad_records", "permissive"}
_MEANS_ERROR = {"raise", "fail", "failfast", "fail_fast", "strict", "stop", "errors"}


class DeadLetter:
    """A dead-letter location for ``on_bad_records`` (see :func:`dead_letter`)."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None) -> None:
        if not isinstance(uri, str) or not uri:
            raise PlanError(f"dead_letter needs a directory path or URI, got {uri!r}")
        if "://" not in uri and not os.path.isabs(uri):
            uri = os.path.abspath(uri)  # the driver's directory, not a worker's
        self.uri = uri
        self.storage_options = dict(storage_options or {})

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DeadLetter) and (self.uri, self.storage_options) == (
            other.uri, other.storage_options)

    def __hash__(self) -> int:
        return hash(self.uri)

    def __repr__(self) -> str:
        return f"dead_letter({self.uri!r})"


def dead_letter(uri: str | os.PathLike[str], **storage_options: Any) -> DeadLetter:
    """``on_bad_records=ms.dead_letter("bad")``: write each malformed record, with the
    reason, to JSON-lines files in directory ``uri`` (any path or URI)."""
    return DeadLetter(os.fspath(uri), storage_options)


#: What ``check_policy`` returns: "error", "skip" or a dead-letter location.
Policy = Any


def check_policy(on_bad_records: Any) -> Policy:
    """``on_bad_records`` as "error", "skip" or a :class:`DeadLetter`; a PlanError listing
    the allowed forms for anything else."""
    value = on_bad_records
    if isinstance(value, DeadLetter):
        return value
    if isinstance(value, os.PathLike):
        return DeadLetter(os.fspath(value))
    if isinstance(value, str):
        if value in POLICY_WORDS:
            return value
        if "/" in value or "\\" in value:
            return DeadLetter(value)
    hint = ""
    if isinstance(value, str) and value:
        word = value.strip().lower().replace("-", "_")
        if word in POLICY_WORDS:
            hint = f' (write it in lower case: "{word}")'
        elif word in _MEANS_SKIP:
            hint = ' (to drop malformed records and count them, pass "skip")'
        elif word in _MEANS_ERROR:
            hint = ' (raising is the default: pass "error" or leave it out)'
        else:
            hint = (f' (for a dead-letter directory named {value!r}, pass "./{value}" or '
                    f'ms.dead_letter({value!r}))')
    raise PlanError(
        f'on_bad_records must be "error" (raise, the default), "skip" (drop and count) or '
        f'a dead-letter directory: a path or URI containing "/" ("./bad-records", '
        f'"s3://bucket/bad/"), a pathlib.Path, or ms.dead_letter("dir"); got '
        f'{on_bad_records!r}{hint}')


def dead_letter_json(obj: dict[str, Any]) -> str:
    """One dead letter as a JSON line."""
    return json.dumps(obj, ensure_ascii=False) + "\n"


class DeadLetterFile:
    """The dead letters of one batch task attempt: ``bad-s{stage}-p{partition}-a{attempt}.jsonl``
    (written locally, uploaded at ``close`` to an object store)."""

    def __init__(self, target: DeadLetter, ctx: TaskContext,
                 storage_options: dict[str, Any] | None = None) -> None:
        self.target = target
        self.ctx = ctx
        self.storage_options = {**(storage_options or {}), **target.storage_options}
        self._file: Any = None
        self._local_tmp: str | None = None
        self._dest: tuple[Any, str] | None = None

    def _open(self) -> None:
        fs, base = msfs.resolve(self.target.uri, **self.storage_options)
        ctx = self.ctx
        path = msfs.join(base, f"bad-s{ctx.stage_id}-p{ctx.partition}-a{ctx.attempt}.jsonl")
        self._dest = (fs, path)
        if msfs.is_local(fs):
            os.makedirs(base, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115
        else:
            self._local_tmp = ctx.scratch_path("deadletter", ".jsonl")
            self._file = open(self._local_tmp, "w", encoding="utf-8")  # noqa: SIM115

    def write(self, obj: dict[str, Any]) -> None:
        """Append one dead letter."""
        if self._file is None:
            self._open()
        self._file.write(dead_letter_json(obj))

    def close(self) -> None:
        """Flush the file (uploading it to an object store)."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        if self._local_tmp is not None and self._dest is not None:
            fs, path = self._dest
            try:
                msfs.upload_file(self._local_tmp, fs, path)
            finally:
                os.unlink(self._local_tmp)
                self._local_tmp = None


class DeadLetterCommit:
    """The handle of one epoch's staged dead letters: ``commit()`` moves the staged file
    to its final name (idempotent: a second commit after a restore finds it moved)."""

    def __init__(self, uri: str, storage_options: dict[str, Any], staged: str,
                 final: str) -> None:
        self.uri = uri
        self.storage_options = storage_options
        self.staged = staged
        self.final = final

    def commit(self) -> None:
        """Make the epoch's dead letters visible."""
        fs, _ = msfs.resolve(self.uri, **self.storage_options)
        if msfs.exists(fs, self.staged):
            msfs.move(fs, self.staged, self.final)
        elif not msfs.exists(fs, self.final):
            raise StorageError(f"committing dead letters: the staged file "
                               f"{msfs.describe_path(fs, self.staged)} is missing and "
                               f"{msfs.describe_path(fs, self.final)} does not exist")

    def __repr__(self) -> str:
        return f"DeadLetterCommit({self.final!r})"


class StagedDeadLetters:
    """The dead letters of one streaming source reader, staged per epoch (see module doc).

    ``count`` is the number of dead letters reported since the last :meth:`reset`; a
    reader whose position is "rows delivered" keeps it in its position, and after a
    restore passes it as ``skip``: the first ``skip`` records reported again (they
    belong to committed epochs) are dropped.
    """

    def __init__(self, target: DeadLetter, ctx: TaskContext,
                 storage_options: dict[str, Any] | None = None, *, skip: int = 0) -> None:
        self.target = target
        self.ctx = ctx
        self.storage_options = {**(storage_options or {}), **target.storage_options}
        self.fs, self.base = msfs.resolve(target.uri, **self.storage_options)
        self.prefix = f"s{ctx.stage_id}-p{ctx.partition}"
        self.id = uuid.uuid4().hex[:8]
        self.count = 0
        self.skip = int(skip)
        self._epoch: int | None = None
        self._cleaned = False
        self._file: Any = None
        self._local_tmp: str | None = None
        self._staged: str | None = None

    @property
    def staging_dir(self) -> str:
        """Where staged files live (hidden from readers of the directory)."""
        return msfs.join(self.base, "_staging")

    def reset(self, skip: int = 0) -> None:
        """Start counting again (a new file), dropping the first ``skip`` reports."""
        self.count = 0
        self.skip = int(skip)

    def begin(self, epoch: int) -> None:
        """Epoch ``epoch`` starts. The first call removes what earlier runs of this reader
        staged and never committed (the restore committed everything a checkpoint holds)."""
        if not self._cleaned:
            self._cleaned = True
            try:
                leftovers = [e.path for e in msfs.list_dir(self.fs, self.staging_dir)
                             if e.base_name.startswith(self.prefix + "-")]
            except (OSError, StorageError):
                leftovers = []
            for path in leftovers:
                msfs.delete_file(self.fs, path)
        self._epoch = epoch

    def write(self, obj: dict[str, Any]) -> None:
        """Stage one dead letter in the current epoch (unless it is one to skip)."""
        self.count += 1
        if self.count <= self.skip:
            return
        if self._file is None:
            self._open()
        self._file.write(dead_letter_json(obj))

    def _open(self) -> None:
        epoch = self._epoch if self._epoch is not None else 0
        self._staged = msfs.join(self.staging_dir,
                                 f"{self.prefix}-e{epoch:010d}-{self.id}.jsonl")
        if msfs.is_local(self.fs):
            os.makedirs(self.staging_dir, exist_ok=True)
            self._file = open(self._staged, "w", encoding="utf-8")  # noqa: SIM115
        else:
            self._local_tmp = self.ctx.scratch_path("deadletter", ".jsonl")
            self._file = open(self._local_tmp, "w", encoding="utf-8")  # noqa: SIM115

    def _close_file(self) -> None:
        if self._file is None:
            return
        self._file.close()
        self._file = None
        if self._local_tmp is not None:
            try:
                msfs.upload_file(self._local_tmp, self.fs, self._staged)
            finally:
                os.unlink(self._local_tmp)
                self._local_tmp = None

    def pre_commit(self, epoch: int) -> DeadLetterCommit | None:
        """Make this epoch's dead letters durable (still invisible); None when there were none."""
        if self._file is None:
            return None
        self._close_file()
        staged, self._staged = self._staged, None
        final = msfs.join(self.base, f"bad-{self.prefix}-e{epoch:010d}-{self.id}.jsonl")
        return DeadLetterCommit(self.target.uri, self.storage_options, staged, final)

    def close(self) -> None:
        """Close the current file without committing it (the next run writes it again)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._local_tmp is not None:
            os.unlink(self._local_tmp)
            self._local_tmp = None
