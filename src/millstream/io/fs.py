"""Storage by URI: one ``pyarrow.fs`` filesystem per scheme, file listing, retries.

Every path Millstream reads or writes goes through this module:

* :func:`resolve` turns a URI (local path, ``file://``, ``s3://``, ``gs://``, ``hdfs://``
  or any fsspec protocol) into a cached ``(pyarrow.fs.FileSystem, path)`` pair;
* :func:`expand` lists the data files a URI names (a file, a directory, a glob);
* :func:`with_retries` retries transient object-store errors with backoff;
* small helpers open streams, create, delete, move and test paths, all with retries
  on object stores.
"""

from __future__ import annotations

import os
import posixpath
import random
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from millstream.errors import PlanError, StorageError, StorageNotFoundError

T = TypeVar("T")

#: Characters that make a path a glob pattern.
GLOB_CHARS = frozenset("*?[")

#: Schemes served by pyarrow's own filesystems (everything else goes through fsspec).
_LOCAL_SCHEMES = ("", "file", "local")

_cache: dict[tuple[Any, ...], pafs.FileSystem] = {}
_cache_lock = threading.Lock()


@dataclass(frozen=True)
class FileEntry:
    """One data file found by :func:`expand`: its filesystem path, size and resolvable URI."""

    path: str
    size: int
    uri: str


# ----------------------------------------------------------------------------------------
# URIs and filesystems
# ----------------------------------------------------------------------------------------

def _split_uri(uri: str) -> tuple[str, str, str]:
    """(scheme, netloc, path) of a URI; a plain path has scheme ''."""
    if not isinstance(uri, str) or not uri:
        raise PlanError(f"expected a path or URI string, got {uri!r}")
    if "://" not in uri:
        return "", "", uri
    parts = urlsplit(uri, allow_fragments=False)
    path = parts.path
    if parts.query:  # '?' is a glob character, not a query string, in our URIs
        path = f"{path}?{parts.query}"
    return parts.scheme.lower(), parts.netloc, path


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


def _s3_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    opts = dict(options)
    kwargs: dict[str, Any] = {"allow_bucket_creation": True}
    endpoint = opts.pop("endpoint_url", None) or opts.pop("endpoint_override", None) or _env(
        "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
    scheme = opts.pop("scheme", None)
    if endpoint:
        if "://" in endpoint:
            ep = urlsplit(endpoint)
            scheme = scheme or ep.scheme
            endpoint = ep.netloc + ep.path.rstrip("/")
        kwargs["endpoint_override"] = endpoint
    if scheme:
        kwargs["scheme"] = scheme
    key = opts.pop("key", None) or opts.pop("access_key", None) or _env("AWS_ACCESS_KEY_ID")
    secret = opts.pop("secret", None) or opts.pop("secret_key", None) or _env(
        "AWS_SECRET_ACCESS_KEY")
    token = opts.pop("token", None) or opts.pop("session_token", None) or _env(
        "AWS_SESSION_TOKEN")
    if key and secret:
        kwargs["access_key"] = key
        kwargs["secret_key"] = secret
        if token:
            kwargs["session_token"] = token
    kwargs["region"] = opts.pop("region", None) or _env(
        "AWS_REGION", "AWS_DEFAULT_REGION") or "us-east-1"
    kwargs.update(opts)  # any other S3FileSystem keyword (request_timeout, anonymous, ...)
    return kwargs


def _make_filesystem(scheme: str, netloc: str, kwargs: dict[str, Any]) -> pafs.FileSystem:
    if scheme in _LOCAL_SCHEMES:
        return pafs.LocalFileSystem()
    if scheme in ("s3", "s3a"):
        return pafs.S3FileSystem(**kwargs)
    if scheme in ("gs", "gcs"):
        return pafs.GcsFileSystem(**kwargs)
    if scheme == "hdfs":
        host, _, port = netloc.partition(":")
        return pafs.HadoopFileSystem(host or "default", int(port) if port else 8020, **kwargs)
    try:
        import fsspec
        from pyarrow.fs import FSSpecHandler, PyFileSystem
    except ImportError as exc:
        raise PlanError(
            f"no filesystem for '{scheme}://' URIs: install fsspec and the fsspec "
            f"implementation of '{scheme}' (pip install 'millstream[fsspec]')") from exc
    try:
        fs = fsspec.filesystem(scheme, **kwargs)
    except (ImportError, ValueError) as exc:
        raise PlanError(
            f"fsspec cannot open '{scheme}://' URIs ({exc}); install the package that "
            f"implements the '{scheme}' protocol") from exc
    return PyFileSystem(FSSpecHandler(fs))


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    try:
        hash(value)
        return value
    except TypeError:
        return repr(value)


def _filesystem_for(scheme: str, netloc: str, options: dict[str, Any]) -> pafs.FileSystem:
    if scheme in _LOCAL_SCHEMES:
        kwargs: dict[str, Any] = {}
        cache_netloc = ""
    elif scheme in ("s3", "s3a"):
        kwargs, cache_netloc = _s3_kwargs(options), ""  # one client serves all buckets
    elif scheme in ("gs", "gcs"):
        kwargs, cache_netloc = dict(options), ""
    else:
        kwargs, cache_netloc = dict(options), netloc
    kind = "local" if scheme in _LOCAL_SCHEMES else scheme
    key = (os.getpid(), kind, cache_netloc, _freeze(kwargs))
    with _cache_lock:
        fs = _cache.get(key)
        if fs is None:
            fs = _make_filesystem(scheme, netloc, kwargs)
            _cache[key] = fs
        return fs


def _fs_path(scheme: str, netloc: str, path: str, fs: pafs.FileSystem, uri: str) -> str:
    if scheme in _LOCAL_SCHEMES:
        if scheme and netloc not in ("", "localhost"):
            raise PlanError(f"file:// URIs must name a local path, got {uri!r}")
        return os.path.abspath(os.path.expanduser(unquote(path) if scheme else path))
    if scheme in ("s3", "s3a", "gs", "gcs"):
        if not netloc:
            raise PlanError(f"{uri!r} names no bucket")
        return (netloc + "/" + path.lstrip("/")).rstrip("/") if path.strip("/") else netloc
    if scheme == "hdfs":
        return path or "/"
    handler = getattr(fs, "handler", None)
    inner = getattr(handler, "fs", None)
    if inner is not None:
        return inner._strip_protocol(uri)
    return netloc + path


def resolve(uri: str, **storage_options: Any) -> tuple[pafs.FileSystem, str]:
    """The (cached) filesystem serving ``uri`` and the path of ``uri`` on it."""
    scheme, netloc, path = _split_uri(uri)
    fs = _filesystem_for(scheme, netloc, storage_options)
    return fs, _fs_path(scheme, netloc, path, fs, uri)


def uri_for(uri: str, path: str) -> str:
    """The URI of ``path`` on the filesystem that ``uri`` resolved to (inverse of resolve)."""
    scheme, netloc, _ = _split_uri(uri)
    if scheme in _LOCAL_SCHEMES:
        return path
    if scheme == "hdfs":
        return f"hdfs://{netloc}{path}"
    if scheme in ("s3", "s3a", "gs", "gcs"):
        return f"{scheme}://{path}"
    return f"{scheme}://{path}"


def describe_path(fs: pafs.FileSystem, path: str) -> str:
    """A URI-like name of ``path`` on ``fs`` for messages."""
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    if isinstance(fs, pafs.S3FileSystem):
        return f"s3://{path}"
    if isinstance(fs, pafs.GcsFileSystem):
        return f"gs://{path}"
    if isinstance(fs, pafs.HadoopFileSystem):
        return f"hdfs://{path}"
    inner = getattr(getattr(fs, "handler", None), "fs", None)
    protocol = getattr(inner, "protocol", None)
    if isinstance(protocol, (tuple, list)):
        protocol = protocol[0]
    return f"{protocol}://{path}" if protocol else path


def is_local(fs: pafs.FileSystem) -> bool:
    """True for the local filesystem."""
    return isinstance(fs, pafs.LocalFileSystem)


def has_atomic_rename(fs: pafs.FileSystem) -> bool:
    """True where renaming a directory is one atomic operation (local disk, HDFS)."""
    return isinstance(fs, (pafs.LocalFileSystem, pafs.HadoopFileSystem))


def is_object_store(fs: pafs.FileSystem) -> bool:
    """True for remote stores whose calls may fail transiently and deserve retries."""
    return not is_local(fs)


# ----------------------------------------------------------------------------------------
# Retries
# ----------------------------------------------------------------------------------------

_TRANSIENT_TOKENS = (
    "timeout", "timedout", "connectionreset", "connectionrefused", "connectionaborted",
    "connectionclosed", "brokenpipe", "temporarilyunavailable", "temporaryfailure",
    "slowdown", "serviceunavailable", "internalerror", "internalfailure", "throttl",
    "toomanyrequests", "requesttimeout", "networkconnection", "badgateway",
    "gatewaytimeout", "resetbypeer", "curl", "unexpectedeof", "eofoccurred",
    "couldnotconnect", "unabletoconnect", "transient",
)
_HTTP_5XX = re.compile(r"(?:http|status|code|error)\D{0,12}5\d\d\b", re.IGNORECASE)
_NON_TRANSIENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
                  NotADirectoryError)


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` looks like a passing object-store or network failure."""
    if isinstance(exc, StorageError) or isinstance(exc, _NON_TRANSIENT):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if not isinstance(exc, OSError):
        return False
    message = str(exc)
    squashed = re.sub(r"[^a-z0-9]", "", message.lower())
    if any(token in squashed for token in _TRANSIENT_TOKENS):
        return True
    return bool(_HTTP_5XX.search(message))


#: Defaults of :func:`with_retries`; tests may lower the delay.
RETRY_ATTEMPTS = 5
RETRY_BASE_DELAY = 0.2
RETRY_MAX_DELAY = 10.0


def with_retries(fn: Callable[[], T], what: str, *, attempts: int | None = None,
                 base_delay: float | None = None, max_delay: float | None = None) -> T:
    """Call ``fn``; retry transient storage errors with exponential backoff and jitter.

    Non-transient errors propagate unchanged. After ``attempts`` transient failures a
    :class:`StorageError` naming ``what`` (the operation and URI) is raised.
    """
    attempts = RETRY_ATTEMPTS if attempts is None else max(1, attempts)
    base = RETRY_BASE_DELAY if base_delay is None else base_delay
    cap = RETRY_MAX_DELAY if max_delay is None else max_delay
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt == attempts:
                raise StorageError(
                    f"{what} failed after {attempts} attempts (transient storage errors); "
                    f"last error: {type(exc).__name__}: {exc}") from exc
            backoff(attempt, base, cap)
    raise AssertionError("unreachable")  # pragma: no cover


def backoff(attempt: int, base: float | None = None, cap: float | None = None) -> None:
    """Sleep before retry number ``attempt`` (1-based): exponential, capped, with jitter."""
    base = RETRY_BASE_DELAY if base is None else base
    cap = RETRY_MAX_DELAY if cap is None else cap
    time.sleep(min(cap, base * (2 ** (attempt - 1))) * random.uniform(0.5, 1.5))


def call(fs: pafs.FileSystem, fn: Callable[[], T], what: str) -> T:
    """Run a storage call, with retries on object stores and directly on local disk."""
    if is_local(fs):
        return fn()
    return with_retries(fn, what)


# ----------------------------------------------------------------------------------------
# Listing
# ----------------------------------------------------------------------------------------

def is_hidden(name: str) -> bool:
    """Spark's rule: names starting with '_' or '.' are metadata, not data."""
    return name.startswith(("_", "."))


def has_glob(path: str) -> bool:
    """True when ``path`` holds glob characters."""
    return any(c in GLOB_CHARS for c in path)


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """Compile a glob (``*``, ``?``, ``[..]``, ``**``) into a regex over '/'-separated paths."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            if pattern.startswith("**", i):
                i += 2
                if i < n and pattern[i] == "/":
                    out.append("(?:[^/]*/)*")
                    i += 1
                else:
                    out.append(".*")
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = pattern.find("]", i + 2 if pattern.startswith(("[!", "[^"), i) else i + 1)
            if j == -1:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1:j]
                negate = body[:1] in ("!", "^")
                if negate:
                    body = body[1:]
                body = body.replace("\\", "\\\\")
                out.append(f"[^/{body}]" if negate else f"[{body}]")
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out), re.DOTALL)


def _list_files(fs: pafs.FileSystem, base: str, what: str) -> list[pafs.FileInfo]:
    selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
    infos = call(fs, lambda: fs.get_file_info(selector), f"listing {what}")
    return infos


def _visible_files(fs: pafs.FileSystem, directory: str, what: str) -> list[pafs.FileInfo]:
    prefix = directory.rstrip("/") + "/"
    out = []
    for info in _list_files(fs, directory, what):
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(prefix):] if info.path.startswith(prefix) else info.base_name
        if any(is_hidden(part) for part in rel.split("/")):
            continue
        out.append(info)
    return out


def expand(uri: str, **storage_options: Any) -> list[FileEntry]:
    """The data files ``uri`` names: a file, a directory (recursive) or a glob pattern.

    Names starting with '_' or '.' below the given directory (``_SUCCESS``, staging
    directories, checksums) are skipped. The result is sorted by path. A URI that
    matches nothing raises :class:`StorageNotFoundError`; an existing directory without
    data files gives an empty list.
    """
    fs, path = resolve(uri, **storage_options)
    infos: dict[str, int] = {}
    if has_glob(path):
        parts = path.split("/")
        k = next(i for i, p in enumerate(parts) if has_glob(p))
        base = "/".join(parts[:k]) or ("/" if path.startswith("/") else "")
        if not base or base == "/" and not is_local(fs) and not isinstance(
                fs, pafs.HadoopFileSystem):
            raise PlanError(f"glob {uri!r}: a bucket name cannot hold wildcards")
        regex = glob_to_regex(path)
        pattern_parts = [p for p in parts[k:] if is_hidden(p)]
        base_prefix = base.rstrip("/") + "/"
        listed = _list_files(fs, base, uri)
        matched_dirs: set[str] = set()
        for info in listed:
            if not regex.fullmatch(info.path):
                continue
            rel_parts = info.path[len(base_prefix):].split("/")
            if any(is_hidden(p) and not any(_fnmatch_part(p, pat) for pat in pattern_parts)
                   for p in rel_parts):
                continue
            if info.type == pafs.FileType.File:
                infos[info.path] = info.size or 0
            elif info.type == pafs.FileType.Directory:
                matched_dirs.add(info.path.rstrip("/"))
        if matched_dirs:  # a matched directory contributes its visible files
            for info in listed:
                if info.type != pafs.FileType.File or info.path in infos:
                    continue
                parts_below = info.path[len(base_prefix):].split("/")
                for depth in range(1, len(parts_below)):
                    ancestor = base_prefix + "/".join(parts_below[:depth])
                    if ancestor in matched_dirs:
                        if not any(is_hidden(p) for p in parts_below[depth:]):
                            infos[info.path] = info.size or 0
                        break
        if not infos:
            raise StorageNotFoundError(f"no files match {uri!r}")
    else:
        info = call(fs, lambda: fs.get_file_info(path), f"looking up {uri}")
        if info.type == pafs.FileType.File:
            infos[info.path] = info.size or 0
        elif info.type == pafs.FileType.Directory:
            for f in _visible_files(fs, path, uri):
                infos[f.path] = f.size or 0
        else:
            raise StorageNotFoundError(f"no such file or directory: {uri!r}")
    return [FileEntry(p, infos[p], uri_for(uri, p)) for p in sorted(infos)]


def expand_all(uris: str | Iterable[str], **storage_options: Any) -> list[FileEntry]:
    """:func:`expand` over one URI or several, without duplicates, in the order given."""
    if isinstance(uris, str):
        return expand(uris, **storage_options)
    seen: set[str] = set()
    out: list[FileEntry] = []
    for uri in uris:
        for entry in expand(uri, **storage_options):
            if entry.uri not in seen:
                seen.add(entry.uri)
                out.append(entry)
    return out


def hive_base(uri: str | Iterable[str], **storage_options: Any) -> str | None:
    """The directory whose ``key=value`` subdirectories are hive partitions, if any.

    That is the directory a URI names, or the fixed part of a glob; None for files
    and for several URIs.
    """
    if not isinstance(uri, str):
        return None
    fs, path = resolve(uri, **storage_options)
    if has_glob(path):
        parts = path.split("/")
        k = next(i for i, p in enumerate(parts) if has_glob(p))
        return "/".join(parts[:k]) or None
    if is_dir(fs, path):
        return path.rstrip("/") or path
    return None


def hive_values(base: str, path: str) -> list[tuple[str, str | None]]:
    """The ``(key, value)`` pairs of the ``key=value`` directories between base and path."""
    prefix = base.rstrip("/") + "/"
    if not path.startswith(prefix):
        return []
    out: list[tuple[str, str | None]] = []
    for part in path[len(prefix):].split("/")[:-1]:
        key, eq, value = part.partition("=")
        if not eq or not key:
            continue
        out.append((unquote(key), None if value == "__HIVE_DEFAULT_PARTITION__"
                    else unquote(value)))
    return out


def _fnmatch_part(name: str, pattern: str) -> bool:
    return bool(glob_to_regex(pattern).fullmatch(name))


# ----------------------------------------------------------------------------------------
# Helpers with retries
# ----------------------------------------------------------------------------------------

def open_input_file(fs: pafs.FileSystem, path: str) -> pa.NativeFile:
    """Open ``path`` for random access."""
    return call(fs, lambda: fs.open_input_file(path), f"opening {describe_path(fs, path)}")


def open_input_stream(fs: pafs.FileSystem, path: str, compression: str | None = "detect"
                      ) -> pa.NativeFile:
    """Open ``path`` for sequential reading (decompressing by extension by default)."""
    return call(fs, lambda: fs.open_input_stream(path, compression=compression),
                f"opening {describe_path(fs, path)}")


def open_output_stream(fs: pafs.FileSystem, path: str) -> pa.NativeFile:
    """Open ``path`` for writing (replacing it); parents are created on local disk."""
    if is_local(fs):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return call(fs, lambda: fs.open_output_stream(path), f"creating {describe_path(fs, path)}")


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    """The whole content of a (small) file."""
    def _read() -> bytes:
        with fs.open_input_stream(path, compression=None) as f:
            return f.read()
    return call(fs, _read, f"reading {describe_path(fs, path)}")


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write a (small) file in one piece, retried as a whole on object stores."""
    def _write() -> None:
        with fs.open_output_stream(path) as f:
            f.write(data)
    if is_local(fs):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    call(fs, _write, f"writing {describe_path(fs, path)}")


def upload_file(local_path: str, fs: pafs.FileSystem, path: str,
                chunk_size: int = 8 << 20) -> None:
    """Copy a local file to ``path`` on ``fs`` (whole upload retried on transient errors)."""
    def _upload() -> None:
        with open(local_path, "rb") as src, fs.open_output_stream(path) as dst:
            while True:
                block = src.read(chunk_size)
                if not block:
                    break
                dst.write(block)
    call(fs, _upload, f"uploading {describe_path(fs, path)}")


def get_info(fs: pafs.FileSystem, path: str) -> pafs.FileInfo:
    """File info of ``path`` (type NotFound when it does not exist)."""
    return call(fs, lambda: fs.get_file_info(path), f"looking up {describe_path(fs, path)}")


def exists(fs: pafs.FileSystem, path: str) -> bool:
    """True when ``path`` is a file or a directory."""
    return get_info(fs, path).type != pafs.FileType.NotFound


def is_dir(fs: pafs.FileSystem, path: str) -> bool:
    """True when ``path`` is a directory (or a non-empty prefix on object stores)."""
    return get_info(fs, path).type == pafs.FileType.Directory


def list_dir(fs: pafs.FileSystem, path: str, recursive: bool = False) -> list[pafs.FileInfo]:
    """Entries under ``path`` (empty when it does not exist)."""
    selector = pafs.FileSelector(path, recursive=recursive, allow_not_found=True)
    return call(fs, lambda: fs.get_file_info(selector), f"listing {describe_path(fs, path)}")


def mkdirs(fs: pafs.FileSystem, path: str) -> None:
    """Create ``path`` and its parents (no-op on stores without directories)."""
    call(fs, lambda: fs.create_dir(path, recursive=True), f"creating {describe_path(fs, path)}")


def delete_dir(fs: pafs.FileSystem, path: str, missing_ok: bool = True) -> None:
    """Delete a directory and everything under it."""
    def _delete() -> None:
        try:
            fs.delete_dir(path)
        except FileNotFoundError:
            if not missing_ok:
                raise
    call(fs, _delete, f"deleting {describe_path(fs, path)}")


def delete_file(fs: pafs.FileSystem, path: str, missing_ok: bool = True) -> None:
    """Delete one file."""
    def _delete() -> None:
        try:
            fs.delete_file(path)
        except FileNotFoundError:
            if not missing_ok:
                raise
    call(fs, _delete, f"deleting {describe_path(fs, path)}")


def move(fs: pafs.FileSystem, src: str, dst: str) -> None:
    """Rename a file or directory; on object stores copy then delete, file by file."""
    what = f"moving {describe_path(fs, src)} to {describe_path(fs, dst)}"
    if has_atomic_rename(fs):
        parent = posixpath.dirname(dst.rstrip("/"))
        if parent:
            fs.create_dir(parent, recursive=True)
        fs.move(src, dst)
        return
    info = get_info(fs, src)
    if info.type == pafs.FileType.File:
        call(fs, lambda: fs.copy_file(src, dst), what)
        delete_file(fs, src)
        return
    if info.type == pafs.FileType.NotFound:
        raise StorageNotFoundError(f"{what}: source does not exist")
    prefix = src.rstrip("/") + "/"
    for entry in list_dir(fs, src, recursive=True):
        if entry.type == pafs.FileType.File:
            target = dst.rstrip("/") + "/" + entry.path[len(prefix):]
            call(fs, lambda e=entry, t=target: fs.copy_file(e.path, t), what)
    delete_dir(fs, src)


def join(base: str, *parts: str) -> str:
    """Join '/'-separated path parts (filesystem paths, not URIs with schemes)."""
    path = base.rstrip("/") if base != "/" else base
    for part in parts:
        part = part.strip("/")
        if part:
            path = f"{path}/{part}" if path not in ("", "/") else f"{path}{part}"
    return path


def parent_and_name(path: str) -> tuple[str, str]:
    """Split a filesystem path into its parent and its last component."""
    stripped = path.rstrip("/")
    parent, _, name = stripped.rpartition("/")
    if not parent and stripped.startswith("/"):
        parent = "/"
    return parent, name
