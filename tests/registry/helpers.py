"""A small policy model, its feature schema, and helpers that publish it to a registry."""

from __future__ import annotations

import time
import traceback
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from pipeline.registry import ModelVersion, Registry, VersionExistsError, optimizer_state_tensors
from pipeline.schema import FeatureSchema, parse_schema
from pipeline.storage import TensorSpec

SPEC = {"factory": "tests.registry.helpers:build", "config": {"width": 8}}


def feature_schema(hero_fields: Sequence[str] = ("hp", "mana"), moves: Sequence[str] = ("north", "south", "east")) -> FeatureSchema:
    return parse_schema(
        {
            "inputs": [
                {"name": "hero", "kind": "continuous", "shape": [len(hero_fields)], "fields": list(hero_fields)},
                {"name": "unit", "kind": "categorical", "shape": [1], "vocabulary": "units"},
            ],
            "vocabularies": {"units": ["creep", "tower", "hero", "ward", "courier"]},
            "outputs": [{"name": "move", "fields": list(moves)}],
        }
    )


class TinyPolicy(nn.Module):
    """Embedding, linear layers in float32 and bfloat16, and a batch norm with an int64 buffer."""

    def __init__(self, width: int = 8, hero_fields: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.body = nn.Linear(hero_fields + 3, width)
        self.norm = nn.BatchNorm1d(width)
        self.head = nn.Linear(width, 3).to(torch.bfloat16)

    def forward(self, hero: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
        features = torch.cat([hero, self.embed(unit).flatten(1)], dim=-1)
        return self.head(self.norm(self.body(features)).to(torch.bfloat16)).float()


def build(width: int = 8) -> tuple[nn.Module, FeatureSchema]:
    return TinyPolicy(width), feature_schema()


def trained_policy(seed: int, width: int = 8) -> TinyPolicy:
    """A TinyPolicy with random weights and non-default batch-norm statistics."""
    torch.manual_seed(seed)
    module = TinyPolicy(width)
    with torch.no_grad():
        module.norm.running_mean.normal_()
        module.norm.running_var.uniform_(0.5, 2.0)
        module.norm.num_batches_tracked.fill_(1000 + seed)
    return module


def publish(
    registry: Registry,
    model: str,
    module: nn.Module,
    *,
    version: str = "next",
    tags: Any = (),
    parents: Sequence[Any] = (),
    files: Mapping[str, bytes] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    run_id: str | None = None,
    max_shard_bytes: int = 200,
    schema: FeatureSchema | None = None,
) -> ModelVersion:
    """Publish ``module`` (and optionally its optimizer state) as one version."""
    state = module.state_dict()
    with registry.begin_publish(model, version, run_id=run_id) as publication:
        writer = publication.writer(max_shard_bytes)
        plan = writer.plan_shards(TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in state.items())
        records = [writer.write_shard(shard, state) for shard in plan]
        extra: dict[str, Any] = {}
        if optimizer is not None:
            names = [name for name, _ in module.named_parameters()]
            tensors = optimizer_state_tensors(optimizer, names)
            optimizer_writer = publication.writer(max_shard_bytes, part="optimizer")
            optimizer_plan = optimizer_writer.plan_shards(TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items())
            extra["optimizer_plan"] = optimizer_plan
            extra["optimizer_records"] = [optimizer_writer.write_shard(shard, tensors) for shard in optimizer_plan]
        for name, data in (files or {}).items():
            publication.add_file(name, data)
        fields = {
            "model_spec": SPEC,
            "feature_schema": schema or feature_schema(),
            "parents": list(parents),
            "plan": None,
            "verification": None,
        }
        return publication.commit(fields, plan, records, tags=tags, **extra)


def publish_in_child(url: str, options: dict[str, Any], model: str, version: str, start_at: float, run_id: str) -> tuple[str, str]:
    """Publish a policy at wall-clock time ``start_at``; return ("won", version) or ("lost", message).

    Runs in a spawned process, so that two runs race through the real claim protocol.
    """
    module = trained_policy(seed=hash(run_id) % 1000)
    registry = Registry(url, options)
    registry.store  # noqa: B018  (connect before the start time)
    while time.time() < start_at:
        time.sleep(0.001)
    try:
        published = publish(registry, model, module, version=version, run_id=run_id)
    except VersionExistsError as e:
        return "lost", f"{type(e).__name__}: {e}"
    except Exception:
        return "error", traceback.format_exc()
    return "won", published.version


def warm_up(_index: int) -> int:
    return 0
