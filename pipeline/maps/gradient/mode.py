"""The function mode that runs a probe copy: activation tracking, surrogate ops, objective.

An *activation* is a tensor computed from a feature input (a continuous or categorical
input of the schema). Parameters, buffers, auxiliary inputs and tensors built from them
alone are *constants*. The mode tracks which tensors are activations (a taint bit per
tensor object, kept by identity), because the surrogates of
:mod:`pipeline.maps.gradient.table` treat the two differently: a constant added to
an activation must not make it non-zero at the all-absent probe, and a product of two
activations must stay non-zero when only one factor is.

Every floating activation that an op computes from a weight (a parameter, or a constant
computed from parameters) is also added, summed, to the probe objective. The probe copy
has no negative partial derivatives (see the package docstring), so the gradient of the
objective with respect to every product of a weight is at least 1. A parameter's product
therefore counts even when the model never uses it downstream.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

Surrogate = Callable[..., Any]

# Ops whose result never carries the taint of their tensor arguments: they read only the
# shape, dtype or device of their argument.
_SHAPE_ONLY = {
    torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like,
    torch.rand_like, torch.randn_like, torch.randint_like,
    torch.Tensor.new_zeros, torch.Tensor.new_ones, torch.Tensor.new_full,
    torch.Tensor.new_empty, torch.Tensor.new_tensor,
}  # fmt: skip

_FLOATING_CONVERSIONS = {torch.Tensor.float, torch.Tensor.double, torch.Tensor.half, torch.Tensor.bfloat16}


class ProbeMode(TorchFunctionMode):
    """Run a probe copy: mark activations, swap surrogate ops in and collect the objective.

    Enter it inside the function that ``torch.func`` transforms, so that it intercepts the
    model's ops and none of the transform's own bookkeeping.
    """

    def __init__(self, surrogates: dict[Any, Surrogate], dtype: torch.dtype, *, track_negatives: bool = False) -> None:
        super().__init__()
        self.surrogates = surrogates
        self.dtype = dtype
        self._activations: dict[int, weakref.ref] = {}
        self.objective_terms: list[torch.Tensor] = []
        # With track_negatives, every floating activation's most negative value, and the op
        # that computed it: the probe copy is meant to have none below zero.
        self.track_negatives = track_negatives
        self.minimums: list[torch.Tensor] = []
        self.minimum_ops: list[str] = []
        self._current_op = "input"

    # Activation tracking ----------------------------------------------------------------

    def is_activation(self, value: Any) -> bool:
        if not isinstance(value, torch.Tensor):
            return False
        ref = self._activations.get(id(value))
        return ref is not None and ref() is value

    def is_weight(self, value: Any) -> bool:
        """Return whether ``value`` is a constant computed from parameters (it requires grad)."""
        return isinstance(value, torch.Tensor) and value.requires_grad and not self.is_activation(value)

    def mark_input(self, tensor: torch.Tensor) -> None:
        self._activations[id(tensor)] = weakref.ref(tensor)

    def mark(self, value: Any, objective: bool = True) -> Any:
        """Mark every tensor in ``value`` as an activation; with ``objective``, add it to the objective."""
        if isinstance(value, torch.Tensor):
            if not self.is_activation(value):
                self._activations[id(value)] = weakref.ref(value)
                if value.is_floating_point() and value.numel() > 0:
                    if objective:
                        self.objective_terms.append(value.sum())
                    if self.track_negatives:
                        self.minimums.append(value.detach().min())
                        self.minimum_ops.append(self._current_op)
        elif isinstance(value, (tuple, list)):
            for item in value:
                self.mark(item, objective)
        return value

    def follow(self, result: Any, *sources: Any) -> Any:
        """Mark ``result`` as an activation when any of ``sources`` is one; return it."""
        if any(self.is_activation(source) for source in sources):
            self.mark(result)
        return result

    def any_activation(self, args: tuple, kwargs: dict) -> bool:
        for value in args:
            if self._holds_activation(value):
                return True
        for value in kwargs.values():
            if self._holds_activation(value):
                return True
        return False

    def _uses_weight(self, args: tuple, kwargs: dict) -> bool:
        for value in (*args, *kwargs.values()):
            if isinstance(value, (tuple, list)):
                if any(self.is_weight(item) for item in value):
                    return True
            elif self.is_weight(value):
                return True
        return False

    def _holds_activation(self, value: Any) -> bool:
        if isinstance(value, torch.Tensor):
            return self.is_activation(value)
        if isinstance(value, (tuple, list)):
            return any(self.is_activation(item) for item in value)
        return False

    # Dispatch -----------------------------------------------------------------------------

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FLOATING_CONVERSIONS:
            # The probe copy runs in one floating dtype; a cast to float32 would lose the
            # range that products of many positive weights need.
            result = args[0].to(self.dtype)
        elif func is torch.Tensor.to:
            result = func(*_probe_dtype(args, self.dtype), **_probe_dtype_kwargs(kwargs, self.dtype))
        else:
            surrogate = self.surrogates.get(func)
            if surrogate is not None and self.any_activation(args, kwargs):
                self._current_op = _op_name(func)
                result = surrogate(self, func, *args, **kwargs)
                self._add_inplace_term(result, args, True)
                return self.mark(result)
            result = func(*args, **kwargs)

        if func in _SHAPE_ONLY or not self.any_activation(args, kwargs):
            return result
        self._current_op = _op_name(func)
        objective = self._uses_weight(args, kwargs)
        if func is torch.Tensor.__setitem__:
            self._add_inplace_term(args[0], args, objective)
            self.mark(args[0], objective)
            return result
        self._add_inplace_term(result, args, objective)
        return self.mark(result, objective)

    def _add_inplace_term(self, result: Any, args: tuple, objective: bool) -> None:
        """Add the new value of an activation that an op changed in place to the objective.

        ``mark`` adds a tensor object once, so without this the value after the change
        would count only through later ops.
        """
        changed_in_place = bool(args) and result is args[0] and self.is_activation(result)
        if objective and changed_in_place and result.is_floating_point():
            self.objective_terms.append(result.sum())


def _op_name(func: Any) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)


def _probe_dtype(args: tuple, dtype: torch.dtype) -> tuple:
    return tuple(dtype if isinstance(a, torch.dtype) and a.is_floating_point else a for a in args)


def _probe_dtype_kwargs(kwargs: dict, dtype: torch.dtype) -> dict:
    found = kwargs.get("dtype")
    if isinstance(found, torch.dtype) and found.is_floating_point:
        return {**kwargs, "dtype": dtype}
    return kwargs
