"""The probe copy: a deep copy of the model with positive weights, run under the probe mode.

The caller's module is never modified. The copy is in eval mode and in the probe dtype
(float64 by default, for range: products of many positive weights grow with depth).
Every floating parameter element is replaced by a positive value drawn from a seeded
generator, ``uniform(0.5, 1.5) / fan_in`` with ``fan_in`` the product of the shape
after the first axis (1 for vectors and scalars), so values stay near 1 through a layer.
Positive weights and the surrogates of :mod:`pipeline.maps.gradient.table` keep every
activation of the probe copy non-negative, so no sum of terms can cancel.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from pipeline.maps.gradient.mode import ProbeMode
from pipeline.maps.gradient.probes import auxiliary_inputs
from pipeline.maps.gradient.table import SURROGATES
from pipeline.models.spec import named_outputs
from pipeline.schema import FeatureSchema

logger = logging.getLogger(__name__)


@dataclass
class ProbeCopy:
    """The sanitised copy of a model and what running it needs."""

    module: nn.Module
    schema: FeatureSchema
    params: dict[str, torch.Tensor]
    constants: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]
    tied: dict[str, str]
    dtype: torch.dtype
    auxiliary: dict[str, torch.Tensor]

    def run(self, params: dict[str, torch.Tensor], features: dict[str, torch.Tensor], *,
            track_negatives: bool = False) -> tuple[ProbeMode, dict[str, torch.Tensor]]:
        """Run the copy on ``features`` with parameter values ``params``; return the mode and the outputs."""
        mode = ProbeMode(SURROGATES, self.dtype, track_negatives=track_negatives)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with mode:
                for tensor in features.values():
                    mode.mark_input(tensor)
                result = functional_call(
                    self.module,
                    {**self.constants, **params},
                    args=(),
                    kwargs={**features, **self.auxiliary},
                    tie_weights=True,
                    strict=False,
                )
        finally:
            torch.set_default_dtype(previous)
        return mode, named_outputs(result, self.schema)


def make_probe_copy(module: nn.Module, schema: FeatureSchema, *, seed: int, dtype: torch.dtype) -> ProbeCopy:
    if not dtype.is_floating_point:
        raise ValueError(f"the probe dtype must be a floating dtype, got {dtype}")
    if _on_meta(module):
        logger.info("module is on the meta device; materialising a CPU copy with fresh initialisation")
        probe_module = _materialise(module)
    else:
        probe_module = copy.deepcopy(module)
    probe_module.eval()
    probe_module.to(dtype)

    generator = torch.Generator().manual_seed(seed)
    params: dict[str, torch.Tensor] = {}
    constants: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for name, parameter in probe_module.named_parameters():
        shapes[name] = tuple(parameter.shape)
        if not parameter.is_floating_point():
            constants[name] = parameter.detach()
            continue
        fan_in = math.prod(parameter.shape[1:]) if parameter.dim() >= 2 else 1
        values = torch.rand(parameter.shape, generator=generator, dtype=dtype) + 0.5
        params[name] = values / max(fan_in, 1)
    return ProbeCopy(
        module=probe_module,
        schema=schema,
        params=params,
        constants=constants,
        shapes=shapes,
        tied=tied_parameters(probe_module),
        dtype=dtype,
        auxiliary=auxiliary_inputs(schema, dtype),
    )


def tied_parameters(module: nn.Module) -> dict[str, str]:
    """Return ``{alias: first_name}`` for every parameter registered under more than one name."""
    first_names: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        first = first_names.setdefault(id(parameter), name)
        if first != name:
            tied[name] = first
    return tied


def _on_meta(module: nn.Module) -> bool:
    tensors = list(module.parameters()) + list(module.buffers())
    return any(t.is_meta for t in tensors)


def _materialise(module: nn.Module) -> nn.Module:
    """Copy a meta module to the CPU: zero buffers, then each submodule's ``reset_parameters``.

    NOTE: a buffer that the model fills in its constructor (an index table, a fixed mask)
    has no value on the meta device, so it is zero in the copy. Build such a model on the
    CPU to map it with the gradient method.
    """
    materialised = copy.deepcopy(module).to_empty(device="cpu")
    with torch.no_grad():
        for buffer in materialised.buffers():
            buffer.zero_()
        for submodule in materialised.modules():
            reset = getattr(submodule, "reset_parameters", None)
            if callable(reset):
                reset()
    return materialised
