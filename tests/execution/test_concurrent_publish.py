"""Two ``surgery run`` processes that publish the same explicit version at once: one wins."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from pipeline.registry import Registry
from tests.execution.helpers import CLI_TIMEOUT, import_five, start_cli, write_workflow

VERSION = "7"
MODEL = "five-wide-lstm"


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_same_version_published_once(backend, client, scheduler_address, tmp_path: Path, request):
    if backend == "s3":
        options = request.getfixturevalue("s3_options")
        bucket = request.getfixturevalue("s3_bucket")
        registry = Registry(f"s3://{bucket}/{uuid.uuid4().hex}/registry", options)
    else:
        options = None
        registry = Registry(f"file://{tmp_path}/registry")
    import_five(registry, tmp_path, seed=8)
    path = write_workflow(
        tmp_path / "wide.yaml", MODEL, registry.url, storage_options=options, destination={"version": VERSION}
    )

    processes = [start_cli("run", str(path), "--scheduler", scheduler_address, "--json") for _ in range(2)]
    outputs = [process.communicate(timeout=CLI_TIMEOUT) for process in processes]
    codes = [process.returncode for process in processes]

    assert sorted(codes) == [0, 1], outputs
    winner = codes.index(0)
    stdout, _ = outputs[winner]
    summary = json.loads(stdout)
    assert [item["version"] for item in summary["published"]] == [VERSION]
    loser_stdout, loser_stderr = outputs[1 - winner]
    assert loser_stdout == ""
    assert f"error: version {VERSION} of model '{MODEL}'" in loser_stderr
    assert "Traceback" not in loser_stderr

    assert registry.versions(MODEL) == [VERSION]
    published = registry.get(MODEL, VERSION)
    assert published.verify().ok
    assert {name: entry["sha256"] for name, entry in published.manifest.shards.items()} == summary["published"][0]["shards"]
    assert registry.read_tag(MODEL, "latest").version == VERSION
    leftovers = [
        stored.path for stored in registry.store.walk(registry.layout.model(MODEL))
        if not stored.path.startswith(registry.layout.version(MODEL, VERSION) + "/")
        and "/refs/" not in stored.path
    ]
    assert leftovers == []
