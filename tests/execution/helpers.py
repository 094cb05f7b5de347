"""Shared steps of the execution tests: train and import Five checkpoints, write workflows, run the CLI."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml
from dask.distributed import Client, LocalCluster
from distributed.core import Status
from safetensors.torch import save_file
from torch import nn

from pipeline.execution.importer import import_checkpoint
from pipeline.models.spec import ModelSpec, load_spec, named_outputs
from pipeline.plan import Plan
from pipeline.plan.verify import draw_probes, translate_inputs
from pipeline.registry import ModelVersion, Registry
from pipeline.schema import FeatureSchema
from tests.plan.helpers import train

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "workflows"
SPECS = WORKFLOWS / "specs"
FIVE_SPEC = SPECS / "five-v1.yaml"
FIVE_WORKFLOWS = ("five-unit-fields", "five-drop-field", "five-wide-lstm", "five-new-action")
# Worker processes of the session's LocalCluster.
WORKERS = 2
# Wall-clock limit of one CLI subprocess; a run of a small Five workflow takes a few seconds.
CLI_TIMEOUT = 240


def trained_five(seed: int, spec: ModelSpec | None = None) -> tuple[nn.Module, FeatureSchema]:
    """Build the small Five policy and take three Adam steps, so its weights leave their init."""
    torch.manual_seed(seed)
    module, schema = (spec or load_spec(FIVE_SPEC)).build()
    train(module, schema, steps=3, seed=seed)
    return module, schema


def save_checkpoint(module: nn.Module, path: Path) -> Path:
    save_file({name: t.detach().contiguous() for name, t in module.state_dict().items()}, str(path))
    return path


def import_five(
    registry: Registry, folder: Path, seed: int, *, model: str = "five", spec: ModelSpec | None = None
) -> tuple[ModelVersion, nn.Module]:
    """Train a Five policy with ``seed``, save it as safetensors and import it as the next version."""
    spec = spec or load_spec(FIVE_SPEC)
    module, _ = trained_five(seed, spec)
    path = save_checkpoint(module, folder / f"{model}-seed{seed}.safetensors")
    return import_checkpoint(str(path), spec, registry, model), module


def example_workflow(name: str) -> dict[str, Any]:
    """Read an example workflow from workflows/ with its spec paths made absolute."""
    data = yaml.safe_load((WORKFLOWS / f"{name}.yaml").read_text())
    for key in ("old_spec", "new_spec"):
        if isinstance(data.get(key), str):
            data[key] = str(WORKFLOWS / data[key])
    return data


def write_workflow(
    path: Path,
    example: str,
    registry: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    source: Mapping[str, Any] | None = None,
    destination: Mapping[str, Any] | None = None,
    **fields: Any,
) -> Path:
    """Write a copy of an example workflow whose source and destination use ``registry``.

    ``source`` and ``destination`` update those sections key by key; other keyword
    arguments replace top-level fields.
    """
    data = example_workflow(example)
    data["source"]["registry"] = registry
    data["destination"]["registry"] = registry
    if storage_options:
        data["source"]["storage_options"] = copy.deepcopy(dict(storage_options))
        data["destination"]["storage_options"] = copy.deepcopy(dict(storage_options))
    data["source"].update(source or {})
    data["destination"].update(destination or {})
    data.update(fields)
    return dump_workflow(path, data)


def dump_workflow(path: Path, data: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dict(data), sort_keys=False))
    return path


def run_cli(*args: str, env: Mapping[str, str] | None = None, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess:
    """Run ``python -m pipeline.cli.main ARGS`` in a subprocess and return its result."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli.main", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_cli(*args: str, env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """Start ``python -m pipeline.cli.main ARGS`` with stdout and stderr piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli.main", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def shard_digests(version: ModelVersion) -> dict[str, str]:
    """Return ``{shard file: sha256}`` from a version's manifest."""
    return {name: entry["sha256"] for name, entry in version.manifest.shards.items()}


def folder_files(root: Path) -> list[str]:
    """Return every file under ``root`` (hidden files included), relative and sorted."""
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def compare_on_old_probes(
    plan: Plan,
    old: tuple[nn.Module, FeatureSchema],
    new: tuple[nn.Module, FeatureSchema],
    *,
    batch: int = 64,
    seed: int = 11,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Run both models on old-schema probes and return ``{output: (old, new)}`` for each old output.

    Each removed field is set to the constant the plan folds, as the old model saw it.
    The new outputs keep only the old fields, matched by name.
    """
    old_module, old_schema = old
    new_module, new_schema = new
    old_inputs = draw_probes(old_schema, new_schema, plan, batch, seed)
    for atom, value in plan.constants:
        name, _, field = atom.partition(":")[2].partition("/")
        column = old_schema.input(name).fields.index(field)
        old_inputs[name] = old_inputs[name].clone()
        old_inputs[name][..., column] = value
    new_inputs = translate_inputs(old_inputs, old_schema, new_schema, plan)
    with torch.no_grad():
        old_out = named_outputs(old_module.eval()(**old_inputs), old_schema)
        new_out = named_outputs(new_module.eval()(**new_inputs), new_schema)
    pairs = {}
    for spec in old_schema.outputs:
        new_spec = next(s for s in new_schema.outputs if s.name == spec.name)
        columns = [new_spec.fields.index(f) for f in spec.fields]
        pairs[spec.name] = (old_out[spec.name], new_out[spec.name][..., columns])
    return pairs


def started_workers(cluster: LocalCluster) -> dict[str, int]:
    """Map each worker address to its process id, for workers whose nanny finished starting them.

    A nanny whose worker process dies before the start handshake ends closes itself
    instead of starting another worker (Nanny.instantiate in distributed 2026.8), so tests
    kill only the workers listed here.
    """
    found = {}
    for nanny in list(cluster.workers.values()):
        process = nanny.process
        if process is None or process.status != Status.running or not process.worker_address:
            continue
        pid = process.pid
        if pid is not None:
            found[process.worker_address] = pid
    return found


def wait_for_started_workers(client: Client, cluster: LocalCluster, count: int, timeout: float = 60) -> None:
    """Wait until every nanny has finished starting its worker and the scheduler lists it."""
    deadline = time.monotonic() + timeout
    while True:
        started = started_workers(cluster)
        listed = client.scheduler_info()["workers"]
        if len(started) == count and set(started) <= set(listed):
            return
        if time.monotonic() > deadline:
            nannies = {
                name: (str(nanny.status), nanny.process and str(nanny.process.status)) for name, nanny in cluster.workers.items()
            }
            raise TimeoutError(
                f"{len(started)} of {count} workers started after {timeout} s; the scheduler lists "
                f"{sorted(listed)}; nanny and worker process states: {nannies}"
            )
        time.sleep(0.05)
