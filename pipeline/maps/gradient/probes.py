"""Probe inputs of the gradient method.

A *probe* is one sample in which exactly one input atom is present:

- for a field atom, the field is 1 on every entity (and every step of a sequence) of its
  input, and every other continuous value is 0;
- for a category atom ``V:c``, every categorical input of vocabulary ``V`` is ``c`` at
  every position, and every other categorical input is :data:`ABSENT_CATEGORY`.

The probe copy maps every surrogate op's zero to zero, so 0 is its absent value for
every field. ``InputSpec.absent`` is the absent value for numeric probes of the real
model and is not used here. Feeding offsets from it changes values, but not which
element depends on which field.

The *present point*, where the output map is taken, has every field at 1 and every
categorical input at the code for "every category of its vocabulary".
"""

from __future__ import annotations

from typing import Sequence

import torch

from pipeline.schema import Atom, FeatureSchema, InputSpec
from pipeline.maps.gradient.errors import GradientMapError

ABSENT_CATEGORY = -1


def every_category_code(size: int) -> int:
    """Return the index code that the probe copy reads as "all ``size`` categories present"."""
    return -(size + 1)


def category_rows(index: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """Decode probe index codes into a multi-hot matrix of shape ``[*index.shape, rows]``.

    Code ``c >= 0`` selects row ``c``; :data:`ABSENT_CATEGORY` selects no row; the code of
    :func:`every_category_code` for ``n`` selects rows ``0 .. n-1``.
    """
    positions = torch.arange(rows)
    codes = index.unsqueeze(-1)
    selected = (positions == codes) | (positions < -codes - 1)
    return selected.to(dtype)


def atom_probes(schema: FeatureSchema, atoms: Sequence[Atom | None], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Build the feature inputs of one probe per atom, stacked: ``[len(atoms), 1, *shape]``.

    ``None`` in ``atoms`` is the all-absent probe.
    """
    count = len(atoms)
    features: dict[str, torch.Tensor] = {}
    for spec in schema.feature_inputs():
        shape = spec.concrete_shape(schema.probe_length)
        if spec.kind == "continuous":
            values = torch.zeros(count, 1, *shape, dtype=dtype)
            for row, atom in enumerate(atoms):
                if atom is not None and atom.kind == "field" and atom.source == spec.name:
                    values[row, ..., spec.fields.index(atom.name)] = 1.0
        else:
            values = torch.full((count, 1, *shape), ABSENT_CATEGORY, dtype=torch.int64)
            tokens = schema.vocabularies[spec.vocabulary]  # type: ignore[index]
            for row, atom in enumerate(atoms):
                if atom is not None and atom.kind == "category" and atom.source == spec.vocabulary:
                    values[row] = tokens.index(atom.name)
        features[spec.name] = values
    return features


def present_inputs(schema: FeatureSchema, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Build the feature inputs of the present point: one sample, every atom present."""
    features: dict[str, torch.Tensor] = {}
    for spec in schema.feature_inputs():
        shape = (1, *spec.concrete_shape(schema.probe_length))
        if spec.kind == "continuous":
            features[spec.name] = torch.ones(shape, dtype=dtype)
        else:
            size = len(schema.vocabularies[spec.vocabulary])  # type: ignore[index]
            features[spec.name] = torch.full(shape, every_category_code(size), dtype=torch.int64)
    return features


def auxiliary_inputs(schema: FeatureSchema, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Build the auxiliary inputs of every probe: all ones (True), so masks keep everything."""
    values: dict[str, torch.Tensor] = {}
    for spec in schema.inputs:
        if spec.kind != "auxiliary":
            continue
        shape = (1, *spec.concrete_shape(schema.probe_length))
        values[spec.name] = torch.ones(shape, dtype=_auxiliary_dtype(spec, dtype))
    return values


def _auxiliary_dtype(spec: InputSpec, probe_dtype: torch.dtype) -> torch.dtype:
    if spec.dtype is None:
        return probe_dtype
    found = getattr(torch, spec.dtype, None)
    if not isinstance(found, torch.dtype):
        raise GradientMapError(
            f"auxiliary input {spec.name!r} has dtype {spec.dtype!r}, which is not a torch "
            "dtype name; use a name such as 'bool', 'int64' or 'float32'"
        )
    return probe_dtype if found.is_floating_point else found
