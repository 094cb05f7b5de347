"""Dask ``sizeof`` for torch tensors.

Without it Dask falls back to ``sys.getsizeof``, which reports a tensor of any size as
a few dozen bytes, so workers never spill tensors and run out of memory. Importing
:mod:`pipeline.storage` registers it.
"""

from __future__ import annotations

import sys

import torch
from dask.sizeof import sizeof


@sizeof.register(torch.Tensor)
def sizeof_tensor(tensor: torch.Tensor) -> int:
    """Return the bytes of the tensor's elements plus the Python object's own size.

    Like Dask's numpy rule, a view counts only its own elements, not its whole storage.
    A meta tensor has no data and counts only the object.
    """
    if tensor.is_meta:
        return sys.getsizeof(tensor)
    return tensor.nbytes + sys.getsizeof(tensor)
