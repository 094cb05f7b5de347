"""The OpenAI-Five-like policy: counts, config variants, pooling behaviour and config errors."""

from __future__ import annotations

import pytest
import torch

from pipeline.examples.five import build
from pipeline.examples.five_config import SMALL, FiveConfigError
from pipeline.examples.inputs import example_inputs, observation_count

FULL_PARAMETERS = 158_358_581


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in module.named_parameters()}


def _small_shapes(**config) -> tuple[dict[str, tuple[int, ...]], object]:
    with torch.device("meta"):
        module, schema = build("small", **config)
    return _shapes(module), schema


def _inputs(schema, seed: int = 0) -> dict[str, torch.Tensor]:
    return example_inputs(schema, 4, generator=torch.Generator().manual_seed(seed))


# Counts --------------------------------------------------------------------------------------


def test_full_counts_on_meta():
    with torch.device("meta"):
        module, schema = build("full")
    assert all(p.is_meta for p in module.parameters())

    parameters = sum(p.numel() for p in module.parameters())
    assert parameters == FULL_PARAMETERS
    assert abs(parameters / 158.5e6 - 1) < 0.01
    assert observation_count(schema) == 16029
    assert observation_count(schema) >= 16000
    assert module.lstm.hidden_size == 4096


def test_small_parameter_count():
    module, _ = build("small")
    assert sum(p.numel() for p in module.parameters()) == 11292


def test_small_parameter_names():
    shapes, _ = _small_shapes()
    assert sorted(shapes) == sorted(
        [
            "embeddings.unit_type.weight",
            "embeddings.inventory.weight",
            *(f"encoders.units.{i}.{kind}" for i in (0, 2) for kind in ("weight", "bias")),
            *(f"encoders.heroes.{i}.{kind}" for i in (0, 2) for kind in ("weight", "bias")),
            "encoders.globals.0.weight",
            "encoders.globals.0.bias",
            "trunk.0.weight",
            "trunk.0.bias",
            "trunk.2.weight",
            "trunk.2.bias",
            "lstm.weight_ih_l0",
            "lstm.weight_hh_l0",
            "lstm.bias_ih_l0",
            "lstm.bias_hh_l0",
            "unit_keys.weight",
            "unit_keys.bias",
            *(
                f"heads.{head}.{kind}"
                for head in ("action_type", "move_x", "move_y", "target_unit", "value")
                for kind in ("weight", "bias")
            ),
        ]
    )


def test_small_schema_names_inputs_and_outputs():
    _, schema = _small_shapes()
    assert [i.name for i in schema.inputs] == [
        "units", "unit_type", "unit_mask", "heroes", "inventory", "globals",
    ]  # fmt: skip
    assert schema.input("units").fields == SMALL.unit_fields
    assert schema.input("unit_mask").kind == "auxiliary"
    assert schema.vocabularies == {"unit_types": SMALL.unit_types, "items": SMALL.items}
    assert [o.name for o in schema.outputs] == [
        "action_type", "move_x", "move_y", "target_unit", "value",
    ]  # fmt: skip
    assert schema.output("move_x").fields == ("-2", "-1", "0", "+1", "+2")
    assert schema.output("target_unit").fields == tuple(f"unit_{i}" for i in range(6))


# Config variants ------------------------------------------------------------------------------


def test_variant_field_inserted_in_middle():
    base, _ = _small_shapes()
    fields = list(SMALL.unit_fields)
    fields.insert(4, "magic_resistance")
    shapes, schema = _small_shapes(unit_fields=fields)

    assert schema.input("units").fields[4] == "magic_resistance"
    assert schema.input("units").shape == (6, 9)
    assert shapes.keys() == base.keys()
    changed = {name for name in base if shapes[name] != base[name]}
    assert changed == {"encoders.units.0.weight"}
    assert shapes["encoders.units.0.weight"] == (16, 13)


def test_variant_field_removed():
    base, _ = _small_shapes()
    fields = [f for f in SMALL.global_fields if f != "is_day"]
    shapes, schema = _small_shapes(global_fields=fields)

    assert schema.input("globals").fields == ("game_time", "roshan_alive")
    assert shapes.keys() == base.keys()
    changed = {name for name in base if shapes[name] != base[name]}
    assert changed == {"encoders.globals.0.weight"}


def test_variant_reordered_vocabulary():
    base, _ = _small_shapes()
    reordered = tuple(reversed(SMALL.unit_types))
    shapes, schema = _small_shapes(unit_types=list(reordered))

    assert schema.vocabularies["unit_types"] == reordered
    assert shapes == base


def test_variant_wider_lstm():
    base, _ = _small_shapes()
    shapes, schema = _small_shapes(lstm_width=48)

    assert shapes.keys() == base.keys()
    assert shapes["lstm.weight_hh_l0"] == (4 * 48, 48)
    assert shapes["heads.action_type.weight"] == (5, 48)
    assert shapes["trunk.0.weight"] == base["trunk.0.weight"]
    assert shapes["encoders.units.0.weight"] == base["encoders.units.0.weight"]
    assert [o.name for o in schema.outputs] == [
        "action_type", "move_x", "move_y", "target_unit", "value",
    ]  # fmt: skip


def test_variant_extra_action():
    base, _ = _small_shapes()
    actions = [*SMALL.action_heads["action_type"], "buy_item"]
    heads = {**SMALL.action_heads, "action_type": actions}
    shapes, schema = _small_shapes(action_heads=heads)

    assert schema.output("action_type").fields[-1] == "buy_item"
    changed = {name for name in base if shapes[name] != base[name]}
    assert changed == {"heads.action_type.weight", "heads.action_type.bias"}
    assert shapes["heads.action_type.weight"] == (6, 32)


def test_variant_extra_head():
    base, _ = _small_shapes()
    heads = {**SMALL.action_heads, "pick_item": ["slot_0", "slot_1", "slot_2"]}
    shapes, schema = _small_shapes(action_heads=heads)

    assert set(shapes) - set(base) == {"heads.pick_item.weight", "heads.pick_item.bias"}
    assert all(shapes[name] == base[name] for name in base)
    assert schema.output("pick_item").fields == ("slot_0", "slot_1", "slot_2")
    module, schema = build("small", action_heads=heads)
    outputs = module(**_inputs(schema))
    assert tuple(outputs["pick_item"].shape) == (4, 3)


def test_variant_more_units():
    base, _ = _small_shapes()
    shapes, schema = _small_shapes(max_units=9)
    assert shapes == base
    assert schema.input("units").shape == (9, 8)
    assert len(schema.output("target_unit").fields) == 9


# Behaviour -------------------------------------------------------------------------------------


@torch.no_grad()
def test_absent_units_do_not_change_outputs():
    module, schema = build("small")
    inputs = _inputs(schema)
    inputs["unit_mask"][:, 4:] = False
    changed = dict(inputs)
    changed["units"] = inputs["units"].clone()
    changed["units"][:, 4:] += 10.0
    changed["unit_type"] = inputs["unit_type"].clone()
    changed["unit_type"][:, 4:] = 0

    first, second = module(**inputs), module(**changed)
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0)
    assert bool((first["target_unit"][:, 4:] == torch.finfo(torch.float32).min).all())
    assert bool((first["target_unit"][:, :4] > torch.finfo(torch.float32).min).all())


@torch.no_grad()
def test_present_unit_changes_outputs():
    module, schema = build("small")
    inputs = _inputs(schema)
    changed = dict(inputs)
    changed["units"] = inputs["units"].clone()
    changed["units"][:, 0] += 10.0

    assert not torch.equal(module(**inputs)["value"], module(**changed)["value"])


@torch.no_grad()
def test_sample_without_units_is_finite():
    module, schema = build("small")
    inputs = _inputs(schema)
    inputs["unit_mask"][:] = False
    outputs = module(**inputs)
    for name, value in outputs.items():
        if name != "target_unit":
            assert bool(torch.isfinite(value).all()), name


@torch.no_grad()
def test_inventory_slot_order_is_irrelevant():
    module, schema = build("small")
    inputs = _inputs(schema)
    permuted = dict(inputs)
    permuted["inventory"] = inputs["inventory"].flip(-1)

    first, second = module(**inputs), module(**permuted)
    for name in first:
        torch.testing.assert_close(first[name], second[name])


# Config errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"size": "medium"}, "size 'medium' is invalid; expected one of ['full', 'small']"),
        ({"lstm_size": 8}, "unknown config keys ['lstm_size']"),
        ({"unit_fields": []}, "config 'unit_fields' is empty"),
        ({"unit_fields": "x"}, "config 'unit_fields' must be a list of names, got 'x'"),
        ({"items": ["a", "b", "a"]}, "config 'items' names ['a'] more than once"),
        ({"lstm_width": 0}, "config 'lstm_width' must be a positive integer, got 0"),
        ({"max_units": True}, "config 'max_units' must be a positive integer, got True"),
        ({"action_heads": {}}, "config 'action_heads' is empty"),
        ({"action_heads": ["move"]}, "config 'action_heads' must map head names"),
        ({"action_heads": {"value": ["v"]}}, "action heads ['value'] clash with the built-in"),
        ({"action_heads": {"move": []}}, "config 'action_heads.move' is empty"),
    ],
)
def test_config_error(config, message):
    with pytest.raises(FiveConfigError) as info:
        build(**config)
    assert message in str(info.value)
