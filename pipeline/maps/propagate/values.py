"""Values that the set interpreter attaches to tensors.

Three kinds of tensor flow through a model during set propagation:

- activations, which carry a :class:`SetValue`: reduced set ids forward, and the reduced
  output-field ids that flow back to them;
- parameters and tensors derived from them by views (``t``, ``split``, ``select`` ...),
  which carry a tuple of :class:`ParamView`: which elements of which parameter they are;
- constants (buffers, ``arange``, masks made in ``forward``), which carry nothing.

A :class:`ParamView` maps each view axis to one parameter axis, with an optional index
vector, so recording into a ``[16384, 4096]`` weight through its transpose never builds a
per-element index tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pipeline.maps.sets import SetTable, compress

ALL = "all"  # a view axis whose positions may stand for any index of its parameter axis


class SetValue:
    """Set ids of one activation: ``ids`` forward, ``bwd`` for output fields (reduced form)."""

    __slots__ = ("ids", "bwd", "shape")

    def __init__(self, ids: torch.Tensor, shape: tuple[int, ...]) -> None:
        self.shape = tuple(shape)
        while ids.dim() < len(self.shape):
            ids = ids.unsqueeze(0)
        self.ids = ids
        self.bwd: torch.Tensor | None = None

    def add_bwd(self, table: SetTable, ids: torch.Tensor) -> None:
        while ids.dim() < len(self.shape):
            ids = ids.unsqueeze(0)
        self.bwd = ids if self.bwd is None else table.union(self.bwd, ids)


@dataclass
class ParamRecord:
    """The map of one parameter as it is being built: reduced input and output ids."""

    name: str
    shape: tuple[int, ...]
    inputs: torch.Tensor = field(default=None)  # type: ignore[assignment]
    outputs: torch.Tensor = field(default=None)  # type: ignore[assignment]
    roles: list[set[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        empty = torch.zeros((1,) * len(self.shape), dtype=torch.int64)
        self.inputs = empty
        self.outputs = empty.clone()
        self.roles = [set() for _ in self.shape]


@dataclass(frozen=True)
class AxisMap:
    """How one view axis maps onto the parameter.

    ``param_axis`` is None for an axis the view added (unsqueeze, broadcast); ``index`` is
    None for the identity over the whole parameter axis, a 1-D tensor of parameter indices,
    or :data:`ALL` when the view's positions may stand for any index.
    """

    param_axis: int | None
    index: torch.Tensor | str | None = None


@dataclass(frozen=True)
class ParamView:
    """The elements of one parameter that a tensor contains."""

    param: ParamRecord
    axes: tuple[AxisMap, ...]
    fixed: tuple[tuple[int, int], ...] = ()

    @classmethod
    def whole(cls, param: ParamRecord) -> "ParamView":
        return cls(param, tuple(AxisMap(p) for p in range(len(param.shape))))

    def mark_roles(self, view_roles: list[str]) -> None:
        """Note for each parameter axis whether a use contracts it ("in") or keeps it ("out").

        Parameter axes that no view axis maps (reduced away) count as contracted.
        """
        mapped = set()
        for axis, role in zip(self.axes, view_roles):
            if axis.param_axis is not None:
                self.param.roles[axis.param_axis].add(role)
                mapped.add(axis.param_axis)
        fixed = {p for p, _ in self.fixed}
        for p in range(len(self.param.shape)):
            if p not in mapped and p not in fixed:
                self.param.roles[p].add("in")

    def record(self, table: SetTable, ids: torch.Tensor, side: str) -> None:
        """Union ``ids`` (reduced, in view layout) into the parameter's ``side`` map."""
        while ids.dim() < len(self.axes):
            ids = ids.unsqueeze(0)
        param_rank = len(self.param.shape)

        # Axes the view added carry no parameter index: the element meets all of them.
        added = [v for v, a in enumerate(self.axes) if a.param_axis is None]
        if added:
            ids = table.union_reduce(ids, tuple(added), keepdim=True)
        for v, axis in enumerate(self.axes):
            if axis.index is ALL or (isinstance(axis.index, torch.Tensor) and _all_same(axis.index)):
                ids = table.union_reduce(ids, v, keepdim=True)

        mapped = [(v, a) for v, a in enumerate(self.axes) if a.param_axis is not None]
        order = sorted(mapped, key=lambda item: item[1].param_axis)
        ids = ids.permute(*[v for v, _ in order], *added) if ids.dim() else ids
        for _ in added:
            ids = ids.squeeze(-1)
        # ids is now laid out by parameter axis for the mapped axes; insert the others.
        layout = [a.param_axis for _, a in order]
        for p in range(param_rank):
            if p not in layout:
                ids = ids.unsqueeze(p)

        index: list[torch.Tensor | slice] = [slice(None)] * param_rank
        explicit = False
        for _, axis in order:
            p = axis.param_axis
            if isinstance(axis.index, torch.Tensor):
                if _all_same(axis.index):
                    index[p] = axis.index[:1]
                else:
                    ids, index[p] = _group_repeats(table, ids, p, axis.index)
                explicit = True
            elif axis.index is ALL:
                index[p] = slice(None)
        for p, position in self.fixed:
            index[p] = torch.tensor([position])
            explicit = True

        current = getattr(self.param, side)
        if not explicit:
            setattr(self.param, side, table.union(current, ids))
            return

        target = []
        for p in range(param_rank):
            if isinstance(index[p], torch.Tensor) or ids.shape[p] > 1:
                target.append(self.param.shape[p])
            else:
                target.append(current.shape[p])
        expanded = current.expand(target).clone()
        tensors = [i for i in index if isinstance(i, torch.Tensor)]
        grid = _open_grid(index, target)
        selected = expanded[grid]
        merged = table.union(selected, ids.expand(selected.shape) if ids.dim() else ids)
        expanded[grid] = merged.expand(selected.shape)
        del tensors
        setattr(self.param, side, compress(expanded))


def _group_repeats(table: SetTable, ids: torch.Tensor, axis: int, index: torch.Tensor):
    """Union the entries of ``ids`` that a repeated parameter index sends to one element."""
    unique, inverse = torch.unique(index, return_inverse=True)
    if unique.numel() == index.numel() or ids.shape[axis] == 1:
        return ids, index
    parts = []
    for k in range(unique.numel()):
        positions = (inverse == k).nonzero().reshape(-1)
        parts.append(table.union_reduce(ids.index_select(axis, positions), axis, keepdim=True))
    return torch.cat(parts, dim=axis), unique


def _all_same(index: torch.Tensor) -> bool:
    return index.numel() > 1 and bool((index == index[0]).all())


def _open_grid(index: list, target: list[int]) -> tuple:
    """Turn per-axis index vectors and slices into a broadcasting advanced index."""
    rank = len(index)
    out = []
    for p, entry in enumerate(index):
        vector = torch.arange(target[p]) if isinstance(entry, slice) else entry
        shape = [1] * rank
        shape[p] = vector.numel()
        out.append(vector.reshape(shape))
    return tuple(out)
