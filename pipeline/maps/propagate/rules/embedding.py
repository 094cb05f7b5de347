"""Embedding lookups: a table row records the category that selects it.

Row ``c`` of a table indexed by a categorical input of vocabulary V records the atom V:c.
Atoms of the index that are not categories (an index computed from a continuous field)
are recorded on every row. Rows past the end of every vocabulary that reaches the index
are never selected, so they record nothing and feed nothing. The lookup's output carries
the index's full set: the index may hold any category.
"""

from __future__ import annotations

import torch

from pipeline.maps.propagate.interpreter import rule
from pipeline.maps.propagate.rules.common import bind, letters, shape, tensors_out
from pipeline.maps.propagate.values import SetValue


def _row_sets(ix, index_set: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return per-row input ids ``[rows, 1]`` and a bool mask of rows that can be selected."""
    table = ix.table
    bits = table.bits(index_set)
    other = bits & ~ix.category_mask
    ids = torch.full((rows,), table.intern(other), dtype=torch.int64)
    selectable = torch.zeros(rows, dtype=torch.bool)
    if other:
        selectable[:] = True
    for vocabulary, atoms in ix.vocab_atoms.items():
        if not bits & ix.vocab_masks[vocabulary]:
            continue
        for c, atom in enumerate(atoms[:rows]):
            if (bits >> atom) & 1:
                ids[c] = table.intern(table.bits(int(ids[c])) | (1 << atom))
                selectable[c] = True
    return ids.reshape(rows, 1), selectable


def _lookup(ix, weight, indices, extra, out):
    """Shared by embedding and embedding_bag: ``extra`` holds other operands of the output."""
    table = ix.table
    weight_value = ix.value(weight)
    index_value = ix.value(indices)
    index_set = 0
    if isinstance(index_value, SetValue):
        index_set = int(table.union_reduce(index_value.ids, tuple(range(index_value.ids.dim()))).reshape(-1)[0]) if index_value.ids.numel() else 0

    out_shape = shape(out)
    operands = [(index_value if isinstance(index_value, SetValue) else None, shape(indices))] + extra
    if isinstance(weight_value, SetValue):
        # A computed table: every output element may come from any row.
        operands.append((weight_value, shape(weight)))
    result_ids = torch.zeros((1,) * len(out_shape), dtype=torch.int64)
    for value, _ in operands:
        if isinstance(value, SetValue):
            reduced = table.union_reduce(value.ids, tuple(range(value.ids.dim())))
            result_ids = table.union(result_ids, reduced.reshape(()).expand((1,) * len(out_shape)).clone())
    if isinstance(weight_value, SetValue) and weight_value.ids.dim() == 2:
        result_ids = table.union(result_ids, table.union_reduce(weight_value.ids, 0).reshape((1,) * (len(out_shape) - 1) + (-1,)))
    result = SetValue(result_ids, out_shape)
    ix.assign(out, result)

    selectable = None
    if isinstance(weight_value, tuple):
        rows = weight.shape[0]
        row_ids, selectable = _row_sets(ix, index_set, rows)
        for view in weight_value:
            view.record(table, row_ids, "inputs")
            view.mark_roles(["in", "out"])

    def backward():
        if result.bwd is None:
            return
        grad = result.bwd
        per_column = table.union_reduce(grad, tuple(range(grad.dim() - 1)), keepdim=False).reshape(1, -1)
        everything = table.union_reduce(grad, tuple(range(grad.dim())))
        for value, value_shape in operands:
            if isinstance(value, SetValue) and value is not weight_value:
                value.add_bwd(table, everything.reshape(()).expand((1,) * len(value_shape)).clone())
        if isinstance(weight_value, tuple):
            rows = weight.shape[0]
            ids = per_column.expand(rows, per_column.shape[1]).clone()
            ids[~selectable] = 0
            for view in weight_value:
                view.record(table, ids, "outputs")
        elif isinstance(weight_value, SetValue):
            weight_value.add_bwd(table, per_column)

    ix.engine.tape.append(backward)


@rule("embedding")
def embedding(ix, func, args, kwargs, out):
    bound = bind(func, args, kwargs)
    _lookup(ix, bound["weight"], bound["indices"], [], out)


@rule("_embedding_bag", "_embedding_bag_forward_only", "embedding_bag")
def embedding_bag(ix, func, args, kwargs, out):
    bound = bind(func, args, kwargs)
    outs = tensors_out(out)
    extra = []
    for key in ("offsets", "per_sample_weights"):
        tensor = bound.get(key)
        if isinstance(tensor, torch.Tensor):
            extra.append((ix.value(tensor), shape(tensor)))
    _lookup(ix, bound["weight"], bound["indices"], extra, outs[0])
    for tensor in outs[1:]:
        ix.assign(tensor, None)
