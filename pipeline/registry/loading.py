"""Loading a published version into a module and an optimizer.

``load_into`` works in two passes so that a bad checkpoint never changes the module:

1. check the feature schema (when given) and every tensor name and shape against the
   module's state dict, collecting all differences before raising;
2. hash the index file and every shard against the manifest, in 16 MiB blocks, so
   this pass needs the memory of one block. Any mismatch raises IntegrityError here;
3. only then read the shards in order, one tensor at a time, and ``copy_`` each into
   the module's existing parameter or buffer. No state dict is built.

The price of this guarantee is that every shard is read twice. Published versions are
create-only, so a shard cannot change between the passes unless the storage is
tampered with or fails.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Sequence

import torch
from torch import nn

from pipeline.registry.compat import diff_feature_schemas, diff_state
from pipeline.registry.errors import IncompatibleModelError, ManifestError
from pipeline.registry.layout import MODEL_PART, OPTIMIZER_PART, index_name
from pipeline.registry.shards import index_problems
from pipeline.registry.verify import verify_files
from pipeline.schema import FeatureSchema
from pipeline.storage import SafetensorsReader

if TYPE_CHECKING:
    from pipeline.registry.version import ModelVersion

logger = logging.getLogger(__name__)

OPTIMIZER_PREFIX = "optimizer.state."
# Optimizer state entries that have the shape of their parameter.
_PER_ELEMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "acc_delta", "sum")


@dataclass
class LoadReport:
    """Result of ``load_into``: the tensors copied, and the tensors skipped with strict=False."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    bytes_read: int = 0


def load_into(
    version: "ModelVersion", module: nn.Module, *, strict: bool = True, schema: FeatureSchema | None = None
) -> LoadReport:
    """Copy the version's tensors into ``module``'s parameters and buffers in place.

    With ``strict`` (the default), a module tensor missing from the checkpoint is an
    error, and so is a checkpoint tensor missing from the module. Without ``strict``
    both are skipped and listed in the report. A shape difference is always an error. With
    ``schema``, the module's feature schema must equal the manifest's. Raises
    IncompatibleModelError listing every difference, or IntegrityError for a shard
    whose digest differs from the manifest; in both cases the module is unchanged.
    Values are cast to the dtype of the module's tensor, as ``Tensor.copy_`` does.
    """
    manifest = version.manifest
    where = f"version {version.version} of model {version.model!r} ({version.url})"
    problems = []
    if schema is not None:
        differences = diff_feature_schemas(manifest.feature_schema(), schema)
        if differences:
            problems.append("the feature schema differs from the manifest's:\n    " + "\n    ".join(differences))
    state = module.state_dict()
    diff = diff_state(manifest.tensors, state)
    problems += diff.lines(strict=strict)
    if problems:
        raise IncompatibleModelError(
            f"cannot load {where} into {type(module).__name__}:\n  " + "\n  ".join(problems) + "\n"
            "Load a version whose schema and tensors match the module, or migrate the checkpoint "
            "to the module's schema first"
        )

    reader = _verified_reader(version, MODEL_PART)
    report = LoadReport(missing=diff.missing, unexpected=diff.unexpected)
    current_shard = None
    with torch.no_grad():
        for name, info in reader.tensors.items():
            target = state.get(name)
            if target is None:
                continue
            if info.shard != current_shard:
                current_shard = info.shard
                logger.info("loading shard %s of %s", info.shard, where)
            tensor = reader.read(name)
            target.copy_(tensor)
            report.loaded.append(name)
            report.bytes_read += info.nbytes
            logger.debug("loaded %s (%d bytes)", name, info.nbytes)
    logger.info("loaded %d tensors (%d bytes) of %s into %s", len(report.loaded), report.bytes_read, where, type(module).__name__)
    return report


def optimizer_tensor_name(param_name: str, key: str) -> str:
    """Return the stored name of one optimizer state entry, ``optimizer.state.<parameter>.<key>``."""
    return f"{OPTIMIZER_PREFIX}{param_name}.{key}"


def optimizer_state_tensors(optimizer: torch.optim.Optimizer, param_names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Return an optimizer's per-parameter state as named tensors, for publishing.

    ``param_names[i]`` names the i-th parameter of ``optimizer.param_groups`` (all
    groups in order). Non-tensor state entries are skipped.
    """
    positions = _parameter_positions(optimizer, param_names)
    tensors = {}
    for parameter, entries in optimizer.state.items():
        name = param_names[positions[id(parameter)]]
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[optimizer_tensor_name(name, key)] = value.detach()
    return tensors


def load_optimizer_state(
    version: "ModelVersion",
    optimizer: torch.optim.Optimizer,
    param_names: Sequence[str],
    *,
    strict: bool = True,
) -> list[str]:
    """Load the version's optimizer state into ``optimizer``; return the names loaded.

    ``param_names[i]`` names the i-th parameter of ``optimizer.param_groups`` (all
    groups in order), as in the module's ``named_parameters()``. Stored entries are
    named ``optimizer.state.<parameter>.<key>``. Only per-parameter state is loaded;
    the hyperparameters in ``param_groups`` stay as the optimizer was built. With
    ``strict``, state for a parameter not in ``param_names`` is an error.

    Memory: the state is read into CPU tensors and handed to
    ``optimizer.load_state_dict``, which casts and moves each tensor to its parameter's
    device. The peak is the optimizer state itself, plus its CPU copy for parameters
    on an accelerator.
    """
    manifest = version.manifest
    where = f"version {version.version} of model {version.model!r} ({version.url})"
    if not manifest.optimizer_state:
        raise ValueError(f"{where} has no optimizer state; it was published without one")
    _parameter_positions(optimizer, param_names)
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    index_of = {name: i for i, name in enumerate(param_names)}

    targets: dict[str, tuple[int, str]] = {}
    unknown = []
    for stored in manifest.optimizer_tensors:
        parameter, key = _split_state_name(stored, index_of)
        if parameter is None:
            unknown.append(stored)
        else:
            targets[stored] = (index_of[parameter], key)
    problems = []
    if unknown and strict:
        problems.append(f"{len(unknown)} stored entries name no parameter in param_names: {unknown[:10]}")
    for stored, (position, key) in targets.items():
        shape = manifest.optimizer_tensors[stored]["shape"]
        expected = list(parameters[position].shape)
        if key in _PER_ELEMENT_KEYS and shape != expected:
            problems.append(f"{stored!r} has shape {shape}, but its parameter has shape {expected}")
    if problems:
        raise IncompatibleModelError(
            f"cannot load the optimizer state of {where}:\n  " + "\n  ".join(problems) + "\n"
            "Pass the parameter names in the optimizer's order, as the publisher named them"
        )

    reader = _verified_reader(version, OPTIMIZER_PART)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for stored in reader.tensors:
        if stored in targets:
            position, key = targets[stored]
            state.setdefault(position, {})[key] = reader.read(stored)
    groups = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    logger.info("loaded optimizer state of %d parameters from %s", len(state), where)
    return list(targets)


def _split_state_name(stored: str, index_of: Mapping[str, int]) -> tuple[str | None, str]:
    if not stored.startswith(OPTIMIZER_PREFIX):
        return None, ""
    parameter, _, key = stored[len(OPTIMIZER_PREFIX) :].rpartition(".")
    return (parameter, key) if parameter in index_of and key else (None, key)


def _parameter_positions(optimizer: torch.optim.Optimizer, param_names: Sequence[str]) -> dict[int, int]:
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    if isinstance(param_names, str) or len(param_names) != len(parameters):
        raise ValueError(
            f"param_names has {len(param_names)} entries, but the optimizer has {len(parameters)} "
            "parameters; pass one name per parameter of optimizer.param_groups, in order"
        )
    duplicates = sorted(name for name, count in Counter(param_names).items() if count > 1)
    if duplicates:
        raise ValueError(f"param_names contains duplicates: {duplicates[:10]}; each parameter needs its own name")
    return {id(p): i for i, p in enumerate(parameters)}


def _verified_reader(version: "ModelVersion", part: str) -> SafetensorsReader:
    """Hash the index and shards of a part, then open it and compare it with the manifest."""
    manifest = version.manifest
    index = index_name(part)
    verify_files(version, [(index, manifest.files[index]), *manifest.part_digests(part).items()])
    reader = SafetensorsReader(version.file_url(index), version.registry.storage_options)
    problems = index_problems(manifest.part_tensors(part), dict(reader.tensors))
    if problems:
        raise ManifestError(
            f"{version.url}: the {part} shards differ from the manifest's tensor index: "
            + "; ".join(problems)
        )
    return reader

