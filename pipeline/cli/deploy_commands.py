"""``surgery submit``: start a one-off migration Job in Kubernetes."""

from __future__ import annotations

import argparse
import os
import secrets
import string
import sys
from pathlib import Path

import yaml

DEFAULT_NAMESPACE = "surgery"
SUFFIX_ALPHABET = string.ascii_lowercase + string.digits

EPILOG = """\
The Job runs `surgery run /etc/surgery/workflows/<file name of WORKFLOW>` on the workflow
ConfigMap deployed with `kubectl apply -k k8s/overlays/<dev|prod>`. Before it creates the
Job, submit checks that the deployed workflow and the spec files it refers to equal the
local files. Credentials come from KUBECONFIG (else ~/.kube/config) or, in a pod, from its
service account. Exit status: 0 created or printed, 1 cluster error or deployed files
differ, 2 invalid workflow or option."""


def register(commands) -> None:
    cmd = commands.add_parser(
        "submit",
        help="start a Kubernetes Job that runs one migration workflow",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmd.add_argument("workflow", metavar="WORKFLOW", help="local workflow file, e.g. workflows/five-new-action.yaml")
    cmd.add_argument("--namespace", "-n", default=DEFAULT_NAMESPACE, help=f"namespace of the deployment (default {DEFAULT_NAMESPACE})")
    cmd.add_argument("--dry-run", action="store_true", help="print the Job manifest as YAML and contact no cluster")
    cmd.add_argument(
        "--image",
        help="container image with a version tag or digest (default: $SURGERY_IMAGE, else surgery-pipeline:<this version>)",
    )
    cmd.add_argument("--context", help="kubeconfig context to use (default: the current context)")
    cmd.set_defaults(handler=run_submit)


def run_submit(args) -> int:
    from pipeline.cli.errors import CommandError
    from pipeline.deploy import DeployError, build_migration_job, default_image
    from pipeline.deploy.job import check_image
    from pipeline.deploy.workflow_files import check_deployed, files_for_job
    from pipeline.workflow import WorkflowError

    try:
        files = files_for_job(args.workflow)
        image = check_image(args.image or os.environ.get("SURGERY_IMAGE") or default_image())
        suffix = "".join(secrets.choice(SUFFIX_ALPHABET) for _ in range(6))
        manifest = build_migration_job(Path(args.workflow).name, namespace=args.namespace, image=image, suffix=suffix)
    except (WorkflowError, ValueError) as e:
        raise CommandError(str(e), status=2) from e

    if args.dry_run:
        sys.stdout.write(yaml.safe_dump(manifest, sort_keys=False))
        return 0

    from pipeline.deploy.cluster import connect, create_job, read_config_map

    try:
        cluster = connect(args.context)
        where = f"namespace {args.namespace!r} on {cluster.host}"
        check_deployed(files, lambda name: read_config_map(cluster, args.namespace, name), where)
        name = create_job(cluster, args.namespace, manifest)
    except DeployError as e:
        raise CommandError(str(e), status=1) from e
    print(f"created Job {name} in namespace {args.namespace}")
    print(f"follow it with: kubectl logs -n {args.namespace} -f job/{name}")
    return 0
