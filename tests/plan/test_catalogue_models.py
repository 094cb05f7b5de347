"""The change catalogue on small hand-built models: conv, GRU, attention heads, ReLU
stacks and residual blocks, plus the optional and approximate rules."""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from pipeline.plan import PlanError, parse_options, plan_specs
from tests.plan.helpers import five, local, surgery

CASES = {
    "conv channels widened": (local("conv"), local("conv", channels=9), None),
    "conv field added": (local("conv"), local("conv", fields=("p", "s", "q", "r")), None),
    "gru widened": (local("gru"), local("gru", hidden=12), None),
    "gru field added": (local("gru"), local("gru", fields=("x", "heading", "y", "speed")), None),
    "attention heads added": (local("attention"), local("attention", heads=3), None),
    "multihead attention heads added": (local("attention", builtin=True), local("attention", heads=3, builtin=True), None),
    "stack layer widened": (local("stack"), local("stack", widths=(12, 20)), None),
    "stack layer inserted": (local("stack"), local("stack", widths=(12, 12, 12)), {"rename": {"params": {"net.4": "net.6"}}}),
    "residual block inserted": (local("residual"), local("residual", blocks=3), {"rename": {"params": {"blocks.1": "blocks.2"}}}),
    "residual block appended": (local("residual"), local("residual", blocks=3), None),
    "action added to stack": (local("stack"), local("stack", actions=("left", "right", "stay", "jump")), None),
    "input renamed": (local("stack"), local("stack", input_name="observation", fields=("a", "b", "z", "d")),
                      {"rename": {"atoms": {"field:state": "field:observation", "field:state/c": "field:observation/z"}}}),
    "tied table gains a token": (local("tied"), local("tied", tokens=("the", "dog", "cat", "sat", "on", "mat")), None),
    "tied table reordered": (local("tied"), local("tied", tokens=("mat", "on", "sat", "cat", "the")), None),
    "net2net stack widened": (local("stack"), local("stack", widths=(20, 12)), {"widen": "net2net"}),
    "net2net lstm widened": (five(), five(lstm_width=48, unit_width=20), {"widen": "net2net"}),
}


@lru_cache(maxsize=None)
def run(case: str):
    old, new, options = CASES[case]
    return surgery(old, new, options)


@pytest.mark.parametrize("case", list(CASES))
def test_model_change_is_exact(case):
    result = run(case)

    assert result.plan.exact, result.plan.notes
    assert result.report.passed, f"{result.report.summary()}\n{result.report.table()}"
    assert result.report.max_rel <= 1e-6


def test_conv_new_channels_are_random_in_zero_out():
    result = run("conv channels widened")
    conv1 = result.new_state["conv1.weight"]
    conv2 = result.new_state["conv2.weight"]
    assert conv1.shape == (9, 3, 3)
    assert torch.count_nonzero(conv1[6:]) > 0
    assert torch.count_nonzero(conv2[:, 6:]) == 0
    # BatchNorm statistics follow the channel axis; new channels start at mean 0, variance 1.
    assert torch.equal(result.new_state["norm1.running_var"][6:], torch.ones(3))
    assert torch.equal(result.new_state["norm1.running_mean"][:6], result.old_module.state_dict()["norm1.running_mean"])


def test_gru_widening_matches_three_gate_blocks():
    plan = run("gru widened").plan
    axis = plan.param("gru.weight_hh_l0").axes[0]
    assert axis.blocks == 3
    assert axis.index() == [*range(0, 8), -1, -1, -1, -1, *range(8, 16), -1, -1, -1, -1, *range(16, 24), -1, -1, -1, -1]


def test_new_heads_have_zero_output_projection():
    result = run("attention heads added")
    out = result.new_state["attention.out.weight"]
    assert out.shape == (8, 12)
    assert torch.count_nonzero(out[:, 8:]) == 0
    assert torch.count_nonzero(result.new_state["attention.query.weight"][8:]) > 0

    builtin = run("multihead attention heads added").plan.param("attention.in_proj_weight")
    assert builtin.axes[0].blocks == 3
    assert builtin.axes[0].index()[:12] == [*range(8), -1, -1, -1, -1]


def test_inserted_layer_is_identity():
    result = run("stack layer inserted")
    weight = result.new_state["net.4.weight"]
    assert torch.equal(weight, torch.eye(12))
    assert torch.count_nonzero(result.new_state["net.4.bias"]) == 0
    assert result.plan.param("net.6.weight").source == "net.4.weight"


def test_inserted_residual_block_has_zero_projection():
    result = run("residual block inserted")
    assert torch.count_nonzero(result.new_state["blocks.1.fc2.weight"]) == 0
    assert torch.count_nonzero(result.new_state["blocks.1.fc2.bias"]) == 0
    assert torch.count_nonzero(result.new_state["blocks.1.fc1.weight"]) > 0
    assert result.plan.param("blocks.2.fc1.weight").source == "blocks.1.fc1.weight"


def test_post_ln_block_cannot_be_identity():
    # The new first block reads the output of a Linear layer, so no LayerNorm weight and bias can move into it.
    old = local("residual", post_norm=True)
    new = local("residual", blocks=3, post_norm=True)
    options = {"rename": {"params": {"blocks.0": "blocks.1", "blocks.1": "blocks.2"}}}
    with pytest.raises(PlanError, match="post-LN"):
        plan_specs(old, new, parse_options(options))
    result = surgery(old, new, {**options, "accept_approximate": True})
    assert not result.plan.exact
    assert result.report.max_rel > 1e-6


def test_net2net_replicates_units():
    result = run("net2net stack widened")
    pp = result.plan.param("net.0.weight")
    assert pp.axes[0].index() == [*range(12), *range(8)]
    consumer = result.plan.param("net.2.weight")
    assert consumer.axes[1].scale == ((0, 8, 0.5), (12, 8, 0.5))
    old = result.old_module.state_dict()
    assert torch.equal(result.new_state["net.0.weight"][12:], old["net.0.weight"][:8])
    assert torch.allclose(result.new_state["net.2.weight"][:, 12:], old["net.2.weight"][:, :8] / 2)


def test_small_random_is_approximate():
    result = surgery(five(), five(lstm_width=48), {"init": {"new_unit_out": {"rule": "small_random", "std": 1e-3}}})
    assert not result.plan.exact
    assert 0 < result.plan.expected_error < 0.1
    assert any("new_unit_out rule normal" in note for note in result.plan.notes)
    assert not result.report.exact_plan
    assert result.report.max_rel > 1e-6
    hh = result.new_state["lstm.weight_hh_l0"]
    assert torch.count_nonzero(hh[:32, 32:]) == 32 * 16


def test_zero_logit_for_new_action_is_approximate():
    result = surgery(local("stack"), local("stack", actions=("left", "right", "stay", "jump")), {"init": {"new_output": "zero"}})
    assert not result.plan.exact
    assert result.plan.expected_error == pytest.approx(0.25)
    # Old logits are unchanged; only the distribution over actions moves.
    assert result.report.max_rel <= 1e-6


def test_small_random_everywhere_is_approximate():
    result = surgery(five(), five(lstm_width=40, global_fields=["game_time", "is_day", "roshan_alive", "tower_count"]),
                     {"init": {"all": {"rule": "small_random", "std": 1e-3}}})
    rules = {(r.situation, r.rule) for pp in result.plan.params for r in pp.regions}
    assert rules == {("new_input", "normal"), ("new_unit", "normal"), ("new_unit_out", "normal")}
    assert not result.plan.exact
    assert not result.report.exact_plan
    assert "APPROXIMATE" in result.report.summary()


def test_narrower_layer_is_rejected():
    with pytest.raises(PlanError, match=r"net.0.weight: axis 0 drops 4 old indices"):
        plan_specs(local("stack"), local("stack", widths=(8, 12)))


def test_input_rename_keeps_columns():
    result = run("input renamed")
    assert result.plan.param("net.0.weight").axes[1].index() == [0, 1, 2, 3]
    assert dict(result.plan.renames)["field:state/c"] == "field:observation/z"


def test_tied_table_rows_match_by_token():
    result = run("tied table gains a token")
    assert result.plan.param("embed.weight").axes[0].index() == [0, -1, 1, 2, 3, 4]
    assert result.plan.param("decode.weight").tied_to == "embed.weight"
    assert result.new_state["decode.weight"] is result.new_state["embed.weight"]
    assert float(result.new_state["decode.bias"][1]) == -1e9
    assert run("tied table reordered").plan.param("embed.weight").axes[0].index() == [4, 3, 2, 1, 0]
