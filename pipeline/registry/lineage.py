"""Lineage: the chain of parent versions that a version was derived from.

Each manifest lists its parents by registry URL, model, version and the sha256 of the
parent's manifest. The walk follows them depth first, across registries and models,
and checks each parent manifest against the recorded sha256.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

import fsspec

from pipeline.registry.client import Registry
from pipeline.registry.errors import ManifestError, ModelNotFoundError, VersionNotFoundError
from pipeline.registry.manifest import Manifest
from pipeline.registry.version import ModelVersion
from pipeline.storage.errors import InvalidNameError

logger = logging.getLogger(__name__)

MAX_ENTRIES = 1000


@dataclass(frozen=True)
class LineageEntry:
    """One version in a lineage: its depth (0 for the start), where it is, and its manifest or the problem."""

    depth: int
    registry: str
    model: str
    version: str
    manifest: Manifest | None
    problem: str | None = None


def walk_lineage(start: ModelVersion, *, storage_options: Mapping[str, Any] | None = None) -> list[LineageEntry]:
    """Return ``start`` and its ancestors, depth first, parents in manifest order.

    Parent registries with the start registry's protocol get ``storage_options``
    (default: the start registry's); others get fsspec's defaults. A parent that is
    missing, invalid, or whose manifest sha256 differs from the recorded one becomes an
    entry with ``problem`` set, and the walk continues with the other branches.
    """
    options = dict(start.registry.storage_options if storage_options is None else storage_options)
    protocol = _protocol(start.registry.url)
    registries: dict[str, Registry] = {start.registry.url: start.registry}
    entries: list[LineageEntry] = []
    seen: set[tuple[str, str, str]] = set()
    stack: list[tuple[int, dict[str, Any] | None, ModelVersion | None]] = [(0, None, start)]
    while stack and len(entries) < MAX_ENTRIES:
        depth, parent, version = stack.pop()
        if version is None:
            assert parent is not None
            version, problem = _open_parent(parent, registries, options, protocol)
            if version is None:
                entries.append(LineageEntry(depth, parent["registry"], parent["model"], parent["version"], None, problem))
                continue
        key = (version.registry.url, version.model, version.version)
        entries.append(LineageEntry(depth, version.registry.url, version.model, version.version, version.manifest))
        if key in seen:
            continue
        seen.add(key)
        for next_parent in reversed(version.manifest.parents):
            stack.append((depth + 1, next_parent, None))
    if stack:
        logger.warning("lineage of %s has more than %d entries; stopped there", start.url, MAX_ENTRIES)
    return entries


def _open_parent(
    parent: dict[str, Any], registries: dict[str, Registry], options: dict[str, Any], protocol: str
) -> tuple[ModelVersion | None, str | None]:
    url = parent["registry"]
    try:
        registry = registries.get(url)
        if registry is None:
            registry = Registry(url, options if _protocol(url) == protocol else None)
            registries[url] = registry
        version = registry.get(parent["model"], parent["version"])
    except (ModelNotFoundError, VersionNotFoundError, ManifestError, InvalidNameError, OSError, ValueError) as e:
        return None, f"parent not readable: {e}"
    if version.manifest.sha256 != parent["manifest_sha256"]:
        return None, (
            f"parent manifest {version.manifest.url} has sha256 {version.manifest.sha256}, but the "
            f"child recorded {parent['manifest_sha256']}; the parent was replaced after the child "
            "was published"
        )
    return version, None


def _protocol(url: str) -> str:
    protocol = fsspec.core.split_protocol(url)[0] or "file"
    return protocol
