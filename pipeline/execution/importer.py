"""Import a plain checkpoint into the registry, as the first version of a lineage.

The import streams tensors from the checkpoint reader to the registry's shard writer one
at a time, so it keeps one tensor in memory. It checks that the checkpoint fits the
model spec (names and shapes of the model's state dict) before it claims a version.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from pipeline.models.spec import ModelSpec, model_files
from pipeline.registry import Registry
from pipeline.registry.version import ModelVersion
from pipeline.storage import TensorSpec, open_checkpoint

logger = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the model spec it is imported with."""


def import_checkpoint(
    checkpoint: str,
    spec: ModelSpec,
    registry: Registry,
    model: str,
    *,
    version: str = "next",
    tags: Sequence[str] = ("latest",),
    storage_options: dict[str, Any] | None = None,
    max_shard_bytes: int = 2 * 2**30,
) -> ModelVersion:
    """Publish ``checkpoint`` as a new version of ``model`` with ``spec`` and its schema."""
    module, schema = spec.build(device="meta")
    expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    reader = open_checkpoint(checkpoint, storage_options or {})
    try:
        prefix = "model." if expected and all(f"model.{n}" in reader.tensors for n in expected) else ""
        problems = []
        for name, shape in expected.items():
            info = reader.tensors.get(prefix + name)
            if info is None:
                problems.append(f"{name}: missing")
            elif tuple(info.shape) != shape:
                problems.append(f"{name}: shape {list(info.shape)}, the model has {list(shape)}")
        if problems:
            raise CheckpointMismatchError(
                f"checkpoint {checkpoint} does not fit model spec {spec.factory}: "
                + "; ".join(problems[:10])
                + (f" (and {len(problems) - 10} more)" if len(problems) > 10 else "")
            )

        specs = [TensorSpec(name, reader.tensors[prefix + name].dtype, expected[name]) for name in expected]
        with registry.begin_publish(model, version) as publication:
            writer = publication.writer(max_shard_bytes)
            shard_plan = writer.plan_shards(specs)
            records = [writer.write_shard(shard, lambda s: reader.read(prefix + s.name)) for shard in shard_plan]
            for name, data in model_files(spec, module, schema).items():
                publication.add_file(name, data)
            published = publication.commit(
                {"model_spec": spec.to_json(), "feature_schema": schema}, shard_plan, records, tags=list(tags)
            )
    finally:
        reader.close()
    logger.info("imported %s as version %s of model %r", checkpoint, published.version, model)
    return published

