"""Writer of sharded safetensors checkpoints in the Hugging Face layout.

Call order (steps 1 and 3 on the client, step 2 on workers, in parallel):

1. ``plan = writer.plan_shards(specs)``: pure planning from names, dtypes and shapes.
   It fixes each shard's tensors, header, size and file name
   (``model-00001-of-00003.safetensors``), so the shard count is known up front.
2. ``record = writer.write_shard(shard, source)`` once per shard. It streams the
   header, then each tensor's bytes as ``source`` produces them, to a create-only
   sink, computing the sha256 and size on the way. On any error it aborts the sink
   (and any multipart upload), so nothing remains at the shard's URL. Shards are
   independent of each other.
3. ``writer.write_index(plan, records)`` after every shard succeeded: writes
   ``model.safetensors.index.json`` (``{"metadata": {"total_size": N},
   "weight_map": {name: shard_file}}``), create-only, as the last object.

Memory: a shard write keeps one tensor (or one row block of it) from the source,
plus one part buffer (``part_size``, 64 MiB by default) on S3. It never buffers a
whole shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import torch

from pipeline.storage import fsio
from pipeline.storage.errors import ShardWriteError
from pipeline.storage.plan import DEFAULT_MAX_SHARD_BYTES, ShardPlan, TensorSpec, plan_shards
from pipeline.storage.safetensors_reader import INDEX_NAME
from pipeline.storage.sinks import DEFAULT_PART_BYTES, ShardSink, open_sink

logger = logging.getLogger(__name__)

TensorData = Union[torch.Tensor, Iterable[torch.Tensor]]
TensorSource = Union[Mapping[str, torch.Tensor], Callable[[TensorSpec], TensorData]]

# Buffers at least this large are hashed on a second thread while the sink writes
# them; hashlib releases the GIL for buffers above 2 KiB.
_PARALLEL_HASH_BYTES = 1 * 2**20
# Larger buffers are split into chunks of this size, each hashed while it is written, so
# the second reader of a chunk finds it in the CPU cache. On the 2-core benchmark machine
# 2 MiB chunks made file:// copies measurably faster than hashing 64 MiB at a time.
_HASH_CHUNK_BYTES = 2 * 2**20


@dataclass(frozen=True)
class ShardRecord:
    """A written shard: file name, size in bytes and sha256 (lowercase hex) of the file."""

    file: str
    size: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size}


class ShardedWriter:
    """Writes sharded safetensors plus an index under the directory URL ``url``.

    ``max_shard_bytes`` is the tensor-byte budget per shard. ``part_size`` is the S3
    multipart part size in bytes (5 MiB to 5 GiB). The writer stores only settings, so
    it pickles cheaply to Dask workers.
    """

    def __init__(
        self,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        part_size: int = DEFAULT_PART_BYTES,
        prefix: str = "model",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.max_shard_bytes = max_shard_bytes
        self.part_size = part_size
        self.prefix = prefix
        self.metadata = dict(metadata or {})

    def plan_shards(self, specs: Iterable[TensorSpec]) -> list[ShardPlan]:
        """Plan the output shards for ``specs`` (see :func:`~pipeline.storage.plan.plan_shards`)."""
        return plan_shards(specs, self.max_shard_bytes, prefix=self.prefix, metadata=self.metadata)

    def shard_url(self, file: str) -> str:
        return f"{self.url}/{file}"

    def write_shard(self, shard: ShardPlan, source: TensorSource) -> ShardRecord:
        """Stream one shard to its URL and return its record.

        ``source`` is a mapping from name to tensor, or a callable that receives the
        TensorSpec and returns the tensor, or an iterable of row blocks (tensors whose
        concatenation along axis 0 is the tensor). Tensors are requested in the shard's
        data order, one at a time. Raises ObjectExistsError when the shard exists, and
        ShardWriteError when the source returns a tensor that disagrees with the plan.
        """
        url = self.shard_url(shard.file)
        fs, path = fsio.resolve(url, self.storage_options)
        sink = open_sink(fs, path, part_size=self.part_size, url=url)
        stream = _HashingStream(sink)
        current: TensorSpec | None = None
        try:
            stream.write(memoryview(shard.header))
            for current, (begin, end) in zip(shard.tensors, shard.offsets):
                written = _write_tensor(stream, current, _fetch(source, current), shard)
                if written != end - begin:
                    raise ShardWriteError(
                        f"{sink.url}: tensor {current.name!r} produced {written} bytes, expected "
                        f"{end - begin} for shape {list(current.shape)} x {current.dtype}"
                    )
                logger.debug("wrote %s to %s (%d bytes)", current.name, shard.file, written)
            current = None
            if stream.size != shard.file_size:
                raise ShardWriteError(
                    f"{sink.url}: wrote {stream.size} bytes, expected {shard.file_size} from the plan"
                )
            sha256 = stream.hexdigest()
            sink.commit()
        except BaseException as e:
            stream.close()
            sink.abort()
            tensor = f", tensor {current.name!r}" if current is not None else ""
            e.add_note(f"while writing shard {shard.file} ({sink.url}){tensor}; the shard was aborted")
            raise
        stream.close()
        logger.info("wrote shard %s (%d bytes, sha256 %s)", sink.url, stream.size, sha256)
        return ShardRecord(file=shard.file, size=stream.size, sha256=sha256)

    def write_index(self, plan: Sequence[ShardPlan], records: Sequence[ShardRecord]) -> str:
        """Write ``model.safetensors.index.json`` for a fully written plan; return its URL.

        Raises ValueError unless ``records`` contains exactly one record per planned
        shard, with the planned size.
        """
        by_file = {record.file: record for record in records}
        planned = {shard.file: shard for shard in plan}
        problems = []
        for file, shard in planned.items():
            record = by_file.get(file)
            if record is None:
                problems.append(f"shard {file} has no record (not written?)")
            elif record.size != shard.file_size:
                problems.append(f"shard {file} has size {record.size}, planned {shard.file_size}")
        problems += [f"record {file} is not in the plan" for file in by_file if file not in planned]
        if problems or len(records) != len(by_file):
            if len(records) != len(by_file):
                problems.append("records contain the same shard twice")
            raise ValueError(
                f"{self.url}: cannot write the index: {'; '.join(problems)}. Write every "
                "planned shard once before the index"
            )

        document = {
            "metadata": {"total_size": sum(shard.data_bytes for shard in plan)},
            "weight_map": {spec.name: shard.file for shard in plan for spec in shard.tensors},
        }
        data = json.dumps(document, indent=2, sort_keys=False).encode("utf-8") + b"\n"
        url = self.shard_url(INDEX_NAME)
        fs, path = fsio.resolve(url, self.storage_options)
        sink = open_sink(fs, path, part_size=self.part_size, url=url)
        try:
            sink.write(memoryview(data))
            sink.commit()
        except BaseException:
            sink.abort()
            raise
        logger.info("wrote index %s (%d tensors, %d shards)", url, len(document["weight_map"]), len(plan))
        return url

    def remove(self, files: Iterable[str]) -> None:
        """Delete written shard files, for cleanup after a failed multi-shard operation."""
        for file in files:
            fs, path = fsio.resolve(self.shard_url(file), self.storage_options)
            try:
                fs.rm_file(path)
                logger.info("removed %s", self.shard_url(file))
            except FileNotFoundError:
                pass

    def __repr__(self) -> str:
        return f"ShardedWriter({self.url!r}, max_shard_bytes={self.max_shard_bytes})"


def _fetch(source: TensorSource, spec: TensorSpec) -> TensorData:
    if isinstance(source, Mapping):
        try:
            return source[spec.name]
        except KeyError:
            raise ShardWriteError(f"tensor source has no tensor {spec.name!r}") from None
    return source(spec)


def _write_tensor(stream: "_HashingStream", spec: TensorSpec, data: TensorData, shard: ShardPlan) -> int:
    blocks = [data] if isinstance(data, torch.Tensor) else data
    whole = isinstance(data, torch.Tensor)
    written = 0
    for block in blocks:
        _check_block(spec, block, whole, shard)
        stream.write(_bytes_of(block))
        written += block.numel() * block.element_size()
    return written


def _check_block(spec: TensorSpec, block: Any, whole: bool, shard: ShardPlan) -> None:
    where = f"shard {shard.file}: tensor {spec.name!r}"
    if not isinstance(block, torch.Tensor):
        raise ShardWriteError(f"{where}: the source returned {type(block).__name__}, expected a tensor")
    if block.dtype != spec.dtype:
        raise ShardWriteError(f"{where}: the source returned dtype {block.dtype}, planned {spec.dtype}")
    if tuple(block.shape) == spec.shape:
        return
    if whole:
        raise ShardWriteError(
            f"{where}: the source returned shape {list(block.shape)}, planned {list(spec.shape)}"
        )
    if block.dim() == 0 or tuple(block.shape[1:]) != spec.shape[1:]:
        raise ShardWriteError(
            f"{where}: the source returned a row block of shape {list(block.shape)}, expected "
            f"[rows, {', '.join(str(d) for d in spec.shape[1:])}]"
        )


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """Return the tensor's bytes in row-major order without copying when it is contiguous."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


class _HashingStream:
    """Forwards bytes to a sink while hashing them on a second thread."""

    def __init__(self, sink: ShardSink) -> None:
        self._sink = sink
        self._digest = hashlib.sha256()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-sha256")
        self.size = 0

    def write(self, data: memoryview) -> None:
        if len(data) < _PARALLEL_HASH_BYTES:
            self._digest.update(data)
            self._sink.write(data)
            self.size += len(data)
            return
        view = memoryview(data).cast("B")
        for start in range(0, len(view), _HASH_CHUNK_BYTES):
            chunk = view[start : start + _HASH_CHUNK_BYTES]
            hashed = self._executor.submit(self._digest.update, chunk)
            try:
                self._sink.write(chunk)
            finally:
                hashed.result()
            self.size += len(chunk)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()

    def close(self) -> None:
        self._executor.shutdown(wait=True)
