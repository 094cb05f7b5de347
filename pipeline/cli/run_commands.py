"""``surgery run``, ``surgery schedule``, ``surgery import`` and ``surgery demo``."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

DEMO_WORKFLOW = "minilm-domain-tokens.yaml"


def register(commands) -> None:
    cmd = commands.add_parser("run", help="run a migration workflow on a Dask cluster and publish the result")
    cmd.add_argument("workflow", help="workflow file (YAML)")
    _cluster_arguments(cmd)
    cmd.add_argument("--dry-run", action="store_true", help="build and print the plan, read only checkpoint headers, write nothing")
    cmd.set_defaults(handler=run_run)

    cmd = commands.add_parser("schedule", help="run every workflow in a folder on the source versions it has not migrated yet")
    cmd.add_argument("--workflows", required=True, metavar="DIR", help="folder of workflow files (*.yaml at its top level)")
    _cluster_arguments(cmd)
    cmd.set_defaults(handler=run_schedule)

    cmd = commands.add_parser("import", help="publish a plain checkpoint as a new version in a registry")
    cmd.add_argument("checkpoint", help="checkpoint URL: safetensors file or folder, .pt/.bin, or a DCP folder")
    cmd.add_argument("--spec", required=True, help="model spec file of the checkpoint")
    cmd.add_argument("--registry", required=True, help="registry root URL")
    cmd.add_argument("--model", required=True, help="model name in the registry")
    cmd.add_argument("--version", default="next", help="version id (default: next integer)")
    cmd.add_argument("--tag", action="append", default=None, help="tag to move to the new version (repeatable; default: latest)")
    cmd.set_defaults(handler=run_import)

    cmd = commands.add_parser("demo", help="import all-MiniLM-L6-v2 into a local registry and run an example workflow on it")
    cmd.add_argument("--registry", default="registry", help="local registry folder (default: ./registry)")
    cmd.add_argument("--workflow", default=None, help=f"workflow to run (default: workflows/{DEMO_WORKFLOW})")
    _cluster_arguments(cmd)
    cmd.set_defaults(handler=run_demo)


def _cluster_arguments(cmd) -> None:
    cmd.add_argument("--scheduler", default=None, metavar="ADDRESS", help="Dask scheduler address (default: $DASK_SCHEDULER_ADDRESS, else a LocalCluster)")
    cmd.add_argument("--workers", type=int, default=None, help="worker processes of the LocalCluster (default: one per core, at most 8)")
    cmd.add_argument("--json", action="store_true", help="print a machine-readable summary instead of progress bars")


def _progress(args):
    if args.json:
        return None
    from dask.distributed import progress

    def show(phase: str, futures: list) -> None:
        print(f"[{phase}]", flush=True)
        if futures:
            progress(futures, notebook=False)
            print(flush=True)

    return show


def _errors():
    from distributed import KilledWorker

    from pipeline.execution.job import RunError
    from pipeline.execution.sources import SourceError
    from pipeline.models.spec import SpecError
    from pipeline.plan import PlanError
    from pipeline.registry import (
        ClaimLostError, ModelNotFoundError, RegistryFormatError, TagConflictError, VersionExistsError,
        VersionNotFoundError,
    )
    from pipeline.storage import CheckpointFormatError, IntegrityError, ObjectExistsError
    from pipeline.workflow import WorkflowError

    # KilledWorker: Dask gave up on a task whose workers kept dying; the run aborted its
    # publications. TagConflictError: the version is published but a tag did not move.
    return (
        RunError, SourceError, SpecError, PlanError, RegistryFormatError, VersionExistsError,
        VersionNotFoundError, ModelNotFoundError, CheckpointFormatError, IntegrityError,
        ObjectExistsError, WorkflowError, ConnectionError, KilledWorker, TagConflictError,
        ClaimLostError,
    )


def run_run(args) -> int:
    from pipeline.cli.errors import CommandError
    from pipeline.execution.cluster import connect, dashboard_link
    from pipeline.execution.job import run_workflow
    from pipeline.workflow import load_workflow

    try:
        workflow = load_workflow(args.workflow)
        with connect(args.scheduler, workers=args.workers) as client:
            if not args.json:
                print(f"Dask dashboard: {dashboard_link(client)}", flush=True)
            result = run_workflow(workflow, client, dry_run=args.dry_run, progress=_progress(args))
    except _errors() as e:
        raise CommandError(str(e), status=1) from e
    _report(args, result)
    return 0


def _report(args, result) -> None:
    if args.json:
        json.dump(result.to_json(), sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
        return
    print(result.plan_table)
    if result.dry_run:
        print(f"dry run: plan {result.plan_sha256[:12]}; nothing was written")
        return
    for item in result.results:
        verification = item.verification or {}
        print(
            f"published {item.url} (version {item.version} from {item.source}); verification "
            f"max relative error {verification.get('max_rel', float('nan')):.3g} on {verification.get('device', '?')}"
        )


def run_schedule(args) -> int:
    from pipeline.cli.errors import CommandError
    from pipeline.execution.cluster import connect
    from pipeline.execution.schedule import schedule

    try:
        with connect(args.scheduler, workers=args.workers) as client:
            outcomes = schedule(args.workflows, client, progress=_progress(args))
    except _errors() as e:
        raise CommandError(str(e), status=1) from e
    failed = [o for o in outcomes if o.error]
    if args.json:
        json.dump(
            [
                {
                    "workflow": o.workflow,
                    "pending": o.pending,
                    "skipped": o.skipped,
                    "error": o.error,
                    "published": o.result.to_json()["published"] if o.result else [],
                }
                for o in outcomes
            ],
            sys.stdout,
            indent=2,
            default=str,
        )
        sys.stdout.write("\n")
    else:
        for o in outcomes:
            published = [r.version for r in o.result.results] if o.result else []
            if o.error:
                state = f"failed: {o.error}"
            elif published:
                state = f"published {published}"
            else:
                state = "nothing to migrate"
            print(f"{o.workflow}: pending {o.pending}; {state}" + (f"; skipped {o.skipped} (published by another run)" if o.skipped else ""))
    return 1 if failed else 0


def run_import(args) -> int:
    from pipeline.cli.errors import CommandError
    from pipeline.execution.importer import CheckpointMismatchError, import_checkpoint
    from pipeline.models.spec import load_spec
    from pipeline.registry import Registry

    try:
        published = import_checkpoint(
            args.checkpoint, load_spec(args.spec), Registry(args.registry), args.model,
            version=args.version, tags=args.tag or ["latest"],
        )
    except (CheckpointMismatchError, *_errors()) as e:
        raise CommandError(str(e), status=1) from e
    print(f"published {published.url} (version {published.version})")
    return 0


def run_demo(args) -> int:
    """Import the packaged MiniLM weights once, then run the example workflow on them."""
    import os

    from pipeline.cli.errors import CommandError
    from pipeline.execution.cluster import connect, dashboard_link
    from pipeline.execution.importer import import_checkpoint
    from pipeline.execution.job import run_workflow
    from pipeline.models.bert import minilm_path
    from pipeline.models.spec import load_spec
    from pipeline.registry import Registry
    from pipeline.workflow import load_workflow

    root = Path(__file__).resolve().parents[2]
    registry_folder = Path(args.registry).resolve()
    os.environ["SURGERY_REGISTRY"] = f"file://{registry_folder}"
    workflow_path = Path(args.workflow) if args.workflow else root / "workflows" / DEMO_WORKFLOW
    try:
        registry = Registry(f"file://{registry_folder}")
        if "minilm" not in registry.models() or not registry.versions("minilm"):
            published = import_checkpoint(
                str(minilm_path() / "model.safetensors"),
                load_spec(root / "workflows/specs/minilm-v1.yaml"),
                registry,
                "minilm",
            )
            # With --json, stdout carries only the JSON summary.
            print(f"imported all-MiniLM-L6-v2 as {published.url}", file=sys.stderr if args.json else sys.stdout, flush=True)
        workflow = load_workflow(workflow_path)
        with connect(args.scheduler, workers=args.workers) as client:
            if not args.json:
                print(f"Dask dashboard: {dashboard_link(client)}", flush=True)
            result = run_workflow(workflow, client, progress=_progress(args))
    except _errors() as e:
        raise CommandError(str(e), status=1) from e
    _report(args, result)
    return 0
