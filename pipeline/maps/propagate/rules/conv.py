"""Convolutions: channels mix within a group, positions mix within the kernel window.

A kernel tap records exactly the input positions it meets: with padding, a tap that only
ever meets padding records nothing. Output positions union the taps that reach them.

NOTE: transposed convolutions still treat positions as fully mixed (each tap records the
union over all positions of its input channel). That is exact unless sets vary along the
spatial axes or a tap only meets padding.
"""

from __future__ import annotations

import itertools

import torch

from pipeline.maps.propagate.interpreter import rule
from pipeline.maps.propagate.rules.common import bind, letters, op_name, shape, tensors_out
from pipeline.maps.propagate.engine import without_empty_cooperand
from pipeline.maps.propagate.values import SetValue
from pipeline.maps.sets import compress


def _tap_table(in_len: int, out_len: int, kernel: int, stride: int, padding: int, dilation: int) -> torch.Tensor:
    """Return ``[kernel, out_len]`` input positions that each tap meets, -1 on padding."""
    taps = torch.arange(kernel).unsqueeze(1) * dilation
    outs = torch.arange(out_len).unsqueeze(0) * stride
    source = outs + taps - padding
    return torch.where((source >= 0) & (source < in_len), source, torch.full_like(source, -1))


def _tap_sources(tables: list[torch.Tensor], in_sizes: list[int]) -> list[tuple[tuple[int, ...], torch.Tensor]]:
    """For each kernel tap, the flat input position met at each flat output position, or -1."""
    result = []
    for tap in itertools.product(*[range(t.shape[0]) for t in tables]):
        flat = torch.zeros(1, dtype=torch.int64)
        valid = torch.ones(1, dtype=torch.bool)
        for table, k, size in zip(tables, tap, in_sizes):
            row = table[k]
            flat = (flat.unsqueeze(-1) * size + row.clamp(min=0)).reshape(-1)
            valid = (valid.unsqueeze(-1) & (row >= 0)).reshape(-1)
        result.append((tap, torch.where(valid, flat, torch.full_like(flat, -1))))
    return result


def _gather(ids: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Gather ``ids[:, source]`` for flat spatial positions; -1 gives the empty set."""
    padded = torch.cat([torch.zeros(ids.shape[0], 1, dtype=torch.int64), ids], dim=1)
    return padded[:, source + 1]


@rule("convolution", "_convolution", "conv1d", "conv2d", "conv3d")
def convolution(ix, func, args, kwargs, out):
    bound = bind(func, args, kwargs)
    if bool(bound.get("transposed", False)):
        _transposed(ix, bound, out)
        return
    x, weight, bias = bound["input"], bound["weight"], bound.get("bias")
    groups = bound.get("groups") or 1
    table = ix.table
    engine = ix.engine
    x_value, w_value = ix.value(x), ix.value(weight)
    b_value = ix.value(bias) if isinstance(bias, torch.Tensor) else None
    if isinstance(w_value, SetValue):
        w_value = None  # NOTE: a kernel computed from activations is not mapped; rare in practice.

    spatial = x.dim() - 2
    c_in, c_out = x.shape[1], out.shape[1]
    group_in, group_out = c_in // groups, c_out // groups
    in_sizes = list(x.shape[2:])
    out_sizes = list(out.shape[2:])
    kernel = list(weight.shape[2:])
    stride, padding, dilation = (_per_dim(bound[k], spatial) for k in ("stride", "padding", "dilation"))
    tables = [
        _tap_table(in_sizes[j], out_sizes[j], kernel[j], stride[j], padding[j], dilation[j])
        for j in range(spatial)
    ]
    taps = _tap_sources(tables, in_sizes)
    n_out = 1
    for size in out_sizes:
        n_out *= size

    # Input sets per channel and flat position, united over the batch.
    if isinstance(x_value, SetValue):
        per_position = table.union_reduce(x_value.ids, 0, keepdim=False)
        per_position = per_position.expand(c_in, *in_sizes).reshape(c_in, -1)
    else:
        per_position = torch.zeros(c_in, 1, dtype=torch.int64).expand(c_in, max(1, _prod(in_sizes))).clone()

    met = [(tap, _gather(per_position, source)) for tap, source in taps]
    reached = met[0][1]
    for _, ids in met[1:]:
        reached = table.union(reached, ids)
    out_ids = torch.zeros(c_out, n_out, dtype=torch.int64)
    for g in range(groups):
        merged = table.union_reduce(reached[g * group_in:(g + 1) * group_in], 0, keepdim=True)
        out_ids[g * group_out:(g + 1) * group_out] = merged.expand(group_out, n_out)
    result = SetValue(compress(out_ids.reshape(1, c_out, *out_sizes)), shape(out))

    if isinstance(w_value, tuple):
        co = torch.zeros(c_out, group_in, *kernel, dtype=torch.int64)
        for tap, ids in met:
            per_channel = table.union_reduce(ids, 1, keepdim=False)
            for g in range(groups):
                co[(slice(g * group_out, (g + 1) * group_out), slice(None), *tap)] = per_channel[g * group_in:(g + 1) * group_in]
        weight_co = compress(co)
        for view in w_value:
            view.record(table, weight_co, "inputs")
            view.mark_roles(["out", "in"] + ["in"] * spatial)
    if isinstance(b_value, tuple):
        per_out = table.union_reduce(out_ids, 1, keepdim=False)
        for view in b_value:
            view.record(table, compress(per_out), "inputs")
            view.mark_roles(["out"])
    elif isinstance(b_value, SetValue):
        result = engine.elementwise([(result, shape(out)), (b_value, (c_out,) + (1,) * spatial)], shape(out))
    ix.assign(out, result)

    def backward():
        if not isinstance(result, SetValue) or result.bwd is None:
            return
        grad = table.union_reduce(result.bwd, 0, keepdim=False).expand(c_out, *out_sizes).reshape(c_out, n_out)
        if isinstance(w_value, tuple):
            back = torch.zeros(c_out, 1, *kernel, dtype=torch.int64)
            for tap, source in taps:
                seen = grad[:, source >= 0]
                if seen.numel():
                    back[(slice(None), 0, *tap)] = table.union_reduce(seen, 1, keepdim=False)
            back = without_empty_cooperand(back, weight_co)
            for view in w_value:
                view.record(table, back, "outputs")
        if isinstance(b_value, tuple):
            for view in b_value:
                view.record(table, compress(table.union_reduce(grad, 1, keepdim=False)), "outputs")
        if isinstance(x_value, SetValue):
            n_in = max(1, _prod(in_sizes))
            back_x = torch.zeros(c_in, n_in, dtype=torch.int64)
            for g in range(groups):
                group_grad = table.union_reduce(grad[g * group_out:(g + 1) * group_out], 0, keepdim=False)
                flat = torch.zeros(n_in, dtype=torch.int64)
                for _, source in taps:
                    valid = source >= 0
                    flat = table.scatter_union(flat, source[valid], group_grad[valid])
                back_x[g * group_in:(g + 1) * group_in] = flat
            x_value.add_bwd(table, compress(back_x.reshape(1, c_in, *in_sizes)))

    engine.tape.append(backward)


def _transposed(ix, bound, out):
    x, weight, bias = bound["input"], bound["weight"], bound.get("bias")
    groups = bound.get("groups") or 1
    table = ix.table
    x_value, w_value = ix.value(x), ix.value(weight)
    b_value = ix.value(bias) if isinstance(bias, torch.Tensor) else None
    c_in, c_out = x.shape[1], out.shape[1]
    spatial = x.dim() - 2
    unit = (1,) * spatial
    group_in, group_out = c_in // groups, c_out // groups
    if isinstance(x_value, SetValue):
        per_channel = table.union_reduce(x_value.ids, (0, *range(2, x.dim())), keepdim=False).expand(c_in).clone()
    else:
        per_channel = torch.zeros(c_in, dtype=torch.int64)
    out_channel = torch.zeros(c_out, dtype=torch.int64)
    for g in range(groups):
        merged = table.union_reduce(per_channel[g * group_in:(g + 1) * group_in], 0, keepdim=False)
        out_channel[g * group_out:(g + 1) * group_out] = int(merged)
    if isinstance(w_value, tuple):
        for view in w_value:
            view.record(table, per_channel.reshape(c_in, 1, *unit), "inputs")
            view.mark_roles(["in", "out"] + ["in"] * spatial)
    if isinstance(b_value, tuple):
        for view in b_value:
            view.record(table, out_channel, "inputs")
            view.mark_roles(["out"])
    result = SetValue(out_channel.reshape(1, c_out, *unit), shape(out))
    ix.assign(out, result)

    def backward():
        if result.bwd is None:
            return
        per_out = table.union_reduce(result.bwd, (0, *range(2, out.dim())), keepdim=False).expand(c_out).clone()
        if isinstance(w_value, tuple):
            ids = per_out.reshape(groups, 1, group_out).expand(groups, group_in, group_out).reshape(c_in, group_out, *unit)
            for view in w_value:
                view.record(table, ids, "outputs")
        if isinstance(b_value, tuple):
            for view in b_value:
                view.record(table, per_out, "outputs")
        if isinstance(x_value, SetValue):
            back = torch.zeros(c_in, dtype=torch.int64)
            for g in range(groups):
                merged = table.union_reduce(per_out[g * group_out:(g + 1) * group_out], 0, keepdim=False)
                back[g * group_in:(g + 1) * group_in] = int(merged)
            x_value.add_bwd(table, back.reshape(1, c_in, *unit))

    ix.engine.tape.append(backward)


@rule("max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "_adaptive_avg_pool2d", "adaptive_max_pool1d", "adaptive_max_pool2d", "_adaptive_avg_pool3d", "max_pool1d_with_indices")
def pooling(ix, func, args, kwargs, out):
    """Spatial pooling keeps channels apart and mixes positions (see the module NOTE)."""
    from pipeline.maps.propagate.rules.common import letters, tensors_out

    x = args[0]
    n = x.dim()
    name = op_name(func)
    spatial = 2
    if name.endswith("1d"):
        spatial = 1
    elif name.endswith("3d"):
        spatial = 3
    lead = n - spatial
    source = letters(n)
    for tensor in tensors_out(out):
        target = source[:lead] + "".join(chr(ord("A") + i) for i in range(spatial))
        ix.assign(tensor, ix.engine.einsum([(ix.value(x), source, shape(x))], target, shape(tensor)))


def _per_dim(value, spatial: int) -> list[int]:
    if isinstance(value, int):
        return [value] * spatial
    value = list(value)
    return value * spatial if len(value) == 1 else value


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out
