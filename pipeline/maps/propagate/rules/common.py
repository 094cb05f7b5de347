"""Helpers shared by the op rules: argument binding and output flattening."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_flatten


def bind(func: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Bind an ATen op's arguments to their schema names, filling defaults."""
    bound: dict[str, Any] = {}
    schema_args = func._schema.arguments
    for spec, value in zip(schema_args, args):
        bound[spec.name] = value
    for spec in schema_args[len(args):]:
        if spec.name in kwargs:
            bound[spec.name] = kwargs[spec.name]
        elif spec.has_default_value():
            bound[spec.name] = spec.default_value
        else:
            bound[spec.name] = None
    return bound


def tensors_out(out: Any) -> list[torch.Tensor]:
    flat, _ = tree_flatten(out)
    return [t for t in flat if isinstance(t, torch.Tensor)]


def tensors_in(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    flat, _ = tree_flatten((args, kwargs))
    return [t for t in flat if isinstance(t, torch.Tensor)]


def shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def letters(n: int, start: int = 0) -> str:
    return "".join(chr(ord("a") + start + i) for i in range(n))


def dims_of(dim: Any, ndim: int) -> tuple[int, ...]:
    """Normalise a ``dim`` argument; None or an empty list means every axis."""
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return tuple(range(ndim))
    if isinstance(dim, int):
        dim = [dim]
    return tuple(d % ndim for d in dim) if ndim else ()


def op_name(func: Any) -> str:
    """Return the op's name without the trailing underscore of in-place variants."""
    name = func.overloadpacket.__name__
    return name[:-1] if name.endswith("_") else name
