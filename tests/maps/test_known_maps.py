"""Hand-written models whose interaction maps are known by construction, checked with both methods."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.maps.gradient import gradient_map
from pipeline.maps.interaction import InteractionMap
from pipeline.schema import FeatureSchema, InputSpec, OutputSpec

METHODS = ["sets", "gradient"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run on one intra-op thread: these models are tiny, and extra threads only add overhead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

def compute_map(method: str, module: nn.Module, schema: FeatureSchema) -> InteractionMap:
    if method == "sets":
        from pipeline.maps.propagate import set_map

        return set_map(module, schema)
    return gradient_map(module, schema)


def inputs_of(imap: InteractionMap, name: str, index: tuple[int, ...]) -> set[str]:
    return {str(atom) for atom in imap.element_atoms(name, index)[0]}


def outputs_of(imap: InteractionMap, name: str, index: tuple[int, ...]) -> set[str]:
    return {str(atom) for atom in imap.element_atoms(name, index)[1]}


HERO = ("hp", "mana", "gold")
HERO_ATOMS = {f"field:hero/{f}" for f in HERO}


def hero_schema(outputs: tuple[OutputSpec, ...] = (OutputSpec("out", ("o0", "o1")),), *extra: InputSpec) -> FeatureSchema:
    return FeatureSchema((InputSpec("hero", "continuous", (3,), HERO), *extra), {}, outputs)


# First layer, dense mixing, zero weights --------------------------------------------------


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 4)
        self.second = nn.Linear(4, 2)

    def forward(self, hero):
        return self.second(torch.relu(self.first(hero)))


@pytest.mark.parametrize("method", METHODS)
def test_first_layer_column_belongs_to_field(method):
    imap = compute_map(method, Mlp(), hero_schema())

    for row in range(4):
        for column, field in enumerate(HERO):
            assert inputs_of(imap, "first.weight", (row, column)) == {f"field:hero/{field}"}
        assert inputs_of(imap, "first.bias", (row,)) == HERO_ATOMS


@pytest.mark.parametrize("method", METHODS)
def test_dense_layer_carries_all_upstream_atoms(method):
    imap = compute_map(method, Mlp(), hero_schema())

    for row in range(2):
        for column in range(4):
            assert inputs_of(imap, "second.weight", (row, column)) == HERO_ATOMS
            assert outputs_of(imap, "second.weight", (row, column)) == {f"output:out/o{row}"}
        assert inputs_of(imap, "second.bias", (row,)) == HERO_ATOMS
    assert outputs_of(imap, "first.weight", (0, 0)) == {"output:out/o0", "output:out/o1"}


@pytest.mark.parametrize("method", METHODS)
def test_zero_weight_still_carries_feature(method):
    module = Mlp()
    with torch.no_grad():
        module.first.weight.zero_()
        module.first.bias.zero_()
        module.second.weight[:, 1] = 0.0

    imap = compute_map(method, module, hero_schema())

    assert inputs_of(imap, "first.weight", (2, 1)) == {"field:hero/mana"}
    assert outputs_of(imap, "first.weight", (2, 1)) == {"output:out/o0", "output:out/o1"}
    assert inputs_of(imap, "second.weight", (0, 1)) == HERO_ATOMS
    assert outputs_of(imap, "second.weight", (1, 1)) == {"output:out/o1"}


class TwoBranches(nn.Module):
    """Hero and world fields mix in a dense layer, and loot reaches only the ``items`` output."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(5, 4)
        self.after = nn.Linear(4, 2)
        self.items = nn.Linear(2, 1)

    def forward(self, hero, world, loot):
        mixed = self.after(torch.tanh(self.mix(torch.cat([hero, world], -1))))
        return {"out": mixed, "items": self.items(loot)}


def two_branch_schema() -> FeatureSchema:
    return FeatureSchema(
        (
            InputSpec("hero", "continuous", (3,), HERO),
            InputSpec("world", "continuous", (2,), ("time", "day")),
            InputSpec("loot", "continuous", (2,), ("gold", "wood")),
        ),
        {},
        (OutputSpec("out", ("o0", "o1")), OutputSpec("items", ("count",))),
    )


@pytest.mark.parametrize("method", METHODS)
def test_mixing_layer_excludes_separate_branch(method):
    imap = compute_map(method, TwoBranches(), two_branch_schema())
    mixed = HERO_ATOMS | {"field:world/time", "field:world/day"}

    assert inputs_of(imap, "mix.weight", (1, 3)) == {"field:world/time"}
    assert inputs_of(imap, "after.weight", (0, 2)) == mixed
    assert inputs_of(imap, "after.bias", (1,)) == mixed
    assert inputs_of(imap, "items.weight", (0, 1)) == {"field:loot/wood"}
    assert outputs_of(imap, "mix.weight", (0, 0)) == {"output:out/o0", "output:out/o1"}
    assert outputs_of(imap, "items.bias", (0,)) == {"output:items/count"}


class Unused(nn.Module):
    """A product that no output reads still records what it multiplies."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(3, 2)
        self.head = nn.Linear(3, 1)

    def forward(self, hero):
        self.unused(hero)
        return self.head(hero)


@pytest.mark.parametrize("method", METHODS)
def test_unused_product_records_inputs_but_feeds_nothing(method):
    imap = compute_map(method, Unused(), hero_schema((OutputSpec("out", ("o",)),)))

    assert inputs_of(imap, "unused.weight", (1, 2)) == {"field:hero/gold"}
    assert inputs_of(imap, "unused.bias", (0,)) == HERO_ATOMS
    assert outputs_of(imap, "unused.weight", (1, 2)) == set()


# Embeddings ---------------------------------------------------------------------------------


class Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(5, 2)  # three categories and two rows no category reaches
        self.head = nn.Linear(2, 1)

    def forward(self, kind):
        return self.head(self.table(kind).sum(-2))


def kind_schema() -> FeatureSchema:
    return FeatureSchema(
        (InputSpec("kind", "categorical", (2,), vocabulary="kinds"),),
        {"kinds": ("creep", "tower", "hero")},
        (OutputSpec("out", ("o",)),),
    )


@pytest.mark.parametrize("method", METHODS)
def test_embedding_row_belongs_to_category(method):
    imap = compute_map(method, Embed(), kind_schema())

    for row, token in enumerate(("creep", "tower", "hero")):
        for column in range(2):
            assert inputs_of(imap, "table.weight", (row, column)) == {f"category:kinds/{token}"}
            assert outputs_of(imap, "table.weight", (row, column)) == {"output:out/o"}
    all_kinds = {"category:kinds/creep", "category:kinds/tower", "category:kinds/hero"}
    assert inputs_of(imap, "head.weight", (0, 1)) == all_kinds


@pytest.mark.parametrize("method", METHODS)
def test_rows_beyond_vocabulary_record_nothing(method):
    imap = compute_map(method, Embed(), kind_schema())

    for row in (3, 4):
        assert inputs_of(imap, "table.weight", (row, 0)) == set()
        assert outputs_of(imap, "table.weight", (row, 1)) == set()


class ItemBag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(3, 2, mode="max")
        self.head = nn.Linear(2, 1)

    def forward(self, slots):
        return self.head(self.bag(slots))


@pytest.mark.parametrize("method", METHODS)
def test_embedding_bag_row_belongs_to_category(method):
    schema = FeatureSchema(
        (InputSpec("slots", "categorical", (4,), vocabulary="items"),),
        {"items": ("tango", "salve", "boots")},
        (OutputSpec("out", ("o",)),),
    )

    imap = compute_map(method, ItemBag(), schema)

    assert inputs_of(imap, "bag.weight", (1, 0)) == {"category:items/salve"}
    assert inputs_of(imap, "head.weight", (0, 0)) == {"category:items/tango", "category:items/salve", "category:items/boots"}


# Biases ---------------------------------------------------------------------------------------


class Shifted(nn.Module):
    """A bias added elementwise to two concatenated inputs, with no mixing before it."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(5))
        self.norm = nn.LayerNorm(3)
        self.head = nn.Linear(5, 1)

    def forward(self, hero, world):
        shifted = torch.cat([self.norm(hero), world], -1) + self.shift
        return self.head(shifted)


@pytest.mark.parametrize("method", METHODS)
def test_bias_records_element_it_is_added_to(method):
    schema = FeatureSchema(
        (InputSpec("hero", "continuous", (3,), HERO), InputSpec("world", "continuous", (2,), ("time", "day"))),
        {},
        (OutputSpec("out", ("o",)),),
    )

    imap = compute_map(method, Shifted(), schema)

    assert inputs_of(imap, "shift", (0,)) == HERO_ATOMS
    assert inputs_of(imap, "shift", (3,)) == {"field:world/time"}
    assert inputs_of(imap, "shift", (4,)) == {"field:world/day"}
    assert inputs_of(imap, "norm.bias", (1,)) == HERO_ATOMS
    assert outputs_of(imap, "shift", (4,)) == {"output:out/o"}


# Entities -------------------------------------------------------------------------------------


class UnitPolicy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(2, 3)
        self.head = nn.Linear(6, 2)

    def forward(self, units, hero):
        pooled = torch.relu(self.encoder(units)).amax(dim=1)
        return self.head(torch.cat([pooled, hero], -1))


@pytest.mark.parametrize("method", METHODS)
def test_entity_encoder_carries_only_entity_fields(method):
    schema = FeatureSchema(
        (InputSpec("units", "continuous", (4, 2), ("x", "y")), InputSpec("hero", "continuous", (3,), HERO)),
        {},
        (OutputSpec("out", ("o0", "o1")),),
    )

    imap = compute_map(method, UnitPolicy(), schema)

    for row in range(3):
        assert inputs_of(imap, "encoder.weight", (row, 0)) == {"field:units/x"}
        assert inputs_of(imap, "encoder.weight", (row, 1)) == {"field:units/y"}
        assert inputs_of(imap, "encoder.bias", (row,)) == {"field:units/x", "field:units/y"}
    assert inputs_of(imap, "head.weight", (1, 4)) == {"field:hero/mana"}


# Recurrence -------------------------------------------------------------------------------------


class OneStepLstm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 2, batch_first=True)
        self.head = nn.Linear(2, 2)

    def forward(self, hero):
        sequence, _ = self.lstm(hero.unsqueeze(1))
        return self.head(sequence[:, 0])


@pytest.mark.parametrize("method", METHODS)
def test_lstm_weight_hh_carries_input_atoms(method):
    imap = compute_map(method, OneStepLstm(), hero_schema())

    for row in range(8):
        for column in range(2):
            assert inputs_of(imap, "lstm.weight_hh_l0", (row, column)) == HERO_ATOMS
        assert inputs_of(imap, "lstm.bias_hh_l0", (row,)) == HERO_ATOMS
        assert inputs_of(imap, "lstm.weight_ih_l0", (row, 2)) == {"field:hero/gold"}
    assert outputs_of(imap, "lstm.weight_hh_l0", (7, 1)) == {"output:out/o0", "output:out/o1"}


# Outputs --------------------------------------------------------------------------------------


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(3, 4)
        self.move = nn.Linear(4, 2)
        self.value = nn.Linear(4, 1)

    def forward(self, hero):
        state = torch.relu(self.trunk(hero))
        return {"move": self.move(state), "value": self.value(state)}


@pytest.mark.parametrize("method", METHODS)
def test_head_weights_feed_only_their_head(method):
    schema = hero_schema((OutputSpec("move", ("x", "y")), OutputSpec("value", ("v",))))

    imap = compute_map(method, TwoHeads(), schema)

    assert outputs_of(imap, "move.weight", (0, 3)) == {"output:move/x"}
    assert outputs_of(imap, "move.weight", (1, 0)) == {"output:move/y"}
    assert outputs_of(imap, "move.bias", (1,)) == {"output:move/y"}
    assert outputs_of(imap, "value.weight", (0, 2)) == {"output:value/v"}
    everything = {"output:move/x", "output:move/y", "output:value/v"}
    assert outputs_of(imap, "trunk.weight", (3, 1)) == everything
    assert outputs_of(imap, "trunk.bias", (0,)) == everything


# Tied parameters --------------------------------------------------------------------------------


class TiedEncoders(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.own = nn.Linear(2, 3)
        self.enemy = nn.Linear(2, 3)
        self.enemy.weight = self.own.weight
        self.head = nn.Linear(6, 1)

    def forward(self, own, enemy):
        return self.head(torch.cat([self.own(own), self.enemy(enemy)], -1))


@pytest.mark.parametrize("method", METHODS)
def test_tied_parameter_unions_both_uses(method):
    schema = FeatureSchema(
        (InputSpec("own", "continuous", (2,), ("x", "y")), InputSpec("enemy", "continuous", (2,), ("x", "y"))),
        {},
        (OutputSpec("out", ("o",)),),
    )

    imap = compute_map(method, TiedEncoders(), schema)

    assert imap.tied == {"enemy.weight": "own.weight"}
    assert "enemy.weight" not in imap.params
    assert inputs_of(imap, "own.weight", (2, 1)) == {"field:own/y", "field:enemy/y"}
    assert inputs_of(imap, "enemy.weight", (2, 1)) == {"field:own/y", "field:enemy/y"}
    assert inputs_of(imap, "enemy.bias", (0,)) == {"field:enemy/x", "field:enemy/y"}


# Cases where a value, not only a shape, decides the map ------------------------------------------


class PaddedConv(nn.Module):
    """A kernel of 3 with padding 1 over one step: the outer taps only ever meet padding."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 2, 3, padding=1)
        self.head = nn.Linear(2, 1)

    def forward(self, track):
        return self.head(self.conv(track.transpose(1, 2)).transpose(1, 2))


@pytest.mark.parametrize("method", METHODS)
def test_conv_taps_on_padding_record_nothing(method):
    schema = FeatureSchema(
        (InputSpec("track", "continuous", (1, 3), HERO),),
        {},
        (OutputSpec("out", ("o",)),),
    )

    imap = compute_map(method, PaddedConv(), schema)

    assert inputs_of(imap, "conv.weight", (0, 1, 1)) == {"field:track/mana"}
    for tap in (0, 2):
        assert inputs_of(imap, "conv.weight", (1, 1, tap)) == set()
        assert outputs_of(imap, "conv.weight", (1, 1, tap)) == set()
    assert outputs_of(imap, "conv.weight", (1, 1, 1)) == {"output:out/o"}


class Gathered(nn.Module):
    """Gather picks features 2 and 0, and a scatter_add sends them to slots 1 and 3 of four."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 1)

    def forward(self, hero):
        picked = torch.gather(hero, -1, torch.tensor([2, 0]).expand(hero.shape[0], 2))
        slots = picked.new_zeros(hero.shape[0], 4).scatter_add(-1, torch.tensor([1, 3]).expand(hero.shape[0], 2), picked)
        return self.head(slots)


@pytest.mark.parametrize("method", METHODS)
def test_gather_and_scatter_follow_index_values(method):
    imap = compute_map(method, Gathered(), hero_schema((OutputSpec("out", ("o",)),)))

    assert inputs_of(imap, "head.weight", (0, 1)) == {"field:hero/gold"}
    assert inputs_of(imap, "head.weight", (0, 3)) == {"field:hero/hp"}
    assert inputs_of(imap, "head.weight", (0, 0)) == set()
    assert outputs_of(imap, "head.weight", (0, 2)) == set()


class GroupedNorm(nn.Module):
    """GroupNorm with one channel per group normalises each channel on its own."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(2, 2)
        self.head = nn.Linear(2, 1)

    def forward(self, grid):
        normalised = self.norm(grid.permute(0, 3, 1, 2))
        return self.head(normalised.mean((-2, -1)))


@pytest.mark.parametrize("method", METHODS)
def test_group_norm_mixes_only_within_group(method):
    schema = FeatureSchema(
        (InputSpec("grid", "continuous", (2, 2, 2), ("height", "water")),),
        {},
        (OutputSpec("out", ("o",)),),
    )

    imap = compute_map(method, GroupedNorm(), schema)

    assert inputs_of(imap, "norm.weight", (0,)) == {"field:grid/height"}
    assert inputs_of(imap, "norm.bias", (1,)) == {"field:grid/water"}


class Attending(nn.Module):
    """Queries from one input attend over another: the output mixes both."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(2, 1, batch_first=True)
        self.head = nn.Linear(2, 1)

    def forward(self, units, towers):
        attended, _ = self.attention(units, towers, towers)
        return self.head(attended.sum(1))


@pytest.mark.parametrize("method", METHODS)
def test_cross_attention_output_mixes_queries_and_keys(method):
    schema = FeatureSchema(
        (InputSpec("units", "continuous", (3, 2), ("x", "y")), InputSpec("towers", "continuous", (2, 2), ("x", "y"))),
        {},
        (OutputSpec("out", ("o",)),),
    )

    imap = compute_map(method, Attending(), schema)

    everything = {"field:units/x", "field:units/y", "field:towers/x", "field:towers/y"}
    assert inputs_of(imap, "attention.in_proj_weight", (0, 1)) == {"field:units/y"}
    assert inputs_of(imap, "attention.in_proj_weight", (5, 0)) == {"field:towers/x"}
    assert inputs_of(imap, "attention.out_proj.weight", (1, 0)) == everything

