"""Comparison of a version's manifest with a module: feature schemas and state dict entries."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from pipeline.schema import FeatureSchema


def diff_feature_schemas(checkpoint: FeatureSchema, module: FeatureSchema) -> list[str]:
    """Return one line per input, vocabulary or output that differs between the two schemas.

    ``probe_length`` is a setting of the map methods, not of the model, so it is ignored.
    """
    lines: list[str] = []
    lines += _diff_named(
        "input",
        {spec.name: spec.to_json() for spec in checkpoint.inputs},
        {spec.name: spec.to_json() for spec in module.inputs},
    )
    lines += _diff_named(
        "vocabulary",
        {name: {"tokens": list(tokens)} for name, tokens in checkpoint.vocabularies.items()},
        {name: {"tokens": list(tokens)} for name, tokens in module.vocabularies.items()},
    )
    lines += _diff_named(
        "output",
        {spec.name: spec.to_json() for spec in checkpoint.outputs},
        {spec.name: spec.to_json() for spec in module.outputs},
    )
    return lines


def _diff_named(kind: str, checkpoint: Mapping[str, dict[str, Any]], module: Mapping[str, dict[str, Any]]) -> list[str]:
    lines = [f"{kind} {name!r} is only in the checkpoint's schema" for name in checkpoint if name not in module]
    lines += [f"{kind} {name!r} is only in the module's schema" for name in module if name not in checkpoint]
    for name in checkpoint:
        if name not in module:
            continue
        old, new = checkpoint[name], module[name]
        for key in sorted(set(old) | set(new)):
            if key == "name" or old.get(key) == new.get(key):
                continue
            if key in ("fields", "tokens"):
                lines.append(f"{kind} {name!r}: {_diff_list(key, old.get(key) or [], new.get(key) or [])}")
            else:
                lines.append(
                    f"{kind} {name!r}: {key} is {old.get(key)!r} in the checkpoint, {new.get(key)!r} in the module"
                )
    return lines


def _diff_list(what: str, checkpoint: Sequence[str], module: Sequence[str]) -> str:
    only_checkpoint = [item for item in checkpoint if item not in module]
    only_module = [item for item in module if item not in checkpoint]
    parts = []
    if only_checkpoint:
        parts.append(f"{what} only in the checkpoint: {_preview(only_checkpoint)}")
    if only_module:
        parts.append(f"{what} only in the module: {_preview(only_module)}")
    if not parts:
        parts.append(f"the same {what} in another order")
    return "; ".join(parts)


def _preview(items: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(repr(item) for item in items[:limit])
    return f"[{shown}{f', ... ({len(items)} in all)' if len(items) > limit else ''}]"


@dataclass
class StateDiff:
    """Differences between a manifest's tensor index and a module's state dict."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, list[int], list[int]]] = field(default_factory=list)

    def lines(self, *, strict: bool) -> list[str]:
        """Return one line per kind of difference that blocks loading."""
        lines = []
        if strict and self.missing:
            lines.append(f"{len(self.missing)} tensors of the module are missing from the checkpoint: {_preview(self.missing)}")
        if strict and self.unexpected:
            lines.append(f"{len(self.unexpected)} tensors of the checkpoint are not in the module: {_preview(self.unexpected)}")
        if self.mismatched:
            shown = ", ".join(
                f"{name!r} (checkpoint {checkpoint}, module {module})" for name, checkpoint, module in self.mismatched[:10]
            )
            more = f", ... ({len(self.mismatched)} in all)" if len(self.mismatched) > 10 else ""
            lines.append(f"{len(self.mismatched)} tensors have another shape: {shown}{more}")
        return lines


def diff_state(index: Mapping[str, Mapping[str, Any]], state: Mapping[str, torch.Tensor]) -> StateDiff:
    """Compare tensor names and shapes of a manifest index with a module's state dict."""
    diff = StateDiff()
    diff.missing = [name for name in state if name not in index]
    diff.unexpected = [name for name in index if name not in state]
    for name, entry in index.items():
        tensor = state.get(name)
        if tensor is not None and list(tensor.shape) != list(entry["shape"]):
            diff.mismatched.append((name, list(entry["shape"]), list(tensor.shape)))
    return diff
