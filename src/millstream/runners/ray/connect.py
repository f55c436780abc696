"""Connecting to Ray: the shared installation hint, the workers' runtime environment, the
dashboard's address, and ``connect`` (join a cluster or start a local Ray)."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from millstream.errors import RunnerError

INSTALL_HINT = "the Ray runner needs Ray: pip install 'millstream[ray]'"

#: Driver environment variables (by prefix) that every task attempt sees on its worker, as
#: local workers inherit the driver's environment: storage credentials and endpoints, and
#: Millstream's own switches (fault injection in tests).
FORWARD_ENV_PREFIXES: tuple[str, ...] = ("MILLSTREAM_", "AWS_", "GOOGLE_", "AZURE_")

# Ray returns task results smaller than this to the owner (the driver) inline instead of
# keeping them in the producing node's object store (``max_direct_call_object_size``).
_INLINE_LIMIT = 100 * 1024

_logger = logging.getLogger(__name__)


def import_ray() -> Any:
    """The ``ray`` module, or a RunnerError saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise RunnerError(INSTALL_HINT) from exc
    return ray


# ------------------------------------------------------------------ connecting
def worker_runtime_env(runtime_env: dict[str, Any] | None = None) -> dict[str, Any]:
    """A runtime_env whose PYTHONPATH holds the driver's own code directories.

    Functions of importable modules travel by reference (as with the local runner's
    cloudpickle), so workers must find the same modules: the driver's ``sys.path`` entries
    outside the Python installation are put first on the workers' path (they exist there
    when the code is on a shared path or the cluster is this machine).
    """
    env = dict(runtime_env or {})
    env_vars = dict(env.get("env_vars") or {})
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    own: list[str] = []
    for entry in sys.path:
        if not entry or not os.path.isdir(entry):
            continue
        real = os.path.realpath(entry)
        if any(real == p or real.startswith(p + os.sep) for p in prefixes):
            continue
        if "site-packages" in real or "dist-packages" in real or real in own:
            continue
        own.append(real)
    if own:
        rest = env_vars.get("PYTHONPATH") or "${PYTHONPATH}"
        env_vars["PYTHONPATH"] = os.pathsep.join([*own, rest])
        env["env_vars"] = env_vars
    return env


_announced: set[str] = set()


def dashboard_url() -> str | None:
    """The Ray dashboard URL of the connected cluster, when it runs one."""
    ray = import_ray()
    if not ray.is_initialized():
        return None
    try:
        url = ray._private.worker.get_dashboard_url()  # no public API for a joined cluster
    except Exception:  # noqa: BLE001
        url = None
    if not url:
        return None
    return url if "://" in url else f"http://{url}"


def _announce_dashboard(url: str | None) -> None:
    """Print the dashboard link on stderr, once per URL and process."""
    if url and url not in _announced:
        _announced.add(url)
        sys.stderr.write(f"millstream: Ray dashboard at {url}\n")
        sys.stderr.flush()


def connect(address: str | None = None, *, num_cpus: int | None = None,
            object_store_memory: int | None = None, runtime_env: dict[str, Any] | None = None,
            **init_options: Any) -> bool:
    """Connect this process to Ray (start a local Ray when ``address`` is None).

    Returns True when this call initialized Ray, False when Ray was already initialized
    (then the existing connection is used as it is).
    """
    ray = import_ray()
    if ray.is_initialized():
        return False
    options: dict[str, Any] = {"runtime_env": worker_runtime_env(runtime_env),
                               "logging_level": logging.WARNING,
                               # workers' output is shown here unless turned off (the tests do)
                               "log_to_driver": os.environ.get("MILLSTREAM_RAY_LOG_TO_DRIVER", "1") != "0"}
    if address is None:
        if num_cpus is not None:
            options["num_cpus"] = num_cpus
        if object_store_memory is not None:
            options["object_store_memory"] = object_store_memory
    else:
        _probe(address)
        options["address"] = address
    options.update(init_options)
    context = ray.init(**options)
    url = getattr(context, "dashboard_url", None)
    _announce_dashboard((url if "://" in url else f"http://{url}") if url else dashboard_url())
    return True


#: How long to wait for a cluster's address to answer before giving up (s).
PROBE_TIMEOUT_S = 10.0


def _probe(address: str) -> None:
    """Fail fast, with a clear error, when nothing listens at a cluster ``address``
    (``ray.init`` retries for minutes). "auto" and addresses without a port are Ray's to
    resolve."""
    import socket

    target = address.split("://", 1)[-1]
    host, sep, port = target.rpartition(":")
    if address == "auto" or not sep or not port.isdigit():
        return
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as exc:
        raise RunnerError(
            f"cannot reach a Ray cluster at {address!r}: {exc.strerror or exc}; start one "
            f"with `ray start --head` (its address is printed), give the head's "
            f"host:port, or use ms.init(runner='ray') without an address to start Ray on "
            f"this machine") from None


def _set_env(values: dict[str, str | None]) -> dict[str, str | None]:
    """Apply environment values (None removes); return what they replaced."""
    old = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    return old


def _forwarded_env() -> dict[str, str | None]:
    """The driver's variables every attempt sees (FORWARD_ENV_PREFIXES; fault injection)."""
    from millstream.runners.local import FAULT_ENV

    env: dict[str, str | None] = {k: v for k, v in os.environ.items()
                                  if k.startswith(FORWARD_ENV_PREFIXES)}
    env.setdefault(FAULT_ENV, None)
    return env


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
