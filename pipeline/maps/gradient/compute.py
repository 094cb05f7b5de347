"""Compute the gradient interaction map: vectorised with ``torch.func``, or one probe at a time.

Input map: for each input atom, the gradient of the probe objective (the sum of every
product of a parameter in the probe copy) with respect to every parameter, at the probe
where only that atom is present. An element touches the atom iff its gradient is
non-zero. The vectorised form is ``vmap(grad(objective))`` over a chunk of probes.

Output map: the vector-Jacobian product of each output field (a cotangent of ones on
that field, zeros elsewhere) with respect to every parameter, at the present point. An
element feeds the field iff its entry is non-zero. The vectorised form is ``vmap`` of
the ``vjp`` function over a chunk of fields.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

import torch
from torch.func import grad, vjp, vmap

from pipeline.maps.gradient.errors import GradientMapError
from pipeline.maps.gradient.probes import atom_probes, present_inputs
from pipeline.maps.gradient.sanitise import ProbeCopy, make_probe_copy
from pipeline.maps.interaction import InteractionMap, MapError, ParamMap
from pipeline.maps.sets import SetTable, compress
from pipeline.schema import Atom, FeatureSchema

logger = logging.getLogger(__name__)

Gradients = dict[str, torch.Tensor]


def gradient_map(module: torch.nn.Module, schema: FeatureSchema, *, seed: int = 0, chunk_size: int = 64,
                 dtype: torch.dtype = torch.float64) -> InteractionMap:
    """Compute the interaction map of ``module`` with the gradient method, vectorised.

    ``chunk_size`` probes (or output fields) share one vectorised pass, so memory grows
    with ``chunk_size`` times the number of parameter elements. ``seed`` fixes the
    positive weights of the probe copy. The module is not modified; a module on the meta
    device is first copied to the CPU with fresh initialisation.
    """
    return _compute(module, schema, seed=seed, chunk_size=chunk_size, dtype=dtype, vectorised=True)


def loop_gradient_map(module: torch.nn.Module, schema: FeatureSchema, *, seed: int = 0,
                      dtype: torch.dtype = torch.float64) -> InteractionMap:
    """Compute the same map as :func:`gradient_map` with one backward pass per probe and field."""
    return _compute(module, schema, seed=seed, chunk_size=1, dtype=dtype, vectorised=False)


def _compute(module: torch.nn.Module, schema: FeatureSchema, *, seed: int, chunk_size: int,
             dtype: torch.dtype, vectorised: bool) -> InteractionMap:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    started = time.perf_counter()
    probe = make_probe_copy(module, schema, seed=seed, dtype=dtype)
    input_atoms = schema.input_atoms()
    output_atoms = schema.output_atoms()

    touches = _input_map(probe, input_atoms, chunk_size, vectorised)
    feeds = _output_map(probe, len(output_atoms), chunk_size, vectorised)
    result = _assemble(probe, input_atoms, output_atoms, touches, feeds)
    logger.info(
        "gradient map (%s): %d parameters, %d input atoms, %d output fields in %.2f s",
        "vectorised" if vectorised else "loop", len(probe.shapes), len(input_atoms),
        len(output_atoms), time.perf_counter() - started,
    )
    return result


# Input map --------------------------------------------------------------------------------


def _objective(probe: ProbeCopy) -> Callable:
    def objective(params: Gradients, features: dict[str, torch.Tensor]) -> torch.Tensor:
        mode, _ = probe.run(params, features)
        if not mode.objective_terms:
            return torch.zeros((), dtype=probe.dtype)
        return torch.stack(mode.objective_terms).sum()

    return objective


def _input_map(probe: ProbeCopy, atoms: Sequence[Atom], chunk_size: int, vectorised: bool) -> Gradients:
    """Return, per parameter, a boolean tensor ``[len(atoms), *shape]``: the atoms each element touches."""
    objective = _objective(probe)
    # The all-absent probe goes first: its gradient must be zero (see _absent_gradients).
    probes: list[Atom | None] = [None, *atoms]
    baseline: Gradients | None = None
    chunks: list[Gradients] = []
    for start in range(0, len(probes), chunk_size):
        chunk = probes[start:start + chunk_size]
        if vectorised:
            gradients = _vectorised_chunk(probe, objective, chunk)
        else:
            gradients = _loop_chunk(probe, objective, chunk)
        if baseline is None:
            baseline = _absent_gradients({name: g[0] for name, g in gradients.items()})
            gradients = {name: g[1:] for name, g in gradients.items()}
        # Convert to booleans at once, so memory keeps one chunk of float gradients at a time.
        chunks.append({name: _touched(name, g, baseline.get(name)) for name, g in gradients.items()})
        logger.debug("input map: probes %d-%d of %d done", start, start + len(chunk) - 1, len(probes))
    return {name: torch.cat([c[name] for c in chunks]) for name in probe.params}


def _vectorised_chunk(probe: ProbeCopy, objective: Callable, chunk: list[Atom | None]) -> Gradients:
    features = atom_probes(probe.schema, chunk, probe.dtype)
    try:
        return vmap(grad(objective), in_dims=(None, 0))(probe.params, features)
    except RuntimeError as e:
        # vmap has no batching rule for some ops, and it rejects in-place writes of a probe
        # value into a constant tensor. The loop computes the same gradients.
        logger.warning("vectorised probes failed (%s); computing this chunk one probe at a time", e)
        return _loop_chunk(probe, objective, chunk)


def _loop_chunk(probe: ProbeCopy, objective: Callable, chunk: list[Atom | None]) -> Gradients:
    rows: list[Gradients] = []
    for atom in chunk:
        features = {name: values[0] for name, values in atom_probes(probe.schema, [atom], probe.dtype).items()}
        leaves = {name: value.clone().requires_grad_(True) for name, value in probe.params.items()}
        rows.append(_backward(objective(leaves, features), leaves))
    return {name: torch.stack([row[name] for row in rows]) for name in probe.params}


def _backward(total: torch.Tensor | list[torch.Tensor], leaves: Gradients, grad_outputs=None) -> Gradients:
    outputs = total if isinstance(total, (tuple, list)) else [total]
    if not any(t.requires_grad for t in outputs):
        return {name: torch.zeros_like(value) for name, value in leaves.items()}
    found = torch.autograd.grad(outputs, list(leaves.values()), grad_outputs=grad_outputs,
                                retain_graph=grad_outputs is not None, allow_unused=True)
    return {
        name: torch.zeros_like(value) if g is None else g.detach()
        for (name, value), g in zip(leaves.items(), found)
    }


def _absent_gradients(gradients: Gradients) -> Gradients:
    """Return the parameters whose gradient at the all-absent probe is non-zero, with that gradient.

    Where every activation is zero at that probe, every gradient there is zero. A
    non-zero one means that some activation is non-zero with every input absent (a
    constant concatenated to an activation, or an op that maps 0 elsewhere), so that
    parameter's probes are compared with the all-absent probe instead of with zero.
    """
    found = {}
    for name, gradient in gradients.items():
        if bool((gradient != 0).any()):
            logger.warning(
                "parameter %r has a non-zero gradient at the all-absent probe; its map compares "
                "each probe with that probe and can over-approximate", name,
            )
            found[name] = gradient
    return found


def _touched(name: str, gradients: torch.Tensor, baseline: torch.Tensor | None) -> torch.Tensor:
    """Turn ``[probes, *shape]`` gradients into booleans: non-zero, or different from ``baseline``."""
    if not bool(torch.isfinite(gradients).all()):
        raise GradientMapError(
            f"parameter {name!r} has a non-finite probe gradient; an op of the model has no "
            "surrogate in the probe copy and divides by zero or overflows there"
        )
    if baseline is not None:
        return gradients != baseline
    return gradients != 0


# Output map -------------------------------------------------------------------------------


def _output_map(probe: ProbeCopy, n_fields: int, chunk_size: int, vectorised: bool) -> Gradients:
    """Return, per parameter, a boolean tensor ``[fields, *shape]``: the output fields each element feeds."""
    present = present_inputs(probe.schema, probe.dtype)
    if vectorised:
        gradients = _vectorised_outputs(probe, present, n_fields, chunk_size)
    else:
        gradients = _loop_outputs(probe, present, n_fields)
    for name, values in gradients.items():
        if not bool(torch.isfinite(values).all()):
            raise GradientMapError(
                f"parameter {name!r} has a non-finite output gradient; an op of the model has "
                "no surrogate in the probe copy and divides by zero or overflows there"
            )
    return {name: values != 0 for name, values in gradients.items()}


def _output_tensors(probe: ProbeCopy, params: Gradients, present: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    mode, outputs = probe.run(params, present, track_negatives=True)
    _warn_negative(mode)
    tensors = []
    for spec in probe.schema.outputs:
        tensor = outputs[spec.name]
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise MapError(f"output {spec.name!r} is not a floating tensor; the gradient method needs one")
        if tensor.dim() == 0 or tensor.shape[-1] != len(spec.fields):
            raise MapError(
                f"output {spec.name!r} has shape {list(tensor.shape)}, but the schema names "
                f"{len(spec.fields)} fields for its last axis; make them agree"
            )
        tensors.append(tensor)
    return tuple(tensors)


def _warn_negative(mode) -> None:
    """Log the ops after which an activation of the probe copy went negative at the present point.

    The surrogates keep activations non-negative for non-negative inputs, so a negative
    value comes from an op outside the table that changes sign. Sums through such an op
    can cancel, and the map can then miss an interaction.
    """
    if not mode.minimums:
        return
    negative = (torch.stack(mode.minimums) < 0).tolist()
    ops = sorted({op for op, found in zip(mode.minimum_ops, negative) if found})
    if ops:
        logger.warning(
            "the probe copy produced negative activations after %s; the gradient map can miss "
            "interactions through these ops", ops,
        )


def _field_cotangents(shapes: list[torch.Size], fields: list[tuple[int, int]]) -> tuple[torch.Tensor, ...]:
    """Build one cotangent per field in ``fields`` ((output, field) pairs), stacked on a new first axis."""
    cotangents = tuple(torch.zeros(len(fields), *shape, dtype=torch.float64) for shape in shapes)
    for row, (output, field) in enumerate(fields):
        cotangents[output][row, ..., field] = 1.0
    return cotangents


def _all_fields(probe: ProbeCopy) -> list[tuple[int, int]]:
    return [(o, f) for o, spec in enumerate(probe.schema.outputs) for f in range(len(spec.fields))]


def _vectorised_outputs(probe: ProbeCopy, present: dict[str, torch.Tensor], n_fields: int, chunk_size: int) -> Gradients:
    primals, vjp_fn = vjp(lambda params: _output_tensors(probe, params, present), probe.params)
    shapes = [p.shape for p in primals]
    fields = _all_fields(probe)
    chunks: list[Gradients] = []
    for start in range(0, n_fields, chunk_size):
        cotangents = _field_cotangents(shapes, fields[start:start + chunk_size])
        cotangents = tuple(c.to(probe.dtype) for c in cotangents)
        (gradients,) = vmap(vjp_fn)(cotangents)
        chunks.append(gradients)
    if not chunks:
        return {name: torch.zeros(0, *value.shape, dtype=probe.dtype) for name, value in probe.params.items()}
    return {name: torch.cat([c[name] for c in chunks]) for name in probe.params}


def _loop_outputs(probe: ProbeCopy, present: dict[str, torch.Tensor], n_fields: int) -> Gradients:
    leaves = {name: value.clone().requires_grad_(True) for name, value in probe.params.items()}
    tensors = _output_tensors(probe, leaves, present)
    rows: list[Gradients] = []
    for field in _all_fields(probe):
        cotangents = [c[0].to(probe.dtype) for c in _field_cotangents([t.shape for t in tensors], [field])]
        used = [(t, c) for t, c in zip(tensors, cotangents) if t.requires_grad]
        if not used:
            rows.append({name: torch.zeros_like(value) for name, value in leaves.items()})
            continue
        outputs, grad_outputs = zip(*used)
        rows.append(_backward(list(outputs), leaves, grad_outputs=list(grad_outputs)))
    if not rows:
        return {name: torch.zeros(0, *value.shape, dtype=probe.dtype) for name, value in probe.params.items()}
    return {name: torch.stack([row[name] for row in rows]) for name in probe.params}


# Assembly ---------------------------------------------------------------------------------

_WORD_BITS = 63  # atoms per int64 word, leaving the sign bit unused


def _assemble(probe: ProbeCopy, input_atoms: list[Atom], output_atoms: list[Atom],
              touches: Gradients, feeds: Gradients) -> InteractionMap:
    """Intern the per-element atom sets and store them in reduced form.

    This does what ``InteractionMap.from_dense`` does, but packs each element's atoms into
    int64 words first, so it never builds a boolean tensor of shape ``[*shape, atoms]``.
    """
    table = SetTable()
    params: dict[str, ParamMap] = {}
    for name, shape in probe.shapes.items():
        if name in touches:
            input_ids = _intern_packed(table, touches[name], offset=0)
            output_ids = _intern_packed(table, feeds[name], offset=len(input_atoms))
        else:
            input_ids = output_ids = torch.zeros(shape, dtype=torch.int64)
        params[name] = ParamMap(tuple(shape), compress(input_ids), compress(output_ids))
    return InteractionMap(input_atoms + output_atoms, table, params, "gradient", probe.schema, dict(probe.tied))


def _intern_packed(table: SetTable, members: torch.Tensor, offset: int) -> torch.Tensor:
    """Intern the set of each element of ``members`` (``[atoms, *shape]`` booleans); return ids ``[*shape]``."""
    count, shape = members.shape[0], members.shape[1:]
    if count == 0:
        return torch.zeros(shape, dtype=torch.int64)
    flat = members.reshape(count, -1).to(torch.int64)
    powers = torch.tensor([1 << bit for bit in range(_WORD_BITS)], dtype=torch.int64)
    # Distinct powers of two sum to their bitwise OR, and 63 of them never overflow.
    words = [
        (flat[start:start + _WORD_BITS] * powers[:min(_WORD_BITS, count - start), None]).sum(0)
        for start in range(0, count, _WORD_BITS)
    ]
    if len(words) == 1:
        unique, inverse = torch.unique(words[0], return_inverse=True)
        unique = unique.unsqueeze(1)
    else:
        unique, inverse = torch.unique(torch.stack(words, 1), dim=0, return_inverse=True)
    ids = []
    for row in unique.tolist():
        bits = 0
        for position, word in enumerate(row):
            bits |= word << (position * _WORD_BITS)
        ids.append(table.intern(bits << offset))
    return torch.tensor(ids, dtype=torch.int64)[inverse].reshape(shape)
