"""Reader for safetensors checkpoints: one file, or shards listed by an index.

The sharded layout is the Hugging Face one: ``model.safetensors.index.json`` contains
``{"metadata": {...}, "weight_map": {tensor: shard_file}}`` next to the shard files.

Only ranged reads are used, so the reader works on any fsspec filesystem:

- opening reads each shard's size and its header (one ranged read of the first
  64 KiB, and a second one only when the header is longer);
- ``read`` fetches one tensor with one ranged read;
- ``read_rows`` fetches one ranged read per run of consecutive requested rows, so a
  gather from a large embedding table reads only the rows it needs.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from pipeline.storage import fsio, integrity
from pipeline.storage.errors import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    EmptyCheckpointError,
)
from pipeline.storage.header import (
    LENGTH_BYTES,
    HeaderEntry,
    ParsedHeader,
    DuplicateKeyError,
    reject_duplicate_keys,
    header_length,
    parse_header,
)
from pipeline.storage.names import validate_shard_file, validate_tensor_name
from pipeline.storage.reader import CheckpointReader, TensorInfo
from pipeline.storage.rows import RowGather

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Most headers fit in the first read: a shard of 1,000 tensors has a header of about 100 KB.
FIRST_READ_BYTES = 64 * 2**10


@dataclass(frozen=True)
class ShardHeader:
    """The location, size and parsed header of one safetensors file."""

    file: str
    path: str
    url: str
    size: int
    header: ParsedHeader


def read_shard_header(fs: Any, path: str, file: str, url: str) -> ShardHeader:
    """Read and validate the header of the safetensors file at ``path``.

    ``url`` names the file in messages.
    """
    size = fsio.file_size(fs, path)
    prefix = fsio.read_bytes(fs, path, 0, min(size, FIRST_READ_BYTES))
    length = header_length(prefix, size, url)
    end = LENGTH_BYTES + length
    raw = prefix[LENGTH_BYTES:end]
    if len(prefix) < end:
        raw += fsio.read_bytes(fs, path, len(prefix), end)
    return ShardHeader(file=file, path=path, url=url, size=size, header=parse_header(raw, size, url))


class SafetensorsReader(CheckpointReader):
    """Reads a ``.safetensors`` file, or a sharded checkpoint through its index file.

    ``url`` names either a ``.safetensors`` file or an ``*.index.json`` file.
    """

    format = "safetensors"
    ranged_reads = True

    def __init__(
        self,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        digests: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(url, storage_options, digests=digests)
        self._root = _parent(self.fs, self.path)
        self._index_metadata: dict[str, Any] = {}
        if self.path.endswith(".index.json"):
            self._index_metadata, weight_map = self._read_index()
            shards = self._read_shards(weight_map)
        else:
            file = _basename(self.fs, self.path)
            shards = [read_shard_header(self.fs, self.path, file, url)]
        self._shards = {shard.file: shard for shard in shards}
        self._entries: dict[str, tuple[ShardHeader, HeaderEntry]] = {}
        self._tensors: dict[str, TensorInfo] = {}
        for shard in shards:
            for entry in shard.header.entries:
                self._entries[entry.name] = (shard, entry)
                self._tensors[entry.name] = TensorInfo(entry.name, entry.dtype, entry.shape, shard.file)
        self._check_digest_sizes()
        logger.info("opened %s: %d tensors in %d shards", url, len(self._tensors), len(shards))

    @property
    def tensors(self) -> Mapping[str, TensorInfo]:
        return self._tensors

    @property
    def metadata(self) -> dict[str, str]:
        """The ``__metadata__`` of the first shard (one writer gives every shard the same)."""
        first = next(iter(self._shards.values()))
        return dict(first.header.metadata)

    @property
    def index_metadata(self) -> dict[str, Any]:
        """The index file's ``metadata`` object (for example ``total_size``); empty for one file."""
        return dict(self._index_metadata)

    @property
    def shards(self) -> Mapping[str, ShardHeader]:
        """The shard files in read order, with their sizes and parsed headers."""
        return self._shards

    def _shard_path(self, file: str) -> str:
        return self._shards[file].path

    def _shard_url(self, file: str) -> str:
        return self._shards[file].url

    def _read(self, info: TensorInfo, buffer: torch.Tensor | None) -> torch.Tensor:
        shard, entry = self._entries[info.name]
        out = _scratch(buffer, entry.nbytes)
        fsio.read_into(self.fs, shard.path, shard.header.data_start + entry.begin, out)
        logger.debug("read %s from %s (%d bytes)", info.name, shard.file, entry.nbytes)
        return out.view(entry.dtype).reshape(entry.shape)

    def _read_rows(self, info: TensorInfo, gather: RowGather, buffer: torch.Tensor | None) -> torch.Tensor:
        shard, entry = self._entries[info.name]
        row_shape = entry.shape[1:]
        row_bytes = entry.nbytes // entry.shape[0] if entry.shape[0] else 0
        rows_read = sum(stop - start for start, stop in gather.runs)
        out = _scratch(buffer, rows_read * row_bytes)

        starts: list[int] = []
        views: list[torch.Tensor] = []
        position = 0
        for start, stop in gather.runs:
            length = (stop - start) * row_bytes
            starts.append(shard.header.data_start + entry.begin + start * row_bytes)
            views.append(out[position : position + length])
            position += length
        fsio.read_many_into(self.fs, shard.path, starts, views)
        logger.debug(
            "read %d rows of %s from %s in %d ranged reads (%d bytes)",
            rows_read, info.name, shard.file, len(gather.runs), position,
        )

        result = out.view(entry.dtype).reshape(rows_read, *row_shape)
        if gather.order is not None:
            result = result.index_select(0, gather.order)
        return result

    def _read_many(self, infos: Sequence[TensorInfo], buffer: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Read tensors that lie back to back in one shard with one ranged read per span."""
        located = [self._entries[info.name] for info in infos]
        out = _scratch(buffer, sum(entry.nbytes for _, entry in located))

        # Group into spans of entries that are adjacent in the same shard, in file order.
        order = sorted(range(len(located)), key=lambda i: (located[i][0].file, located[i][1].begin))
        spans: list[tuple[ShardHeader, int, int, list[int]]] = []
        for i in order:
            shard, entry = located[i]
            last = spans[-1] if spans else None
            if last is not None and last[0] is shard and last[2] == entry.begin:
                spans[-1] = (shard, last[1], entry.end, last[3] + [i])
            else:
                spans.append((shard, entry.begin, entry.end, [i]))

        views: dict[int, torch.Tensor] = {}
        position = 0
        by_shard: dict[str, tuple[ShardHeader, list[int], list[torch.Tensor]]] = {}
        for shard, begin, end, members in spans:
            span = out[position : position + end - begin]
            _, starts, targets = by_shard.setdefault(shard.file, (shard, [], []))
            starts.append(shard.header.data_start + begin)
            targets.append(span)
            for i in members:
                entry = located[i][1]
                views[i] = span[entry.begin - begin : entry.end - begin]
            position += end - begin
        for shard, starts, targets in by_shard.values():
            fsio.read_many_into(self.fs, shard.path, starts, targets)
        logger.debug("read %d tensors in %d ranged reads (%d bytes)", len(infos), len(spans), position)

        return {
            info.name: views[i].view(located[i][1].dtype).reshape(located[i][1].shape)
            for i, info in enumerate(infos)
        }

    def _read_index(self) -> tuple[dict[str, Any], dict[str, str]]:
        url = self.url
        size = fsio.file_size(self.fs, self.path)
        raw = fsio.read_bytes(self.fs, self.path, 0, size)
        try:
            document = json.loads(raw.decode("utf-8"), object_pairs_hook=reject_duplicate_keys)
        except DuplicateKeyError as e:
            raise CheckpointFormatError(
                f"{url}: duplicate key {e.key!r} in the index; each tensor may appear once"
            ) from e
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointFormatError(f"{url}: invalid index JSON ({e})") from e

        weight_map = document.get("weight_map") if isinstance(document, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointFormatError(
                f"{url}: invalid index: expected an object with a 'weight_map' object that "
                "maps tensor names to shard files"
            )
        if not weight_map:
            raise EmptyCheckpointError(f"{url}: the index lists no tensors; expected at least one")
        for name, file in weight_map.items():
            validate_tensor_name(name, where=url)
            validate_shard_file(file, where=url, tensor=name)
            if not file.endswith(".safetensors"):
                raise CheckpointFormatError(
                    f"{url}: the index maps tensor {name!r} to {file!r}, which is not a "
                    ".safetensors file; sharded torch pickles are not supported, so convert the "
                    "shards to safetensors or open each shard file on its own"
                )
        metadata = document.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise CheckpointFormatError(f"{url}: invalid index: 'metadata' must be an object")
        return metadata, weight_map

    def _read_shards(self, weight_map: dict[str, str]) -> list[ShardHeader]:
        url = self.url
        listed: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            listed.setdefault(file, []).append(name)

        shards: list[ShardHeader] = []
        root_url = url.rsplit("/", 1)[0] if "/" in url else "."
        for file in sorted(listed):
            path = fsio.join(self.fs, self._root, file)
            shard_url = f"{root_url}/{file}"
            try:
                shards.append(read_shard_header(self.fs, path, file, shard_url))
            except CheckpointNotFoundError as e:
                names = listed[file]
                others = f" and {len(names) - 1} others" if len(names) > 1 else ""
                raise CheckpointNotFoundError(
                    f"{url}: the index names shard {file!r} (for tensor {names[0]!r}{others}), "
                    f"which does not exist at {shard_url}; copy the missing shard or fix the index"
                ) from e

        owner: dict[str, str] = {}
        for shard in shards:
            for entry in shard.header.entries:
                if entry.name in owner:
                    raise CheckpointFormatError(
                        f"{url}: duplicate tensor {entry.name!r} in shards {owner[entry.name]!r} "
                        f"and {shard.file!r}; each tensor must be stored in exactly one shard"
                    )
                owner[entry.name] = shard.file

        for name, file in owner.items():
            mapped = weight_map.get(name)
            if mapped is None:
                raise CheckpointFormatError(
                    f"{url}: tensor {name!r} in shard {file!r} is not listed in the index "
                    "weight_map; regenerate the index"
                )
            if mapped != file:
                raise CheckpointFormatError(
                    f"{url}: the index maps tensor {name!r} to shard {mapped!r}, but it is "
                    f"stored in shard {file!r}; regenerate the index"
                )

        missing = [name for name in weight_map if name not in owner]
        if missing:
            raise CheckpointFormatError(
                f"{url}: the index lists {len(missing)} tensors that their shards do not "
                f"contain, for example {missing[0]!r} in shard {weight_map[missing[0]]!r}; "
                "regenerate the index"
            )
        return shards

    def _check_digest_sizes(self) -> None:
        for file, expected in self._digests.items():
            shard = self._shards.get(file)
            if shard is not None:
                integrity.check_size(file, shard.url, expected, shard.size)


def _scratch(buffer: torch.Tensor | None, nbytes: int) -> torch.Tensor:
    """Return ``nbytes`` of the caller's buffer when it is large enough, else a new buffer."""
    if buffer is not None and buffer.dtype == torch.uint8 and buffer.is_contiguous() and buffer.numel() >= nbytes:
        return buffer.reshape(-1)[:nbytes]
    return fsio.empty_bytes(nbytes)


def _parent(fs: Any, path: str) -> str:
    if fsio.is_local(fs):
        return os.path.dirname(path)
    return posixpath.dirname(path)


def _basename(fs: Any, path: str) -> str:
    if fsio.is_local(fs):
        return os.path.basename(path)
    return posixpath.basename(path)
