"""Random model structures with feature schemas, for the interaction-map property tests.

A :class:`Structure` is pure data: a schema and a list of :class:`Step`s, each an op
applied to earlier values. Values ``0 .. len(schema.inputs) - 1`` are the model inputs in
schema order; step ``i`` produces value ``len(schema.inputs) + i``. :func:`build_model`
turns a structure into an ``nn.Module`` deterministically, so a failing example is
reproduced from its printed description alone.

:func:`structures` is the hypothesis strategy. It draws one to three feature inputs:
vectors, entity arrays, sequences, grids and categorical slots. Each input is encoded in
its own branch. Some branches then merge, by concatenation, broadcasting arithmetic,
pairwise products or attention, and a trunk grows on one of them. One to three outputs
read any value, often only a part of it, so maps are not "everything touches
everything". Widths stay between 1 and 8 so that the models are tiny.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

from pipeline.schema import FeatureSchema, InputSpec, OutputSpec

MAX_WIDTH = 8


@dataclass(frozen=True)
class Step:
    """One op: its name, the value indices it reads, its options and its per-sample output shape."""

    op: str
    args: tuple[int, ...]
    options: tuple[tuple[str, Any], ...]
    shape: tuple[int, ...]

    def option(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)


@dataclass(frozen=True)
class Structure:
    schema: FeatureSchema
    steps: tuple[Step, ...]
    outputs: tuple[tuple[str, int], ...]

    def describe(self) -> str:
        lines = []
        for spec in self.schema.inputs:
            extra = f" fields={list(spec.fields)}" if spec.fields else ""
            if spec.vocabulary:
                extra = f" vocabulary={spec.vocabulary}({len(self.schema.vocabularies[spec.vocabulary])})"
            lines.append(f"input {spec.name}: {spec.kind} {list(spec.shape)}{extra}")
        first = len(self.schema.inputs)
        for i, step in enumerate(self.steps):
            args = ", ".join(f"v{a}" for a in step.args)
            options = ", ".join(f"{k}={v}" for k, v in step.options)
            lines.append(f"v{first + i} = {step.op}({args}) {{{options}}} -> {list(step.shape)}")
        for name, value in self.outputs:
            lines.append(f"output {name} = v{value}")
        return "\n".join(lines)


# Ops --------------------------------------------------------------------------------------
#
# Each op is an nn.Module built from (options, input shapes) whose forward takes the
# batched input values. Per-sample shapes exclude the batch axis.


class Linear(nn.Module):
    def __init__(self, options: dict, shapes: list) -> None:
        super().__init__()
        self.linear = nn.Linear(shapes[0][-1], options["out"], bias=options["bias"])

    def forward(self, x):
        return self.linear(x)


class MatmulParameter(nn.Module):
    def __init__(self, options: dict, shapes: list) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(shapes[0][-1], options["out"]))

    def forward(self, x):
        if x.dim() == 3 and self.batched:
            return torch.bmm(x, self.weight.expand(x.shape[0], *self.weight.shape))
        return torch.matmul(x, self.weight)

    batched = False


class BmmParameter(MatmulParameter):
    batched = True


_UNARY: dict[str, Callable] = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "gelu": F.gelu,
    "silu": F.silu,
    "leaky_relu": F.leaky_relu,
    "elu": F.elu,
    "sigmoid": torch.sigmoid,
    "abs": torch.abs,
    "neg": torch.neg,
}


class Unary(nn.Module):
    def __init__(self, options: dict, shapes: list) -> None:
        super().__init__()
        self.name = options["fn"]

    def forward(self, x):
        return _UNARY[self.name](x)


class Scale(nn.Module):
    def __init__(self, options: dict, shapes: list) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(shapes[0][-1]))

    def forward(self, x):
        return x * self.scale


class Shift(nn.Module):
    def __init__(self, options: dict, shapes: list) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.randn(shapes[0][-1]))

    def forward(self, x):
        return x + self.shift


class LayerNorm(nn.Module):
    def __init__(self, options: dict, shapes: list) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(shapes[0][-1], elementwise_affine=options["affine"], bias=options["bias"])

    def forward(self, x):
        return self.norm(x)


class Softmax(nn.Module):
    def __init__(self, options: dict, shapes: list) -> None:
        super().__init__()
        self.dim = options["dim"]

    def forward(self, x):
        return torch.softmax(x, self.dim)


class Residual(nn.Module):
    def __init__(self, options: dict, shapes: list) -> None:
        super().__init__()
        width = shapes[0][-1]
        self.linear = nn.Linear(width, width)

    def forward(self, x):
        return x + torch.relu(self.linear(x))


class PermuteFeatures(nn.Module):
    """Interleave the two halves of the feature axis with reshape, transpose and reshape."""

    def forward(self, x):
        lead, width = x.shape[:-1], x.shape[-1]
        return x.reshape(*lead, 2, width // 2).transpose(-1, -2).reshape(*lead, width)

    def __init__(self, options: dict, shapes: list) -> None:
        super().__init__()


class Split(nn.Module):
    def __init__(self, options: dict, shapes: list) -> None:
        super().__init__()
        self.sizes, self.part = list(options["sizes"]), options["part"]

    def forward(self, x):
        return x.split(self.sizes, -1)[self.part]


class Index(nn.Module):
    def __init__(self, options: dict, shapes: list) -> None:
        super().__init__()
        self.positions = list(options["positions"])

    def forward(self, x):
        return x[..., self.positions]


class Gather(nn.Module):
    def __init__(self, options: dict, shapes: list) -> None:
        super().__init__()
        self.positions = list(options["positions"])

    def forward(self, x):
        index = torch.tensor(self.positions).expand(*x.shape[:-1], len(self.positions))
        return torch.gather(x, -1, index)


class ScatterAdd(nn.Module):
    def __init__(self, options: dict, shapes: list) -> None:
        super().__init__()
        self.targets, self.out = list(options["targets"]), options["out"]

    def forward(self, x):
        index = torch.tensor(self.targets).expand(x.shape)
        return x.new_zeros(*x.shape[:-1], self.out).scatter_add(-1, index, x)


class ScatterPermutation(nn.Module):
    def __init__(self, options: dict, shapes: list) -> None:
        super().__init__()
        self.targets = list(options["targets"])

    def forward(self, x):
        index = torch.tensor(self.targets).expand(x.shape)
        return torch.zeros_like(x).scatter(-1, index, x)


class ReduceFeatures(nn.Module):
    def __init__(self, options: dict, shapes: list) -> None:
        super().__init__()
        self.reduction = options["reduction"]

    def forward(self, x):
        if self.reduction == "max":
            return torch.max(x, -1, keepdim=True).values
        return getattr(x, self.reduction)(-1, keepdim=True)


class BatchNorm(nn.Module):
    def __init__(self, options: dict, shapes: list) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(shapes[0][-1], affine=options["affine"])
        self.norm.eval()

    def forward(self, x):
        if x.dim() == 2:
            return self.norm(x)
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


class Pool(nn.Module):
    """Pool over the entity axis (-2)."""

    def __init__(self, options: dict, shapes: list) -> None:
        super().__init__()
        self.reduction = options["reduction"]

    def forward(self, x):
        if self.reduction == "max":
            return x.max(dim=-2).values
        if self.reduction == "amax":
            return x.amax(dim=-2)
        return getattr(x, self.reduction)(dim=-2)


class MaskedPool(nn.Module):
    """Pool an entity array over its entities, leaving out those the mask marks absent."""

    def __init__(self, options: dict, shapes: list) -> None:
        super().__init__()
        self.reduction = options["reduction"]

    def forward(self, x, mask):
        if self.reduction == "max":
            return x.masked_fill(~mask.unsqueeze(-1), 0.0).amax(dim=-2)
        weights = mask.unsqueeze(-1).to(x.dtype)
        return (x * weights).sum(-2) / weights.sum(-2).clamp(min=1.0)


class Select(nn.Module):
    def __init__(self, options: dict, shapes: list) -> None:
        super().__init__()
        self.position = options["position"]

    def forward(self, x):
        return x[..., self.position, :]


class Conv1d(nn.Module):
    def __init__(self, options: dict, shapes: list) -> None:
        super().__init__()
        self.conv = nn.Conv1d(shapes[0][-1], options["out"], options["kernel"], padding=options["padding"], bias=options["bias"])

    def forward(self, x):
        return self.conv(x.transpose(1, 2)).transpose(1, 2)


class Pool1d(nn.Module):
    def __init__(self, options: dict, shapes: list) -> None:
        super().__init__()
        self.reduction, self.stride = options["reduction"], options["stride"]

    def forward(self, x):
        pool = F.max_pool1d if self.reduction == "max" else F.avg_pool1d
        return pool(x.transpose(1, 2), 2, self.stride).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, options: dict, shapes: list) -> None:
        super().__init__()
        width = shapes[0][-1]
        self.query = nn.Linear(width, options["out"])
        self.key = nn.Linear(width, options["out"])
        self.value = nn.Linear(width, options["out"])
        self.causal = options["causal"]

    def forward(self, x):
        return F.scaled_dot_product_attention(self.query(x), self.key(x), self.value(x), is_causal=self.causal)


class SelfAttention(nn.Module):
    def __init__(self, options: dict, shapes: list) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(shapes[0][-1], options["heads"], bias=options["bias"], batch_first=True)

    def forward(self, x):
        return self.attention(x, x, x, need_weights=False)[0]


class CrossAttention(nn.Module):
    def __init__(self, options: dict, shapes: list) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(shapes[0][-1], options["heads"], batch_first=True)

    def forward(self, query, memory):
        return self.attention(query, memory, memory)[0]


class Recurrent(nn.Module):
    def __init__(self, options: dict, shapes: list) -> None:
        super().__init__()
        kind = nn.LSTM if options["kind"] == "lstm" else nn.GRU
        self.rnn = kind(shapes[0][-1], options["hidden"], num_layers=options["layers"],
                        bidirectional=options["bidirectional"], batch_first=True)
        self.last = options["last"]

    def forward(self, x):
        output, state = self.rnn(x)
        if not self.last:
            return output
        hidden = state[0] if isinstance(state, tuple) else state
        return hidden[-1]


class Flatten(nn.Module):
    def __init__(self, options: dict, shapes: list) -> None:
        super().__init__()

    def forward(self, x):
        return x.reshape(x.shape[0], -1)


class Conv2d(nn.Module):
    def __init__(self, options: dict, shapes: list) -> None:
        super().__init__()
        self.conv = nn.Conv2d(shapes[0][-1], options["out"], options["kernel"], padding=options["padding"], bias=options["bias"])

    def forward(self, x):
        return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class MaxPool2d(nn.Module):
    def __init__(self, options: dict, shapes: list) -> None:
        super().__init__()

    def forward(self, x):
        return F.max_pool2d(x.permute(0, 3, 1, 2), 2, 1).permute(0, 2, 3, 1)


class GroupNorm(nn.Module):
    def __init__(self, options: dict, shapes: list) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(options["groups"], shapes[0][-1])

    def forward(self, x):
        return self.norm(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class FlattenGrid(nn.Module):
    def __init__(self, options: dict, shapes: list) -> None:
        super().__init__()

    def forward(self, x):
        return x.reshape(x.shape[0], x.shape[1] * x.shape[2], x.shape[3])


class Embedding(nn.Module):
    def __init__(self, options: dict, shapes: list) -> None:
        super().__init__()
        self.embedding = nn.Embedding(options["rows"], options["out"])

    def forward(self, index):
        return self.embedding(index)


class EmbeddingBag(nn.Module):
    def __init__(self, options: dict, shapes: list) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(options["rows"], options["out"], mode=options["reduction"])

    def forward(self, index):
        return self.bag(index)


class Cat(nn.Module):
    def __init__(self, options: dict, shapes: list) -> None:
        super().__init__()
        self.dim = options["dim"]

    def forward(self, a, b):
        return torch.cat([a, b], self.dim)


class Binary(nn.Module):
    def __init__(self, options: dict, shapes: list) -> None:
        super().__init__()
        self.operation = options["operation"]
        self.broadcast = len(shapes[1]) < len(shapes[0])

    def forward(self, a, b):
        if self.broadcast:
            b = b.unsqueeze(-2)
        if self.operation == "add":
            return a + b
        if self.operation == "sub":
            return a - b
        if self.operation == "mul":
            return a * b
        return torch.maximum(a, b)


class Stack(nn.Module):
    def __init__(self, options: dict, shapes: list) -> None:
        super().__init__()

    def forward(self, a, b):
        return torch.stack([a, b], dim=-2)


class Pairwise(nn.Module):
    def __init__(self, options: dict, shapes: list) -> None:
        super().__init__()

    def forward(self, a, b):
        return torch.bmm(a, b.transpose(1, 2))


class Pointer(nn.Module):
    """Score each entity of ``a`` against the vector ``b``: einsum over the feature axis."""

    def __init__(self, options: dict, shapes: list) -> None:
        super().__init__()

    def forward(self, a, b):
        return torch.einsum("bnd,bd->bn", a, b)


class SharedLinear(nn.Module):
    """Apply the linear layer of an earlier step again: one parameter used at several places."""

    def __init__(self, options: dict, shapes: list) -> None:
        super().__init__()
        self.shared: list[nn.Linear] = []  # a plain list, so the layer is not registered twice

    def forward(self, x):
        return self.shared[0](x)


class TiedLinear(nn.Module):
    """A linear layer whose weight is the weight of an earlier step, under a second name."""

    def __init__(self, options: dict, shapes: list) -> None:
        super().__init__()
        width = shapes[0][-1]
        self.linear = nn.Linear(width, options["out"], bias=True)

    def forward(self, x):
        return self.linear(x)


OPS: dict[str, type[nn.Module]] = {
    "linear": Linear, "matmul": MatmulParameter, "bmm": BmmParameter, "unary": Unary,
    "scale": Scale, "shift": Shift, "layer_norm": LayerNorm, "softmax": Softmax,
    "residual": Residual, "permute_features": PermuteFeatures, "split": Split, "index": Index,
    "gather": Gather, "scatter_add": ScatterAdd, "scatter": ScatterPermutation,
    "reduce_features": ReduceFeatures, "batch_norm": BatchNorm, "pool": Pool,
    "masked_pool": MaskedPool, "select": Select, "conv1d": Conv1d, "pool1d": Pool1d,
    "attention": Attention, "self_attention": SelfAttention, "cross_attention": CrossAttention,
    "recurrent": Recurrent, "flatten": Flatten, "conv2d": Conv2d, "max_pool2d": MaxPool2d,
    "group_norm": GroupNorm, "flatten_grid": FlattenGrid, "embedding": Embedding,
    "embedding_bag": EmbeddingBag, "cat": Cat, "binary": Binary,
    "stack": Stack, "pairwise": Pairwise, "pointer": Pointer, "shared_linear": SharedLinear,
    "tied_linear": TiedLinear,
}  # fmt: skip


# Building ---------------------------------------------------------------------------------


class GeneratedModel(nn.Module):
    """A model built from a :class:`Structure`; called with one keyword argument per input."""

    def __init__(self, structure: Structure) -> None:
        super().__init__()
        self.structure = structure
        shapes = [spec.concrete_shape(structure.schema.probe_length) for spec in structure.schema.inputs]
        self.steps = nn.ModuleList()
        for step in structure.steps:
            module = OPS[step.op](dict(step.options), [shapes[a] for a in step.args])
            self.steps.append(module)
            shapes.append(step.shape)
        for step, module in zip(structure.steps, self.steps):
            if step.op == "shared_linear":
                module.shared.append(self.steps[step.option("source")].linear)
            if step.op == "tied_linear":
                module.linear.weight = self.steps[step.option("source")].linear.weight

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        values = [inputs[spec.name] for spec in self.structure.schema.inputs]
        for step, module in zip(self.structure.steps, self.steps):
            values.append(module(*[values[a] for a in step.args]))
        return {name: values[index] for name, index in self.structure.outputs}


def build_model(structure: Structure, seed: int = 0) -> tuple[GeneratedModel, FeatureSchema]:
    """Build the module of ``structure`` with weights from a fixed seed, in eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        module = GeneratedModel(structure)
    module.eval()
    return module, structure.schema


def example_inputs(schema: FeatureSchema, batch: int = 2) -> dict[str, torch.Tensor]:
    """Build real inputs for a forward pass of a generated model (valid categories, full masks)."""
    values = {}
    generator = torch.Generator().manual_seed(0)
    for spec in schema.inputs:
        shape = (batch, *spec.concrete_shape(schema.probe_length))
        if spec.kind == "continuous":
            values[spec.name] = torch.rand(shape, generator=generator)
        elif spec.kind == "categorical":
            size = len(schema.vocabularies[spec.vocabulary])
            values[spec.name] = torch.randint(0, size, shape, generator=generator)
        else:
            values[spec.name] = torch.ones(shape, dtype=torch.bool)
    return values


# Drawing ----------------------------------------------------------------------------------


@dataclass
class _Value:
    kind: str  # "float", "index" or "mask"
    shape: tuple[int, ...]
    rows: int = 0  # the vocabulary size of an index value


class _Builder:
    """Draw a structure step by step, tracking the shape of every value."""

    def __init__(self, draw: Callable) -> None:
        self.draw = draw
        self.values: list[_Value] = []
        self.steps: list[Step] = []
        self.inputs: list[InputSpec] = []
        self.vocabularies: dict[str, tuple[str, ...]] = {}
        self.mask_of: dict[int, int] = {}
        self.first_step = 0

    # Helpers ------------------------------------------------------------------------------

    def integer(self, low: int, high: int) -> int:
        return self.draw(st.integers(low, high))

    def choice(self, options: list) -> Any:
        return self.draw(st.sampled_from(options))

    def flag(self) -> bool:
        return self.draw(st.booleans())

    def add(self, op: str, args: tuple[int, ...], shape: tuple[int, ...], **options: Any) -> int:
        self.steps.append(Step(op, args, tuple(sorted(options.items())), tuple(shape)))
        self.values.append(_Value("float", tuple(shape)))
        return len(self.values) - 1

    def width(self) -> int:
        # Hypothesis favours the first entry, so the typical width is 3, not 1.
        return self.choice([3, 2, 4, 1, 5, 6, 8, 7])

    def count(self) -> int:
        """Draw an entity, slot or sequence count, typically 2."""
        return self.choice([2, 1, 3])

    def shape(self, value: int) -> tuple[int, ...]:
        return self.values[value].shape

    # Inputs -------------------------------------------------------------------------------

    def draw_inputs(self) -> list[int]:
        count = self.choice([3, 2, 1])
        for v in range(self.choice([2, 1])):
            self.vocabularies[f"voc{v}"] = tuple(f"t{i}" for i in range(self.choice([3, 1, 2, 4])))
        features = []
        for i in range(count):
            kind = self.choice(["entities", "sequence", "slots", "grid", "vector", "category"])
            name = f"in{i}"
            if kind in ("category", "slots"):
                vocabulary = self.choice(sorted(self.vocabularies))
                shape = () if kind == "category" else (self.count(),)
                self.inputs.append(InputSpec(name, "categorical", shape, vocabulary=vocabulary))
                self.values.append(_Value("index", shape, rows=len(self.vocabularies[vocabulary])))
            else:
                fields = tuple(f"f{j}" for j in range(self.choice([2, 1, 3, 4])))
                lead = {"vector": (), "entities": (self.count(),), "sequence": (self.count(),),
                        "grid": (self.count(), self.count())}[kind]
                self.inputs.append(InputSpec(name, "continuous", (*lead, len(fields)), fields=fields))
                self.values.append(_Value("float", (*lead, len(fields))))
            features.append(len(self.values) - 1)
            if kind == "entities" and self.flag():
                self.inputs.append(InputSpec(f"{name}_mask", "auxiliary", lead, dtype="bool"))
                self.values.append(_Value("mask", lead))
                self.mask_of[features[-1]] = len(self.values) - 1
        used = {spec.vocabulary for spec in self.inputs if spec.vocabulary}
        self.vocabularies = {k: v for k, v in self.vocabularies.items() if k in used}
        self.first_step = len(self.values)
        return features

    def encode(self, value: int) -> int:
        """Turn an input into a float value: categorical inputs go through a lookup."""
        info = self.values[value]
        if info.kind == "float":
            if value in self.mask_of and self.flag():
                return self.add("masked_pool", (value, self.mask_of[value]), info.shape[1:],
                                reduction=self.choice(["max", "mean"]))
            return value
        rows = info.rows + self.integer(0, 2)
        out = self.width()
        if info.shape and self.flag():
            return self.add("embedding_bag", (value,), (out,), rows=rows, out=out,
                            reduction=self.choice(["sum", "mean", "max"]))
        return self.add("embedding", (value,), (*info.shape, out), rows=rows, out=out)

    # Blocks -------------------------------------------------------------------------------

    def block(self, value: int) -> int:
        """Apply one op to ``value``: first a family, then an op of it, so rare ops are drawn often."""
        shape = self.shape(value)
        rank, width = len(shape), shape[-1]
        families = {
            "dense": ["linear", "matmul", "residual", "shared_linear", "tied_linear"],
            "pointwise": ["unary", "scale", "shift"],
            "indexing": ["index", "gather", "scatter_add", "scatter"],
            "normalise": ["reduce_features"],
        }
        if width >= 2:
            families["indexing"].append("split")
            families["normalise"] += ["layer_norm", "softmax"]
        if width % 2 == 0:
            families["indexing"].append("permute_features")
        if rank <= 2:
            families["normalise"].append("batch_norm")
        if rank == 2:
            families["entities"] = ["self_attention", "conv1d", "attention", "bmm", "select", "pool"]
            if shape[0] >= 2:
                families["entities"].append("pool1d")
            if shape[0] * width <= MAX_WIDTH * 2:
                families["entities"].append("flatten")
            families["recurrent"] = ["recurrent"]
        if rank == 3:
            families["grid"] = ["conv2d", "flatten_grid", "group_norm", "pool", "select"]
            if shape[0] >= 2 and shape[1] >= 2:
                families["grid"].append("max_pool2d")
        # Hypothesis draws the first entry most often, so the list starts with the rarest ops.
        order = ["entities", "grid", "recurrent", "normalise", "indexing", "pointwise", "dense"]
        family = self.choice([f for f in order if f in families])
        op = self.choice(families[family])
        return getattr(self, f"_draw_{op}")(value, shape)

    def _draw_linear(self, value, shape):
        out = self.width()
        return self.add("linear", (value,), (*shape[:-1], out), out=out, bias=self.flag())

    def _draw_matmul(self, value, shape):
        out = self.width()
        return self.add("matmul", (value,), (*shape[:-1], out), out=out)

    def _draw_bmm(self, value, shape):
        out = self.width()
        return self.add("bmm", (value,), (*shape[:-1], out), out=out)

    def _draw_unary(self, value, shape):
        return self.add("unary", (value,), shape, fn=self.choice(sorted(_UNARY)))

    def _draw_scale(self, value, shape):
        return self.add("scale", (value,), shape)

    def _draw_shift(self, value, shape):
        return self.add("shift", (value,), shape)

    def _draw_residual(self, value, shape):
        return self.add("residual", (value,), shape)

    def _draw_layer_norm(self, value, shape):
        affine = self.flag()
        return self.add("layer_norm", (value,), shape, affine=affine, bias=affine and self.flag())

    def _draw_softmax(self, value, shape):
        dims = [-1] + ([-2] if len(shape) >= 2 and shape[-2] >= 2 else [])
        return self.add("softmax", (value,), shape, dim=self.choice(dims))

    def _draw_split(self, value, shape):
        first = self.integer(1, shape[-1] - 1)
        part = self.integer(0, 1)
        sizes = (first, shape[-1] - first)
        return self.add("split", (value,), (*shape[:-1], sizes[part]), sizes=sizes, part=part)

    def _draw_index(self, value, shape):
        positions = tuple(self.draw(st.lists(st.integers(0, shape[-1] - 1), min_size=1, max_size=shape[-1])))
        return self.add("index", (value,), (*shape[:-1], len(positions)), positions=positions)

    def _draw_gather(self, value, shape):
        positions = tuple(self.draw(st.lists(st.integers(0, shape[-1] - 1), min_size=1, max_size=shape[-1])))
        return self.add("gather", (value,), (*shape[:-1], len(positions)), positions=positions)

    def _draw_scatter_add(self, value, shape):
        out = self.width()
        targets = tuple(self.draw(st.lists(st.integers(0, out - 1), min_size=shape[-1], max_size=shape[-1])))
        return self.add("scatter_add", (value,), (*shape[:-1], out), out=out, targets=targets)

    def _draw_scatter(self, value, shape):
        targets = tuple(self.draw(st.permutations(list(range(shape[-1])))))
        return self.add("scatter", (value,), shape, targets=targets)

    def _draw_reduce_features(self, value, shape):
        reduction = self.choice(["sum", "mean", "amax", "max"])
        return self.add("reduce_features", (value,), (*shape[:-1], 1), reduction=reduction)

    def _draw_permute_features(self, value, shape):
        return self.add("permute_features", (value,), shape)

    def _draw_batch_norm(self, value, shape):
        return self.add("batch_norm", (value,), shape, affine=self.flag())

    def _draw_pool(self, value, shape):
        reduction = self.choice(["sum", "mean", "max", "amax"])
        return self.add("pool", (value,), (*shape[:-2], shape[-1]), reduction=reduction)

    def _draw_select(self, value, shape):
        position = self.integer(0, shape[-2] - 1)
        return self.add("select", (value,), (*shape[:-2], shape[-1]), position=position)

    def _padding(self, kernel: int, length: int) -> int:
        """Draw a padding below ``kernel`` that leaves at least one output position."""
        smallest = max(0, -((length - kernel) // 2))
        return self.integer(smallest, kernel - 1)

    def _draw_conv1d(self, value, shape):
        kernel = self.integer(1, 3)
        padding = self._padding(kernel, shape[0])
        length = shape[0] + 2 * padding - kernel + 1
        out = self.width()
        return self.add("conv1d", (value,), (length, out), out=out, kernel=kernel, padding=padding, bias=self.flag())

    def _draw_pool1d(self, value, shape):
        stride = self.integer(1, 2)
        length = (shape[0] - 2) // stride + 1
        return self.add("pool1d", (value,), (length, shape[1]), reduction=self.choice(["max", "avg"]), stride=stride)

    def _draw_attention(self, value, shape):
        out = self.width()
        return self.add("attention", (value,), (shape[0], out), out=out, causal=self.integer(0, 3) == 0)

    def _draw_self_attention(self, value, shape):
        heads = self.choice([h for h in (1, 2) if shape[-1] % h == 0])
        return self.add("self_attention", (value,), shape, heads=heads, bias=self.flag())

    def _draw_recurrent(self, value, shape):
        hidden = self.integer(1, 6)
        bidirectional = self.integer(0, 3) == 0
        layers = self.integer(1, 2)
        last = self.flag()
        width = hidden * (2 if bidirectional and not last else 1)
        out_shape = (width,) if last else (shape[0], width)
        return self.add("recurrent", (value,), out_shape, kind=self.choice(["lstm", "gru"]),
                        hidden=hidden, layers=layers, bidirectional=bidirectional, last=last)

    def _draw_flatten(self, value, shape):
        return self.add("flatten", (value,), (shape[0] * shape[1],))

    def _draw_conv2d(self, value, shape):
        kernel = self.integer(1, 2)
        padding = self._padding(kernel, min(shape[0], shape[1]))
        out = self.width()
        height = shape[0] + 2 * padding - kernel + 1
        width = shape[1] + 2 * padding - kernel + 1
        return self.add("conv2d", (value,), (height, width, out), out=out, kernel=kernel, padding=padding, bias=self.flag())

    def _draw_max_pool2d(self, value, shape):
        return self.add("max_pool2d", (value,), (shape[0] - 1, shape[1] - 1, shape[2]))

    def _draw_group_norm(self, value, shape):
        groups = self.choice([g for g in (1, 2) if shape[-1] % g == 0])
        if shape[-1] // groups * shape[0] * shape[1] < 2:
            return self._draw_flatten_grid(value, shape)
        return self.add("group_norm", (value,), shape, groups=groups)

    def _draw_flatten_grid(self, value, shape):
        return self.add("flatten_grid", (value,), (shape[0] * shape[1], shape[2]))

    def _linear_sources(self) -> list[int]:
        return [i for i, s in enumerate(self.steps) if s.op == "linear" and self.values[s.args[0]].kind == "float"]

    def _draw_shared_linear(self, value, shape):
        sources = self._linear_sources()
        if not sources:
            return self._draw_linear(value, shape)
        source = self.choice(sources)
        value = self.to_width(value, self.shape(self.steps[source].args[0])[-1])
        shape = self.shape(value)
        out = self.steps[source].shape[-1]
        return self.add("shared_linear", (value,), (*shape[:-1], out), source=source)

    def _draw_tied_linear(self, value, shape):
        sources = self._linear_sources()
        if not sources:
            return self._draw_linear(value, shape)
        source = self.choice(sources)
        value = self.to_width(value, self.shape(self.steps[source].args[0])[-1])
        shape = self.shape(value)
        out = self.steps[source].shape[-1]
        return self.add("tied_linear", (value,), (*shape[:-1], out), source=source, out=out)

    # Merges -------------------------------------------------------------------------------

    def to_rank(self, value: int, rank: int) -> int:
        while len(self.shape(value)) > rank:
            value = self._draw_pool(value, self.shape(value))
        return value

    def to_width(self, value: int, width: int) -> int:
        shape = self.shape(value)
        if shape[-1] == width:
            return value
        return self.add("linear", (value,), (*shape[:-1], width), out=width, bias=self.flag())

    def merge(self, a: int, b: int) -> int:
        rank_a, rank_b = len(self.shape(a)), len(self.shape(b))
        if rank_a < rank_b:
            a, b, rank_a, rank_b = b, a, rank_b, rank_a
        kinds = []
        if rank_a == 2 and rank_b == 2:
            kinds += ["cross_attention", "pairwise", "cat_entities"]
        if rank_a >= 2:
            kinds += ["broadcast", "pointer"]
        kinds += ["binary", "cat", "stack"]
        kind = self.choice(kinds)

        if kind in ("cat", "binary", "stack"):
            rank = min(rank_a, rank_b, 2)
            a, b = self.to_rank(a, rank), self.to_rank(b, rank)
            if self.shape(a)[:-1] != self.shape(b)[:-1]:
                a, b = self.to_rank(a, 1), self.to_rank(b, 1)
            if kind == "cat":
                sa, sb = self.shape(a), self.shape(b)
                return self.add("cat", (a, b), (*sa[:-1], sa[-1] + sb[-1]), dim=-1)
            b = self.to_width(b, self.shape(a)[-1])
            if kind == "stack":
                sa = self.shape(a)
                return self.add("stack", (a, b), (*sa[:-1], 2, sa[-1]))
            return self.add("binary", (a, b), self.shape(a), operation=self.choice(["add", "sub", "mul", "max"]))

        if kind in ("broadcast", "pointer"):
            a, b = self.to_rank(a, 2), self.to_rank(b, 1)
            b = self.to_width(b, self.shape(a)[-1])
            if kind == "pointer":
                return self.add("pointer", (a, b), (self.shape(a)[0],))
            return self.add("binary", (a, b), self.shape(a), operation=self.choice(["add", "sub", "mul", "max"]))

        b = self.to_width(b, self.shape(a)[-1])
        sa, sb = self.shape(a), self.shape(b)
        if kind == "cat_entities":
            return self.add("cat", (a, b), (sa[0] + sb[0], sa[1]), dim=-2)
        if kind == "pairwise":
            return self.add("pairwise", (a, b), (sa[0], sb[0]))
        heads = self.choice([h for h in (1, 2) if sa[-1] % h == 0])
        return self.add("cross_attention", (a, b), sa, heads=heads)

    # Outputs ------------------------------------------------------------------------------

    def head(self, name: str) -> tuple[OutputSpec, int]:
        floats = [i for i, v in enumerate(self.values) if v.kind == "float"]
        value = self.choice(floats)
        shape = self.shape(value)
        if shape[-1] >= 2 and self.flag():
            value = self._draw_split(value, shape)
        while len(self.shape(value)) > 2 or (len(self.shape(value)) == 2 and self.flag()):
            value = self._draw_pool(value, self.shape(value))
        fields = tuple(f"o{j}" for j in range(self.choice([2, 1, 3])))
        shape = self.shape(value)
        head = self.add("linear", (value,), (*shape[:-1], len(fields)), out=len(fields), bias=self.flag())
        return OutputSpec(name, fields), head

    def structure(self, outputs: list[tuple[OutputSpec, int]]) -> Structure:
        schema = FeatureSchema(
            tuple(self.inputs), dict(self.vocabularies), tuple(spec for spec, _ in outputs), probe_length=2
        )
        return Structure(schema, tuple(self.steps), tuple((spec.name, value) for spec, value in outputs))


@st.composite
def structures(draw: Callable) -> Structure:
    """Draw a random model structure and its schema."""
    builder = _Builder(draw)
    branches = [builder.encode(value) for value in builder.draw_inputs()]
    branches = [_grow(builder, value, builder.integer(0, 3)) for value in branches]

    while len(branches) > 1 and not builder.flag():
        a = branches.pop(builder.integer(0, len(branches) - 1))
        b = branches.pop(builder.integer(0, len(branches) - 1))
        branches.append(builder.merge(a, b))
    trunk = builder.choice(branches)
    _grow(builder, trunk, builder.integer(0, 2))

    outputs = [builder.head(f"out{i}") for i in range(builder.choice([2, 1, 3]))]
    return builder.structure(outputs)


def _grow(builder: _Builder, value: int, blocks: int) -> int:
    for _ in range(blocks):
        value = builder.block(value)
    return value
