"""``surgery plan``, ``plan-apply``, ``plan-verify`` and ``plan-diff``."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from pipeline.maps.interaction import MapError
from pipeline.models.spec import SpecError, load_spec
from pipeline.plan.model import Plan, PlanError, diff_plans
from pipeline.schema import SchemaError


def register(commands) -> None:
    cmd = commands.add_parser("plan", help="plan the surgery from an old model spec to a new one")
    cmd.add_argument("old", help="old model spec (YAML or JSON)")
    cmd.add_argument("new", help="new model spec (YAML or JSON)")
    cmd.add_argument("--options", metavar="OPTS", help="plan options file (YAML or JSON): renames, constants, init rules")
    cmd.add_argument("--json", action="store_true", help="print the per-parameter summary as JSON instead of a table")
    cmd.add_argument("--out", metavar="PLAN", help="write the plan itself to this JSON file")
    cmd.add_argument("--html", metavar="REPORT", help="write a self-contained HTML report to this file")
    cmd.add_argument("--png", metavar="REPORT", help="write a PNG drawing of the plan to this file")
    cmd.set_defaults(handler=run_plan)

    cmd = commands.add_parser("plan-apply", help="apply a plan to an old safetensors checkpoint")
    cmd.add_argument("plan", help="plan file written by 'surgery plan --out'")
    cmd.add_argument("old", help="old checkpoint (.safetensors)")
    cmd.add_argument("out", help="new checkpoint to write (.safetensors)")
    cmd.set_defaults(handler=run_plan_apply)

    cmd = commands.add_parser("plan-verify", help="compare the old and new models on probe inputs")
    cmd.add_argument("plan", help="plan file written by 'surgery plan --out'")
    cmd.add_argument("old", help="old checkpoint (.safetensors)")
    cmd.add_argument("new", help="new checkpoint (.safetensors)")
    cmd.add_argument("--probe", metavar="PROBE", help="probe batch (.safetensors, tensors named after the old inputs)")
    cmd.add_argument("--batch", type=int, default=16, help="number of random probes when no --probe is given (default 16)")
    cmd.add_argument("--seed", type=int, default=0, help="seed of the random probes (default 0)")
    cmd.add_argument("--device", default="cpu", help="torch device to run both models on, e.g. cuda (default cpu)")
    cmd.add_argument("--tolerance", type=float, help="maximum relative error (default 1e-6 for exact plans)")
    cmd.add_argument("--json", action="store_true", help="print the verification report as JSON")
    cmd.set_defaults(handler=run_plan_verify)

    cmd = commands.add_parser("plan-diff", help="compare two plan files")
    cmd.add_argument("left", help="first plan file")
    cmd.add_argument("right", help="second plan file")
    cmd.set_defaults(handler=run_plan_diff)


def _fail(e: Exception):
    from pipeline.cli.errors import CommandError

    return CommandError(str(e))


def _read_plan(path: str) -> Plan:
    try:
        return Plan.loads(Path(path).read_text())
    except OSError as e:
        raise PlanError(f"cannot read plan {path!r}: {e.strerror}") from e


def run_plan(args) -> int:
    from pipeline.maps.propagate import PropagationError, UnsupportedOpError
    from pipeline.plan.build import plan_specs
    from pipeline.plan.options import PlanOptions, load_options
    from pipeline.plan.report import format_table, html_report, png_report, summarise_plan

    try:
        options = load_options(args.options) if args.options else PlanOptions()
        started = time.perf_counter()
        plan = plan_specs(load_spec(args.old), load_spec(args.new), options)
        elapsed = time.perf_counter() - started
    except (PlanError, SpecError, SchemaError, MapError, UnsupportedOpError, PropagationError) as e:
        raise _fail(e) from e

    if args.out:
        Path(args.out).write_text(plan.dumps())
    if args.html:
        Path(args.html).write_text(html_report(plan, f"Surgery plan: {args.old} -> {args.new}"))
    if args.png:
        png_report(plan, args.png, "Surgery plan")
    summary = summarise_plan(plan)
    summary["seconds"] = round(elapsed, 3)
    if args.json:
        json.dump(summary, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_table(summary))
        written = [p for p in (args.out, args.html, args.png) if p]
        print(f"planned in {elapsed:.2f} s" + (f"; written to {', '.join(written)}" if written else ""))
    return 0


def run_plan_apply(args) -> int:
    from safetensors.torch import load_file, save_file

    from pipeline.plan.apply import apply_plan

    try:
        plan = _read_plan(args.plan)
        try:
            old_state = load_file(args.old)
        except Exception as e:  # safetensors raises its own SafetensorError type
            raise PlanError(f"cannot read checkpoint {args.old!r}: {e}") from e
        new_state = apply_plan(plan, old_state)
    except PlanError as e:
        raise _fail(e) from e
    unique = {}
    for name, tensor in new_state.items():
        if not any(tensor is other for other in unique.values()):
            unique[name] = tensor.contiguous()
    save_file(unique, args.out, metadata={"surgery_plan_sha256": plan.sha256()})
    print(f"wrote {len(unique)} tensors to {args.out} (plan sha256 {plan.sha256()[:16]})")
    return 0


def run_plan_verify(args) -> int:
    from safetensors.torch import load_file

    from pipeline.plan.verify import verify_plan

    try:
        plan = _read_plan(args.plan)
        states = []
        for path in (args.old, args.new):
            try:
                states.append(load_file(path))
            except Exception as e:  # safetensors raises its own SafetensorError type
                raise PlanError(f"cannot read checkpoint {path!r}: {e}") from e
        new_state = _with_tied(plan, states[1])
        report = verify_plan(plan, states[0], new_state, probe=args.probe, batch=args.batch, seed=args.seed,
                             device=args.device, tolerance=args.tolerance)
    except (PlanError, SpecError, SchemaError) as e:
        raise _fail(e) from e
    if args.json:
        json.dump(report.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(report.summary())
        for note in report.notes:
            print(f"note: {note}")
        print(report.table())
    return 0 if report.passed else 1


def _with_tied(plan: Plan, state: dict) -> dict:
    """Restore tied entries that a safetensors file stores once."""
    out = dict(state)
    for pp in plan.params:
        if pp.tied_to is not None and pp.name not in out and pp.tied_to in out:
            out[pp.name] = out[pp.tied_to]
    return out


def run_plan_diff(args) -> int:
    try:
        left, right = _read_plan(args.left), _read_plan(args.right)
    except PlanError as e:
        raise _fail(e) from e
    lines = diff_plans(left, right)
    for line in lines:
        print(line)
    if not lines:
        print(f"plans are equal (sha256 {left.sha256()[:16]})")
    return 1 if lines else 0
