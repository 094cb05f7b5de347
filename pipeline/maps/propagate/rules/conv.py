"""Convolutions: channels mix within a group, positions mix within the kernel window.

NOTE: positions are treated as fully mixed: an output channel's set is the union over all
positions of its group's input channels, and a kernel tap records that union too. This is
exact when sets do not vary along the spatial axes, which holds whenever fields sit on the
channel axis; a model whose sets vary by position gets a superset at the borders.
"""

from __future__ import annotations

import torch

from pipeline.maps.propagate.interpreter import rule
from pipeline.maps.propagate.rules.common import op_name, bind, shape
from pipeline.maps.propagate.values import SetValue


@rule("convolution", "_convolution", "conv1d", "conv2d", "conv3d")
def convolution(ix, func, args, kwargs, out):
    bound = bind(func, args, kwargs)
    x, weight, bias = bound["input"], bound["weight"], bound.get("bias")
    groups = bound.get("groups") or 1
    transposed = bool(bound.get("transposed", False))
    table = ix.table
    x_value, w_value = ix.value(x), ix.value(weight)
    b_value = ix.value(bias) if isinstance(bias, torch.Tensor) else None
    if isinstance(w_value, SetValue):
        w_value = None  # NOTE: a computed kernel's own sets are ignored; it is rare in practice.

    c_in = x.shape[1]
    c_out = out.shape[1]
    spatial = x.dim() - 2
    unit = (1,) * spatial

    # Input sets per channel: union over batch and positions.
    if isinstance(x_value, SetValue):
        per_channel = table.union_reduce(x_value.ids, (0, *range(2, x.dim())), keepdim=False).expand(c_in).clone()
    else:
        per_channel = torch.zeros(c_in, dtype=torch.int64)
    group_in = c_in // groups
    group_out = c_out // groups
    out_channel_ids = torch.zeros(c_out, dtype=torch.int64)
    for g in range(groups):
        merged = table.union_reduce(per_channel[g * group_in:(g + 1) * group_in], 0, keepdim=False).reshape(())
        out_channel_ids[g * group_out:(g + 1) * group_out] = int(merged)

    # Weight taps record their input channel's set.
    if isinstance(w_value, tuple):
        if transposed:
            co = per_channel.reshape(c_in, 1, *unit)
        else:
            grouped = per_channel.reshape(groups, 1, group_in).expand(groups, group_out, group_in).reshape(c_out, group_in)
            co = grouped.reshape(c_out, group_in, *unit)
        roles = ["in", "out"] if transposed else ["out", "in"]
        for view in w_value:
            view.record(table, co, "inputs")
            view.mark_roles(roles + ["in"] * spatial)

    result = SetValue(out_channel_ids.reshape(1, c_out, *unit), shape(out))
    if isinstance(b_value, tuple):
        for view in b_value:
            view.record(table, out_channel_ids, "inputs")
            view.mark_roles(["out"])
    elif isinstance(b_value, SetValue):
        result = SetValue(table.union(result.ids, b_value.ids.reshape(1, -1, *unit)), shape(out))
    ix.assign(out, result)

    def backward():
        if result.bwd is None:
            return
        per_out = table.union_reduce(result.bwd, (0, *range(2, out.dim())), keepdim=False).expand(c_out).clone()
        if isinstance(w_value, tuple):
            if transposed:
                ids = per_out.reshape(groups, 1, group_out).expand(groups, group_in, group_out).reshape(c_in, group_out, *unit)
            else:
                ids = per_out.reshape(c_out, 1, *unit)
            for view in w_value:
                view.record(table, ids, "outputs")
        if isinstance(b_value, tuple):
            for view in b_value:
                view.record(table, per_out, "outputs")
        if isinstance(x_value, SetValue):
            back = torch.zeros(c_in, dtype=torch.int64)
            for g in range(groups):
                merged = table.union_reduce(per_out[g * group_out:(g + 1) * group_out], 0, keepdim=False).reshape(())
                back[g * group_in:(g + 1) * group_in] = int(merged)
            x_value.add_bwd(table, back.reshape(1, c_in, *((1,) * spatial)))

    ix.engine.tape.append(backward)


@rule("max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "_adaptive_avg_pool2d", "adaptive_max_pool1d", "adaptive_max_pool2d", "_adaptive_avg_pool3d", "max_pool1d_with_indices")
def pooling(ix, func, args, kwargs, out):
    """Spatial pooling keeps channels apart and mixes positions (see the module NOTE)."""
    from pipeline.maps.propagate.rules.common import letters, tensors_out

    x = args[0]
    n = x.dim()
    spatial = 1 if op_name(func).endswith("1d") else 3 if op_name(func).endswith("3d") else 2
    lead = n - spatial
    source = letters(n)
    for tensor in tensors_out(out):
        target = source[:lead] + "".join(chr(ord("A") + i) for i in range(spatial))
        ix.assign(tensor, ix.engine.einsum([(ix.value(x), source, shape(x))], target, shape(tensor)))
