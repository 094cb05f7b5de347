"""Migration workflow files: parse, validate against the published JSON schema, resolve specs.

A workflow names the source checkpoints, the old and new model specs, the plan options,
the verification settings and the destination in the registry. The JSON schema is
``pipeline/workflow/workflow.schema.json``; every error names the file and the field.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator

from pipeline.models.spec import ModelSpec, SpecError, load_spec, parse_spec

WORKFLOW_VERSION = 1
DEFAULT_TOLERANCE = 1e-6
DEFAULT_PROBES = 64


class WorkflowError(ValueError):
    """An invalid workflow file. The message names the file and every offending field."""


@dataclass(frozen=True)
class Source:
    """Registry versions (``registry`` + ``model``) or plain checkpoint URLs (+ ``spec``)."""

    registry: str | None = None
    model: str | None = None
    versions: tuple[str, ...] = ("latest",)
    checkpoints: tuple[str, ...] = ()
    spec: ModelSpec | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Verify:
    probes: int = DEFAULT_PROBES
    tolerance: float = DEFAULT_TOLERANCE
    probe_batch: str | None = None
    device: str = "auto"
    seed: int = 0


@dataclass(frozen=True)
class Destination:
    registry: str
    model: str
    version: str = "next"
    tags: tuple[str, ...] = ()
    storage_options: dict[str, Any] = field(default_factory=dict)
    max_shard_bytes: int = 2 * 2**30


@dataclass(frozen=True)
class Workflow:
    """A validated workflow with its specs resolved."""

    name: str
    path: str
    source: Source
    new_spec: ModelSpec
    destination: Destination
    old_spec: ModelSpec | None = None
    plan: dict[str, Any] = field(default_factory=dict)
    verify: Verify = field(default_factory=Verify)
    description: str = ""
    raw: dict[str, Any] = field(default_factory=dict)


def schema() -> dict[str, Any]:
    """Return the workflow JSON schema that ships with the package."""
    text = resources.files("pipeline.workflow").joinpath("workflow.schema.json").read_text()
    return json.loads(text)


def load_workflow(path: str | Path, *, check_imports: bool = True) -> Workflow:
    """Read, validate and resolve a workflow file, raising :class:`WorkflowError`."""
    path = Path(path)
    try:
        data = yaml.safe_load(expand_env(path.read_text()))
    except OSError as e:
        raise WorkflowError(f"cannot read workflow {str(path)!r}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise WorkflowError(f"workflow {str(path)!r} is not valid YAML: {e}") from e
    return parse_workflow(data, path, check_imports=check_imports)


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(text: str) -> str:
    """Replace ``${NAME}`` and ``${NAME:-default}`` with environment values.

    Deployments use this to point the same workflow file at another registry, for example
    ``registry: ${SURGERY_REGISTRY:-file://../registry}``. An unset variable without a
    default is an error, so a workflow never runs against an unintended location.
    """

    def substitute(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name)
        if value is not None:
            return value
        if default is not None:
            return default
        raise WorkflowError(f"environment variable {name} is not set and ${{{name}}} has no default")

    return _ENV.sub(substitute, text)


def parse_workflow(data: Any, path: str | Path, *, check_imports: bool = True) -> Workflow:
    path = Path(path)
    problems = schema_problems(data)
    if problems:
        raise WorkflowError(f"{path}: invalid workflow:\n  " + "\n  ".join(problems))

    base = path.parent
    try:
        source_data = data["source"]
        source_spec = _spec(source_data.get("spec"), base, "source.spec")
        source = Source(
            registry=source_data.get("registry"),
            model=source_data.get("model"),
            versions=tuple(source_data.get("versions", ["latest"])) if "checkpoints" not in source_data else (),
            checkpoints=tuple(source_data.get("checkpoints", ())),
            spec=source_spec,
            storage_options=dict(source_data.get("storage_options", {})),
        )
        old_spec = _spec(data.get("old_spec"), base, "old_spec") or source_spec
        new_spec = _spec(data["new_spec"], base, "new_spec")
    except WorkflowError as e:
        raise WorkflowError(f"{path}: {e}") from e

    verify_data = data.get("verify", {})
    probe_batch = verify_data.get("probe_batch")
    if probe_batch is not None:
        probe_batch = _relative(probe_batch, base)
        if "://" not in probe_batch and not Path(probe_batch).is_file():
            raise WorkflowError(f"{path}: verify.probe_batch: file {probe_batch!r} not found")
    verify = Verify(
        probes=verify_data.get("probes", DEFAULT_PROBES),
        tolerance=float(verify_data.get("tolerance", DEFAULT_TOLERANCE)),
        probe_batch=probe_batch,
        device=verify_data.get("device", "auto"),
        seed=verify_data.get("seed", 0),
    )
    dest = data["destination"]
    destination = Destination(
        registry=_relative_url(dest["registry"], base),
        model=dest["model"],
        version=dest.get("version", "next"),
        tags=tuple(dest.get("tags", ())),
        storage_options=dict(dest.get("storage_options", {})),
        max_shard_bytes=dest.get("max_shard_bytes", 2 * 2**30),
    )
    if source.registry is not None:
        source = Source(**{**source.__dict__, "registry": _relative_url(source.registry, base)})
    if source.checkpoints:
        source = Source(**{**source.__dict__, "checkpoints": tuple(_relative_url(c, base) for c in source.checkpoints)})

    workflow = Workflow(
        name=data["name"],
        path=str(path),
        source=source,
        new_spec=new_spec,
        destination=destination,
        old_spec=old_spec,
        plan=dict(data.get("plan", {})),
        verify=verify,
        description=data.get("description", ""),
        raw=data,
    )
    if check_imports:
        _check_factories(workflow)
    return workflow


def schema_problems(data: Any) -> list[str]:
    """Return one readable line per schema violation, each naming the field."""
    validator = Draft202012Validator(schema())
    problems = []
    for error in sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path))):
        problems.append(_describe(error))
    return problems


def _describe(error) -> str:
    where = _field_path(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = set(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - allowed)
        return f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(allowed))}"
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        child = f"{where}.{missing}" if where != "(top level)" else missing
        return f"{child}: missing; it is required"
    if error.validator == "oneOf" and list(error.absolute_path) == ["source"]:
        return "source: give either 'registry' and 'model' (with optional 'versions'), or 'checkpoints' with their 'spec', not both"
    if error.validator == "oneOf":
        return f"{where}: expected a spec file path or an inline spec with 'factory' ('module:function') and 'config'"
    if error.validator in ("exclusiveMinimum", "maximum", "minimum"):
        return f"{where}: {error.instance!r} is out of range ({error.validator} {error.validator_value})"
    if error.validator == "const" and list(error.absolute_path) == ["version"]:
        return f"version: {error.instance!r} is not supported; this tool reads workflow version {WORKFLOW_VERSION}"
    if error.validator == "type" and error.validator_value in ("number", "integer") and isinstance(error.instance, str):
        return (
            f"{where}: {error.instance!r} is a string, not a number; YAML reads exponents without a "
            "decimal point (1e-5) as text, so write 1.0e-5"
        )
    if error.validator == "pattern":
        return f"{where}: {error.instance!r} does not match the required pattern {error.validator_value!r}"
    return f"{where}: {error.message}"


def _field_path(path) -> str:
    parts = []
    for part in path:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        else:
            parts.append(("." if parts else "") + str(part))
    return "".join(parts) or "(top level)"


def _spec(value: Any, base: Path, where: str) -> ModelSpec | None:
    if value is None:
        return None
    try:
        if isinstance(value, str):
            return load_spec(_relative(value, base))
        return parse_spec(value, source=where)
    except SpecError as e:
        raise WorkflowError(f"{where}: {e}") from e


def _relative(value: str, base: Path) -> str:
    if "://" in value or Path(value).is_absolute():
        return value
    return str((base / value).resolve())


def _relative_url(value: str, base: Path) -> str:
    """Resolve ``file://`` URLs and plain paths relative to the workflow's folder."""
    if value.startswith("file://"):
        rest = value[len("file://"):]
        return "file://" + (rest if rest.startswith("/") else str((base / rest).resolve()))
    if "://" in value:
        return value
    return "file://" + _relative(value, base)


def _check_factories(workflow: Workflow) -> None:
    for where, spec in (("old_spec", workflow.old_spec), ("new_spec", workflow.new_spec)):
        if spec is None:
            continue
        try:
            spec.resolve_factory()
        except SpecError as e:
            raise WorkflowError(f"{workflow.path}: {where}: {e}") from e
