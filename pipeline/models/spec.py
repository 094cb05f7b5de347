"""Model specs: how the pipeline builds a model and learns its feature schema.

A model spec is a YAML or JSON file::

    factory: "pipeline.examples.five:build"   # "module:function"
    config: {width: 64, lstm: 128}            # keyword arguments for the factory

The contract for the factory:

1. It is called as ``factory(**config)`` and returns ``(module, schema)``: an
   ``nn.Module`` and a :class:`~pipeline.schema.FeatureSchema` (or its JSON form as a dict).
2. It creates parameters on the default device, so that the pipeline can build it under
   ``torch.device("meta")`` for maps, which then need no memory for weights.
3. The module is called with one keyword argument per schema input, each batched
   (``[batch, *shape]``). Continuous inputs are float tensors, categorical inputs are int64
   indices into their vocabulary, auxiliary inputs have the dtype given in the schema.
4. It returns a tensor (when the schema has exactly one output), a mapping, or a
   dataclass-like object (a dataclass, a NamedTuple, or a transformers ``ModelOutput``)
   whose entries are named after the schema outputs. Each output has its fields on the
   last axis.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import yaml
from torch import nn

from pipeline.schema import FeatureSchema, SchemaError, parse_schema


class SpecError(ValueError):
    """An invalid model spec, or a factory that breaks the contract."""


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec: the factory's import path and its config."""

    factory: str
    config: dict[str, Any]
    source: str = "<inline>"

    def to_json(self) -> dict[str, Any]:
        return {"factory": self.factory, "config": self.config}

    def resolve_factory(self) -> Callable[..., Any]:
        module_name, sep, attr = self.factory.partition(":")
        if not sep or not module_name or not attr:
            raise SpecError(
                f"{self.source}: factory {self.factory!r} is invalid; expected 'module:function'"
            )
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise SpecError(
                f"{self.source}: cannot import module {module_name!r} of factory "
                f"{self.factory!r}: {e}. Install the package that provides it or fix the path."
            ) from e
        try:
            factory = getattr(module, attr)
        except AttributeError as e:
            raise SpecError(
                f"{self.source}: module {module_name!r} has no attribute {attr!r} "
                f"(factory {self.factory!r})"
            ) from e
        if not callable(factory):
            raise SpecError(f"{self.source}: factory {self.factory!r} is not callable")
        return factory

    def build(self, device: str | torch.device | None = None) -> tuple[nn.Module, FeatureSchema]:
        """Call the factory, on ``device`` when given (``"meta"`` allocates no weights)."""
        factory = self.resolve_factory()
        if device is None:
            result = factory(**self.config)
        else:
            with torch.device(device):
                result = factory(**self.config)
        return _check_result(self, result)


def load_spec(path: str | Path) -> ModelSpec:
    """Read a model spec from a YAML or JSON file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(f"cannot read model spec {str(path)!r}: {e.strerror}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(f"model spec {str(path)!r} is not valid YAML or JSON: {e}") from e
    return parse_spec(data, source=str(path))


def parse_spec(data: Any, source: str = "<inline>") -> ModelSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a model spec must be a mapping with 'factory' and 'config'")
    unknown = set(data) - {"factory", "config"}
    if unknown:
        raise SpecError(f"{source}: unknown keys {sorted(unknown)}; expected 'factory', 'config'")
    if not isinstance(data.get("factory"), str):
        raise SpecError(f"{source}: 'factory' is missing; expected a 'module:function' string")
    config = data.get("config", {})
    if not isinstance(config, dict):
        raise SpecError(f"{source}: 'config' must be a mapping, got {type(config).__name__}")
    return ModelSpec(data["factory"], config, source)


def _check_result(spec: ModelSpec, result: Any) -> tuple[nn.Module, FeatureSchema]:
    if not (isinstance(result, tuple) and len(result) == 2):
        raise SpecError(
            f"{spec.source}: factory {spec.factory!r} returned {type(result).__name__}; "
            "expected a tuple (module, schema)"
        )
    module, schema = result
    if not isinstance(module, nn.Module):
        raise SpecError(
            f"{spec.source}: factory {spec.factory!r} returned {type(module).__name__} as its "
            "module; expected a torch.nn.Module"
        )
    if isinstance(schema, dict):
        try:
            schema = parse_schema(schema)
        except SchemaError as e:
            raise SpecError(f"{spec.source}: the factory's schema is invalid: {e}") from e
    if not isinstance(schema, FeatureSchema):
        raise SpecError(
            f"{spec.source}: factory {spec.factory!r} returned {type(schema).__name__} as its "
            "schema; expected a FeatureSchema or its JSON dict"
        )
    return module, schema


def named_outputs(result: Any, schema: FeatureSchema) -> dict[str, torch.Tensor]:
    """Match a module's return value to the schema outputs by name."""
    names = [o.name for o in schema.outputs]
    if isinstance(result, torch.Tensor):
        if len(names) != 1:
            raise SpecError(
                f"the module returned one tensor but the schema names {len(names)} outputs "
                f"{names}; return a mapping keyed by output name"
            )
        return {names[0]: result}

    if isinstance(result, Mapping):
        entries = dict(result)
    elif dataclasses.is_dataclass(result):
        entries = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
    elif hasattr(result, "_asdict"):
        entries = dict(result._asdict())
    else:
        raise SpecError(
            f"the module returned {type(result).__name__}; expected a tensor, a mapping or a "
            "dataclass-like output"
        )

    missing = [n for n in names if n not in entries or entries[n] is None]
    if missing:
        raise SpecError(
            f"the module's output has no entries {missing}; it has {sorted(entries)}. "
            "Name the schema outputs after the module's output entries"
        )
    return {n: entries[n] for n in names}


def model_files(spec: ModelSpec, module: nn.Module, schema: FeatureSchema) -> dict[str, bytes]:
    """Return extra files to publish beside the weights (for example config.json).

    A factory's module may define ``model_files(module, schema) -> {name: bytes}``; the
    BERT adapter uses it to write the new ``config.json`` and ``vocab.txt``.
    """
    factory_module = importlib.import_module(spec.factory.partition(":")[0])
    writer = getattr(factory_module, "model_files", None)
    return dict(writer(module, schema)) if writer else {}


def schema_json(schema: FeatureSchema) -> str:
    return json.dumps(schema.to_json(), sort_keys=True)
