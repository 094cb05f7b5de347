"""ModelVersion: one published version, the object the training fleet loads from."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Sequence

from pipeline.models.spec import ModelSpec
from pipeline.registry.layout import MODEL_PART, OPTIMIZER_PART, index_name
from pipeline.registry.manifest import Manifest
from pipeline.schema import FeatureSchema
from pipeline.storage import SafetensorsReader

if TYPE_CHECKING:
    import torch
    from torch import nn

    from pipeline.registry.client import Registry
    from pipeline.registry.loading import LoadReport
    from pipeline.registry.verify import VerifyReport

logger = logging.getLogger(__name__)


class ModelVersion:
    """A published version: its validated manifest and the files under its folder."""

    def __init__(self, registry: "Registry", manifest: Manifest) -> None:
        self.registry = registry
        self.manifest = manifest

    @property
    def model(self) -> str:
        return self.manifest.model

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def url(self) -> str:
        """URL of the version folder."""
        return self.registry.version_url(self.model, self.version)

    @property
    def created_at(self) -> str:
        return self.manifest.created_at

    def file_url(self, name: str) -> str:
        return f"{self.url}/{name}"

    @property
    def feature_schema(self) -> FeatureSchema:
        """The feature schema recorded in the manifest."""
        return self.manifest.feature_schema()

    @property
    def model_spec(self) -> ModelSpec:
        """The model spec recorded in the manifest."""
        return self.manifest.model_spec()

    def as_parent(self) -> dict[str, str]:
        """Return this version's lineage entry for the manifest of a version derived from it."""
        return {
            "registry": self.registry.url,
            "model": self.model,
            "version": self.version,
            "manifest_sha256": self.manifest.sha256,
        }

    def open(self, part: str = MODEL_PART) -> SafetensorsReader:
        """Open one part as a reader that verifies each shard's digest before its first read."""
        if part == OPTIMIZER_PART and not self.manifest.optimizer_state:
            raise ValueError(f"version {self.version} of model {self.model!r} has no optimizer state")
        if part not in (MODEL_PART, OPTIMIZER_PART):
            raise ValueError(f"part {part!r} is invalid; expected {MODEL_PART!r} or {OPTIMIZER_PART!r}")
        return SafetensorsReader(
            self.file_url(index_name(part)),
            self.registry.storage_options,
            digests=self.manifest.part_digests(part),
        )

    def load_into(self, module: "nn.Module", strict: bool = True, schema: FeatureSchema | None = None) -> "LoadReport":
        """Copy this version's tensors into ``module``'s parameters and buffers.

        See :func:`pipeline.registry.loading.load_into`.
        """
        from pipeline.registry.loading import load_into

        return load_into(self, module, strict=strict, schema=schema)

    def load_optimizer_state(
        self, optimizer: "torch.optim.Optimizer", param_names: Sequence[str], strict: bool = True
    ) -> list[str]:
        """Load this version's optimizer state into ``optimizer``.

        See :func:`pipeline.registry.loading.load_optimizer_state`.
        """
        from pipeline.registry.loading import load_optimizer_state

        return load_optimizer_state(self, optimizer, param_names, strict=strict)

    def verify(self) -> "VerifyReport":
        """Re-hash every shard and file against the manifest. See :mod:`pipeline.registry.verify`."""
        from pipeline.registry.verify import verify_version

        return verify_version(self)

    def __repr__(self) -> str:
        return f"ModelVersion({self.model!r}, {self.version!r}, url={self.url!r})"

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, ModelVersion) and other.url == self.url and other.manifest.sha256 == self.manifest.sha256

    def __hash__(self) -> int:
        return hash((self.url, self.manifest.sha256))
