"""An OpenAI-Five-like policy: entity encoders with pooling, embeddings, an LSTM and action heads.

Data flow for one step (``B`` is the batch, ``N`` the unit slots, ``H`` the heroes)::

    units [B,N,F] ++ embed(unit_type) [B,N,E] -> encoders.units (per unit) -> masked max over N
    heroes [B,H,Fh] -> encoders.heroes (per hero) -> mean over H
    inventory [B,S] -> embeddings.inventory (EmbeddingBag on vocabulary ``items``, sum over slots)
    globals [B,G] -> encoders.globals
    concat -> trunk -> lstm (one time step, zero initial state) -> heads

The ``target_unit`` head is a pointer over unit slots: the dot product of a query computed
from the LSTM state with a key per encoded unit, with absent units masked out.

Parameters live in ``nn.ModuleDict``s keyed by input or output name (``encoders.units.0.weight``,
``embeddings.unit_type.weight``, ``heads.action_type.weight``, ``lstm.weight_ih_l0``), so the
names stay the same when a config variant adds a field, a category, an action or a head.
The forward pass has no data-dependent Python control flow, so it runs on meta tensors.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.examples.five_config import FiveConfig, make_config
from pipeline.schema import FeatureSchema, InputSpec, OutputSpec


class FivePolicy(nn.Module):
    """The Five-like policy network. Call it with one keyword argument per schema input."""

    def __init__(self, config: FiveConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.embeddings = nn.ModuleDict(
            {
                "unit_type": nn.Embedding(len(c.unit_types), c.unit_type_width),
                "inventory": nn.EmbeddingBag(len(c.items), c.item_width, mode="sum"),
            }
        )
        # Every encoder ends with ReLU, because the masked max over units relies on outputs >= 0.
        self.encoders = nn.ModuleDict(
            {
                "units": _mlp(len(c.unit_fields) + c.unit_type_width, c.unit_width, layers=2),
                "heroes": _mlp(len(c.hero_fields), c.hero_width, layers=2),
                "globals": _mlp(len(c.global_fields), c.global_width, layers=1),
            }
        )
        pooled_width = c.unit_width + c.hero_width + c.item_width + c.global_width
        self.trunk = nn.Sequential(
            nn.Linear(pooled_width, c.trunk_width), nn.ReLU(), nn.LayerNorm(c.trunk_width)
        )
        self.lstm = nn.LSTM(c.trunk_width, c.lstm_width, batch_first=True)
        self.unit_keys = nn.Linear(c.unit_width, c.target_width)
        heads = {name: nn.Linear(c.lstm_width, len(f)) for name, f in c.action_heads.items()}
        heads["target_unit"] = nn.Linear(c.lstm_width, c.target_width)
        heads["value"] = nn.Linear(c.lstm_width, 1)
        self.heads = nn.ModuleDict(heads)

    def forward(
        self,
        units: torch.Tensor,
        unit_type: torch.Tensor,
        unit_mask: torch.Tensor,
        heroes: torch.Tensor,
        inventory: torch.Tensor,
        globals: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        present = unit_mask.to(torch.bool)

        unit_in = torch.cat([units, self.embeddings["unit_type"](unit_type)], dim=-1)
        unit_h = self.encoders["units"](unit_in)
        # Absent units become 0, which never exceeds a present unit's ReLU output, and a
        # sample without units pools to 0.
        pooled_units = unit_h.masked_fill(~present.unsqueeze(-1), 0.0).amax(dim=1)
        pooled_heroes = self.encoders["heroes"](heroes).mean(dim=1)
        item_bag = self.embeddings["inventory"](inventory)
        global_h = self.encoders["globals"](globals)

        trunk = self.trunk(torch.cat([pooled_units, pooled_heroes, item_bag, global_h], dim=-1))
        sequence, _ = self.lstm(trunk.unsqueeze(1))
        state = sequence[:, 0]

        outputs = {name: self.heads[name](state) for name in self.config.action_heads}
        query = self.heads["target_unit"](state)
        keys = self.unit_keys(unit_h)
        target = (keys * query.unsqueeze(1)).sum(dim=-1)
        outputs["target_unit"] = target.masked_fill(~present, torch.finfo(target.dtype).min)
        outputs["value"] = self.heads["value"](state)
        return outputs


def _mlp(width_in: int, width: int, layers: int) -> nn.Sequential:
    modules: list[nn.Module] = []
    for i in range(layers):
        modules += [nn.Linear(width_in if i == 0 else width, width), nn.ReLU()]
    return nn.Sequential(*modules)


def five_schema(config: FiveConfig) -> FeatureSchema:
    """Build the feature schema of a Five-like policy with ``config``."""
    c = config
    inputs = (
        InputSpec("units", "continuous", (c.max_units, len(c.unit_fields)), fields=c.unit_fields),
        InputSpec("unit_type", "categorical", (c.max_units,), vocabulary="unit_types"),
        InputSpec("unit_mask", "auxiliary", (c.max_units,), dtype="bool"),
        InputSpec(
            "heroes", "continuous", (c.max_heroes, len(c.hero_fields)), fields=c.hero_fields
        ),
        InputSpec("inventory", "categorical", (c.item_slots,), vocabulary="items"),
        InputSpec("globals", "continuous", (len(c.global_fields),), fields=c.global_fields),
    )
    outputs = [OutputSpec(name, fields) for name, fields in c.action_heads.items()]
    outputs.append(OutputSpec("target_unit", tuple(f"unit_{i}" for i in range(c.max_units))))
    outputs.append(OutputSpec("value", ("value",)))
    vocabularies = {"unit_types": c.unit_types, "items": c.items}
    return FeatureSchema(inputs, vocabularies, tuple(outputs))


def build(size: str = "small", **config: Any) -> tuple[FivePolicy, FeatureSchema]:
    """Build the Five-like policy and its schema: the ``size`` preset with ``config`` overrides.

    Parameters are created on the default device, so under ``torch.device("meta")`` the
    full preset builds without allocating its weights.
    """
    resolved = make_config(size, **config)
    return FivePolicy(resolved), five_schema(resolved)
