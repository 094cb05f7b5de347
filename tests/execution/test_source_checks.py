"""Dry runs, plain checkpoint sources, and sources that must stop a run before it writes anything."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import save_file

from pipeline.execution.job import run_workflow
from pipeline.execution.sources import SourceError
from pipeline.plan import parse_options, plan_specs
from pipeline.registry import Registry
from pipeline.workflow import load_workflow
from tests.execution.helpers import (
    FIVE_SPEC, dump_workflow, example_workflow, folder_files, import_five, save_checkpoint, trained_five, write_workflow,
)


def plain_workflow(path: Path, checkpoint: Path, destination: str) -> Path:
    """Write five-wide-lstm with a plain safetensors file as its source."""
    data = example_workflow("five-wide-lstm")
    data["source"] = {"checkpoints": [str(checkpoint)], "spec": str(FIVE_SPEC)}
    data["destination"]["registry"] = destination
    return dump_workflow(path, data)


def test_dry_run_writes_nothing(client, tmp_path: Path):
    registry = Registry(f"file://{tmp_path}/registry")
    import_five(registry, tmp_path, seed=3)
    destination = tmp_path / "destination"
    path = write_workflow(
        tmp_path / "wide.yaml", "five-wide-lstm", registry.url, destination={"registry": f"file://{destination}"}
    )
    workflow = load_workflow(path)
    before = folder_files(tmp_path / "registry")

    result = run_workflow(workflow, client, dry_run=True)

    assert not destination.exists()
    assert folder_files(tmp_path / "registry") == before
    assert result.dry_run is True
    assert result.results == []
    expected = plan_specs(workflow.old_spec, workflow.new_spec, parse_options(workflow.plan))
    assert result.plan_sha256 == expected.sha256()
    assert "lstm.weight_hh_l0" in result.plan_table
    assert "elements transferred" in result.plan_table
    assert set(result.timings) == {"sources", "maps", "plan"}


def test_dry_run_names_missing_tensor(client, tmp_path: Path):
    module, _ = trained_five(seed=4)
    state = {name: t.contiguous() for name, t in module.state_dict().items()}
    del state["lstm.weight_hh_l0"]
    checkpoint = tmp_path / "incomplete.safetensors"
    save_file(state, str(checkpoint))
    destination = tmp_path / "destination"
    workflow = load_workflow(plain_workflow(tmp_path / "wide.yaml", checkpoint, f"file://{destination}"))

    with pytest.raises(SourceError) as caught:
        run_workflow(workflow, client, dry_run=True)

    message = str(caught.value)
    assert str(checkpoint) in message
    assert "lstm.weight_hh_l0: missing" in message
    assert not destination.exists()


def test_dry_run_names_wrong_shape(client, tmp_path: Path):
    module, _ = trained_five(seed=4)
    state = {name: t.contiguous() for name, t in module.state_dict().items()}
    state["heads.value.weight"] = state["heads.value.weight"][:, :16].contiguous()
    checkpoint = tmp_path / "narrow.safetensors"
    save_file(state, str(checkpoint))
    workflow = load_workflow(plain_workflow(tmp_path / "wide.yaml", checkpoint, f"file://{tmp_path}/destination"))

    with pytest.raises(SourceError, match=r"heads\.value\.weight: shape \[1, 16\], the plan expects \[1, 32\]"):
        run_workflow(workflow, client, dry_run=True)


def test_run_with_missing_tensor_writes_nothing(client, tmp_path: Path):
    module, _ = trained_five(seed=4)
    state = {name: t.contiguous() for name, t in module.state_dict().items()}
    del state["lstm.weight_hh_l0"]
    checkpoint = tmp_path / "incomplete.safetensors"
    save_file(state, str(checkpoint))
    destination = tmp_path / "destination"
    workflow = load_workflow(plain_workflow(tmp_path / "wide.yaml", checkpoint, f"file://{destination}"))

    with pytest.raises(SourceError, match=r"lstm\.weight_hh_l0: missing"):
        run_workflow(workflow, client)

    assert folder_files(destination) == []


def test_plain_checkpoint_source_publishes(client, tmp_path: Path):
    module, _ = trained_five(seed=5)
    checkpoint = save_checkpoint(module, tmp_path / "five.safetensors")
    destination = Registry(f"file://{tmp_path}/destination")
    workflow = load_workflow(plain_workflow(tmp_path / "wide.yaml", checkpoint, destination.url))

    result = run_workflow(workflow, client)

    item = result.results[0]
    assert item.source == f"file://{checkpoint}"
    published = destination.resolve("five-wide-lstm", "latest")
    assert published.version == item.version
    assert published.manifest.parents == []
    assert published.verify().ok
    assert item.verification["passed"] is True


def test_corrupt_source_shard_stops_run(client, tmp_path: Path):
    registry = Registry(f"file://{tmp_path}/registry")
    source, _ = import_five(registry, tmp_path, seed=6)
    (shard,) = source.manifest.shards
    shard_path = tmp_path / "registry" / "five" / source.version / shard
    data = bytearray(shard_path.read_bytes())
    data[-5] ^= 0x01
    shard_path.write_bytes(bytes(data))
    path = write_workflow(tmp_path / "wide.yaml", "five-wide-lstm", registry.url)

    with pytest.raises(SourceError) as caught:
        run_workflow(load_workflow(path), client)

    message = str(caught.value)
    assert "five@1" in message
    assert shard in message
    assert "sha256" in message
    assert folder_files(tmp_path / "registry" / "five-wide-lstm") == []
    assert registry.models() == ["five"]
