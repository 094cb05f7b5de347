"""The set-propagation method: one pass over the model on the meta device.

See :mod:`pipeline.maps.propagate.interpreter` for the call order and
:mod:`pipeline.maps.sets` for how sets are stored.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn
from torch.func import functional_call

from pipeline.maps.interaction import InteractionMap, MapError, ParamMap
from pipeline.maps.propagate import rules  # noqa: F401  (registers the op rules)
from pipeline.maps.propagate.interpreter import (
    Interpreter,
    ModulePathHooks,
    PropagationError,
    RecurrenceMode,
    SetDispatchMode,
    UnsupportedOpError,
)
from pipeline.maps.propagate.values import SetValue
from pipeline.maps.sets import compress
from pipeline.models.spec import named_outputs
from pipeline.schema import FeatureSchema

logger = logging.getLogger(__name__)

__all__ = ["set_map", "UnsupportedOpError", "PropagationError"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}


def set_map(module: nn.Module, schema: FeatureSchema, *, batch_size: int = 2) -> InteractionMap:
    """Compute the interaction map of ``module`` by propagating atom sets through it once.

    The module's own parameters are never read: the pass runs on meta copies of them, so
    the map depends only on the architecture and the schema, and a module built on the
    meta device works as well as a trained one.
    """
    started = time.perf_counter()
    atoms = schema.input_atoms() + schema.output_atoms()
    atom_index = {atom: i for i, atom in enumerate(atoms)}

    interpreter = Interpreter()
    table = interpreter.table
    interpreter.vocab_atoms = {
        v: [atom_index[a] for a in atoms if a.kind == "category" and a.source == v]
        for v in schema.used_vocabularies()
    }
    interpreter.vocab_masks = {v: sum(1 << i for i in ids) for v, ids in interpreter.vocab_atoms.items()}
    interpreter.category_mask = sum(interpreter.vocab_masks.values())

    meta_state, names = _meta_state(module)
    interpreter.register_params(_Holder(meta_state, names))
    inputs = _meta_inputs(interpreter, schema, batch_size, atom_index)

    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), ModulePathHooks(interpreter, module), RecurrenceMode(interpreter), SetDispatchMode(interpreter):
            result = functional_call(module, meta_state, args=(), kwargs=inputs, tie_weights=True, strict=False)
    finally:
        module.train(was_training)

    outputs = named_outputs(result, schema)
    for spec in schema.outputs:
        tensor = outputs[spec.name]
        if tensor.shape[-1] != len(spec.fields):
            raise MapError(
                f"output {spec.name!r} has {tensor.shape[-1]} values on its last axis but the "
                f"schema names {len(spec.fields)} fields; make them agree"
            )
        value = interpreter.value(tensor)
        if not isinstance(value, SetValue):
            logger.warning("output %r does not depend on any input", spec.name)
            continue
        ids = torch.tensor([table.intern(1 << atom_index[a]) for a in _output_atoms(spec)])
        value.add_bwd(table, ids.reshape((1,) * (tensor.dim() - 1) + (-1,)))
    interpreter.engine.run_backward()

    params = {
        name: ParamMap(
            record.shape,
            compress(record.inputs),
            compress(record.outputs),
            tuple("+".join(sorted(r)) for r in record.roles),
        )
        for name, record in interpreter.params.items()
    }
    logger.info("set map: %d parameters, %d distinct sets in %.2f s", len(params), len(table), time.perf_counter() - started)
    return InteractionMap(atoms, table, params, "sets", schema, _tied_names(module))


class _Holder(nn.Module):
    """Lets the interpreter register meta parameters under the module's names and ties."""

    def __init__(self, state: dict[str, torch.Tensor], names: list[str]) -> None:
        super().__init__()
        self._state = state
        self._names = names

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        for name in self._names:
            yield name, self._state[name]


def _meta_state(module: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Meta stand-ins for every parameter and buffer; tied parameters share one tensor."""
    state: dict[str, torch.Tensor] = {}
    by_id: dict[int, torch.Tensor] = {}
    names: list[str] = []
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) not in by_id:
            by_id[id(param)] = torch.empty(param.shape, dtype=param.dtype, device="meta")
        state[name] = by_id[id(param)]
        names.append(name)
    for name, buffer in module.named_buffers(remove_duplicate=False):
        state[name] = torch.empty(buffer.shape, dtype=buffer.dtype, device="meta")
    return state, names


def _tied_names(module: nn.Module) -> dict[str, str]:
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in first:
            tied[name] = first[id(param)]
        else:
            first[id(param)] = name
    return tied


def _meta_inputs(interpreter, schema: FeatureSchema, batch_size: int, atom_index) -> dict[str, torch.Tensor]:
    from pipeline.schema import Atom

    table = interpreter.table
    inputs: dict[str, torch.Tensor] = {}
    for spec in schema.inputs:
        shape = (batch_size, *spec.concrete_shape(schema.probe_length))
        if spec.kind == "continuous":
            dtype = _DTYPES.get(spec.dtype or "float32", torch.float32)
            tensor = torch.empty(shape, dtype=dtype, device="meta")
            ids = torch.tensor([table.intern(1 << atom_index[Atom("field", spec.name, f)]) for f in spec.fields])
            interpreter.assign(tensor, SetValue(ids.reshape((1,) * (len(shape) - 1) + (-1,)), shape))
        elif spec.kind == "categorical":
            dtype = _DTYPES.get(spec.dtype or "int64", torch.int64)
            tensor = torch.empty(shape, dtype=dtype, device="meta")
            set_id = table.intern(interpreter.vocab_masks[spec.vocabulary])
            interpreter.assign(tensor, SetValue(torch.full((1,) * len(shape), set_id, dtype=torch.int64), shape))
        else:
            dtype = _DTYPES.get(spec.dtype or "float32", torch.float32)
            tensor = torch.empty(shape, dtype=dtype, device="meta")
        inputs[spec.name] = tensor
    # Keep the input tensors alive for the whole pass through the interpreter's own list.
    interpreter.inputs = inputs
    return inputs


def _output_atoms(spec):
    from pipeline.schema import Atom

    return [Atom("output", spec.name, f) for f in spec.fields]
