"""Re-hashing a version's shards and files against its manifest."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from pipeline.storage import integrity
from pipeline.storage.errors import CheckpointNotFoundError, IntegrityError

if TYPE_CHECKING:
    from pipeline.registry.version import ModelVersion

logger = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    """The files checked (name -> bytes) and one line per file that failed."""

    url: str
    checked: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_file(version: "ModelVersion", name: str, digest: Mapping[str, Any]) -> None:
    """Hash one file of ``version`` and compare it with its manifest entry.

    Raises IntegrityError naming the file, the expected and the actual size or sha256,
    or CheckpointNotFoundError when the file is missing.
    """
    registry = version.registry
    path = registry.layout.file(version.model, version.version, name)
    expected = integrity.ShardDigest(sha256=str(digest["sha256"]), size=int(digest["size"]))
    integrity.verify_file(registry.store.fs, path, name, expected, url=version.file_url(name))


def verify_files(version: "ModelVersion", entries: Iterable[tuple[str, Mapping[str, Any]]]) -> None:
    """Verify each ``(name, digest)`` in order, raising at the first mismatch."""
    for name, digest in entries:
        verify_file(version, name, digest)


def verify_version(version: "ModelVersion") -> VerifyReport:
    """Re-hash every shard and file of ``version``; the report lists every mismatch, not only the first."""
    manifest = version.manifest
    report = VerifyReport(url=version.url)
    entries = [*manifest.shards.items(), *manifest.files.items()]
    for name, digest in entries:
        try:
            verify_file(version, name, digest)
        except (IntegrityError, CheckpointNotFoundError) as e:
            report.problems.append(str(e))
            logger.info("verification of %s failed: %s", version.file_url(name), e)
            continue
        report.checked[name] = int(digest["size"])
    return report
