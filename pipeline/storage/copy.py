"""Copying a checkpoint through a reader and a writer, shard by shard.

This is the storage layer's own end-to-end path: any readable format in, sharded
safetensors out. The copy reads in the reader's order, in blocks of at most
``block_bytes``: a tensor larger than that in row blocks, and runs of smaller tensors
together, which for safetensors is one ranged read per run of adjacent tensors. It
reads the next block on a second thread while the current one is written.

Blocks are read into two reused buffers of ``block_bytes`` each, which is safe because
the writer finishes with a block (its sink copies or writes the bytes, and the hash is
done) before it requests the next one. So the copy keeps two blocks in memory (plus one
S3 part buffer) whatever the checkpoint size, and fresh pages are not faulted in per block.

Readers without ranged reads (``.pt`` and DCP) hand over one whole tensor at a time,
because they load whole tensors anyway.

On any error the copy aborts the shard being written, deletes the shards it already
wrote, and writes no index, so the destination is left as it was.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import torch

from pipeline.storage.fsio import empty_bytes
from pipeline.storage.plan import ShardPlan, TensorSpec
from pipeline.storage.reader import CheckpointReader
from pipeline.storage.writer import ShardedWriter, ShardRecord

logger = logging.getLogger(__name__)

DEFAULT_BLOCK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class CopyResult:
    """The written shards and the URL of the index."""

    records: tuple[ShardRecord, ...]
    index_url: str

    @property
    def digests(self) -> dict[str, dict[str, object]]:
        """``{shard_file: {"sha256", "size"}}``, the form that readers accept as ``digests``."""
        return {record.file: record.to_json() for record in self.records}


def copy_checkpoint(
    reader: CheckpointReader,
    writer: ShardedWriter,
    *,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> CopyResult:
    """Copy every tensor of ``reader`` to sharded safetensors at ``writer.url``."""
    if block_bytes <= 0:
        raise ValueError(f"block_bytes is {block_bytes}; expected a positive number of bytes")
    specs = [TensorSpec(info.name, info.dtype, info.shape) for info in reader.tensors.values()]
    plan = writer.plan_shards(specs)
    written: list[ShardRecord] = []
    buffers = _Buffers(block_bytes)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="copy-read") as executor:
        try:
            for shard in plan:
                blocks = _prefetched(executor, _blocks_of_shard(reader, shard, block_bytes, buffers))
                source = _ShardSource(blocks)
                written.append(writer.write_shard(shard, source))
                source.finish()
            index_url = writer.write_index(plan, written)
        except BaseException:
            logger.error(
                "copy from %s to %s failed; removing %d written shards", reader.url, writer.url, len(written)
            )
            writer.remove(record.file for record in written)
            raise
    logger.info("copied %s to %s: %d shards", reader.url, writer.url, len(written))
    return CopyResult(records=tuple(written), index_url=index_url)


def _blocks_of_shard(
    reader: CheckpointReader, shard: ShardPlan, block_bytes: int, buffers: "_Buffers"
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, block)`` for each tensor of the shard, in blocks of bounded size."""
    group: list[TensorSpec] = []
    group_bytes = 0

    def flush() -> Iterator[tuple[str, torch.Tensor]]:
        tensors = reader.read_many([spec.name for spec in group], buffer=buffers.next(group_bytes))
        for spec in group:
            yield spec.name, tensors[spec.name]

    if not reader.ranged_reads:
        # Each read loads a whole tensor (torch.load, DCP), so blocks would only repeat work.
        for spec in shard.tensors:
            yield spec.name, reader.read(spec.name)
        return

    for spec in shard.tensors:
        if spec.nbytes <= block_bytes or not spec.shape:
            if group and group_bytes + spec.nbytes > block_bytes:
                yield from flush()
                group, group_bytes = [], 0
            group.append(spec)
            group_bytes += spec.nbytes
            continue
        if group:
            yield from flush()
            group, group_bytes = [], 0
        rows = spec.shape[0]
        row_bytes = spec.nbytes // rows
        # A single row larger than block_bytes is still read whole.
        rows_per_block = max(1, block_bytes // row_bytes)
        for start in range(0, rows, rows_per_block):
            stop = min(rows, start + rows_per_block)
            block = reader.read_rows(spec.name, slice(start, stop), buffer=buffers.next((stop - start) * row_bytes))
            yield spec.name, block
    if group:
        yield from flush()


class _Buffers:
    """Two read buffers of ``block_bytes``, handed out in turn."""

    def __init__(self, block_bytes: int) -> None:
        self._block_bytes = block_bytes
        self._buffers: list[torch.Tensor] = []
        self._turn = 0

    def next(self, nbytes: int) -> torch.Tensor | None:
        """Return the next buffer, or None when ``nbytes`` does not fit (the reader allocates)."""
        if nbytes > self._block_bytes:
            return None
        if len(self._buffers) < 2:
            self._buffers.append(empty_bytes(self._block_bytes))
        buffer = self._buffers[self._turn]
        self._turn = 1 - self._turn
        return buffer


def _prefetched(executor: ThreadPoolExecutor, blocks: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield from ``blocks`` while the next item is produced on ``executor``."""
    done = object()

    def produce() -> object:
        return next(blocks, done)

    pending: Future[object] = executor.submit(produce)
    while True:
        item = pending.result()
        if item is done:
            return
        pending = executor.submit(produce)
        yield item  # type: ignore[misc]


class _ShardSource:
    """Hands the writer each tensor of a shard as an iterable of row blocks."""

    def __init__(self, blocks: Iterator[tuple[str, torch.Tensor]]) -> None:
        self._blocks = blocks
        self._head: tuple[str, torch.Tensor] | None = None

    def __call__(self, spec: TensorSpec) -> Iterator[torch.Tensor]:
        return self._blocks_for(spec.name)

    def _blocks_for(self, name: str) -> Iterator[torch.Tensor]:
        while True:
            item = self._head if self._head is not None else next(self._blocks, None)
            self._head = None
            if item is None:
                return
            if item[0] != name:
                self._head = item
                return
            yield item[1]

    def finish(self) -> None:
        leftover = self._head if self._head is not None else next(self._blocks, None)
        if leftover is not None:
            raise RuntimeError(f"copy: block of tensor {leftover[0]!r} was read but not written")
