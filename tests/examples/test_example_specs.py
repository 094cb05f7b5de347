"""Every shipped model spec builds on meta and on CPU and returns the outputs its schema names."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pipeline.examples
from pipeline.examples.inputs import example_inputs, observation_count
from pipeline.models.spec import load_spec, named_outputs

SPEC_DIR = Path(pipeline.examples.__file__).parent / "specs"
SPECS = ("bert_tiny", "five_full", "five_small", "minilm")
# Specs small enough to materialise in tests. five_full is only ever built on meta.
CPU_SPECS = ("bert_tiny", "five_small", "minilm")
BATCH = 3


class CallThrough(TorchDispatchMode):
    """Run every op unchanged and count it, so a forward pass provably went through the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _build(name: str, device: str):
    spec = load_spec(SPEC_DIR / f"{name}.yaml")
    return spec.build(device=device)


def _expected_shape(schema, output_name: str, batch: int) -> tuple[int, ...]:
    """Shape of one output: batch, the token axis for per-token outputs, then the fields."""
    fields = len(schema.output(output_name).fields)
    if output_name == "last_hidden_state":
        return (batch, schema.probe_length, fields)
    return (batch, fields)


def test_spec_folder_lists_expected_specs():
    assert sorted(path.stem for path in SPEC_DIR.glob("*.yaml")) == list(SPECS)


@pytest.mark.parametrize("name", SPECS)
def test_spec_forward_on_meta_under_dispatch_mode(name):
    module, schema = _build(name, "meta")
    assert all(p.is_meta for p in module.parameters())

    with torch.device("meta"):
        inputs = example_inputs(schema, BATCH)
    assert all(t.is_meta for t in inputs.values())
    mode = CallThrough()
    with torch.no_grad(), mode:
        result = module(**inputs)

    assert sum(mode.ops.values()) > 0
    outputs = named_outputs(result, schema)
    assert list(outputs) == [o.name for o in schema.outputs]
    for output in schema.outputs:
        assert outputs[output.name].is_meta
        assert tuple(outputs[output.name].shape) == _expected_shape(schema, output.name, BATCH)


@pytest.mark.parametrize("name", CPU_SPECS)
def test_spec_forward_on_cpu(name):
    module, schema = _build(name, "cpu")
    assert all(p.device.type == "cpu" for p in module.parameters())

    inputs = example_inputs(schema, BATCH, generator=torch.Generator().manual_seed(0))
    for spec in schema.inputs:
        expected = (BATCH, *spec.concrete_shape(schema.probe_length))
        assert tuple(inputs[spec.name].shape) == expected
    with torch.no_grad():
        outputs = named_outputs(module(**inputs), schema)

    assert list(outputs) == [o.name for o in schema.outputs]
    for output in schema.outputs:
        value = outputs[output.name]
        assert tuple(value.shape) == _expected_shape(schema, output.name, BATCH)
        assert value.dtype == torch.float32
        assert bool(torch.isfinite(value).all()), output.name


# Continuous plus categorical elements of one sample. Each BERT input (input_ids,
# token_type_ids, position_ids) counts the probe length, 4.
OBSERVATIONS = {"bert_tiny": 12, "five_full": 16029, "five_small": 68, "minilm": 12}


@pytest.mark.parametrize("name", SPECS)
def test_spec_observation_count(name):
    _, schema = _build(name, "meta")
    assert observation_count(schema) == OBSERVATIONS[name]
    assert observation_count(schema, length=10) >= observation_count(schema)


def test_example_inputs_reject_zero_batch():
    _, schema = _build("five_small", "meta")
    with pytest.raises(ValueError, match="batch must be a positive integer, got 0"):
        example_inputs(schema, 0)
