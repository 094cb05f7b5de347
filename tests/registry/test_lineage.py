"""Lineage across registries and models, with a parent manifest that changed after publication."""

from __future__ import annotations

import json

from pipeline.registry import Registry, walk_lineage

from tests.registry.helpers import publish, trained_policy


def test_lineage_three_versions(tmp_path) -> None:
    imports = Registry(str(tmp_path / "imports"))
    production = Registry(str(tmp_path / "production"))
    first = publish(imports, "policy", trained_policy(1))
    second = publish(production, "policy-wide", trained_policy(2), parents=[first])
    third = publish(production, "policy-wide", trained_policy(3), parents=[second])

    entries = walk_lineage(production.resolve("policy-wide", "2"))

    assert [(e.depth, e.registry, e.model, e.version) for e in entries] == [
        (0, production.url, "policy-wide", "2"),
        (1, production.url, "policy-wide", "1"),
        (2, imports.url, "policy", "1"),
    ]
    assert all(e.problem is None for e in entries)
    assert entries[0].manifest.sha256 == third.manifest.sha256
    assert third.manifest.parents == [second.as_parent()]
    assert second.manifest.parents == [
        {"registry": imports.url, "model": "policy", "version": "1", "manifest_sha256": first.manifest.sha256}
    ]


def test_lineage_reports_changed_parent(tmp_path) -> None:
    registry = Registry(str(tmp_path))
    first = publish(registry, "policy", trained_policy(1))
    publish(registry, "policy", trained_policy(2), parents=[first, {**first.as_parent(), "version": "9"}])
    path = tmp_path / "policy" / "1" / "manifest.json"
    document = json.loads(path.read_text())
    document["run_id"] = "rewritten"
    path.write_text(json.dumps(document))

    entries = walk_lineage(registry.resolve("policy", "2"))

    assert [(e.depth, e.version, e.manifest is None) for e in entries] == [(0, "2", False), (1, "1", True), (1, "9", True)]
    assert entries[1].problem.startswith(f"parent manifest {registry.url}/policy/1/manifest.json has sha256 ")
    assert entries[1].problem.endswith(
        f"but the child recorded {first.manifest.sha256}; the parent was replaced after the child was published"
    )
    assert entries[2].problem.startswith("parent not readable: model 'policy' has no version or tag '9'")
