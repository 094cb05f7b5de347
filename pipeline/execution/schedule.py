"""Scheduled migrations: apply every workflow to the source versions it has not migrated yet.

For each workflow file in a folder, the scheduler reads the lineage recorded in the
destination model's manifests (each manifest lists its parent versions), finds the source
versions newer than the newest one already migrated, and runs the workflow on them.

Each scheduled migration publishes destination version = source version id. Two
schedulers that pick up the same source version therefore claim the same destination
version, and the registry's create-only claim lets exactly one of them publish.

NOTE: schedulers that publish different versions at once move the workflow's tags in
the order their commits finish, so a tag such as ``latest`` can end on the older version.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from dask.distributed import Client

from pipeline.execution.job import RunResult, run_workflow
from pipeline.registry import Registry, VersionExistsError
from pipeline.registry.layout import version_sort_key
from pipeline.workflow import Workflow, WorkflowError, load_workflow

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ScheduleOutcome:
    workflow: str
    pending: list[str]
    result: RunResult | None = None
    skipped: list[str] = dataclasses.field(default_factory=list)
    error: str | None = None


def workflow_files(folder: str | Path) -> list[Path]:
    """Return the ``*.yaml`` files directly in ``folder`` (symlinks followed), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WorkflowError(f"workflow folder {str(folder)!r} not found")
    return sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file() and not p.name.startswith("."))


def pending_versions(workflow: Workflow) -> list[str]:
    """Return the source versions newer than the newest one the destination has migrated."""
    source, destination = workflow.source, workflow.destination
    if source.registry is None:
        raise WorkflowError(
            f"{workflow.path}: scheduled workflows need a registry source, not plain checkpoints"
        )
    source_registry = Registry(source.registry, source.storage_options)
    published = source_registry.versions(source.model)
    target = Registry(destination.registry, destination.storage_options)
    migrated: list[str] = []
    for version in target.versions(destination.model):
        for parent in target.manifest(destination.model, version).parents:
            if parent.get("model") == source.model and _same_registry(parent.get("registry"), source_registry.url):
                migrated.append(parent["version"])
    if not migrated:
        # Nothing migrated yet: start from what the workflow names (default: latest).
        wanted = {source_registry.resolve(source.model, ref).version for ref in source.versions if not set("*?[") & set(ref)}
        globbed = [v for v in published if any(set("*?[") & set(ref) for ref in source.versions)]
        return sorted(wanted | set(globbed), key=version_sort_key)
    newest = max(migrated, key=version_sort_key)
    return [v for v in published if version_sort_key(v) > version_sort_key(newest)]


def _same_registry(a: str | None, b: str) -> bool:
    return a is not None and a.rstrip("/") == b.rstrip("/")


def schedule(folder: str | Path, client: Client, progress=None) -> list[ScheduleOutcome]:
    """Run every workflow in ``folder`` on its pending source versions."""
    outcomes = []
    for path in workflow_files(folder):
        try:
            workflow = load_workflow(path)
            pending = pending_versions(workflow)
        except Exception as e:  # noqa: BLE001 - one bad workflow must not stop the others
            logger.error("workflow %s: %s", path, e)
            outcomes.append(ScheduleOutcome(str(path), [], error=str(e)))
            continue
        outcome = ScheduleOutcome(workflow.name, pending)
        outcomes.append(outcome)
        if not pending:
            logger.info("workflow %s: nothing to migrate", workflow.name)
            continue
        results = []
        for version in pending:
            single = dataclasses.replace(
                workflow,
                source=dataclasses.replace(workflow.source, versions=(version,)),
                destination=dataclasses.replace(workflow.destination, version=version),
            )
            try:
                results.append(run_workflow(single, client, progress=progress))
            except VersionExistsError as e:
                logger.info("workflow %s: version %s is being or was published by another run: %s", workflow.name, version, e)
                outcome.skipped.append(version)
            except Exception as e:  # noqa: BLE001 - recorded and reported as a failure
                logger.error("workflow %s, source version %s: %s", workflow.name, version, e)
                outcome.error = f"source version {version}: {e}"
                break
        if results:
            merged = results[0]
            for extra in results[1:]:
                merged.results.extend(extra.results)
            outcome.result = merged
    return outcomes
