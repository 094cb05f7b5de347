"""The Dockerfile, checked without a Docker engine: stages, user, bases, secrets, install.

The image installs with .ci/setup, the script CI runs on every run. So these tests check
that the Dockerfile runs exactly that script and installs nothing else, and they do not
run the torch install again. The build context is computed from .dockerignore with
docker-py's implementation of its rules, and a wheel is built from it to show that the
context holds everything the package build reads.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from docker.utils.build import exclude_paths
from dockerfile_parse import DockerfileParser

from tests.deploy.conftest import ROOT

SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
CREDENTIAL_PATH = re.compile(r"(^|/)(\.aws|\.kube|\.ssh|\.docker|\.env|kubeconfig|id_rsa|id_ed25519)(/|$)|\.pem$|\.key$")
FULL_VERSION = re.compile(r"\d+\.\d+\.\d+")
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


def instructions() -> list[dict]:
    with (ROOT / "Dockerfile").open("rb") as dockerfile:
        return [i for i in DockerfileParser(fileobj=dockerfile).structure if i["instruction"] != "COMMENT"]


def stages() -> list[tuple[str, list[dict]]]:
    """Return (FROM value, instructions of the stage) for each stage."""
    result: list[tuple[str, list[dict]]] = []
    for instruction in instructions():
        if instruction["instruction"] == "FROM":
            result.append((instruction["value"], []))
        elif result:
            result[-1][1].append(instruction)
    return result


def global_args() -> dict[str, str]:
    args = {}
    for instruction in instructions():
        if instruction["instruction"] == "FROM":
            break
        if instruction["instruction"] == "ARG":
            name, _, default = instruction["value"].partition("=")
            args[name] = default
    return args


def base_images() -> list[str]:
    """Every image a FROM pulls with the default build arguments (not earlier stages)."""
    args = global_args()
    stage_names: set[str] = set()
    images = []
    for value, _ in stages():
        image, _, alias = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m[1] or m[2]], value).partition(" AS ")
        if image.strip() not in stage_names:
            images.append(image.strip())
        stage_names.add(alias.strip())
    return images


def documented_bases() -> list[str]:
    """BASE values the Dockerfile comments and docs/deploy.md give for other builds."""
    text = (ROOT / "Dockerfile").read_text() + (ROOT / "docs" / "deploy.md").read_text()
    return re.findall(r"--build-arg BASE=(\S+)", text)


def is_pinned(image: str) -> bool:
    if DIGEST.search(image):
        return True
    tag = image.rsplit("/", 1)[-1].partition(":")[2]
    return tag != "latest" and bool(FULL_VERSION.search(tag))


def test_multi_stage():
    names = [value.partition(" AS ")[2] for value, _ in stages()]
    assert len(names) >= 2
    assert names[-1] == "runtime"
    copies = [i["value"] for _, body in stages()[1:] for i in body if i["instruction"] == "COPY"]
    assert any(copy.startswith("--from=build ") for copy in copies)


def test_final_stage_user_non_root():
    _, body = stages()[-1]
    users = [i["value"] for i in body if i["instruction"] == "USER"]
    assert users, "the final stage sets no USER"
    user, _, group = users[-1].partition(":")
    assert user.isdigit(), f"USER {users[-1]} must be a numeric uid"
    assert int(user) != 0, f"USER {users[-1]} must not be root"
    assert group == "" or group.isdigit(), f"USER {users[-1]} must name a numeric gid"
    assert group != "0", f"USER {users[-1]} must not use the root group"
    # Kubernetes runs the pods as the same uid (runAsUser in k8s/).
    assert int(user) == 10001


@pytest.mark.parametrize("image", base_images() + documented_bases())
def test_base_pinned(image):
    assert is_pinned(image), f"base image {image!r} must carry a full version tag (x.y.z) or a digest"


@pytest.mark.parametrize("image", ["python:latest", "python:3.11-slim", "python", "nvidia/cuda:12-runtime"])
def test_unpinned_base_detected(image):
    assert not is_pinned(image)


def test_gpu_base_documented():
    assert any(base.startswith("nvidia/cuda:") for base in documented_bases())


def test_no_secrets():
    for instruction in instructions():
        kind, value = instruction["instruction"], instruction["value"]
        if kind in ("ENV", "ARG"):
            for name, _, default in (part.partition("=") for part in shlex.split(value)):
                if SECRET_NAME.search(name):
                    assert default == "", f"{kind} {name} sets a secret-like value"
        if kind in ("COPY", "ADD"):
            sources = [s for s in shlex.split(value)[:-1] if not s.startswith("--")]
            for source in sources:
                assert not CREDENTIAL_PATH.search(source), f"{kind} copies credentials: {source}"
        assert kind != "ADD", "use COPY; ADD fetches URLs and unpacks archives"


def test_install_is_ci_setup():
    runs = [i["value"] for i in instructions() if i["instruction"] == "RUN"]
    installs = [run for run in runs if ".ci/setup" in run]
    assert len(installs) == 1, installs
    assert re.search(r"(^|&& )bash \.ci/setup [a-z0-9,]+$", installs[0].strip()), installs[0]
    # No other RUN installs Python packages, so the image gets what CI installs.
    assert not [run for run in runs if re.search(r"pip3? install|uv pip|poetry|conda", run)]
    ci_run = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^bash \.ci/setup test$", ci_run, re.MULTILINE)


def test_image_extras_installed_by_ci():
    extras = re.search(r"bash \.ci/setup ([a-z0-9,]+)", (ROOT / "Dockerfile").read_text())[1].split(",")
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def names(requirements):
        return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}

    tested = names(optional["test"])
    for extra in extras:
        assert extra in optional, f"the Dockerfile installs unknown extra {extra!r}"
        missing = names(optional[extra]) - tested
        assert not missing, f"extra {extra!r} needs {missing}, which CI's test extra does not install"


def build_context() -> set[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    return set(exclude_paths(str(ROOT), patterns))


def test_context_holds_copied_files():
    context = build_context()
    for instruction in instructions():
        if instruction["instruction"] == "COPY" and not instruction["value"].startswith("--from="):
            for source in shlex.split(instruction["value"])[:-1]:
                assert source in context, f"COPY {source}: excluded from the build context by .dockerignore"


def test_context_excludes_repository_state():
    context = build_context()
    for path in (".git", ".venv", "tests", "k8s", "workflows", "bench", "docs"):
        assert not any(p == path or p.startswith(path + "/") for p in context), f"{path} is in the build context"
    assert not any("__pycache__" in p or p.endswith(".pyc") for p in context)
    assert not any(CREDENTIAL_PATH.search(p) for p in context)


def test_context_builds_package(tmp_path):
    # The same files the Dockerfile copies are enough to build the package, with its
    # package data (the Job template surgery submit loads).
    context = tmp_path / "context"
    for path in build_context():
        source = ROOT / path
        if source.is_file():
            (context / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, context / path)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(tmp_path / "dist"), str(context)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "pipeline/deploy/migration-job.yaml" in names
    assert "pipeline/cli/deploy_commands.py" in names
