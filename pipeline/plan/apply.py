"""Apply a plan to tensors: one parameter at a time, a whole state dict, or optimizer state.

:func:`apply_param` is the unit of work. It reads old tensors only through the
``read_old(name)`` callback, so a distributed job can call it tensor by tensor with a
reader backed by its shards. It reads the parameter's source and, for a folded bias, the
old weights it folds.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

import torch

from pipeline.plan.model import ParamPlan, Plan, PlanError, range_indices
from pipeline.plan.rules import region_values

logger = logging.getLogger(__name__)

ReadOld = Callable[[str], torch.Tensor]


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise PlanError(f"plan dtype {name!r} is not a torch dtype")
    return dtype


def apply_param(
    pp: ParamPlan,
    read_old: ReadOld,
    *,
    device: str | torch.device | None = None,
    moments: bool = False,
) -> torch.Tensor:
    """Build one new tensor from the plan of one parameter.

    ``read_old(name)`` returns an old tensor by name. With ``moments`` the tensor is an
    optimizer moment (Adam's ``exp_avg``): it follows the same gathers without Net2Net
    scaling, new elements are 0 and nothing is folded.
    """
    if pp.tied_to is not None:
        raise PlanError(f"tensor {pp.name!r} is tied to {pp.tied_to!r}; apply the plan of {pp.tied_to!r} instead")
    dtype = _torch_dtype(pp.dtype)
    old = read_old(pp.source) if pp.source is not None else None
    if device is None and old is not None:
        device = old.device
    out = torch.zeros(pp.shape, dtype=dtype, device=device)
    if old is not None:
        if tuple(old.shape) != pp.source_shape:
            raise PlanError(
                f"tensor {pp.source!r} has shape {list(old.shape)} but the plan for {pp.name!r} expects "
                f"{list(pp.source_shape)}; the checkpoint does not match the plan's old model"
            )
        _place(out, old.to(device), pp, scaled=not moments)
    for region in pp.regions:
        index = [torch.tensor(range_indices(ranges), dtype=torch.int64) for ranges in region.box]
        if moments:
            values = torch.zeros(tuple(len(ix) for ix in index))
        else:
            values = region_values(region, index, out)
        _write(out, index, values.to(dtype=dtype, device=out.device))
    if not moments:
        for fold in pp.folds:
            _fold(out, pp, fold, read_old)
    return out


def _place(out: torch.Tensor, old: torch.Tensor, pp: ParamPlan, scaled: bool) -> None:
    """Copy or gather the mapped elements of ``old`` into ``out``."""
    if not pp.axes:
        out.copy_(old.to(out.dtype).reshape(out.shape))
        return
    source = old
    targets: list[torch.Tensor | None] = []
    for axis, plan in enumerate(pp.axes):
        if plan.is_identity(old.shape[axis]):
            targets.append(None)
            continue
        new_positions, old_positions = plan.mapped()
        if new_positions.numel() == 0:
            return
        if not (old_positions.numel() == old.shape[axis] and bool((old_positions == torch.arange(old.shape[axis])).all())):
            source = source.index_select(axis, old_positions.to(old.device))
        targets.append(new_positions)
    if scaled and any(a.scale for a in pp.axes):
        source = source.to(torch.float64)
        for axis, plan in enumerate(pp.axes):
            vector = plan.scale_vector()
            if vector is None:
                continue
            new_positions, _ = plan.mapped()
            factors = vector[new_positions].to(source.device)
            shape = [1] * source.dim()
            shape[axis] = -1
            source = source * factors.reshape(shape)
    source = source.to(out.dtype)
    index = [t if t is not None else torch.arange(out.shape[axis]) for axis, t in enumerate(targets)]
    _write(out, index, source)


def _write(out: torch.Tensor, index: Sequence[torch.Tensor], values: torch.Tensor) -> None:
    """Write ``values`` into the Cartesian product of ``index`` (one index tensor per axis).

    Contiguous index ranges on every axis are written as one slice; otherwise through
    broadcast advanced indexing, which never builds the full product of indices.
    """
    if out.dim() == 0:
        out.copy_(values.reshape(()))
        return
    slices = []
    for axis, ix in enumerate(index):
        n = ix.numel()
        if n == 0:
            return
        start = int(ix[0])
        if bool((ix == torch.arange(start, start + n)).all()):
            slices.append(slice(start, start + n))
        else:
            slices.append(None)
    if all(s is not None for s in slices):
        out[tuple(slices)] = values
        return
    grids = []
    for axis, ix in enumerate(index):
        shape = [1] * out.dim()
        shape[axis] = -1
        grids.append(ix.to(out.device).reshape(shape))
    out[tuple(grids)] = values


def _fold(out: torch.Tensor, pp: ParamPlan, fold, read_old: ReadOld) -> None:
    """Add ``sum_j W[:, j] * c_j`` of the removed constant columns to the mapped bias elements."""
    weight = read_old(fold.weight).detach().to("cpu", torch.float64)
    columns = torch.tensor(fold.columns, dtype=torch.int64)
    constants = torch.tensor(fold.constants, dtype=torch.float64)
    shape = [1] * weight.dim()
    shape[fold.in_axis] = -1
    added = (weight.index_select(fold.in_axis, columns) * constants.reshape(shape)).sum(dim=fold.in_axis)
    new_positions, old_positions = pp.axes[0].mapped()
    current = out[new_positions].to("cpu", torch.float64)
    out[new_positions.to(out.device)] = (current + added[old_positions]).to(out.dtype).to(out.device)


def apply_plan(
    plan: Plan,
    old_state: Mapping[str, torch.Tensor],
    *,
    device: str | torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Apply a plan to an old state dict in memory and return the new state dict.

    Tied tensors share one tensor object, as ``module.state_dict()`` returns them.
    """
    missing = sorted({pp.source for pp in plan.params if pp.source and pp.source not in old_state}
                     | {f.weight for pp in plan.params for f in pp.folds if f.weight not in old_state})
    if missing:
        raise PlanError(f"the old state dict lacks {missing}, which the plan reads; is it the plan's old model?")

    def read_old(name: str) -> torch.Tensor:
        return old_state[name].detach()

    out: dict[str, torch.Tensor] = {}
    for pp in plan.params:
        if pp.tied_to is None:
            out[pp.name] = apply_param(pp, read_old, device=device)
    for pp in plan.params:
        if pp.tied_to is not None:
            out[pp.name] = out[pp.tied_to]
    return {pp.name: out[pp.name] for pp in plan.params}


def apply_optimizer_state(
    plan: Plan,
    state: Mapping[str, Any],
    old_names: Sequence[str],
    new_names: Sequence[str],
) -> dict[str, Any]:
    """Carry an optimizer state dict (Adam, AdamW, SGD with momentum) through the plan.

    ``old_names[i]`` is the parameter name of optimizer index ``i`` in ``state``, and
    ``new_names`` lists the new model's parameters in the order of the new optimizer (for
    ``Adam(model.parameters())``, the order of ``named_parameters()``). Per-parameter
    tensors shaped like the parameter (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``,
    ``momentum_buffer``) follow the plan's gathers, with 0 for new elements. Other entries,
    such as ``step``, are kept. New parameters without a source get no state, so the
    optimizer starts them fresh. Each new parameter joins the group of its source, or the
    first group when it has none.
    """
    if "state" not in state or "param_groups" not in state:
        raise PlanError("an optimizer state dict needs 'state' and 'param_groups'")
    old_index = {name: i for i, name in enumerate(old_names)}
    group_of: dict[int, int] = {}
    for g, group in enumerate(state["param_groups"]):
        for i in group["params"]:
            group_of[int(i)] = g
    if len(old_names) != len(group_of):
        raise PlanError(
            f"old_names has {len(old_names)} names but the optimizer state has {len(group_of)} parameters; "
            "pass the names in the optimizer's parameter order"
        )
    plans = {pp.name: pp for pp in plan.params}
    new_state: dict[int, dict[str, Any]] = {}
    groups: list[list[int]] = [[] for _ in state["param_groups"]]
    for j, name in enumerate(new_names):
        pp = plans.get(name)
        if pp is None:
            raise PlanError(f"new parameter {name!r} is not in the plan")
        if pp.tied_to is not None:
            pp = plans[pp.tied_to]
        source_index = old_index.get(pp.source) if pp.source else None
        groups[group_of.get(source_index, 0) if source_index is not None else 0].append(j)
        if source_index is None or source_index not in state["state"]:
            continue
        entry = state["state"][source_index]
        carried: dict[str, Any] = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and tuple(value.shape) == pp.source_shape and value.dim() > 0:
                carried[key] = apply_param(pp, lambda _name, v=value: v, moments=True)
            elif isinstance(value, torch.Tensor):
                carried[key] = value.clone()
            else:
                carried[key] = value
        new_state[j] = carried
    param_groups = []
    for group, members in zip(state["param_groups"], groups):
        copied = {k: v for k, v in group.items() if k != "params"}
        copied["params"] = members
        param_groups.append(copied)
    return {"state": new_state, "param_groups": param_groups}
