"""The runners: ``local`` (worker processes of this machine) and ``ray`` (a Ray cluster).

Importing this package registers both with :func:`millstream.runtime.runner.register_runner`;
each is imported only when a session first uses it.
"""

from __future__ import annotations

from typing import Any

from millstream.errors import RunnerError
from millstream.runtime.runner import Runner, register_runner


def _local(settings: Any) -> Runner:
    from millstream.runners.local import LocalRunner

    return LocalRunner(settings.resolved_parallelism())


def _ray(settings: Any) -> Runner:
    try:
        import ray  # noqa: F401
    except ImportError as exc:
        raise RunnerError("the Ray runner needs Ray: pip install 'millstream[ray]'") from exc
    from millstream.runners.ray import RayRunner

    return RayRunner(settings.parallelism, address=settings.address,
                     max_task_attempts=settings.max_task_attempts)


register_runner("local", _local)
# a Ray runner is keyed by its cluster only: a per-action parallelism must not restart a
# Ray it started (and lose the cached objects)
register_runner("ray", _ray, key=lambda s: s.address)
