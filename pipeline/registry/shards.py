"""Checks and index files for the shard sets that a publication writes.

A version has up to two parts, each a sharded safetensors checkpoint written by a
ShardedWriter under the version folder: ``model`` (parameters and buffers) and
``optimizer`` (optimizer state). Each part gets its own index file,
``<part>.safetensors.index.json``, in the Hugging Face format.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from pipeline.registry.layout import index_name, is_shard_file
from pipeline.storage import ShardPlan, ShardRecord
from pipeline.storage.dtypes import safetensors_dtype
from pipeline.storage.reader import TensorInfo


def check_records(part: str, plan: Sequence[ShardPlan], records: Sequence[ShardRecord], *, where: str) -> None:
    """Raise ValueError unless ``records`` has one record per planned shard, with the planned size.

    ``where`` names the version for the message.
    """
    problems = []
    for shard in plan:
        if not (shard.file.startswith(f"{part}-") and is_shard_file(shard.file)):
            problems.append(
                f"planned shard {shard.file!r} does not belong to the {part} part; plan it with "
                f"publication.writer(part={part!r})"
            )
    planned = {shard.file: shard for shard in plan}
    seen: set[str] = set()
    for record in records:
        if record.file in seen:
            problems.append(f"shard {record.file} has two records")
        seen.add(record.file)
        shard = planned.get(record.file)
        if shard is None:
            problems.append(f"record for shard {record.file} is not in the plan")
        elif record.size != shard.file_size:
            problems.append(f"shard {record.file} has size {record.size}, planned {shard.file_size}")
    problems += [f"shard {file} has no record (not written?)" for file in planned if file not in seen]
    if not plan:
        problems.append("the plan has no shards")
    if problems:
        raise ValueError(
            f"{where}: cannot commit the {part} part: {'; '.join(problems)}. Write every planned "
            "shard once with the writer from this publication and pass all records"
        )


def index_bytes(plan: Sequence[ShardPlan]) -> bytes:
    """Return the index file of a plan: ``{"metadata": {"total_size"}, "weight_map"}``."""
    document = {
        "metadata": {"total_size": sum(shard.data_bytes for shard in plan)},
        "weight_map": {spec.name: shard.file for shard in plan for spec in shard.tensors},
    }
    return json.dumps(document, indent=2).encode("utf-8") + b"\n"


def tensor_index(plan: Sequence[ShardPlan]) -> dict[str, dict[str, Any]]:
    """Return the manifest's tensor index of a plan: name -> shard, dtype, shape."""
    return {
        spec.name: {"shard": shard.file, "dtype": safetensors_dtype(spec.dtype), "shape": list(spec.shape)}
        for shard in plan
        for spec in shard.tensors
    }


def index_problems(expected: dict[str, dict[str, Any]], stored: dict[str, TensorInfo], *, limit: int = 10) -> list[str]:
    """Compare a manifest tensor index with the tensors a reader found in the shard headers."""
    problems = []
    for name, entry in expected.items():
        info = stored.get(name)
        if info is None:
            problems.append(f"tensor {name!r} is missing from shard {entry['shard']}")
            continue
        found = {"shard": info.shard, "dtype": safetensors_dtype(info.dtype), "shape": list(info.shape)}
        if found != entry:
            problems.append(f"tensor {name!r}: expected {entry}, stored {found}")
    problems += [f"tensor {name!r} in shard {stored[name].shard} is not expected" for name in stored if name not in expected]
    if len(problems) > limit:
        problems = problems[:limit] + [f"... and {len(problems) - limit} more"]
    return problems


__all__ = ["check_records", "index_bytes", "index_name", "index_problems", "tensor_index"]
