"""``surgery registry`` commands.

The main paths run as a user runs them, ``python -m pipeline.cli.main registry ...`` in a
subprocess. Output details and error paths call the same ``main`` in-process, because
each interpreter start costs about 2.5 s of CPU (torch and the storage readers).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli.main import main
from pipeline.cli.registry_commands import RegistryCommandError, parse_storage_options
from pipeline.registry import Registry
from pipeline.storage import TensorSpec

from tests.registry.helpers import publish, trained_policy
from tests.storage.conftest import Backend

ROOT = Path(__file__).resolve().parents[2]


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli.main", "registry", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_all(*commands: tuple[str, ...]) -> list[subprocess.CompletedProcess]:
    """Run commands side by side, to spend less wall time on interpreter start-up."""
    return [finish(process) for process in [start(*command) for command in commands]]


def run_here(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess:
    """Run ``surgery registry ARGS`` in this process and capture its output."""
    capsys.readouterr()
    status = main(["registry", *args])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, status, captured.out, captured.err)


def folder(registry: Registry, *parts: str) -> Path:
    return Path(registry.url.removeprefix("file://"), *parts)


@pytest.fixture
def registry(tmp_path) -> Registry:
    registry = Registry(str(tmp_path / "registry"))
    first = publish(registry, "policy", trained_policy(1), tags=["latest"], files={"config.json": b"{}\n"})
    second = publish(registry, "policy", trained_policy(2), parents=[first])
    publish(registry, "policy", trained_policy(3), parents=[second], tags=["latest"])
    publish(registry, "value", trained_policy(4))
    # A run that died before commit: invisible to ls.
    registry.begin_publish("policy", "4", run_id="dead-run")
    return registry


def test_read_commands(registry: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    url = registry.url
    models, raw, log = run_all(("ls", url), ("show", url, "policy", "1", "--json"), ("log", url, "policy", "latest"))

    assert models.returncode == 0, models.stderr
    assert models.stdout.splitlines() == [
        "MODEL   VERSIONS  NEWEST  TAGS",
        "policy  3         3       latest",
        "value   1         1",
    ]
    assert raw.returncode == 0, raw.stderr
    assert raw.stdout == folder(registry, "policy", "1", "manifest.json").read_text()
    assert json.loads(raw.stdout)["files"]["config.json"]["size"] == 3
    assert log.returncode == 0, log.stderr
    assert [line.split()[0] for line in log.stdout.splitlines()] == ["policy/3", "policy/2", "policy/1"]
    assert [len(line) - len(line.lstrip()) for line in log.stdout.splitlines()] == [0, 2, 4]

    versions = run_here(capsys, "ls", url, "policy")
    lines = versions.stdout.splitlines()
    assert lines[0].split() == ["VERSION", "CREATED", "TAGS"]
    assert [line.split() for line in lines[1:]] == [
        ["1", registry.get("policy", "1").created_at],
        ["2", registry.get("policy", "2").created_at],
        ["3", registry.get("policy", "3").created_at, "latest"],
    ]
    show = run_here(capsys, "show", url, "policy", "latest")
    summary = {key: value.strip() for key, value in (line.split(": ", 1) for line in show.stdout.splitlines())}
    assert summary["version"] == "3"
    assert summary["tags"] == "latest"
    assert summary["parents"] == f"policy/2 in {url}"
    assert summary["shards"].startswith("3 (")
    assert summary["plan"] == "none (first import)"
    assert summary["verification"] == "none"


def test_verify_names_corrupt_shard(registry: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    url = registry.url
    version = registry.get("policy", "2")
    shard = sorted(version.manifest.shards)[1]
    good = run_here(capsys, "verify", url, "policy", "2")
    path = folder(registry, "policy", "2", shard)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    [bad] = run_all(("verify", url, "policy", "2"))

    assert good.returncode == 0, good.stderr
    assert good.stdout.splitlines()[-1].startswith("verified 4 files (")
    assert bad.returncode == 1
    assert [line for line in bad.stdout.splitlines() if line.startswith("FAILED")] == [
        f"FAILED  shard {shard} ({url}/policy/2/{shard}) failed verification: expected sha256 "
        f"{version.manifest.shards[shard]['sha256']}, actual {hashlib.sha256(bytes(data)).hexdigest()}; "
        "the shard is corrupt or the manifest is stale. Copy the shard again or regenerate the manifest"
    ]
    assert bad.stderr.strip() == "error: 1 of 4 files of version 2 of model 'policy' failed verification"


def test_tag_and_gc(registry: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    url = registry.url
    [moved] = run_all(("tag", url, "policy", "1", "prod"))
    assert moved.returncode == 0, moved.stderr
    assert moved.stdout.strip() == "tag 'prod' of model 'policy': no version -> version 1"

    conflict = run_here(capsys, "tag", url, "policy", "2", "prod", "--expect", "3")
    assert conflict.returncode == 2
    assert conflict.stderr.strip() == (
        "error: tag 'prod' of model 'policy' names version 1, not version 3 as --expect requires; the tag was not moved"
    )
    again = run_here(capsys, "tag", url, "policy", "latest", "prod", "--expect", "1")
    assert again.stdout.strip() == "tag 'prod' of model 'policy': version 1 -> version 3"
    missing = run_here(capsys, "show", url, "policy", "4")
    assert missing.returncode == 2
    assert missing.stderr.startswith(
        "error: version 4 of model 'policy' has no manifest; it was never published or its publication failed "
        "(claimed by run 'dead-run' on host "
    )

    dry = run_here(capsys, "gc", url, "--grace", "0", "--dry-run")
    assert dry.stdout.splitlines()[0].startswith(f"would remove version {url}/policy/4 (age ")
    assert dry.stdout.splitlines()[-1] == "gc: would remove 1, kept 0 (grace 0 hours)"
    kept = run_here(capsys, "gc", url, "policy", "--grace", "1")
    assert kept.stdout.splitlines()[-1] == "gc: removed 0, kept 1 (grace 1 hours)"
    [removed] = run_all(("gc", url, "policy", "--grace", "0"))
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.splitlines()[-1] == "gc: removed 1, kept 0 (grace 0 hours)"
    assert not folder(registry, "policy", "4").exists()
    assert run_here(capsys, "ls", url, "policy").stdout.count("\n") == 4


@pytest.mark.parametrize("backend", ["s3"], indirect=True)
def test_s3_endpoint_from_option_and_env(backend: Backend, s3_endpoint: str, capsys: pytest.CaptureFixture[str]) -> None:
    registry = Registry(backend.root, backend.storage_options)
    publish(registry, "policy", trained_policy(1), tags=["latest"])
    publication = registry.begin_publish("policy", run_id="dead-run")
    state = trained_policy(1).state_dict()
    writer = publication.writer(200)
    plan = writer.plan_shards(TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in state.items())
    writer.write_shard(plan[0], state)
    option = f"client_kwargs.endpoint_url={s3_endpoint}"

    by_option = start("ls", backend.root, "policy", "--storage-option", option)
    by_env = start("verify", backend.root, "policy", "latest", env={"FSSPEC_S3_ENDPOINT_URL": s3_endpoint})
    listing, verified = finish(by_option), finish(by_env)

    assert listing.returncode == 0, listing.stderr
    assert [line.split()[0] for line in listing.stdout.splitlines()] == ["VERSION", "1"]
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.splitlines()[-1].startswith("verified 4 files")
    gc = run_here(capsys, "gc", backend.root, "--grace", "0", "--storage-option", option)
    assert gc.returncode == 0, gc.stderr
    assert gc.stdout.splitlines()[0].startswith(f"removed version {backend.root}/policy/2 ")


def test_errors_and_options(tmp_path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SURGERY_REGISTRY", raising=False)
    assert run_here(capsys, "ls").stderr.strip() == "error: no registry URL: pass one, or set SURGERY_REGISTRY"
    monkeypatch.setenv("SURGERY_REGISTRY", str(tmp_path))
    assert run_here(capsys, "ls").stdout.strip() == f"no models in registry file://{tmp_path}"
    unknown = run_here(capsys, "ls", str(tmp_path), "policy")
    assert (unknown.returncode, unknown.stderr.strip()) == (2, f"error: model 'policy' not found in registry file://{tmp_path}")
    bad_name = run_here(capsys, "show", str(tmp_path), "../x", "1")
    assert bad_name.stderr.startswith("error: model name '../x' is invalid")
    assert run_here(capsys, "gc", str(tmp_path), "--grace", "-1").stderr.strip() == "error: --grace is -1.0; expected hours, zero or more"

    assert parse_storage_options(
        ["client_kwargs.endpoint_url=http://127.0.0.1:5000", "anon=true", "client_kwargs.region_name=us-east-1", 'key="0123"']
    ) == {"client_kwargs": {"endpoint_url": "http://127.0.0.1:5000", "region_name": "us-east-1"}, "anon": True, "key": "0123"}
    for bad in ("novalue", "=x", "a..b=1"):
        with pytest.raises(RegistryCommandError, match=r"--storage-option .* is invalid; expected KEY=VALUE"):
            parse_storage_options([bad])
    with pytest.raises(RegistryCommandError, match=r"conflicts with option 'a' given as a value"):
        parse_storage_options(["a=1", "a.b=2"])
