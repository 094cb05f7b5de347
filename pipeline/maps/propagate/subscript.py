"""Exact routing for ``tensor[index]`` when the index is known in Python.

``x[..., [0, 2]]`` reaches the dispatcher as ``aten.index`` with an index tensor on the
meta device, whose values are unknown there, so the dispatch rule would union the whole
axis. At the ``__getitem__`` call the index is still a Python object (ints, slices,
lists, CPU tensors), so it can be applied to a tensor of element positions instead.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.maps.propagate.values import SetValue


def _known(index: Any) -> bool:
    """Return True when ``index`` has no tensor on the meta device."""
    if isinstance(index, torch.Tensor):
        return index.device.type != "meta"
    if isinstance(index, (list, tuple)):
        return all(_known(i) for i in index)
    return True


def exact_getitem(interpreter, func, args):
    """Run ``x[index]`` and, when the index is known, route its sets exactly."""
    out = func(*args)
    x, index = args[0], args[1]
    value = interpreter.value(x)
    if not isinstance(value, SetValue) or not isinstance(out, torch.Tensor) or not _known(index):
        return out
    positions = torch.arange(x.numel(), dtype=torch.int64).reshape(x.shape)
    routed = positions[index]
    if tuple(routed.shape) != tuple(out.shape):
        return out
    result = interpreter.engine.move([(value, tuple(x.shape))], [routed], [tuple(out.shape)])[0]
    interpreter.assign(out, result)
    return out
