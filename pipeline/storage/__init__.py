"""Checkpoint storage: readers and writers over fsspec, independent of surgery.

Reading::

    with open_checkpoint("s3://bucket/model", {"client_kwargs": {...}}) as reader:
        for name, info in reader.tensors.items():
            ...
        rows = reader.read_rows("embed.weight", [3, 17, 18, 19])

Writing (see :mod:`pipeline.storage.writer` for the call order)::

    writer = ShardedWriter("s3://bucket/out", storage_options, max_shard_bytes=2**30)
    plan = writer.plan_shards(specs)
    records = [writer.write_shard(shard, source) for shard in plan]
    writer.write_index(plan, records)

Importing this package registers a Dask ``sizeof`` for torch tensors.
"""

from pipeline.storage import sizeof as _sizeof  # noqa: F401  (registers dask sizeof)
from pipeline.storage.copy import CopyResult, copy_checkpoint
from pipeline.storage.dcp_reader import DcpReader
from pipeline.storage.errors import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    EmptyCheckpointError,
    IntegrityError,
    InvalidNameError,
    ObjectExistsError,
    ShardWriteError,
    TensorNotFoundError,
    UnsafeCheckpointError,
)
from pipeline.storage.integrity import ShardDigest
from pipeline.storage.names import validate_shard_file, validate_tensor_name
from pipeline.storage.open import open_checkpoint
from pipeline.storage.plan import ShardPlan, TensorSpec, plan_shards
from pipeline.storage.reader import CheckpointReader, TensorInfo
from pipeline.storage.safetensors_reader import INDEX_NAME, SafetensorsReader
from pipeline.storage.torch_reader import TorchReader
from pipeline.storage.writer import ShardedWriter, ShardRecord

__all__ = [
    "INDEX_NAME",
    "CheckpointFormatError",
    "CheckpointNotFoundError",
    "CheckpointReader",
    "CopyResult",
    "DcpReader",
    "EmptyCheckpointError",
    "IntegrityError",
    "InvalidNameError",
    "ObjectExistsError",
    "SafetensorsReader",
    "ShardDigest",
    "ShardPlan",
    "ShardRecord",
    "ShardWriteError",
    "ShardedWriter",
    "TensorInfo",
    "TensorNotFoundError",
    "TensorSpec",
    "TorchReader",
    "UnsafeCheckpointError",
    "copy_checkpoint",
    "open_checkpoint",
    "plan_shards",
    "validate_shard_file",
    "validate_tensor_name",
]
