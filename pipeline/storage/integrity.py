"""Shard digests: the sha256 and byte size that a manifest records for each shard file."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Mapping

import fsspec

from pipeline.storage import fsio
from pipeline.storage.errors import IntegrityError

logger = logging.getLogger(__name__)

# Block size for hashing a shard before use; memory for verification is one block.
VERIFY_BLOCK_BYTES = 16 * 2**20


@dataclass(frozen=True)
class ShardDigest:
    """The expected sha256 (lowercase hex) and size in bytes of one shard file."""

    sha256: str
    size: int


def parse_digests(digests: Mapping[str, Any] | None, *, where: str) -> dict[str, ShardDigest]:
    """Return ``{shard_file: ShardDigest}`` from a manifest mapping.

    Values may be ShardDigest instances or mappings with ``sha256`` and ``size``.
    ``where`` names the checkpoint for error messages.
    """
    parsed: dict[str, ShardDigest] = {}
    for file, value in (digests or {}).items():
        if isinstance(value, ShardDigest):
            parsed[file] = value
            continue
        try:
            sha256 = str(value["sha256"]).lower()
            size = int(value["size"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"{where}: digest for shard {file!r} is {value!r}; expected a mapping with "
                "'sha256' (hex string) and 'size' (bytes)"
            ) from e
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(
                f"{where}: digest for shard {file!r} has sha256 {sha256!r}; expected 64 hex digits"
            )
        parsed[file] = ShardDigest(sha256=sha256, size=size)
    return parsed


def check_size(file: str, url: str, expected: ShardDigest, actual_size: int) -> None:
    """Raise IntegrityError when a shard's size differs from its manifest entry."""
    if actual_size != expected.size:
        raise IntegrityError(
            f"shard {file} ({url}) failed verification: expected size {expected.size} bytes, "
            f"actual {actual_size} bytes; the shard is truncated, replaced or the manifest "
            "is stale. Copy the shard again or regenerate the manifest"
        )


def verify_file(
    fs: fsspec.AbstractFileSystem, path: str, file: str, expected: ShardDigest, *, url: str
) -> None:
    """Hash a whole shard file and raise IntegrityError unless it matches ``expected``.

    Reads the file in blocks of :data:`VERIFY_BLOCK_BYTES` with ranged reads. ``url``
    names the shard in messages.
    """
    size = fsio.file_size(fs, path)
    check_size(file, url, expected, size)
    digest = hashlib.sha256()
    for start in range(0, size, VERIFY_BLOCK_BYTES):
        digest.update(fsio.read_bytes(fs, path, start, min(size, start + VERIFY_BLOCK_BYTES)))
    actual = digest.hexdigest()
    if actual != expected.sha256:
        raise IntegrityError(
            f"shard {file} ({url}) failed verification: expected sha256 {expected.sha256}, "
            f"actual {actual}; the shard is corrupt or the manifest is stale. Copy the shard "
            "again or regenerate the manifest"
        )
    logger.info("verified shard %s (%d bytes, sha256 %s)", url, size, actual)
