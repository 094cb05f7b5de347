"""Elementwise ops: every output element unions its operands' elements, with broadcasting.

Ops that ATen tags ``pointwise`` reach the ``<pointwise>`` rule without being listed.
"""

from __future__ import annotations

from pipeline.maps.propagate.interpreter import rule
from pipeline.maps.propagate.rules.common import shape, tensors_in, tensors_out


@rule(
    "<pointwise>",
    "masked_fill",
    "where",
    "clamp",
    "clamp_min",
    "clamp_max",
    "tril",
    "triu",
    "native_dropout",
    "dropout",
    "_safe_softmax_mask",
    "lerp",
    "addcmul",
    "addcdiv",
    "copy",
)
def pointwise(ix, func, args, kwargs, out):
    operands = [(ix.value(t), shape(t)) for t in tensors_in(args, kwargs)]
    outs = tensors_out(out)
    result = ix.engine.elementwise(operands, shape(outs[0]))
    for tensor in outs:
        ix.assign(tensor, result if shape(tensor) == shape(outs[0]) else None)


@rule("copy_")
def copy_(ix, func, args, kwargs, out):
    """``self.copy_(src)`` replaces self's values with src's, broadcast to self's shape."""
    target, source = args[0], args[1]
    result = ix.engine.elementwise([(ix.value(source), shape(source))], shape(target))
    ix.assign(out, result)


@rule(
    "zeros_like",
    "ones_like",
    "empty_like",
    "full_like",
    "rand_like",
    "randn_like",
    "new_zeros",
    "new_ones",
    "new_empty",
    "new_full",
    "fill_",
    "zero_",
    "scalar_tensor",
    "sym_size",
    "sym_numel",
    "sym_stride",
)
def constant(ix, func, args, kwargs, out):
    """Ops whose result does not depend on input values carry no atoms."""
    for tensor in tensors_out(out):
        ix.assign(tensor, None)
