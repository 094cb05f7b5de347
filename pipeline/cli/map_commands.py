"""``surgery map`` and ``surgery map-diff``."""

from __future__ import annotations

import json
import sys
import time

from pipeline.maps.build import METHODS, compute_map
from pipeline.maps.compare import diff_maps
from pipeline.maps.interaction import InteractionMap, MapError
from pipeline.maps.summary import format_table, summarise
from pipeline.models.spec import SpecError, load_spec
from pipeline.schema import SchemaError


def register(commands) -> None:
    cmd = commands.add_parser("map", help="compute the interaction map of a model spec")
    cmd.add_argument("spec", help="model spec file (YAML or JSON with 'factory' and 'config')")
    cmd.add_argument("--method", choices=METHODS, default="sets", help="set propagation (default) or gradient probes")
    cmd.add_argument("--out", metavar="MAP", help="write the map to this file (safetensors format)")
    cmd.add_argument("--json", action="store_true", help="print the per-parameter summary as JSON")
    cmd.set_defaults(handler=run_map)

    cmd = commands.add_parser("map-diff", help="compare two interaction maps element by element")
    cmd.add_argument("left", help="first map file")
    cmd.add_argument("right", help="second map file")
    cmd.add_argument("--json", action="store_true", help="print the differences as JSON")
    cmd.set_defaults(handler=run_map_diff)


def run_map(args) -> int:
    from pipeline.cli.errors import CommandError
    from pipeline.maps.propagate import PropagationError, UnsupportedOpError

    try:
        spec = load_spec(args.spec)
        started = time.perf_counter()
        imap = compute_map(spec, args.method)
        elapsed = time.perf_counter() - started
    except (SpecError, SchemaError, MapError, UnsupportedOpError, PropagationError) as e:
        raise CommandError(str(e)) from e

    if args.out:
        imap.save(args.out)
    summary = summarise(imap)
    summary["seconds"] = round(elapsed, 3)
    if args.json:
        json.dump(summary, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_table(summary))
        print(f"computed in {elapsed:.2f} s" + (f"; written to {args.out}" if args.out else ""))
    return 0


def run_map_diff(args) -> int:
    from pipeline.cli.errors import CommandError

    try:
        left = InteractionMap.load(args.left)
        right = InteractionMap.load(args.right)
    except MapError as e:
        raise CommandError(str(e)) from e
    differences = diff_maps(left, right)
    if args.json:
        json.dump([d.__dict__ for d in differences], sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    elif differences:
        for difference in differences:
            print(difference)
    else:
        print(f"maps are equal ({left.method} vs {right.method}, {len(left.param_names())} parameters)")
    return 1 if differences else 0
