"""Reader for PyTorch pickle checkpoints (``.pt``, ``.pth``, ``.bin``).

The file is loaded with ``torch.load(weights_only=True)``, whose unpickler accepts
only tensors, primitive containers and a fixed list of torch types. A pickle that
references any other global (a ``__reduce__`` payload, a custom class) is rejected
with UnsafeCheckpointError before that global is called.

Memory: a local file is loaded with ``mmap=True``, so tensors stay in the page cache
until they are read. A file on another filesystem is loaded through a buffered fsspec
file, and all its tensors stay in memory while the reader exists.
"""

from __future__ import annotations

import logging
import os
import pickle
import posixpath
import re
import zipfile
from typing import Any, Mapping

import torch

from pipeline.storage import fsio
from pipeline.storage.errors import (
    CheckpointFormatError,
    EmptyCheckpointError,
    UnsafeCheckpointError,
)
from pipeline.storage.flatten import flatten_state
from pipeline.storage.names import validate_tensor_name
from pipeline.storage.reader import CheckpointReader, TensorInfo

logger = logging.getLogger(__name__)

SUFFIXES = (".pt", ".pth", ".bin")
_REMOTE_BLOCK_BYTES = 16 * 2**20


def load_weights_only(fs: Any, path: str, url: str) -> Any:
    """Load a torch pickle with ``weights_only=True`` and return the unpickled object.

    Raises UnsafeCheckpointError for a pickle that needs code, and
    CheckpointFormatError for a file that is not a readable torch checkpoint. ``url``
    names the file in messages.
    """
    try:
        if fsio.is_local(fs):
            return _load_local(path)
        with fs.open(path, "rb", block_size=_REMOTE_BLOCK_BYTES) as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise CheckpointFormatError(
                f"{url}: not a readable torch checkpoint (UnpicklingError: {e}); the file is "
                "truncated or in another format"
            ) from e
        match = re.search(r"GLOBAL ([\w.]+)", str(e))
        reason = f"it references {match.group(1)}" if match else "see the chained error"
        raise UnsafeCheckpointError(
            f"{url}: rejected: the pickle needs code that weights-only loading does not "
            f"allow ({reason}), and none of it was run. If the file comes from a trusted "
            "source, convert it to safetensors there"
        ) from e
    except (RuntimeError, EOFError, ValueError, IndexError, KeyError, TypeError, zipfile.BadZipFile) as e:
        # Bytes that are not a torch zip go to torch's legacy pickle loader, which fails
        # with whichever of these the garbage happens to trigger.
        raise CheckpointFormatError(
            f"{url}: not a readable torch checkpoint ({type(e).__name__}: {e}); the file is "
            "truncated or in another format"
        ) from e


def _load_local(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        # Files written with _use_new_zipfile_serialization=False cannot be memory-mapped.
        if "mmap" not in str(e):
            raise
        logger.info("%s is in the legacy torch format; loading it without mmap", path)
        return torch.load(path, map_location="cpu", weights_only=True)


class TorchReader(CheckpointReader):
    """Reads the tensors of a ``torch.save`` file, nested state dicts flattened.

    See :mod:`pipeline.storage.flatten` for the names of nested entries, such as
    ``optimizer.state.0.exp_avg``.
    """

    format = "torch"

    def __init__(
        self,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        digests: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(url, storage_options, digests=digests)
        local = fsio.is_local(self.fs)
        self._file = os.path.basename(self.path) if local else posixpath.basename(self.path)
        # The whole file is read by torch.load, so it is verified before it is unpickled.
        self._verify(self._file)

        state = load_weights_only(self.fs, self.path, url)
        if not isinstance(state, Mapping):
            raise CheckpointFormatError(
                f"{url}: expected a state dict (a mapping of names to tensors), got "
                f"{type(state).__name__}"
            )
        tensors, self._objects = flatten_state(state, where=url)
        if not tensors:
            raise EmptyCheckpointError(
                f"{url}: the checkpoint contains no tensors; expected a state dict with at "
                "least one tensor"
            )
        self._values = tensors
        self._tensors = {}
        for name, tensor in tensors.items():
            validate_tensor_name(name, where=url)
            self._tensors[name] = TensorInfo(name, tensor.dtype, tuple(tensor.shape), self._file)
        logger.info("opened %s: %d tensors, %d other entries", url, len(tensors), len(self._objects))

    @property
    def tensors(self) -> Mapping[str, TensorInfo]:
        return self._tensors

    def objects(self) -> dict[str, Any]:
        return dict(self._objects)

    def _shard_path(self, file: str) -> str:
        return self.path

    def _shard_url(self, file: str) -> str:
        return self.url

    def _read(self, info: TensorInfo, buffer: torch.Tensor | None) -> torch.Tensor:
        return self._values[info.name]
