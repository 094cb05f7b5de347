"""Schema validation: built-in kinds with kubernetes-validate, DaskCluster with its CRD.

Both are strict: an unknown field is an error, as with `kubectl apply --validate=strict`
and the API server's Strict field validation, which `surgery submit` requests.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from importlib import resources
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

# The oldest Kubernetes release the manifests target (the Pod Security label in
# k8s/base/namespace.yaml pins the same) and the newest kubernetes-validate 1.37.0 ships.
KUBERNETES_VERSIONS = ("1.31", "1.37")
DASK_API_VERSION = "kubernetes.dask.org/v1"
# Where the dask-kubernetes wheel keeps the CRD that its Helm chart installs.
DASK_CRD = "operator/deployment/helm/dask-kubernetes-operator/crds/daskcluster.yaml"


def schema_errors(obj: dict[str, Any]) -> list[str]:
    """Return one line per schema violation of ``obj``; an empty list passes."""
    kind = obj.get("kind")
    if kind == "DaskCluster":
        return dask_cluster_errors(obj)
    problems = []
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(map(str, e.path))
            problems.append(f"{kind}/{obj['metadata'].get('name')} against Kubernetes {version}: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            problems.append(e.message)
    return problems


@lru_cache(maxsize=1)
def dask_cluster_schema() -> dict[str, Any]:
    """The openAPIV3Schema of DaskCluster v1 from the installed dask-kubernetes, made strict."""
    crd = yaml.safe_load(resources.files("dask_kubernetes").joinpath(DASK_CRD).read_text())
    assert crd["spec"]["names"]["kind"] == "DaskCluster", crd["spec"]["names"]
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))


def dask_cluster_errors(obj: dict[str, Any]) -> list[str]:
    name = f"DaskCluster/{obj.get('metadata', {}).get('name')}"
    if obj.get("apiVersion") != DASK_API_VERSION:
        return [f"{name}: apiVersion {obj.get('apiVersion')!r} is not {DASK_API_VERSION}"]
    # The API server checks apiVersion, kind and metadata itself; the CRD schema covers spec.
    body = {key: value for key, value in obj.items() if key not in ("apiVersion", "kind", "metadata")}
    validator = jsonschema.Draft7Validator(dask_cluster_schema())
    return [f"{name}: {'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(body)]


def _strict(schema: Any) -> Any:
    """Forbid properties a structural schema does not declare, as Strict field validation does."""
    if isinstance(schema, dict):
        for value in schema.values():
            _strict(value)
        declares_properties = "properties" in schema
        keeps_unknown = schema.get("x-kubernetes-preserve-unknown-fields") or "additionalProperties" in schema
        if declares_properties and not keeps_unknown:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        for value in schema:
            _strict(value)
    return schema
