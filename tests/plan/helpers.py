"""Shared steps of the surgery tests: train an old model briefly, plan, apply and verify."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.examples.inputs import example_inputs
from pipeline.models.spec import ModelSpec, named_outputs
from pipeline.plan import Plan, apply_plan, parse_options, plan_specs
from pipeline.plan.verify import VerifyReport, verify_plan
from pipeline.schema import FeatureSchema

FIVE = "pipeline.examples.five:build"


def five(**config: Any) -> ModelSpec:
    return ModelSpec(FIVE, {"size": "small", **config})


def local(factory: str, **config: Any) -> ModelSpec:
    return ModelSpec(f"tests.plan.models:{factory}", config)


def loss_of(outputs: dict[str, torch.Tensor], seed: int = 0) -> torch.Tensor:
    """Squared distance to fixed random targets, which keeps outputs near unit scale."""
    generator = torch.Generator().manual_seed(seed)
    total = torch.zeros(())
    for value in outputs.values():
        target = torch.randn(value.shape, generator=generator)
        total = total + ((value.float() - target) ** 2).mean()
    return total


def train(module: nn.Module, schema: FeatureSchema, steps: int = 3, seed: int = 0) -> torch.optim.Adam:
    """Take a few Adam steps on random inputs so that the weights leave their init."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    module.train()
    for _ in range(steps):
        inputs = example_inputs(schema, 8, generator=generator)
        optimizer.zero_grad()
        loss_of(named_outputs(module(**inputs), schema), seed).backward()
        optimizer.step()
    module.eval()
    return optimizer


@dataclass
class Case:
    plan: Plan
    old_module: nn.Module
    old_schema: FeatureSchema
    optimizer: torch.optim.Adam
    new_state: dict[str, torch.Tensor]
    report: VerifyReport


def surgery(old: ModelSpec, new: ModelSpec, options: dict | None = None, seed: int = 0) -> Case:
    """Train the old model, plan old -> new, apply the plan and verify it."""
    torch.manual_seed(seed)
    module, schema = old.build()
    optimizer = train(module, schema, seed=seed)
    plan = plan_specs(old, new, parse_options(options))
    old_state = module.state_dict()
    new_state = apply_plan(plan, old_state)
    report = verify_plan(plan, old_state, new_state, old=old, new=new, batch=16, seed=seed)
    return Case(plan, module, schema, optimizer, new_state, report)
