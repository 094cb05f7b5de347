"""``surgery registry``: ls, show, log, verify, tag and gc on a checkpoint registry."""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from datetime import timedelta
from typing import Any, Callable

from pipeline.registry import (
    ModelNotFoundError,
    ModelVersion,
    Registry,
    RegistryFormatError,
    TagConflictError,
    VersionExistsError,
    VersionNotFoundError,
    walk_lineage,
)
from pipeline.storage.errors import CheckpointNotFoundError, IntegrityError, InvalidNameError

REGISTRY_ENV = "SURGERY_REGISTRY"
# Errors that the registry raises for bad input or bad data; each becomes one line on stderr.
REGISTRY_ERRORS = (
    RegistryFormatError,
    ModelNotFoundError,
    VersionNotFoundError,
    VersionExistsError,
    TagConflictError,
    InvalidNameError,
    IntegrityError,
    CheckpointNotFoundError,
    PermissionError,
)


def register(commands: Any) -> None:
    cmd = commands.add_parser("registry", help="list, inspect, verify, tag and clean up a checkpoint registry")
    verbs = cmd.add_subparsers(dest="verb", required=True)

    ls = verbs.add_parser("ls", help="list the models of a registry, or the published versions of one model")
    ls.add_argument("url", nargs="?", help=f"registry URL (default: ${REGISTRY_ENV})")
    ls.add_argument("model", nargs="?", help="model name; lists its versions with tags and creation time")
    ls.add_argument("--json", action="store_true", help="print the listing as JSON")
    ls.set_defaults(handler=run_ls)

    show = verbs.add_parser("show", help="summarise the manifest of a version")
    _version_arguments(show)
    show.add_argument("--json", action="store_true", help="print the raw manifest")
    show.set_defaults(handler=run_show)

    log = verbs.add_parser("log", help="walk the lineage of a version through its parent manifests")
    _version_arguments(log)
    log.set_defaults(handler=run_log)

    verify = verbs.add_parser("verify", help="re-hash every shard and file of a version; exit 1 on a mismatch")
    _version_arguments(verify)
    verify.set_defaults(handler=run_verify)

    tag = verbs.add_parser("tag", help="point a tag at a version (compare-and-swap)")
    _version_arguments(tag)
    tag.add_argument("tag", help="tag name to create or move")
    tag.add_argument(
        "--expect",
        metavar="VERSION",
        help="move the tag only if it names VERSION now ('none': only if the tag does not exist)",
    )
    tag.set_defaults(handler=run_tag)

    gc = verbs.add_parser(
        "gc",
        help="remove unpublished versions, stale tag locks and incomplete S3 uploads older than the grace period",
    )
    gc.add_argument("url", help="registry URL")
    gc.add_argument("model", nargs="?", help="limit gc to this model")
    gc.add_argument("--grace", type=float, default=24.0, metavar="HOURS", help="minimum age in hours of what gc removes (default 24)")
    gc.add_argument("--dry-run", action="store_true", help="print what would be removed and remove nothing")
    gc.set_defaults(handler=run_gc)

    for parser in (ls, show, log, verify, tag, gc):
        parser.add_argument(
            "--storage-option",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="fsspec storage option, repeatable; dotted keys nest "
            "(client_kwargs.endpoint_url=http://127.0.0.1:5000). VALUE is parsed as JSON when it "
            "is valid JSON (true, 3), else taken as a string",
        )


def _version_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", help="registry URL")
    parser.add_argument("model", help="model name")
    parser.add_argument("ref", help="version id or tag")


class RegistryCommandError(Exception):
    """A failure printed as one ``error:`` line on stderr, with exit status 2.

    The registry commands print these themselves instead of raising the CLI's
    CommandError, because under ``python -m pipeline.cli.main`` the entry module is
    ``__main__`` and its CommandError is another class than ``pipeline.cli.main.CommandError``.
    """


def _handles_errors(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (RegistryCommandError, *REGISTRY_ERRORS) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return run


def parse_storage_options(values: list[str]) -> dict[str, Any]:
    """Turn ``KEY=VALUE`` strings into a nested dict of fsspec storage options."""
    options: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise RegistryCommandError(f"--storage-option {item!r} is invalid; expected KEY=VALUE, for example anon=true")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        target = options
        *parents, leaf = key.split(".")
        for part in parents:
            child = target.setdefault(part, {})
            if not isinstance(child, dict):
                raise RegistryCommandError(f"--storage-option {item!r} conflicts with option {part!r} given as a value")
            target = child
        target[leaf] = value
    return options


def _registry(args: argparse.Namespace, url: str | None = None) -> Registry:
    return Registry(url or args.url, parse_storage_options(args.storage_option))


@_handles_errors
def run_ls(args: argparse.Namespace) -> int:
    url = args.url or os.environ.get(REGISTRY_ENV)
    if not url:
        raise RegistryCommandError(f"no registry URL: pass one, or set {REGISTRY_ENV}")
    registry = _registry(args, url)
    if args.model is None:
        rows = [(model, registry.versions(model), sorted(registry.tags(model))) for model in registry.models()]
        _print_models(registry, rows, as_json=args.json)
        return 0
    tags = registry.tags(args.model)
    versions = [registry.get(args.model, version) for version in registry.versions(args.model)]
    if not versions and not registry.store.list_names(registry.layout.model(args.model)):
        raise ModelNotFoundError(f"model {args.model!r} not found in registry {registry.url}")
    _print_versions(versions, tags, as_json=args.json)
    return 0


def _print_models(registry: Registry, rows: list[tuple[str, list[str], list[str]]], *, as_json: bool) -> None:
    if as_json:
        json.dump([{"model": m, "versions": v, "tags": t} for m, v, t in rows], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    if not rows:
        print(f"no models in registry {registry.url}")
        return
    _print_table(
        ["MODEL", "VERSIONS", "NEWEST", "TAGS"],
        [[model, str(len(versions)), versions[-1] if versions else "-", ", ".join(tags)] for model, versions, tags in rows],
    )


def _print_versions(versions: list[ModelVersion], tags: dict[str, Any], *, as_json: bool) -> None:
    by_version: dict[str, list[str]] = {}
    for tag, state in sorted(tags.items()):
        by_version.setdefault(state.version, []).append(tag)
    if as_json:
        rows = [{"version": v.version, "created_at": v.created_at, "tags": by_version.get(v.version, [])} for v in versions]
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    _print_table(
        ["VERSION", "CREATED", "TAGS"],
        [[v.version, v.created_at, ", ".join(by_version.get(v.version, []))] for v in versions],
    )


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _resolve(args: argparse.Namespace) -> tuple[Registry, ModelVersion]:
    registry = _registry(args)
    return registry, registry.resolve(args.model, args.ref)


@_handles_errors
def run_show(args: argparse.Namespace) -> int:
    registry, version = _resolve(args)
    if args.json:
        sys.stdout.write(version.manifest.data.decode("utf-8"))
        return 0
    document = version.manifest.document
    tags = sorted(tag for tag, state in registry.tags(version.model).items() if state.version == version.version)
    shard_bytes = sum(entry["size"] for entry in document["shards"].values())
    elements = sum(math.prod(entry["shape"]) for entry in document["tensors"].values())
    schema = document["feature_schema"]
    lines = [
        ("model", version.model),
        ("version", version.version),
        ("url", version.url),
        ("created", document["created_at"]),
        ("tool", f"{document['tool']['name']} {document['tool']['version']}"),
        ("run", document["run_id"]),
        ("tags", ", ".join(tags) or "none"),
        ("manifest sha256", version.manifest.sha256),
        ("parents", "; ".join(f"{p['model']}/{p['version']} in {p['registry']}" for p in document["parents"]) or "none (first import)"),
        ("shards", f"{len(document['shards'])} ({shard_bytes:,} bytes)"),
        ("tensors", f"{len(document['tensors'])} ({elements:,} elements)"),
        ("optimizer state", f"{len(document['optimizer_tensors'])} tensors" if document["optimizer_state"] else "none"),
        ("files", ", ".join(f"{name} ({entry['size']:,} bytes)" for name, entry in document["files"].items())),
        ("plan", _plan_summary(document["plan"])),
        ("verification", _verification_summary(document["verification"])),
        ("model spec", f"{document['model_spec']['factory']} {json.dumps(document['model_spec']['config'], sort_keys=True)}"),
        (
            "feature schema",
            f"inputs {[i['name'] for i in schema['inputs']]}, vocabularies {sorted(schema['vocabularies'])}, "
            f"outputs {[o['name'] for o in schema['outputs']]}",
        ),
    ]
    width = max(len(label) for label, _ in lines)
    for label, value in lines:
        print(f"{label + ':':<{width + 1}} {value}")
    return 0


def _plan_summary(plan: dict[str, Any] | None) -> str:
    if plan is None:
        return "none (first import)"
    actions = ", ".join(
        f"{action} ({', '.join(f'{count:,} {unit}' for unit, count in counts.items())})"
        for action, counts in plan["actions"].items()
    )
    return f"sha256 {plan['sha256']}; actions: {actions or 'none'}"


def _verification_summary(verification: dict[str, Any] | None) -> str:
    if verification is None:
        return "none"
    result = "passed" if verification["passed"] else "FAILED"
    details = ", ".join(f"{key} {value}" for key, value in verification.items() if key != "passed")
    if details:
        result += f" ({details})"
    return result


@_handles_errors
def run_log(args: argparse.Namespace) -> int:
    registry, version = _resolve(args)
    broken = 0
    for entry in walk_lineage(version):
        indent = "  " * entry.depth
        if entry.manifest is None:
            broken += 1
            print(f"{indent}{entry.model}/{entry.version} in {entry.registry}: {entry.problem}")
            continue
        document = entry.manifest.document
        plan = "no plan" if document["plan"] is None else f"plan {document['plan']['sha256'][:12]}"
        print(f"{indent}{entry.model}/{entry.version}  {document['created_at']}  {plan}  run {document['run_id']}  {entry.registry}")
    if broken:
        print(f"error: {broken} ancestors of version {version.version} of model {version.model!r} are missing or changed", file=sys.stderr)
    return 1 if broken else 0


@_handles_errors
def run_verify(args: argparse.Namespace) -> int:
    registry, version = _resolve(args)
    report = version.verify()
    for name, size in report.checked.items():
        print(f"ok      {name} ({size:,} bytes)")
    for problem in report.problems:
        print(f"FAILED  {problem}")
    total = len(report.checked) + len(report.problems)
    if report.problems:
        print(
            f"error: {len(report.problems)} of {total} files of version {version.version} of model "
            f"{version.model!r} failed verification",
            file=sys.stderr,
        )
        return 1
    print(f"verified {total} files ({sum(report.checked.values()):,} bytes) of version {version.version} of model {version.model!r}")
    return 0


@_handles_errors
def run_tag(args: argparse.Namespace) -> int:
    registry = _registry(args)
    target = registry.resolve(args.model, args.ref)
    current = registry.read_tag(args.model, args.tag)
    if args.expect is not None:
        expected = None if args.expect == "none" else args.expect
        found = current.version if current is not None else None
        if found != expected:
            raise RegistryCommandError(
                f"tag {args.tag!r} of model {args.model!r} names {'version ' + found if found else 'no version'}, "
                f"not {'version ' + expected if expected else 'none'} as --expect requires; the tag was not moved"
            )
    state = registry.move_tag(args.model, args.tag, target.version, expected=current)
    before = f"version {current.version}" if current is not None else "no version"
    print(f"tag {args.tag!r} of model {args.model!r}: {before} -> version {state.version}")
    return 0


@_handles_errors
def run_gc(args: argparse.Namespace) -> int:
    if not args.grace >= 0:
        raise RegistryCommandError(f"--grace is {args.grace}; expected hours, zero or more")
    registry = _registry(args)
    report = registry.gc(args.model, grace=timedelta(hours=args.grace), dry_run=args.dry_run)
    verb = "would remove" if report.dry_run else "removed"
    for entry in report.removed:
        print(f"{verb} {entry.kind} {entry.url} ({_age(entry.age_seconds)}; {entry.detail})")
    for entry in report.kept:
        print(f"kept {entry.kind} {entry.url} ({_age(entry.age_seconds)}; {entry.detail})")
    print(f"gc: {verb} {len(report.removed)}, kept {len(report.kept)} (grace {args.grace:g} hours)")
    return 0


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "age unknown"
    if seconds < 3600:
        return f"age {seconds / 60:.1f} min"
    return f"age {seconds / 3600:.1f} h"
