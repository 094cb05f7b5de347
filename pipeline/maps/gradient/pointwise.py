"""Surrogates for elementwise ops and products, as run in the probe copy.

Every surrogate has the signature ``(mode, func, *args, **kwargs)``: ``mode`` is the
running :class:`~pipeline.maps.gradient.mode.ProbeMode`, ``func`` the op it replaces.
The mode calls a surrogate only when one of the op's tensor arguments is an activation,
and inside a surrogate the mode is paused, so plain tensor code runs the real ops.

The rules, for an activation ``x``, a weight ``w`` (a constant that requires grad, that
is, a parameter or a tensor computed from parameters) and a plain constant ``c``:

- unary nonlinearities are the identity, which keeps zero at zero, never saturates and
  never has a zero slope;
- ``x + y`` and ``x - y`` of two activations are ``x + y``, so nothing cancels;
- ``x + w`` is ``x + w * x``: a weight used additively (a bias) is applied as a gain, so
  its gradient is ``x`` times the upstream gradient, like a weight's;
- ``x + c`` is ``x`` broadcast to the shape of the sum: a plain constant never makes an
  activation non-zero at the all-absent probe;
- a product (``*``, ``/``, ``@``, ``einsum``, ``linear``) is the sum, over its activation
  operands, of the product with every other activation and every plain constant replaced
  by ones. So a weight multiplies its co-operand as in the model, and a product of two
  activations is non-zero wherever either factor is.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

Mode = Any  # pipeline.maps.gradient.mode.ProbeMode; not imported, to avoid a cycle


def is_inplace(func: Callable) -> bool:
    """Return whether ``func`` is an in-place op by PyTorch's naming rule (``add_``, not ``__add__``)."""
    name = getattr(func, "__name__", "")
    return name.endswith("_") and not name.endswith("__")


def identity(mode: Mode, func: Callable, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    if not mode.is_activation(x):
        return func(x, *args, **kwargs)
    return x.clone()


def dropout(mode: Mode, func: Callable, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Return the input: the probe copy is deterministic even where a model calls dropout in training mode."""
    return x.clone()


# Sums -------------------------------------------------------------------------------------


def additive(mode: Mode, a: Any, b: Any) -> Any:
    """Combine two addends by the rules of the module docstring (a plain sum unless one is an activation)."""
    a_is_act = mode.is_activation(a)
    b_is_act = mode.is_activation(b)
    if a_is_act == b_is_act:
        return a + b
    act, other = (a, b) if a_is_act else (b, a)
    if mode.is_weight(other):
        return act + act * other
    return broadcast_like(act, other)


def broadcast_like(act: torch.Tensor, other: Any) -> torch.Tensor:
    """Return ``act`` broadcast to the shape of ``act op other``, with the values of ``act``."""
    if isinstance(other, torch.Tensor):
        return act + torch.zeros_like(other, dtype=act.dtype)
    return act.clone()


def add(mode: Mode, func: Callable, a: Any, b: Any, *args: Any, **kwargs: Any) -> Any:
    """Surrogate of ``add``, ``sub``, ``rsub`` and their in-place forms (``alpha`` is dropped)."""
    if is_inplace(func):
        return add_inplace(mode, func, a, b, *args, **kwargs)
    return additive(mode, a, b)


def add_inplace(mode: Mode, func: Callable, target: torch.Tensor, other: Any, *args: Any, **kwargs: Any) -> Any:
    if not mode.is_activation(target):
        return func(target, other, *args, **kwargs)
    if mode.is_activation(other):
        return target.add_(other)
    if mode.is_weight(other):
        # In place, ``x + w * x`` is ``x * (1 + w)``; autograd keeps the old ``x`` for ``w``.
        return target.mul_(1 + other)
    return target


# Products ---------------------------------------------------------------------------------


def multilinear(mode: Mode, op: Callable[..., torch.Tensor], operands: Sequence[Any]) -> torch.Tensor:
    """Apply ``op`` once per activation operand, with the other activations and constants as ones.

    Weights stay as they are, so each weight element meets exactly the co-operands it
    meets in the model. The result is marked as an activation. Without an activation
    operand, the real product is returned.
    """
    if not any(mode.is_activation(operand) for operand in operands):
        return op(*operands)
    terms = []
    for position, operand in enumerate(operands):
        if not mode.is_activation(operand):
            continue
        arguments = [
            _keep_or_ones(mode, other) if index != position else other
            for index, other in enumerate(operands)
        ]
        terms.append(op(*arguments))
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return mode.mark(total)


def _keep_or_ones(mode: Mode, value: Any) -> Any:
    if not isinstance(value, torch.Tensor) or mode.is_weight(value):
        return value
    return torch.ones_like(value, dtype=mode.dtype)


def multiply(mode: Mode, func: Callable, a: Any, b: Any, *args: Any, **kwargs: Any) -> Any:
    """Surrogate of ``mul``, ``div`` and their reflected forms: a product of the two operands."""
    if is_inplace(func):
        return multiply_inplace(mode, func, a, b, *args, **kwargs)
    if not isinstance(b, torch.Tensor):
        return a.clone() if mode.is_activation(a) else func(a, b, *args, **kwargs)
    return multilinear(mode, torch.mul, [a, b])


def multiply_inplace(mode: Mode, func: Callable, target: torch.Tensor, other: Any, *args: Any, **kwargs: Any) -> Any:
    if not mode.is_activation(target):
        return func(target, other, *args, **kwargs)
    if mode.is_activation(other):
        return target.add_(other)
    if mode.is_weight(other):
        return target.mul_(other)
    return target


def power(mode: Mode, func: Callable, a: Any, b: Any, *args: Any, **kwargs: Any) -> Any:
    """Surrogate of ``pow`` and ``__rpow__``: the identity on an activation, or a sum of two."""
    if mode.is_activation(a) and mode.is_activation(b):
        return a + b
    act, other = (a, b) if mode.is_activation(a) else (b, a)
    return broadcast_like(act, other)


def extremum(mode: Mode, func: Callable, a: Any, b: Any, *args: Any, **kwargs: Any) -> Any:
    """Surrogate of elementwise ``maximum`` and ``minimum``: the union of both operands."""
    return power(mode, func, a, b)


def matmul(mode: Mode, func: Callable, a: Any, b: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Surrogate of ``matmul``, ``mm``, ``bmm``, ``mv`` and ``@``."""
    return multilinear(mode, torch.matmul, [a, b])


def rmatmul(mode: Mode, func: Callable, a: Any, b: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
    return multilinear(mode, torch.matmul, [b, a])


def einsum(mode: Mode, func: Callable, equation: str, *operands: Any, **kwargs: Any) -> torch.Tensor:
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    return multilinear(mode, lambda *ts: torch.einsum(equation, *ts), list(operands))


def linear(mode: Mode, func: Callable, x: Any, weight: Any, bias: Any = None) -> torch.Tensor:
    product = multilinear(mode, torch.nn.functional.linear, [x, weight])
    if bias is None:
        return product
    return mode.mark(additive(mode, product, bias))


def add_matmul(mode: Mode, func: Callable, bias: Any, a: Any, b: Any, **kwargs: Any) -> torch.Tensor:
    """Surrogate of ``addmm``, ``baddbmm`` and ``addmv``: ``bias + a @ b`` (``alpha``, ``beta`` dropped)."""
    product = multilinear(mode, torch.matmul, [a, b])
    return mode.mark(additive(mode, product, bias))


def conv(mode: Mode, func: Callable, x: Any, weight: Any, bias: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Surrogate of ``conv*d`` and ``conv_transpose*d``: the real convolution, bias as a gain."""
    bias = kwargs.pop("bias", bias)
    if func is torch.conv2d and not kwargs and _unfoldable(args):
        convolution: Callable = lambda inp, w: _conv2d_by_unfold(inp, w, *args)
    elif func is torch.conv1d and not kwargs and _unfoldable(args):
        convolution = lambda inp, w: _conv1d_by_unfold(inp, w, *args)
    else:
        convolution = lambda inp, w: func(inp, w, None, *args, **kwargs)
    product = multilinear(mode, convolution, [x, weight])
    if bias is None:
        return product
    spatial = weight.dim() - 2
    return mode.mark(additive(mode, product, bias.reshape(-1, *([1] * spatial))))


def _unfoldable(args: tuple) -> bool:
    """Return whether ``conv2d(x, w, None, *args)`` has numeric padding and one group."""
    padding = args[1] if len(args) > 1 else 0
    groups = args[3] if len(args) > 3 else 1
    return not isinstance(padding, str) and groups == 1


def _conv2d_by_unfold(x: torch.Tensor, weight: torch.Tensor, stride: Any = 1, padding: Any = 0, dilation: Any = 1,
                      groups: int = 1) -> torch.Tensor:
    """Compute ``conv2d`` as a matrix product with ``F.unfold``.

    The result equals ``F.conv2d``. It exists because ``vmap`` of the float64 ``conv1d``
    and ``conv2d`` backward fails on some shapes in PyTorch 2.13 ("slow_conv2d:
    grad_weight must be contiguous", for example a length-1 input with padding 1), and
    the unfolded form has no such case.
    """
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    pair = torch.nn.modules.utils._pair
    kernel = weight.shape[-2:]
    stride, padding, dilation = pair(stride), pair(padding), pair(dilation)
    columns = torch.nn.functional.unfold(x, kernel, dilation, padding, stride)
    height = (x.shape[-2] + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    width = (x.shape[-1] + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    out = torch.matmul(weight.reshape(weight.shape[0], -1), columns)
    out = out.reshape(x.shape[0], weight.shape[0], height, width)
    return out.squeeze(0) if unbatched else out


def _conv1d_by_unfold(x: torch.Tensor, weight: torch.Tensor, stride: Any = 1, padding: Any = 0, dilation: Any = 1,
                      groups: int = 1) -> torch.Tensor:
    """Compute ``conv1d`` as a ``conv2d`` over a height of 1, by :func:`_conv2d_by_unfold`."""
    single = torch.nn.modules.utils._single
    stride, padding, dilation = single(stride), single(padding), single(dilation)
    out = _conv2d_by_unfold(x.unsqueeze(-2), weight.unsqueeze(-2), (1, stride[0]), (0, padding[0]), (1, dilation[0]))
    return out.squeeze(-2)


def prelu(mode: Mode, func: Callable, x: Any, weight: Any) -> torch.Tensor:
    """Surrogate of ``prelu``: the slope is a gain on the channel, so it records the channel's set."""
    if not mode.is_activation(x):
        return func(x, weight)
    if weight.numel() > 1 and x.dim() >= 2:
        weight = weight.reshape(-1, *([1] * (x.dim() - 2)))
    return additive(mode, x, weight)


def glu(mode: Mode, func: Callable, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    first, second = x.chunk(2, dim)
    return first + second


# Selection --------------------------------------------------------------------------------


def where(mode: Mode, func: Callable, condition: Any, a: Any = None, b: Any = None) -> Any:
    """Surrogate of ``where``: constant branches become zeros; an activation condition is kept as is."""
    if a is None or not (mode.is_activation(a) or mode.is_activation(b)):
        return func(condition, a, b) if a is not None else func(condition)
    a = a if mode.is_activation(a) else _zeros_for(a, mode.dtype)
    b = b if mode.is_activation(b) else _zeros_for(b, mode.dtype)
    return torch.where(condition, a, b)


def _zeros_for(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.zeros_like(value, dtype=dtype)
    return 0.0


def masked_fill(mode: Mode, func: Callable, x: torch.Tensor, mask: Any, value: Any) -> Any:
    """Surrogate of ``masked_fill``: masked positions of an activation become 0, not the fill value."""
    if not mode.is_activation(x):
        return func(x, mask, value)
    if is_inplace(func):
        return x.masked_fill_(mask, 0.0)
    return x.masked_fill(mask, 0.0)
