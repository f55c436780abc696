"""The Ray runner: the same batch pipelines and streaming jobs on a Ray cluster.

Ray is the distributed engine; Millstream brings no cluster manager of its own. Each task
attempt is one Ray task (``max_retries=0``: retries, attempt numbers and error messages are
ours, exactly as on the local runner). Task outputs live in the Ray object store:

- a shuffle map task writes its indexed shuffle file (the local runner's format) and
  returns it as a second, separate object; the driver only receives the small
  :class:`TaskResult` with the partition index, and reducers ``ray.get`` the map outputs
  by reference and read their own slice (zero-copy from the object store);
- materialized blocks (collect, cache, broadcast) are objects too, so ``cache()`` keeps
  its partitions in the object store across actions for as long as the session holds
  their handles.

Data locality, object transfer and spilling of the object store are Ray's. A lost object
(its node died) is reported by the reader as :class:`FetchFailedError`, and the scheduler
recomputes the map tasks whose outputs :meth:`is_lost` says are gone, as on the local
runner. Sources are planned on the driver as splits (paths and byte ranges); the workers
read them from shared storage themselves.
"""

from millstream.runners.ray.connect import INSTALL_HINT, connect, dashboard_url, import_ray
from millstream.runners.ray.objects import RayBlockRef, RayMapOutput
from millstream.runners.ray.runner import RayRunner
from millstream.runners.ray.stream_hosts import RayStreamHosts

__all__ = ["INSTALL_HINT", "RayBlockRef", "RayMapOutput", "RayRunner", "RayStreamHosts",
           "connect", "dashboard_url", "import_ray"]
