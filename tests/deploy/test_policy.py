"""The policy and schema checks reject what they must: each case breaks one rule."""

from __future__ import annotations

import copy

import pytest

from pipeline.deploy import build_migration_job
from tests.deploy.conftest import find
from tests.deploy.policy import violations
from tests.deploy.schemas import schema_errors

IMAGE = "surgery-pipeline:0.1.0"


def job() -> dict:
    return build_migration_job("five-new-action.yaml", namespace="surgery", image=IMAGE, suffix="abc123")


def pod(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def container(obj: dict) -> dict:
    return pod(obj)["containers"][0]


def test_valid_job_passes():
    assert violations([job()]) == []
    assert schema_errors(job()) == []


def without_run_as_non_root(obj):
    del pod(obj)["securityContext"]["runAsNonRoot"]
    del container(obj)["securityContext"]["runAsNonRoot"]


def without_limits(obj):
    del container(obj)["resources"]["limits"]


def request_above_limit(obj):
    container(obj)["resources"]["requests"]["memory"] = "16Gi"


def unequal_gpu(obj):
    container(obj)["resources"]["requests"]["nvidia.com/gpu"] = "1"
    container(obj)["resources"]["limits"]["nvidia.com/gpu"] = "2"


def writable_root(obj):
    container(obj)["securityContext"]["readOnlyRootFilesystem"] = False


def escalation_allowed(obj):
    del container(obj)["securityContext"]["allowPrivilegeEscalation"]


def added_capability(obj):
    container(obj)["securityContext"]["capabilities"]["add"] = ["NET_ADMIN"]


def unconfined_seccomp(obj):
    pod(obj)["securityContext"]["seccompProfile"] = {"type": "Unconfined"}
    container(obj)["securityContext"]["seccompProfile"] = {"type": "Unconfined"}


def latest_image(obj):
    container(obj)["image"] = "surgery-pipeline:latest"


def bad_pull_policy(obj):
    container(obj)["imagePullPolicy"] = "Sometimes"


def restart_always(obj):
    pod(obj)["restartPolicy"] = "Always"


def no_ttl(obj):
    del obj["spec"]["ttlSecondsAfterFinished"]


def no_deadline(obj):
    del obj["spec"]["activeDeadlineSeconds"]


def job_with_probe(obj):
    container(obj)["livenessProbe"] = {"httpGet": {"path": "/health", "port": 8787}}


def token_mounted(obj):
    pod(obj)["automountServiceAccountToken"] = True


def host_path(obj):
    pod(obj)["volumes"].append({"name": "host", "hostPath": {"path": "/var/run"}})


def no_tmp(obj):
    container(obj)["volumeMounts"] = [m for m in container(obj)["volumeMounts"] if m["mountPath"] != "/tmp"]


def unknown_kind(obj):
    obj["kind"] = "Jobb"


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (without_run_as_non_root, "runAsNonRoot must be true"),
        (without_limits, "resources.limits.cpu is missing"),
        (request_above_limit, "request memory=16Gi exceeds its limit 8Gi"),
        (unequal_gpu, "nvidia.com/gpu request and limit must be equal"),
        (writable_root, "readOnlyRootFilesystem must be true"),
        (escalation_allowed, "allowPrivilegeEscalation must be false"),
        (added_capability, "capabilities must drop ALL and add none"),
        (unconfined_seccomp, "seccompProfile.type must be RuntimeDefault"),
        (latest_image, "must carry a version tag or a digest"),
        (bad_pull_policy, "imagePullPolicy 'Sometimes' not in"),
        (restart_always, "restartPolicy 'Always' not in"),
        (no_ttl, "ttlSecondsAfterFinished must be a positive integer"),
        (no_deadline, "activeDeadlineSeconds must be a positive integer"),
        (job_with_probe, "Job containers run to completion and take no probes"),
        (token_mounted, "automountServiceAccountToken must be false"),
        (host_path, "hostPath volumes are not allowed"),
        (no_tmp, "/tmp must be a mounted volume"),
        (unknown_kind, "unknown kind 'Jobb'"),
    ],
)
def test_policy_rejects(mutate, expected):
    obj = job()
    mutate(obj)
    problems = violations([obj])
    assert any(expected in problem for problem in problems), problems


@pytest.mark.parametrize("value", ["Allow", "Replace", "forbid", None])
def test_concurrency_policy_must_forbid(rendered, value):
    cron = copy.deepcopy(find(rendered["prod"], "CronJob", "surgery-schedule"))
    cron["spec"]["concurrencyPolicy"] = value
    assert any("concurrencyPolicy" in problem for problem in violations([cron]))


def test_cron_job_needs_history_limits(rendered):
    cron = copy.deepcopy(find(rendered["prod"], "CronJob", "surgery-schedule"))
    del cron["spec"]["failedJobsHistoryLimit"]
    del cron["spec"]["startingDeadlineSeconds"]
    problems = violations([cron])
    assert any("failedJobsHistoryLimit" in problem for problem in problems)
    assert any("startingDeadlineSeconds" in problem for problem in problems)


def test_dask_probes_required(rendered):
    cluster = copy.deepcopy(find(rendered["prod"], "DaskCluster", "surgery-dask"))
    worker = cluster["spec"]["worker"]["spec"]["containers"][0]
    del worker["readinessProbe"]
    worker["livenessProbe"]["httpGet"]["port"] = "http-metrics"
    problems = violations([cluster])
    assert any("readinessProbe must be an httpGet on /health" in problem for problem in problems)
    assert any("livenessProbe port 'http-metrics' is not a port" in problem for problem in problems)


def test_namespace_needs_restricted(rendered):
    namespace = copy.deepcopy(find(rendered["prod"], "Namespace", "surgery"))
    namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] = "baseline"
    assert violations([namespace]) != []


def test_schema_rejects_unknown_field():
    obj = job()
    container(obj)["securityContex"] = {}
    problems = schema_errors(obj)
    assert any("securityContex" in problem for problem in problems), problems


def test_schema_rejects_unknown_kind():
    obj = job()
    obj["kind"] = "Jobb"
    assert any("Couldn't find schema for kind Jobb" in problem for problem in schema_errors(obj))


def test_crd_schema_rejects_numeric_target_port(rendered):
    cluster = copy.deepcopy(find(rendered["prod"], "DaskCluster", "surgery-dask"))
    cluster["spec"]["scheduler"]["service"]["ports"][0]["targetPort"] = 8786
    problems = schema_errors(cluster)
    assert any("spec.scheduler.service.ports.0.targetPort: 8786 is not of type 'string'" in p for p in problems), problems


def test_crd_schema_rejects_unknown_field(rendered):
    cluster = copy.deepcopy(find(rendered["prod"], "DaskCluster", "surgery-dask"))
    cluster["spec"]["worker"]["spec"]["toleration"] = cluster["spec"]["worker"]["spec"].pop("tolerations")
    problems = schema_errors(cluster)
    assert any("'toleration' was unexpected" in problem for problem in problems), problems


def test_crd_schema_rejects_missing_replicas_type(rendered):
    cluster = copy.deepcopy(find(rendered["prod"], "DaskCluster", "surgery-dask"))
    cluster["spec"]["worker"]["replicas"] = "4"
    assert any("replicas" in problem for problem in schema_errors(cluster))
