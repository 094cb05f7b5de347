"""The migration Job template: one file in two places, and `surgery submit` builds from it."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from pipeline import __version__
from pipeline.deploy import build_migration_job, load_template
from pipeline.deploy.job import MAX_NAME_LENGTH, job_name, workflow_label
from tests.deploy.conftest import K8S, ROOT
from tests.deploy.policy import violations
from tests.deploy.schemas import schema_errors

TEMPLATE = K8S / "base" / "migration-job.yaml"
PACKAGE_COPY = ROOT / "pipeline" / "deploy" / "migration-job.yaml"


def test_package_copy_identical():
    assert PACKAGE_COPY.read_bytes() == TEMPLATE.read_bytes(), "copy k8s/base/migration-job.yaml to pipeline/deploy/"


def test_template_image_is_package_version():
    container = load_template()["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"surgery-pipeline:{__version__}"


def test_template_passes_schema_and_policy():
    template = load_template()
    assert schema_errors(template) == []
    assert violations([template]) == []


def drop_nulls(value):
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def test_kubectl_recipe_matches_submit(kubectl, tmp_path):
    # docs/deploy.md's kubectl-only recipe and surgery submit must start the same Job.
    out = subprocess.run(
        [kubectl, "set", "env", "--local", "-f", str(TEMPLATE), "SURGERY_WORKFLOW=five-new-action.yaml", "-o", "yaml"],
        capture_output=True, text=True, timeout=60, env={"KUBECONFIG": str(tmp_path / "none"), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    from_kubectl = drop_nulls(yaml.safe_load(out.stdout))
    container = from_kubectl["spec"]["template"]["spec"]["containers"][0]
    # The kubelet expands $(SURGERY_WORKFLOW) from the container's env.
    container["args"] = [arg.replace("$(SURGERY_WORKFLOW)", "five-new-action.yaml") for arg in container["args"]]

    built = build_migration_job("five-new-action.yaml", namespace="surgery", image=f"surgery-pipeline:{__version__}", suffix="abc123")
    expected_metadata = built.pop("metadata")
    built["spec"]["template"]["metadata"]["labels"].pop("surgery-pipeline/workflow")
    metadata = from_kubectl.pop("metadata")
    assert from_kubectl.pop("status") == {}
    assert built == from_kubectl
    assert metadata["generateName"] + "five-new-action-abc123" == expected_metadata["name"]


@pytest.mark.parametrize(
    "file_name, label",
    [
        ("five-new-action.yaml", "five-new-action"),
        ("Five_New.Action.yml", "five-new-action"),
        ("x" * 80 + ".yaml", "x" * 40),
        ("___.yaml", "workflow"),
    ],
)
def test_workflow_label(file_name, label):
    assert workflow_label(file_name) == label
    name = job_name(file_name, "zzzzzz")
    assert len(name) <= MAX_NAME_LENGTH
    assert name == f"surgery-migrate-{label}-zzzzzz"


@pytest.mark.parametrize("suffix", ["", "ABC", "abcdefg", "a-b"])
def test_bad_suffix_rejected(suffix):
    with pytest.raises(ValueError, match="invalid Job name suffix"):
        job_name("x.yaml", suffix)


@pytest.mark.parametrize("file_name", ["specs/x.yaml", "x.json", "a b.yaml", ""])
def test_bad_file_name_rejected(file_name):
    with pytest.raises(ValueError, match="invalid workflow file name"):
        build_migration_job(file_name, namespace="surgery", image="surgery-pipeline:1", suffix="a")


def test_built_job_passes_schema_and_policy():
    for file_name in sorted(p.name for p in (ROOT / "workflows").glob("*.yaml")):
        job = build_migration_job(file_name, namespace="surgery", image="registry.example.com/ml/surgery-pipeline:1.2.3", suffix="a1")
        assert schema_errors(job) == []
        assert violations([job]) == []
