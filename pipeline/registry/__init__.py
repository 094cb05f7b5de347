"""Checkpoint registry: published, verified checkpoint versions with manifests and tags.

Reading (the training fleet)::

    version = Registry("s3://bucket/registry", storage_options).resolve("policy", "latest")
    version.load_into(module)

Publishing (see :mod:`pipeline.registry.publish` for the call order)::

    with Registry(url).begin_publish("policy", version="next", run_id=run_id) as publication:
        writer = publication.writer(max_shard_bytes)
        plan = writer.plan_shards(specs)
        records = [writer.write_shard(shard, source) for shard in plan]   # on workers
        publication.commit(fields, plan, records, tags=["latest"])

The layout is described in :mod:`pipeline.registry.layout`, the manifest in
:mod:`pipeline.registry.manifest` and ``manifest.schema.json``.
"""

from pipeline.registry.client import DEFAULT_GRACE, Registry
from pipeline.registry.errors import (
    ClaimLostError,
    IncompatibleModelError,
    ManifestError,
    ModelNotFoundError,
    PublicationStateError,
    RegistryFormatError,
    TagConflictError,
    VersionExistsError,
    VersionNotFoundError,
)
from pipeline.registry.gc import GcEntry, GcReport
from pipeline.registry.lineage import LineageEntry, walk_lineage
from pipeline.registry.loading import LoadReport, optimizer_state_tensors, optimizer_tensor_name
from pipeline.registry.manifest import MANIFEST_VERSION, Manifest
from pipeline.registry.publish import Publication
from pipeline.registry.refs import TagState
from pipeline.registry.verify import VerifyReport
from pipeline.registry.version import ModelVersion

__all__ = [
    "DEFAULT_GRACE",
    "MANIFEST_VERSION",
    "ClaimLostError",
    "GcEntry",
    "GcReport",
    "IncompatibleModelError",
    "LineageEntry",
    "LoadReport",
    "Manifest",
    "ManifestError",
    "ModelNotFoundError",
    "ModelVersion",
    "Publication",
    "PublicationStateError",
    "Registry",
    "RegistryFormatError",
    "TagConflictError",
    "TagState",
    "VerifyReport",
    "VersionExistsError",
    "VersionNotFoundError",
    "optimizer_state_tensors",
    "optimizer_tensor_name",
    "walk_lineage",
]
