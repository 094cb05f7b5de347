"""Verification: user probe files, failure tables, approximate plans and bad probes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from pipeline.examples.five_config import SMALL
from pipeline.plan import PlanError, apply_plan, parse_options, plan_specs
from pipeline.plan.verify import VerificationError, check_exact, draw_probes, translate_inputs, verify_plan
from tests.plan.helpers import five, train

GLOBALS = list(SMALL.global_fields)
NEW = five(global_fields=["game_time", "roshan_alive", "weather"], unit_types=list(SMALL.unit_types)[::-1] + ["roshan"])
OPTIONS = {"constants": {"globals/is_day": 0.5}}


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(1)
    module, schema = five().build()
    train(module, schema)
    plan = plan_specs(five(), NEW, parse_options(OPTIONS))
    old_state = module.state_dict()
    return plan, old_state, apply_plan(plan, old_state), schema


def test_probes_translate_by_name(setup):
    plan, _, _, old_schema = setup
    new_schema = NEW.build(device="meta")[1]
    probes = draw_probes(old_schema, new_schema, plan, 32, seed=0)
    assert int(probes["unit_type"].max()) <= 4
    new_inputs = translate_inputs(probes, old_schema, new_schema, plan)
    # unit_types is reversed: old index i is new index 4 - i.
    assert torch.equal(new_inputs["unit_type"], 4 - probes["unit_type"])
    assert torch.equal(new_inputs["globals"][:, 0], probes["globals"][:, 0])
    assert torch.equal(new_inputs["globals"][:, 1], probes["globals"][:, 2])
    assert float(new_inputs["globals"][:, 2].abs().max()) == 0.0


def test_user_probe_file(setup, tmp_path):
    plan, old_state, new_state, old_schema = setup
    new_schema = NEW.build(device="meta")[1]
    probes = draw_probes(old_schema, new_schema, plan, 5, seed=3)
    path = tmp_path / "probe.safetensors"
    save_file(probes, str(path))
    report = verify_plan(plan, old_state, new_state, probe=path, device="cpu")
    assert report.passed
    assert report.batch == 5
    assert any("fed to the old model as 0.5" in note for note in report.notes)
    assert report.to_json()["approximate"] is False


def test_bad_probe_files(setup, tmp_path):
    plan, old_state, new_state, old_schema = setup
    with pytest.raises(PlanError, match="cannot read probe file"):
        verify_plan(plan, old_state, new_state, probe=tmp_path / "missing.safetensors")
    probes = draw_probes(old_schema, old_schema, plan, 2, seed=0)
    del probes["heroes"]
    with pytest.raises(PlanError, match=r"missing inputs \['heroes'\]"):
        verify_plan(plan, old_state, new_state, probe=probes)
    probes = draw_probes(old_schema, old_schema, plan, 2, seed=0)
    probes["units"] = probes["units"][:, :, :3]
    with pytest.raises(PlanError, match="probe input 'units' has shape"):
        verify_plan(plan, old_state, new_state, probe=probes)


def test_tampered_checkpoint_fails_with_table(setup):
    plan, old_state, new_state, _ = setup
    broken = dict(new_state)
    broken["heads.move_x.bias"] = new_state["heads.move_x.bias"].clone()
    broken["heads.move_x.bias"][2] += 0.5
    report = verify_plan(plan, old_state, broken)
    assert not report.passed
    assert report.worst(1)[0].output == "move_x"
    assert report.worst(1)[0].field == "0"
    with pytest.raises(VerificationError, match=r"FAILED(.|\n)*move_x/0"):
        check_exact(report)


def test_checkpoint_that_does_not_fit(setup):
    plan, old_state, new_state, _ = setup
    with pytest.raises(PlanError, match="new checkpoint does not fit the new model"):
        verify_plan(plan, old_state, {k: v for k, v in new_state.items() if k != "trunk.0.bias"})


def test_new_categorical_input_cannot_be_probed():
    from pipeline.plan.model import Plan
    from pipeline.schema import FeatureSchema, InputSpec

    old = FeatureSchema((InputSpec("x", "continuous", (2,), fields=("a", "b")),))
    new = FeatureSchema((InputSpec("x", "continuous", (2,), fields=("a", "b")), InputSpec("kind", "categorical", (), vocabulary="k")), {"k": ("p", "q")})
    with pytest.raises(PlanError, match="new categorical input 'kind'"):
        translate_inputs({"x": torch.zeros(2, 2)}, old, new, Plan(params=()))
