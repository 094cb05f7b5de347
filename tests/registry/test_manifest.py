"""The manifest schema and the checks on read: missing fields, wrong location, newer formats."""

from __future__ import annotations

import copy
import json
from importlib import metadata

import pytest
from jsonschema import Draft202012Validator

from pipeline.registry import ManifestError, Registry
from pipeline.registry.manifest import parse_manifest, schema, tool_version, validate_document

from tests.registry.helpers import publish, trained_policy


@pytest.fixture
def document(tmp_path) -> dict:
    registry = Registry(str(tmp_path))
    return copy.deepcopy(publish(registry, "policy", trained_policy(0)).manifest.document)


def check(document: dict) -> None:
    validate_document(document, url="memory://registry/policy/1/manifest.json", model="policy", version="1")


def test_schema_is_draft_2020_12() -> None:
    loaded = schema()
    assert loaded["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert loaded["$id"].endswith("manifest-1.json")
    Draft202012Validator.check_schema(loaded)


def test_valid_document_passes(document: dict) -> None:
    check(document)
    assert document["tool"] == {"name": "surgery-pipeline", "version": metadata.version("surgery-pipeline")}
    assert tool_version() == metadata.version("surgery-pipeline")


def test_missing_shards_rejected(document: dict) -> None:
    del document["shards"]
    with pytest.raises(ManifestError) as caught:
        check(document)
    assert str(caught.value) == (
        "memory://registry/policy/1/manifest.json: invalid manifest:\n  shards: missing; it is required"
    )


def test_schema_violations_listed(document: dict) -> None:
    document["shards"]["model-00001-of-00003.safetensors"]["sha256"] = "XYZ"
    document["created_at"] = "yesterday"
    document["surprise"] = 1
    with pytest.raises(ManifestError) as caught:
        check(document)
    lines = str(caught.value).splitlines()[1:]
    assert lines == [
        "  (top level): unknown keys ['surprise']; allowed: " + str(sorted(schema()["properties"])),
        "  created_at: 'yesterday' does not match '^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\\\.[0-9]+)?Z$'",
        "  shards.model-00001-of-00003.safetensors.sha256: 'XYZ' does not match '^[0-9a-f]{64}$'",
    ]


def test_inconsistencies_rejected(document: dict) -> None:
    document["version"] = "2"
    document["tensors"]["embed.weight"]["shard"] = "model-00009-of-00009.safetensors"
    document["optimizer_state"] = True
    document["feature_schema"]["inputs"][0]["fields"] = ["hp"]
    with pytest.raises(ManifestError) as caught:
        check(document)
    lines = str(caught.value).splitlines()[1:]
    assert lines == [
        "  version is '2', but the manifest is stored under version '1'",
        "  tensors.embed.weight: shard 'model-00009-of-00009.safetensors' is not listed in 'shards'",
        "  optimizer_state is true, but optimizer_tensors has 0 entries",
        "  feature_schema: input 'hero': shape [2] has 2 values on its last axis but 1 fields are named; make them agree",
    ]


def test_newer_format_named(document: dict) -> None:
    document["manifest_version"] = 2
    document["tool"]["version"] = "9.0.0"
    with pytest.raises(ManifestError, match=r"manifest_version 2 is newer than this tool reads \(1\); it was written by surgery-pipeline 9.0.0\. Upgrade"):
        check(document)


def test_read_validates_location(tmp_path) -> None:
    registry = Registry(str(tmp_path))
    publish(registry, "policy", trained_policy(0))
    path = tmp_path / "policy" / "1" / "manifest.json"
    document = json.loads(path.read_text())
    document["model"] = "value"
    path.write_text(json.dumps(document))
    with pytest.raises(ManifestError, match=r"model is 'value', but the manifest is stored under model 'policy'"):
        registry.resolve("policy", "1")

    path.write_text('{"manifest_version": 1, "manifest_version": 1}')
    with pytest.raises(ManifestError, match=r"invalid manifest JSON \(duplicate key 'manifest_version'\); the manifest is corrupt"):
        registry.resolve("policy", "1")
    with pytest.raises(ManifestError, match="invalid manifest JSON"):
        parse_manifest(b"\xff", url="x", model="policy", version="1")
