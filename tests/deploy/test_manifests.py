"""Both overlays, rendered by `kubectl kustomize`, checked against schemas and the policy."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline import __version__
from tests.deploy.conftest import K8S, OVERLAYS, ROOT, find
from tests.deploy.policy import violations
from tests.deploy.schemas import schema_errors

EXPECTED_KINDS = {
    ("Namespace", "surgery"),
    ("ServiceAccount", "surgery-runner"),
    ("ServiceAccount", "surgery-submit"),
    ("Role", "surgery-submit"),
    ("RoleBinding", "surgery-submit"),
    ("ConfigMap", "surgery-settings"),
    ("ConfigMap", "surgery-workflows"),
    ("ConfigMap", "surgery-workflow-specs"),
    ("NetworkPolicy", "surgery-dask-ingress"),
    ("CronJob", "surgery-schedule"),
    ("DaskCluster", "surgery-dask"),
}


def worker(objects) -> dict:
    return find(objects, "DaskCluster", "surgery-dask")["spec"]["worker"]


def containers(obj) -> list[dict]:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    if obj["kind"] == "DaskCluster":
        return obj["spec"]["scheduler"]["spec"]["containers"] + obj["spec"]["worker"]["spec"]["containers"]
    return []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_objects(rendered, overlay):
    objects = rendered[overlay]
    assert {(o["kind"], o["metadata"]["name"]) for o in objects} == EXPECTED_KINDS
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {"surgery"}
    assert all(o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "surgery-pipeline" for o in objects)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_schemas(rendered, overlay):
    problems = [problem for obj in rendered[overlay] for problem in schema_errors(obj)]
    assert problems == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_policy(rendered, overlay):
    assert violations(rendered[overlay]) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_match_package(rendered, overlay):
    images = {c["image"] for obj in rendered[overlay] for c in containers(obj)}
    assert len(images) == 1, images
    assert images.pop().endswith(f"/surgery-pipeline:{__version__}" if overlay == "prod" else f"surgery-pipeline:{__version__}")


def test_prod_workers_use_gpus(rendered):
    group = worker(rendered["prod"])
    pod = group["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    args = container["args"]
    assert args[args.index("--resources") + 1] == "GPU=1"
    assert args[args.index("--nthreads") + 1] == "1"


def test_dev_workers_use_cpus(rendered):
    pod = worker(rendered["dev"])["spec"]
    (container,) = pod["containers"]
    resources = container["resources"]
    assert not any("gpu" in key for key in {**resources["requests"], **resources["limits"]})
    assert "tolerations" not in pod
    assert "nodeSelector" not in pod
    assert "--resources" not in container["args"]


def test_dev_endpoint_from_config_map(rendered):
    settings = {o["metadata"]["name"]: o for o in rendered["dev"] if o["kind"] == "ConfigMap"}["surgery-settings"]
    assert settings["data"]["AWS_ENDPOINT_URL_S3"].startswith("http://")
    assert settings["data"]["SURGERY_REGISTRY"].startswith("s3://")
    prod_settings = find(rendered["prod"], "ConfigMap", "surgery-settings")
    assert "AWS_ENDPOINT_URL_S3" not in prod_settings["data"]
    for obj in rendered["dev"]:
        for container in containers(obj):
            if container["name"] != "scheduler":
                assert {"configMapRef": {"name": "surgery-settings"}} in container["envFrom"]
                assert {"secretRef": {"name": "surgery-s3"}} in container["envFrom"]


def test_settings_scheduler_is_dask_service(rendered):
    for objects in rendered.values():
        settings = find(objects, "ConfigMap", "surgery-settings")
        cluster = find(objects, "DaskCluster", "surgery-dask")
        service_port = {p["name"]: p["port"] for p in cluster["spec"]["scheduler"]["service"]["ports"]}["tcp-comm"]
        # The Dask operator names the scheduler Service <DaskCluster name>-scheduler.
        assert settings["data"]["DASK_SCHEDULER_ADDRESS"] == f"tcp://surgery-dask-scheduler:{service_port}"


def test_cron_job_lifecycle(rendered):
    cron = find(rendered["prod"], "CronJob", "surgery-schedule")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = cron["spec"]["jobTemplate"]["spec"]
    container = job["template"]["spec"]["containers"][0]
    assert container["command"] + container["args"] == ["surgery", "schedule", "--workflows", "/etc/surgery/workflows"]
    rules = job["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "Ignore"
    assert rules[1]["onExitCodes"]["containerName"] == container["name"]


def test_role_is_minimal(rendered):
    role = find(rendered["prod"], "Role", "surgery-submit")
    granted = {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    assert granted == {("", "configmaps", "get"), ("batch", "jobs", "create")}
    (config_maps,) = [rule for rule in role["rules"] if rule["resources"] == ["configmaps"]]
    assert sorted(config_maps["resourceNames"]) == ["surgery-workflow-specs", "surgery-workflows"]
    runner = find(rendered["prod"], "ServiceAccount", "surgery-runner")
    assert runner["automountServiceAccountToken"] is False
    bindings = [o for o in rendered["prod"] if o["kind"] == "RoleBinding"]
    assert all(s["name"] != "surgery-runner" for b in bindings for s in b["subjects"])


def test_no_secret_in_manifests(rendered):
    for objects in rendered.values():
        assert [o for o in objects if o["kind"] == "Secret"] == []
    assert list(K8S.rglob("*secret*")) == []


def test_workflow_config_maps_hold_repository_files(rendered):
    workflows = find(rendered["dev"], "ConfigMap", "surgery-workflows")["data"]
    specs = find(rendered["dev"], "ConfigMap", "surgery-workflow-specs")["data"]
    local_workflows = {p.name: p.read_text() for p in (ROOT / "workflows").glob("*.yaml")}
    local_specs = {p.name: p.read_text() for p in (ROOT / "workflows" / "specs").glob("*.yaml")}
    missing = sorted(set(local_workflows) - set(workflows)) + sorted(f"specs/{n}" for n in set(local_specs) - set(specs))
    assert missing == [], f"add {missing} to the files lists of workflows/Kustomization"
    assert workflows == local_workflows
    assert specs == local_specs


def test_workflow_mount_layout(rendered):
    # The Job and the CronJob see workflows/ as in the repository: workflow files at the
    # top, model specs in specs/, because workflows refer to specs/<file> by relative path.
    cron = find(rendered["dev"], "CronJob", "surgery-schedule")
    template = yaml.safe_load((K8S / "base" / "migration-job.yaml").read_text())
    for pod in (cron["spec"]["jobTemplate"]["spec"]["template"]["spec"], template["spec"]["template"]["spec"]):
        volumes = {v["name"]: v.get("configMap", {}).get("name") for v in pod["volumes"]}
        (container,) = pod["containers"]
        mounts = {m["mountPath"]: (volumes[m["name"]], m.get("readOnly")) for m in container["volumeMounts"]}
        assert mounts["/etc/surgery/workflows"] == ("surgery-workflows", True)
        assert mounts["/etc/surgery/workflows/specs"] == ("surgery-workflow-specs", True)


def test_migration_template_not_rendered(rendered):
    base = (K8S / "base" / "kustomization.yaml").read_text()
    assert "migration-job.yaml" not in yaml.safe_load(base)["resources"]
    assert all(o["kind"] != "Job" for objects in rendered.values() for o in objects)


def test_base_tag_is_package_version():
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    assert kustomization["images"] == [{"name": "surgery-pipeline", "newTag": __version__}]
    for overlay in OVERLAYS:
        images = yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text())["images"]
        assert [image["newTag"] for image in images] == [__version__]


def test_kustomization_has_no_loader_flags():
    # `kubectl kustomize` must render with no flags, so nothing may depend on
    # --load-restrictor or on plugins.
    for path in list(K8S.rglob("kustomization.yaml")) + [ROOT / "workflows" / "Kustomization"]:
        text = Path(path).read_text()
        assert "LoadRestrictions" not in text
        assert "generators:" not in text
        assert "transformers:" not in text
