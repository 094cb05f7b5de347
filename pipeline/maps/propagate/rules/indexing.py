"""Indexing with tensors: index, gather, index_select, scatter and friends.

When an index tensor has values (a constant made on the CPU inside ``forward``), the rule
routes sets exactly: it applies the op to a tensor of element positions. When the index
lives on the meta device or depends on the inputs, its values are unknown, so an output
element may come from any position along the indexed axes: the rule unions the source
along them. An index that depends on the inputs also adds its own set to the output,
because it selects the values.
"""

from __future__ import annotations

import torch

from pipeline.maps.propagate.interpreter import UnsupportedOpError, rule
from pipeline.maps.propagate.rules.common import bind, letters, op_name, shape, tensors_out
from pipeline.maps.propagate.values import ALL, AxisMap, ParamView, SetValue
from pipeline.maps.sets import compress, full


def _known(ix, tensor) -> bool:
    """Return True when an index tensor has real values and carries no set."""
    return isinstance(tensor, torch.Tensor) and tensor.device.type != "meta" and ix.value(tensor) is None


def _positions(t: torch.Tensor) -> torch.Tensor:
    return torch.arange(t.numel(), dtype=torch.int64).reshape(t.shape)


def _spread_param(ix, func, value, source, dims, out):
    if out.dim() != source.dim():
        raise UnsupportedOpError(
            f"op {func} in module {ix.module_path()!r} indexes a parameter with a tensor "
            "and changes its rank; use embedding or index_select along one axis"
        )
    views = []
    for view in value:
        axes = list(view.axes)
        for d in dims:
            if axes[d].param_axis is not None:
                axes[d] = AxisMap(axes[d].param_axis, ALL)
        views.append(ParamView(view.param, tuple(axes), view.fixed))
    ix.assign(out, tuple(views))


def _read(ix, func, source, dims, index_tensors, out, call_known, call_unknown):
    """Shared by index, gather and index_select: ``call_*`` apply the op to positions."""
    engine = ix.engine
    value = ix.value(source)
    if isinstance(value, tuple):
        _spread_param(ix, func, value, source, dims, out)
        return
    if all(_known(ix, t) for t in index_tensors):
        moved = engine.move([(value if isinstance(value, SetValue) else None, shape(source))], [call_known(_positions(source))], [shape(out)])
        ix.assign(out, moved[0])
        return

    # Unknown index values: every position along ``dims`` may be read.
    mixed = engine.mix(value, shape(source), dims)
    reduced_shape = tuple(1 if d in dims else s for d, s in enumerate(source.shape))
    if isinstance(mixed, SetValue):
        proxy = SetValue(mixed.ids.expand(reduced_shape).contiguous(), reduced_shape)
        routed = call_unknown(_positions(torch.empty(reduced_shape)))
        moved = engine.move([(proxy, reduced_shape)], [routed], [shape(out)])[0]

        def link():
            if proxy.bwd is not None:
                mixed.add_bwd(ix.table, proxy.bwd)

        # Runs after move's backward step and before mix's, because the tape runs in reverse.
        engine.tape.insert(len(engine.tape) - 1, link)
    else:
        moved = None
    operands = [(moved, shape(out))]
    for tensor in index_tensors:
        index_value = ix.value(tensor)
        if isinstance(index_value, SetValue):
            operands.append((engine.einsum([(index_value, letters(tensor.dim()), shape(tensor))], "", ()), ()))
    ix.assign(out, engine.elementwise(operands, shape(out)) if len(operands) > 1 else moved)


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

    def known(positions):
        return func(positions, indices)

    def unknown(positions):
        return func(positions, [None if i is None else torch.zeros(i.shape, dtype=torch.int64) for i in indices])

    _read(ix, func, source, dims, tensors, out, known, unknown)


@rule("index_select")
def index_select(ix, func, args, kwargs, out):
    bound = bind(func, args, kwargs)
    source, dim, idx = bound["self"], bound["dim"] % bound["self"].dim(), bound["index"]
    _read(
        ix, func, source, (dim,), [idx], out,
        lambda p: func(p, dim, idx),
        lambda p: func(p, dim, torch.zeros(idx.shape, dtype=torch.int64)),
    )


@rule("gather", "take_along_dim")
def gather(ix, func, args, kwargs, out):
    bound = bind(func, args, kwargs)
    source, idx = bound["self"], bound.get("index", bound.get("indices"))
    dim = (bound.get("dim") or 0) % source.dim()
    _read(
        ix, func, source, (dim,), [idx], out,
        lambda p: func(p, dim, idx),
        lambda p: func(p, dim, torch.zeros(idx.shape, dtype=torch.int64)),
    )


_REPLACING = {"scatter", "index_copy", "index_put", "_index_put_impl", "index_fill", "masked_scatter"}


@rule("scatter", "scatter_add", "scatter_reduce", "index_add", "index_copy", "index_put", "index_fill", "masked_scatter", "_index_put_impl", "index_reduce")
def scatter(ix, func, args, kwargs, out):
    """``out = self`` with elements of ``src`` written (or added) at indexed positions."""
    bound = bind(func, args, kwargs)
    name = op_name(func)
    base = bound["self"]
    source = bound.get("src", bound.get("source", bound.get("values")))
    index_tensors = _index_tensors(bound)
    for tensor in [source, *index_tensors]:
        if isinstance(ix.value(tensor), tuple):
            raise UnsupportedOpError(
                f"op {func} in module {ix.module_path()!r} scatters parameter elements; the "
                "set map does not track parameters through scatter"
            )
    if isinstance(source, torch.Tensor) and index_tensors and all(_known(ix, t) for t in index_tensors):
        targets = _targets(name, bound, out)
        if targets is not None:
            _scatter_known(ix, name, base, source, targets, out)
            return

    # Unknown positions: any element of the source may land anywhere along the axis.
    engine = ix.engine
    operands = [(ix.value(base), shape(base))]
    for tensor in [source, *index_tensors]:
        if isinstance(tensor, torch.Tensor):
            collapsed = engine.einsum([(ix.value(tensor), letters(tensor.dim()), shape(tensor))], "", ())
            operands.append((collapsed, ()))
    for tensor in tensors_out(out):
        ix.assign(tensor, engine.elementwise(operands, shape(tensor)))


def _index_tensors(bound) -> list[torch.Tensor]:
    found = []
    for key in ("index", "indices", "mask"):
        value = bound.get(key)
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, torch.Tensor))
    return found


def _targets(name, bound, out) -> torch.Tensor | None:
    """Return, for each written source element, its flat position in the output."""
    positions = _positions(out)
    if name in ("scatter", "scatter_add", "scatter_reduce"):
        return positions.gather(bound["dim"], bound["index"])
    if name in ("index_add", "index_copy", "index_reduce"):
        return positions.index_select(bound["dim"], bound["index"])
    if name in ("index_put", "_index_put_impl"):
        indices = bound["indices"]
        if any(i is not None and i.dtype == torch.bool for i in indices):
            return None
        return positions[tuple(indices)]
    return None


def _scatter_known(ix, name, base, source, targets, out):
    table = ix.table
    base_value, source_value = ix.value(base), ix.value(source)
    out_shape = shape(out)
    numel = out.numel()
    written = targets.reshape(-1)
    base_full = full(base_value.ids, out_shape).reshape(-1) if isinstance(base_value, SetValue) else torch.zeros(numel, dtype=torch.int64)
    if isinstance(source_value, SetValue):
        source_ids = full(source_value.ids, shape(source))
        source_ids = source_ids[tuple(slice(0, n) for n in targets.shape)] if source.dim() == targets.dim() else source_ids.expand(targets.shape)
        placed = table.scatter_union(torch.zeros(numel, dtype=torch.int64), written, source_ids.reshape(-1))
    else:
        placed = torch.zeros(numel, dtype=torch.int64)
    replaced = torch.zeros(numel, dtype=torch.bool)
    if name in _REPLACING:
        replaced[written] = True
    kept = torch.where(replaced, torch.zeros_like(base_full), base_full)
    result = SetValue(compress(table.union(kept, placed).reshape(out_shape)), out_shape)
    for tensor in tensors_out(out):
        ix.assign(tensor, result)

    def backward():
        if result.bwd is None:
            return
        grad = full(result.bwd, out_shape).reshape(-1)
        if isinstance(base_value, SetValue):
            back = torch.where(replaced, torch.zeros_like(grad), grad)
            base_value.add_bwd(table, compress(back.reshape(out_shape)))
        if isinstance(source_value, SetValue):
            back = torch.zeros(source.numel(), dtype=torch.int64)
            slots = _positions(source)
            slots = slots[tuple(slice(0, n) for n in targets.shape)] if source.dim() == targets.dim() else slots.expand(targets.shape)
            back = table.scatter_union(back, slots.reshape(-1), grad[written])
            source_value.add_bwd(table, compress(back.reshape(shape(source))))

    ix.engine.tape.append(backward)
