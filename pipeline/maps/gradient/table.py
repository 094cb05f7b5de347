"""The table from PyTorch functions to the surrogates that the probe copy runs instead.

Functions are looked up by identity. A name is registered in each of ``torch``,
``torch.Tensor`` and ``torch.nn.functional`` where it exists with the same argument
order. Where the argument order differs between namespaces (``torch.embedding``,
``torch.batch_norm``), only the ``torch.nn.functional`` form is registered, because the
``nn`` modules call that one. Any function not in the table runs unchanged.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from pipeline.maps.gradient import attention, embedding, pointwise, recurrent, reductions

_NAMESPACES: tuple[Any, ...] = (torch, torch.Tensor, F)

_UNARY = (
    "relu relu_ relu6 leaky_relu leaky_relu_ elu elu_ selu selu_ celu celu_ gelu silu mish "
    "hardswish hardsigmoid hardtanh hardtanh_ softplus softsign tanhshrink logsigmoid "
    "sigmoid sigmoid_ tanh tanh_ exp exp_ exp2 expm1 log log_ log2 log10 log1p sqrt sqrt_ "
    "rsqrt reciprocal abs abs_ absolute neg neg_ negative sin cos erf erfc square square_ "
    "clamp clamp_ clip clip_ clamp_min clamp_max threshold threshold_ rrelu sign round floor "
    "ceil trunc nan_to_num __neg__ __abs__"
)
_DROPOUT = "dropout alpha_dropout dropout1d dropout2d dropout3d feature_alpha_dropout"
_ADD = "add add_ sub sub_ subtract rsub __rsub__ __radd__ __iadd__ __isub__"
_MULTIPLY = (
    "mul mul_ multiply div div_ divide true_divide __rmul__ __truediv__ __rdiv__ "
    "__rtruediv__ __imul__ __itruediv__ __idiv__"
)
_POWER = "pow __pow__ __rpow__ float_power"
_EXTREMUM = "maximum minimum fmax fmin"
_MATMUL = "matmul mm bmm mv __matmul__"
_ADD_MATMUL = "addmm baddbmm addmv"
_MAX = "max min"
_AMAX = "amax amin logsumexp"
_SOFTMAX = "softmax log_softmax softmin"
_CONV = "conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d"


def _register(table: dict[Any, Callable], names: str, surrogate: Callable,
              namespaces: Iterable[Any] = _NAMESPACES) -> None:
    for name in names.split():
        for namespace in namespaces:
            func = getattr(namespace, name, None)
            if func is not None:
                table[func] = surrogate


def build_table() -> dict[Any, Callable]:
    table: dict[Any, Callable] = {}
    _register(table, _UNARY, pointwise.identity)
    _register(table, _DROPOUT, pointwise.dropout, (torch, F))
    _register(table, _ADD, pointwise.add)
    _register(table, _MULTIPLY, pointwise.multiply)
    _register(table, _POWER, pointwise.power)
    _register(table, _EXTREMUM, pointwise.extremum)
    _register(table, _MATMUL, pointwise.matmul)
    _register(table, "__rmatmul__", pointwise.rmatmul)
    _register(table, "einsum", pointwise.einsum, (torch,))
    _register(table, "linear", pointwise.linear, (F,))
    _register(table, _ADD_MATMUL, pointwise.add_matmul)
    _register(table, _CONV, pointwise.conv, (torch, F))
    _register(table, "prelu", pointwise.prelu, (F,))
    _register(table, "glu", pointwise.glu, (F,))
    _register(table, "where", pointwise.where, (torch,))
    _register(table, "masked_fill masked_fill_", pointwise.masked_fill, (torch, torch.Tensor))

    _register(table, _MAX, reductions.max_like, (torch, torch.Tensor))
    _register(table, _AMAX, reductions.amax_like, (torch, torch.Tensor))
    _register(table, "max_pool1d max_pool2d max_pool3d", reductions.max_pool, (F,))
    _register(table, "adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d", reductions.adaptive_max_pool, (F,))
    _register(table, _SOFTMAX, reductions.softmax_like)
    _register(table, "normalize", reductions.normalize, (F,))
    _register(table, "layer_norm", reductions.layer_norm, (torch, F))
    _register(table, "rms_norm", reductions.rms_norm, (torch, F))
    _register(table, "group_norm", reductions.group_norm, (torch, F))
    _register(table, "batch_norm", reductions.batch_norm, (F,))
    _register(table, "instance_norm", reductions.instance_norm, (F,))

    _register(table, "embedding", embedding.embedding, (F,))
    _register(table, "embedding_bag", embedding.embedding_bag, (F,))
    _register(table, "__getitem__", embedding.getitem, (torch.Tensor,))

    _register(table, "lstm gru rnn_tanh rnn_relu", recurrent.recurrent, (torch,))
    _register(table, "scaled_dot_product_attention", attention.scaled_dot_product_attention, (F,))
    _register(table, "multi_head_attention_forward", attention.multi_head_attention, (F,))
    return table


SURROGATES = build_table()

