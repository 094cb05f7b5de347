"""The local files a migration Job reads in the cluster, and where the cluster keeps them.

The Job mounts the surgery-workflows ConfigMap at /etc/surgery/workflows and the
surgery-workflow-specs ConfigMap under its specs/ folder, the layout of workflows/ in the
repository. ``surgery submit`` compares these local files with the deployed ConfigMaps so
that the Job never runs another version of the workflow than the one on the command line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

from pipeline.deploy.errors import WorkflowNotDeployedError
from pipeline.deploy.job import SPEC_CONFIG_MAP, SPEC_DIR, WORKFLOW_CONFIG_MAP, check_workflow_file_name
from pipeline.workflow import load_workflow

logger = logging.getLogger(__name__)

SPEC_FIELDS = ("old_spec", "new_spec", "source.spec")
# Fields naming a file the Job can read only from a URL, because no ConfigMap carries it.
URL_FIELDS = ("verify.probe_batch",)


@dataclass(frozen=True)
class DeployedFile:
    """A local file and the ConfigMap key the cluster must hold it under."""

    local_path: Path
    config_map: str
    key: str
    # The workflow field that refers to it, or "workflow" for the workflow file itself.
    field: str


def files_for_job(workflow_path: str | Path) -> list[DeployedFile]:
    """Validate a workflow file and list it with the spec files it refers to by path.

    Raises WorkflowError for an invalid workflow, and ValueError for a file name that
    cannot be a ConfigMap key, a spec path the Job does not mount, or a local probe
    batch. Specs given inline or as URLs need no file in the cluster and are not listed.
    """
    path = Path(workflow_path)
    check_workflow_file_name(path.name)
    workflow = load_workflow(path, check_imports=False)
    files = [DeployedFile(path, WORKFLOW_CONFIG_MAP, path.name, "workflow")]

    for field, reference in _references(workflow.raw, URL_FIELDS):
        if "://" not in reference:
            raise ValueError(
                f"{path}: {field}: {reference!r} is a local file, which the migration Job cannot read; "
                "upload it and give its URL (for example s3://bucket/probes.safetensors)"
            )
    for field, reference in _references(workflow.raw, SPEC_FIELDS):
        if "://" in reference:
            continue
        relative = PurePosixPath(reference)
        key = relative.name
        if relative.parts != (SPEC_DIR, key) or not _is_config_map_key(key):
            raise ValueError(
                f"{path}: {field}: spec path {reference!r} is not mounted in the migration Job, which mounts "
                f"model specs as {SPEC_DIR}/<file name> beside the workflow. Move the spec to workflows/{SPEC_DIR}/, "
                "refer to it as specs/<file name> and list it in workflows/Kustomization"
            )
        files.append(DeployedFile(path.parent / relative, SPEC_CONFIG_MAP, key, field))
    return files


def _is_config_map_key(name: str) -> bool:
    try:
        check_workflow_file_name(name)
    except ValueError:
        return False
    return True


def _references(raw: dict, fields: tuple[str, ...]) -> list[tuple[str, str]]:
    """Return (field, value) for each dotted field of ``fields`` whose value is a string."""
    references = []
    for field in fields:
        value = raw
        for part in field.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, str):
            references.append((field, value))
    return references


def check_deployed(files: list[DeployedFile], read_config_map: Callable[[str], dict[str, str] | None], where: str) -> None:
    """Raise WorkflowNotDeployedError unless every file equals its key in the deployed ConfigMaps.

    ``read_config_map(name)`` returns a ConfigMap's data, or None if it does not exist;
    ``where`` names the namespace and API server in messages.
    """
    deploy_hint = "deploy the local files with: kubectl apply -k k8s/overlays/<dev|prod>"
    config_maps: dict[str, dict[str, str] | None] = {}
    for file in files:
        if file.config_map not in config_maps:
            config_maps[file.config_map] = read_config_map(file.config_map)
        data = config_maps[file.config_map]
        if data is None:
            raise WorkflowNotDeployedError(f"ConfigMap {file.config_map!r} not found in {where}; {deploy_hint}")
        if file.key not in data:
            raise WorkflowNotDeployedError(
                f"{file.local_path} ({file.field}) is not deployed: ConfigMap {file.config_map!r} in {where} "
                f"has no key {file.key!r} (keys: {', '.join(sorted(data)) or 'none'}); "
                f"list the file in workflows/Kustomization, then {deploy_hint}"
            )
        if data[file.key] != file.local_path.read_text(encoding="utf-8"):
            raise WorkflowNotDeployedError(
                f"{file.local_path} ({file.field}) differs from key {file.key!r} of ConfigMap {file.config_map!r} "
                f"in {where}, so the Job would run another version; {deploy_hint}"
            )
        logger.info("%s equals key %s of ConfigMap %s", file.local_path, file.key, file.config_map)
