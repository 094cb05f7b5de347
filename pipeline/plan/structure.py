"""What a plan needs to know about a model's modules: owners, blocks, default init, call order.

All of it comes from a model built on the meta device, so no weight is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.schema import FeatureSchema

NORM_TYPES: tuple[type, ...] = tuple(
    t for t in (nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None), nn.LocalResponseNorm) if t is not None
)
ACTIVATION_TYPES: tuple[type, ...] = (nn.ReLU, nn.ReLU6)


@dataclass(frozen=True)
class InitScale:
    """A module's default init for one parameter: ``uniform`` with a bound, ``normal`` with a
    standard deviation, or ``constant`` with a value; ``source`` says where it comes from."""

    kind: str
    value: float
    source: str


class ModelStructure:
    """Module lookups for one model, keyed by qualified names."""

    def __init__(self, module: nn.Module) -> None:
        self.root = module
        self.modules: dict[str, nn.Module] = dict(module.named_modules(remove_duplicate=False))

    def owner(self, param_name: str) -> tuple[str, nn.Module, str]:
        """Return (module name, module, local name) of a parameter or buffer."""
        prefix, _, local = param_name.rpartition(".")
        return prefix, self.modules[prefix], local

    def blocks(self, param_name: str) -> dict[int, int]:
        """Return {axis: number of blocks} for parameters made of concatenated blocks.

        LSTM gate rows (i, f, g, o), GRU gate rows (r, z, n) and the q, k, v rows of
        ``nn.MultiheadAttention.in_proj_*`` are matched block by block, so widening adds
        units at the end of every block.
        """
        _, module, local = self.owner(param_name)
        if isinstance(module, (nn.LSTM, nn.LSTMCell, nn.GRU, nn.GRUCell, nn.RNN, nn.RNNCell)):
            gates = 1
            if isinstance(module, (nn.LSTM, nn.LSTMCell)):
                gates = 4
            elif isinstance(module, (nn.GRU, nn.GRUCell)):
                gates = 3
            if local.startswith(("weight_ih", "weight_hh", "bias_ih", "bias_hh")) and gates > 1:
                return {0: gates}
        if isinstance(module, nn.MultiheadAttention) and local in ("in_proj_weight", "in_proj_bias"):
            return {0: 3}
        return {}

    def default_init(self, param_name: str, shape: tuple[int, ...]) -> InitScale:
        """Return the default init of ``param_name`` at the new ``shape``.

        Follows the ``reset_parameters`` of PyTorch 2.x modules: ``nn.Linear`` and
        ``nn.ConvNd`` draw U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias, RNNs
        draw U(-1/sqrt(hidden_size), ...), embeddings N(0, 1), ``nn.MultiheadAttention``
        Xavier-uniform projections and zero biases, and norm layers weight 1, bias 0.
        Unknown modules get U(-1/sqrt(fan_in), ...) with fan_in from the shape.
        """
        prefix, module, local = self.owner(param_name)
        kind = type(module).__name__
        parent = self.modules.get(prefix.rpartition(".")[0]) if prefix else None
        if isinstance(parent, nn.MultiheadAttention) and prefix.endswith("out_proj") and local == "bias":
            return InitScale("constant", 0.0, "nn.MultiheadAttention zeroes out_proj.bias")
        if isinstance(module, nn.Linear):
            fan_in = shape[1] if local == "weight" else module.in_features
            return InitScale("uniform", 1 / math.sqrt(max(fan_in, 1)), f"default init of {kind}")
        if isinstance(module, nn.modules.conv._ConvNd):
            weight_shape = shape if local == "weight" else tuple(module.weight.shape)
            fan_in = weight_shape[1] * math.prod(weight_shape[2:])
            if module.transposed:
                fan_in = weight_shape[0] * math.prod(weight_shape[2:])
            return InitScale("uniform", 1 / math.sqrt(max(fan_in, 1)), f"default init of {kind}")
        if isinstance(module, (nn.RNNBase, nn.modules.rnn.RNNCellBase)):
            return InitScale("uniform", 1 / math.sqrt(module.hidden_size), f"default init of {kind}")
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            return InitScale("normal", 1.0, f"default init of {kind}")
        if isinstance(module, nn.MultiheadAttention):
            if local.endswith("bias"):
                return InitScale("constant", 0.0, "nn.MultiheadAttention zeroes its projection biases")
            rows = shape[0] // 3 if local == "in_proj_weight" else shape[0]
            fan_in, fan_out = shape[1], rows
            return InitScale("uniform", math.sqrt(6 / (fan_in + fan_out)), "Xavier-uniform init of nn.MultiheadAttention")
        if isinstance(module, NORM_TYPES + (nn.modules.batchnorm._NormBase,)):
            return InitScale("constant", 1.0 if local == "weight" else 0.0, f"default init of {kind}")
        fan_in = 1
        if len(shape) > 1:
            fan_in = math.prod(shape[1:])
        elif shape:
            fan_in = shape[0]
        return InitScale("uniform", 1 / math.sqrt(max(fan_in, 1)), f"U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for {kind}, which has no known default init")

    def is_norm(self, param_name: str) -> bool:
        _, module, _ = self.owner(param_name)
        return isinstance(module, NORM_TYPES)

    def is_attention(self, param_name: str) -> bool:
        prefix, module, _ = self.owner(param_name)
        parent = self.modules.get(prefix.rpartition(".")[0]) if prefix else None
        return isinstance(module, nn.MultiheadAttention) or isinstance(parent, nn.MultiheadAttention)


def call_order(module: nn.Module, schema: FeatureSchema) -> list[str]:
    """Return the names of the leaf modules in the order a forward pass first calls them.

    Runs one forward pass of ``module`` on meta inputs, so ``module`` should be built on
    the meta device.
    """
    return list(dict.fromkeys(call_sequence(module, schema)))


def call_sequence(module: nn.Module, schema: FeatureSchema) -> list[str]:
    """Return the names of the leaf modules a forward pass calls, once per call, in call order.

    A module called twice (shared weights, a reused dropout) appears twice. Runs one
    forward pass of ``module`` on meta inputs, so ``module`` should be built on the meta
    device.
    """
    from pipeline.examples.inputs import example_inputs

    names = {id(m): name for name, m in module.named_modules()}
    sequence: list[str] = []

    def record(mod, args):
        name = names.get(id(mod))
        has_own = any(True for _ in mod.parameters(recurse=False))
        if name is not None and (has_own or not any(True for _ in mod.children())):
            sequence.append(name)

    handle = nn.modules.module.register_module_forward_pre_hook(record)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            module(**example_inputs(schema, 2, device="meta"))
    finally:
        handle.remove()
        module.train(was_training)
    return _with_uncalled_children(module, sequence)


def _with_uncalled_children(module: nn.Module, sequence: list[str]) -> list[str]:
    """Insert, after each called module, its parameter-owning submodules that are never called.

    ``nn.MultiheadAttention`` uses ``out_proj.weight`` inside its own forward without
    calling ``out_proj``; its projection still runs last, so it follows the parent here.
    """
    called = set(sequence)
    modules = dict(module.named_modules())
    out: list[str] = []
    for name in sequence:
        out.append(name)
        parent = modules.get(name)
        if parent is None:
            continue
        for child_name, child in parent.named_modules(prefix=name):
            if child_name == name or child_name in called:
                continue
            if any(True for _ in child.parameters(recurse=False)):
                out.append(child_name)
                called.add(child_name)
    return out
