"""The gradient method on its own: vectorised against loop, invariances, guards and warnings."""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from torch import nn

from pipeline.examples.five import build as build_five
from pipeline.maps.compare import diff_maps
from pipeline.maps.gradient import GradientMapError, gradient_map, loop_gradient_map
from pipeline.maps.gradient.table import SURROGATES
from pipeline.maps.interaction import MapError
from pipeline.schema import FeatureSchema, InputSpec, OutputSpec
from tests.maps.generator import build_model, example_inputs, structures


def inputs_of(imap, name, index):
    return {str(atom) for atom in imap.element_atoms(name, index)[0]}


def outputs_of(imap, name, index):
    return {str(atom) for atom in imap.element_atoms(name, index)[1]}

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run on one intra-op thread: these models are tiny, and extra threads only add overhead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def five():
    return build_five("small")


class _Warnings(logging.Handler):
    """Collect the warnings that the gradient method logs while a block runs."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> "_Warnings":
        logging.getLogger("pipeline.maps.gradient").addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("pipeline.maps.gradient").removeHandler(self)


# Vectorised against loop -------------------------------------------------------------------


def test_loop_matches_vectorised_on_five(five):
    module, schema = five

    assert diff_maps(gradient_map(module, schema), loop_gradient_map(module, schema)) == []


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(structures())
def test_loop_matches_vectorised_on_generated(structure):
    module, schema = build_model(structure)

    with _Warnings() as warnings:
        vectorised = gradient_map(module, schema, chunk_size=7)
        loop = loop_gradient_map(module, schema)

    differences = diff_maps(vectorised, loop)
    assert differences == [], structure.describe() + "\n" + "\n".join(map(str, differences))
    # Every op family of the generator keeps the probe copy non-negative and zero at the
    # all-absent probe, and runs under vmap.
    assert warnings.messages == [], structure.describe()


@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
def test_chunk_size_does_not_change_map(five, chunk_size):
    module, schema = five

    assert diff_maps(gradient_map(module, schema, chunk_size=chunk_size), gradient_map(module, schema)) == []


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(structures())
def test_seed_does_not_change_map(structure):
    module, schema = build_model(structure)

    assert diff_maps(gradient_map(module, schema, seed=0), gradient_map(module, schema, seed=12345)) == []


def test_float32_probe_gives_same_map(five):
    module, schema = five

    assert diff_maps(gradient_map(module, schema, dtype=torch.float32), gradient_map(module, schema)) == []


# The caller's module ------------------------------------------------------------------------


def test_module_left_unchanged(five):
    module, schema = five
    module.train()
    before = {k: v.clone() for k, v in module.state_dict().items()}

    gradient_map(module, schema)

    assert module.training
    after = module.state_dict()
    for name, value in before.items():
        assert after[name].dtype == value.dtype, name
        assert torch.equal(after[name], value), name


def test_meta_module_maps_like_cpu_module(five):
    module, schema = five
    with torch.device("meta"):
        meta_module, _ = build_five("small")

    assert diff_maps(gradient_map(meta_module, schema), gradient_map(module, schema)) == []


def test_real_weights_do_not_matter(five):
    module, schema = five
    zeroed, _ = build_five("small")
    with torch.no_grad():
        for parameter in zeroed.parameters():
            parameter.zero_()

    assert diff_maps(gradient_map(zeroed, schema), gradient_map(module, schema)) == []


def test_generated_model_runs_real_forward():
    """The generator's models are real models: their outputs have the schema's fields."""
    from hypothesis import find

    structure = find(structures(), lambda s: len(s.steps) >= 6)
    module, schema = build_model(structure)

    outputs = module(**example_inputs(schema))

    for spec in schema.outputs:
        assert outputs[spec.name].shape[-1] == len(spec.fields)
        assert bool(torch.isfinite(outputs[spec.name]).all())


# Surrogates -----------------------------------------------------------------------------------


class Gated(nn.Module):
    """A sigmoid gate times a tanh value: both factors are activations of different inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(2, 3)
        self.value = nn.Linear(1, 3)
        self.head = nn.Linear(3, 1)

    def forward(self, a, b):
        return self.head(torch.sigmoid(self.gate(a)) * torch.tanh(self.value(b)))


def test_product_of_activations_carries_both():
    schema = FeatureSchema(
        (InputSpec("a", "continuous", (2,), ("x", "y")), InputSpec("b", "continuous", (1,), ("z",))),
        {},
        (OutputSpec("out", ("o",)),),
    )

    imap = gradient_map(Gated(), schema)

    assert inputs_of(imap, "gate.weight", (0, 1)) == {"field:a/y"}
    assert inputs_of(imap, "head.weight", (0, 2)) == {"field:a/x", "field:a/y", "field:b/z"}
    # The gate's bias is added to gate(a) only, before the product.
    assert inputs_of(imap, "gate.bias", (1,)) == {"field:a/x", "field:a/y"}


class Lookup(nn.Module):
    """An embedding table read by plain indexing, with a spare row."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(3, 2))
        self.head = nn.Linear(2, 1)

    def forward(self, kind):
        return self.head(self.table[kind])


def test_table_indexing_is_an_embedding():
    schema = FeatureSchema(
        (InputSpec("kind", "categorical", (), vocabulary="kinds"),),
        {"kinds": ("creep", "tower")},
        (OutputSpec("out", ("o",)),),
    )

    imap = gradient_map(Lookup(), schema)

    assert inputs_of(imap, "table", (1, 0)) == {"category:kinds/tower"}
    assert inputs_of(imap, "table", (2, 1)) == set()
    assert outputs_of(imap, "table", (2, 1)) == set()
    assert outputs_of(imap, "table", (0, 1)) == {"output:out/o"}


def test_surrogate_table_covers_common_ops():
    import torch.nn.functional as F

    for func in (F.relu, torch.Tensor.add, torch.Tensor.mul, torch.matmul, F.linear, F.conv1d, F.softmax,
                 F.layer_norm, F.embedding, F.embedding_bag, torch.lstm, torch.gru, torch.amax,
                 F.scaled_dot_product_attention, F.multi_head_attention_forward, F.max_pool1d):
        assert func in SURROGATES, func


# Warnings and errors --------------------------------------------------------------------------


class ConstantColumn(nn.Module):
    """A constant feature concatenated to the input: non-zero where every input is absent."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 1)

    def forward(self, a):
        return self.linear(torch.cat([a, torch.ones(a.shape[0], 1)], -1))


def test_constant_activation_is_compared_with_absent_probe():
    schema = FeatureSchema((InputSpec("a", "continuous", (2,), ("x", "y")),), {}, (OutputSpec("out", ("o",)),))

    with _Warnings() as warnings:
        imap = gradient_map(ConstantColumn(), schema)

    assert any("all-absent probe" in m and "linear.bias" in m for m in warnings.messages)
    assert inputs_of(imap, "linear.weight", (0, 0)) == {"field:a/x"}
    assert inputs_of(imap, "linear.weight", (0, 2)) == set()
    assert inputs_of(imap, "linear.bias", (0,)) == {"field:a/x", "field:a/y"}


class Differences(nn.Module):
    """torch.diff has no surrogate and changes sign."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 3)
        self.head = nn.Linear(2, 1)

    def forward(self, a):
        return self.head(torch.diff(self.linear(a), dim=-1))


def test_negative_activation_is_reported():
    schema = FeatureSchema((InputSpec("a", "continuous", (2,), ("x", "y")),), {}, (OutputSpec("out", ("o",)),))

    with _Warnings() as warnings:
        gradient_map(Differences(), schema)

    assert any("negative activations" in m and "diff" in m for m in warnings.messages), warnings.messages


class LogGamma(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self, a):
        return self.linear(torch.lgamma(a))


def test_non_finite_gradient_raises():
    schema = FeatureSchema((InputSpec("a", "continuous", (2,), ("x", "y")),), {}, (OutputSpec("out", ("o",)),))

    with pytest.raises(GradientMapError, match="linear.weight.*non-finite"):
        gradient_map(LogGamma(), schema)


class FlatBag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(3, 2)

    def forward(self, items):
        return self.bag(items.reshape(-1), torch.tensor([0]))


def test_flat_embedding_bag_raises():
    schema = FeatureSchema(
        (InputSpec("items", "categorical", (2,), vocabulary="items"),),
        {"items": ("a", "b", "c")},
        (OutputSpec("out", ("o0", "o1")),),
    )

    with pytest.raises(GradientMapError, match="embedding_bag with a 1-D index"):
        gradient_map(FlatBag(), schema)


class PackedLstm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(2, 2, batch_first=True)

    def forward(self, track):
        packed = nn.utils.rnn.pack_padded_sequence(track, torch.tensor([2]), batch_first=True)
        _, (hidden, _) = self.lstm(packed)
        return hidden[-1]


# vmap has no batching rule for packing and warns about it before the surrogate raises.
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_packed_sequence_raises():
    schema = FeatureSchema((InputSpec("track", "continuous", (2, 2), ("x", "y")),), {}, (OutputSpec("out", ("o0", "o1")),))

    with pytest.raises(GradientMapError, match="packed sequence"):
        gradient_map(PackedLstm(), schema)


def test_output_width_mismatch_raises(five):
    module, schema = five
    wrong = FeatureSchema(schema.inputs, schema.vocabularies, (OutputSpec("value", ("v", "w")),))

    with pytest.raises(MapError, match="output 'value' has shape \\[1, 1\\].*2 fields"):
        gradient_map(module, wrong)


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5, True])
def test_invalid_chunk_size_raises(five, chunk_size):
    module, schema = five

    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        gradient_map(module, schema, chunk_size=chunk_size)


def test_integer_probe_dtype_raises(five):
    module, schema = five

    with pytest.raises(ValueError, match="floating dtype"):
        gradient_map(module, schema, dtype=torch.int64)
