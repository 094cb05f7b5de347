"""Batch runs: one workflow migrates every published version of a model with one plan."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.execution.job import run_workflow
from pipeline.execution.sources import SourceError
from pipeline.registry import Registry
from pipeline.workflow import load_workflow
from tests.execution.helpers import import_five, write_workflow

SOURCES = 8


def test_batch_migrates_every_version(client, tmp_path: Path):
    registry = Registry(f"file://{tmp_path}/registry")
    sources = [import_five(registry, tmp_path, seed=100 + i)[0] for i in range(SOURCES)]
    assert registry.versions("five") == [str(i) for i in range(1, SOURCES + 1)]
    path = write_workflow(tmp_path / "batch.yaml", "five-unit-fields", registry.url, source={"versions": ["*"]})

    result = run_workflow(load_workflow(path), client)

    assert [item.source for item in result.results] == [f"five@{i}" for i in range(1, SOURCES + 1)]
    assert registry.versions("five-unit-fields") == [str(i) for i in range(1, SOURCES + 1)]
    parents = {}
    for item in result.results:
        published = registry.get("five-unit-fields", item.version)
        manifest = published.manifest
        assert len(manifest.parents) == 1
        parents[item.version] = manifest.parents[0]["version"]
        assert manifest.document["plan"]["sha256"] == result.plan_sha256
        assert manifest.document["verification"]["passed"] is True
        assert published.verify().ok
    assert sorted(parents.values(), key=int) == [s.version for s in sources]
    assert {item.version: item.source.split("@")[1] for item in result.results} == parents
    assert [item.parent for item in result.results] == [s.as_parent() for s in sources]
    digests = {tuple(sorted(item.shards.values())) for item in result.results}
    assert len(digests) == SOURCES, "sources trained with different seeds must give different shards"
    assert registry.resolve("five-unit-fields", "latest").version == str(SOURCES)


def test_batch_rejects_one_explicit_destination_version(client, tmp_path: Path):
    registry = Registry(f"file://{tmp_path}/registry")
    for seed in (1, 2):
        import_five(registry, tmp_path, seed=seed)
    path = write_workflow(
        tmp_path / "batch.yaml", "five-unit-fields", registry.url,
        source={"versions": ["*"]}, destination={"version": "7"},
    )

    with pytest.raises(SourceError) as caught:
        run_workflow(load_workflow(path), client)

    message = str(caught.value)
    assert "migrates 2 checkpoints" in message
    assert "'7'" in message
    assert "version: next" in message
    assert "five-unit-fields" not in registry.models()
