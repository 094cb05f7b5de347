"""End to end on a registry in S3 (moto on 127.0.0.1): Five workflows and the MiniLM domain-tokens workflow."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch

from pipeline.execution.importer import import_checkpoint
from pipeline.execution.job import run_workflow
from pipeline.models.bert import minilm_path
from pipeline.models.spec import load_spec
from pipeline.plan import parse_options, plan_specs
from pipeline.registry import Registry
from pipeline.workflow import load_workflow
from tests.execution.helpers import SPECS, compare_on_old_probes, import_five, shard_digests, write_workflow


def s3_keys(s3_client, bucket: str, prefix: str) -> list[str]:
    """List object keys under ``prefix`` with boto3, independent of the registry's s3fs store."""
    keys = []
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [entry["Key"][len(prefix):] for entry in page.get("Contents", [])]
    return sorted(keys)


@pytest.fixture(scope="module")
def s3_registry(s3_bucket, s3_options, tmp_path_factory):
    """A registry under a fresh prefix of the moto bucket, with one Five policy imported."""
    prefix = f"{uuid.uuid4().hex}/registry"
    registry = Registry(f"s3://{s3_bucket}/{prefix}", s3_options)
    source, module = import_five(registry, tmp_path_factory.mktemp("five-s3"), seed=1)
    return registry, prefix, source, module


@pytest.mark.parametrize("name", ["five-unit-fields", "five-wide-lstm"])
def test_five_workflow_on_s3(name, s3_registry, s3_options, s3_client, s3_bucket, client, tmp_path: Path):
    registry, prefix, source, old_module = s3_registry
    path = write_workflow(tmp_path / f"{name}.yaml", name, registry.url, storage_options=s3_options)
    workflow = load_workflow(path)

    result = run_workflow(workflow, client)

    item = result.results[0]
    model = workflow.destination.model
    assert item.url == f"s3://{s3_bucket}/{prefix}/{model}/{item.version}"
    published = Registry(registry.url, s3_options).resolve(model, "latest")
    assert published.version == item.version
    report = published.verify()
    assert report.ok, report.problems
    assert published.manifest.parents == [source.as_parent()]
    assert shard_digests(published) == item.shards
    keys = s3_keys(s3_client, s3_bucket, f"{prefix}/{model}/{item.version}/")
    assert keys == sorted([".claim", "manifest.json", "model.safetensors.index.json", *item.shards])

    new_module, new_schema = workflow.new_spec.build()
    published.load_into(new_module, schema=new_schema)
    plan = plan_specs(workflow.old_spec, workflow.new_spec, parse_options(workflow.plan))
    old_schema = workflow.old_spec.build(device="meta")[1]
    outputs = compare_on_old_probes(plan, (old_module, old_schema), (new_module, new_schema))
    for output, (old, new) in outputs.items():
        torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-5, msg=lambda m, o=output: f"output {o}: {m}")


# moto serves each ranged GET by reading the whole object, so shard tasks, which read
# one tensor per request, take about 90 ms a tensor from one 90 MB shard. Shards of 8 MiB
# keep the MiniLM run on moto near its local speed.
MINILM_SHARD_BYTES = 8 * 2**20


def test_minilm_domain_tokens_on_s3(s3_bucket, s3_options, s3_client, client, tmp_path: Path):
    registry = Registry(f"s3://{s3_bucket}/{uuid.uuid4().hex}/registry", s3_options)
    source = import_checkpoint(
        str(minilm_path() / "model.safetensors"), load_spec(SPECS / "minilm-v1.yaml"), registry, "minilm",
        max_shard_bytes=MINILM_SHARD_BYTES,
    )
    path = write_workflow(
        tmp_path / "minilm.yaml", "minilm-domain-tokens", registry.url, storage_options=s3_options,
        destination={"max_shard_bytes": MINILM_SHARD_BYTES},
    )
    workflow = load_workflow(path)

    result = run_workflow(workflow, client)

    item = result.results[0]
    assert item.verification["passed"] is True
    assert item.verification["max_rel"] <= 1e-5
    published = registry.resolve("minilm-domain-tokens", "latest")
    assert published.version == item.version
    assert published.manifest.parents == [source.as_parent()]
    assert set(published.manifest.files) == {"config.json", "vocab.txt", "model.safetensors.index.json"}
    assert len(published.manifest.shards) > 1
    report = published.verify()
    assert report.ok, report.problems

    new_module, new_schema = workflow.new_spec.build()
    published.load_into(new_module, schema=new_schema)
    tokens = new_schema.vocabularies["tokens"]
    assert len(tokens) == 30522 + 100
    assert tokens[-1] == "pharmacovigilance"
    vocab = registry.store.read(registry.layout.file("minilm-domain-tokens", item.version, "vocab.txt")).decode()
    assert vocab.splitlines() == list(tokens)
