"""Feature schema: the named inputs and outputs of a model, and the atoms they define.

An atom is the unit that interaction maps are made of:

- one field of a continuous input (``field:hero/hp``);
- one category of a vocabulary (``category:unit_types/creep``);
- one field of an output (``output:move/north``).

A categorical input names a vocabulary instead of owning one, so two inputs that share
an embedding table (for example item slots) share their category atoms. Auxiliary inputs
(masks, lengths, recurrent state) carry no atoms.

An entity axis is part of the per-sample shape: ``units`` with shape ``[189, 40]`` is up
to 189 units that each have the same 40 fields. Fields are always on the last axis.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Literal

KINDS = ("continuous", "categorical", "auxiliary")
SCHEMA_VERSION = 1


class SchemaError(ValueError):
    """An invalid feature schema. The message names the offending entry."""


@dataclass(frozen=True, order=True)
class Atom:
    """One set element: a field of an input, a category of a vocabulary, or an output field."""

    kind: Literal["field", "category", "output"]
    source: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.source}/{self.name}"

    @classmethod
    def parse(cls, text: str) -> "Atom":
        kind, sep, rest = text.partition(":")
        source, sep2, name = rest.partition("/")
        if not sep or not sep2 or kind not in ("field", "category", "output"):
            raise SchemaError(
                f"invalid atom {text!r}: expected 'field:INPUT/FIELD', "
                "'category:VOCABULARY/TOKEN' or 'output:OUTPUT/FIELD'"
            )
        return cls(kind, source, name)  # type: ignore[arg-type]


@dataclass(frozen=True)
class InputSpec:
    """One named model input.

    ``shape`` is the per-sample shape (no batch axis). ``None`` marks a variable-length
    axis, such as a token sequence; maps and probes use ``probe_length`` for it.
    """

    name: str
    kind: Literal["continuous", "categorical", "auxiliary"]
    shape: tuple[int | None, ...]
    fields: tuple[str, ...] = ()
    vocabulary: str | None = None
    dtype: str | None = None
    absent: tuple[float, ...] = ()

    def concrete_shape(self, probe_length: int) -> tuple[int, ...]:
        return tuple(probe_length if n is None else n for n in self.shape)

    def absent_value(self, field_name: str) -> float:
        """Return the value that means "this field carries no information" (0 unless set)."""
        if not self.absent:
            return 0.0
        return self.absent[self.fields.index(field_name)]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "shape": list(self.shape)}
        if self.fields:
            out["fields"] = list(self.fields)
        if self.vocabulary is not None:
            out["vocabulary"] = self.vocabulary
        if self.dtype is not None:
            out["dtype"] = self.dtype
        if self.absent:
            out["absent"] = list(self.absent)
        return out


@dataclass(frozen=True)
class OutputSpec:
    """One named model output, with its fields along the last axis."""

    name: str
    fields: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "fields": list(self.fields)}


@dataclass(frozen=True)
class FeatureSchema:
    """The inputs, vocabularies and outputs of one model."""

    inputs: tuple[InputSpec, ...]
    vocabularies: dict[str, tuple[str, ...]] = field(default_factory=dict)
    outputs: tuple[OutputSpec, ...] = ()
    probe_length: int = 4

    def __post_init__(self) -> None:
        validate(self)

    # Lookups ----------------------------------------------------------------------------

    def input(self, name: str) -> InputSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise SchemaError(
            f"input {name!r} not found; the schema has {[i.name for i in self.inputs]}"
        )

    def output(self, name: str) -> OutputSpec:
        for spec in self.outputs:
            if spec.name == name:
                return spec
        raise SchemaError(
            f"output {name!r} not found; the schema has {[o.name for o in self.outputs]}"
        )

    def feature_inputs(self) -> Iterator[InputSpec]:
        return (spec for spec in self.inputs if spec.kind != "auxiliary")

    def input_atoms(self) -> list[Atom]:
        """Return every input atom in schema order: fields first by input, then categories."""
        atoms: list[Atom] = []
        for spec in self.inputs:
            if spec.kind == "continuous":
                atoms.extend(Atom("field", spec.name, f) for f in spec.fields)
        for vocabulary in self.used_vocabularies():
            atoms.extend(Atom("category", vocabulary, t) for t in self.vocabularies[vocabulary])
        return atoms

    def output_atoms(self) -> list[Atom]:
        return [Atom("output", o.name, f) for o in self.outputs for f in o.fields]

    def used_vocabularies(self) -> list[str]:
        seen: list[str] = []
        for spec in self.inputs:
            if spec.kind == "categorical" and spec.vocabulary not in seen:
                seen.append(spec.vocabulary)  # type: ignore[arg-type]
        return seen

    # Serialisation ----------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "version": SCHEMA_VERSION,
            "inputs": [spec.to_json() for spec in self.inputs],
            "vocabularies": {k: list(v) for k, v in self.vocabularies.items()},
            "outputs": [spec.to_json() for spec in self.outputs],
            "probe_length": self.probe_length,
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "FeatureSchema":
        return parse_schema(data)

    @classmethod
    def loads(cls, text: str) -> "FeatureSchema":
        return parse_schema(json.loads(text))


def parse_schema(data: Any) -> FeatureSchema:
    """Build a schema from its JSON form, raising :class:`SchemaError` on the first bad entry."""
    if not isinstance(data, dict):
        raise SchemaError(f"a feature schema must be a JSON object, got {type(data).__name__}")
    unknown = set(data) - {"version", "inputs", "vocabularies", "outputs", "probe_length"}
    if unknown:
        raise SchemaError(
            f"unknown schema keys {sorted(unknown)}; expected inputs, vocabularies, outputs, "
            "probe_length, version"
        )
    version = data.get("version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise SchemaError(f"schema version {version!r} is not supported; expected {SCHEMA_VERSION}")

    inputs = tuple(_parse_input(i, entry) for i, entry in enumerate(_list(data, "inputs")))
    vocabularies_raw = data.get("vocabularies", {})
    if not isinstance(vocabularies_raw, dict):
        raise SchemaError("schema 'vocabularies' must map vocabulary names to token lists")
    vocabularies = {str(k): tuple(str(t) for t in _tokens(k, v)) for k, v in vocabularies_raw.items()}
    outputs = tuple(_parse_output(i, entry) for i, entry in enumerate(_list(data, "outputs", [])))
    probe_length = data.get("probe_length", 4)
    if not isinstance(probe_length, int) or probe_length < 1:
        raise SchemaError(f"schema 'probe_length' must be a positive integer, got {probe_length!r}")
    return FeatureSchema(inputs, vocabularies, outputs, probe_length)


def _list(data: dict[str, Any], key: str, default: Any = None) -> list[Any]:
    value = data.get(key, default)
    if not isinstance(value, list):
        raise SchemaError(f"schema {key!r} must be a list, got {type(value).__name__}")
    return value


def _tokens(name: str, tokens: Any) -> list[Any]:
    if not isinstance(tokens, list):
        raise SchemaError(f"vocabulary {name!r} must be a list of tokens")
    return tokens


def _parse_input(index: int, entry: Any) -> InputSpec:
    if not isinstance(entry, dict) or "name" not in entry:
        raise SchemaError(f"input #{index} must be an object with a 'name'")
    name = entry["name"]
    unknown = set(entry) - {"name", "kind", "shape", "fields", "vocabulary", "dtype", "absent"}
    if unknown:
        raise SchemaError(f"input {name!r}: unknown keys {sorted(unknown)}")
    shape = entry.get("shape")
    if not isinstance(shape, list):
        raise SchemaError(f"input {name!r}: 'shape' must be a list of sizes, got {shape!r}")
    return InputSpec(
        name=name,
        kind=entry.get("kind"),
        shape=tuple(shape),
        fields=tuple(entry.get("fields", ())),
        vocabulary=entry.get("vocabulary"),
        dtype=entry.get("dtype"),
        absent=tuple(float(v) for v in entry.get("absent", ())),
    )


def _parse_output(index: int, entry: Any) -> OutputSpec:
    if not isinstance(entry, dict) or "name" not in entry:
        raise SchemaError(f"output #{index} must be an object with a 'name'")
    unknown = set(entry) - {"name", "fields"}
    if unknown:
        raise SchemaError(f"output {entry['name']!r}: unknown keys {sorted(unknown)}")
    return OutputSpec(entry["name"], tuple(entry.get("fields", ())))


def validate(schema: FeatureSchema) -> None:
    """Check a schema, raising :class:`SchemaError` that names the offending entry."""
    _unique("input", [spec.name for spec in schema.inputs])
    _unique("output", [spec.name for spec in schema.outputs])
    if not any(spec.kind != "auxiliary" for spec in schema.inputs):
        raise SchemaError("the schema has no feature inputs; add a continuous or categorical input")

    for vocabulary, tokens in schema.vocabularies.items():
        if not tokens:
            raise SchemaError(f"vocabulary {vocabulary!r} is empty; it needs at least one token")
        _unique(f"token in vocabulary {vocabulary!r}", list(tokens))

    for spec in schema.inputs:
        _validate_input(schema, spec)

    for spec in schema.outputs:
        if not spec.fields:
            raise SchemaError(f"output {spec.name!r} has no fields; name at least one")
        _unique(f"field of output {spec.name!r}", list(spec.fields))


def _validate_input(schema: FeatureSchema, spec: InputSpec) -> None:
    where = f"input {spec.name!r}"
    if not isinstance(spec.name, str) or not spec.name or "/" in spec.name:
        raise SchemaError(f"input name {spec.name!r} must be a non-empty string without '/'")
    if spec.kind not in KINDS:
        raise SchemaError(f"{where}: kind {spec.kind!r} is invalid; expected one of {KINDS}")
    for size in spec.shape:
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
            raise SchemaError(
                f"{where}: shape {list(spec.shape)} is invalid; sizes are positive integers "
                "or null for a variable-length axis"
            )

    if spec.kind == "continuous":
        if not spec.shape or spec.shape[-1] is None:
            raise SchemaError(f"{where}: a continuous input needs a fixed last axis for its fields")
        if not spec.fields:
            raise SchemaError(f"{where}: a continuous input needs 'fields'")
        if len(spec.fields) != spec.shape[-1]:
            raise SchemaError(
                f"{where}: shape {list(spec.shape)} has {spec.shape[-1]} values on its last axis "
                f"but {len(spec.fields)} fields are named; make them agree"
            )
        _unique(f"field of {where}", list(spec.fields))
        if spec.absent and len(spec.absent) != len(spec.fields):
            raise SchemaError(
                f"{where}: 'absent' has {len(spec.absent)} values for {len(spec.fields)} fields"
            )
        if spec.vocabulary is not None:
            raise SchemaError(f"{where}: a continuous input takes 'fields', not 'vocabulary'")
    elif spec.kind == "categorical":
        if spec.vocabulary is None:
            raise SchemaError(f"{where}: a categorical input needs a 'vocabulary'")
        if spec.vocabulary not in schema.vocabularies:
            raise SchemaError(
                f"{where}: vocabulary {spec.vocabulary!r} not found; the schema defines "
                f"{sorted(schema.vocabularies)}"
            )
        if spec.fields:
            raise SchemaError(f"{where}: a categorical input takes 'vocabulary', not 'fields'")
    elif spec.fields or spec.vocabulary is not None:
        raise SchemaError(f"{where}: an auxiliary input carries no fields or vocabulary")


def _unique(what: str, names: Iterable[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise SchemaError(f"duplicate {what}: {name!r}")
        seen.add(name)
