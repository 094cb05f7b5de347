"""Adam state through the plan: one more step after surgery matches the old model's step."""

from __future__ import annotations

import pytest
import torch

from pipeline.examples.five_config import SMALL
from pipeline.models.spec import named_outputs
from pipeline.plan import apply_optimizer_state, apply_param, apply_plan, parse_options, plan_specs
from pipeline.plan.verify import draw_probes, translate_inputs
from tests.plan.helpers import five, local, train

UNITS = list(SMALL.unit_fields)
HEADS = {name: list(fields) for name, fields in SMALL.action_heads.items()}
CHANGES = {
    "five": (
        five(),
        five(
            unit_fields=UNITS[:2] + ["shield"] + UNITS[2:],
            global_fields=["game_time", "roshan_alive", "tower_count"],
            unit_types=list(SMALL.unit_types)[::-1] + ["roshan"],
            lstm_width=40,
            unit_width=20,
            action_heads={**HEADS, "action_type": HEADS["action_type"] + ["teleport"], "delay": ["frame_0"]},
        ),
        {"constants": {"globals/is_day": 1.0}},
    ),
    "residual": (local("residual"), local("residual", blocks=3, width=8), {"rename": {"params": {"blocks.1": "blocks.2"}}}),
    "gru": (local("gru"), local("gru", hidden=12, fields=("x", "heading", "y", "speed")), None),
}


def _old_field_loss(outputs, schema, targets):
    """Squared error on the old output fields only, looked up by name."""
    total = torch.zeros(())
    for output, fields in targets.items():
        spec = schema.output(output)
        for field_name, target in fields.items():
            column = outputs[output][..., spec.fields.index(field_name)]
            total = total + ((column - target) ** 2).mean()
    return total


def _close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal up to float32 rounding: within 1e-5 of the tensor's largest magnitude."""
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    difference = float((actual - expected).abs().max()) if expected.numel() else 0.0
    return difference <= 1e-5 * scale + 1e-12


def _adam_step(module, optimizer, inputs, schema, targets):
    optimizer.zero_grad()
    _old_field_loss(named_outputs(module(**inputs), schema), schema, targets).backward()
    optimizer.step()


@pytest.mark.parametrize("change", list(CHANGES))
def test_adam_step_after_surgery_matches(change):
    old_spec, new_spec, options = CHANGES[change]
    torch.manual_seed(0)
    old_module, old_schema = old_spec.build()
    optimizer = train(old_module, old_schema, steps=3)
    old_names = [name for name, _ in old_module.named_parameters()]

    plan = plan_specs(old_spec, new_spec, parse_options(options))
    new_module, new_schema = new_spec.build()
    new_module.load_state_dict(apply_plan(plan, old_module.state_dict()))
    new_names = [name for name, _ in new_module.named_parameters()]
    new_optimizer = torch.optim.Adam(new_module.parameters(), lr=1e-2)
    new_optimizer.load_state_dict(apply_optimizer_state(plan, optimizer.state_dict(), old_names, new_names))

    # One batch with every entity present, so that masked logits stay finite in the loss.
    probes = draw_probes(old_schema, new_schema, plan, 8, seed=5)
    for spec in old_schema.inputs:
        if spec.kind == "auxiliary":
            probes[spec.name] = torch.ones_like(probes[spec.name])
    for atom, value in plan.constants:
        name, _, field_name = atom.partition(":")[2].partition("/")
        probes[name][..., old_schema.input(name).fields.index(field_name)] = value
    new_inputs = translate_inputs(probes, old_schema, new_schema, plan)
    generator = torch.Generator().manual_seed(9)
    targets = {spec.name: {f: torch.randn(8, generator=generator) for f in spec.fields} for spec in old_schema.outputs}

    old_before = {n: p.detach().clone() for n, p in old_module.named_parameters()}
    new_before = {n: p.detach().clone() for n, p in new_module.named_parameters()}
    old_module.train()
    new_module.train()
    _adam_step(old_module, optimizer, probes, old_schema, targets)
    _adam_step(new_module, new_optimizer, new_inputs, new_schema, targets)

    old_params = dict(old_module.named_parameters())
    compared = 0
    for j, name in enumerate(new_names):
        pp = plan.param(name)
        if pp.source is None:
            continue
        mapped = apply_param(pp, lambda _n: torch.ones(pp.source_shape), moments=True).bool()
        old_delta = apply_param(pp, lambda _n: old_params[pp.source].detach() - old_before[pp.source], moments=True)
        new_delta = dict(new_module.named_parameters())[name].detach() - new_before[name]
        assert _close(new_delta[mapped], old_delta[mapped]), name
        old_state = optimizer.state[old_params[pp.source]]
        new_state = new_optimizer.state[dict(new_module.named_parameters())[name]]
        assert float(new_state["step"]) == float(old_state["step"]) == 4.0
        for key in ("exp_avg", "exp_avg_sq"):
            gathered = apply_param(pp, lambda _n, k=key: old_state[k], moments=True)
            assert _close(new_state[key][mapped], gathered[mapped]), (name, key)
        compared += int(mapped.sum())
    assert compared > 0


def test_new_parameters_start_without_state():
    old_spec, new_spec, options = CHANGES["five"]
    torch.manual_seed(0)
    module, schema = old_spec.build()
    optimizer = train(module, schema, steps=2)
    plan = plan_specs(old_spec, new_spec, parse_options(options))
    new_module, _ = new_spec.build()
    new_names = [n for n, _ in new_module.named_parameters()]
    state = apply_optimizer_state(plan, optimizer.state_dict(), [n for n, _ in module.named_parameters()], new_names)
    delay = new_names.index("heads.delay.weight")
    assert delay not in state["state"]
    assert sorted(state["param_groups"][0]["params"]) == list(range(len(new_names)))
    lstm = new_names.index("lstm.weight_hh_l0")
    moments = state["state"][lstm]["exp_avg"]
    assert moments.shape == (160, 40)
    assert torch.count_nonzero(moments[:, 32:]) == 0
    assert torch.count_nonzero(moments[32:40]) == 0
