"""Row selections for gathers along axis 0, coalesced into runs of consecutive rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch

RowSelection = Union[slice, Sequence[int], torch.Tensor]


@dataclass(frozen=True)
class RowGather:
    """A normalized row selection.

    ``runs`` are half-open ``(start, stop)`` ranges of distinct rows in increasing
    order, each read with one ranged read. ``order`` maps each requested row (in the
    caller's order, duplicates allowed) to its position among the rows that the runs
    read, or is None when the runs already yield the requested order.
    """

    runs: tuple[tuple[int, int], ...]
    order: torch.Tensor | None
    count: int


def plan_row_gather(rows: RowSelection, num_rows: int, *, subject: str) -> RowGather:
    """Normalize ``rows`` against a tensor with ``num_rows`` rows.

    ``rows`` is a slice or a sequence (or 1-D integer tensor) of row indices, where
    negative indices count from the end as in torch indexing. ``subject`` names the
    tensor and file for error messages. Raises IndexError for a row out of range.
    """
    if isinstance(rows, slice):
        start, stop, step = rows.indices(num_rows)
        if step == 1:
            stop = max(start, stop)
            runs = ((start, stop),) if stop > start else ()
            return RowGather(runs=runs, order=None, count=stop - start)
        indices = torch.arange(start, stop, step, dtype=torch.int64)
    else:
        raw = torch.as_tensor(rows)
        if raw.numel() == 0:
            return RowGather(runs=(), order=None, count=0)
        if raw.dim() != 1:
            raise IndexError(f"{subject}: row indices must be 1-D, got shape {list(raw.shape)}")
        if raw.dtype.is_floating_point or raw.dtype.is_complex or raw.dtype == torch.bool:
            raise IndexError(f"{subject}: row indices must be integers, got dtype {raw.dtype}")
        indices = raw.to(torch.int64)

    if indices.numel() == 0:
        return RowGather(runs=(), order=None, count=0)

    out_of_range = (indices < -num_rows) | (indices >= num_rows)
    if bool(out_of_range.any()):
        bad = indices[out_of_range][:5].tolist()
        raise IndexError(
            f"{subject}: row indices {bad} are out of range for {num_rows} rows "
            f"(valid: {-num_rows} to {num_rows - 1})"
        )
    indices = torch.where(indices < 0, indices + num_rows, indices)

    distinct, inverse = torch.unique(indices, sorted=True, return_inverse=True)
    runs = _coalesce(distinct.tolist())
    in_order = distinct.numel() == indices.numel() and bool((inverse[1:] > inverse[:-1]).all())
    return RowGather(runs=runs, order=None if in_order else inverse, count=int(indices.numel()))


def _coalesce(sorted_rows: list[int]) -> tuple[tuple[int, int], ...]:
    runs: list[tuple[int, int]] = []
    start = previous = sorted_rows[0]
    for row in sorted_rows[1:]:
        if row != previous + 1:
            runs.append((start, previous + 1))
            start = row
        previous = row
    runs.append((start, previous + 1))
    return tuple(runs)
