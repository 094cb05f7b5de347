"""Small hand-built models for the surgery catalogue: a ReLU stack, a conv net, a GRU,
multi-head attention and residual blocks. Every width and field list is a factory argument,
so an old and a new model differ by one config change.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from pipeline.schema import FeatureSchema, InputSpec, OutputSpec


def _schema(name: str, shape: tuple[int, ...], fields: Sequence[str], actions: Sequence[str]) -> FeatureSchema:
    return FeatureSchema(
        inputs=(InputSpec(name, "continuous", (*shape, len(fields)), fields=tuple(fields)),),
        outputs=(OutputSpec("action", tuple(actions)),),
    )


class Stack(nn.Module):
    """A plain ReLU stack in one ``nn.Sequential``: Linear, ReLU, ..., Linear."""

    def __init__(self, fields: int, widths: Sequence[int], actions: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width_in = fields
        for width in widths:
            layers += [nn.Linear(width_in, width), nn.ReLU()]
            width_in = width
        layers.append(nn.Linear(width_in, actions))
        self.net = nn.Sequential(*layers)

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        (state,) = inputs.values()
        return {"action": self.net(state)}


def stack(fields=("a", "b", "c", "d"), widths=(12, 12), actions=("left", "right", "stay"), input_name="state"):
    return Stack(len(fields), widths, len(actions)), _schema(input_name, (), fields, actions)


class ConvNet(nn.Module):
    """Two 1-D convolutions over a signal whose fields are channels, with BatchNorm."""

    def __init__(self, fields: int, channels: int, channels_out: int, actions: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(fields, channels, 3, padding=1)
        self.norm1 = nn.BatchNorm1d(channels)
        self.conv2 = nn.Conv1d(channels, channels_out, 3, padding=1)
        self.head = nn.Linear(channels_out, actions)

    def forward(self, signal: torch.Tensor) -> dict[str, torch.Tensor]:
        x = signal.transpose(1, 2)
        x = torch.relu(self.norm1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return {"action": self.head(x.mean(dim=-1))}


def conv(fields=("p", "q", "r"), length=6, channels=6, channels_out=5, actions=("up", "down")):
    return ConvNet(len(fields), channels, channels_out, len(actions)), _schema("signal", (length,), fields, actions)


class Recurrent(nn.Module):
    """A GRU over a track of steps; the last step's state feeds the head."""

    def __init__(self, fields: int, hidden: int, actions: int) -> None:
        super().__init__()
        self.gru = nn.GRU(fields, hidden, batch_first=True)
        self.head = nn.Linear(hidden, actions)

    def forward(self, track: torch.Tensor) -> dict[str, torch.Tensor]:
        sequence, _ = self.gru(track)
        return {"action": self.head(sequence[:, -1])}


def gru(fields=("x", "y", "speed"), length=4, hidden=8, actions=("turn", "go")):
    return Recurrent(len(fields), hidden, len(actions)), _schema("track", (length,), fields, actions)


class HeadAttention(nn.Module):
    """Multi-head self-attention with separate q, k, v projections and an output projection."""

    def __init__(self, width: int, heads: int, head_width: int) -> None:
        super().__init__()
        self.heads, self.head_width = heads, head_width
        self.query = nn.Linear(width, heads * head_width)
        self.key = nn.Linear(width, heads * head_width)
        self.value = nn.Linear(width, heads * head_width)
        self.out = nn.Linear(heads * head_width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, length, self.heads, self.head_width).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_width), dim=-1)
        mixed = (weights @ v).transpose(1, 2).reshape(batch, length, self.heads * self.head_width)
        return self.out(mixed)


class Attender(nn.Module):
    """Entities embedded, one residual attention layer, mean pooling and a head.

    With ``builtin`` the layer is ``nn.MultiheadAttention`` over ``heads * head_width``
    channels, so adding heads widens the embedding too.
    """

    def __init__(self, fields: int, width: int, heads: int, head_width: int, actions: int, builtin: bool) -> None:
        super().__init__()
        self.builtin = builtin
        if builtin:
            width = heads * head_width
            self.embed = nn.Linear(fields, width)
            self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        else:
            self.embed = nn.Linear(fields, width)
            self.attention = HeadAttention(width, heads, head_width)
        self.head = nn.Linear(width, actions)

    def forward(self, units: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.embed(units)
        if self.builtin:
            mixed, _ = self.attention(x, x, x, need_weights=False)
        else:
            mixed = self.attention(x)
        return {"action": self.head((x + mixed).mean(dim=1))}


def attention(fields=("x", "y", "hp"), units=4, width=8, heads=2, head_width=4, actions=("a0", "a1", "a2"), builtin=False):
    return Attender(len(fields), width, heads, head_width, len(actions), builtin), _schema("units", (units,), fields, actions)


class Block(nn.Module):
    """``x + fc2(relu(fc1(x)))``; with ``post_norm`` the sum goes through a LayerNorm (post-LN)."""

    def __init__(self, width: int, hidden: int, post_norm: bool, norm_affine: bool = True, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.norm = nn.LayerNorm(width, eps=norm_eps, elementwise_affine=norm_affine) if post_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x + self.fc2(torch.relu(self.fc1(x)))
        return self.norm(y) if self.norm is not None else y


class ResidualNet(nn.Module):
    """An input projection, a list of residual blocks and a head.

    ``norm_affine`` is one flag for every block's LayerNorm or a list with one flag per block.
    """

    def __init__(self, fields: int, width: int, hidden: int, blocks: int, actions: int, post_norm: bool,
                 norm_affine: bool | list[bool] = True, norm_eps: float = 1e-5) -> None:
        super().__init__()
        affine = list(norm_affine) if isinstance(norm_affine, (list, tuple)) else [norm_affine] * blocks
        self.embed = nn.Linear(fields, width)
        self.blocks = nn.ModuleList(Block(width, hidden, post_norm, affine[i], norm_eps) for i in range(blocks))
        self.head = nn.Linear(width, actions)

    def forward(self, state: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.embed(state)
        for block in self.blocks:
            x = block(x)
        return {"action": self.head(x)}


def residual(fields=("a", "b", "c"), width=8, hidden=12, blocks=2, actions=("l", "r"), post_norm=False,
             norm_affine=True, norm_eps=1e-5):
    net = ResidualNet(len(fields), width, hidden, blocks, len(actions), post_norm, norm_affine, norm_eps)
    return net, _schema("state", (), fields, actions)


class TiedLanguageModel(nn.Module):
    """A token embedding whose weight is tied to the output layer over the same vocabulary."""

    def __init__(self, tokens: int, width: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(tokens, width)
        self.mix = nn.Linear(width, width)
        self.decode = nn.Linear(width, tokens)
        self.decode.weight = self.embed.weight

    def forward(self, token: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = torch.tanh(self.mix(self.embed(token).mean(dim=1)))
        return {"next": self.decode(hidden)}


def tied(tokens=("the", "cat", "sat", "on", "mat"), length=3, width=6):
    schema = FeatureSchema(
        inputs=(InputSpec("token", "categorical", (length,), vocabulary="tokens"),),
        vocabularies={"tokens": tuple(tokens)},
        outputs=(OutputSpec("next", tuple(tokens)),),
    )
    return TiedLanguageModel(len(tokens), width), schema


class PreLNLayer(nn.Module):
    """A pre-LN transformer layer: ``x + attn(LN(x))``, then ``x + ffn(LN(x))``."""

    def __init__(self, width: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(torch.relu(self.fc1(self.norm2(x))))


class PreLNTransformer(nn.Module):
    def __init__(self, fields: int, width: int, heads: int, hidden: int, layers: int, actions: int) -> None:
        super().__init__()
        self.embed = nn.Linear(fields, width)
        self.layers = nn.ModuleList(PreLNLayer(width, heads, hidden) for _ in range(layers))
        self.head = nn.Linear(width, actions)

    def forward(self, units: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.embed(units)
        for layer in self.layers:
            x = layer(x)
        return {"action": self.head(x.mean(dim=1))}


def pre_ln(fields=("a", "b", "c"), entities=4, width=8, heads=2, hidden=12, layers=2, actions=("l", "r")):
    schema = FeatureSchema(
        inputs=(InputSpec("units", "continuous", (entities, len(fields)), tuple(fields)),),
        outputs=(OutputSpec("action", tuple(actions)),),
    )
    return PreLNTransformer(len(fields), width, heads, hidden, layers, len(actions)), schema
