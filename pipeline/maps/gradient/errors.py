"""Errors of the gradient method."""

from __future__ import annotations


class GradientMapError(RuntimeError):
    """The gradient method cannot map this model. The message names the op or parameter."""
