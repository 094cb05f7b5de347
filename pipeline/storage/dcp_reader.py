"""Reader for torch.distributed.checkpoint (DCP) directories, through torch's own reader.

Tensor bytes are loaded by ``torch.distributed.checkpoint.load`` with an
``FsspecReader``, so chunked and resharded tensors are reassembled by torch. Two
steps of that path would unpickle without restriction, and this module replaces them:

- the ``.metadata`` file is a pickle that ``FileSystemReader.read_metadata`` loads
  with plain ``pickle.load`` (torch 2.13). Here it is loaded by an unpickler that
  allows only the DCP metadata classes, ``torch.Size``, dtypes and paths.
- non-tensor entries are loaded with ``torch.load(weights_only=True)`` in place of
  the default planner's ``weights_only=False``.

The chunk file names in the metadata become paths inside the checkpoint directory,
so each must be a plain file name (see :func:`~pipeline.storage.names.validate_shard_file`).

Names are the fully qualified names that DCP stored, which it flattens from nested
state dicts with ``.`` (for example ``optimizer.state.0.exp_avg``).
"""

from __future__ import annotations

import io
import logging
import pickle
import warnings
from typing import Any, Mapping

import torch
import torch.distributed.checkpoint as dcp
# NOTE: torch 2.13 does not export FsspecReader from torch.distributed.checkpoint, so this
# imports it from its private module, which a later torch may move.
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    TensorStorageMetadata,
)

from pipeline.storage import fsio
from pipeline.storage.errors import (
    CheckpointFormatError,
    EmptyCheckpointError,
    UnsafeCheckpointError,
)
from pipeline.storage.names import validate_shard_file, validate_tensor_name
from pipeline.storage.reader import CheckpointReader, TensorInfo

logger = logging.getLogger(__name__)

METADATA_NAME = ".metadata"

_ALLOWED_GLOBALS = frozenset(
    [
        ("torch.distributed.checkpoint.metadata", "Metadata"),
        ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
        ("torch.distributed.checkpoint.metadata", "StorageMeta"),
        ("torch.distributed.checkpoint.metadata", "TensorProperties"),
        ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PureWindowsPath"),
        ("pathlib._local", "PosixPath"),
        ("pathlib._local", "PurePosixPath"),
        ("pathlib._local", "WindowsPath"),
        ("pathlib._local", "PureWindowsPath"),
    ]
)


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a DCP ``.metadata`` file needs."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")


def load_dcp_metadata(fs: Any, path: str, url: str) -> Metadata:
    """Unpickle a DCP ``.metadata`` file without running code it references.

    ``url`` names the file in messages.
    """
    raw = fsio.read_bytes(fs, path, 0, fsio.file_size(fs, path))
    try:
        metadata = _MetadataUnpickler(io.BytesIO(raw)).load()
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{url}: rejected: the DCP metadata pickle needs code that this reader does not "
            f"allow ({e}), and none of it was run. Re-save the checkpoint with "
            "torch.distributed.checkpoint.save"
        ) from e
    except (EOFError, AttributeError, ImportError, TypeError, ValueError) as e:
        raise CheckpointFormatError(
            f"{url}: invalid DCP metadata ({type(e).__name__}: {e}); the file is truncated "
            "or not written by torch.distributed.checkpoint"
        ) from e
    if not isinstance(metadata, Metadata):
        raise CheckpointFormatError(
            f"{url}: invalid DCP metadata: expected a Metadata object, got {type(metadata).__name__}"
        )
    return metadata


class _CachedMetadataReader(FsspecReader):
    """torch's fsspec reader, given metadata that was already loaded safely."""

    def __init__(self, path: str, metadata: Metadata, **storage_options: Any) -> None:
        super().__init__(path, **storage_options)
        self._loaded_metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return self._loaded_metadata


class _WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """The default load planner, with non-tensor entries loaded with weights_only=True."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            # set_up_planner copies the state dict; dcp.load returns the original one.
            self.original_state_dict[fqn] = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(
                f"DCP entry {fqn!r}: rejected: its pickle needs code that weights-only "
                "loading does not allow, and none of it was run"
            ) from e


class DcpReader(CheckpointReader):
    """Reads tensors and non-tensor entries of a DCP checkpoint directory."""

    format = "dcp"

    def __init__(
        self,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        digests: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(url, storage_options, digests=digests)
        metadata_path = fsio.join(self.fs, self.path, METADATA_NAME)
        metadata_url = self._shard_url(METADATA_NAME)
        self._verify(METADATA_NAME)
        self._metadata = load_dcp_metadata(self.fs, metadata_path, metadata_url)

        files: dict[str, list[str]] = {}
        for index, storage in (self._metadata.storage_data or {}).items():
            file = validate_shard_file(storage.relative_path, where=metadata_url, tensor=index.fqn)
            files.setdefault(index.fqn, [])
            if file not in files[index.fqn]:
                files[index.fqn].append(file)

        self._files = files
        self._tensors: dict[str, TensorInfo] = {}
        self._object_names: list[str] = []
        for name, entry in self._metadata.state_dict_metadata.items():
            validate_tensor_name(name, where=metadata_url)
            if name not in files:
                raise CheckpointFormatError(
                    f"{metadata_url}: entry {name!r} has no storage location; the metadata is "
                    "incomplete"
                )
            if isinstance(entry, TensorStorageMetadata):
                shape = tuple(int(d) for d in entry.size)
                self._tensors[name] = TensorInfo(name, entry.properties.dtype, shape, files[name][0])
            elif isinstance(entry, BytesStorageMetadata):
                self._object_names.append(name)
        if not self._tensors:
            raise EmptyCheckpointError(
                f"{url}: the DCP checkpoint contains no tensors; expected at least one"
            )
        logger.info(
            "opened %s: %d tensors, %d other entries", url, len(self._tensors), len(self._object_names)
        )

    @property
    def tensors(self) -> Mapping[str, TensorInfo]:
        return self._tensors

    def objects(self) -> dict[str, Any]:
        """Load and return the non-tensor entries, each with ``torch.load(weights_only=True)``."""
        if not self._object_names:
            return {}
        for file in sorted({f for name in self._object_names for f in self._files[name]}):
            self._verify(file)
        state: dict[str, Any] = {name: None for name in self._object_names}
        self._load(state)
        return state

    def _shard_path(self, file: str) -> str:
        return fsio.join(self.fs, self.path, file)

    def _shard_url(self, file: str) -> str:
        return f"{self.url.rstrip('/')}/{file}"

    def _read(self, info: TensorInfo, buffer: torch.Tensor | None) -> torch.Tensor:
        # The base class verified the first chunk file; a tensor split over several
        # files needs the others verified too.
        for file in self._files[info.name][1:]:
            self._verify(file)
        target = torch.empty(info.shape, dtype=info.dtype)
        self._load({info.name: target})
        return target

    def _load(self, state: dict[str, Any]) -> None:
        reader = _CachedMetadataReader(self.url, self._metadata, **self.storage_options)
        planner = _WeightsOnlyLoadPlanner(flatten_state_dict=False, allow_partial_load=True)
        with warnings.catch_warnings():
            # dcp.load warns on every call without a process group (torch 2.13). Reading in
            # one process is the intent here. NOTE: catch_warnings swaps the process-wide
            # filter list, so a warning raised by another thread meanwhile may be hidden.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            try:
                dcp.load(state, storage_reader=reader, planner=planner, no_dist=True)
            except CheckpointException as e:
                # DCP wraps each rank's error in a BaseException subclass, which
                # `except Exception` does not catch. Re-raise the one local error.
                raise _unwrap(e, self.url) from e


def _unwrap(error: CheckpointException, url: str) -> Exception:
    failures = list(error.failures.values())
    cause = failures[0][0] if failures else None
    if isinstance(cause, (CheckpointFormatError, UnsafeCheckpointError, OSError)):
        return cause
    return CheckpointFormatError(
        f"{url}: loading from the DCP checkpoint failed ({type(cause).__name__}: {cause}); the "
        "checkpoint is incomplete or corrupt"
    )
