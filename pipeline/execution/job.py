"""The main job: ``surgery run WORKFLOW``.

Phases, in order (the client coordinates, workers do the heavy work):

1. sources: resolve the workflow's sources; re-hash registry sources against their
   manifests on workers, so a corrupted source stops the run before anything is written;
2. maps: the old and new models' set maps, one Dask task each;
3. plan: built once on the client from the two maps; then every source's checkpoint
   headers are checked against the tensors and shapes the plan reads;
4. shards: for every source, claim a version in the destination registry, then write
   each output shard in its own task, reading only the old tensors that shard needs;
5. verify: per source, a task (on a GPU worker when the cluster has one) loads the old
   checkpoint and the new shards and compares the two models;
6. publish: per source, the index files, extra model files and the manifest, then tags.

A failure in any phase aborts every publication this run claimed that has no manifest
yet, so nothing is half-published.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from dask.distributed import Client, wait

from pipeline.execution import tasks
from pipeline.execution.cluster import gpu_resources
from pipeline.execution.sources import SourceError, SourceRef, optimizer_entries, resolve_sources
from pipeline.models.spec import model_files
from pipeline.plan import Plan, build_plan, parse_options
from pipeline.plan.build import ModelSide
from pipeline.plan.report import format_table, summarise_plan
from pipeline.registry import Registry
from pipeline.registry.publish import Publication
from pipeline.storage import TensorSpec
from pipeline.workflow import Workflow

logger = logging.getLogger(__name__)


class RunError(RuntimeError):
    """A run that failed; nothing it claimed was published."""


@dataclass
class SourceResult:
    source: str
    version: str | None = None
    url: str | None = None
    parent: dict[str, str] | None = None
    shards: dict[str, str] = field(default_factory=dict)
    verification: dict[str, Any] | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class RunResult:
    workflow: str
    plan_sha256: str
    dry_run: bool
    results: list[SourceResult] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    plan_table: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "workflow": self.workflow,
            "plan_sha256": self.plan_sha256,
            "dry_run": self.dry_run,
            "published": [r.__dict__ for r in self.results],
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }


Progress = Callable[[str, list], None]



def action_summary(summary: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Count parameters and elements per plan action, as the manifest records them."""
    actions: dict[str, dict[str, int]] = {}
    for row in summary["params"]:
        entry = actions.setdefault(row["action"], {"parameters": 0, "copied": 0, "gathered": 0, "initialised": 0, "folded": 0, "dropped": 0})
        entry["parameters"] += 1
        entry["copied"] += row["copied"]
        entry["gathered"] += row["gathered"]
        entry["initialised"] += sum(row["initialised"].values())
        entry["folded"] += row["folded"]
        entry["dropped"] += row["dropped"]
    for dropped in summary["dropped_params"]:
        entry = actions.setdefault("drop", {"parameters": 0, "dropped": 0})
        entry["parameters"] += 1
        size = 1
        for s in dropped.get("shape", []):
            size *= s
        entry["dropped"] = entry.get("dropped", 0) + size
    return actions


def run_workflow(workflow: Workflow, client: Client, *, dry_run: bool = False, progress: Progress | None = None) -> RunResult:
    """Run one workflow on ``client``'s cluster and return what it published."""
    progress = progress or (lambda phase, futures: None)
    timings: dict[str, float] = {}
    run_id = uuid.uuid4().hex[:12]

    # 1. Sources.
    started = time.perf_counter()
    sources = resolve_sources(workflow)
    if not sources:
        raise SourceError(f"workflow {workflow.name!r} names no source checkpoints")
    if len(sources) > 1 and workflow.destination.version != "next":
        raise SourceError(
            f"workflow {workflow.name!r} migrates {len(sources)} checkpoints but names one destination "
            f"version {workflow.destination.version!r}; use version: next so each gets its own version"
        )
    old_spec = workflow.old_spec or sources[0].spec
    if old_spec is None:
        raise SourceError(
            f"workflow {workflow.name!r} has no old_spec and its source {sources[0].label} records no model spec"
        )
    if not dry_run:
        checks = [client.submit(tasks.check_source_task, s, pure=False, key=f"check-{run_id}-{i}") for i, s in enumerate(sources)]
        progress("sources", checks)
        client.gather(checks)
        # Each phase drops its futures once it has their results: the scheduler recomputes
        # a finished task whose result dies with a worker for as long as a future references it.
        del checks
    timings["sources"] = time.perf_counter() - started
    logger.info("run %s: %d source checkpoint(s): %s", run_id, len(sources), ", ".join(s.label for s in sources))

    # 2. Maps of the old and new models, in parallel.
    started = time.perf_counter()
    map_futures = [
        client.submit(tasks.map_task, old_spec.to_json(), pure=False, key=f"map-old-{run_id}"),
        client.submit(tasks.map_task, workflow.new_spec.to_json(), pure=False, key=f"map-new-{run_id}"),
    ]
    progress("maps", map_futures)
    old_map, new_map = client.gather(map_futures)
    del map_futures
    timings["maps"] = time.perf_counter() - started

    # 3. Plan, once.
    started = time.perf_counter()
    options = parse_options(workflow.plan)
    old_side = ModelSide(*old_spec.build(device="meta"), old_map, old_spec)
    new_side = ModelSide(*workflow.new_spec.build(device="meta"), new_map, workflow.new_spec)
    plan = build_plan(old_side, new_side, options)
    table = format_table(summarise_plan(plan))
    timings["plan"] = time.perf_counter() - started
    logger.info("plan %s: %s", plan.sha256()[:12], "exact" if plan.exact else "approximate")
    old_names = [name for name, _ in old_side.module.named_parameters()]

    # Every run reads the source headers here, so a source that lacks a tensor the plan
    # reads, or stores it with another shape, stops the run before a version is claimed.
    _check_headers(plan, sources)
    if dry_run:
        return RunResult(workflow.name, plan.sha256(), True, [], timings, table)

    registry = Registry(workflow.destination.registry, workflow.destination.storage_options)
    publications: list[Publication] = []
    try:
        return _run(workflow, client, plan, table, sources, old_spec, old_names, registry, publications, run_id, timings, progress, new_side)
    except BaseException:
        for publication in publications:
            if publication.state != "committed":
                try:
                    publication.abort()
                except Exception:  # noqa: BLE001 - the original error is what the user needs
                    logger.exception("failed to abort the publication of %s", publication.url)
        raise


def _run(workflow, client, plan, table, sources, old_spec, old_names, registry, publications, run_id, timings, progress, new_side) -> RunResult:
    destination = workflow.destination
    plan_future = client.submit(tasks.plan_task, plan, pure=False, key=f"plan-{run_id}")

    # 4. Claim a version per source, then write every shard in its own task.
    started = time.perf_counter()
    jobs = []
    shard_futures = []
    for i, source in enumerate(sources):
        publication = registry.begin_publish(destination.model, destination.version, run_id=f"{run_id}-{i}")
        publications.append(publication)
        writer = publication.writer(destination.max_shard_bytes)
        model_plan = writer.plan_shards(_model_specs(plan))
        model_futures = [
            client.submit(tasks.shard_task, plan_future, source, writer, shard, "model", old_names, pure=False, key=f"shard-{run_id}-{i}-{shard.file}")
            for shard in model_plan
        ]
        optimizer_plan, optimizer_futures = None, None
        optimizer_specs = _optimizer_specs(plan, source, old_names)
        if optimizer_specs:
            optimizer_writer = publication.writer(destination.max_shard_bytes, part="optimizer")
            optimizer_plan = optimizer_writer.plan_shards(optimizer_specs)
            optimizer_futures = [
                client.submit(tasks.shard_task, plan_future, source, optimizer_writer, shard, "optimizer", old_names, pure=False, key=f"shard-{run_id}-{i}-{shard.file}")
                for shard in optimizer_plan
            ]
        jobs.append((source, publication, model_plan, model_futures, optimizer_plan, optimizer_futures))
        shard_futures.extend(model_futures + (optimizer_futures or []))
    progress("shards", shard_futures)
    wait(shard_futures)
    records = {}
    for source, publication, model_plan, model_futures, optimizer_plan, optimizer_futures in jobs:
        records[publication.url] = (client.gather(model_futures), client.gather(optimizer_futures) if optimizer_futures else None)
    # A shard task recomputed after this point would delete and rewrite a shard that verify
    # is reading or that a manifest already lists, so no shard future outlives its record.
    jobs = [(source, publication, model_plan, optimizer_plan) for source, publication, model_plan, _, optimizer_plan, _ in jobs]
    del shard_futures, model_futures, optimizer_futures
    timings["shards"] = time.perf_counter() - started

    # 5. Verify each new checkpoint against its source.
    started = time.perf_counter()
    resources = gpu_resources(client)
    settings = {
        "probes": workflow.verify.probes,
        "tolerance": workflow.verify.tolerance,
        "probe_batch": workflow.verify.probe_batch,
        "device": workflow.verify.device if resources or workflow.verify.device != "auto" else "cpu",
        "seed": workflow.verify.seed,
    }
    verify_futures = []
    for i, (source, publication, *_rest) in enumerate(jobs):
        model_records, _ = records[publication.url]
        verify_futures.append(
            client.submit(
                tasks.verify_task, plan_future, source, publication.url, registry.storage_options, model_records,
                old_spec.to_json(), workflow.new_spec.to_json(), settings,
                resources=resources, pure=False, key=f"verify-{run_id}-{i}",
            )
        )
    progress("verify", verify_futures)
    reports = client.gather(verify_futures)
    del verify_futures
    timings["verify"] = time.perf_counter() - started
    failed = [(job[0], report) for job, report in zip(jobs, reports) if not report["passed"]]
    if failed:
        lines = [f"{source.label}: max relative error {report['max_rel']:.3g} > tolerance {report['tolerance']:.3g}\n{report['table']}" for source, report in failed]
        raise RunError("verification failed; nothing was published:\n" + "\n".join(lines))

    # 6. Publish: extra model files, index, manifest, then tags.
    started = time.perf_counter()
    extra_files = model_files(workflow.new_spec, new_side.module, new_side.schema)
    results = []
    summary = summarise_plan(plan)
    for (source, publication, model_plan, optimizer_plan), report in zip(jobs, reports):
        model_records, optimizer_records = records[publication.url]
        for name, data in extra_files.items():
            publication.add_file(name, data)
        fields = {
            "model_spec": workflow.new_spec.to_json(),
            "feature_schema": new_side.schema,
            "parents": [source.parent] if source.parent else [],
            "plan": {
                "sha256": plan.sha256(),
                "options": workflow.plan,
                "actions": action_summary(summary),
            },
            "verification": {k: v for k, v in report.items() if k != "table"},
        }
        published = publication.commit(
            fields, model_plan, model_records,
            optimizer_plan=optimizer_plan, optimizer_records=optimizer_records,
            tags=list(destination.tags),
        )
        results.append(
            SourceResult(
                source=source.label,
                version=published.version,
                url=published.url,
                parent=source.parent,
                shards={r.file: r.sha256 for r in [*model_records, *(optimizer_records or [])]},
                verification=fields["verification"],
                tags=list(destination.tags),
            )
        )
    timings["publish"] = time.perf_counter() - started
    progress("publish", [])
    return RunResult(workflow.name, plan.sha256(), False, results, timings, table)


def _model_specs(plan: Plan) -> list[TensorSpec]:
    return [TensorSpec(pp.name, getattr(torch, pp.dtype), tuple(pp.shape)) for pp in plan.params]


def _optimizer_specs(plan: Plan, source: SourceRef, old_names: list[str]) -> list[TensorSpec]:
    reader = source.open_optimizer()
    if reader is None:
        return []
    try:
        entries = optimizer_entries(reader, old_names)
        specs = []
        for pp in plan.params:
            if pp.source is None or pp.tied_to is not None:
                continue
            for (param, key), stored in sorted(entries.items()):
                if param != pp.source:
                    continue
                info = reader.tensors[stored]
                shape = tuple(pp.shape) if key in tasks.MOMENT_KEYS else tuple(info.shape)
                specs.append(TensorSpec(f"optimizer.state.{pp.name}.{key}", info.dtype, shape))
        return specs
    finally:
        reader.close()


def _check_headers(plan: Plan, sources: list[SourceRef]) -> None:
    """Read only checkpoint headers and check that each source has every tensor the plan reads."""
    for source in sources:
        reader = source.open_model()
        try:
            from pipeline.execution.sources import OldTensors

            old = OldTensors(reader)
            problems = []
            for pp in plan.params:
                if pp.source is None:
                    continue
                if not old.has(pp.source):
                    problems.append(f"{pp.source}: missing")
                    continue
                shape = tuple(reader.tensors[old.name(pp.source)].shape)
                if shape != tuple(pp.source_shape):
                    problems.append(f"{pp.source}: shape {list(shape)}, the plan expects {list(pp.source_shape)}")
            if problems:
                raise SourceError(f"source {source.label} does not fit the plan's old model: " + "; ".join(problems[:10]))
        finally:
            reader.close()
