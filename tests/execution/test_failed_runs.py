"""Runs that fail after claiming a version: the claim and every file under it are removed."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from pipeline.execution.job import RunError, run_workflow
from pipeline.registry import Registry
from pipeline.workflow import load_workflow
from tests.execution.helpers import CLI_TIMEOUT, import_five, start_cli, started_workers, write_workflow

MODEL = "five-wide-lstm"
# Dask's default distributed.scheduler.allowed-failures: a task whose workers died this
# many times is retried once more, and the next death raises KilledWorker.
ALLOWED_FAILURES = 3


def model_objects(registry: Registry, model: str) -> list[str]:
    return sorted(stored.path for stored in registry.store.walk(registry.layout.model(model)))


def test_failed_verification_publishes_nothing(client, tmp_path: Path):
    registry = Registry(f"file://{tmp_path}/registry")
    import_five(registry, tmp_path, seed=51)
    workflow = load_workflow(
        write_workflow(tmp_path / "wide.yaml", MODEL, registry.url, verify={"probes": 64, "tolerance": 1e-12})
    )

    with pytest.raises(RunError) as caught:
        run_workflow(workflow, client)

    message = str(caught.value)
    assert "verification failed; nothing was published" in message
    assert "five@1" in message
    assert "tolerance 1e-12" in message
    assert registry.versions(MODEL) == []
    assert model_objects(registry, MODEL) == []


def test_killed_worker_error_aborts_cli_run(client, cluster, scheduler_address, tmp_path: Path):
    """Kill every worker that picks up the verify task until Dask gives up on it."""
    registry = Registry(f"file://{tmp_path}/registry")
    import_five(registry, tmp_path, seed=52)
    path = write_workflow(tmp_path / "wide.yaml", MODEL, registry.url)
    process = start_cli("run", str(path), "--scheduler", scheduler_address, "--json")
    killed: set[int] = set()
    deadline = time.monotonic() + CLI_TIMEOUT
    try:
        while process.poll() is None and len(killed) <= ALLOWED_FAILURES:
            assert time.monotonic() < deadline, "the run did not finish"
            started = started_workers(cluster)
            for address, keys in client.processing().items():
                pid = started.get(address)
                if pid is not None and pid not in killed and any(str(k).startswith("verify-") for k in keys):
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
            time.sleep(0.005)
        stdout, stderr = process.communicate(timeout=CLI_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()

    assert len(killed) > ALLOWED_FAILURES
    assert process.returncode == 1, stderr
    assert stdout == ""
    assert stderr.startswith("error: ") or "\nerror: " in stderr
    assert "verify-" in stderr
    assert "Traceback" not in stderr
    assert registry.versions(MODEL) == []
    assert model_objects(registry, MODEL) == []
