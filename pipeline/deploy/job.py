"""The one-off migration Job: a copy of ``k8s/base/migration-job.yaml`` with a workflow named.

The template ships as package data (``migration-job.yaml`` beside this file), so that an
installed ``surgery`` builds the same Job as the repository's manifest. tests/deploy
checks that the two files are identical.
"""

from __future__ import annotations

import copy
import re
from importlib import resources
from typing import Any

import yaml

from pipeline import __version__
from pipeline.deploy.errors import InvalidImageError

TEMPLATE = "migration-job.yaml"
CONTAINER = "migrate"
WORKFLOW_MOUNT = "/etc/surgery/workflows"
# The surgery-workflow-specs ConfigMap is mounted at WORKFLOW_MOUNT/SPEC_DIR.
SPEC_DIR = "specs"
WORKFLOW_ENV = "SURGERY_WORKFLOW"
WORKFLOW_CONFIG_MAP = "surgery-workflows"
SPEC_CONFIG_MAP = "surgery-workflow-specs"
WORKFLOW_LABEL = "surgery-pipeline/workflow"
WORKFLOW_ANNOTATION = "surgery-pipeline/workflow-file"
NAME_PREFIX = "surgery-migrate-"
IMAGE_REPOSITORY = "surgery-pipeline"

# Job names become the value of the job-name label on its pods, so they obey the
# 63-character limit of a label value.
MAX_NAME_LENGTH = 63
# ConfigMap keys: letters, digits, "-", "_" and ".".
_CONFIG_MAP_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE = re.compile(
    rf"^(?:(?P<registry>[A-Za-z0-9.-]+(?::[0-9]+)?)/)?(?P<path>{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?"
    r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?$"
)


def load_template() -> dict[str, Any]:
    """Read the Job template shipped with the package."""
    text = resources.files("pipeline.deploy").joinpath(TEMPLATE).read_text(encoding="utf-8")
    return yaml.safe_load(text)


def default_image() -> str:
    """Return ``surgery-pipeline:<installed version>``, the image that matches this CLI."""
    image = f"{IMAGE_REPOSITORY}:{__version__}"
    try:
        return check_image(image)
    except InvalidImageError as e:
        raise InvalidImageError(
            f"cannot derive an image tag from the package version {__version__!r}; "
            "pass --image or set SURGERY_IMAGE to a tagged image"
        ) from e


def check_image(image: str) -> str:
    """Return ``image`` if it names a version tag or a digest, else raise InvalidImageError."""
    match = _IMAGE.match(image)
    if match is None:
        raise InvalidImageError(f"invalid image reference {image!r}; expected REPOSITORY:TAG or REPOSITORY@sha256:DIGEST")
    if match["tag"] is None and match["digest"] is None:
        raise InvalidImageError(f"image {image!r} has no tag or digest; pin it, e.g. {image}:{__version__}")
    if match["tag"] == "latest" and match["digest"] is None:
        raise InvalidImageError(f"image {image!r} uses the moving tag 'latest'; pin a version tag or a digest")
    return image


def check_workflow_file_name(file_name: str) -> str:
    """Return ``file_name`` if it can be a key of the workflow ConfigMap, else raise ValueError."""
    if not _CONFIG_MAP_KEY.match(file_name) or not file_name.endswith((".yaml", ".yml")):
        raise ValueError(
            f"invalid workflow file name {file_name!r}; expected a .yaml or .yml file name made of "
            "letters, digits, '-', '_' and '.', as in the surgery-workflows ConfigMap"
        )
    return file_name


def workflow_label(file_name: str) -> str:
    """Return the workflow's file stem as a label value: lowercase, [a-z0-9-], at most 40 characters."""
    stem = file_name.rsplit(".", 1)[0].lower()
    label = re.sub(r"[^a-z0-9]+", "-", stem).strip("-")[:40].strip("-")
    return label or "workflow"


def job_name(file_name: str, suffix: str) -> str:
    """Return ``surgery-migrate-<workflow stem>-<suffix>``, at most 63 characters."""
    if not re.fullmatch(r"[a-z0-9]{1,6}", suffix):
        raise ValueError(f"invalid Job name suffix {suffix!r}; expected 1 to 6 characters of [a-z0-9]")
    name = f"{NAME_PREFIX}{workflow_label(file_name)}-{suffix}"
    assert len(name) <= MAX_NAME_LENGTH, name
    return name


def build_migration_job(file_name: str, *, namespace: str, image: str, suffix: str) -> dict[str, Any]:
    """Build the Job that runs ``surgery run /etc/surgery/workflows/<file_name>``.

    ``file_name`` is a key of the surgery-workflows ConfigMap; ``suffix`` makes the Job
    name unique. The result differs from the template only in the name, namespace, image,
    the workflow label and annotation, ``SURGERY_WORKFLOW`` and the literal workflow path
    in the container arguments.
    """
    check_workflow_file_name(file_name)
    check_image(image)
    job = copy.deepcopy(load_template())

    template_metadata = job["metadata"]
    job["metadata"] = {
        "name": job_name(file_name, suffix),
        "namespace": namespace,
        "labels": {**template_metadata.get("labels", {}), WORKFLOW_LABEL: workflow_label(file_name)},
        "annotations": {**template_metadata.get("annotations", {}), WORKFLOW_ANNOTATION: file_name},
    }

    pod_template = job["spec"]["template"]
    pod_template["metadata"]["labels"][WORKFLOW_LABEL] = workflow_label(file_name)
    container = _named(pod_template["spec"]["containers"], CONTAINER, "container")
    container["image"] = image
    container["args"] = ["run", f"{WORKFLOW_MOUNT}/{file_name}"]
    _named(container["env"], WORKFLOW_ENV, "environment variable")["value"] = file_name
    return job


def _named(items: list[dict[str, Any]], name: str, kind: str) -> dict[str, Any]:
    for item in items:
        if item.get("name") == name:
            return item
    raise KeyError(f"the Job template {TEMPLATE} has no {kind} named {name!r}")
