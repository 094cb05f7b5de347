"""Verify tasks go to a worker that advertises a GPU resource; a scheduler and workers as subprocesses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch
from dask.distributed import Client, get_task_stream

from pipeline.execution.cluster import gpu_resources
from pipeline.execution.job import run_workflow
from pipeline.registry import Registry
from pipeline.workflow import load_workflow
from tests.execution.helpers import import_five, write_workflow

DASK = str(Path(sys.executable).with_name("dask"))
START_TIMEOUT = 60
STOP_TIMEOUT = 20


@pytest.fixture
def gpu_cluster(tmp_path: Path) -> Iterator[Client]:
    """``dask scheduler`` and two ``dask worker`` processes; the worker named gpu advertises GPU=1."""
    scheduler_file = tmp_path / "scheduler.json"
    common = ["--no-dashboard", "--host", "127.0.0.1"]
    scheduler = [DASK, "scheduler", "--port", "0", "--scheduler-file", str(scheduler_file), *common]
    processes = [subprocess.Popen(scheduler, stderr=subprocess.DEVNULL)]
    try:
        worker = [DASK, "worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1", "--no-nanny", *common]
        processes.append(subprocess.Popen([*worker, "--name", "gpu", "--resources", "GPU=1"], stderr=subprocess.DEVNULL))
        processes.append(subprocess.Popen([*worker, "--name", "cpu"], stderr=subprocess.DEVNULL))
        with Client(scheduler_file=str(scheduler_file), timeout=f"{START_TIMEOUT}s") as client:
            client.wait_for_workers(2, timeout=START_TIMEOUT)
            yield client
            # Closes the workers, then the scheduler, so that each process exits by itself.
            client.shutdown()
    finally:
        for process in reversed(processes):
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_verify_runs_on_gpu_worker(gpu_cluster: Client, tmp_path: Path):
    registry = Registry(f"file://{tmp_path}/registry")
    for seed in (71, 72, 73):
        import_five(registry, tmp_path, seed=seed)
    workflow = load_workflow(
        write_workflow(tmp_path / "wide.yaml", "five-wide-lstm", registry.url, source={"versions": ["*"]})
    )
    workers = {info["name"]: address for address, info in gpu_cluster.scheduler_info()["workers"].items()}
    assert gpu_resources(gpu_cluster) == {"GPU": 1}

    with get_task_stream(gpu_cluster) as stream:
        result = run_workflow(workflow, gpu_cluster)

    verify_workers = [task["worker"] for task in stream.data if str(task["key"]).startswith("verify-")]
    assert verify_workers == [workers["gpu"]] * 3
    shard_workers = {task["worker"] for task in stream.data if str(task["key"]).startswith("shard-")}
    assert shard_workers <= set(workers.values())
    for item in result.results:
        assert item.verification["passed"] is True
        assert item.verification["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
        assert registry.get("five-wide-lstm", item.version).verify().ok
