"""``surgery workflow validate`` and ``surgery workflow schema``."""

from __future__ import annotations

import json
import sys

from pipeline.workflow import WorkflowError, load_workflow, schema


def register(commands) -> None:
    cmd = commands.add_parser("workflow", help="check migration workflow files")
    verbs = cmd.add_subparsers(dest="verb", required=True)
    validate = verbs.add_parser("validate", help="validate workflow files against the schema and import their model factories")
    validate.add_argument("files", nargs="+", metavar="FILE")
    validate.set_defaults(handler=run_validate)
    show = verbs.add_parser("schema", help="print the workflow JSON schema")
    show.set_defaults(handler=run_schema)


def run_validate(args) -> int:
    failed = 0
    for path in args.files:
        try:
            workflow = load_workflow(path)
        except WorkflowError as e:
            failed += 1
            print(f"invalid: {e}", file=sys.stderr)
            continue
        print(f"valid: {path} (workflow {workflow.name!r})")
    return 1 if failed else 0


def run_schema(args) -> int:
    json.dump(schema(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0
