"""``surgery schedule``: migrate the source versions that a destination has not migrated yet."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from pipeline.execution.schedule import pending_versions, schedule
from pipeline.registry import Registry
from pipeline.workflow import load_workflow
from tests.execution.helpers import CLI_TIMEOUT, import_five, run_cli, start_cli, write_workflow

MODEL = "five-unit-fields"


def migrated_parents(registry: Registry) -> dict[str, list[str]]:
    """Map each destination version to the source versions its manifest names as parents."""
    return {
        version: [parent["version"] for parent in registry.manifest(MODEL, version).parents]
        for version in registry.versions(MODEL)
    }


def unpublished_folders(registry: Registry) -> list[str]:
    """Return version folders of MODEL that hold objects but no manifest (claims, leftovers)."""
    folders = set()
    model_path = registry.layout.model(MODEL)
    for stored in registry.store.walk(model_path):
        folder = stored.path[len(model_path) + 1 :].split("/", 1)[0]
        if folder != "refs":
            folders.add(folder)
    return sorted(folders - set(registry.versions(MODEL)))


@pytest.fixture
def s3_setup(s3_bucket, s3_options, tmp_path: Path):
    """An S3 registry with versions 1 and 2 of five and a folder with one scheduled workflow."""
    registry = Registry(f"s3://{s3_bucket}/{uuid.uuid4().hex}/registry", s3_options)
    for seed in (31, 32):
        import_five(registry, tmp_path, seed=seed)
    folder = tmp_path / "workflows"
    write_workflow(folder / "unit-fields.yaml", MODEL, registry.url, storage_options=s3_options, source={"versions": ["*"]})
    return registry, folder


def test_schedule_on_s3_migrates_pending_once(s3_setup, client, scheduler_address, tmp_path: Path):
    registry, folder = s3_setup

    outcomes = schedule(folder, client)

    assert [(o.workflow, o.pending, o.error) for o in outcomes] == [(MODEL, ["1", "2"], None)]
    assert [item.version for item in outcomes[0].result.results] == ["1", "2"]
    assert migrated_parents(registry) == {"1": ["1"], "2": ["2"]}

    again = run_cli("schedule", "--workflows", str(folder), "--scheduler", scheduler_address)
    assert again.returncode == 0, again.stderr
    assert f"{MODEL}: pending []; nothing to migrate" in again.stdout
    assert migrated_parents(registry) == {"1": ["1"], "2": ["2"]}

    for seed in (33, 34):
        import_five(registry, tmp_path, seed=seed)
    processes = [start_cli("schedule", "--workflows", str(folder), "--scheduler", scheduler_address, "--json") for _ in range(2)]
    outputs = [process.communicate(timeout=CLI_TIMEOUT) for process in processes]

    assert [process.returncode for process in processes] == [0, 0], outputs
    reports = [json.loads(stdout)[0] for stdout, _ in outputs]
    published = sorted(item["version"] for report in reports for item in report["published"])
    assert published == ["3", "4"]
    skipped = sorted(version for report in reports for version in report["skipped"])
    assert set(skipped) <= {"3", "4"}
    assert all(report["error"] is None for report in reports)
    assert migrated_parents(registry) == {"1": ["1"], "2": ["2"], "3": ["3"], "4": ["4"]}
    assert unpublished_folders(registry) == []
    for version in registry.versions(MODEL):
        assert registry.get(MODEL, version).verify().ok


def test_schedule_reports_broken_workflow(s3_setup, scheduler_address):
    registry, folder = s3_setup
    (folder / "broken.yaml").write_text("version: 1\nname: broken\nsource: {}\n")

    completed = run_cli("schedule", "--workflows", str(folder), "--scheduler", scheduler_address, "--json")

    assert completed.returncode == 1, completed.stderr
    reports = {Path(r["workflow"]).name: r for r in json.loads(completed.stdout)}
    assert set(reports) == {"broken.yaml", MODEL}
    assert "destination: missing" in reports["broken.yaml"]["error"]
    assert reports[MODEL]["error"] is None
    assert [item["version"] for item in reports[MODEL]["published"]] == ["1", "2"]
    assert migrated_parents(registry) == {"1": ["1"], "2": ["2"]}


def test_schedule_starts_from_named_versions(client, tmp_path: Path):
    registry = Registry(f"file://{tmp_path}/registry")
    for seed in (41, 42, 43):
        import_five(registry, tmp_path, seed=seed)
    folder = tmp_path / "workflows"
    path = write_workflow(folder / "unit-fields.yaml", MODEL, registry.url, source={"versions": ["2"]})
    assert pending_versions(load_workflow(path)) == ["2"]

    first = schedule(folder, client)
    assert [item.version for item in first[0].result.results] == ["2"]
    assert pending_versions(load_workflow(path)) == ["3"]

    second = schedule(folder, client)
    assert [item.version for item in second[0].result.results] == ["3"]
    assert migrated_parents(registry) == {"2": ["2"], "3": ["3"]}
    assert pending_versions(load_workflow(path)) == []
