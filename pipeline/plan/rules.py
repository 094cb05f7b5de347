"""Init rules: which values new elements get, and whether that keeps the old function.

A user picks a rule per *situation* (see :mod:`pipeline.plan.options`). At plan time the
choice is resolved into a concrete rule that :func:`region_values` can fill with no
further knowledge of the model:

========== ===================================================================
concrete   values
========== ===================================================================
zero       0
ones       1
constant   ``value``
mask       ``value`` (a large negative logit bias)
uniform    U(-bound, bound), seeded
normal     N(0, std), seeded
eye        1 where the indices of the last two axes are equal, else 0
mean_rows  the mean of ``rows`` along ``axis`` of the tensor being built
copy_row   row ``row`` along ``axis`` of the tensor being built
========== ===================================================================

Random values are drawn on the CPU in float32 from a ``torch.Generator`` seeded with the
region's seed, then cast and moved, so the same plan gives byte-identical tensors on any
device.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from pipeline.plan.model import InitRegion, PlanError, range_indices
from pipeline.plan.options import RuleChoice
from pipeline.plan.structure import InitScale

CONCRETE_RULES = ("zero", "ones", "constant", "mask", "uniform", "normal", "eye", "mean_rows", "copy_row")

# Regions are applied in this order; rules that read the tensor being built come last.
SITUATION_ORDER = ("new_input", "new_unit", "new_unit_out", "new_output", "new_head", "inserted", "new_category")


def derive_seed(plan_seed: int, name: str, ordinal: int) -> int:
    """Return a 63-bit seed for one region from the plan seed, the tensor name and an ordinal."""
    digest = hashlib.sha256(f"{plan_seed}/{name}/{ordinal}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass(frozen=True)
class Resolved:
    """A concrete rule for one region, with its exactness and estimated relative error."""

    rule: str
    params: tuple[tuple[str, Any], ...]
    exact: bool
    error: float = 0.0
    note: str | None = None


def _random(init: InitScale, scale: float) -> tuple[str, tuple[tuple[str, Any], ...], float]:
    """Return (rule, params, std) of a module's default init times ``scale``."""
    if init.kind == "uniform":
        bound = init.value * scale
        return "uniform", (("bound", bound),), bound / math.sqrt(3)
    if init.kind == "normal":
        std = init.value * scale
        return "normal", (("std", std),), std
    return "constant", (("value", init.value),), abs(init.value)


def resolve(
    choice: RuleChoice,
    situation: str,
    *,
    init: InitScale,
    bias_like: bool,
    absent_zero: bool = True,
    fan_new: int = 0,
    fields_old: int = 0,
    fields_new: int = 0,
    category_axis: int | None = None,
    old_rows: Sequence[tuple[int, int]] = (),
    copy_row: int | None = None,
) -> Resolved:
    """Resolve a user's rule choice for one region into a concrete rule.

    ``bias_like`` marks elements that no axis contracts (biases), which get the mask
    value. ``absent_zero`` is true when every new input in the region is 0 when absent.
    ``fan_new`` counts the new units that an old unit reads through the region.
    """
    rule = choice.rule
    if rule == "zero":
        if situation == "new_output":
            share = fields_new / max(fields_old + fields_new, 1)
            return Resolved("zero", (), False, share, "a zero logit moves probability to the new field; old logits are kept")
        return Resolved("zero", (), True)
    if rule == "mask":
        if bias_like:
            return Resolved("mask", (("value", choice.param("value")),), True)
        return Resolved("zero", (), True)
    if rule == "mean":
        if category_axis is None or not old_rows:
            raise PlanError("rule 'mean' needs existing rows to average; the region has none")
        return Resolved("mean_rows", (("axis", category_axis), ("rows", tuple(old_rows))), True)
    if rule == "copy_row":
        if category_axis is None or copy_row is None:
            raise PlanError(f"rule 'copy_row' with token {choice.param('token')!r} found no row to copy")
        return Resolved("copy_row", (("axis", category_axis), ("row", copy_row)), True)
    if rule == "default":
        concrete, params, std = _random(init, choice.param("scale"))
    elif rule == "small_random":
        std = choice.param("std")
        concrete, params = "normal", (("std", std),)
    else:
        raise PlanError(f"rule {rule!r} cannot fill a region in situation {situation!r}")
    if situation == "new_input":
        if absent_zero:
            return Resolved(concrete, params, True)
        return Resolved(concrete, params, False, 1.0, "a non-zero absent value meets random weights")
    if situation == "new_unit_out":
        error = std * math.sqrt(max(fan_new, 1))
        return Resolved(concrete, params, False, error, f"weights from new units into old units are random (std {std:.3g})")
    if situation == "new_output":
        share = fields_new / max(fields_old + fields_new, 1)
        return Resolved(concrete, params, False, share, "a random logit moves probability to the new field; old logits are kept")
    if situation == "inserted":
        return Resolved(concrete, params, False, 1.0, "an inserted module with random weights changes the function")
    return Resolved(concrete, params, True)


def region_values(region: InitRegion, index: Sequence[torch.Tensor], built: torch.Tensor) -> torch.Tensor:
    """Return the float32 CPU values of one region.

    ``index`` contains the region's new indices per axis. ``built`` is the tensor being
    built, which ``mean_rows`` and ``copy_row`` read.
    """
    shape = tuple(len(ix) for ix in index)
    rule = region.rule
    if rule == "zero":
        return torch.zeros(shape, dtype=torch.float32)
    if rule == "ones":
        return torch.ones(shape, dtype=torch.float32)
    if rule in ("constant", "mask"):
        return torch.full(shape, float(region.param("value")), dtype=torch.float32)
    if rule in ("uniform", "normal"):
        generator = torch.Generator(device="cpu").manual_seed(region.seed)
        if rule == "uniform":
            bound = float(region.param("bound"))
            return (torch.rand(shape, generator=generator, dtype=torch.float32) * 2 - 1) * bound
        return torch.randn(shape, generator=generator, dtype=torch.float32) * float(region.param("std"))
    if rule == "eye":
        if len(shape) < 2:
            raise PlanError(f"rule 'eye' needs at least two axes, got a region of shape {shape}")
        eye = (index[-2].reshape(-1, 1) == index[-1].reshape(1, -1)).to(torch.float32)
        return eye.expand(shape).clone()
    if rule in ("mean_rows", "copy_row"):
        axis = int(region.param("axis"))
        if rule == "mean_rows":
            rows = torch.tensor(range_indices(region.param("rows")), dtype=torch.int64)
        else:
            rows = torch.tensor([int(region.param("row"))], dtype=torch.int64)
        source = built.detach().to("cpu", torch.float32).index_select(axis, rows)
        for other, ix in enumerate(index):
            if other != axis:
                source = source.index_select(other, ix)
        return source.mean(dim=axis, keepdim=True).expand(shape).clone()
    raise PlanError(f"unknown concrete rule {rule!r} in a plan region; expected one of {list(CONCRETE_RULES)}")
