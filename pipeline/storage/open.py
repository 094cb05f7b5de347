"""Opening a checkpoint of any supported format from a URL."""

from __future__ import annotations

import logging
from typing import Any, Mapping

from pipeline.storage import fsio
from pipeline.storage.dcp_reader import METADATA_NAME, DcpReader
from pipeline.storage.errors import CheckpointNotFoundError, EmptyCheckpointError
from pipeline.storage.reader import CheckpointReader
from pipeline.storage.safetensors_reader import INDEX_NAME, SINGLE_NAME, SafetensorsReader
from pipeline.storage.torch_reader import SUFFIXES, TorchReader

logger = logging.getLogger(__name__)

# Files looked for, in this order, when the URL names a directory.
_DIRECTORY_CANDIDATES = (INDEX_NAME, METADATA_NAME, SINGLE_NAME, "pytorch_model.bin")


def open_checkpoint(
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    digests: Mapping[str, Any] | None = None,
) -> CheckpointReader:
    """Open the checkpoint at ``url`` with the reader for its format.

    ``url`` is any fsspec URL (``file://``, a plain path, ``s3://``, ``gs://``,
    ``memory://``) naming one of:

    - a ``.safetensors`` file, or an ``*.index.json`` file of a sharded checkpoint;
    - a ``.pt``, ``.pth`` or ``.bin`` file written by ``torch.save``;
    - a directory containing ``model.safetensors.index.json``, a DCP ``.metadata``
      file, ``model.safetensors`` or ``pytorch_model.bin`` (checked in this order).

    ``digests`` maps shard file names to ``{"sha256": ..., "size": ...}`` from a
    manifest. Each listed shard is verified before the first read from it.
    """
    fs, path = fsio.resolve(url, storage_options)
    reader_url = url
    if not path.endswith((".safetensors", ".index.json", *SUFFIXES)):
        if not fs.isdir(path):
            if not fs.exists(path):
                raise CheckpointNotFoundError(f"{url}: no file or directory at this URL")
            raise CheckpointNotFoundError(
                f"{url}: unknown checkpoint file type; expected .safetensors, .index.json, "
                f"{', '.join(SUFFIXES)} or a directory"
            )
        found = next(
            (name for name in _DIRECTORY_CANDIDATES if fs.exists(fsio.join(fs, path, name))),
            None,
        )
        if found is None:
            raise EmptyCheckpointError(
                f"{url}: no checkpoint in this directory; expected one of "
                f"{', '.join(_DIRECTORY_CANDIDATES)}"
            )
        if found == METADATA_NAME:
            return DcpReader(url, storage_options, digests=digests)
        reader_url = f"{url.rstrip('/')}/{found}"
        path = fsio.join(fs, path, found)

    logger.debug("opening %s as %s", reader_url, path)
    if path.endswith((".safetensors", ".index.json")):
        return SafetensorsReader(reader_url, storage_options, digests=digests)
    return TorchReader(reader_url, storage_options, digests=digests)
