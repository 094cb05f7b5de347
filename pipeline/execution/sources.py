"""Source checkpoints of a run: registry versions or plain checkpoint URLs.

A :class:`SourceRef` pickles as plain settings, so Dask workers reopen the checkpoint
themselves and read only the byte ranges of the tensors they need.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.models.spec import ModelSpec
from pipeline.registry import Registry
from pipeline.registry.layout import MODEL_PART, OPTIMIZER_PART
from pipeline.registry.version import ModelVersion
from pipeline.storage import CheckpointReader, open_checkpoint
from pipeline.storage.fsio import resolve
from pipeline.workflow import Workflow

logger = logging.getLogger(__name__)

OPTIMIZER_PREFIX = "optimizer.state."
GLOB_CHARACTERS = set("*?[")


class SourceError(ValueError):
    """A source in a workflow that names nothing, or a checkpoint that does not fit the plan."""


@dataclass(frozen=True)
class SourceRef:
    """One checkpoint to migrate."""

    label: str
    version: ModelVersion | None = None
    url: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> ModelSpec | None:
        return self.version.model_spec if self.version is not None else None

    @property
    def parent(self) -> dict[str, str] | None:
        return self.version.as_parent() if self.version is not None else None

    def open_model(self) -> CheckpointReader:
        if self.version is not None:
            return self.version.open(MODEL_PART)
        return open_checkpoint(self.url, self.storage_options)

    def open_optimizer(self) -> CheckpointReader | None:
        if self.version is not None:
            if not self.version.manifest.optimizer_state:
                return None
            return self.version.open(OPTIMIZER_PART)
        reader = self.open_model()
        if any(name.startswith(OPTIMIZER_PREFIX) for name in reader.tensors):
            return reader
        reader.close()
        return None

    def verify(self) -> None:
        """Re-hash a registry source against its manifest; plain checkpoints have no digests."""
        if self.version is not None:
            report = self.version.verify()
            if not report.ok:
                problems = "; ".join(report.problems)
                raise SourceError(f"source {self.label} does not match its manifest: {problems}. Nothing was written")


def resolve_sources(workflow: Workflow) -> list[SourceRef]:
    """List the checkpoints a workflow names, in order and without repeats."""
    source = workflow.source
    if source.checkpoints:
        return _plain_sources(source.checkpoints, source.storage_options)

    registry = Registry(source.registry, source.storage_options)
    published = registry.versions(source.model)
    found: list[SourceRef] = []
    seen: set[str] = set()
    for pattern in source.versions:
        if GLOB_CHARACTERS & set(pattern):
            matches = [v for v in published if fnmatch.fnmatchcase(v, pattern)]
            if not matches:
                raise SourceError(
                    f"source version pattern {pattern!r} matches no published version of model "
                    f"{source.model!r} in {source.registry}; published: {published or 'none'}"
                )
            versions = [registry.get(source.model, v) for v in matches]
        else:
            versions = [registry.resolve(source.model, pattern)]
        for version in versions:
            if version.version not in seen:
                seen.add(version.version)
                found.append(SourceRef(f"{source.model}@{version.version}", version=version))
    return found


def _plain_sources(urls, storage_options) -> list[SourceRef]:
    found: list[SourceRef] = []
    for url in urls:
        if GLOB_CHARACTERS & set(url):
            fs, path = resolve(url, storage_options)
            matches = sorted(fs.glob(path))
            if not matches:
                raise SourceError(f"source checkpoint pattern {url!r} matches nothing")
            protocol = url.split("://", 1)[0] if "://" in url else "file"
            found.extend(SourceRef(m, url=f"{protocol}://{m}" if protocol != "file" else m, storage_options=dict(storage_options)) for m in matches)
        else:
            found.append(SourceRef(url, url=url, storage_options=dict(storage_options)))
    return found


class OldTensors:
    """Reads the old tensors that a plan names from an open checkpoint.

    Plain checkpoints saved as ``{"model": state_dict, ...}`` expose names with a
    ``model.`` prefix; both spellings are accepted.
    """

    def __init__(self, reader: CheckpointReader) -> None:
        self.reader = reader
        names = reader.tensors
        self.prefix = "" if not names or any(not n.startswith("model.") for n in names if not n.startswith(OPTIMIZER_PREFIX)) else "model."

    def name(self, param: str) -> str:
        return self.prefix + param

    def has(self, param: str) -> bool:
        return self.name(param) in self.reader.tensors

    def read(self, param: str) -> torch.Tensor:
        return self.reader.read(self.name(param))


def optimizer_entries(reader: CheckpointReader, old_param_names: list[str]) -> dict[tuple[str, str], str]:
    """Map ``(old parameter, state key)`` to stored tensor names of an optimizer state.

    Keys after ``optimizer.state.`` are parameter names (registry versions, DCP) or
    integer positions (``torch.optim.Optimizer.state_dict()``), which follow the order
    of the old model's ``named_parameters()`` as ``Adam(model.parameters())`` receives them.
    """
    entries: dict[tuple[str, str], str] = {}
    known = set(old_param_names)
    for name in reader.tensors:
        if not name.startswith(OPTIMIZER_PREFIX):
            continue
        rest = name[len(OPTIMIZER_PREFIX):]
        param, _, key = rest.rpartition(".")
        if param in known:
            entries[(param, key)] = name
        elif param.isdigit() and int(param) < len(old_param_names):
            entries[(old_param_names[int(param)], key)] = name
        else:
            raise SourceError(
                f"optimizer tensor {name!r} names parameter {param!r}, which the old model does not have"
            )
    return entries
