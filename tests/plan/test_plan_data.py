"""Plans as data: JSON round trip, stable hash, diff, byte-identical apply, per-tensor apply."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.examples.five_config import SMALL
from pipeline.plan import Plan, PlanError, apply_param, apply_plan, diff_plans, parse_options, plan_specs
from pipeline.plan.model import AxisPlan, count_elements
from tests.plan.helpers import five, train

ROOT = Path(__file__).resolve().parents[2]
UNITS = list(SMALL.unit_fields)
HEADS = {name: list(fields) for name, fields in SMALL.action_heads.items()}
NEW = five(
    unit_fields=UNITS[:2] + ["shield"] + UNITS[2:],
    global_fields=["game_time", "roshan_alive"],
    unit_types=list(SMALL.unit_types)[::-1] + ["roshan"],
    lstm_width=40,
    action_heads={**HEADS, "action_type": HEADS["action_type"] + ["teleport"]},
)
OPTIONS = {"constants": {"globals/is_day": 1.0}, "init": {"new_category": "mean"}, "seed": 7}


@pytest.fixture(scope="module")
def plan() -> Plan:
    return plan_specs(five(), NEW, parse_options(OPTIONS))


@pytest.fixture(scope="module")
def old_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    module, schema = five().build()
    train(module, schema)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_plan_json_round_trips(plan):
    text = plan.dumps()
    again = Plan.loads(text)
    assert again == plan
    assert again.sha256() == plan.sha256()
    assert json.loads(again.dumps()) == json.loads(text)


def test_plan_hash_is_stable_across_processes(plan):
    script = (
        "from pipeline.plan import parse_options, plan_specs\n"
        "from tests.plan.test_plan_data import NEW, OPTIONS\n"
        "from tests.plan.helpers import five\n"
        "print(plan_specs(five(), NEW, parse_options(OPTIONS)).sha256())\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == plan.sha256()


def test_plan_hash_changes_with_seed(plan):
    other = plan_specs(five(), NEW, parse_options({**OPTIONS, "seed": 8}))
    assert other.sha256() != plan.sha256()
    lines = diff_plans(plan, other)
    assert any(line.startswith("seed:") for line in lines)
    assert any(line.startswith("lstm.weight_ih_l0: regions") for line in lines)
    assert diff_plans(plan, plan) == []


def test_apply_is_byte_identical(plan, old_state):
    first = apply_plan(plan, old_state)
    second = apply_plan(Plan.loads(plan.dumps()), old_state)
    assert list(first) == list(second)
    for name in first:
        assert first[name].dtype == second[name].dtype
        assert first[name].numpy().tobytes() == second[name].numpy().tobytes(), name


def test_apply_param_reads_tensor_by_tensor(plan, old_state, tmp_path):
    path = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in old_state.items()}, str(path))
    whole = apply_plan(plan, old_state)
    reads: list[str] = []
    with safe_open(str(path), framework="pt") as handle:
        def read_old(name: str) -> torch.Tensor:
            reads.append(name)
            return handle.get_tensor(name)

        for pp in plan.params:
            reads.clear()
            tensor = apply_param(pp, read_old)
            assert torch.equal(tensor, whole[pp.name]), pp.name
            expected_reads = ([pp.source] if pp.source else []) + [f.weight for f in pp.folds]
            assert reads == expected_reads


def test_apply_works_on_any_like_shaped_tensor(plan, old_state):
    ones = {k: torch.ones_like(v) for k, v in old_state.items()}
    out = apply_plan(plan, ones)
    weight = out["encoders.units.0.weight"]
    assert float(weight[:, 2].abs().sum()) == 0.0
    assert float(weight[:, :2].min()) == 1.0


def test_apply_rejects_mismatched_checkpoint(plan, old_state):
    broken = dict(old_state)
    broken["trunk.0.weight"] = torch.zeros(3, 3)
    with pytest.raises(PlanError, match="trunk.0.weight"):
        apply_plan(plan, broken)
    missing = {k: v for k, v in old_state.items() if k != "lstm.weight_hh_l0"}
    with pytest.raises(PlanError, match="lstm.weight_hh_l0"):
        apply_plan(plan, missing)


def test_counts_add_up(plan):
    for pp in plan.params:
        counts = count_elements(pp)
        assert counts.copied + counts.gathered + counts.init_total() == counts.total, pp.name
    weight = plan.param("encoders.globals.0.weight")
    assert count_elements(weight).dropped == 8


def test_axis_plan_runs_compress():
    axis = AxisPlan.from_index([0, 1, 2, -1, -1, 3, 5, 4], role="in")
    assert axis.runs == ((0, 0, 3), (3, -1, 2), (5, 3, 1), (6, 5, 1), (7, 4, 1))
    assert axis.index() == [0, 1, 2, -1, -1, 3, 5, 4]
    assert axis.new_ranges() == ((3, 5),)
    assert axis.identity_count() == 3
    assert AxisPlan.from_json(axis.to_json()) == axis


def test_plan_loads_rejects_other_json():
    with pytest.raises(PlanError, match="format"):
        Plan.loads(json.dumps({"format": "surgery-map/1"}))
    with pytest.raises(PlanError, match="JSON"):
        Plan.loads("{not json")


def test_tampered_plan_changes_hash(plan):
    first = plan.params[0]
    tampered = replace(plan, params=(replace(first, notes=first.notes + ("edited",)),) + plan.params[1:])
    assert tampered.sha256() != plan.sha256()
