"""Failures mid-run: worker processes killed in each phase, a killed client, and re-runs.

A run whose worker dies either finishes with the same shard bytes as an undisturbed run
or raises with nothing published. The Five policy here is widened to about 30 MB and
written in 1 MiB shards, so the shard phase has several tasks to interrupt.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from dask.distributed import Client, get_task_stream

from pipeline.execution.job import run_workflow
from pipeline.models.spec import ModelSpec
from pipeline.registry import Registry
from pipeline.registry.layout import version_sort_key
from pipeline.workflow import load_workflow
from tests.execution.helpers import (
    WORKERS, dump_workflow, folder_files, import_five, shard_digests, start_cli, started_workers, wait_for_started_workers,
)

FACTORY = "pipeline.examples.five:build"
BIG = {
    "size": "small", "unit_width": 256, "hero_width": 256, "global_width": 256,
    "trunk_width": 512, "lstm_width": 1024, "target_width": 64,
}  # fmt: skip
UNIT_FIELDS = ["x", "y", "z", "health", "max_health", "health_regen", "mana", "attack_damage", "armor", "is_enemy"]
MODEL = "five-big-units"


@pytest.fixture(scope="module")
def big(tmp_path_factory, session_client: Client, cluster):
    """A registry with the widened Five imported, its workflow, and the shards of an undisturbed run."""
    wait_for_started_workers(session_client, cluster, WORKERS)
    folder = tmp_path_factory.mktemp("five-big")
    registry = Registry(f"file://{folder}/registry")
    spec = ModelSpec(FACTORY, BIG)
    import_five(registry, folder, seed=21, spec=spec)
    data = {
        "version": 1,
        "name": "five-big-unit-fields",
        "source": {"registry": registry.url, "model": "five", "versions": ["latest"]},
        "old_spec": {"factory": FACTORY, "config": BIG},
        "new_spec": {"factory": FACTORY, "config": {**BIG, "unit_fields": UNIT_FIELDS}},
        "plan": {"seed": 0},
        "verify": {"probes": 32, "tolerance": 1.0e-6},
        "destination": {"registry": registry.url, "model": MODEL, "max_shard_bytes": 2**20, "tags": ["latest"]},
    }
    path = dump_workflow(folder / "big.yaml", data)
    reference = run_workflow(load_workflow(path), session_client).results[0]
    assert len(reference.shards) >= 4
    return registry, folder, path, reference.shards


def version_folders(folder: Path) -> list[str]:
    """Return the version folders of MODEL on disk, published or not, in version order."""
    model_folder = folder / "registry" / MODEL
    return sorted((p.name for p in model_folder.iterdir() if p.is_dir() and p.name != "refs"), key=version_sort_key)


def wait_until_idle(client: Client, timeout: float = 60) -> None:
    """Wait until no worker has a task assigned, so a dead client's last tasks have ended."""
    deadline = time.monotonic() + timeout
    while any(client.processing().values()):
        assert time.monotonic() < deadline, f"tasks still running after {timeout} s: {client.processing()}"
        time.sleep(0.1)


def check_outcome(big, run) -> str:
    """Run; on success compare the shards with the undisturbed run, on failure check nothing was published."""
    registry, folder, _, reference = big
    before = registry.versions(MODEL)
    try:
        result = run()
    except Exception:  # noqa: BLE001 - any failure is allowed, as long as nothing is published
        assert registry.versions(MODEL) == before
        assert version_folders(folder) == before, "a failed run left a claimed version behind"
        return "raised"
    item = result.results[0]
    assert item.shards == reference
    published = registry.get(MODEL, item.version)
    assert shard_digests(published) == reference
    assert published.verify().ok
    files = folder_files(folder / "registry" / MODEL / item.version)
    assert files == sorted([".claim", "manifest.json", "model.safetensors.index.json", *reference])
    assert version_folders(folder) == registry.versions(MODEL)
    return "published"


@pytest.mark.parametrize("phase", ["maps", "shards", "verify"])
def test_worker_killed_in_phase(phase, big, client, cluster):
    """Kill a worker that has a task of ``phase`` assigned as soon as the phase starts."""
    _, _, path, _ = big
    killed: list[tuple[str, list[str]]] = []

    def progress(current: str, futures: list) -> None:
        if current != phase:
            return
        keys = {future.key for future in futures}
        pids = started_workers(cluster)
        deadline = time.monotonic() + 5
        while not killed and time.monotonic() < deadline:
            for address, assigned in client.processing().items():
                hit = sorted(keys & set(assigned))
                if hit and address in pids:
                    os.kill(pids[address], signal.SIGKILL)
                    killed.append((address, hit))
                    break
            time.sleep(0.002)

    with get_task_stream(client) as stream:
        outcome = check_outcome(big, lambda: run_workflow(load_workflow(path), client, progress=progress))

    assert killed, f"no worker had a {phase} task assigned when the phase started"
    # One dead worker out of two must not fail the run: Dask reruns its tasks elsewhere.
    assert outcome == "published"
    if phase == "verify":
        shard_runs = [task["key"] for task in stream.data if str(task["key"]).startswith("shard-")]
        assert len(shard_runs) == len(set(shard_runs)), f"shard tasks ran again after the verify worker died: {sorted(shard_runs)}"


@pytest.mark.parametrize("delay", [0.2, 0.7, 1.4])
def test_worker_killed_after_delay(delay, big, client, cluster):
    _, _, path, _ = big
    pids = sorted(started_workers(cluster).values())
    victim = random.Random(delay).choice(pids)
    done = threading.Event()

    def kill_later() -> None:
        if not done.wait(delay):
            os.kill(victim, signal.SIGKILL)

    killer = threading.Thread(target=kill_later)
    killer.start()
    try:
        outcome = check_outcome(big, lambda: run_workflow(load_workflow(path), client))
    finally:
        done.set()
        killer.join()

    assert outcome == "published"


def test_rerun_publishes_identical_shards(big, client):
    registry, _, path, reference = big
    first = run_workflow(load_workflow(path), client).results[0]
    second = run_workflow(load_workflow(path), client).results[0]

    assert int(second.version) == int(first.version) + 1
    assert first.shards == reference
    assert second.shards == reference
    assert shard_digests(registry.get(MODEL, second.version)) == reference


def test_killed_client_leaves_claim_for_gc(big, client, scheduler_address):
    registry, folder, path, reference = big
    before = registry.versions(MODEL)
    process = start_cli("run", str(path), "--scheduler", scheduler_address)
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if line.startswith("[shards]"):
                break
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
        stderr = process.stderr.read()
        process.stdout.close()
        process.stderr.close()
    assert any(line.startswith("[shards]") for line in lines), "".join(lines) + stderr
    wait_until_idle(client)

    assert registry.versions(MODEL) == before
    (dead,) = sorted(set(version_folders(folder)) - set(before))
    assert ".claim" in folder_files(folder / "registry" / MODEL / dead)
    preview = registry.gc(MODEL, grace=timedelta(0), dry_run=True)
    assert [entry.url for entry in preview.removed] == [registry.version_url(MODEL, dead)]

    rerun = run_workflow(load_workflow(path), client).results[0]
    assert rerun.shards == reference
    assert int(rerun.version) == int(dead) + 1

    report = registry.gc(MODEL, grace=timedelta(0))
    assert [entry.url for entry in report.removed] == [registry.version_url(MODEL, dead)]
    assert version_folders(folder) == registry.versions(MODEL)
