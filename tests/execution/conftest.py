"""Fixtures for the execution tests: one Dask cluster for the session and an S3 bucket on moto.

The cluster has two single-threaded worker processes behind nannies, so a test can kill
a worker with SIGKILL and the nanny starts a new one. It starts after the moto fixture
has replaced the AWS variables, so the workers inherit the dummy credentials.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

import dask
import pytest
from dask.distributed import Client, LocalCluster

from tests.execution.helpers import WORKERS, wait_for_started_workers
from tests.storage.conftest import s3_client, s3_endpoint, s3_options  # noqa: F401

BUCKET = "execution-tests"


@pytest.fixture(scope="session")
def cluster(s3_endpoint: str) -> Iterator[LocalCluster]:
    # LocalCluster closes the nanny of a worker name that has no registered worker a
    # lost-worker-timeout (15 s by default) after one of its workers was removed. A test
    # that kills a worker again while its restart is in flight can meet that check, and
    # the cluster then keeps one worker for the rest of the session.
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "1h"}), LocalCluster(
        n_workers=WORKERS,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        silence_logs=logging.ERROR,
    ) as local:
        yield local


@pytest.fixture(scope="session")
def session_client(cluster: LocalCluster) -> Iterator[Client]:
    with Client(cluster) as client:
        yield client


@pytest.fixture
def client(session_client: Client, cluster: LocalCluster) -> Iterator[Client]:
    """The session's client, with both workers started before and after the test."""
    wait_for_started_workers(session_client, cluster, WORKERS)
    yield session_client
    wait_for_started_workers(session_client, cluster, WORKERS)


@pytest.fixture(scope="session")
def scheduler_address(cluster: LocalCluster) -> str:
    """Address that ``surgery run --scheduler`` in a subprocess connects to."""
    return cluster.scheduler_address


@pytest.fixture(scope="session")
def s3_bucket(s3_client: Any) -> str:
    s3_client.create_bucket(Bucket=BUCKET)
    return BUCKET
