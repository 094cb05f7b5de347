"""Builders for test checkpoints, including deliberately malformed safetensors files."""

from __future__ import annotations

import json
import struct
from typing import Any

import torch
from safetensors.torch import save

from pipeline.storage import ShardedWriter, TensorSpec


def sample_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small state dict with several dtypes, a scalar, an empty tensor and a '/' name."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(64, 8, generator=generator),
        "encoder/layer.0.weight": torch.randn(8, 8, generator=generator).to(torch.bfloat16),
        "encoder/layer.0.bias": torch.randn(8, generator=generator).to(torch.float16),
        "head.index": torch.arange(12, dtype=torch.int64).reshape(3, 4),
        "head.mask": torch.tensor([True, False, True]),
        "step": torch.tensor(7, dtype=torch.int32),
        "unused": torch.zeros(0, 5),
    }


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """A valid safetensors file written by the safetensors library itself."""
    return save(tensors, metadata=metadata)


def raw_safetensors(header: dict[str, Any], data: bytes, *, length: int | None = None) -> bytes:
    """A safetensors file from a literal header dict and data bytes, valid or not.

    ``length`` overrides the 8-byte header length field.
    """
    text = json.dumps(header).encode("utf-8")
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def write_sharded(
    url: str,
    tensors: dict[str, torch.Tensor],
    storage_options: dict[str, Any] | None = None,
    *,
    max_shard_bytes: int = 200,
    part_size: int = 5 * 2**20,
) -> tuple[ShardedWriter, list, list]:
    """Write ``tensors`` with the ShardedWriter and return ``(writer, plan, records)``."""
    writer = ShardedWriter(url, storage_options, max_shard_bytes=max_shard_bytes, part_size=part_size)
    plan = writer.plan_shards(TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items())
    records = [writer.write_shard(shard, tensors) for shard in plan]
    writer.write_index(plan, records)
    return writer, plan, records
