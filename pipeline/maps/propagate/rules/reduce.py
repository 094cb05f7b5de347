"""Reductions and ops that mix along an axis (softmax, cumulative ops, sort)."""

from __future__ import annotations

from pipeline.maps.propagate.interpreter import rule
from pipeline.maps.propagate.rules.common import bind, dims_of, letters, shape, tensors_out


@rule(
    "sum",
    "mean",
    "amax",
    "amin",
    "max",
    "min",
    "prod",
    "var",
    "std",
    "var_mean",
    "std_mean",
    "logsumexp",
    "any",
    "all",
    "argmax",
    "argmin",
    "linalg_vector_norm",
    "norm",
    "count_nonzero",
    "nansum",
    "aminmax",
)
def reduction(ix, func, args, kwargs, out):
    bound = bind(func, args, kwargs)
    x = bound["self"]
    ndim = x.dim()
    dims = dims_of(bound.get("dim"), ndim)
    x_letters = letters(ndim)
    outs = tensors_out(out)
    for tensor in outs:
        out_letters = _out_letters(x_letters, dims, tensor.dim())
        value = ix.engine.einsum([(ix.value(x), x_letters, shape(x))], out_letters, shape(tensor))
        ix.assign(tensor, value)


def _out_letters(x_letters: str, dims: tuple[int, ...], out_ndim: int) -> str:
    kept = "".join(letter for i, letter in enumerate(x_letters) if i not in dims)
    if out_ndim == len(kept):
        return kept
    # keepdim=True: reduced axes stay as size-1 axes with letters of their own.
    fresh = iter("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    return "".join(next(fresh) if i in dims else letter for i, letter in enumerate(x_letters))


@rule("_softmax", "_log_softmax", "_safe_softmax", "cumsum", "cumprod", "logcumsumexp", "cummax", "cummin", "sort", "topk", "softmax", "log_softmax")
def mix_along(ix, func, args, kwargs, out):
    """Propagate through an op whose each output element depends on every element along ``dim``."""
    bound = bind(func, args, kwargs)
    x = bound["self"]
    dim = bound.get("dim", -1)
    dims = (dim % x.dim(),) if x.dim() else ()
    mixed = ix.engine.mix(ix.value(x), shape(x), dims)
    for tensor in tensors_out(out):
        if shape(tensor) == shape(x):
            ix.assign(tensor, mixed)
        else:
            # topk: k elements along dim, each may come from any position.
            x_letters = letters(x.dim())
            out_letters = "".join("Z" if i in dims else c for i, c in enumerate(x_letters))
            ix.assign(tensor, ix.engine.einsum([(ix.value(x), x_letters, shape(x))], out_letters, shape(tensor)))
