"""Contractions: mm, addmm, bmm, baddbmm, mv, dot.

``linear`` and ``matmul`` decompose into these before they reach the dispatcher. An
output element unions the rows and columns it contracts; a weight element records the
co-operand elements it multiplies; the bias of ``addmm`` records the product it is
added to.
"""

from __future__ import annotations

from pipeline.maps.propagate.interpreter import rule
from pipeline.maps.propagate.rules.common import op_name, bind, shape


def _contract(ix, out, operands, out_letters):
    value = ix.engine.einsum(
        [(ix.value(t), letters, shape(t)) for t, letters in operands], out_letters, shape(out)
    )
    ix.assign(out, value)


@rule("mm")
def mm(ix, func, args, kwargs, out):
    _contract(ix, out, [(args[0], "mk"), (args[1], "kn")], "mn")


@rule("bmm")
def bmm(ix, func, args, kwargs, out):
    _contract(ix, out, [(args[0], "bmk"), (args[1], "bkn")], "bmn")


@rule("mv")
def mv(ix, func, args, kwargs, out):
    _contract(ix, out, [(args[0], "mk"), (args[1], "k")], "m")


@rule("dot", "vdot")
def dot(ix, func, args, kwargs, out):
    _contract(ix, out, [(args[0], "k"), (args[1], "k")], "")


# Per op: (argument name, axis letters) of both factors, and the output's letters.
_PRODUCTS = {
    "addmm": (("mat1", "mk"), ("mat2", "kn"), "mn"),
    "baddbmm": (("batch1", "bmk"), ("batch2", "bkn"), "bmn"),
    "addmv": (("mat", "mk"), ("vec", "k"), "m"),
}


@rule("addmm", "baddbmm", "addmv")
def add_product(ix, func, args, kwargs, out):
    """``beta * self + alpha * (a @ b)``: self acts like a bias on the product."""
    bound = bind(func, args, kwargs)
    name = op_name(func)
    (a_name, a_letters), (b_name, b_letters), out_letters = _PRODUCTS[name]
    base = bound["self"]
    a, b = bound[a_name], bound[b_name]
    product = ix.engine.einsum(
        [(ix.value(a), a_letters, shape(a)), (ix.value(b), b_letters, shape(b))],
        out_letters,
        shape(out),
    )
    value = ix.engine.elementwise([(ix.value(base), shape(base)), (product, shape(out))], shape(out))
    ix.assign(out, value)
