"""Byte-level helpers over fsspec: resolving URLs and ranged reads into tensors.

Local files are read with ``readinto`` straight into the destination tensor, so a
tensor costs one copy from the page cache. Other filesystems return ``bytes`` from
``cat_file``, which are then copied into the tensor, so a ranged read briefly needs
twice its size in memory.

Read buffers of 1 MiB and more are anonymous memory maps (see :func:`empty_bytes`),
so their memory returns to the operating system as soon as the last tensor viewing
them is released.
"""

from __future__ import annotations

import logging
import mmap
import os
from typing import Any, Mapping, Sequence

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from pipeline.storage.errors import CheckpointFormatError, CheckpointNotFoundError

logger = logging.getLogger(__name__)


def resolve(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the fsspec filesystem and the path inside it for ``url``."""
    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    return fs, path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def join(fs: fsspec.AbstractFileSystem, base: str, name: str) -> str:
    """Return the path of ``name`` inside the directory ``base``."""
    if is_local(fs):
        return os.path.join(base, name)
    return f"{base.rstrip('/')}/{name}"


def url_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Return the URL of ``path`` with its protocol, for messages and records."""
    return fs.unstrip_protocol(path)


def file_size(fs: fsspec.AbstractFileSystem, path: str) -> int:
    """Return the size of a file, raising CheckpointNotFoundError when it is missing."""
    try:
        size = fs.size(path)
    except FileNotFoundError as e:
        raise CheckpointNotFoundError(f"{url_of(fs, path)}: file not found") from e
    if size is None:
        raise CheckpointNotFoundError(f"{url_of(fs, path)}: the filesystem reports no size")
    return int(size)


# glibc serves allocations below its dynamic mmap threshold (up to 32 MiB on 64-bit) from
# heaps that it keeps after free(). Read buffers from mmap avoid that retention, which
# a copy in blocks of a few MiB would otherwise grow by several blocks per thread.
_MMAP_BUFFER_BYTES = 1 * 2**20


def empty_bytes(nbytes: int) -> torch.Tensor:
    """Return an uninitialized uint8 tensor of ``nbytes`` bytes for a read buffer."""
    if nbytes < _MMAP_BUFFER_BYTES:
        return torch.empty(nbytes, dtype=torch.uint8)
    # The tensor keeps a reference to the map, which is unmapped when the last view dies.
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8)


def read_bytes(fs: fsspec.AbstractFileSystem, path: str, start: int, end: int) -> bytes:
    """Return bytes ``[start, end)`` of a file with one ranged read."""
    if end <= start:
        return b""
    if is_local(fs):
        with open(path, "rb", buffering=0) as f:
            f.seek(start)
            data = f.read(end - start)
    else:
        data = fs.cat_file(path, start=start, end=end)
    _check_length(fs, path, start, end - start, len(data))
    return data


def read_into(fs: fsspec.AbstractFileSystem, path: str, start: int, out: torch.Tensor) -> None:
    """Fill the contiguous uint8 tensor ``out`` from the file at offset ``start``.

    Issues one ranged read of ``out.numel()`` bytes.
    """
    read_many_into(fs, path, [start], [out])


def read_many_into(
    fs: fsspec.AbstractFileSystem,
    path: str,
    starts: Sequence[int],
    outs: Sequence[torch.Tensor],
) -> None:
    """Fill each uint8 tensor ``outs[i]`` from offset ``starts[i]`` of one file.

    Each range is one ranged read. Remote filesystems fetch the ranges concurrently
    through ``cat_ranges``.
    """
    if is_local(fs):
        with open(path, "rb", buffering=0) as f:
            for start, out in zip(starts, outs):
                _readinto_exact(f, fs, path, start, out)
        return

    pending = [(start, out) for start, out in zip(starts, outs) if out.numel()]
    if not pending:
        return
    blocks = fs.cat_ranges(
        [path] * len(pending),
        [start for start, _ in pending],
        [start + out.numel() for start, out in pending],
        on_error="raise",
    )
    for (start, out), data in zip(pending, blocks):
        _check_length(fs, path, start, out.numel(), len(data))
        memoryview(out.numpy())[:] = data


def _readinto_exact(f: Any, fs: fsspec.AbstractFileSystem, path: str, start: int, out: torch.Tensor) -> None:
    view = memoryview(out.numpy())
    f.seek(start)
    filled = 0
    while filled < len(view):
        count = f.readinto(view[filled:])
        if not count:
            break
        filled += count
    _check_length(fs, path, start, len(view), filled)


def _check_length(fs: fsspec.AbstractFileSystem, path: str, start: int, expected: int, actual: int) -> None:
    if actual != expected:
        raise CheckpointFormatError(
            f"{url_of(fs, path)}: truncated read: expected {expected} bytes at offset {start}, "
            f"got {actual}; the file is shorter than its header says or changed while being read"
        )
