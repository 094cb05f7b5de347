"""Functions that run on Dask workers. Each takes plain, picklable arguments.

Memory per shard task: the tensors of one output shard are produced one at a time and
streamed to the shard's sink, so a task keeps one new tensor, the old tensors it is
built from, and the sink's part buffer; never a whole shard or checkpoint.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from pipeline.execution.sources import OldTensors, SourceRef, optimizer_entries
from pipeline.maps.interaction import InteractionMap
from pipeline.models.spec import ModelSpec, parse_spec
from pipeline.plan import Plan, apply_param
from pipeline.plan.model import ParamPlan
from pipeline.storage import SafetensorsReader, ShardedWriter, ShardPlan, ShardRecord, TensorSpec

logger = logging.getLogger(__name__)

MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


def map_task(spec_json: dict[str, Any]) -> InteractionMap:
    """Build one model on the meta device and compute its set map."""
    from pipeline.maps.propagate import set_map

    spec = parse_spec(spec_json)
    module, schema = spec.build(device="meta")
    return set_map(module, schema)


def plan_task(plan: Plan) -> Plan:
    """Return ``plan``, so that shard and verify tasks depend on a task result.

    A task result is recomputed when the worker that stores it dies. Scattered data is not,
    and Dask's active memory manager keeps a single replica of it even after
    ``scatter(broadcast=True)``, so one dead worker would lose a scattered plan and fail
    the run.
    """
    return plan


def check_source_task(source: SourceRef) -> str:
    """Re-hash a registry source against its manifest before anything is written."""
    source.verify()
    return source.label


def shard_task(
    plan: Plan,
    source: SourceRef,
    writer: ShardedWriter,
    shard: ShardPlan,
    part: str,
    old_param_names: list[str],
) -> ShardRecord:
    """Build the tensors of one output shard from the source and write the shard."""
    started = time.perf_counter()
    plans = {pp.name: pp for pp in plan.params}
    if part == "model":
        reader = source.open_model()
        old = OldTensors(reader)
        produce = _model_producer(plans, old)
    else:
        reader = source.open_optimizer()
        if reader is None:
            raise RuntimeError(f"source {source.label} has no optimizer state, but the run planned an optimizer part")
        produce = _optimizer_producer(plans, reader, OldTensors(source.open_model()), old_param_names)
    try:
        # A task retried after its worker died may find its own earlier shard. The run's
        # claim makes the version ours, so replacing that shard is safe.
        writer.remove([shard.file])
        record = writer.write_shard(shard, produce)
    finally:
        reader.close()
    logger.info("wrote %s of %s in %.2f s", shard.file, source.label, time.perf_counter() - started)
    return record


def _model_producer(plans: dict[str, ParamPlan], old: OldTensors):
    def produce(spec: TensorSpec) -> torch.Tensor:
        pp = plans[spec.name]
        if pp.tied_to is not None:
            pp = plans[pp.tied_to]
        return apply_param(pp, old.read).to(spec.dtype)

    return produce


def _optimizer_producer(plans, reader, old: OldTensors, old_param_names):
    entries = optimizer_entries(reader, old_param_names)

    def produce(spec: TensorSpec) -> torch.Tensor:
        param, key = split_optimizer_name(spec.name)
        pp = plans[param]
        stored = entries[(pp.source, key)]
        if key in MOMENT_KEYS:
            return apply_param(pp, lambda name: reader.read(entries[(name, key)]), moments=True).to(spec.dtype)
        return reader.read(stored).to(spec.dtype)

    return produce


def split_optimizer_name(name: str) -> tuple[str, str]:
    """Split ``optimizer.state.<parameter>.<key>`` into the parameter and the key."""
    rest = name[len("optimizer.state."):]
    param, _, key = rest.rpartition(".")
    return param, key


def verify_task(
    plan: Plan,
    source: SourceRef,
    version_url: str,
    storage_options: dict[str, Any],
    records: list[ShardRecord],
    old_spec: dict[str, Any],
    new_spec: dict[str, Any],
    settings: dict[str, Any],
) -> dict[str, Any]:
    """Load the old checkpoint and the shards just written, and compare the two models.

    Runs on a GPU when the worker has one (the task requests the ``GPU`` resource when
    the cluster advertises it), otherwise on the CPU.
    """
    from pipeline.plan.verify import verify_plan

    device = settings.get("device", "auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()

    reader = source.open_model()
    try:
        old = OldTensors(reader)
        old_state = {name: old.read(name) for name in _state_names(parse_spec(old_spec))}
    finally:
        reader.close()

    new_state: dict[str, torch.Tensor] = {}
    for record in records:
        shard = SafetensorsReader(
            f"{version_url.rstrip('/')}/{record.file}", storage_options,
            digests={record.file: {"sha256": record.sha256, "size": record.size}},
        )
        try:
            for name in shard.tensors:
                new_state[name] = shard.read(name)
        finally:
            shard.close()

    report = verify_plan(
        plan,
        old_state,
        new_state,
        old=parse_spec(old_spec),
        new=parse_spec(new_spec),
        probe=settings.get("probe_batch"),
        batch=settings.get("probes", 64),
        seed=settings.get("seed", 0),
        device=device,
        tolerance=settings.get("tolerance"),
    )
    result = report.to_json()
    result["seconds"] = round(time.perf_counter() - started, 3)
    result["table"] = report.table()
    return result


def _state_names(spec: ModelSpec) -> list[str]:
    module, _ = spec.build(device="meta")
    return list(module.state_dict().keys())
