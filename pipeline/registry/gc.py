"""Garbage collection: unpublished versions, stale tag locks and incomplete S3 uploads.

A version folder without ``manifest.json`` is a publication in progress or one that
died. Its age is the time since its newest object was written (the claim or any shard),
so a run that keeps writing shards stays fresh. Once that age reaches the grace period,
gc removes the claim first and then the files it listed. Removing the claim first makes
a slow but still running publication fail its claim check before it writes a manifest,
instead of publishing a version whose shards gc is deleting.

NOTE: a publication that writes nothing for longer than the grace period, and then
commits, can still race with gc. Use a grace period longer than the longest
publication; the default is 24 hours.

Lock files of tags (local registries) older than the grace period are left over from
a writer that died while moving a tag, and are removed too. On S3, incomplete
multipart uploads below the registry (or model) prefix that started before the grace
period are aborted.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from pipeline.registry.layout import CLAIM_NAME, LOCK_SUFFIX, MANIFEST_NAME, REFS_DIR, validate_model_name
from pipeline.registry.store import StoredObject

if TYPE_CHECKING:
    from pipeline.registry.client import Registry

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GcEntry:
    """One thing gc removed or kept: its kind (version, lock, upload), URL, age in seconds and detail."""

    kind: str
    url: str
    age_seconds: float | None
    detail: str = ""


@dataclass
class GcReport:
    """Result of one gc run: the entries removed (with dry_run: to be removed) and the entries kept."""

    dry_run: bool
    grace_seconds: float
    removed: list[GcEntry] = field(default_factory=list)
    kept: list[GcEntry] = field(default_factory=list)


def collect_garbage(
    registry: "Registry",
    model: str | None = None,
    *,
    grace: timedelta,
    dry_run: bool = False,
    now: datetime | None = None,
) -> GcReport:
    """Remove what is unpublished and older than ``grace``; return the report.

    ``model`` limits gc to one model. ``now`` (timezone-aware) replaces the current
    time, for checks of what a later run would remove.
    """
    if grace < timedelta(0):
        raise ValueError(f"grace is {grace}; expected a duration of zero or more")
    now_seconds = now.timestamp() if now is not None else time.time()
    report = GcReport(dry_run=dry_run, grace_seconds=grace.total_seconds())
    models = [validate_model_name(model)] if model is not None else registry.models()
    for name in models:
        _collect_model(registry, name, now_seconds, report)

    store, layout = registry.store, registry.layout
    prefix = layout.model(model) if model is not None else layout.root
    for upload in store.pending_uploads(prefix):
        age = now_seconds - upload.initiated if upload.initiated is not None else None
        url = store.url(upload.path)
        if age is None or age < report.grace_seconds:
            report.kept.append(GcEntry("upload", url, age, f"upload id {upload.upload_id}"))
            continue
        if not dry_run:
            store.abort_upload(upload)
            logger.info("gc: aborted multipart upload %s of %s", upload.upload_id, url)
        report.removed.append(GcEntry("upload", url, age, f"upload id {upload.upload_id}"))
    return report


def _collect_model(registry: "Registry", model: str, now_seconds: float, report: GcReport) -> None:
    store, layout = registry.store, registry.layout
    model_path = layout.model(model).rstrip("/")
    folders: dict[str, list[StoredObject]] = {}
    for stored in store.walk(model_path):
        relative = stored.path[len(model_path) + 1 :]
        folder, _, rest = relative.partition("/")
        if rest:
            folders.setdefault(folder, []).append(stored)

    for stored in folders.pop(REFS_DIR, []):
        if not stored.path.endswith(LOCK_SUFFIX):
            continue
        age = _age(now_seconds, [stored])
        if age is not None and age >= report.grace_seconds:
            if not report.dry_run:
                store.remove(stored.path)
                logger.info("gc: removed stale tag lock %s", store.url(stored.path))
            report.removed.append(GcEntry("lock", store.url(stored.path), age, "tag lock left by a dead writer"))

    for version, objects in sorted(folders.items()):
        names = {stored.path.rsplit("/", 1)[-1] for stored in objects}
        if MANIFEST_NAME in names:
            continue
        url = registry.version_url(model, version)
        age = _age(now_seconds, objects)
        detail = f"{len(objects)} files, {'with' if CLAIM_NAME in names else 'without'} a claim"
        if age is None or age < report.grace_seconds:
            report.kept.append(GcEntry("version", url, age, detail + "; younger than the grace period"))
            continue
        if not report.dry_run:
            _remove_version(registry, model, version, objects)
        report.removed.append(GcEntry("version", url, age, detail))


def _remove_version(registry: "Registry", model: str, version: str, objects: list[StoredObject]) -> None:
    store, layout = registry.store, registry.layout
    if store.exists(layout.manifest(model, version)):
        logger.info("gc: version %s of model %r was published meanwhile; keeping it", version, model)
        return
    claim = layout.claim(model, version)
    store.remove(claim)
    for stored in objects:
        if stored.path != claim:
            store.remove(stored.path)
    store.remove_empty_dirs(layout.version(model, version))
    logger.info("gc: removed unpublished version %s of model %r (%d files)", version, model, len(objects))


def _age(now_seconds: float, objects: list[StoredObject]) -> float | None:
    times = [stored.modified for stored in objects if stored.modified is not None]
    return now_seconds - max(times) if times else None
