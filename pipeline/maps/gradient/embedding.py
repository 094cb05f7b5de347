"""Surrogates for embedding lookups: a product of a multi-hot matrix with the table.

A category has no numeric absent value, so the probe copy never looks a row up by index.
It multiplies the table by a multi-hot matrix decoded from the probe's index codes
(:func:`pipeline.maps.gradient.probes.category_rows`): index ``c >= 0`` is row ``c``,
the code for "absent" is no row, and the code for "every category of a vocabulary of
size n" is rows ``0 .. n-1``. Row ``c`` of the table is then a weight that multiplies
the activation "category c is present", and its gradient is non-zero exactly at the
probes of category ``c``. Rows beyond the vocabulary are never selected.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from pipeline.maps.gradient.errors import GradientMapError
from pipeline.maps.gradient.pointwise import multilinear
from pipeline.maps.gradient.probes import category_rows

Mode = Any


def embedding(mode: Mode, func: Callable, index: torch.Tensor, weight: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Surrogate of ``F.embedding``; ``padding_idx`` and ``max_norm`` have no effect in the probe copy."""
    if not mode.is_activation(index):
        return func(index, weight, *args, **kwargs)
    rows = mode.mark(category_rows(index, weight.shape[0], mode.dtype))
    return multilinear(mode, torch.matmul, [rows, weight])


_BAG_PARAMETERS = (
    "input", "weight", "offsets", "max_norm", "norm_type", "scale_grad_by_freq", "mode",
    "sparse", "per_sample_weights", "include_last_offset", "padding_idx",
)  # fmt: skip


def embedding_bag(probe: Mode, func: Callable, /, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Surrogate of ``F.embedding_bag`` for 2-D bags; a ``max`` bag becomes a sum, like a max pooling."""
    bound = dict(zip(_BAG_PARAMETERS, args))
    bound.update(kwargs)
    index, weight = bound["input"], bound["weight"]
    if not probe.is_activation(index):
        return func(*args, **kwargs)
    if index.dim() != 2:
        raise GradientMapError(
            f"embedding_bag with a {index.dim()}-D index and offsets is not supported by the "
            "gradient method; pass bags as a 2-D index [bags, bag_size], or map the model "
            "with the set method"
        )
    rows = probe.mark(category_rows(index, weight.shape[0], probe.dtype))
    vectors = multilinear(probe, torch.matmul, [rows, weight])
    per_sample_weights = bound.get("per_sample_weights")
    if per_sample_weights is not None:
        weights = probe.follow(per_sample_weights.unsqueeze(-1), per_sample_weights)
        vectors = multilinear(probe, torch.mul, [vectors, weights])
    if bound.get("mode", "mean") == "mean":
        return vectors.mean(-2)
    return vectors.sum(-2)


def getitem(mode: Mode, func: Callable, table: Any, key: Any) -> Any:
    """Surrogate of ``table[index]`` where ``index`` is an activation: an embedding lookup.

    Only a single integer index on the first axis is read as a lookup; any other key
    runs the real indexing.
    """
    is_lookup = (
        isinstance(key, torch.Tensor)
        and mode.is_activation(key)
        and not mode.is_activation(table)
        and not key.is_floating_point()
        and key.dtype != torch.bool
    )
    if not is_lookup:
        return func(table, key)
    rows = mode.mark(category_rows(key, table.shape[0], mode.dtype))
    flat = table.reshape(table.shape[0], -1)
    looked_up = multilinear(mode, torch.matmul, [rows, flat])
    return looked_up.reshape(*key.shape, *table.shape[1:])
