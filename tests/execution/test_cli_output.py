"""What ``surgery run`` and ``surgery demo`` print: progress for people, pure JSON with --json."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.registry import Registry
from tests.execution.helpers import (
    FIVE_SPEC, WORKFLOWS, dump_workflow, example_workflow, import_five, run_cli, save_checkpoint, trained_five,
)

PHASES = ["[sources]", "[maps]", "[shards]", "[verify]", "[publish]"]


def test_run_prints_dashboard_and_phases(cluster, scheduler_address, tmp_path: Path):
    registry = Registry(f"file://{tmp_path}/registry")
    import_five(registry, tmp_path, seed=61)

    completed = run_cli(
        "run", str(WORKFLOWS / "five-wide-lstm.yaml"), "--scheduler", scheduler_address,
        env={"SURGERY_REGISTRY": registry.url},
    )

    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert lines[0] == f"Dask dashboard: {cluster.dashboard_link}"
    markers = [line for line in lines if line in PHASES]
    assert markers == PHASES
    assert completed.stdout.count("100% Completed") == 4
    assert any(line.startswith("parameter ") for line in lines)
    published = registry.resolve("five-wide-lstm", "latest")
    assert lines[-1].startswith(f"published {published.url} (version {published.version} from five@1); verification max relative error ")
    assert lines[-1].endswith(" on cpu")


def test_dry_run_json_is_only_json(scheduler_address, tmp_path: Path):
    registry = Registry(f"file://{tmp_path}/registry")
    import_five(registry, tmp_path, seed=62)

    completed = run_cli(
        "run", str(WORKFLOWS / "five-wide-lstm.yaml"), "--dry-run", "--json", "--scheduler", scheduler_address,
        env={"SURGERY_REGISTRY": registry.url},
    )

    assert completed.returncode == 0, completed.stderr
    summary = json.loads(completed.stdout)
    assert summary["dry_run"] is True
    assert summary["published"] == []
    assert list(summary["timings"]) == ["sources", "maps", "plan"]
    assert registry.models() == ["five"]


def test_demo_json_is_only_json(scheduler_address, tmp_path: Path):
    """The demo imports MiniLM into an empty registry; with --json that note goes to stderr."""
    module, _ = trained_five(seed=63)
    checkpoint = save_checkpoint(module, tmp_path / "five.safetensors")
    data = example_workflow("five-wide-lstm")
    data["source"] = {"checkpoints": [str(checkpoint)], "spec": str(FIVE_SPEC)}
    data["destination"]["registry"] = "${SURGERY_REGISTRY}"
    workflow = dump_workflow(tmp_path / "wide.yaml", data)
    folder = tmp_path / "demo-registry"

    completed = run_cli("demo", "--registry", str(folder), "--workflow", str(workflow), "--scheduler", scheduler_address, "--json")

    assert completed.returncode == 0, completed.stderr
    summary = json.loads(completed.stdout)
    registry = Registry(f"file://{folder}")
    assert f"imported all-MiniLM-L6-v2 as {registry.version_url('minilm', '1')}" in completed.stderr
    assert registry.versions("minilm") == ["1"]
    assert [item["url"] for item in summary["published"]] == [registry.version_url("five-wide-lstm", "1")]
