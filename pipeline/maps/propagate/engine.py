"""The primitives that every op rule is built from, each with its forward and backward step.

Forward, a primitive unions input atom sets into its output and records into parameters the
sets of their co-operands. It also appends a backward step to the tape. After the forward
pass the tape runs in reverse and carries output-field sets from the model outputs back to
every activation and parameter.

The primitives:

- :meth:`Engine.einsum` covers elementwise ops (with broadcasting), reductions and
  contractions. Each operand names its axes with letters; an output element depends on
  the operand elements that agree on the shared letters, for every value of the others.
- :meth:`Engine.mix` covers ops whose outputs depend on every element along some axes but
  keep the input shape (softmax, normalisation).
- :meth:`Engine.move` covers data movement (views, cat, slice, pad ...): it applies the op
  to a tensor of element positions, so each output element knows its source.
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import torch

from pipeline.maps.propagate.values import ALL, AxisMap, ParamView, SetValue
from pipeline.maps.sets import SetTable, compress, full

Views = tuple[ParamView, ...]
Operand = Union[SetValue, Views, None]


class Engine:
    """Holds the set table and the backward tape of one set-propagation pass."""

    def __init__(self) -> None:
        self.table = SetTable()
        self.tape: list[Callable[[], None]] = []

    # einsum -----------------------------------------------------------------------------

    def einsum(
        self,
        operands: Sequence[tuple[Operand, str, tuple[int, ...]]],
        out_letters: str,
        out_shape: tuple[int, ...],
    ) -> Operand:
        """Propagate through an op whose dependency structure an einsum string describes.

        ``operands`` contains ``(value, letters, shape)``; letters align with the operand's
        axes. An operand whose size along a letter is 1 while the output's is larger is
        broadcast along it: one element meets every output position on that axis.
        """
        sizes = dict(zip(out_letters, out_shape))
        activations = [(v, l, s) for v, l, s in operands if isinstance(v, SetValue)]
        params = [(v, l, s) for v, l, s in operands if isinstance(v, tuple)]
        if not activations:
            if not params:
                return None
            return tuple(
                derived
                for views, letters, shape in params
                for derived in _derive_views(views, letters, shape, out_letters, out_shape)
            )

        table = self.table
        out_ids = torch.zeros((1,) * len(out_letters), dtype=torch.int64)
        for value, letters, shape in activations:
            reduced = _reduce_to(table, value.ids, letters, shape, out_letters, sizes)
            out_ids = table.union(out_ids, _arrange(reduced, letters, out_letters))
        result = SetValue(compress(out_ids), out_shape)

        co_of_param = []
        for views, letters, shape in params:
            co = torch.zeros((1,) * len(letters), dtype=torch.int64)
            for value, other_letters, other_shape in activations:
                reduced = _reduce_to(table, value.ids, other_letters, other_shape, letters, dict(zip(letters, shape)))
                co = table.union(co, _arrange(reduced, other_letters, letters))
            co = _reduce_broadcast(table, co, letters, shape, sizes)
            roles = [
                "out" if letter in out_letters and not (shape[k] == 1 and sizes[letter] > 1) else "in"
                for k, letter in enumerate(letters)
            ]
            co_of_param.append(co)
            for view in views:
                view.record(table, co, "inputs")
                view.mark_roles(roles)

        def backward() -> None:
            if result.bwd is None:
                return
            grad = result.bwd
            for value, letters, shape in activations:
                back = _reduce_to(table, grad, out_letters, out_shape, letters, dict(zip(letters, shape)))
                back = _reduce_broadcast(table, _arrange(back, out_letters, letters), letters, shape, sizes)
                value.add_bwd(table, back)
            for (views, letters, shape), co in zip(params, co_of_param):
                back = _reduce_to(table, grad, out_letters, out_shape, letters, dict(zip(letters, shape)))
                back = _reduce_broadcast(table, _arrange(back, out_letters, letters), letters, shape, sizes)
                back = without_empty_cooperand(back, co)
                for view in views:
                    view.record(table, back, "outputs")

        self.tape.append(backward)
        return result

    def elementwise(self, operands: Sequence[tuple[Operand, tuple[int, ...]]], out_shape: tuple[int, ...]) -> Operand:
        letters = _letters(len(out_shape))
        aligned = [(value, letters[len(out_shape) - len(shape):], shape) for value, shape in operands]
        return self.einsum(aligned, letters, out_shape)

    # mix --------------------------------------------------------------------------------

    def mix(self, value: Operand, shape: tuple[int, ...], dims: Sequence[int]) -> Operand:
        """Propagate through an op whose every output element depends on all inputs along ``dims``."""
        dims = tuple(d % len(shape) for d in dims) if shape else ()
        if value is None:
            return None
        if isinstance(value, tuple):
            return tuple(_spread_view(view, dims) for view in value)
        table = self.table
        result = SetValue(table.union_reduce(value.ids, dims, keepdim=True), shape)

        def backward() -> None:
            if result.bwd is not None:
                value.add_bwd(table, table.union_reduce(result.bwd, dims, keepdim=True))

        self.tape.append(backward)
        return result

    # move -------------------------------------------------------------------------------

    def move(
        self,
        inputs: Sequence[tuple[SetValue | None, tuple[int, ...]]],
        positions: Sequence[torch.Tensor],
        out_shapes: Sequence[tuple[int, ...]],
    ) -> list[SetValue]:
        """Route sets through a data-movement op.

        ``positions[k]`` holds, for each element of output ``k``, the flat position of its
        source among the concatenated inputs, or -1 where the op wrote a constant.
        """
        table = self.table
        flat_inputs = []
        offsets = []
        offset = 0
        for value, shape in inputs:
            numel = _numel(shape)
            offsets.append(offset)
            offset += numel
            if value is None:
                flat_inputs.append(torch.zeros(numel, dtype=torch.int64))
            else:
                flat_inputs.append(full(value.ids, shape).reshape(-1))
        source = torch.cat([torch.zeros(1, dtype=torch.int64), *flat_inputs])

        results = []
        for pos, shape in zip(positions, out_shapes):
            ids = source[(pos.reshape(-1) + 1)].reshape(shape)
            results.append(SetValue(compress(ids), shape))

        def backward() -> None:
            gathered = torch.zeros(offset + 1, dtype=torch.int64)
            any_bwd = False
            for result, pos in zip(results, positions):
                if result.bwd is None:
                    continue
                any_bwd = True
                grad = full(result.bwd, result.shape).reshape(-1)
                gathered = table.scatter_union(gathered, pos.reshape(-1) + 1, grad)
            if not any_bwd:
                return
            for (value, shape), start in zip(inputs, offsets):
                if value is not None:
                    numel = _numel(shape)
                    value.add_bwd(table, compress(gathered[1 + start: 1 + start + numel].reshape(shape)))

        self.tape.append(backward)
        return results

    def run_backward(self) -> None:
        for step in reversed(self.tape):
            step()
        self.tape.clear()


def without_empty_cooperand(back: torch.Tensor, co: torch.Tensor) -> torch.Tensor:
    """Drop the output fields of parameter elements whose co-operand carries no atom.

    Such an element multiplies (or is added to) a value that no input reaches: a slot a
    scatter never writes, or a constant. It is treated as feeding no output, which is what
    the gradient method sees for structural zeros.

    NOTE: for a non-zero constant co-operand (a weight times a ones buffer) the gradient
    method does see an output; the two methods differ there.
    """
    if not bool((co == 0).any()):
        return back
    shape = torch.broadcast_shapes(back.shape, co.shape)
    return compress(torch.where(co.expand(shape) == 0, torch.zeros((), dtype=torch.int64), back.expand(shape)))


# Layout helpers ---------------------------------------------------------------------------


def _letters(n: int) -> str:
    return "".join(chr(ord("a") + i) for i in range(n))


def _numel(shape: Sequence[int]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def _reduce_to(table: SetTable, ids, letters: str, shape, target: str, target_sizes: dict) -> torch.Tensor:
    """Union ``ids`` over the letters that ``target`` lacks (kept as size-1 axes)."""
    while ids.dim() < len(letters):
        ids = ids.unsqueeze(0)
    dims = tuple(i for i, letter in enumerate(letters) if letter not in target)
    return table.union_reduce(ids, dims, keepdim=True) if dims else ids


def _reduce_broadcast(table: SetTable, ids, letters: str, shape, out_sizes: dict) -> torch.Tensor:
    """Union over the axes where the operand has size 1 but the output does not."""
    dims = tuple(
        i for i, letter in enumerate(letters) if shape[i] == 1 and out_sizes.get(letter, 1) > 1
    )
    return table.union_reduce(ids, dims, keepdim=True) if dims else ids


def _arrange(ids: torch.Tensor, source: str, target: str) -> torch.Tensor:
    """Lay out ``ids`` (axes ``source``, size 1 where not in ``target``) along ``target``."""
    keep = [i for i, letter in enumerate(source) if letter in target]
    for i in reversed(range(len(source))):
        if i not in keep:
            ids = ids.squeeze(i)
    kept_letters = [source[i] for i in keep]
    order = sorted(range(len(kept_letters)), key=lambda k: target.index(kept_letters[k]))
    if order:
        ids = ids.permute(*order)
    placed = [kept_letters[k] for k in order]
    for position, letter in enumerate(target):
        if letter not in placed:
            ids = ids.unsqueeze(position)
    return ids


def _derive_views(views: Views, letters: str, shape, out_letters: str, out_shape) -> Views:
    """Views of a parameter-only op's output: shared letters keep their mapping."""
    derived = []
    for view in views:
        axes = []
        for letter, size in zip(out_letters, out_shape):
            if letter in letters:
                k = letters.index(letter)
                axis = view.axes[k]
                if shape[k] == 1 and size > 1 and axis.param_axis is not None:
                    axis = AxisMap(axis.param_axis, _repeat_index(axis, size))
                axes.append(axis)
            else:
                axes.append(AxisMap(None))
        derived.append(ParamView(view.param, tuple(axes), view.fixed))
    return tuple(derived)


def _repeat_index(axis: AxisMap, size: int):
    if axis.index is ALL:
        return ALL
    base = torch.zeros(1, dtype=torch.int64) if axis.index is None else axis.index[:1]
    return base.expand(size).clone()


def _spread_view(view: ParamView, dims: tuple[int, ...]) -> ParamView:
    axes = list(view.axes)
    for d in dims:
        if axes[d].param_axis is not None:
            axes[d] = AxisMap(axes[d].param_axis, ALL)
    return ParamView(view.param, tuple(axes), view.fixed)
