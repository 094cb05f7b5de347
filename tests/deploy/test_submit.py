"""`surgery submit` against the real kubernetes client and an HTTP server on 127.0.0.1.

The server responds only to the requests each test scripts (see api_server.py). So these
tests check what the client sends and how submit reports the responses. They do not
show that a real API server accepts the Job: the schema and policy tests cover that.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
import yaml

from pipeline.cli.main import main
from pipeline.deploy import build_migration_job
from tests.deploy.api_server import ScriptedApiServer, config_map_body, status_body, write_kubeconfig
from tests.deploy.conftest import ROOT

WORKFLOW = ROOT / "workflows" / "five-new-action.yaml"
NAMESPACE = "surgery"
IMAGE = "registry.example.com/ml/surgery-pipeline:0.1.0"
JOBS_PATH = f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs"
WORKFLOWS_PATH = f"/api/v1/namespaces/{NAMESPACE}/configmaps/surgery-workflows"
SPECS_PATH = f"/api/v1/namespaces/{NAMESPACE}/configmaps/surgery-workflow-specs"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("SURGERY_IMAGE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))


def deployed_routes(workflow: Path = WORKFLOW) -> dict:
    """Routes for both ConfigMaps holding exactly the repository's workflows/ files."""
    workflows = {p.name: p.read_text() for p in (ROOT / "workflows").glob("*.yaml")}
    workflows[workflow.name] = workflow.read_text()
    specs = {p.name: p.read_text() for p in (ROOT / "workflows" / "specs").glob("*.yaml")}
    return {
        ("GET", WORKFLOWS_PATH): (200, config_map_body("surgery-workflows", NAMESPACE, workflows)),
        ("GET", SPECS_PATH): (200, config_map_body("surgery-workflow-specs", NAMESPACE, specs)),
    }


def submit(*args: str) -> int:
    return main(["submit", *args])


def use_server(monkeypatch, tmp_path, server: ScriptedApiServer) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    write_kubeconfig(kubeconfig, server.url)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))


def test_dry_run_prints_manifest(capsys):
    assert submit(str(WORKFLOW), "--dry-run", "--image", IMAGE) == 0
    job = yaml.safe_load(capsys.readouterr().out)
    name = job["metadata"]["name"]
    assert name.startswith("surgery-migrate-five-new-action-")
    expected = build_migration_job(WORKFLOW.name, namespace=NAMESPACE, image=IMAGE, suffix=name.rsplit("-", 1)[1])
    assert job == expected
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] + container["args"] == ["surgery", "run", "/etc/surgery/workflows/five-new-action.yaml"]


def test_dry_run_contacts_nothing(monkeypatch, tmp_path, capsys):
    with ScriptedApiServer() as server:
        use_server(monkeypatch, tmp_path, server)
        assert submit(str(WORKFLOW), "--dry-run") == 0
    assert server.requests == []
    assert "kind: Job" in capsys.readouterr().out


def test_dry_run_names_are_unique(capsys):
    names = set()
    for _ in range(3):
        assert submit(str(WORKFLOW), "--dry-run") == 0
        names.add(yaml.safe_load(capsys.readouterr().out)["metadata"]["name"])
    assert len(names) == 3


def test_default_image_follows_env(monkeypatch, capsys):
    monkeypatch.setenv("SURGERY_IMAGE", IMAGE)
    assert submit(str(WORKFLOW), "--dry-run") == 0
    job = yaml.safe_load(capsys.readouterr().out)
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE


@pytest.mark.parametrize(
    "image, expected",
    [
        ("surgery-pipeline", "has no tag or digest"),
        ("surgery-pipeline:latest", "moving tag 'latest'"),
        ("Bad Image:1", "invalid image reference"),
    ],
)
def test_unpinned_image_rejected(image, expected, capsys):
    assert submit(str(WORKFLOW), "--dry-run", "--image", image) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert repr(image) in err


def test_invalid_workflow_rejected(tmp_path, capsys):
    bad = tmp_path / "broken.yaml"
    bad.write_text("version: 1\nname: broken\n")
    assert submit(str(bad), "--dry-run") == 2
    err = capsys.readouterr().err
    assert "broken.yaml" in err
    assert "missing" in err


def test_unmounted_spec_path_rejected(tmp_path, capsys):
    shutil.copytree(ROOT / "workflows" / "specs", tmp_path / "models")
    text = WORKFLOW.read_text().replace("specs/", "models/")
    workflow = tmp_path / "moved-specs.yaml"
    workflow.write_text(text)
    assert submit(str(workflow), "--dry-run") == 2
    err = capsys.readouterr().err
    assert "old_spec: spec path 'models/five-v1.yaml' is not mounted in the migration Job" in err
    assert "workflows/Kustomization" in err


def test_local_probe_batch_rejected(tmp_path, capsys):
    shutil.copytree(ROOT / "workflows" / "specs", tmp_path / "specs")
    (tmp_path / "probes.safetensors").write_bytes(b"not read by submit")
    workflow = tmp_path / "local-probes.yaml"
    workflow.write_text(WORKFLOW.read_text().replace("verify:\n", "verify:\n  probe_batch: probes.safetensors\n"))
    assert submit(str(workflow), "--dry-run") == 2
    err = capsys.readouterr().err
    assert "verify.probe_batch: 'probes.safetensors' is a local file" in err


def test_bad_file_name_rejected(tmp_path, capsys):
    shutil.copytree(ROOT / "workflows" / "specs", tmp_path / "specs")
    workflow = tmp_path / "new action.yaml"
    workflow.write_text(WORKFLOW.read_text())
    assert submit(str(workflow), "--dry-run") == 2
    assert "invalid workflow file name 'new action.yaml'" in capsys.readouterr().err


def test_closed_port_connection_error(monkeypatch, tmp_path, capsys):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    kubeconfig = tmp_path / "kubeconfig"
    write_kubeconfig(kubeconfig, f"http://127.0.0.1:{port}")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))

    assert submit(str(WORKFLOW)) == 1
    err = capsys.readouterr().err
    assert f"cannot reach the Kubernetes API server http://127.0.0.1:{port}" in err
    assert f"kubeconfig {kubeconfig}, context local" in err
    assert "kubectl config current-context" in err


def test_missing_kubeconfig_error(capsys):
    assert submit(str(WORKFLOW)) == 1
    err = capsys.readouterr().err
    assert "cannot load kubeconfig" in err
    assert "no-kubeconfig" in err


def test_no_kubeconfig_outside_pod(monkeypatch, capsys):
    monkeypatch.delenv("KUBECONFIG")
    assert submit(str(WORKFLOW)) == 1
    err = capsys.readouterr().err
    assert "no kubeconfig at" in err
    assert "KUBECONFIG is not set" in err


def test_pod_account_used_without_kubeconfig(monkeypatch, capsys):
    # Without a kubeconfig but with the variables Kubernetes sets in every pod, submit
    # uses the pod's service account, whose token file exists only inside a pod.
    monkeypatch.delenv("KUBECONFIG")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(port))
    assert submit(str(WORKFLOW)) == 1
    err = capsys.readouterr().err
    if Path("/var/run/secrets/kubernetes.io/serviceaccount/token").exists():
        assert "(in-cluster service account)" in err
    else:
        assert "cannot use the pod's service account" in err


def test_unknown_context_error(monkeypatch, tmp_path, capsys):
    with ScriptedApiServer() as server:
        use_server(monkeypatch, tmp_path, server)
        assert submit(str(WORKFLOW), "--context", "prod-cluster") == 1
    assert "context 'prod-cluster' not found" in capsys.readouterr().err
    assert server.requests == []


def test_forbidden_job_permission_error(monkeypatch, tmp_path, capsys):
    forbidden = status_body(
        403,
        "Forbidden",
        'jobs.batch is forbidden: User "alice" cannot create resource "jobs" in API group "batch" in the namespace "surgery"',
    )
    with ScriptedApiServer(routes={**deployed_routes(), ("POST", JOBS_PATH): (403, forbidden)}) as server:
        use_server(monkeypatch, tmp_path, server)
        assert submit(str(WORKFLOW)) == 1
    err = capsys.readouterr().err
    assert "permission denied: cannot create jobs in namespace 'surgery'" in err
    assert 'User "alice" cannot create resource "jobs"' in err
    assert "service account 'surgery-submit'" in err
    assert "kubectl create rolebinding" in err
    assert [r.method for r in server.requests] == ["GET", "GET", "POST"]


def test_forbidden_config_map_permission_error(monkeypatch, tmp_path, capsys):
    forbidden = status_body(403, "Forbidden", 'configmaps "surgery-workflows" is forbidden')
    with ScriptedApiServer(routes={("GET", WORKFLOWS_PATH): (403, forbidden)}) as server:
        use_server(monkeypatch, tmp_path, server)
        assert submit(str(WORKFLOW)) == 1
    err = capsys.readouterr().err
    assert "cannot get configmaps in namespace 'surgery'" in err
    assert all(r.method == "GET" for r in server.requests)


def test_unauthorized_credentials_error(monkeypatch, tmp_path, capsys):
    with ScriptedApiServer(routes={("GET", WORKFLOWS_PATH): (401, status_body(401, "Unauthorized", "Unauthorized"))}) as server:
        use_server(monkeypatch, tmp_path, server)
        assert submit(str(WORKFLOW)) == 1
    assert "rejected the credentials" in capsys.readouterr().err


def test_created_job_is_exact_manifest(monkeypatch, tmp_path, capsys):
    with ScriptedApiServer(routes={**deployed_routes(), ("POST", JOBS_PATH): (201, "echo")}) as server:
        use_server(monkeypatch, tmp_path, server)
        assert submit(str(WORKFLOW), "--image", IMAGE) == 0
    out = capsys.readouterr().out
    post = server.requests[-1]
    name = post.body["metadata"]["name"]
    assert f"created Job {name} in namespace surgery" in out
    assert post.path == JOBS_PATH
    assert post.query == {"fieldValidation": ["Strict"]}
    assert post.headers["authorization"] == "Bearer test-token"
    assert post.headers["content-type"] == "application/json"
    expected = build_migration_job(WORKFLOW.name, namespace=NAMESPACE, image=IMAGE, suffix=name.rsplit("-", 1)[1])
    assert post.body == expected


def test_missing_config_map_error(monkeypatch, tmp_path, capsys):
    with ScriptedApiServer() as server:
        use_server(monkeypatch, tmp_path, server)
        assert submit(str(WORKFLOW)) == 1
    err = capsys.readouterr().err
    assert "ConfigMap 'surgery-workflows' not found in namespace 'surgery'" in err
    assert "kubectl apply -k" in err
    assert [r.method for r in server.requests] == ["GET"]


def test_undeployed_workflow_error(monkeypatch, tmp_path, capsys):
    routes = deployed_routes()
    status, body = routes[("GET", WORKFLOWS_PATH)]
    del body["data"][WORKFLOW.name]
    with ScriptedApiServer(routes=routes) as server:
        use_server(monkeypatch, tmp_path, server)
        assert submit(str(WORKFLOW)) == 1
    err = capsys.readouterr().err
    assert "has no key 'five-new-action.yaml'" in err
    assert all(r.method == "GET" for r in server.requests)


def test_changed_spec_blocks_submit(monkeypatch, tmp_path, capsys):
    routes = deployed_routes()
    status, body = routes[("GET", SPECS_PATH)]
    body["data"]["five-v1.yaml"] += "# edited in the cluster\n"
    with ScriptedApiServer(routes={**routes, ("POST", JOBS_PATH): (201, "echo")}) as server:
        use_server(monkeypatch, tmp_path, server)
        assert submit(str(WORKFLOW)) == 1
    err = capsys.readouterr().err
    assert "(old_spec) differs from key 'five-v1.yaml' of ConfigMap 'surgery-workflow-specs'" in err
    assert all(r.method == "GET" for r in server.requests)
