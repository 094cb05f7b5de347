"""Create-only byte sinks: one object or file, streamed, then committed or aborted.

A sink is opened for one destination, receives bytes with ``write`` in order, and
ends with exactly one ``commit`` (the object appears) or ``abort`` (nothing remains).
No sink overwrites an existing object:

- local files are written to a hidden temporary file in the destination directory
  and published with ``os.link``, which fails when the destination exists, so the
  shard appears complete or not at all;
- S3 objects are written with ``PutObject`` or a multipart upload whose
  ``CompleteMultipartUpload`` carries ``If-None-Match: *``; an abort calls
  ``AbortMultipartUpload`` so no parts remain;
- other fsspec filesystems (``memory://`` among them) are opened with mode ``"xb"``
  where the backend supports it, and otherwise checked for existence before writing.
  Both are check-then-write on ``memory://``, so a concurrent writer can still race.
"""

from __future__ import annotations

import io
import logging
import os
import uuid
from abc import ABC, abstractmethod
from typing import Any

import fsspec

from pipeline.storage import fsio
from pipeline.storage.errors import ObjectExistsError

logger = logging.getLogger(__name__)

# S3 limits: every part but the last is at least 5 MiB, at most 5 GiB, and an upload
# has at most 10,000 parts.
S3_MIN_PART_BYTES = 5 * 2**20
S3_MAX_PART_BYTES = 5 * 2**30
S3_MAX_PARTS = 10_000
DEFAULT_PART_BYTES = 64 * 2**20


def exists_error(url: str) -> ObjectExistsError:
    return ObjectExistsError(
        f"{url} already exists; shards are written create-only and never overwritten. "
        "Write to a new output URL or delete the existing object first"
    )


class ShardSink(ABC):
    """Destination of one streamed object."""

    url: str

    @abstractmethod
    def write(self, data: memoryview) -> None:
        """Append ``data``; the caller may reuse its buffer after this returns."""

    @abstractmethod
    def commit(self) -> None:
        """Publish the object. Raises ObjectExistsError if the destination appeared meanwhile."""

    @abstractmethod
    def abort(self) -> None:
        """Discard everything written; safe to call after a failed commit."""


def open_sink(
    fs: fsspec.AbstractFileSystem,
    path: str,
    *,
    part_size: int = DEFAULT_PART_BYTES,
    url: str | None = None,
) -> ShardSink:
    """Open a create-only sink for ``path`` on ``fs``.

    ``url`` is the destination as the caller spelled it, for messages. Raises
    ObjectExistsError naming the URL when the destination already exists.
    """
    url = url or fsio.url_of(fs, path)
    if fsio.is_local(fs):
        return LocalSink(fs, path, url=url)
    if "s3" in _protocols(fs):
        return S3Sink(fs, path, part_size=part_size, url=url)
    return FsspecSink(fs, path, url=url)


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


class LocalSink(ShardSink):
    """A local file written to a temporary name and published with ``os.link``."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, *, url: str | None = None) -> None:
        self.url = url or fsio.url_of(fs, path)
        self._path = path
        if os.path.lexists(path):
            raise exists_error(self.url)
        directory, name = os.path.split(path)
        os.makedirs(directory or ".", exist_ok=True)
        self._temp = os.path.join(directory, f".{name}.{uuid.uuid4().hex}.partial")
        self._fd: int | None = os.open(
            self._temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644
        )

    def write(self, data: memoryview) -> None:
        assert self._fd is not None, "write after commit or abort"
        view = memoryview(data).cast("B")
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def commit(self) -> None:
        self._close()
        try:
            os.link(self._temp, self._path)
        except FileExistsError as e:
            self._remove_temp()
            raise exists_error(self.url) from e
        except OSError as e:
            # NOTE: some filesystems (FAT, several FUSE mounts) have no hard links. There the
            # fallback is check-then-rename, which a concurrent writer can race.
            logger.info("os.link failed for %s (%s); falling back to check-then-rename", self.url, e)
            if os.path.lexists(self._path):
                self._remove_temp()
                raise exists_error(self.url) from e
            os.rename(self._temp, self._path)
            return
        self._remove_temp()

    def abort(self) -> None:
        self._close()
        self._remove_temp()

    def _close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def _remove_temp(self) -> None:
        try:
            os.unlink(self._temp)
        except FileNotFoundError:
            pass


class S3Sink(ShardSink):
    """An S3 object written with one PutObject, or a multipart upload above one part."""

    def __init__(
        self, fs: Any, path: str, *, part_size: int = DEFAULT_PART_BYTES, url: str | None = None
    ) -> None:
        if not S3_MIN_PART_BYTES <= part_size <= S3_MAX_PART_BYTES:
            raise ValueError(
                f"part_size is {part_size} bytes; S3 requires {S3_MIN_PART_BYTES} (5 MiB) to "
                f"{S3_MAX_PART_BYTES} (5 GiB)"
            )
        self.url = url or fsio.url_of(fs, path)
        self._fs = fs
        self._path = path
        self._bucket, self._key, _ = fs.split_path(path)
        self._part_size = part_size
        # Bodies go to botocore as file objects, because aiohttp warns that a large bytes
        # body blocks its event loop while it is sent.
        self._buffer = io.BytesIO()
        self._parts: list[dict[str, Any]] = []
        self._upload_id: str | None = None
        # Fail before uploading anything; If-None-Match on the final request still guards
        # against an object that appears while the upload runs.
        fs.invalidate_cache(path)
        if fs.exists(path):
            raise exists_error(self.url)

    @property
    def upload_id(self) -> str | None:
        """The multipart upload id, once the first part has been sent."""
        return self._upload_id

    def write(self, data: memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            room = self._part_size - self._buffer.tell()
            self._buffer.write(view[:room])
            view = view[room:]
            if self._buffer.tell() >= self._part_size:
                self._upload_part()

    def commit(self) -> None:
        try:
            if self._upload_id is None:
                self._buffer.seek(0)
                self._call("put_object", Body=self._buffer, IfNoneMatch="*")
            else:
                if self._buffer.tell():
                    self._upload_part()
                self._call(
                    "complete_multipart_upload",
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": self._parts},
                    IfNoneMatch="*",
                )
                logger.debug("completed multipart upload %s of %s", self._upload_id, self.url)
                self._upload_id = None
        except FileExistsError as e:
            # s3fs turns 412 PreconditionFailed on If-None-Match into FileExistsError.
            self.abort()
            raise exists_error(self.url) from e
        finally:
            self._buffer = io.BytesIO()
            self._fs.invalidate_cache(self._path)

    def abort(self) -> None:
        self._buffer = io.BytesIO()
        if self._upload_id is None:
            return
        upload_id, self._upload_id = self._upload_id, None
        try:
            self._call("abort_multipart_upload", UploadId=upload_id)
            logger.info("aborted multipart upload %s of %s", upload_id, self.url)
        except Exception:
            # The original error is what the caller needs; an orphaned upload is logged so that
            # an operator (or a bucket lifecycle rule) can remove it.
            logger.exception("failed to abort multipart upload %s of %s", upload_id, self.url)

    def _upload_part(self) -> None:
        if self._upload_id is None:
            self._upload_id = self._call("create_multipart_upload")["UploadId"]
            logger.debug("started multipart upload %s of %s", self._upload_id, self.url)
        number = len(self._parts) + 1
        if number > S3_MAX_PARTS:
            raise ValueError(
                f"{self.url}: more than {S3_MAX_PARTS} parts of {self._part_size} bytes; "
                "use a larger part_size"
            )
        body, self._buffer = self._buffer, io.BytesIO()
        body.seek(0)
        response = self._call("upload_part", UploadId=self._upload_id, PartNumber=number, Body=body)
        self._parts.append({"PartNumber": number, "ETag": response["ETag"]})

    def _call(self, method: str, **kwargs: Any) -> Any:
        return self._fs.call_s3(method, Bucket=self._bucket, Key=self._key, **kwargs)


class FsspecSink(ShardSink):
    """Any other fsspec filesystem, through ``fs.open``."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, *, url: str | None = None) -> None:
        self.url = url or fsio.url_of(fs, path)
        self._fs = fs
        self._path = path
        try:
            self._file = fs.open(path, "xb")
        except FileExistsError as e:
            raise exists_error(self.url) from e
        except (ValueError, NotImplementedError):
            logger.info("%s does not support mode 'xb'; checking for an existing object", self.url)
            if fs.exists(path):
                raise exists_error(self.url) from None
            self._file = fs.open(path, "wb")

    def write(self, data: memoryview) -> None:
        self._file.write(data)

    def commit(self) -> None:
        self._file.close()

    def abort(self) -> None:
        discard = getattr(self._file, "discard", None)
        if discard is not None:
            discard()
        # Some backends (memory://) publish the file when it is opened.
        try:
            self._fs.rm_file(self._path)
        except FileNotFoundError:
            pass
