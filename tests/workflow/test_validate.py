"""Workflow files: the examples validate, and each kind of bad input names its field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.workflow import WorkflowError, load_workflow

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "workflows").glob("*.yaml"))

GOOD = {
    "version": 1,
    "name": "demo",
    "source": {"registry": "file://reg", "model": "five", "versions": ["latest"]},
    "old_spec": {"factory": "pipeline.examples.five:build", "config": {"size": "small"}},
    "new_spec": {"factory": "pipeline.examples.five:build", "config": {"size": "small", "lstm_width": 64}},
    "verify": {"probes": 8, "tolerance": 1e-6},
    "destination": {"registry": "file://reg", "model": "five-wide", "version": "next", "tags": ["latest"]},
}


def _write(tmp_path, data, name="w.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _with(**changes):
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    for dotted, value in changes.items():
        target = data
        *parents, last = dotted.split("__")
        for key in parents:
            target = target[key]
        if value is _DELETE:
            del target[last]
        else:
            target[last] = value
    return data


_DELETE = object()


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_workflows_validate(path):
    workflow = load_workflow(path)
    assert workflow.name == path.stem


def test_good_workflow_resolves_paths(tmp_path):
    workflow = load_workflow(_write(tmp_path, GOOD))
    assert workflow.source.registry == f"file://{tmp_path}/reg"
    assert workflow.destination.tags == ("latest",)
    assert workflow.new_spec.config["lstm_width"] == 64


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(WorkflowError, match=r"destination: unknown key 'tag';"):
        load_workflow(_write(tmp_path, _with(destination__tag="latest")))


def test_unknown_top_level_key_is_named(tmp_path):
    with pytest.raises(WorkflowError, match=r"\(top level\): unknown key 'verfy'"):
        load_workflow(_write(tmp_path, _with(verfy={})))


def test_missing_source_is_named(tmp_path):
    with pytest.raises(WorkflowError, match=r"source: missing; it is required"):
        load_workflow(_write(tmp_path, _with(source=_DELETE)))


def test_source_needs_registry_or_checkpoints(tmp_path):
    with pytest.raises(WorkflowError, match=r"source: give either 'registry' and 'model'"):
        load_workflow(_write(tmp_path, _with(source={"registry": "file://reg"})))


def test_unimportable_factory_is_named(tmp_path):
    data = _with(new_spec={"factory": "no_such_module_xyz:build", "config": {}})
    with pytest.raises(WorkflowError, match=r"new_spec: .*cannot import module 'no_such_module_xyz'"):
        load_workflow(_write(tmp_path, data))


def test_missing_factory_attribute_is_named(tmp_path):
    data = _with(old_spec={"factory": "pipeline.examples.five:no_such_builder"})
    with pytest.raises(WorkflowError, match=r"old_spec: .*has no attribute 'no_such_builder'"):
        load_workflow(_write(tmp_path, data))


@pytest.mark.parametrize("tolerance", [0, -1e-6, 2.0])
def test_tolerance_out_of_range(tmp_path, tolerance):
    with pytest.raises(WorkflowError, match=r"verify\.tolerance: .* is out of range"):
        load_workflow(_write(tmp_path, _with(verify__tolerance=tolerance)))


def test_spec_file_not_found_is_named(tmp_path):
    with pytest.raises(WorkflowError, match=r"new_spec: cannot read model spec .*missing\.yaml"):
        load_workflow(_write(tmp_path, _with(new_spec="missing.yaml")))


def test_unset_environment_variable_is_an_error(tmp_path, monkeypatch):
    monkeypatch.delenv("SURGERY_TEST_UNSET", raising=False)
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump(GOOD).replace("file://reg", "${SURGERY_TEST_UNSET}"))
    with pytest.raises(WorkflowError, match="SURGERY_TEST_UNSET is not set"):
        load_workflow(path)


def test_environment_default_and_override(tmp_path, monkeypatch):
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump(GOOD).replace("file://reg", "${SURGERY_TEST_REG:-file://other}"))
    assert load_workflow(path).destination.registry == f"file://{tmp_path}/other"
    monkeypatch.setenv("SURGERY_TEST_REG", "s3://bucket/registry")
    assert load_workflow(path).destination.registry == "s3://bucket/registry"


def test_cli_validate_exit_status(tmp_path):
    good = _write(tmp_path, GOOD, "good.yaml")
    bad = _write(tmp_path, _with(destination__tag="x"), "bad.yaml")
    run = lambda *files: subprocess.run(
        [sys.executable, "-m", "pipeline.cli.main", "workflow", "validate", *map(str, files)],
        capture_output=True, text=True,
    )
    ok = run(good)
    assert ok.returncode == 0, ok.stderr
    failed = run(good, bad)
    assert failed.returncode == 1
    assert "unknown key 'tag'" in failed.stderr


def test_exponent_without_decimal_point_is_explained(tmp_path):
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump(GOOD).replace("tolerance: 1.0e-06", "tolerance: 1e-5"))
    with pytest.raises(WorkflowError, match=r"verify\.tolerance: '1e-5' is a string, not a number; .*write 1\.0e-5"):
        load_workflow(path)
