"""Flattening of nested state dicts into dotted names.

Checkpoints often nest the model and optimizer state, for example
``{"model": {...}, "optimizer": {"state": {0: {"exp_avg": t}}, "param_groups": [...]}}``.
The storage layer exposes every tensor under one flat name, built by joining the keys
on the path to it with ``.``:

- mappings are always descended, and their keys become ``str(key)``;
- lists and tuples are descended (with the index as key) only when they contain a
  tensor or a mapping, and otherwise stay one non-tensor entry;
- anything else that is not a tensor is a non-tensor entry (an "object").

So the example yields ``model.<parameter>``, ``optimizer.state.0.exp_avg`` and
``optimizer.param_groups.0.lr``. The ``<param>`` key of ``optimizer.state`` is what the
optimizer stored: an integer position for ``torch.optim.Optimizer.state_dict()``, or
the parameter name when the state dict came from
``torch.distributed.checkpoint.state_dict.get_state_dict``. DCP checkpoints flatten
the same way when they are saved, so the names agree across formats.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from pipeline.storage.errors import CheckpointFormatError


def flatten_state(state: Mapping[Any, Any], *, where: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return ``(tensors, objects)`` keyed by flattened name.

    Raises CheckpointFormatError naming ``where`` when two paths flatten to the same
    name (for example a key ``"a.b"`` next to ``{"a": {"b": ...}}``).
    """
    tensors: dict[str, torch.Tensor] = {}
    objects: dict[str, Any] = {}
    _descend(state, "", tensors, objects, where)
    return tensors, objects


def _descend(value: Any, name: str, tensors: dict[str, torch.Tensor], objects: dict[str, Any], where: str) -> None:
    if isinstance(value, Mapping):
        for key, child in value.items():
            _descend(child, _join(name, str(key)), tensors, objects, where)
        return
    if isinstance(value, (list, tuple)) and _contains_tensor_or_mapping(value):
        for index, child in enumerate(value):
            _descend(child, _join(name, str(index)), tensors, objects, where)
        return
    if name in tensors or name in objects:
        raise CheckpointFormatError(
            f"{where}: two entries flatten to the name {name!r}; rename one of the keys so "
            "that the dotted names are unique"
        )
    if isinstance(value, torch.Tensor):
        tensors[name] = value
    else:
        objects[name] = value


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _contains_tensor_or_mapping(values: list[Any] | tuple[Any, ...]) -> bool:
    for value in values:
        if isinstance(value, (torch.Tensor, Mapping)):
            return True
        if isinstance(value, (list, tuple)) and _contains_tensor_or_mapping(value):
            return True
    return False
