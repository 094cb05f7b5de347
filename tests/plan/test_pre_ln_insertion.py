"""Inserting a pre-LN transformer layer zeroes the output projection of both sublayers."""

from __future__ import annotations

import torch

from tests.plan.helpers import local, surgery


def test_pre_ln_layer_appended_is_identity():
    result = surgery(local("pre_ln"), local("pre_ln", layers=3))

    assert result.plan.exact
    assert result.report.passed
    assert result.report.max_rel <= 1e-6
    assert torch.count_nonzero(result.new_state["layers.2.attn.out_proj.weight"]) == 0
    assert torch.count_nonzero(result.new_state["layers.2.attn.out_proj.bias"]) == 0
    assert torch.count_nonzero(result.new_state["layers.2.fc2.weight"]) == 0
    assert torch.count_nonzero(result.new_state["layers.2.fc1.weight"]) > 0


def test_pre_ln_layer_inserted_in_middle_is_identity():
    options = {"rename": {"params": {"layers.1": "layers.2"}}}
    result = surgery(local("pre_ln"), local("pre_ln", layers=3), options)

    assert result.plan.exact
    assert result.report.max_rel <= 1e-6
    assert result.plan.param("layers.2.fc1.weight").source == "layers.1.fc1.weight"
    assert torch.count_nonzero(result.new_state["layers.1.attn.out_proj.weight"]) == 0
