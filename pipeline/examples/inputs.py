"""Example inputs built from a feature schema, and the observation count of a schema."""

from __future__ import annotations

import math

import torch

from pipeline.schema import FeatureSchema, InputSpec, SchemaError

_DEFAULT_DTYPES = {"continuous": torch.float32, "categorical": torch.int64}


def input_dtype(spec: InputSpec) -> torch.dtype:
    """Return the tensor dtype of an input: the schema's ``dtype``, else float32 or int64."""
    if spec.dtype is None:
        if spec.kind == "auxiliary":
            raise SchemaError(
                f"input {spec.name!r}: an auxiliary input needs a 'dtype' such as 'bool' or 'int64'"
            )
        return _DEFAULT_DTYPES[spec.kind]
    dtype = getattr(torch, spec.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise SchemaError(
            f"input {spec.name!r}: dtype {spec.dtype!r} is not a torch dtype; "
            "expected a name such as 'float32', 'int64' or 'bool'"
        )
    return dtype


def example_inputs(
    schema: FeatureSchema,
    batch: int = 2,
    *,
    device: str | torch.device | None = None,
    generator: torch.Generator | None = None,
    length: int | None = None,
) -> dict[str, torch.Tensor]:
    """Build one batched keyword argument per schema input.

    Continuous inputs are standard normal, categorical inputs are uniform indices into
    their vocabulary, and auxiliary inputs are all ones (every entity present, every token
    attended). Variable-length axes get ``length`` or the schema's ``probe_length``. On the
    meta device the tensors have shapes and dtypes but no values.
    """
    if batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    length = schema.probe_length if length is None else length
    target = torch.device(device) if device is not None else torch.get_default_device()
    inputs: dict[str, torch.Tensor] = {}
    for spec in schema.inputs:
        shape = (batch, *spec.concrete_shape(length))
        dtype = input_dtype(spec)
        if target.type == "meta":
            # Meta tensors hold no values, and a CPU generator cannot draw on the meta device.
            value = torch.empty(shape, dtype=dtype, device=target)
        elif spec.kind == "continuous":
            value = torch.randn(shape, dtype=dtype, device=target, generator=generator)
        elif spec.kind == "categorical":
            size = len(schema.vocabularies[spec.vocabulary])  # type: ignore[index]
            value = torch.randint(size, shape, dtype=dtype, device=target, generator=generator)
        else:
            value = torch.ones(shape, dtype=dtype, device=target)
        inputs[spec.name] = value
    return inputs


def observation_count(schema: FeatureSchema, length: int | None = None) -> int:
    """Count the observation values of one sample: every continuous and categorical element.

    Auxiliary inputs (masks) are not observations. Variable-length axes count as ``length``
    or the schema's ``probe_length``.
    """
    length = schema.probe_length if length is None else length
    return sum(math.prod(spec.concrete_shape(length)) for spec in schema.feature_inputs())
