"""Indexing with tensors: index, gather, index_select, scatter and friends.

Index tensors live on the meta device, so their values are unknown. A gathered element
may therefore come from any position along the indexed axes: the rule unions the source
over those axes, then routes the result with the real op applied to positions and zero
indices. The index tensor's own set joins the output, since it selects the values.
"""

from __future__ import annotations

import torch

from pipeline.maps.propagate.interpreter import UnsupportedOpError, rule
from pipeline.maps.propagate.rules.common import bind, letters, shape, tensors_out
from pipeline.maps.propagate.values import SetValue


def _gather_like(ix, func, source, dims, index_tensors, out, call):
    table = ix.table
    value = ix.value(source)
    if isinstance(value, tuple):
        from pipeline.maps.propagate.values import ALL, AxisMap, ParamView

        if out.dim() == source.dim():
            views = []
            for view in value:
                axes = list(view.axes)
                for d in dims:
                    if axes[d].param_axis is not None:
                        axes[d] = AxisMap(axes[d].param_axis, ALL)
                views.append(ParamView(view.param, tuple(axes), view.fixed))
            ix.assign(out, tuple(views))
            return
        raise UnsupportedOpError(
            f"op {func} in module {ix.module_path()!r} indexes a parameter with a tensor "
            "and changes its rank; use embedding or index_select along one axis"
        )

    engine = ix.engine
    reduced_shape = tuple(1 if d in dims else s for d, s in enumerate(source.shape))
    if isinstance(value, SetValue):
        reduced = SetValue(table.union_reduce(value.ids, dims, keepdim=True), shape(source))
        mixed = engine.mix(value, shape(source), dims)
    else:
        mixed, reduced = None, None
    positions = torch.arange(_numel(reduced_shape), dtype=torch.int64).reshape(reduced_shape)
    routed = call(positions)
    small = SetValue(reduced.ids.expand(reduced_shape).contiguous(), reduced_shape) if reduced is not None else None
    results = engine.move([(small, reduced_shape)], [routed], [shape(out)]) if small is not None else [None]
    if small is not None and isinstance(mixed, SetValue):
        # The small tensor stands for the mixed source in the backward pass.
        moved_result = results[0]

        def backward():
            if small.bwd is not None:
                mixed.add_bwd(table, small.bwd)

        engine.tape.insert(len(engine.tape) - 1, backward)
        del moved_result
    operands = [(results[0], shape(out))]
    for tensor in index_tensors:
        operands.append((engine.mix(ix.value(tensor), shape(tensor), tuple(range(tensor.dim()))), shape(tensor)))
    if len(operands) > 1:
        flat = engine.elementwise([(operands[0][0], shape(out))], shape(out))
        for value_, value_shape in operands[1:]:
            if value_ is not None:
                reduced_index = engine.einsum([(value_, letters(len(value_shape)), value_shape)], "", ())
                flat = engine.elementwise([(flat, shape(out)), (reduced_index, ())], shape(out))
        ix.assign(out, flat)
    else:
        ix.assign(out, results[0])


def _numel(s):
    n = 1
    for v in s:
        n *= v
    return n


@rule("index")
def index(ix, func, args, kwargs, out):
    source, indices = args[0], list(args[1])
    dims = tuple(d for d, i in enumerate(indices) if i is not None)
    tensors = [i for i in indices if i is not None]
    if any(t.dtype == torch.bool for t in tensors):
        raise UnsupportedOpError(
            f"boolean-mask indexing in module {ix.module_path()!r} has a data-dependent "
            "shape; use masked_fill or where instead"
        )

    def call(positions):
        zeros = [None if i is None else torch.zeros(i.shape, dtype=torch.int64) for i in indices]
        return func(positions, zeros)

    _gather_like(ix, func, source, dims, tensors, out, call)


@rule("index_select")
def index_select(ix, func, args, kwargs, out):
    bound = bind(func, args, kwargs)
    source, dim, idx = bound["self"], bound["dim"] % bound["self"].dim(), bound["index"]

    def call(positions):
        return func(positions, dim, torch.zeros(idx.shape, dtype=torch.int64))

    _gather_like(ix, func, source, (dim,), [idx], out, call)


@rule("gather", "take_along_dim")
def gather(ix, func, args, kwargs, out):
    bound = bind(func, args, kwargs)
    source, idx = bound["self"], bound.get("index", bound.get("indices"))
    dim = (bound.get("dim") or 0) % source.dim()

    def call(positions):
        return func(positions, dim, torch.zeros(idx.shape, dtype=torch.int64))

    _gather_like(ix, func, source, (dim,), [idx], out, call)


@rule("scatter", "scatter_add", "scatter_reduce", "index_add", "index_copy", "index_put", "index_fill", "masked_scatter", "_index_put_impl", "index_reduce")
def scatter(ix, func, args, kwargs, out):
    """``out = self`` with values of ``src`` written at unknown positions along ``dim``."""
    bound = bind(func, args, kwargs)
    base = bound["self"]
    engine = ix.engine
    others = []
    for key, tensor in bound.items():
        if key != "self" and isinstance(tensor, torch.Tensor):
            others.append(tensor)
        elif isinstance(tensor, (list, tuple)):
            others.extend(t for t in tensor if isinstance(t, torch.Tensor))
    operands = [(ix.value(base), shape(base))]
    for tensor in others:
        value = ix.value(tensor)
        if isinstance(value, tuple):
            raise UnsupportedOpError(
                f"op {func} in module {ix.module_path()!r} scatters parameter elements; the "
                "set map does not track parameters through scatter"
            )
        collapsed = engine.einsum([(value, letters(tensor.dim()), shape(tensor))], "", ())
        operands.append((collapsed, ()))
    for tensor in tensors_out(out):
        ix.assign(tensor, engine.elementwise(operands, shape(tensor)))
