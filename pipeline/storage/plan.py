"""Shard plans: which tensors go in which output shard, at which offsets. No I/O here.

The writer is given the full list of tensor specs (name, dtype, shape) before any
bytes flow, so the plan fixes every shard's tensors, header and size up front. That is
how the shard count in file names like ``model-00001-of-00003.safetensors`` is known
before the first shard is written, and why each shard can be written independently,
on any worker, in any order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch

from pipeline.storage.dtypes import TORCH_TO_SAFETENSORS
from pipeline.storage.errors import EmptyCheckpointError
from pipeline.storage.header import encode_header
from pipeline.storage.names import validate_shard_file, validate_tensor_name

# transformers' save_pretrained uses max_shard_size="5GB" by default, that is 5 * 10**9.
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
SAFETENSORS_FORMAT_METADATA = {"format": "pt"}


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of a tensor that a shard will contain."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class ShardPlan:
    """One output shard: its file name, tensors in data order, their offsets and header.

    ``offsets[i]`` is ``(begin, end)`` of ``tensors[i]`` relative to the data section,
    ``header`` is the encoded length plus JSON header, and ``file_size`` is the size
    of the complete file in bytes.
    """

    index: int
    count: int
    file: str
    tensors: tuple[TensorSpec, ...]
    offsets: tuple[tuple[int, int], ...]
    header: bytes = field(repr=False)

    @property
    def data_bytes(self) -> int:
        return self.offsets[-1][1] if self.offsets else 0

    @property
    def file_size(self) -> int:
        return len(self.header) + self.data_bytes


def shard_file_name(prefix: str, index: int, count: int) -> str:
    """Return the Hugging Face shard name, for example ``model-00001-of-00003.safetensors``."""
    return f"{prefix}-{index:05d}-of-{count:05d}.safetensors"


def plan_shards(
    specs: Iterable[TensorSpec],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    *,
    prefix: str = "model",
    metadata: Mapping[str, str] | None = None,
) -> list[ShardPlan]:
    """Split ``specs`` into shards of at most ``max_shard_bytes`` tensor bytes each.

    Tensors keep their order. A new shard starts when the next tensor would push the
    current one over the budget, so a tensor larger than the budget gets a shard of its
    own (as transformers does). The budget counts tensor bytes, not the header.
    ``metadata`` is stored in every shard's ``__metadata__`` next to ``format: pt``,
    which transformers requires.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes is {max_shard_bytes}; expected a positive number of bytes")
    validate_shard_file(shard_file_name(prefix, 1, 1), where="shard prefix")

    groups: list[list[TensorSpec]] = []
    group_bytes = 0
    seen: set[str] = set()
    for spec in specs:
        _check_spec(spec, seen)
        if groups and groups[-1] and group_bytes + spec.nbytes <= max_shard_bytes:
            groups[-1].append(spec)
            group_bytes += spec.nbytes
        else:
            groups.append([spec])
            group_bytes = spec.nbytes
    if not groups:
        raise EmptyCheckpointError("no tensors to write; a checkpoint needs at least one tensor")

    shard_metadata = {**SAFETENSORS_FORMAT_METADATA, **dict(metadata or {})}
    count = len(groups)
    plans = []
    for number, group in enumerate(groups, start=1):
        offsets = []
        position = 0
        for spec in group:
            offsets.append((position, position + spec.nbytes))
            position += spec.nbytes
        header = encode_header(
            ((s.name, s.dtype, s.shape, b, e) for s, (b, e) in zip(group, offsets)),
            shard_metadata,
        )
        plans.append(
            ShardPlan(
                index=number,
                count=count,
                file=shard_file_name(prefix, number, count),
                tensors=tuple(group),
                offsets=tuple(offsets),
                header=header,
            )
        )
    return plans


def _check_spec(spec: TensorSpec, seen: set[str]) -> None:
    validate_tensor_name(spec.name, where="shard plan")
    if spec.name in seen:
        raise ValueError(f"shard plan: tensor {spec.name!r} appears twice; names must be unique")
    seen.add(spec.name)
    if spec.dtype not in TORCH_TO_SAFETENSORS:
        raise ValueError(
            f"shard plan: tensor {spec.name!r} has dtype {spec.dtype}, which safetensors cannot "
            "store; convert it first"
        )
    if any(not isinstance(d, int) or d < 0 for d in spec.shape):
        raise ValueError(
            f"shard plan: tensor {spec.name!r} has shape {spec.shape}; expected non-negative integers"
        )
