"""Fixtures for the deployment tests: the repository paths, kubectl, and rendered overlays."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = ("dev", "prod")
# kustomize v5 reads the `labels` and `patches` fields used in k8s/; older releases
# (such as the one inside Debian 12's kubectl 1.20) reject or ignore them.
MIN_KUSTOMIZE_MAJOR = 5


def find_kubectl() -> str:
    """Return kubectl from $KUBECTL, the test interpreter's bin folder, or PATH."""
    candidates = [os.environ.get("KUBECTL"), str(Path(sys.executable).parent / "kubectl"), shutil.which("kubectl")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(
        "kubectl not found in $KUBECTL, beside the Python interpreter or on PATH; install it with: "
        "bash k8s/install-kubectl.sh .venv"
    )


@pytest.fixture(scope="session")
def kubectl() -> str:
    path = find_kubectl()
    out = subprocess.run([path, "version", "--client", "-o", "json"], capture_output=True, text=True, check=True, timeout=60)
    kustomize = json.loads(out.stdout).get("kustomizeVersion", "")
    match = re.match(r"v?(\d+)\.", kustomize)
    assert match and int(match[1]) >= MIN_KUSTOMIZE_MAJOR, (
        f"{path} bundles kustomize {kustomize or 'unknown'}; k8s/ needs v{MIN_KUSTOMIZE_MAJOR} or newer. "
        "Install a newer kubectl with: bash k8s/install-kubectl.sh .venv"
    )
    return path


def render(kubectl: str, directory: Path) -> list[dict[str, Any]]:
    """Run `kubectl kustomize DIRECTORY` (no extra flags) and return its objects."""
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {directory} failed: {out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="session")
def rendered(kubectl: str) -> dict[str, list[dict[str, Any]]]:
    """{overlay name: rendered objects} for every overlay."""
    return {name: render(kubectl, K8S / "overlays" / name) for name in OVERLAYS}


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]
