"""The interaction map: for every parameter element, the atoms it touches.

Each parameter has two set-id tensors in reduced form (see :mod:`pipeline.maps.sets`):

- ``inputs``: the input atoms (fields and categories) of the activations the element meets;
- ``outputs``: the output atoms (output fields) that the element feeds.

File format (``.map.safetensors``): one safetensors file. Its tensors are
``inputs/<parameter>`` and ``outputs/<parameter>``, int32 set ids in reduced form that
broadcast to the parameter's shape. Its string metadata holds:

- ``format``: ``surgery-map/1``;
- ``method``: ``sets`` or ``gradient``;
- ``atoms``: a JSON list of atom strings; the position in this list is the atom's index;
- ``sets``: a JSON list of sets, each a sorted list of atom indices; position = set id;
- ``shapes``: a JSON object from parameter name to its full shape;
- ``tied``: a JSON object from each tied parameter name to the name whose map it shares;
- ``roles``: a JSON object from parameter name to one role per axis: ``in`` when the
  parameter's uses contract that axis with a co-operand (a weight's input columns, an
  embedding's rows), ``out`` when the axis stays in the result (a weight's output rows, a
  bias), ``in+out`` for both, and an empty string for an axis no use touched;
- ``schema``: the feature schema as JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline.maps.sets import SetTable, compress
from pipeline.schema import Atom, FeatureSchema

FORMAT = "surgery-map/1"


class MapError(ValueError):
    """An invalid or unreadable interaction map."""


@dataclass
class ParamMap:
    """The reduced input and output set ids of one parameter."""

    shape: tuple[int, ...]
    inputs: torch.Tensor
    outputs: torch.Tensor
    roles: tuple[str, ...] = ()

    def dense_inputs(self) -> torch.Tensor:
        return self.inputs.expand(self.shape)

    def dense_outputs(self) -> torch.Tensor:
        return self.outputs.expand(self.shape)


@dataclass
class InteractionMap:
    """Atoms, interned sets and per-parameter set ids for one model."""

    atoms: list[Atom]
    table: SetTable
    params: dict[str, ParamMap]
    method: str
    schema: FeatureSchema | None = None
    tied: dict[str, str] = field(default_factory=dict)

    # Queries ----------------------------------------------------------------------------

    def atom_index(self) -> dict[Atom, int]:
        return {atom: i for i, atom in enumerate(self.atoms)}

    def atoms_of(self, set_id: int) -> list[Atom]:
        return [self.atoms[i] for i in self.table.members(set_id)]

    def element_atoms(self, name: str, index: tuple[int, ...]) -> tuple[list[Atom], list[Atom]]:
        """Return the input atoms and the output atoms of one parameter element."""
        param = self.params[self.tied.get(name, name)]
        in_id = int(param.dense_inputs()[index])
        out_id = int(param.dense_outputs()[index])
        return self.atoms_of(in_id), self.atoms_of(out_id)

    def param_names(self) -> list[str]:
        return list(self.params) + list(self.tied)

    # Construction helpers ---------------------------------------------------------------

    @classmethod
    def from_dense(
        cls,
        atoms: list[Atom],
        params: dict[str, tuple[torch.Tensor, torch.Tensor]],
        method: str,
        schema: FeatureSchema | None = None,
        tied: dict[str, str] | None = None,
    ) -> "InteractionMap":
        """Build a map from dense boolean tensors ``[*shape, n_atoms]`` per parameter.

        ``params[name] = (inputs, outputs)``, where ``inputs[..., i]`` is true when the
        element touches atom ``i``. Outputs use the same atom indices.
        """
        table = SetTable()
        weights = [1 << i for i in range(len(atoms))]
        maps: dict[str, ParamMap] = {}
        for name, (inputs, outputs) in params.items():
            maps[name] = ParamMap(
                tuple(inputs.shape[:-1]),
                compress(_intern_dense(table, inputs, weights)),
                compress(_intern_dense(table, outputs, weights)),
            )
        return cls(list(atoms), table, maps, method, schema, dict(tied or {}))

    # Serialisation ----------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        tensors: dict[str, torch.Tensor] = {}
        for name, param in self.params.items():
            tensors[f"inputs/{name}"] = param.inputs.to(torch.int32).contiguous()
            tensors[f"outputs/{name}"] = param.outputs.to(torch.int32).contiguous()
        metadata = {
            "format": FORMAT,
            "method": self.method,
            "atoms": json.dumps([str(a) for a in self.atoms]),
            "sets": json.dumps([self.table.members(i) for i in range(len(self.table))]),
            "shapes": json.dumps({n: list(p.shape) for n, p in self.params.items()}),
            "tied": json.dumps(self.tied),
            "roles": json.dumps({n: list(p.roles) for n, p in self.params.items()}),
            "schema": json.dumps(self.schema.to_json() if self.schema else None),
        }
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> "InteractionMap":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            tensors = load_file(str(path))
        except (OSError, Exception) as e:  # safetensors raises its own SafetensorError
            raise MapError(
                f"cannot read interaction map {str(path)!r}: {e}. A map file is the safetensors "
                "file that 'surgery map SPEC --out MAP' writes"
            ) from e
        if metadata.get("format") != FORMAT:
            raise MapError(
                f"{str(path)!r} is not an interaction map: format is "
                f"{metadata.get('format')!r}, expected {FORMAT!r}"
            )
        atoms = [Atom.parse(a) for a in json.loads(metadata["atoms"])]
        table = SetTable()
        remap = []
        for members in json.loads(metadata["sets"]):
            remap.append(table.intern_atoms(members))
        lookup = torch.tensor(remap, dtype=torch.int64)
        shapes = json.loads(metadata["shapes"])
        roles = json.loads(metadata.get("roles", "{}"))
        params = {
            name: ParamMap(
                tuple(shape),
                lookup[tensors[f"inputs/{name}"].to(torch.int64)],
                lookup[tensors[f"outputs/{name}"].to(torch.int64)],
                tuple(roles.get(name, ())),
            )
            for name, shape in shapes.items()
        }
        schema_json = json.loads(metadata.get("schema", "null"))
        schema = FeatureSchema.from_json(schema_json) if schema_json else None
        return cls(atoms, table, params, metadata.get("method", "?"), schema, json.loads(metadata["tied"]))


def _intern_dense(table: SetTable, touches: torch.Tensor, weights: list[int]) -> torch.Tensor:
    flat = touches.reshape(-1, touches.shape[-1]).to(torch.bool)
    unique, inverse = torch.unique(flat, dim=0, return_inverse=True)
    ids = []
    for row in unique.tolist():
        bits = 0
        for i, on in enumerate(row):
            if on:
                bits |= weights[i]
        ids.append(table.intern(bits))
    return torch.tensor(ids, dtype=torch.int64)[inverse].reshape(touches.shape[:-1])
