"""Registry primitives on a local (or network-mounted POSIX) filesystem.

Create-only: the bytes go to a hidden temporary file in the destination folder, which
is fsynced and then published with ``os.link``. ``link`` fails with EEXIST when the
destination exists, so of two writers exactly one succeeds, and readers never see a
partly written object.

Compare-and-swap (tags), the scheme git uses for its refs:

1. create ``<path>.lock`` with ``O_CREAT | O_EXCL``; if it exists, another writer is
   updating the object, and this one loses;
2. while holding the lock, read the object and compare its token (the sha256 of its
   bytes) with the expected one. On a mismatch, remove the lock and lose;
3. write the new bytes into the lock file, fsync it, and ``os.replace`` it onto the
   object, which swaps the content atomically and releases the lock in one step.

Every writer goes through the lock, so no update can slip in between steps 2 and 3.
A writer that dies between steps 1 and 3 leaves the lock file behind. Later updates
then fail with a message that names it, and ``gc`` removes it after the grace period.
"""

from __future__ import annotations

import logging
import os
import uuid

from pipeline.registry.layout import LOCK_SUFFIX
from pipeline.registry.store import ConflictError, ObjectStore, content_token
from pipeline.storage.sinks import exists_error

logger = logging.getLogger(__name__)

_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


class LocalStore(ObjectStore):
    """Local files: ``os.link`` for create-only writes, a lock file plus ``os.replace`` for CAS."""

    def read(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def exists(self, path: str) -> bool:
        return os.path.lexists(path)

    def create(self, path: str, data: bytes) -> None:
        directory, name = os.path.split(path)
        os.makedirs(directory, exist_ok=True)
        if os.path.lexists(path):
            raise exists_error(self.url(path))
        temp = os.path.join(directory, f".{name}.{uuid.uuid4().hex}.partial")
        _write_file(temp, data)
        try:
            # NOTE: on filesystems without hard links (FAT, some FUSE mounts) os.link raises
            # another OSError, which propagates: there is no atomic create-only write there.
            os.link(temp, path)
        except FileExistsError as e:
            raise exists_error(self.url(path)) from e
        finally:
            os.unlink(temp)
        _fsync_dir(directory)

    def replace(self, path: str, data: bytes, expected: str | None) -> str:
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        lock = path + LOCK_SUFFIX
        try:
            fd = os.open(lock, _CREATE_FLAGS, 0o644)
        except FileExistsError as e:
            raise ConflictError(f"{self.url(path)} is locked by another writer", locked_by=self.url(lock)) from e
        try:
            with os.fdopen(fd, "wb") as f:
                current = self.read_with_token(path)
                token = current[1] if current is not None else None
                if token != expected:
                    raise ConflictError(f"{self.url(path)} changed since it was read")
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(lock, path)
        except BaseException:
            _unlink_quietly(lock)
            raise
        _fsync_dir(directory)
        return content_token(data)

    def read_with_token(self, path: str) -> tuple[bytes, str] | None:
        try:
            data = self.read(path)
        except FileNotFoundError:
            return None
        return data, content_token(data)

    def list_names(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(path))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def list_dirs(self, path: str) -> list[str]:
        try:
            return sorted(entry.name for entry in os.scandir(path) if entry.is_dir())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def remove(self, path: str) -> None:
        _unlink_quietly(path)

    def remove_empty_dirs(self, path: str) -> None:
        try:
            os.rmdir(path)
        except (FileNotFoundError, OSError):
            # OSError: the folder is not empty (ENOTEMPTY) or is not a folder.
            pass

    def flush(self, paths: list[str]) -> None:
        directories = set()
        for path in paths:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            directories.add(os.path.dirname(path))
        for directory in directories:
            _fsync_dir(directory)


def _write_file(path: str, data: bytes) -> None:
    fd = os.open(path, _CREATE_FLAGS, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
