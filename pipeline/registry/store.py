"""Object primitives the registry needs, with one implementation per kind of filesystem.

The registry needs six operations beyond plain reads: create-only writes (claims,
manifests), compare-and-swap of small objects (tags), recursive listings with
modification times (gc, ``next``), removal, making written files durable, and on S3
the listing and abort of incomplete multipart uploads. :func:`open_store` picks:

- :class:`~pipeline.registry.store_local.LocalStore` for local paths: create-only with
  ``os.link``, compare-and-swap with an ``O_EXCL`` lock file and ``os.replace``;
- :class:`~pipeline.registry.store_s3.S3Store` for ``s3://``: ``PutObject`` with
  ``If-None-Match: *`` and ``If-Match: <ETag>``;
- :class:`FsspecStore` for every other protocol (``memory://`` among them):
  check-then-write. A process-wide lock serialises these writes within one process,
  which makes ``memory://`` safe (its store exists in one process only). On other
  filesystems two processes can still race, so the registry logs a warning there.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Mapping

import fsspec

from pipeline.storage import fsio
from pipeline.storage.errors import ObjectExistsError
from pipeline.storage.sinks import exists_error, open_sink

logger = logging.getLogger(__name__)


class ConflictError(Exception):
    """Internal: a compare-and-swap found another token than expected (or a held lock)."""

    def __init__(self, message: str, *, locked_by: str | None = None) -> None:
        super().__init__(message)
        self.locked_by = locked_by


@dataclass(frozen=True)
class StoredObject:
    """One file below a listed prefix: its path, size in bytes and modification time (POSIX seconds)."""

    path: str
    size: int
    modified: float | None


@dataclass(frozen=True)
class PendingUpload:
    """An incomplete S3 multipart upload: its key, upload id and start time (POSIX seconds)."""

    path: str
    upload_id: str
    initiated: float | None


class ObjectStore(ABC):
    """Registry primitives over one fsspec filesystem. Paths are filesystem paths."""

    #: Whether create-only writes and compare-and-swap are atomic for every writer that can reach the store.
    atomic: bool = True

    def __init__(self, fs: fsspec.AbstractFileSystem) -> None:
        self.fs = fs

    def url(self, path: str) -> str:
        return fsio.url_of(self.fs, path)

    def read(self, path: str) -> bytes:
        """Return the whole object; raise FileNotFoundError when it is missing."""
        return self.fs.cat_file(path)

    def read_with_token(self, path: str) -> tuple[bytes, str] | None:
        """Return the object and a token that changes with its content (S3: the ETag), or None when missing."""
        try:
            data = self.read(path)
        except FileNotFoundError:
            return None
        return data, content_token(data)

    def exists(self, path: str) -> bool:
        self.fs.invalidate_cache(path)
        return bool(self.fs.exists(path))

    @abstractmethod
    def create(self, path: str, data: bytes) -> None:
        """Write ``data`` to ``path`` unless an object exists there (ObjectExistsError)."""

    @abstractmethod
    def replace(self, path: str, data: bytes, expected: str | None) -> str:
        """Write ``data`` only if the object's token is ``expected`` (None: only if missing).

        Returns the new token. Raises ConflictError when the object changed meanwhile.
        """

    def list_names(self, path: str) -> list[str]:
        """Return the names of the entries directly below ``path`` ([] when missing)."""
        self.fs.invalidate_cache(path)
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        names = {str(entry).rstrip("/").rsplit("/", 1)[-1] for entry in entries}
        names.discard("")
        return sorted(names)

    def list_dirs(self, path: str) -> list[str]:
        """Return the names of the folders (S3: common prefixes) directly below ``path``."""
        self.fs.invalidate_cache(path)
        try:
            entries = self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
        return sorted(
            str(entry["name"]).rstrip("/").rsplit("/", 1)[-1] for entry in entries if entry.get("type") == "directory"
        )

    def walk(self, path: str) -> list[StoredObject]:
        """Return every file below ``path`` with its size and modification time."""
        self.fs.invalidate_cache(path)
        try:
            found = self.fs.find(path, withdirs=False, detail=True)
        except FileNotFoundError:
            return []
        return [
            StoredObject(path=name, size=int(info.get("size") or 0), modified=modified_time(info))
            for name, info in sorted(found.items())
            if info.get("type", "file") == "file"
        ]

    def remove(self, path: str) -> None:
        """Delete one object; a missing object is not an error."""
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass
        finally:
            self.fs.invalidate_cache(path)

    def remove_empty_dirs(self, path: str) -> None:
        """Remove ``path`` if it is an empty directory; object stores have none."""

    def flush(self, paths: list[str]) -> None:
        """Make written files durable before the manifest refers to them (local files only)."""

    def pending_uploads(self, prefix: str) -> list[PendingUpload]:
        """Return incomplete multipart uploads below ``prefix`` (S3 only)."""
        return []

    def abort_upload(self, upload: PendingUpload) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no multipart uploads")


def content_token(data: bytes) -> str:
    """Return the token of an object whose store has no ETag: the sha256 of its bytes."""
    return hashlib.sha256(data).hexdigest()


def modified_time(info: Mapping[str, Any]) -> float | None:
    """Return the modification time from an fsspec info dict, in POSIX seconds."""
    for key in ("mtime", "LastModified", "last_modified", "created"):
        value = info.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
    return None


# One lock for all FsspecStore instances: memory:// keeps a single store per process.
_PROCESS_LOCK = threading.RLock()


class FsspecStore(ObjectStore):
    """Check-then-write on any fsspec filesystem, serialised by a process-wide lock."""

    def __init__(self, fs: fsspec.AbstractFileSystem) -> None:
        super().__init__(fs)
        protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
        self.atomic = "memory" in protocols

    def create(self, path: str, data: bytes) -> None:
        with _PROCESS_LOCK:
            if self.exists(path):
                raise exists_error(self.url(path))
            sink = open_sink(self.fs, path, url=self.url(path))
            try:
                sink.write(memoryview(data))
                sink.commit()
            except BaseException:
                sink.abort()
                raise

    def replace(self, path: str, data: bytes, expected: str | None) -> str:
        with _PROCESS_LOCK:
            current = self.read_with_token(path)
            token = current[1] if current is not None else None
            if token != expected:
                raise ConflictError(f"{self.url(path)} changed since it was read")
            self.fs.pipe_file(path, data)
        return content_token(data)

    def remove_empty_dirs(self, path: str) -> None:
        try:
            if self.fs.isdir(path) and not self.fs.find(path):
                self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass


def open_store(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[ObjectStore, str]:
    """Return the store for ``url`` and the path of ``url`` inside it."""
    fs, path = fsio.resolve(url, storage_options)
    if fsio.is_local(fs):
        from pipeline.registry.store_local import LocalStore

        return LocalStore(fs), path
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if "s3" in protocols or "s3a" in protocols:
        from pipeline.registry.store_s3 import S3Store

        return S3Store(fs), path
    store = FsspecStore(fs)
    if not store.atomic:
        logger.warning(
            "registry %s: %s has no create-only or conditional writes here, so the registry "
            "uses check-then-write; two processes publishing or tagging at once can race",
            url, protocols[0],
        )
    return store, path


__all__ = [
    "ConflictError",
    "FsspecStore",
    "ObjectExistsError",
    "ObjectStore",
    "PendingUpload",
    "StoredObject",
    "content_token",
    "open_store",
]
