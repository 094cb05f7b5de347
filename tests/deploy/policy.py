"""Security and lifecycle policy for the rendered manifests.

Schema validation (kubernetes-validate, the Dask CRD schema) accepts unknown kinds it has
no schema for only by skipping them, and it does not check enum values such as
concurrencyPolicy or imagePullPolicy, so this module checks those fields itself.
``violations(objects)`` returns one readable line per problem; an empty list passes.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any, Iterator

KNOWN_KINDS = {
    "Namespace",
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "ConfigMap",
    "NetworkPolicy",
    "CronJob",
    "Job",
    "DaskCluster",
}
JOB_RESTART_POLICIES = {"Never"}
SERVICE_RESTART_POLICIES = {None, "Always"}
PULL_POLICIES = {"IfNotPresent", "Always"}
CONCURRENCY_POLICIES = {"Forbid"}
RUN_AS_USER = 10001
# Dask pods serve /health on their dashboard port; Job pods have no probes.
HEALTH_PATH = "/health"

_QUANTITY = re.compile(r"^([0-9.]+)(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
_SCALE = {None: 1, "m": Decimal("0.001"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def violations(objects: list[dict[str, Any]]) -> list[str]:
    problems: list[str] = []
    for obj in objects:
        kind = obj.get("kind")
        name = f"{kind}/{obj.get('metadata', {}).get('name')}"
        if kind not in KNOWN_KINDS:
            problems.append(f"{name}: unknown kind {kind!r}; the policy knows {', '.join(sorted(KNOWN_KINDS))}")
            continue
        if kind == "Namespace":
            problems += _check_namespace(name, obj)
        if kind == "CronJob":
            problems += _check_cron_job(name, obj["spec"])
        if kind == "Job":
            problems += _check_job(name, obj["spec"])
        for where, pod, job in _pod_specs(obj):
            problems += _check_pod(f"{name} {where}", pod, job)
    return problems


def _pod_specs(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], bool]]:
    """Yield (location, pod spec, is a Job pod) for every pod template in ``obj``."""
    spec = obj.get("spec", {})
    if obj["kind"] == "CronJob":
        yield "jobTemplate", spec["jobTemplate"]["spec"]["template"]["spec"], True
    elif obj["kind"] == "Job":
        yield "template", spec["template"]["spec"], True
    elif obj["kind"] == "DaskCluster":
        yield "scheduler", spec["scheduler"]["spec"], False
        yield "worker", spec["worker"]["spec"], False


def _check_namespace(name: str, obj: dict[str, Any]) -> list[str]:
    labels = obj["metadata"].get("labels", {})
    if labels.get("pod-security.kubernetes.io/enforce") != "restricted":
        return [f"{name}: label pod-security.kubernetes.io/enforce must be 'restricted'"]
    return []


def _check_cron_job(name: str, spec: dict[str, Any]) -> list[str]:
    problems = []
    if spec.get("concurrencyPolicy") not in CONCURRENCY_POLICIES:
        problems.append(f"{name}: concurrencyPolicy {spec.get('concurrencyPolicy')!r} not in {sorted(CONCURRENCY_POLICIES)}")
    for field in ("startingDeadlineSeconds", "successfulJobsHistoryLimit", "failedJobsHistoryLimit"):
        if not _positive_int(spec.get(field)):
            problems.append(f"{name}: {field} must be a positive integer, got {spec.get(field)!r}")
    return problems + _check_job(f"{name} jobTemplate", spec["jobTemplate"]["spec"])


def _check_job(name: str, spec: dict[str, Any]) -> list[str]:
    problems = []
    backoff = spec.get("backoffLimit")
    if not isinstance(backoff, int) or isinstance(backoff, bool) or backoff < 0:
        problems.append(f"{name}: backoffLimit must be set to an integer >= 0, got {backoff!r}")
    for field in ("activeDeadlineSeconds", "ttlSecondsAfterFinished"):
        if not _positive_int(spec.get(field)):
            problems.append(f"{name}: {field} must be a positive integer, got {spec.get(field)!r}")
    return problems


def _check_pod(name: str, pod: dict[str, Any], job: bool) -> list[str]:
    problems = []
    allowed_restart = JOB_RESTART_POLICIES if job else SERVICE_RESTART_POLICIES
    if pod.get("restartPolicy") not in allowed_restart:
        problems.append(f"{name}: restartPolicy {pod.get('restartPolicy')!r} not in {sorted(map(str, allowed_restart))}")
    if pod.get("automountServiceAccountToken") is not False:
        problems.append(f"{name}: automountServiceAccountToken must be false; these pods do not call the Kubernetes API")
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            problems.append(f"{name}: {field} must not be set")
    if any("hostPath" in volume for volume in pod.get("volumes", [])):
        problems.append(f"{name}: hostPath volumes are not allowed")

    pod_security = pod.get("securityContext", {})
    for container in pod.get("initContainers", []) + pod.get("containers", []):
        problems += _check_container(f"{name} container {container.get('name')!r}", container, pod_security, job)
    return problems


def _check_container(name: str, container: dict[str, Any], pod_security: dict[str, Any], job: bool) -> list[str]:
    problems = []
    security = container.get("securityContext", {})

    def effective(field: str) -> Any:
        return security.get(field, pod_security.get(field))

    if effective("runAsNonRoot") is not True:
        problems.append(f"{name}: runAsNonRoot must be true")
    if effective("runAsUser") != RUN_AS_USER:
        problems.append(f"{name}: runAsUser must be {RUN_AS_USER} (the image's user), got {effective('runAsUser')!r}")
    if (effective("seccompProfile") or {}).get("type") != "RuntimeDefault":
        problems.append(f"{name}: seccompProfile.type must be RuntimeDefault")
    if security.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{name}: allowPrivilegeEscalation must be false")
    if security.get("readOnlyRootFilesystem") is not True:
        problems.append(f"{name}: readOnlyRootFilesystem must be true")
    if security.get("privileged"):
        problems.append(f"{name}: privileged must not be set")
    capabilities = security.get("capabilities", {})
    if capabilities.get("drop") != ["ALL"] or capabilities.get("add"):
        problems.append(f"{name}: capabilities must drop ALL and add none, got {capabilities!r}")

    problems += _check_image(name, container)
    problems += _check_resources(name, container.get("resources", {}))
    mounts = {mount["mountPath"] for mount in container.get("volumeMounts", [])}
    if "/tmp" not in mounts:
        problems.append(f"{name}: /tmp must be a mounted volume, because the root file system is read-only")
    problems += _check_probes(name, container, job)
    return problems


def _check_image(name: str, container: dict[str, Any]) -> list[str]:
    problems = []
    image = container.get("image", "")
    tag = image.rsplit("/", 1)[-1].partition(":")[2].partition("@")[0]
    if "@sha256:" not in image and tag in ("", "latest"):
        problems.append(f"{name}: image {image!r} must carry a version tag or a digest")
    if container.get("imagePullPolicy") not in PULL_POLICIES:
        problems.append(f"{name}: imagePullPolicy {container.get('imagePullPolicy')!r} not in {sorted(PULL_POLICIES)}")
    return problems


def _check_resources(name: str, resources: dict[str, Any]) -> list[str]:
    problems = []
    requests, limits = resources.get("requests", {}), resources.get("limits", {})
    for kind, values in (("requests", requests), ("limits", limits)):
        for resource in ("cpu", "memory"):
            if resource not in values:
                problems.append(f"{name}: resources.{kind}.{resource} is missing")
    for resource in set(requests) & set(limits):
        if _quantity(requests[resource]) > _quantity(limits[resource]):
            problems.append(f"{name}: request {resource}={requests[resource]} exceeds its limit {limits[resource]}")
    for resource in set(requests) | set(limits):
        # Extended resources such as nvidia.com/gpu cannot be overcommitted.
        if "/" in resource and requests.get(resource) != limits.get(resource):
            problems.append(f"{name}: {resource} request and limit must be equal")
    return problems


def _check_probes(name: str, container: dict[str, Any], job: bool) -> list[str]:
    probes = {kind: container.get(kind) for kind in ("readinessProbe", "livenessProbe", "startupProbe")}
    if job:
        present = sorted(kind for kind, probe in probes.items() if probe)
        return [f"{name}: Job containers run to completion and take no probes, found {present}"] if present else []
    problems = []
    ports = {port.get("name"): port.get("containerPort") for port in container.get("ports", [])}
    for kind in ("readinessProbe", "livenessProbe"):
        http = (probes[kind] or {}).get("httpGet")
        if not http:
            problems.append(f"{name}: {kind} must be an httpGet on {HEALTH_PATH}")
            continue
        if http.get("path") != HEALTH_PATH:
            problems.append(f"{name}: {kind} path {http.get('path')!r} must be {HEALTH_PATH}")
        if http.get("port") not in ports and http.get("port") not in ports.values():
            problems.append(f"{name}: {kind} port {http.get('port')!r} is not a port of the container ({sorted(ports)})")
    return problems


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _quantity(value: Any) -> Decimal:
    match = _QUANTITY.match(str(value))
    if match is None:
        raise ValueError(f"unsupported resource quantity {value!r}")
    return Decimal(match[1]) * _SCALE[match[2]]
