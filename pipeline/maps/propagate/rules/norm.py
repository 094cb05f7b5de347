"""Normalisation: layer_norm mixes the normalised axes, batch_norm (eval) keeps channels apart.

The affine weight of a normalisation multiplies the normalised value and the bias is added
to that product, so both record the normalised value's set.
"""

from __future__ import annotations

import torch

from pipeline.maps.propagate.interpreter import rule
from pipeline.maps.propagate.values import SetValue
from pipeline.maps.sets import compress
from pipeline.maps.propagate.rules.common import op_name, bind, letters, shape, tensors_out


@rule("native_layer_norm", "layer_norm")
def layer_norm(ix, func, args, kwargs, out):
    bound = bind(func, args, kwargs)
    x = bound["input"]
    k = len(bound["normalized_shape"])
    dims = tuple(range(x.dim() - k, x.dim()))
    engine = ix.engine
    value = engine.mix(ix.value(x), shape(x), dims)
    for key in ("weight", "bias"):
        param = bound.get(key)
        if isinstance(param, torch.Tensor):
            value = engine.elementwise([(value, shape(x)), (ix.value(param), shape(param))], shape(x))
    outs = tensors_out(out)
    ix.assign(outs[0], value)
    for stat in outs[1:]:
        source = letters(x.dim())
        target = "".join(c if i not in dims else c.upper() for i, c in enumerate(source))
        ix.assign(stat, engine.einsum([(ix.value(x), source, shape(x))], target, shape(stat)) if stat.dim() == x.dim() else None)


@rule("native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training", "batch_norm", "_batch_norm_impl_index", "native_group_norm", "group_norm", "instance_norm")
def channel_norm(ix, func, args, kwargs, out):
    bound = bind(func, args, kwargs)
    x = bound["input"]
    name = op_name(func)
    training = bool(bound.get("training", False)) and name != "_native_batch_norm_legit_no_training"
    engine = ix.engine
    value = ix.value(x)
    if name in ("native_group_norm", "group_norm"):
        groups = bound.get("group", bound.get("num_groups")) or 1
        value = _group_mix(ix, value, shape(x), groups)
    elif name == "instance_norm":
        value = engine.mix(value, shape(x), tuple(range(2, x.dim())))
    elif training:
        # Batch statistics mix every position of a channel, across the batch.
        value = engine.mix(value, shape(x), tuple(d for d in range(x.dim()) if d != 1))
    source = letters(x.dim())
    for key in ("weight", "bias"):
        param = bound.get(key)
        if isinstance(param, torch.Tensor):
            value = engine.einsum([(value, source, shape(x)), (ix.value(param), source[1], shape(param))], source, shape(x))
    outs = tensors_out(out)
    ix.assign(outs[0], value)
    for stat in outs[1:]:
        ix.assign(stat, None)


def _group_mix(ix, value, x_shape, groups: int):
    """Propagate through group norm: each element depends on every position of its group's channels."""
    if not isinstance(value, SetValue):
        return value
    table = ix.table
    channels = x_shape[1]
    spatial = tuple(range(2, len(x_shape)))
    per_channel = table.union_reduce(value.ids, (0, *spatial), keepdim=False).expand(channels)
    grouped = table.union_reduce(per_channel.reshape(groups, channels // groups), 1, keepdim=True)
    ids = grouped.expand(groups, channels // groups).reshape(1, channels, *([1] * len(spatial)))
    result = SetValue(compress(ids), x_shape)

    def backward():
        if result.bwd is None:
            return
        grad = table.union_reduce(result.bwd, (0, *spatial), keepdim=False).expand(channels)
        merged = table.union_reduce(grad.reshape(groups, channels // groups), 1, keepdim=True)
        back = merged.expand(groups, channels // groups).reshape(1, channels, *([1] * len(spatial)))
        value.add_bwd(table, compress(back))

    ix.engine.tape.append(backward)
    return result
