"""The manifest: a versioned JSON document that describes and publishes one version.

The JSON Schema (draft 2020-12) ships as ``manifest.schema.json`` in this package.
Every manifest is validated against it, and against the checks below that a schema
cannot express, both before it is written and whenever it is read:

- ``model`` and ``version`` equal the folders the manifest is stored in;
- every tensor names a shard listed in ``shards``, and ``optimizer_state`` is true
  exactly when ``optimizer_tensors`` is not empty;
- ``files`` lists the index file of each part that has tensors;
- the feature schema and model spec parse (``pipeline.schema``, ``pipeline.models.spec``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from importlib import metadata, resources
from typing import Any, Mapping

from jsonschema import Draft202012Validator

from pipeline.models.spec import ModelSpec, SpecError, parse_spec
from pipeline.registry.errors import ManifestError
from pipeline.registry.layout import MODEL_PART, OPTIMIZER_PART, index_name
from pipeline.schema import FeatureSchema, SchemaError, parse_schema

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1
PACKAGE = "surgery-pipeline"
# Keys that the publisher supplies; the registry fills in every other key.
PUBLISHER_FIELDS = ("parents", "model_spec", "feature_schema", "plan", "verification")


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    """Return the manifest JSON Schema that ships with the package."""
    text = resources.files("pipeline.registry").joinpath("manifest.schema.json").read_text()
    return json.loads(text)


def tool_version() -> str:
    """Return the installed version of this package from its metadata."""
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        logger.warning("package %s is not installed; recording tool version 0+unknown", PACKAGE)
        return "0+unknown"


def utc_now() -> str:
    """Return the current UTC time in ISO 8601 with milliseconds and a ``Z`` suffix."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    """Parse a ``created_at`` value written by :func:`utc_now`."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass(frozen=True)
class Manifest:
    """A validated manifest: its document, the exact bytes read or written, and their sha256."""

    document: dict[str, Any]
    data: bytes
    sha256: str
    url: str

    @property
    def model(self) -> str:
        return self.document["model"]

    @property
    def version(self) -> str:
        return self.document["version"]

    @property
    def created_at(self) -> str:
        return self.document["created_at"]

    @property
    def parents(self) -> list[dict[str, str]]:
        return list(self.document["parents"])

    @property
    def shards(self) -> dict[str, dict[str, Any]]:
        return self.document["shards"]

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.document["files"]

    @property
    def tensors(self) -> dict[str, dict[str, Any]]:
        return self.document["tensors"]

    @property
    def optimizer_state(self) -> bool:
        return bool(self.document["optimizer_state"])

    @property
    def optimizer_tensors(self) -> dict[str, dict[str, Any]]:
        return self.document["optimizer_tensors"]

    def feature_schema(self) -> FeatureSchema:
        return parse_schema(self.document["feature_schema"])

    def model_spec(self) -> ModelSpec:
        return parse_spec(self.document["model_spec"], source=self.url)

    def part_tensors(self, part: str) -> dict[str, dict[str, Any]]:
        return self.tensors if part == MODEL_PART else self.optimizer_tensors

    def part_digests(self, part: str) -> dict[str, dict[str, Any]]:
        """Return ``{file: {"sha256", "size"}}`` for the shards of one part."""
        files = {entry["shard"] for entry in self.part_tensors(part).values()}
        return {file: self.shards[file] for file in sorted(files)}


def publisher_fields(fields: Mapping[str, Any], *, model: str, version: str) -> dict[str, Any]:
    """Return the publisher's ``fields`` in their JSON form, or raise ManifestError.

    ``fields`` contains ``model_spec`` and ``feature_schema`` (objects or their JSON
    form), and optionally ``parents`` (dicts or ModelVersion objects), ``plan`` and
    ``verification``. The error names unknown, missing and invalid fields.
    """
    where = f"manifest fields for version {version} of model {model!r}"
    unknown = sorted(set(fields) - set(PUBLISHER_FIELDS))
    missing = [key for key in ("model_spec", "feature_schema") if fields.get(key) is None]
    if unknown or missing:
        problems = [f"unknown field {key!r}" for key in unknown]
        problems += [f"field {key!r} is missing" for key in missing]
        raise ManifestError(
            f"{where}: {'; '.join(problems)}. The publisher supplies "
            f"{', '.join(PUBLISHER_FIELDS)} (model_spec and feature_schema are required); the "
            "registry fills in the rest"
        )
    normalised = {
        "parents": [_parent_json(parent) for parent in fields.get("parents") or ()],
        "model_spec": _spec_json(fields["model_spec"]),
        "feature_schema": _schema_json(fields["feature_schema"]),
        "plan": _plain(fields.get("plan")),
        "verification": _plain(fields.get("verification")),
    }
    try:
        parse_schema(normalised["feature_schema"])
        parse_spec(normalised["model_spec"], source="model_spec")
    except (SchemaError, SpecError) as e:
        raise ManifestError(f"{where}: {e}") from e
    return normalised


def build_document(
    *,
    model: str,
    version: str,
    run_id: str,
    fields: Mapping[str, Any],
    shards: Mapping[str, Mapping[str, Any]],
    files: Mapping[str, Mapping[str, Any]],
    tensors: Mapping[str, Mapping[str, Any]],
    optimizer_tensors: Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    """Return a manifest document from the publisher's fields and the written data.

    ``fields`` is the result of :func:`publisher_fields`.
    """
    return {
        "manifest_version": MANIFEST_VERSION,
        "model": model,
        "version": version,
        "created_at": utc_now(),
        "tool": {"name": PACKAGE, "version": tool_version()},
        "run_id": run_id,
        "parents": fields["parents"],
        "model_spec": fields["model_spec"],
        "feature_schema": fields["feature_schema"],
        "plan": fields["plan"],
        "verification": fields["verification"],
        "shards": {file: dict(digest) for file, digest in shards.items()},
        "files": {file: dict(digest) for file, digest in sorted(files.items())},
        "tensors": {name: dict(entry) for name, entry in tensors.items()},
        "optimizer_state": bool(optimizer_tensors),
        "optimizer_tensors": {name: dict(entry) for name, entry in optimizer_tensors.items()},
    }


def encode(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, indent=2, sort_keys=False, allow_nan=False).encode("utf-8") + b"\n"


def validate_document(document: Any, *, url: str, model: str, version: str) -> None:
    """Raise ManifestError listing every schema violation and inconsistency of ``document``."""
    if isinstance(document, dict):
        found = document.get("manifest_version")
        if isinstance(found, int) and found > MANIFEST_VERSION:
            tool = document.get("tool", {}).get("version", "unknown") if isinstance(document.get("tool"), dict) else "unknown"
            raise ManifestError(
                f"{url}: manifest_version {found} is newer than this tool reads "
                f"({MANIFEST_VERSION}); it was written by surgery-pipeline {tool}. Upgrade "
                "surgery-pipeline to read it"
            )
    problems = schema_problems(document)
    if not problems:
        problems = _consistency_problems(document, model=model, version=version)
    if problems:
        raise ManifestError(f"{url}: invalid manifest:\n  " + "\n  ".join(problems))


def parse_manifest(data: bytes, *, url: str, model: str, version: str) -> Manifest:
    """Parse and validate manifest bytes read from ``url``."""
    try:
        document = json.loads(data.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
        raise ManifestError(f"{url}: invalid manifest JSON ({e}); the manifest is corrupt") from e
    validate_document(document, url=url, model=model, version=version)
    return Manifest(document=document, data=data, sha256=hashlib.sha256(data).hexdigest(), url=url)


def schema_problems(document: Any) -> list[str]:
    """Return one line per JSON Schema violation, each naming the field."""
    validator = Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(document), key=lambda e: [str(p) for p in e.absolute_path])
    return [_describe(error) for error in errors]


def _describe(error: Any) -> str:
    where = ".".join(str(part) for part in error.absolute_path) or "(top level)"
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        child = missing if where == "(top level)" else f"{where}.{missing}"
        return f"{child}: missing; it is required"
    if error.validator == "additionalProperties":
        allowed = set(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - allowed) if isinstance(error.instance, dict) else []
        return f"{where}: unknown keys {unknown}; allowed: {sorted(allowed)}"
    return f"{where}: {error.message}"


def _consistency_problems(document: dict[str, Any], *, model: str, version: str) -> list[str]:
    problems = []
    if document["model"] != model:
        problems.append(f"model is {document['model']!r}, but the manifest is stored under model {model!r}")
    if document["version"] != version:
        problems.append(f"version is {document['version']!r}, but the manifest is stored under version {version!r}")
    shards = document["shards"]
    for part, key in ((MODEL_PART, "tensors"), (OPTIMIZER_PART, "optimizer_tensors")):
        for name, entry in document[key].items():
            if entry["shard"] not in shards:
                problems.append(f"{key}.{name}: shard {entry['shard']!r} is not listed in 'shards'")
        if document[key] and index_name(part) not in document["files"]:
            problems.append(f"files: the index {index_name(part)!r} of the {part} tensors is missing")
    if document["optimizer_state"] != bool(document["optimizer_tensors"]):
        problems.append(
            f"optimizer_state is {str(document['optimizer_state']).lower()}, but "
            f"optimizer_tensors has {len(document['optimizer_tensors'])} entries"
        )
    both = sorted(set(shards) & set(document["files"]))
    if both:
        problems.append(f"files {both} are listed both in 'shards' and in 'files'")
    try:
        parse_schema(document["feature_schema"])
    except SchemaError as e:
        problems.append(f"feature_schema: {e}")
    try:
        parse_spec(document["model_spec"], source="model_spec")
    except SpecError as e:
        problems.append(f"model_spec: {e}")
    return problems


def _parent_json(parent: Any) -> dict[str, Any]:
    as_parent = getattr(parent, "as_parent", None)
    if callable(as_parent):
        return as_parent()
    if not isinstance(parent, Mapping):
        raise ManifestError(
            f"parent {parent!r} is a {type(parent).__name__}; expected a ModelVersion or a mapping "
            "with registry, model, version and manifest_sha256"
        )
    return dict(parent)


def _spec_json(spec: Any) -> Any:
    return spec.to_json() if isinstance(spec, ModelSpec) else _plain(spec)


def _schema_json(feature_schema: Any) -> Any:
    return feature_schema.to_json() if isinstance(feature_schema, FeatureSchema) else _plain(feature_schema)


def _plain(value: Any) -> Any:
    """Return a JSON-only copy of ``value`` (tuples become lists), or raise ManifestError."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ManifestError(f"manifest field value {value!r} is not JSON-serialisable ({e})") from e


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result
