"""Dask clusters for the pipeline: an embedded LocalCluster or an existing scheduler.

``surgery run`` uses a LocalCluster sized to the machine unless it is given a scheduler
address (``--scheduler`` or ``DASK_SCHEDULER_ADDRESS``). Tasks that want a GPU ask for the
``GPU`` resource only when some worker advertises it (``dask worker --resources GPU=1``),
so the same job runs on a CPU-only laptop and on GPU workers in Kubernetes.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

from dask.distributed import Client, LocalCluster

logger = logging.getLogger(__name__)

SCHEDULER_ENV = "DASK_SCHEDULER_ADDRESS"


@contextlib.contextmanager
def connect(scheduler: str | None = None, *, workers: int | None = None) -> Iterator[Client]:
    """Yield a client for ``scheduler``, ``$DASK_SCHEDULER_ADDRESS`` or a new LocalCluster.

    The LocalCluster has one single-threaded worker process per core (at most ``workers``),
    because each shard task is one stream of reads and writes and torch runs its own
    threads inside it.
    """
    address = scheduler or os.environ.get(SCHEDULER_ENV)
    # dask.distributed sets its loggers to INFO when imported; keep them to warnings
    # unless the caller asked for more.
    if not logging.getLogger("pipeline").isEnabledFor(logging.DEBUG):
        logging.getLogger("distributed").setLevel(logging.WARNING)
    if address:
        logger.info("connecting to Dask scheduler %s", address)
        try:
            client = Client(address, timeout="20s")
        except (OSError, TimeoutError) as e:
            raise ConnectionError(
                f"cannot reach the Dask scheduler at {address}: {e}. Check the address, or "
                f"unset {SCHEDULER_ENV} to run on a local cluster"
            ) from e
        try:
            yield client
        finally:
            client.close()
        return

    count = workers or max(1, min(os.cpu_count() or 1, 8))
    with LocalCluster(
        n_workers=count,
        threads_per_worker=1,
        processes=True,
        dashboard_address="127.0.0.1:0",
        host="127.0.0.1",
        silence_logs=logging.WARNING,
    ) as cluster, Client(cluster) as client:
        logger.info("started a LocalCluster with %d workers", count)
        yield client


def gpu_resources(client: Client) -> dict[str, float] | None:
    """Return ``{"GPU": 1}`` when any worker advertises a GPU resource, else None."""
    info = client.scheduler_info()
    for worker in info.get("workers", {}).values():
        if worker.get("resources", {}).get("GPU", 0) >= 1:
            return {"GPU": 1}
    return None


def dashboard_link(client: Client) -> str | None:
    try:
        return client.dashboard_link
    except Exception:  # noqa: BLE001 - the dashboard is optional (bokeh may be missing)
        return None
