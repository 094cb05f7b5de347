"""Publish, resolve and load round trips, and the publication protocol, on file://, memory:// and s3://."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from pipeline.registry import (
    ClaimLostError,
    ManifestError,
    PublicationStateError,
    Registry,
    VersionExistsError,
    VersionNotFoundError,
)
from pipeline.storage import TensorSpec, open_checkpoint
from pipeline.storage.errors import InvalidNameError

from tests.registry.helpers import SPEC, TinyPolicy, feature_schema, publish, trained_policy
from tests.storage.conftest import Backend


def registry_of(backend: Backend) -> Registry:
    return Registry(backend.root, backend.storage_options)


def fields() -> dict:
    return {"model_spec": SPEC, "feature_schema": feature_schema()}


def test_round_trip_byte_exact(backend: Backend) -> None:
    registry = registry_of(backend)
    source = trained_policy(seed=1)
    published = publish(registry, "policy", source, tags=["latest"], files={"config.json": b'{"width": 8}\n'})

    resolved = Registry(backend.root, backend.storage_options).resolve("policy", "latest")
    target = TinyPolicy()
    report = resolved.load_into(target, schema=feature_schema())

    assert resolved.version == published.version == "1"
    assert resolved.manifest.sha256 == published.manifest.sha256
    expected = source.state_dict()
    loaded = target.state_dict()
    assert list(loaded) == list(expected)
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert loaded[name].view(torch.uint8).equal(tensor.view(torch.uint8)) if tensor.dim() else loaded[name].equal(tensor), name
    assert sorted(report.loaded) == sorted(expected)
    assert report.missing == []
    assert report.unexpected == []
    assert resolved.manifest.files["config.json"]["size"] == 13
    assert resolved.feature_schema == feature_schema()
    assert resolved.model_spec.to_json() == SPEC
    assert backend.get("policy/1/config.json") == b'{"width": 8}\n'
    with open_checkpoint(resolved.url, backend.storage_options) as reader:
        assert torch.equal(reader.read("body.weight"), expected["body.weight"])


def test_manifest_records_layout(backend: Backend) -> None:
    registry = registry_of(backend)
    published = publish(registry, "policy", trained_policy(seed=2))
    manifest = json.loads(backend.get("policy/1/manifest.json"))

    shard_files = sorted(name for name in backend.listing("policy/1") if name.endswith(".safetensors"))
    assert sorted(manifest["shards"]) == shard_files
    assert shard_files[0] == f"model-00001-of-{len(shard_files):05d}.safetensors"
    assert manifest["tensors"]["head.weight"] == {"shard": manifest["tensors"]["head.weight"]["shard"], "dtype": "BF16", "shape": [3, 8]}
    assert manifest["tensors"]["norm.num_batches_tracked"]["dtype"] == "I64"
    assert "model.safetensors.index.json" in manifest["files"]
    assert manifest["optimizer_state"] is False
    assert manifest["optimizer_tensors"] == {}
    assert manifest["tool"]["version"] == __import__("importlib.metadata").metadata.version("surgery-pipeline")
    assert manifest["created_at"].endswith("Z")
    assert manifest["plan"] is None
    assert manifest["verification"] is None
    assert published.manifest.document == manifest


def test_next_allocates_after_highest(backend: Backend) -> None:
    registry = registry_of(backend)
    assert publish(registry, "policy", trained_policy(0)).version == "1"
    assert publish(registry, "policy", trained_policy(0), version="7").version == "7"
    assert publish(registry, "policy", trained_policy(0), version="exp-a").version == "exp-a"
    pending = registry.begin_publish("policy", "next", run_id="in-progress")
    assert pending.version == "8"
    assert publish(registry, "policy", trained_policy(0)).version == "9"

    assert registry.versions("policy") == ["1", "7", "9", "exp-a"]
    pending.abort()
    assert publish(registry, "policy", trained_policy(0)).version == "10"


def test_unpublished_version_invisible(backend: Backend) -> None:
    registry = registry_of(backend)
    publish(registry, "policy", trained_policy(0), tags=["latest"])
    publication = registry.begin_publish("policy", "3", run_id="crashed-run")
    writer = publication.writer(200)
    state = trained_policy(0).state_dict()
    plan = writer.plan_shards(TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in state.items())
    writer.write_shard(plan[0], state)

    assert registry.versions("policy") == ["1"]
    with pytest.raises(VersionNotFoundError) as caught:
        registry.resolve("policy", "3")
    message = str(caught.value)
    assert message.startswith(
        "version 3 of model 'policy' has no manifest; it was never published or its publication failed"
    )
    assert "claimed by run 'crashed-run'" in message
    assert message.endswith("Published versions: 1; tags: latest")

    with pytest.raises(VersionNotFoundError, match=r"^model 'policy' has no version or tag 'nope'; published versions: 1; tags: latest$"):
        registry.resolve("policy", "nope")
    with pytest.raises(FileNotFoundError, match=r"^model 'other' not found in registry .*; models: policy$"):
        registry.resolve("other", "latest")


def test_explicit_version_exists(backend: Backend) -> None:
    registry = registry_of(backend)
    publish(registry, "policy", trained_policy(0), version="5")
    with pytest.raises(VersionExistsError, match=r"^version 5 of model 'policy' already exists \(.*/policy/5/manifest.json\); published versions are never overwritten"):
        registry.begin_publish("policy", "5")

    registry.begin_publish("policy", "6", run_id="first-run")
    with pytest.raises(VersionExistsError, match=r"^version 6 of model 'policy' is claimed by run 'first-run' on host .* and has no manifest yet"):
        registry.begin_publish("policy", "6", run_id="second-run")


def test_abort_removes_everything(backend: Backend) -> None:
    registry = registry_of(backend)
    publication = registry.begin_publish("policy", "2")
    state = trained_policy(0).state_dict()
    writer = publication.writer(200)
    plan = writer.plan_shards(TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in state.items())
    for shard in plan:
        writer.write_shard(shard, state)
    publication.add_file("vocab.txt", b"creep\ntower\n")
    assert len(backend.listing("policy/2")) == len(plan) + 2

    publication.abort()

    assert backend.listing("policy/2") == []
    assert publication.state == "aborted"
    with pytest.raises(PublicationStateError, match="cannot create a writer: the publication of version 2 of model 'policy' is aborted"):
        publication.writer(200)
    assert registry.begin_publish("policy", "2").version == "2"


def test_context_manager_aborts_on_error(backend: Backend) -> None:
    registry = registry_of(backend)
    with pytest.raises(RuntimeError, match="worker failed"):
        with registry.begin_publish("policy", "4") as publication:
            publication.add_file("config.json", b"{}")
            raise RuntimeError("worker failed")
    assert backend.listing("policy/4") == []

    with registry.begin_publish("policy", "5") as publication:
        publication.add_file("config.json", b"{}")
    assert publication.state == "aborted"
    assert backend.listing("policy/5") == []
    backend.put("README.md", b"not a model")
    assert "README.md" not in registry.models()


def test_publication_pickles_for_workers(backend: Backend) -> None:
    registry = registry_of(backend)
    source = trained_policy(3)
    state = source.state_dict()
    publication = registry.begin_publish("policy", run_id="dask-job")
    plan = publication.writer(300).plan_shards(TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in state.items())

    # What a Dask task receives: the pickled publication, from which it builds the writer.
    on_worker = pickle.loads(pickle.dumps(publication))
    records = [on_worker.writer(300).write_shard(shard, state) for shard in plan]
    published = publication.commit(fields(), plan, records)

    target = TinyPolicy()
    published.load_into(target)
    assert all(torch.equal(target.state_dict()[n], t) for n, t in state.items())
    with pytest.raises(PublicationStateError, match="version 1 of model 'policy' is published; abort cannot remove"):
        publication.abort()


def test_commit_rejects_bad_input(backend: Backend) -> None:
    registry = registry_of(backend)
    state = trained_policy(0).state_dict()
    publication = registry.begin_publish("policy", "1")
    writer = publication.writer(200)
    plan = writer.plan_shards(TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in state.items())
    records = [writer.write_shard(shard, state) for shard in plan]

    with pytest.raises(ValueError, match=r"cannot commit the model part: shard model-00002-of-\d{5}.safetensors has no record"):
        publication.commit(fields(), plan, records[:1] + records[2:])
    with pytest.raises(ManifestError, match=r"field 'feature_schema' is missing"):
        publication.commit({"model_spec": SPEC}, plan, records)
    with pytest.raises(ManifestError, match=r"unknown field 'author'"):
        publication.commit({**fields(), "author": "me"}, plan, records)
    with pytest.raises(ManifestError, match=r"verification failed .*a version that fails verification is not published"):
        publication.commit({**fields(), "verification": {"passed": False, "max_abs_error": 0.5}}, plan, records)
    with pytest.raises(InvalidNameError, match=r"tag name 'latest.lock' ends with '.lock'"):
        publication.commit(fields(), plan, records, tags=["latest.lock"])
    with pytest.raises(ManifestError, match=r"^manifest fields for version 1 of model 'policy': the schema has no feature inputs"):
        publication.commit({**fields(), "feature_schema": {"inputs": []}}, plan, records)
    assert not backend.exists("policy/1/model.safetensors.index.json")
    with pytest.raises(ManifestError, match=r"plan.sha256: 'abc' does not match"):
        publication.commit({**fields(), "plan": {"sha256": "abc", "options": {}, "actions": {}}}, plan, records)

    backend.put("policy/1/stray.bin", b"not from this run")
    with pytest.raises(ValueError, match=r"contains files that were not written through this publication: \['stray.bin'\]"):
        publication.commit(fields(), plan, records)
    assert not backend.exists("policy/1/manifest.json")
    publication.abort()
    assert backend.listing("policy/1") == []


def test_commit_detects_lost_claim(backend: Backend) -> None:
    registry = registry_of(backend)
    state = trained_policy(0).state_dict()
    publication = registry.begin_publish("policy", "1", run_id="slow-run")
    writer = publication.writer(10_000)
    plan = writer.plan_shards(TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in state.items())
    records = [writer.write_shard(shard, state) for shard in plan]

    # gc removed the claim of the slow run; another run cannot take the version while files remain.
    backend.fs.rm_file(backend.path("policy/1/.claim"))
    with pytest.raises(VersionExistsError, match=r"^version 1 of model 'policy' has no manifest but contains \d+ leftover files"):
        registry.begin_publish("policy", "1", run_id="other-run")
    with pytest.raises(ClaimLostError, match=r"^the claim of version 1 of model 'policy' .* is no longer held by run 'slow-run': it was removed"):
        publication.commit(fields(), plan, records)
    assert not backend.exists("policy/1/manifest.json")


def test_plan_and_verification_recorded(backend: Backend) -> None:
    registry = registry_of(backend)
    state = trained_policy(0).state_dict()
    publication = registry.begin_publish("policy")
    writer = publication.writer(10_000)
    plan = writer.plan_shards(TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in state.items())
    records = [writer.write_shard(shard, state) for shard in plan]
    plan_fields = {"sha256": "ab" * 32, "options": {"seed": 3}, "actions": {"copy": {"parameters": 7, "elements": 90}, "init": {"parameters": 1}}}
    verification = {"passed": True, "probes": 64, "tolerance": 1e-6, "max_abs_error": 2.5e-7}
    published = publication.commit({**fields(), "plan": plan_fields, "verification": verification}, plan, records)

    manifest = registry.resolve("policy", "1").manifest
    assert manifest.document["plan"] == plan_fields
    assert manifest.document["verification"] == verification
    assert manifest.sha256 == published.manifest.sha256


def test_invalid_names_rejected(backend: Backend) -> None:
    registry = registry_of(backend)
    for model in ("../up", "", ".hidden", "a/b"):
        with pytest.raises(InvalidNameError, match="model name"):
            registry.begin_publish(model)
    for version in ("refs", "a/b", "..", "", "v1 final"):
        with pytest.raises(InvalidNameError, match="version id"):
            registry.begin_publish("policy", version)
    publish(registry, "policy", trained_policy(0), tags=["stable"])
    with pytest.raises(InvalidNameError, match=r"^version id 'stable' equals a tag of model 'policy'"):
        registry.begin_publish("policy", "stable")
    with pytest.raises(InvalidNameError, match=r"^tag name '1' equals a published version id of model 'policy'"):
        registry.move_tag("policy", "1", "stable")
    publication = registry.begin_publish("policy")
    for name in ("manifest.json", "model-00001-of-00001.safetensors", ".claim", "sub/x.json"):
        with pytest.raises(InvalidNameError, match="extra file name"):
            publication.add_file(name, b"x")
    publication.abort()
