"""The reader interface: one abstract base with two primitives, everything else derived.

The execution layer uses only :class:`CheckpointReader`. A format implements:

1. ``tensors``: the header-only listing, ``{name: TensorInfo}`` in read order (the
   order in which reading every tensor touches each shard front to back).
2. ``_read(info, buffer)``: the bytes of one whole tensor, as a tensor.

and may override ``_read_rows(info, gather, buffer)`` when it can fetch a row selection
without reading the whole tensor, and ``_read_many(infos, buffer)`` when it can fetch
several tensors with fewer requests (safetensors does both with ranged reads).
``read``, ``read_rows``, ``read_many``, ``names``, ``info``, ``total_nbytes`` and digest
verification are derived here.

``buffer`` is an optional contiguous uint8 tensor that a reader may fill and return
views of, in place of allocating. A caller that passes one must not reuse it while a
returned tensor is still in use. Readers that cannot use it ignore it.

Digests: when the caller passes ``digests`` (``{shard_file: {"sha256", "size"}}``
from a manifest), a shard is hashed in full before the first tensor is returned from
it, and a mismatch raises IntegrityError. Shards without an entry are not verified.
"""

from __future__ import annotations

import logging
import math
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Mapping, Sequence

import torch

from pipeline.storage import fsio, integrity
from pipeline.storage.errors import TensorNotFoundError
from pipeline.storage.rows import RowGather, RowSelection, plan_row_gather

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorInfo:
    """Header-only description of one stored tensor.

    ``shard`` is the file, relative to the checkpoint's directory, that contains the
    tensor's bytes (for a DCP checkpoint, the file of its first chunk).
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    shard: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class CheckpointReader(ABC):
    """Read-only access to the named tensors of one checkpoint at an fsspec URL."""

    format: ClassVar[str]
    # True when read_rows and read_many fetch only the requested bytes. Otherwise they
    # read whole tensors, and callers that stream should read each tensor once.
    ranged_reads: ClassVar[bool] = False

    def __init__(
        self,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        digests: Mapping[str, Any] | None = None,
    ) -> None:
        if sys.byteorder != "little":
            raise NotImplementedError(
                "checkpoint readers store and return little-endian data and do not run on "
                f"{sys.byteorder}-endian hosts"
            )
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.fs, self.path = fsio.resolve(url, self.storage_options)
        self._digests = integrity.parse_digests(digests, where=url)
        self._verified: set[str] = set()

    # -- primitives ---------------------------------------------------------------

    @property
    @abstractmethod
    def tensors(self) -> Mapping[str, TensorInfo]:
        """Header-only listing of every tensor, in read order."""

    @abstractmethod
    def _read(self, info: TensorInfo, buffer: torch.Tensor | None) -> torch.Tensor:
        """Return the whole tensor described by ``info``."""

    @abstractmethod
    def _shard_path(self, file: str) -> str:
        """Return the filesystem path of the shard file ``file``, for verification."""

    @abstractmethod
    def _shard_url(self, file: str) -> str:
        """Return the URL of the shard file ``file`` in the caller's spelling, for messages."""

    # -- derived ------------------------------------------------------------------
    @property
    def metadata(self) -> dict[str, str]:
        """String metadata stored with the checkpoint (safetensors ``__metadata__``)."""
        return {}

    def objects(self) -> dict[str, Any]:
        """Non-tensor entries (for example optimizer hyperparameters), by flattened name."""
        return {}

    def names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def total_nbytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise TensorNotFoundError(
                f"{self.url}: no tensor named {name!r}; the checkpoint has {len(self.tensors)} "
                f"tensors, for example {list(self.tensors)[:5]}"
            ) from None

    def read(self, name: str, *, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Return tensor ``name`` as a CPU tensor with its stored dtype and shape."""
        info = self.info(name)
        self._verify(info.shard)
        return self._read(info, buffer)

    def read_rows(self, name: str, rows: RowSelection, *, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Return the rows ``rows`` of tensor ``name`` along axis 0.

        ``rows`` is a slice or a sequence of row indices (duplicates and any order
        allowed, negative indices count from the end). The result has shape
        ``(len(rows), *shape[1:])`` and follows the requested order.
        """
        info = self.info(name)
        if not info.shape:
            raise IndexError(f"{self.url}: tensor {name!r} is a scalar and has no rows to select")
        gather = plan_row_gather(rows, info.shape[0], subject=f"{self.url}: tensor {name!r}")
        self._verify(info.shard)
        return self._read_rows(info, gather, buffer)

    def read_many(self, names: Sequence[str], *, buffer: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Return several whole tensors by name, in the order given."""
        infos = [self.info(name) for name in names]
        for file in dict.fromkeys(info.shard for info in infos):
            self._verify(file)
        return self._read_many(infos, buffer)

    def _read_rows(self, info: TensorInfo, gather: RowGather, buffer: torch.Tensor | None) -> torch.Tensor:
        """Select rows from the whole tensor. Formats with ranged reads override this."""
        tensor = self._read(info, None)
        if gather.order is None:
            parts = [tensor[start:stop] for start, stop in gather.runs]
            if len(parts) == 1:
                return parts[0].clone()
            return torch.cat(parts) if parts else tensor[:0].clone()
        distinct = torch.cat([torch.arange(start, stop) for start, stop in gather.runs])
        return tensor.index_select(0, distinct[gather.order])

    def _read_many(self, infos: Sequence[TensorInfo], buffer: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Read the tensors one by one. Formats that can batch reads override this."""
        return {info.name: self._read(info, None) for info in infos}

    def _verify(self, file: str) -> None:
        expected = self._digests.get(file)
        if expected is None or file in self._verified:
            return
        integrity.verify_file(self.fs, self._shard_path(file), file, expected, url=self._shard_url(file))
        self._verified.add(file)

    def close(self) -> None:
        """Release resources. Readers hold no open files between calls, so this does nothing."""

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}, tensors={len(self.tensors)})"
