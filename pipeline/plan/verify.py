"""Verification: run the old and new models on the same probe inputs and compare outputs.

Probes are drawn from the old schema: standard-normal continuous fields, categories drawn
only from those both vocabularies keep, and random entity masks with at least one entity
present. The new model gets the same values, moved to its field and category positions.
Each new feature is at its absent value and new categories are never drawn. Removed
fields are fed to the old model at the constant the plan folded. Outputs are compared per
old output field, matched by name through the renames; new fields are not compared.

The relative error of a field is ``max |old - new|`` over the batch divided by the scale
of its output: the largest ``|old|`` over all fields of that output, ignoring mask values
beyond 1e30. Logits of one head share a scale, so a logit near zero does not turn a
rounding difference of a few ulp into a large relative error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from pipeline.examples.inputs import input_dtype
from pipeline.models.spec import ModelSpec, named_outputs, parse_spec
from pipeline.plan.model import Plan, PlanError
from pipeline.schema import FeatureSchema

logger = logging.getLogger(__name__)

EXACT_TOLERANCE = 1e-6
# Output values at least this large are masks (such as float32 min for an absent entity)
# and do not set an output's scale.
MASK_MAGNITUDE = 1e30


@dataclass(frozen=True)
class FieldError:
    """The error of one old output field."""

    output: str
    field: str
    new_output: str
    new_field: str
    max_abs: float
    max_rel: float


@dataclass(frozen=True)
class VerifyReport:
    """The result of :func:`verify_plan`."""

    passed: bool
    exact_plan: bool
    expected_error: float
    tolerance: float
    max_abs: float
    max_rel: float
    fields: tuple[FieldError, ...]
    not_compared: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)
    device: str = "cpu"
    batch: int = 0

    def worst(self, limit: int = 10) -> list[FieldError]:
        return sorted(self.fields, key=lambda f: (-f.max_rel, -f.max_abs))[:limit]

    def table(self, limit: int = 10) -> str:
        header = f"{'output field':<36} {'new field':<36} {'max abs':>12} {'max rel':>12}"
        lines = [header, "-" * len(header)]
        for row in self.worst(limit):
            lines.append(
                f"{row.output + '/' + row.field:<36} {row.new_output + '/' + row.new_field:<36} "
                f"{row.max_abs:>12.3e} {row.max_rel:>12.3e}"
            )
        return "\n".join(lines)

    def summary(self) -> str:
        kind = "exact plan" if self.exact_plan else f"APPROXIMATE plan (expected relative error about {self.expected_error:.2g})"
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"verification {verdict}: {kind}; {len(self.fields)} old output fields compared on "
            f"{self.batch} probes ({self.device}); max abs error {self.max_abs:.3e}, max relative "
            f"error {self.max_rel:.3e}, tolerance {self.tolerance:.1e}"
        )

    def to_json(self) -> dict:
        return {
            "passed": self.passed,
            "exact_plan": self.exact_plan,
            "approximate": not self.exact_plan,
            "expected_error": self.expected_error,
            "tolerance": self.tolerance,
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "device": self.device,
            "batch": self.batch,
            "worst": [f.__dict__ for f in self.worst()],
            "not_compared": list(self.not_compared),
            "notes": list(self.notes),
        }


class VerificationError(AssertionError):
    """A plan whose new model does not reproduce the old outputs within the tolerance."""

    def __init__(self, report: VerifyReport) -> None:
        super().__init__(f"{report.summary()}\nworst outputs:\n{report.table()}")
        self.report = report


def _model(model, spec_text: str, side: str) -> tuple[nn.Module | None, FeatureSchema, ModelSpec | None]:
    """Return (module or None, schema, spec or None) for one side of the plan."""
    if isinstance(model, tuple):
        return model[0], model[1], None
    if isinstance(model, ModelSpec):
        return None, model.build(device="meta")[1], model
    if model is None and spec_text:
        import json

        spec = parse_spec(json.loads(spec_text), source=f"<plan {side} model>")
        return None, spec.build(device="meta")[1], spec
    raise PlanError(f"verification needs the {side} model: pass a ModelSpec or (module, schema); the plan stores no {side} spec")


def verify_plan(
    plan: Plan,
    old_state: Mapping[str, torch.Tensor],
    new_state: Mapping[str, torch.Tensor],
    *,
    old: ModelSpec | tuple[nn.Module, FeatureSchema] | None = None,
    new: ModelSpec | tuple[nn.Module, FeatureSchema] | None = None,
    probe: Mapping[str, torch.Tensor] | str | Path | None = None,
    batch: int = 16,
    seed: int = 0,
    device: str | torch.device = "cpu",
    tolerance: float | None = None,
) -> VerifyReport:
    """Load both checkpoints into their models and compare outputs on probe inputs.

    ``old``/``new`` default to the specs stored in the plan. ``probe`` is a batch of old
    inputs: a mapping, or a safetensors file whose tensor names are the old input names.
    Without it, ``batch`` probes are drawn with ``seed``. ``device`` runs both models there
    (``"cuda"`` when available). An exact plan passes within ``tolerance`` (default 1e-6
    relative); an approximate plan is flagged and, without a tolerance, judged against ten
    times its estimated error.
    """
    old_module, old_schema, old_spec = _model(old, plan.old_model, "old")
    new_module, new_schema, new_spec = _model(new, plan.new_model, "new")
    device = torch.device(device)
    old_module = _loaded(old_module, old_spec, old_state, "old", device)
    new_module = _loaded(new_module, new_spec, new_state, "new", device)

    notes: list[str] = []
    if probe is None:
        old_inputs = draw_probes(old_schema, new_schema, plan, batch, seed)
    else:
        old_inputs = load_probe(probe, old_schema)
    old_inputs = _with_constants(old_inputs, old_schema, plan, notes)
    new_inputs = translate_inputs(old_inputs, old_schema, new_schema, plan)

    with torch.no_grad():
        old_out = named_outputs(old_module(**{k: v.to(device) for k, v in old_inputs.items()}), old_schema)
        new_out = named_outputs(new_module(**{k: v.to(device) for k, v in new_inputs.items()}), new_schema)

    fields, not_compared = _compare(old_out, new_out, old_schema, new_schema, plan)
    max_abs = max((f.max_abs for f in fields), default=0.0)
    max_rel = max((f.max_rel for f in fields), default=0.0)
    if tolerance is None:
        tolerance = EXACT_TOLERANCE if plan.exact else max(EXACT_TOLERANCE, 10 * plan.expected_error)
    if not plan.exact:
        notes.append(f"the plan is approximate; its estimated relative error is {plan.expected_error:.2g}")
    batch_size = next(iter(old_inputs.values())).shape[0] if old_inputs else 0
    report = VerifyReport(
        passed=max_rel <= tolerance,
        exact_plan=plan.exact,
        expected_error=plan.expected_error,
        tolerance=tolerance,
        max_abs=max_abs,
        max_rel=max_rel,
        fields=tuple(fields),
        not_compared=tuple(not_compared),
        notes=tuple(notes),
        device=str(device),
        batch=int(batch_size),
    )
    logger.info("%s", report.summary())
    return report


def _loaded(module, spec, state, which: str, device: torch.device) -> nn.Module:
    if module is None:
        module, _ = spec.build(device="cpu")
    try:
        module.load_state_dict(dict(state), strict=True)
    except RuntimeError as e:
        raise PlanError(f"the {which} checkpoint does not fit the {which} model: {e}") from e
    return module.to(device).eval()


def draw_probes(old: FeatureSchema, new: FeatureSchema, plan: Plan, batch: int, seed: int) -> dict[str, torch.Tensor]:
    """Draw ``batch`` probe inputs in the old schema, with categories that both models keep."""
    if batch < 1:
        raise PlanError(f"probe batch must be a positive integer, got {batch!r}")
    generator = torch.Generator().manual_seed(seed)
    renames = dict(plan.renames)
    new_atoms = {str(a) for a in new.input_atoms()}
    inputs: dict[str, torch.Tensor] = {}
    for spec in old.inputs:
        shape = (batch, *spec.concrete_shape(old.probe_length))
        dtype = input_dtype(spec)
        if spec.kind == "continuous":
            inputs[spec.name] = torch.randn(shape, generator=generator, dtype=dtype)
        elif spec.kind == "categorical":
            tokens = old.vocabularies[spec.vocabulary]
            surviving = []
            for i, token in enumerate(tokens):
                atom = f"category:{spec.vocabulary}/{token}"
                if renames.get(atom, atom) in new_atoms:
                    surviving.append(i)
            if not surviving:
                raise PlanError(f"input {spec.name!r}: no category of vocabulary {spec.vocabulary!r} survives in the new model")
            choice = torch.randint(len(surviving), shape, generator=generator)
            inputs[spec.name] = torch.tensor(surviving, dtype=torch.int64)[choice].to(dtype)
        else:
            mask = torch.rand(shape, generator=generator) < 0.7
            if mask.dim() > 1:
                mask.reshape(batch, -1)[:, 0] = True
            inputs[spec.name] = mask.to(dtype)
    return inputs


def load_probe(probe: Mapping[str, torch.Tensor] | str | Path, schema: FeatureSchema) -> dict[str, torch.Tensor]:
    """Read a probe batch (a mapping or a safetensors file named by input) and check it."""
    if not isinstance(probe, Mapping):
        from safetensors.torch import load_file

        try:
            probe = load_file(str(probe))
        except Exception as e:  # safetensors raises its own SafetensorError type
            raise PlanError(f"cannot read probe file {str(probe)!r}: {e}") from e
    names = [spec.name for spec in schema.inputs]
    missing = [n for n in names if n not in probe]
    extra = sorted(set(probe) - set(names))
    if missing or extra:
        raise PlanError(f"probe batch: missing inputs {missing}, unknown inputs {extra}; name tensors after the old schema's inputs {names}")
    batch = None
    out = {}
    for spec in schema.inputs:
        tensor = probe[spec.name]
        expected = spec.concrete_shape(schema.probe_length)
        if tuple(tensor.shape[1:]) != tuple(expected) and not (None in spec.shape and len(tensor.shape) == len(expected) + 1):
            raise PlanError(f"probe input {spec.name!r} has shape {list(tensor.shape)}; expected [batch, {', '.join(map(str, expected))}]")
        if batch is None:
            batch = tensor.shape[0]
        elif tensor.shape[0] != batch:
            raise PlanError(f"probe input {spec.name!r} has batch {tensor.shape[0]} but earlier inputs have {batch}")
        out[spec.name] = tensor.to(input_dtype(spec))
    return out


def _with_constants(inputs: dict[str, torch.Tensor], old: FeatureSchema, plan: Plan, notes: list[str]) -> dict[str, torch.Tensor]:
    """Set each removed field of the old inputs to the constant the plan folded."""
    out = dict(inputs)
    for atom, value in plan.constants:
        _, _, rest = atom.partition(":")
        name, _, field_name = rest.partition("/")
        spec = old.input(name)
        column = spec.fields.index(field_name)
        tensor = out[name].clone()
        tensor[..., column] = value
        out[name] = tensor
        notes.append(f"removed field {atom} fed to the old model as {value:g}")
    return out


def translate_inputs(old_inputs: Mapping[str, torch.Tensor], old: FeatureSchema, new: FeatureSchema, plan: Plan) -> dict[str, torch.Tensor]:
    """Build the new model's inputs from old ones: same values, new positions, absent values for new features."""
    renames = dict(plan.renames)
    back = {v: k for k, v in renames.items()}
    old_inputs_by_name = {spec.name: spec for spec in old.inputs}
    out: dict[str, torch.Tensor] = {}
    batch = next(iter(old_inputs.values())).shape[0]
    for spec in new.inputs:
        dtype = input_dtype(spec)
        if spec.kind == "continuous":
            shape = (batch, *spec.concrete_shape(new.probe_length))
            tensor = torch.empty(shape, dtype=dtype)
            for j, field_name in enumerate(spec.fields):
                new_atom = f"field:{spec.name}/{field_name}"
                old_atom = back.get(new_atom, new_atom)
                if old_atom in renames and renames[old_atom] != new_atom:
                    old_atom = ""
                _, _, rest = old_atom.partition(":")
                source, _, old_field = rest.partition("/")
                source_spec = old_inputs_by_name.get(source)
                if source_spec is not None and source_spec.kind == "continuous" and old_field in source_spec.fields:
                    value = old_inputs[source][..., source_spec.fields.index(old_field)]
                    if tuple(value.shape[1:]) != shape[1:-1]:
                        raise PlanError(f"input {spec.name!r}: field {field_name!r} has entity shape {list(shape[1:-1])} in the new model but {list(value.shape[1:])} in the old one")
                    tensor[..., j] = value
                else:
                    tensor[..., j] = spec.absent_value(field_name)
            out[spec.name] = tensor
        elif spec.kind == "categorical":
            source_spec = old_inputs_by_name.get(spec.name)
            if source_spec is None or source_spec.kind != "categorical":
                raise PlanError(f"new categorical input {spec.name!r} has no counterpart in the old model, so probes cannot leave it absent")
            old_tokens = old.vocabularies[source_spec.vocabulary]
            new_index = {t: i for i, t in enumerate(new.vocabularies[spec.vocabulary])}
            lookup = []
            for token in old_tokens:
                atom = renames.get(f"category:{source_spec.vocabulary}/{token}", f"category:{source_spec.vocabulary}/{token}")
                lookup.append(new_index.get(atom.rpartition("/")[2], -1) if atom.startswith(f"category:{spec.vocabulary}/") else -1)
            table = torch.tensor(lookup, dtype=torch.int64)
            indices = table[old_inputs[spec.name].to(torch.int64)]
            if bool((indices < 0).any()):
                missing = sorted({old_tokens[i] for i in old_inputs[spec.name].reshape(-1).tolist() if lookup[i] < 0})
                raise PlanError(f"probe input {spec.name!r} uses categories {missing} that the new model does not have")
            out[spec.name] = indices.to(dtype)
        else:
            if spec.name not in old_inputs:
                shape = (batch, *spec.concrete_shape(new.probe_length))
                out[spec.name] = torch.ones(shape, dtype=dtype)
            else:
                out[spec.name] = old_inputs[spec.name].to(dtype)
    return out


def _compare(old_out, new_out, old: FeatureSchema, new: FeatureSchema, plan: Plan):
    renames = dict(plan.renames)
    new_positions = {}
    for spec in new.outputs:
        for j, field_name in enumerate(spec.fields):
            new_positions[f"output:{spec.name}/{field_name}"] = (spec.name, j, field_name)
    fields: list[FieldError] = []
    compared_new = set()
    for spec in old.outputs:
        values = old_out[spec.name].detach().to("cpu", torch.float64)
        scale = _scale(values)
        for i, field_name in enumerate(spec.fields):
            atom = f"output:{spec.name}/{field_name}"
            target = new_positions.get(renames.get(atom, atom))
            if target is None:
                continue
            new_name, j, new_field = target
            compared_new.add((new_name, new_field))
            a = values[..., i]
            b = new_out[new_name][..., j].detach().to("cpu", torch.float64)
            diff = (a - b).abs()
            diff = torch.where(torch.isnan(diff) & (torch.isnan(a) == torch.isnan(b)), torch.zeros_like(diff), diff)
            max_abs = float(diff.max()) if diff.numel() else 0.0
            fields.append(FieldError(spec.name, field_name, new_name, new_field, max_abs, max_abs / scale))
    not_compared = [f"{s.name}/{f}" for s in new.outputs for f in s.fields if (s.name, f) not in compared_new]
    return fields, not_compared


def _scale(values: torch.Tensor) -> float:
    """Return the largest magnitude of an output, ignoring mask values beyond 1e30."""
    finite = values.abs()
    finite = finite[torch.isfinite(finite) & (finite < MASK_MAGNITUDE)]
    return max(float(finite.max()) if finite.numel() else 0.0, 1e-12)


def check_exact(report: VerifyReport) -> None:
    """Raise :class:`VerificationError` with a table of the worst outputs unless the report passed."""
    if not report.passed:
        raise VerificationError(report)
