"""Surrogates for selecting reductions, pooling, softmax and normalisation in the probe copy.

A max passes its gradient to one element only. A softmax is 1/n where every input is 0.
A normalisation that subtracts a mean cancels to 0 where all its inputs are equal, for
example on an entity axis whose entities all carry the probed field. Each is replaced by
an op with the same dependence that has none of these problems:

- max, min, amax, amin, logsumexp and max pooling become sums (or positive poolings)
  over the same elements or windows, and the indices they return are the real ones;
- softmax, log_softmax and softmin become ``x + mean(x)`` along their axis;
- layer, group, instance, RMS and batch normalisation become ``x + mean(x)`` over the
  normalised axes (batch normalisation in eval mode is ``x``, as it is elementwise), then
  the affine weight as a product and the affine bias as a gain.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from pipeline.maps.gradient.pointwise import additive, extremum, multilinear

Mode = Any


def _all_dims(x: torch.Tensor, dim: Any) -> tuple[int, ...]:
    if dim is None or dim == () or dim == []:
        return tuple(range(x.dim()))
    if isinstance(dim, int):
        return (dim,)
    return tuple(dim)


# Selecting reductions ---------------------------------------------------------------------


def max_like(mode: Mode, func: Callable, x: Any, *args: Any, **kwargs: Any) -> Any:
    """Surrogate of ``max`` and ``min`` in all three forms: full, along ``dim``, elementwise."""
    other = args[0] if args else kwargs.get("other")
    if isinstance(other, torch.Tensor):
        return extremum(mode, func, x, other)
    if not mode.is_activation(x):
        return func(x, *args, **kwargs)
    dim = args[0] if args else kwargs.get("dim")
    keepdim = args[1] if len(args) > 1 else kwargs.get("keepdim", False)
    if dim is None:
        return x.sum()
    values = x.sum(dim, keepdim=keepdim)
    if func.__name__ == "max":
        return torch.return_types.max((values, x.argmax(dim, keepdim=keepdim)))
    return torch.return_types.min((values, x.argmin(dim, keepdim=keepdim)))


def amax_like(mode: Mode, func: Callable, x: torch.Tensor, dim: Any = (), keepdim: bool = False) -> torch.Tensor:
    """Surrogate of ``amax``, ``amin`` and ``logsumexp``: a sum over the same axes."""
    return x.sum(_all_dims(x, dim), keepdim=keepdim)


def max_pool(mode: Mode, func: Callable, x: torch.Tensor, kernel_size: Any, stride: Any = None,
             padding: Any = 0, dilation: Any = 1, ceil_mode: bool = False,
             return_indices: bool = False) -> Any:
    """Surrogate of ``max_pool1d/2d/3d``: a pooling with positive weights over the same windows."""
    spatial = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3}[func]
    if _is_one(dilation):
        average = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[spatial - 1]
        pooled = average(x, kernel_size, stride, padding, ceil_mode, True)
    else:
        pooled = _ones_convolution(x, spatial, kernel_size, stride, padding, dilation)
    if not return_indices:
        return pooled
    _, indices = func(x.detach(), kernel_size, stride, padding, dilation, ceil_mode, True)
    return pooled, indices


def _is_one(value: Any) -> bool:
    if isinstance(value, int):
        return value == 1
    return all(v == 1 for v in value)


def _ones_convolution(x: torch.Tensor, spatial: int, kernel_size: Any, stride: Any, padding: Any, dilation: Any) -> torch.Tensor:
    kernel = (kernel_size,) * spatial if isinstance(kernel_size, int) else tuple(kernel_size)
    channels = x.shape[-spatial - 1]
    ones = torch.ones(channels, 1, *kernel, dtype=x.dtype)
    convolution = (F.conv1d, F.conv2d, F.conv3d)[spatial - 1]
    return convolution(x, ones, None, stride if stride is not None else kernel, padding, dilation, channels)


def adaptive_max_pool(mode: Mode, func: Callable, x: torch.Tensor, output_size: Any, return_indices: bool = False) -> Any:
    average = {
        F.adaptive_max_pool1d: F.adaptive_avg_pool1d,
        F.adaptive_max_pool2d: F.adaptive_avg_pool2d,
        F.adaptive_max_pool3d: F.adaptive_avg_pool3d,
    }[func]
    pooled = average(x, output_size)
    if not return_indices:
        return pooled
    _, indices = func(x.detach(), output_size, True)
    return pooled, indices


# Softmax ----------------------------------------------------------------------------------


def softmax_like(mode: Mode, func: Callable, x: torch.Tensor, dim: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor:
    if dim is None:
        # The implicit axis of the deprecated call without ``dim``, as torch.nn.functional picks it.
        dim = 0 if x.dim() in (0, 1, 3) else 1
    return x + x.mean(dim, keepdim=True)


def normalize(mode: Mode, func: Callable, x: torch.Tensor, p: float = 2.0, dim: int = 1, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Surrogate of ``F.normalize``: each element depends on every element along ``dim``."""
    return x + x.mean(dim, keepdim=True)


# Normalisation ----------------------------------------------------------------------------


def _affine(mode: Mode, y: torch.Tensor, weight: Any, bias: Any, channel_shape: tuple[int, ...] | None) -> torch.Tensor:
    """Apply an affine weight as a product and its bias as a gain; reshape them to ``channel_shape``."""
    y = mode.mark(y)
    if weight is not None:
        w = weight.reshape(channel_shape) if channel_shape else weight
        y = multilinear(mode, torch.mul, [y, w])
    if bias is not None:
        b = bias.reshape(channel_shape) if channel_shape else bias
        y = mode.mark(additive(mode, y, b))
    return y


def _channel_shape(x: torch.Tensor) -> tuple[int, ...]:
    """Return the shape that broadcasts a per-channel vector over ``x`` of shape ``[N, C, *spatial]``."""
    return (-1,) + (1,) * (x.dim() - 2)


def layer_norm(mode: Mode, func: Callable, x: torch.Tensor, normalized_shape: Any, weight: Any = None,
               bias: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor:
    if not mode.is_activation(x):
        return func(x, normalized_shape, weight, bias, *args, **kwargs)
    count = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
    dims = tuple(range(x.dim() - count, x.dim()))
    return _affine(mode, x + x.mean(dims, keepdim=True), weight, bias, None)


def rms_norm(mode: Mode, func: Callable, x: torch.Tensor, normalized_shape: Any, weight: Any = None,
             *args: Any, **kwargs: Any) -> torch.Tensor:
    return layer_norm(mode, func, x, normalized_shape, weight, None)


def group_norm(mode: Mode, func: Callable, x: torch.Tensor, num_groups: int, weight: Any = None,
               bias: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor:
    if not mode.is_activation(x):
        return func(x, num_groups, weight, bias, *args, **kwargs)
    groups = x.reshape(x.shape[0], num_groups, -1)
    y = (groups + groups.mean(-1, keepdim=True)).reshape(x.shape)
    return _affine(mode, y, weight, bias, _channel_shape(x))


def batch_norm(mode: Mode, func: Callable, x: torch.Tensor, running_mean: Any, running_var: Any,
               weight: Any = None, bias: Any = None, training: bool = False, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Surrogate of ``F.batch_norm``: elementwise with running statistics, a mean over the batch without."""
    if not mode.is_activation(x):
        return func(x, running_mean, running_var, weight, bias, training, *args, **kwargs)
    if training or running_mean is None:
        dims = (0,) + tuple(range(2, x.dim()))
        y = x + x.mean(dims, keepdim=True)
    else:
        y = x.clone()
    return _affine(mode, y, weight, bias, _channel_shape(x))


def instance_norm(mode: Mode, func: Callable, x: torch.Tensor, running_mean: Any = None, running_var: Any = None,
                  weight: Any = None, bias: Any = None, use_input_stats: bool = True, *args: Any, **kwargs: Any) -> torch.Tensor:
    if not mode.is_activation(x):
        return func(x, running_mean, running_var, weight, bias, use_input_stats, *args, **kwargs)
    if use_input_stats:
        y = x + x.mean(tuple(range(2, x.dim())), keepdim=True)
    else:
        y = x.clone()
    return _affine(mode, y, weight, bias, _channel_shape(x))
