"""Compute an interaction map from a model spec with either method."""

from __future__ import annotations

import logging

from pipeline.maps.interaction import InteractionMap
from pipeline.models.spec import ModelSpec

logger = logging.getLogger(__name__)

METHODS = ("sets", "gradient")


def compute_map(spec: ModelSpec, method: str = "sets") -> InteractionMap:
    """Build the model of ``spec`` and map it.

    The set method builds the model on the meta device, so no weight is allocated. The
    gradient method needs real weights and builds it on the CPU.
    """
    if method == "sets":
        from pipeline.maps.propagate import set_map

        module, schema = spec.build(device="meta")
        return set_map(module, schema)
    if method == "gradient":
        from pipeline.maps.gradient import gradient_map

        module, schema = spec.build(device="cpu")
        return gradient_map(module, schema)
    raise ValueError(f"unknown map method {method!r}; expected one of {METHODS}")
