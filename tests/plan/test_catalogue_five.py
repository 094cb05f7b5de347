"""The change catalogue on the small Five-like policy: train, plan, apply, verify exactness.

Each case trains the old policy for a few Adam steps, plans the surgery to a config
variant, applies the plan to the trained state dict and compares the two models on probe
inputs. Default rules must keep every old output within 1e-6 relative.
"""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from pipeline.examples.five_config import SMALL
from tests.plan.helpers import five, surgery

UNITS = list(SMALL.unit_fields)
HEROES = list(SMALL.hero_fields)
GLOBALS = list(SMALL.global_fields)
TYPES = list(SMALL.unit_types)
ITEMS = list(SMALL.items)
HEADS = {name: list(fields) for name, fields in SMALL.action_heads.items()}

CASES = {
    "field at end": (five(global_fields=GLOBALS + ["tower_count"]), None),
    "field in middle": (five(unit_fields=UNITS[:3] + ["shield"] + UNITS[3:]), None),
    "field in entity array": (five(hero_fields=HEROES + ["deaths"]), None),
    "field removed": (five(global_fields=[g for g in GLOBALS if g != "is_day"]), None),
    "field removed as constant": (five(global_fields=[g for g in GLOBALS if g != "is_day"]), {"constants": {"globals/is_day": 1.0}}),
    "fields reordered": (five(unit_fields=UNITS[::-1]), None),
    "field renamed": (five(global_fields=["game_time", "daytime", "roshan_alive"]),
                      {"rename": {"atoms": {"field:globals/is_day": "field:globals/daytime"}}}),
    "categories added": (five(unit_types=TYPES + ["roshan"], items=ITEMS[:2] + ["gem"] + ITEMS[2:]), None),
    "categories added as mean": (five(unit_types=TYPES + ["roshan"]), {"init": {"new_category": "mean"}}),
    "categories added as copy": (five(unit_types=TYPES + ["roshan"]),
                                 {"categories": {"unit_types": {"rule": "copy_row", "token": "tower"}}}),
    "category removed": (five(unit_types=[t for t in TYPES if t != "tower"]), None),
    "categories reordered": (five(unit_types=TYPES[::-1], items=ITEMS[::-1]), None),
    "mlp widened": (five(unit_width=24), None),
    "lstm widened": (five(lstm_width=48), None),
    "action added": (five(action_heads={**HEADS, "action_type": HEADS["action_type"] + ["teleport"]}), None),
    "head added": (five(action_heads={**HEADS, "delay": ["frame_0", "frame_1"]}), None),
    "several at once": (
        five(
            unit_fields=UNITS[:2] + ["shield"] + UNITS[2:],
            global_fields=[g for g in GLOBALS if g != "roshan_alive"] + ["tower_count"],
            unit_types=TYPES[::-1] + ["roshan"],
            lstm_width=40,
            unit_width=20,
            action_heads={**HEADS, "action_type": HEADS["action_type"] + ["teleport"], "delay": ["frame_0"]},
        ),
        {"constants": {"globals/roshan_alive": 1.0}, "init": {"new_category": "mean"}},
    ),
}


@lru_cache(maxsize=None)
def run(case: str):
    new, options = CASES[case]
    return surgery(five(), new, options)


@pytest.mark.parametrize("case", list(CASES))
def test_five_change_is_exact(case):
    result = run(case)

    assert result.plan.exact, result.plan.notes
    assert result.plan.expected_error == 0.0
    assert result.report.passed, f"{result.report.summary()}\n{result.report.table()}"
    assert result.report.max_rel <= 1e-6
    assert len(result.report.fields) >= 20


def _axis(plan, name, axis):
    return plan.param(name).axes[axis].index()


def test_field_in_middle_shifts_columns():
    plan = run("field in middle").plan
    # 8 unit fields then 4 embedding columns; "shield" lands at column 3.
    assert _axis(plan, "encoders.units.0.weight", 1) == [0, 1, 2, -1, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    region = plan.param("encoders.units.0.weight").regions[0]
    assert (region.situation, region.rule, region.box) == ("new_input", "zero", (((0, 16),), ((3, 4),)))


def test_reordered_vocabulary_permutes_rows():
    plan = run("categories reordered").plan
    assert _axis(plan, "embeddings.unit_type.weight", 0) == [4, 3, 2, 1, 0]
    assert _axis(plan, "embeddings.inventory.weight", 0) == [5, 4, 3, 2, 1, 0]


def test_renamed_field_keeps_its_column():
    result = run("field renamed")
    pp = result.plan.param("encoders.globals.0.weight")
    assert pp.axes[1].index() == [0, 1, 2]
    assert pp.regions == ()
    assert torch.equal(result.new_state["encoders.globals.0.weight"], result.old_module.state_dict()["encoders.globals.0.weight"])


def test_removed_field_is_dropped_or_folded():
    dropped = run("field removed")
    weight = dropped.plan.param("encoders.globals.0.weight")
    assert weight.axes[1].index() == [0, 2]
    assert dropped.plan.param("encoders.globals.0.bias").folds == ()

    folded = run("field removed as constant")
    bias = folded.plan.param("encoders.globals.0.bias")
    assert len(bias.folds) == 1
    assert (bias.folds[0].columns, bias.folds[0].constants) == ((1,), (1.0,))
    old = folded.old_module.state_dict()
    expected = old["encoders.globals.0.bias"] + old["encoders.globals.0.weight"][:, 1]
    assert torch.allclose(folded.new_state["encoders.globals.0.bias"], expected, atol=1e-7)
    assert dict(folded.plan.constants) == {"field:globals/is_day": 1.0}


def test_category_rules_fill_new_rows():
    zero = run("categories added")
    assert torch.count_nonzero(zero.new_state["embeddings.unit_type.weight"][5]) == 0

    mean = run("categories added as mean")
    old_rows = mean.old_module.state_dict()["embeddings.unit_type.weight"]
    assert torch.allclose(mean.new_state["embeddings.unit_type.weight"][5], old_rows.mean(dim=0))

    copy = run("categories added as copy")
    assert torch.equal(copy.new_state["embeddings.unit_type.weight"][5], old_rows[2])


def test_removed_category_row_is_dropped():
    plan = run("category removed").plan
    assert _axis(plan, "embeddings.unit_type.weight", 0) == [0, 1, 3, 4]


def test_wider_lstm_keeps_gate_blocks():
    result = run("lstm widened")
    ih = result.plan.param("lstm.weight_ih_l0")
    assert ih.axes[0].blocks == 4
    expected = []
    for gate in range(4):
        expected += list(range(gate * 32, gate * 32 + 32)) + [-1] * 16
    assert ih.axes[0].index() == expected
    hh = result.plan.param("lstm.weight_hh_l0")
    situations = {(r.situation, r.rule) for r in hh.regions}
    assert situations == {("new_unit", "uniform"), ("new_unit_out", "zero")}
    new_hh = result.new_state["lstm.weight_hh_l0"]
    # Weights from new units into old gates are zero; new gates read new units randomly.
    assert torch.count_nonzero(new_hh[0:32, 32:]) == 0
    assert torch.count_nonzero(new_hh[32:48, 32:]) > 0
    bound = 1 / 48**0.5
    assert float(new_hh[32:48].abs().max()) <= bound


def test_new_action_is_masked():
    result = run("action added")
    bias = result.new_state["heads.action_type.bias"]
    assert float(bias[5]) == -1e9
    assert torch.count_nonzero(result.new_state["heads.action_type.weight"][5]) == 0
    assert "action_type/teleport" in result.report.not_compared
    # The masked logit carries no probability in float32.
    logits = torch.cat([torch.randn(4, 5) * 10, torch.full((4, 1), -1e9)], dim=1)
    assert float(torch.softmax(logits, dim=1)[:, 5].max()) == 0.0


def test_new_head_gets_default_init():
    plan = run("head added").plan
    weight = plan.param("heads.delay.weight")
    assert weight.source is None
    assert (weight.regions[0].situation, weight.regions[0].rule) == ("new_head", "uniform")
    assert weight.regions[0].exact


def test_layernorm_after_widened_layer_is_rejected():
    from pipeline.plan import PlanError, plan_specs

    with pytest.raises(PlanError, match="normalisation statistics"):
        plan_specs(five(), five(trunk_width=40))
    approximate = surgery(five(), five(trunk_width=40), {"accept_approximate": True})
    assert not approximate.plan.exact
    assert approximate.plan.expected_error > 0
    assert not approximate.report.exact_plan
    assert "APPROXIMATE" in approximate.report.summary()
