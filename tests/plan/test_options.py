"""Bad plan options fail with a message that names the entry."""

from __future__ import annotations

import pytest

from pipeline.examples.five_config import SMALL
from pipeline.plan import PlanError, load_options, parse_options, plan_specs
from tests.plan.helpers import five, local

GLOBALS = list(SMALL.global_fields)
NEW = five(global_fields=[g for g in GLOBALS if g != "is_day"], unit_types=list(SMALL.unit_types) + ["roshan"])


def plan_with(options, new=NEW, old=None):
    return plan_specs(old or five(), new, parse_options(options, source="opts.yaml"))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"rename": {"atoms": {"field:globals/is_day": "field:globals/daytime"}}},
         r"rename.atoms\['field:globals/is_day'\]: the new model has no atom 'field:globals/daytime'"),
        ({"rename": {"atoms": {"field:globals/night": "field:globals/game_time"}}},
         r"rename.atoms\['field:globals/night'\]: the old model has no atom 'field:globals/night'"),
        ({"constants": {"globals/game_time": 1.0}},
         r"constants\['globals/game_time'\]: field 'field:globals/game_time' is still present in the new model"),
        ({"constants": {"globals/weather": 1.0}},
         r"constants\['globals/weather'\]: the old model has no continuous field 'field:globals/weather'"),
        ({"categories": {"unit_types": {"rule": "copy_row", "token": "dragon"}}},
         r"categories.unit_types: token 'dragon' is not in the new vocabulary"),
        ({"categories": {"unit_types": {"rule": "copy_row", "token": "roshan"}}},
         r"token 'roshan' is new in the new model"),
        ({"categories": {"spells": "mean"}}, r"categories.spells: the new model has no vocabulary 'spells'"),
        ({"outputs": {"chat": "zero"}}, r"outputs.chat: the new model has no output 'chat'"),
        ({"rename": {"params": {"encoders.weather": "encoders.globals"}}},
         r"rename.params\['encoders.weather'\]: the old model has no parameter or module"),
        ({"params": {"decoder.*": {"new_unit": "zero"}}}, r"params\['decoder.\*'\]: no parameter of the new model matches"),
        ({"inserted": {"blocks.9": "residual"}}, r"inserted\['blocks.9'\]: the new model has no module"),
        ({"blocks": {"lstm.bias": {0: 4}}}, r"blocks\['lstm.bias'\]: the new model has no parameter"),
    ],
)
def test_bad_option_names_the_entry(options, message):
    with pytest.raises(PlanError, match=message) as caught:
        plan_with(options)
    assert str(caught.value).startswith("opts.yaml: ")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"init": {"new_unit": "fancy"}}, r"init.new_unit: unknown init rule 'fancy' for new_unit; expected one of \['default', 'zero', 'small_random'\]"),
        ({"init": {"new_input": "mask"}}, r"init.new_input: unknown init rule 'mask'"),
        ({"init": {"new_gadget": "zero"}}, r"init.new_gadget: unknown situation 'new_gadget'"),
        ({"init": {"new_output": {"rule": "mask", "value": float("inf")}}}, r"init.new_output: parameter 'value' of rule 'mask' must be a finite number"),
        ({"init": {"new_unit": {"rule": "default", "scale": -1}}}, r"init.new_unit: parameter 'scale' must not be negative"),
        ({"init": {"new_unit": {"rule": "default", "gain": 2}}}, r"init.new_unit: rule 'default' takes \['scale'\], not \['gain'\]"),
        ({"init": {"new_category": {"rule": "copy_row"}}}, r"init.new_category: rule 'copy_row' needs the parameter 'token'"),
        ({"params": {"lstm.*": {"new_unit_out": "random"}}}, r"params\['lstm.\*'\].new_unit_out: unknown init rule 'random'"),
        ({"inserted": {"blocks.1": "magic"}}, r"inserted\['blocks.1'\] is 'magic'"),
        ({"widen": "stretch"}, r"'widen' is 'stretch'"),
        ({"seed": -1}, r"'seed' must be a non-negative integer"),
        ({"surgery": True}, r"unknown option keys \['surgery'\]"),
        ({"constants": {"globals/is_day": "yes"}}, r"constants\['globals/is_day'\] must be a finite number"),
        ({"rename": {"atoms": {"globals/is_day": "globals/daytime"}}}, r"rename.atoms\['globals/is_day'\]: invalid atom"),
        ({"accept_approximate": "yes"}, r"'accept_approximate' must be true or false"),
    ],
)
def test_invalid_option_syntax_is_rejected(options, message):
    with pytest.raises(PlanError, match=message):
        parse_options(options, source="opts.yaml")


def test_blocks_that_do_not_divide_fail():
    with pytest.raises(PlanError, match=r"parameter 'net.0.weight' axis 0: .* multiples of its 5 blocks"):
        plan_with({"blocks": {"net.0.weight": {0: 5}}}, new=local("stack", widths=(16, 12)), old=local("stack"))


def test_options_file_errors(tmp_path):
    with pytest.raises(PlanError, match="cannot read plan options"):
        load_options(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("init: [unclosed")
    with pytest.raises(PlanError, match="not valid YAML"):
        load_options(bad)
    good = tmp_path / "good.yaml"
    good.write_text("seed: 4\nconstants: {globals/is_day: 0.5}\ninit: {new_unit: {rule: default, scale: 0.5}}\n")
    options = load_options(good)
    assert options.seed == 4
    assert options.constants == (("field:globals/is_day", 0.5),)
    assert options.rule_for("new_unit", "lstm.weight_ih_l0").params == (("scale", 0.5),)


def test_rule_lookup_order():
    options = parse_options({
        "init": {"new_unit_out": "zero", "new_output": {"rule": "mask", "value": -1e4}},
        "params": {"lstm.*": {"new_unit_out": "small_random"}},
        "outputs": {"value": "zero"},
    })
    assert options.rule_for("new_unit_out", "lstm.weight_hh_l0").rule == "small_random"
    assert options.rule_for("new_unit_out", "heads.value.weight").rule == "zero"
    assert options.rule_for("new_output", "heads.value.bias", "value").rule == "zero"
    assert options.rule_for("new_output", "heads.x.bias", "action_type").params == (("value", -1e4),)
    assert options.rule_for("new_head", "heads.x.bias").rule == "default"


def test_fold_without_bias_needs_approval():
    from pipeline.models.spec import ModelSpec

    old = ModelSpec("tests.plan.test_options:biasless", {"fields": ("a", "b", "c")})
    new = ModelSpec("tests.plan.test_options:biasless", {"fields": ("a", "c")})
    with pytest.raises(PlanError, match=r"cannot be folded: 'layer.weight' has no matching bias"):
        plan_specs(old, new, parse_options({"constants": {"state/b": 2.0}}))
    plan = plan_specs(old, new, parse_options({"constants": {"state/b": 2.0}, "accept_approximate": True}))
    assert not plan.exact
    # A removed field at constant 0 drops exactly, bias or not.
    assert plan_specs(old, new).exact


def biasless(fields=("a", "b", "c")):
    from torch import nn

    from pipeline.schema import FeatureSchema, InputSpec, OutputSpec

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(len(fields), 4, bias=False)
            self.head = nn.Linear(4, 2)

        def forward(self, state):
            return {"out": self.head(self.layer(state).relu())}

    schema = FeatureSchema((InputSpec("state", "continuous", (len(fields),), fields=tuple(fields)),), outputs=(OutputSpec("out", ("p", "q")),))
    return Model(), schema
