"""End to end on a local registry: train and import Five, run every Five workflow, load the results."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from pipeline.execution.job import run_workflow
from pipeline.plan import parse_options, plan_specs
from pipeline.plan.verify import draw_probes, translate_inputs
from pipeline.registry import Registry
from pipeline.workflow import load_workflow
from tests.execution.helpers import FIVE_WORKFLOWS, WORKFLOWS, compare_on_old_probes, import_five, run_cli, shard_digests

SHA256 = re.compile(r"^[0-9a-f]{64}$")
PHASES = ["sources", "maps", "plan", "shards", "verify", "publish"]


@pytest.fixture(scope="module")
def five_registry(tmp_path_factory: pytest.TempPathFactory):
    """A local registry with one trained Five policy imported as version 1 of ``five``."""
    folder = tmp_path_factory.mktemp("five-local")
    registry = Registry(f"file://{folder}/registry")
    source, module = import_five(registry, folder, seed=0)
    return registry, source, module


@pytest.mark.parametrize("name", FIVE_WORKFLOWS)
def test_five_workflow_publishes_equivalent_model(name, five_registry, client, monkeypatch):
    registry, source, old_module = five_registry
    monkeypatch.setenv("SURGERY_REGISTRY", registry.url)
    workflow = load_workflow(WORKFLOWS / f"{name}.yaml")

    result = run_workflow(workflow, client)

    assert len(result.results) == 1
    item = result.results[0]
    model = workflow.destination.model
    assert item.source == "five@1"
    assert item.url == registry.version_url(model, item.version)
    assert item.verification["passed"] is True
    assert item.verification["max_rel"] <= 1e-6

    published = registry.resolve(model, "latest")
    assert published.version == item.version
    report = published.verify()
    assert report.ok, report.problems
    manifest = published.manifest
    assert manifest.parents == [source.as_parent()]
    assert manifest.document["plan"]["sha256"] == result.plan_sha256
    assert manifest.document["verification"]["passed"] is True
    assert shard_digests(published) == item.shards

    new_module, new_schema = workflow.new_spec.build()
    loaded = published.load_into(new_module, schema=new_schema)
    assert sorted(loaded.loaded) == sorted(new_module.state_dict())

    plan = plan_specs(workflow.old_spec, workflow.new_spec, parse_options(workflow.plan))
    assert plan.sha256() == result.plan_sha256
    old_schema = workflow.old_spec.build(device="meta")[1]
    outputs = compare_on_old_probes(plan, (old_module, old_schema), (new_module, new_schema))
    for output, (old, new) in outputs.items():
        torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-5, msg=lambda m, o=output: f"output {o}: {m}")


def test_new_action_keeps_action_distribution(five_registry, client, monkeypatch):
    """The added glyph action gets (almost) no probability, so the old distribution is kept."""
    registry, _, old_module = five_registry
    monkeypatch.setenv("SURGERY_REGISTRY", registry.url)
    workflow = load_workflow(WORKFLOWS / "five-new-action.yaml")
    item = run_workflow(workflow, client).results[0]
    new_module, new_schema = workflow.new_spec.build()
    registry.get("five-new-action", item.version).load_into(new_module)
    plan = plan_specs(workflow.old_spec, workflow.new_spec, parse_options(workflow.plan))
    old_schema = workflow.old_spec.build(device="meta")[1]

    old_inputs = draw_probes(old_schema, new_schema, plan, 64, 5)
    new_inputs = translate_inputs(old_inputs, old_schema, new_schema, plan)
    with torch.no_grad():
        old_probs = old_module(**old_inputs)["action_type"].softmax(-1)
        new_probs = new_module(**new_inputs)["action_type"].softmax(-1)

    fields = new_schema.outputs[0].fields
    assert new_schema.outputs[0].name == "action_type"
    assert fields[-1] == "glyph"
    assert float(new_probs[:, -1].max()) < 1e-6
    torch.testing.assert_close(new_probs[:, :-1], old_probs, rtol=1e-5, atol=1e-6)


def test_cli_run_prints_json_summary(five_registry, tmp_path: Path):
    registry, source, _ = five_registry
    completed = run_cli(
        "run", str(WORKFLOWS / "five-drop-field.yaml"), "--workers", "1", "--json",
        env={"SURGERY_REGISTRY": registry.url},
    )

    assert completed.returncode == 0, completed.stderr
    summary = json.loads(completed.stdout)
    assert summary["workflow"] == "five-drop-field"
    assert SHA256.match(summary["plan_sha256"])
    assert summary["dry_run"] is False
    assert list(summary["timings"]) == PHASES
    assert all(value >= 0 for value in summary["timings"].values())
    assert len(summary["published"]) == 1
    item = summary["published"][0]
    published = registry.get("five-drop-field", item["version"])
    assert item["url"] == published.url
    assert item["parent"] == source.as_parent()
    assert item["tags"] == ["latest"]
    assert item["shards"] == shard_digests(published)
    assert all(SHA256.match(digest) for digest in item["shards"].values())
    assert item["verification"]["passed"] is True
    assert item["verification"]["max_rel"] <= 1e-6
    assert item["verification"]["batch"] == 256
    assert published.manifest.document["plan"]["sha256"] == summary["plan_sha256"]
    assert published.verify().ok
