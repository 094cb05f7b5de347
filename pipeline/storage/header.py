"""Parsing, validation and encoding of safetensors headers.

A safetensors file is an 8-byte little-endian header length ``N``, then ``N`` bytes of
JSON, then the data section. The JSON maps each tensor name to its ``dtype``, ``shape``
and ``data_offsets`` (``[begin, end)`` relative to the data section), plus an optional
``__metadata__`` object of string values. The tensors must cover the data section
exactly: no overlaps, no gaps and no bytes after the last tensor.

This module does no I/O. The readers fetch the bytes and the writer stores them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch

from pipeline.storage.dtypes import SAFETENSORS_TO_TORCH, safetensors_dtype
from pipeline.storage.errors import CheckpointFormatError, EmptyCheckpointError
from pipeline.storage.names import validate_tensor_name

LENGTH_BYTES = 8
# The safetensors library rejects headers above 100 MB; so does this reader, so that a
# corrupt length cannot make it allocate gigabytes.
MAX_HEADER_BYTES = 100_000_000
# Data starts at a multiple of this, as files written by the safetensors library do.
HEADER_ALIGNMENT = 8
METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of a safetensors header, with offsets relative to the data section."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class ParsedHeader:
    """A validated safetensors header.

    ``entries`` are in data order. ``data_start`` is the file offset of the data
    section (8 plus the header length).
    """

    entries: tuple[HeaderEntry, ...]
    metadata: dict[str, str]
    data_start: int


def header_length(prefix: bytes, file_size: int, url: str) -> int:
    """Return the JSON header length that the first 8 bytes of a file declare.

    Raises CheckpointFormatError for a file shorter than 8 bytes, or a length that
    runs past the end of the file or above :data:`MAX_HEADER_BYTES`.
    """
    if file_size < LENGTH_BYTES or len(prefix) < LENGTH_BYTES:
        raise CheckpointFormatError(
            f"{url}: truncated safetensors file: it has {file_size} bytes, but the header "
            f"length field alone needs {LENGTH_BYTES}; re-download or re-export the file"
        )
    length = int.from_bytes(prefix[:LENGTH_BYTES], "little")
    if LENGTH_BYTES + length > file_size:
        raise CheckpointFormatError(
            f"{url}: header length {length} is larger than the file ({file_size} bytes "
            f"including the {LENGTH_BYTES}-byte length field); the file is truncated or "
            "not a safetensors file"
        )
    if length > MAX_HEADER_BYTES:
        raise CheckpointFormatError(
            f"{url}: header length {length} exceeds the limit of {MAX_HEADER_BYTES} bytes; "
            "the file is corrupt or not a safetensors file"
        )
    return length


def parse_header(raw: bytes, file_size: int, url: str) -> ParsedHeader:
    """Parse and validate the JSON header ``raw`` of a file of ``file_size`` bytes.

    Raises CheckpointFormatError naming ``url`` and the tensor for invalid JSON, a
    duplicate name, an unknown dtype, a shape that disagrees with the byte length, and
    offsets that overlap, leave a gap or run past the data section. Raises
    EmptyCheckpointError for a header without tensors.
    """
    try:
        document = json.loads(raw.decode("utf-8"), object_pairs_hook=reject_duplicate_keys)
    except DuplicateKeyError as e:
        raise CheckpointFormatError(
            f"{url}: duplicate tensor name {e.key!r} in the header; each name may appear once"
        ) from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointFormatError(
            f"{url}: invalid header JSON ({e}); the file is corrupt or not a safetensors file"
        ) from e
    if not isinstance(document, dict):
        raise CheckpointFormatError(
            f"{url}: invalid header: expected a JSON object, got {type(document).__name__}"
        )

    metadata = _parse_metadata(document.pop(METADATA_KEY, None), url)
    entries = [_parse_entry(name, value, url) for name, value in document.items()]
    if not entries:
        raise EmptyCheckpointError(
            f"{url}: the safetensors file contains no tensors; expected at least one"
        )
    data_start = LENGTH_BYTES + len(raw)
    ordered = _check_layout(entries, file_size - data_start, url)
    return ParsedHeader(entries=ordered, metadata=metadata, data_start=data_start)


def encode_header(
    entries: Iterable[tuple[str, torch.dtype, tuple[int, ...], int, int]],
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """Return the 8-byte length plus the JSON header for tensors in data order.

    Each entry is ``(name, dtype, shape, begin, end)``. The JSON is padded with spaces
    so that the data section starts at a multiple of :data:`HEADER_ALIGNMENT`.
    """
    document: dict[str, Any] = {}
    if metadata:
        document[METADATA_KEY] = dict(metadata)
    for name, dtype, shape, begin, end in entries:
        document[name] = {
            "dtype": safetensors_dtype(dtype),
            "shape": list(shape),
            "data_offsets": [begin, end],
        }
    text = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    padding = -(LENGTH_BYTES + len(text)) % HEADER_ALIGNMENT
    text += b" " * padding
    return len(text).to_bytes(LENGTH_BYTES, "little") + text


class DuplicateKeyError(ValueError):
    """A JSON object with a repeated key, which ``json.loads`` would otherwise keep silently."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Build a dict from JSON pairs, raising DuplicateKeyError on a repeated key."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise DuplicateKeyError(key)
        result[key] = value
    return result


def _parse_metadata(value: Any, url: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise CheckpointFormatError(
            f"{url}: invalid header: {METADATA_KEY} must map strings to strings"
        )
    return value


def _parse_entry(name: str, value: Any, url: str) -> HeaderEntry:
    validate_tensor_name(name, where=url)
    where = f"{url}: tensor {name!r}"
    if not isinstance(value, dict):
        raise CheckpointFormatError(f"{where}: expected an object with dtype, shape and data_offsets")
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in value]
    if missing:
        raise CheckpointFormatError(f"{where}: header entry is missing {', '.join(missing)}")

    code = value["dtype"]
    dtype = SAFETENSORS_TO_TORCH.get(code) if isinstance(code, str) else None
    if dtype is None:
        known = ", ".join(SAFETENSORS_TO_TORCH)
        raise CheckpointFormatError(f"{where}: unknown dtype {code!r}; expected one of {known}")

    shape = value["shape"]
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CheckpointFormatError(
            f"{where}: invalid shape {shape!r}; expected a list of non-negative integers"
        )

    offsets = value["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise CheckpointFormatError(
            f"{where}: invalid data_offsets {offsets!r}; expected [begin, end] with "
            "0 <= begin <= end"
        )

    begin, end = offsets
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise CheckpointFormatError(
            f"{where}: shape {shape} x dtype {code} ({dtype.itemsize} bytes per element) "
            f"needs {expected} bytes, but data_offsets [{begin}, {end}] span {end - begin} bytes"
        )
    return HeaderEntry(name=name, dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_layout(entries: list[HeaderEntry], data_size: int, url: str) -> tuple[HeaderEntry, ...]:
    ordered = sorted(entries, key=lambda e: (e.begin, e.end))
    position = 0
    previous: HeaderEntry | None = None
    for entry in ordered:
        if entry.begin < position:
            assert previous is not None  # position > 0 only after a first entry
            raise CheckpointFormatError(
                f"{url}: tensor {entry.name!r} data_offsets [{entry.begin}, {entry.end}] "
                f"overlap tensor {previous.name!r} [{previous.begin}, {previous.end}]; "
                "each byte of the data section belongs to one tensor"
            )
        if entry.begin > position:
            after = f"after tensor {previous.name!r}" if previous else "at the start of the data"
            raise CheckpointFormatError(
                f"{url}: gap of {entry.begin - position} bytes {after}, before tensor "
                f"{entry.name!r} [{entry.begin}, {entry.end}]; tensors must cover the data "
                "section without gaps"
            )
        position = entry.end
        previous = entry

    assert previous is not None  # parse_header rejects an empty header before this
    if position > data_size:
        raise CheckpointFormatError(
            f"{url}: tensor {previous.name!r} data_offsets [{previous.begin}, {previous.end}] "
            f"run past the data section, which has {data_size} bytes; the file is truncated "
            "or its offsets are out of range"
        )
    if position < data_size:
        raise CheckpointFormatError(
            f"{url}: {data_size - position} bytes after the last tensor {previous.name!r} "
            "belong to no tensor; the file is corrupt or has trailing data"
        )
    return tuple(ordered)
