"""Registry primitives on S3 (and S3-compatible stores that support conditional writes).

- Create-only: ``PutObject`` with ``If-None-Match: *``. S3 responds with 412 when the
  key exists, so of two writers exactly one succeeds.
- Compare-and-swap: ``GetObject`` returns the body and its ETag in one response. The
  update is ``PutObject`` with ``If-Match: <ETag>``, or with ``If-None-Match: *`` when
  the object did not exist. S3 responds with 412 when the ETag changed, and with 409
  (ConditionalRequestConflict) when another conditional write to the key is in flight.
- Incomplete multipart uploads (from a shard writer that died) are listed with
  ``ListMultipartUploads`` under a prefix and removed with ``AbortMultipartUpload``.

Both headers are described in the Amazon S3 User Guide, "How to prevent object
overwrites with conditional writes". A store that ignores them silently turns both
writes into plain overwrites.
"""

from __future__ import annotations

import io
import logging
from typing import Any

from fsspec.asyn import sync

from pipeline.registry.store import ConflictError, ObjectStore, PendingUpload
from pipeline.storage.sinks import exists_error

logger = logging.getLogger(__name__)

_CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412", "409", "404"}


class S3Store(ObjectStore):
    """S3 through s3fs: conditional PutObject for create-only writes and compare-and-swap."""

    def read(self, path: str) -> bytes:
        self.fs.invalidate_cache(path)
        return self.fs.cat_file(path)

    def read_with_token(self, path: str) -> tuple[bytes, str] | None:
        bucket, key, _ = self.fs.split_path(path)
        try:
            return sync(self.fs.loop, _get_object, self.fs, bucket, key)
        except FileNotFoundError:
            return None

    def create(self, path: str, data: bytes) -> None:
        try:
            self._put(path, data, IfNoneMatch="*")
        except FileExistsError as e:
            raise exists_error(self.url(path)) from e
        except OSError as e:
            if _error_code(e) == "ConditionalRequestConflict":
                raise exists_error(self.url(path)) from e
            raise

    def replace(self, path: str, data: bytes, expected: str | None) -> str:
        condition = {"IfMatch": expected} if expected is not None else {"IfNoneMatch": "*"}
        try:
            return self._put(path, data, **condition)
        except (FileExistsError, FileNotFoundError) as e:
            # If-None-Match failed (the object appeared), or If-Match found no object.
            raise ConflictError(f"{self.url(path)} changed since it was read") from e
        except OSError as e:
            if _error_code(e) in _CONFLICT_CODES:
                raise ConflictError(f"{self.url(path)} changed since it was read") from e
            raise

    def pending_uploads(self, prefix: str) -> list[PendingUpload]:
        bucket, key_prefix, _ = self.fs.split_path(prefix)
        key_prefix = key_prefix.rstrip("/") + "/" if key_prefix else ""
        uploads: list[PendingUpload] = []
        markers: dict[str, str] = {}
        while True:
            page = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key_prefix, **markers)
            for upload in page.get("Uploads", []):
                initiated = upload.get("Initiated")
                uploads.append(
                    PendingUpload(
                        path=f"{bucket}/{upload['Key']}",
                        upload_id=upload["UploadId"],
                        initiated=initiated.timestamp() if initiated is not None else None,
                    )
                )
            if not page.get("IsTruncated"):
                return uploads
            markers = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}

    def abort_upload(self, upload: PendingUpload) -> None:
        bucket, key, _ = self.fs.split_path(upload.path)
        self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload.upload_id)

    def _put(self, path: str, data: bytes, **condition: str) -> str:
        """Send one PutObject and return the new object's ETag."""
        bucket, key, _ = self.fs.split_path(path)
        try:
            # A file object, not bytes: aiohttp rejects large raw bodies on its event loop.
            response = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=io.BytesIO(data), **condition)
            return str(response["ETag"])
        finally:
            self.fs.invalidate_cache(path)


async def _get_object(fs: Any, bucket: str, key: str) -> tuple[bytes, str]:
    response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
    body = response["Body"]
    try:
        data = await body.read()
    finally:
        body.close()
    return data, str(response["ETag"])


def _error_code(error: BaseException) -> str | None:
    """Return the S3 error code of a botocore ClientError that s3fs translated into ``error``."""
    cause = error.__cause__
    response = getattr(cause, "response", None)
    if not isinstance(response, dict):
        return None
    code = response.get("Error", {}).get("Code")
    if code is None:
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = str(status) if status is not None else None
    return code
