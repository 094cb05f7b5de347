"""gc: unpublished versions older than the grace period, stale tag locks, incomplete S3 uploads."""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta, timezone

import pytest

from pipeline.registry import Registry
from pipeline.storage import TensorSpec

from tests.registry.helpers import publish, trained_policy
from tests.storage.conftest import BUCKET, Backend

# S3 reports LastModified in whole seconds, so the ages below keep a margin of 0.5 s or more.
WAIT_SECONDS = 2.5
GRACE = timedelta(seconds=1.8)


def start_orphan(registry: Registry, version: str) -> None:
    """Claim a version and write one shard, as a run that dies before commit does."""
    publication = registry.begin_publish("policy", version, run_id=f"dead-{version}")
    state = trained_policy(0).state_dict()
    writer = publication.writer(200)
    plan = writer.plan_shards(TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in state.items())
    writer.write_shard(plan[0], state)


def test_gc_removes_only_old_orphans(backend: Backend, request: pytest.FixtureRequest) -> None:
    registry = Registry(backend.root, backend.storage_options)
    publish(registry, "policy", trained_policy(0), tags=["latest"])
    start_orphan(registry, "2")
    upload_key = None
    if backend.name == "s3":
        client = request.getfixturevalue("s3_client")
        prefix = backend.path().split("/", 1)[1]
        upload_key = f"{prefix}/policy/5/model-00001-of-00001.safetensors"
        client.create_multipart_upload(Bucket=BUCKET, Key=upload_key)
    time.sleep(WAIT_SECONDS)
    start_orphan(registry, "3")

    preview = registry.gc(grace=GRACE, dry_run=True)
    assert [entry.url for entry in preview.removed if entry.kind == "version"] == [f"{registry.url}/policy/2"]
    assert backend.exists("policy/2/.claim")

    report = registry.gc(grace=GRACE)

    removed = [(entry.kind, entry.url) for entry in report.removed]
    kept = [(entry.kind, entry.url) for entry in report.kept]
    assert ("version", f"{registry.url}/policy/2") in removed
    assert ("version", f"{registry.url}/policy/3") in kept
    assert backend.listing("policy/2") == []
    assert backend.exists("policy/3/.claim")
    assert registry.versions("policy") == ["1"]
    assert registry.resolve("policy", "latest").verify().ok
    if upload_key is not None:
        assert ("upload", f"s3://{BUCKET}/{upload_key}") in removed
        uploads = client.list_multipart_uploads(Bucket=BUCKET, Prefix=f"{prefix}/")
        assert uploads.get("Uploads", []) == []
    else:
        assert len(removed) == 1


def test_gc_removes_stale_tag_lock(tmp_path) -> None:
    registry = Registry(str(tmp_path))
    publish(registry, "policy", trained_policy(0), tags=["latest"])
    lock = tmp_path / "policy" / "refs" / "latest.lock"
    lock.write_bytes(b"")
    old = time.time() - 3 * 3600
    os.utime(lock, (old, old))
    fresh_lock = tmp_path / "policy" / "refs" / "beta.lock"
    fresh_lock.write_bytes(b"")

    report = registry.gc("policy", grace=timedelta(hours=1))

    assert [(entry.kind, entry.url) for entry in report.removed] == [("lock", f"file://{lock}")]
    assert not lock.exists()
    assert fresh_lock.exists()
    assert registry.move_tag("policy", "latest", "1").version == "1"


def test_gc_respects_now_and_model(tmp_path) -> None:
    registry = Registry(str(tmp_path))
    publish(registry, "policy", trained_policy(0))
    publish(registry, "value", trained_policy(0))
    start_orphan(registry, "2")

    assert registry.gc(grace=timedelta(hours=1)).removed == []
    later = datetime.now(timezone.utc) + timedelta(hours=2)
    assert registry.gc("value", grace=timedelta(hours=1), now=later).removed == []
    report = registry.gc("policy", grace=timedelta(hours=1), now=later)
    assert [entry.url for entry in report.removed] == [f"{registry.url}/policy/2"]
    assert not (tmp_path / "policy" / "2").exists()
    with pytest.raises(ValueError, match="grace is -1 day"):
        registry.gc(grace=timedelta(hours=-1))
