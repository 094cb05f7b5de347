"""The DaskCluster's scheduler and worker commands, run as rendered, pass their probes.

The test starts `dask scheduler` and `dask worker` with the arguments from the rendered
prod overlay, moved to free ports on 127.0.0.1, and checks the probe path on the probe
port and that the worker advertises the GPU resource that prod tasks ask for. It does not
need a GPU: Dask resources are labels that the scheduler matches, not devices.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from distributed import Client

from tests.deploy.conftest import find

STARTUP_TIMEOUT = 60


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def probe_port(container: dict, probe: str) -> int:
    port = container[probe]["httpGet"]["port"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    return ports.get(port, port)


def relocate(args: list[str], flag: str, value: str) -> list[str]:
    """Replace the value after ``flag``."""
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


def wait_healthy(url: str, process: subprocess.Popen, log: Path) -> str:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        assert process.poll() is None, f"{process.args} exited with {process.returncode}:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.read().decode()
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not respond within {STARTUP_TIMEOUT} s")


@pytest.fixture
def processes(tmp_path):
    """Start commands with their output in a log file; stop them all at teardown."""
    started: list[subprocess.Popen] = []

    def start(command: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"process-{len(started)}.log"
        with log.open("wb") as output:
            started.append(subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT))
        return started[-1], log

    yield start
    # Workers first, each stopped before the next: a worker that loses its scheduler
    # while closing waits 8 s before its nanny kills it.
    for process in reversed(started):
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def test_dask_pods_pass_probes(rendered, processes, tmp_path):
    cluster = find(rendered["prod"], "DaskCluster", "surgery-dask")
    (scheduler,) = cluster["spec"]["scheduler"]["spec"]["containers"]
    (worker,) = cluster["spec"]["worker"]["spec"]["containers"]
    dask = str(Path(sys.executable).parent / "dask")
    assert scheduler["command"] == worker["command"] == ["dask"]

    # The ports the manifest serves on must be the ones the probes and the Service use.
    scheduler_args = scheduler["args"]
    assert scheduler_args[scheduler_args.index("--dashboard-address") + 1] == f":{probe_port(scheduler, 'readinessProbe')}"
    assert worker["args"][worker["args"].index("--dashboard-address") + 1] == f":{probe_port(worker, 'livenessProbe')}"
    comm_port = {p["name"]: p["containerPort"] for p in scheduler["ports"]}["tcp-comm"]
    assert scheduler_args[scheduler_args.index("--port") + 1] == str(comm_port)

    env = dict(os.environ)
    scheduler_port, scheduler_http = free_port(), free_port()
    args = relocate(scheduler_args, "--port", str(scheduler_port))
    args = relocate(args, "--dashboard-address", f"127.0.0.1:{scheduler_http}")
    process, log = processes([dask, *args, "--host", "127.0.0.1"], env)
    path = scheduler["readinessProbe"]["httpGet"]["path"]
    assert wait_healthy(f"http://127.0.0.1:{scheduler_http}{path}", process, log) == "ok"

    worker_http = free_port()
    args = [arg.replace("$(DASK_WORKER_NAME)", "surgery-dask-default-worker-test") for arg in worker["args"]]
    args = relocate(args, "--dashboard-address", f"127.0.0.1:{worker_http}")
    args = relocate(args, "--local-directory", str(tmp_path / "scratch"))
    # The operator sets DASK_SCHEDULER_ADDRESS in worker containers; the args name no scheduler.
    worker_env = {**env, "DASK_SCHEDULER_ADDRESS": f"tcp://127.0.0.1:{scheduler_port}"}
    process, log = processes([dask, *args, "--host", "127.0.0.1"], worker_env)
    path = worker["livenessProbe"]["httpGet"]["path"]
    assert wait_healthy(f"http://127.0.0.1:{worker_http}{path}", process, log) == "ok"

    with Client(f"tcp://127.0.0.1:{scheduler_port}", timeout=STARTUP_TIMEOUT) as client:
        client.wait_for_workers(1, timeout=STARTUP_TIMEOUT)
        (info,) = client.scheduler_info()["workers"].values()
    assert info["name"] == "surgery-dask-default-worker-test"
    assert info["resources"] == {"GPU": 1}
    assert info["nthreads"] == 1
